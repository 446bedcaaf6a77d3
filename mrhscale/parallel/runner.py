"""The one loop that runs a Dask stage's tasks (which client it runs on: ``Context.runner``).

``run_tasks`` and ``completed`` submit, show progress, cancel everything on the first failure (no
task may go on writing into an output being abandoned) and turn a worker-side
failure into the one-line error the user sees.
"""

from __future__ import annotations

import dask

from mrhscale.errors import MRHError
from mrhscale.log import progress
from mrhscale.parallel.cluster import task_error

LOCAL_SCHEDULERS = ("synchronous", "sync", "single-threaded", "threads", "threading", "processes")


def active_client():
    """The distributed client this process is using already, if any."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def run_tasks(env, tasks: list, desc: str, *, quiet: bool = False, what: str | None = None) -> list:
    """Compute Dask delayed ``tasks`` on ``env`` (a client or a local scheduler name); their
    results in order. A failure cancels the rest and is raised as an MRHError naming ``what``."""

    if not tasks:
        return []
    if isinstance(env, str):
        return list(dask.compute(*tasks, scheduler=env))
    futures = env.compute(tasks)
    try:
        for _ in completed(futures, desc, quiet, what=(lambda _f: what) if what else None):
            pass
        return env.gather(futures)
    finally:
        env.cancel([f for f in futures if f.status != "finished"])


def completed(futures, desc: str, quiet: bool = False, what=None, fail_fast: bool = True, unit: str = "task"):
    """Futures as they finish, with progress. With ``fail_fast`` the first failure cancels
    the others and is raised as one line (``what(future)`` names what failed, default
    ``desc``); without it every future is yielded and the caller handles failures."""
    from distributed import as_completed


    futures = list(futures)
    with progress(total=len(futures), desc=desc, unit=unit, quiet=quiet, leave=False) as bar:
        for f in as_completed(futures):
            if f.status == "error" and fail_fast:
                exc = f.exception()  # read before cancelling, which forgets it
                for other in futures:
                    other.cancel()
                if isinstance(exc, MRHError) and what is None:
                    raise exc
                raise task_error(exc, what(f) if what else desc) from None
            bar.update(1)
            yield f
