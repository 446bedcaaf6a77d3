"""The Dask client every data-parallel stage runs on.

Without ``--scheduler`` an embedded LocalCluster sized to the machine is
started (processes, HTTP/dashboard on a random free port); with it, the
stage joins an existing cluster (dask-jobqueue, Kubernetes, Coiled ...).
"""

from __future__ import annotations

import contextlib
import logging
import os

from mrhscale.errors import MRHError


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | int | None = "auto",
    processes: bool = True,
    quiet: bool = False,
):
    """Yield a ``distributed.Client``; an embedded cluster is closed on exit."""
    from distributed import Client, LocalCluster

    if workers is not None and workers < 1:
        raise MRHError(f"--workers must be >= 1, got {workers}")
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as e:
            raise MRHError(f"--scheduler {scheduler}: cannot connect ({e})") from None
        try:
            yield client
        finally:
            client.close()
        return
    n = workers or max(1, os.cpu_count() or 1)
    level = logging.ERROR if quiet else logging.WARNING
    cluster = LocalCluster(
        n_workers=n,
        threads_per_worker=threads_per_worker,
        processes=processes,
        memory_limit=memory_limit,
        # a random free port: several clusters (tests, parallel jobs) must not fight over 8787
        dashboard_address=":0",
        silence_logs=level,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
