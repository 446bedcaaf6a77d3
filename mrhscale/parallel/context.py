"""The execution context: where a stage's data lives and where its work runs, in one object.

A stage takes its domain arguments (stores, subjects, options) and one ``ctx``;
how to reach object storage, which Dask cluster to use, which device, how
chatty to be, are the caller's choice, made once at the boundary (the CLI, or
``Context()``'s defaults in Python) instead of threaded through every function.

``Context.runner()`` opens what the stage runs on and hands back a ``Runner``
that treats a local Dask scheduler ("synchronous", "threads"...) and a
distributed ``Client`` alike, so no stage branches on which it got.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import dask

from mrhscale.errors import MRHError
from mrhscale.log import note, progress
from mrhscale.parallel.runner import LOCAL_SCHEDULERS, active_client, completed, run_tasks
from mrhscale.stores.urls import Location


@dataclass(frozen=True)
class Context:
    """Where data lives and where work runs (see the module docstring).

    storage_options: fsspec options for URL stores (s3://...); local paths ignore them.
    scheduler: a Dask scheduler address (tcp://host:8786) or a local scheduler name
        (synchronous, threads, processes); None: the active client, else an embedded
        LocalCluster of ``dask_workers`` processes.
    client: a ``distributed.Client`` to use as it is (wins over ``scheduler``).
    device: where networks run (cpu, cuda, cuda:N); an embedded cluster for ``cuda`` has
        one worker per GPU.
    quiet: no progress bars or notes (warnings still show).
    """

    storage_options: Mapping[str, Any] | None = None
    scheduler: str | None = None
    client: Any = field(default=None, compare=False)
    dask_workers: int | None = None
    device: str = "cpu"
    quiet: bool = False

    def __post_init__(self):
        if self.dask_workers is not None and self.dask_workers < 1:
            raise MRHError(f"--dask-workers must be >= 1, got {self.dask_workers}")

    def location(self, url, what: str = "path") -> Location:
        """``url`` resolved, with the storage options that open it (none for a local path): the
        one place a stage turns a path it was given into a store's place."""
        return Location.of(url, self.storage_options, what)

    def but(self, **changes) -> Context:
        """This context with some fields changed (``ctx.but(quiet=True)`` for an inner step)."""
        return replace(self, **changes)

    @property
    def local(self) -> bool:
        """Whether work runs in this process by a local scheduler name (no cluster)."""
        return self.client is None and self.scheduler in LOCAL_SCHEDULERS

    @property
    def embedded(self) -> bool:
        """Whether ``runner()`` starts a LocalCluster here (no client, scheduler or active client
        to use): a stage can then put off starting it until it has work."""
        return self.client is None and self.scheduler is None and (
            self.dask_workers is not None or active_client() is None)

    @contextlib.contextmanager
    def runner(self, device: str | None = None, *, threads: bool = False) -> Iterator[Runner]:
        """The Runner of this context: the given client, a local scheduler, the active client
        (a notebook's), else an embedded cluster closed on exit (``device`` overrides
        ``self.device`` for its shape). ``threads``: the stage's tasks release the GIL (torch,
        Blosc), so an embedded CPU cluster without ``dask_workers`` is one worker in this
        process with a thread per core: no worker process to start, no second copy of torch
        and the network (predict on the embedded cluster ran x5 faster than on worker
        processes: benchmarks/RESULTS.md, "feed: predict, second pass")."""
        if self.client is not None:
            yield Runner(self.client, self.quiet, self)
        elif self.local:
            yield Runner(self.scheduler, self.quiet, self)
        elif self.scheduler is None and self.dask_workers is None and active_client() is not None:
            yield Runner(active_client(), self.quiet, self.but(client=active_client()))
        else:
            yield from self._embedded(device or self.device, threads)

    def _embedded(self, device: str, threads: bool = False) -> Iterator[Runner]:
        from mrhscale.parallel.cluster import dask_client  # starts processes: only when needed

        in_process = threads and device == "cpu" and self.dask_workers is None and not self.scheduler
        shape = (dict(workers=1, threads_per_worker=os.cpu_count() or 1, processes=False) if in_process
                 else dict(workers=self.dask_workers))
        with dask_client(scheduler=self.scheduler, quiet=self.quiet, device=device, **shape) as client:
            if self.scheduler is None:
                note(f"Dask dashboard: {client.dashboard_link}", self.quiet)
            yield Runner(client, self.quiet, self.but(client=client))


class Runner:
    """Runs Dask work on a local scheduler (by name) or a distributed Client alike.

    ``context``: the Context of the work on this runner, its client given: an inner stage
    run with it reuses this cluster instead of starting its own."""

    def __init__(self, env, quiet: bool = False, context: Context | None = None):
        self.env, self.quiet = env, quiet
        self.context = context or Context(scheduler=self.scheduler_name, client=self.client, quiet=quiet)

    @property
    def client(self):
        """The distributed Client, or None on a local scheduler."""
        return None if isinstance(self.env, str) else self.env

    @property
    def scheduler_name(self) -> str | None:
        """The local scheduler's name, or None on a Client."""
        return self.env if isinstance(self.env, str) else None

    def compute(self, tasks: list, desc: str, *, what: str | None = None, quiet: bool | None = None) -> list:
        """Results of Dask delayed ``tasks``, in order; the first failure cancels the rest and is
        raised as one line naming ``what``."""
        quiet = self.quiet if quiet is None else quiet
        if isinstance(self.env, str):
            return list(dask.compute(*tasks, scheduler=self.env)) if tasks else []
        return run_tasks(self.env, tasks, desc, quiet=quiet, what=what)

    def each_finished(self, tasks: Iterable, desc: str, *, unit: str = "task", window: int | None = None,
                      total: int | None = None, quiet: bool | None = None,
                      ahead: bool = False) -> Iterator[tuple[int, Any, Exception | None]]:
        """Dask delayed ``tasks`` run side by side (one after another on a local scheduler):
        ``(index, result, None)`` or ``(index, None, error)`` for each as it finishes, with
        progress. A failure does not stop the others; those not finished when the caller
        stops iterating are cancelled. ``tasks`` may be an iterator that builds each task
        as it is taken: with ``window``, at most that many are built and unfinished at once,
        so this process holds a bounded number of graphs however many tasks there are
        (``total``: their number, for progress; ``quiet``: no progress, default the runner's).
        ``ahead``: on a local scheduler, the next task is built in a thread while this one runs
        (building must then be thread-safe: predict's opens a subject and creates its arrays,
        I/O and Python that the running task's network, which releases the GIL, leaves room for)."""
        total = len(tasks) if total is None and hasattr(tasks, "__len__") else total
        built = _built_ahead(tasks) if ahead and self.client is None else None
        each = self._each_local(built or tasks) if self.client is None else self._each_on_client(tasks, window)
        quiet = self.quiet if quiet is None else quiet
        with progress(total=total, desc=desc, unit=unit, quiet=quiet, leave=False) as bar, \
                contextlib.closing(built) if built else contextlib.nullcontext(), contextlib.closing(each):
            for item in each:
                yield item
                bar.update(1)

    def _each_local(self, tasks: Iterable) -> Iterator[tuple[int, Any, Exception | None]]:
        for i, task in enumerate(tasks):
            try:
                (res,) = dask.compute(task, scheduler=self.env)
            except Exception as e:
                yield i, None, e
            else:
                yield i, res, None

    def _each_on_client(self, tasks: Iterable, window: int | None) -> Iterator[tuple[int, Any, Exception | None]]:
        """``each_finished`` on the Client: at most ``window`` tasks taken and unfinished (all if None)."""
        from distributed import as_completed

        todo, live, done = enumerate(tasks), {}, as_completed()

        def top_up():
            batch = list(itertools.islice(todo, None if window is None else max(0, window - len(live))))
            for (i, _), f in zip(batch, self.client.compute([t for _, t in batch]) if batch else []):
                live[id(f)] = (i, f)
                done.add(f)

        try:
            top_up()
            for f in done:
                i, _ = live.pop(id(f))
                try:
                    res = f.result()
                except Exception as e:
                    f.cancel()  # release the erred key: a rerun with the same (pure) keys must recompute
                    yield i, None, e
                else:
                    yield i, res, None
                top_up()
        finally:
            self.client.cancel([f for _, f in live.values()])

    def share(self, value):
        """``value`` for this runner's tasks (an argument of their delayed calls): on a Client
        scattered once to every worker, so no task's graph carries a copy; as it is here."""
        return value if self.client is None else self.client.scatter(value, broadcast=True)

    def on_workers(self, fn: Callable, *args) -> dict[str, Any]:
        """``fn(*args)`` once in every worker process (here only, on a local scheduler):
        {worker: result}."""
        return {"local": fn(*args)} if self.client is None else self.client.run(fn, *args)

    def n_workers(self) -> int:
        """Worker processes (1 on a local scheduler)."""
        if self.client is None:
            return 1
        return max(1, len(self.client.scheduler_info().get("workers", {})))

    def n_threads(self) -> int:
        """Task threads of all workers together (1 on a local scheduler): how many tasks run at once."""
        if self.client is None:
            return 1
        return max(1, sum(self.client.nthreads().values()))

    def thread_memory_limits(self) -> list[int]:
        """Each worker's memory limit per task thread, in bytes (0: none; empty on a local scheduler)."""
        if self.client is None:
            return []
        return [int(w.get("memory_limit") or 0) // max(1, int(w.get("nthreads", 1)))
                for w in self.client.scheduler_info()["workers"].values()]

    def worker_memory_limits(self) -> list[int]:
        """Each worker's memory limit in bytes (0: none; empty on a local scheduler)."""
        if self.client is None:
            return []
        return [w.get("memory_limit") or 0 for w in self.client.scheduler_info()["workers"].values()]

    def submit_each(self, fn: Callable, items: list, desc: str, *args, unit: str = "task") -> list:
        """``fn(item, *args)`` for each item, one task each (side by side on a Client), in order."""
        if self.client is None:
            return [fn(item, *args) for item in items]
        futures = [self.client.submit(fn, item, *args, pure=False) for item in items]
        list(completed(futures, desc, self.quiet, unit=unit))
        return self.client.gather(futures)


def _built_ahead(tasks: Iterable) -> Iterator:
    """``tasks`` in order, each next one taken (built) in a thread while the caller works on
    this one; the thread is done with ``tasks`` when this generator ends or is closed."""
    it = iter(tasks)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mrhscale-build") as pool:
        nxt = pool.submit(next, it, _END)
        while (task := nxt.result()) is not _END:
            nxt = pool.submit(next, it, _END)
            yield task


_END = object()
