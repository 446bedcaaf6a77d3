"""The Dask client every data-parallel stage runs on.

Without ``--scheduler`` an embedded LocalCluster sized to the machine is
started (processes, HTTP/dashboard on a random free port); with it, the
stage joins an existing cluster (dask-jobqueue, Kubernetes, Coiled ...).

``distributed`` (0.4 s to import) and torch are imported inside the functions that
start or talk to a cluster: the Context and the command line import this module,
and ``mrhscale --help`` must not pay for them.
"""

from __future__ import annotations

import contextlib
import logging
import os

from mrhscale.errors import MRHError

# Set before they start (glibc reads it once, at process start) in every embedded worker
# with a memory limit of 2 GiB or more, as tune_malloc: one malloc arena. A task thread
# otherwise allocates from a secondary arena, whose heaps are at most 64 MiB; a batch-4096
# forward (~10 MiB per activation) next to the block and its patches kept creating and
# unmapping heaps, up to 1.6 M page faults per 157k-voxel forward pass, and the network
# ran at 22.5k instead of 28.5k patches/s on 2 cores, a state that came and went between
# runs. Small workers, which keep Dask's own malloc settings, ran predict ~25% slower with
# it. For a cluster you start yourself, set it in the workers' environment (docs/scaling.md).
WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}
# Dask's developer logs of recent messages (each comm's last 1,000 batches, the scheduler's
# last 1,000 transitions) keep the tasks they name alive, pickled graphs and run specs
# included: ~100 KB a subject in the driver (where an embedded cluster's scheduler runs)
# until they fill, most of what grew with the cohort (benchmarks/RESULTS.md, "driver
# memory"). Set while the embedded cluster and the client start (each comm reads it then).
DRIVER_CONFIG = {"distributed.admin.low-level-log-length": 16}


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | int | None = "auto",
    processes: bool = True,
    quiet: bool = False,
    device: str = "cpu",
):
    """Yield a ``distributed.Client``; an embedded cluster is closed on exit, and its
    workers start with ``WORKER_ENV``. ``device="cuda"``: one worker per GPU (gpu_workers)."""
    import dask
    from distributed import Client, LocalCluster

    if workers is not None and workers < 1:
        raise MRHError(f"--workers must be >= 1, got {workers}")
    if scheduler:
        try:
            with dask.config.set(DRIVER_CONFIG):
                client = Client(scheduler, timeout="20s")
        except OSError as e:
            raise MRHError(f"--scheduler {scheduler}: cannot connect ({e})") from None
        try:
            yield client
        finally:
            _close_quietly(client, f"the Dask client of {scheduler}")
        return
    level = logging.ERROR if quiet else logging.WARNING
    if device == "cuda":
        with gpu_client(workers, level) as client:
            yield client
        return
    n = workers or max(1, os.cpu_count() or 1)
    spawn_env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    if _tunable(memory_limit, threads_per_worker):
        spawn_env.update(WORKER_ENV)
    with _parent_environ_kept(), dask.config.set({"distributed.nanny.pre-spawn-environ": spawn_env, **DRIVER_CONFIG}):
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
    client.register_plugin(quiet_task_failures(log_file()), name=QUIET_PLUGIN)
    client.register_plugin(forget_done_groups(), name=FORGET_PLUGIN)
    try:
        with _tracebacks_to_log():
            yield client
    finally:
        with _tracebacks_to_log():
            _close_quietly(client, "the Dask client")
            with _parent_environ_kept():  # a nanny restarting a worker while closing sets them again
                _close_quietly(cluster, "the embedded Dask cluster")


FORGET_PLUGIN = "mrhscale-forget-done-groups"


def forget_done_groups():
    """A plugin for the embedded scheduler (it runs in the driver): every 10 s, its spans'
    and computations' references to task groups the scheduler has forgotten are dropped.

    Distributed keeps them for its dashboard forever (dask/distributed#7977), ~6 groups a
    subject of ingest or patches, each with its own dicts and sets: tens of MB at 2,000
    subjects, and small long-lived objects that pin the heap's pages around them
    (benchmarks/RESULTS.md, "cohort size"). The dashboard's history of finished work is
    what this drops; a cluster you start yourself is left as it is. (A class made here:
    the Context imports this module, distributed only when a cluster starts.)

    It also empties dask's ``key_split`` cache (100,000 task names and their prefixes, filled
    with each subject's unique keys: ~86 a subject of ingest, so full at ~1,200 subjects,
    ~15 MB of small strings); the scheduler fills it again from the keys it still runs."""
    import dask.utils
    from distributed.diagnostics.plugin import SchedulerPlugin
    from tornado.ioloop import PeriodicCallback

    class _Forget(SchedulerPlugin):
        async def start(self, scheduler) -> None:
            self.scheduler = scheduler
            self.callback = PeriodicCallback(self.forget, 10_000)
            self.callback.start()

        async def close(self) -> None:
            self.callback.stop()

        def forget(self) -> int:
            live = self.scheduler.task_groups
            spans = getattr(self.scheduler.extensions.get("spans"), "spans", {})
            holders = [s.groups for s in spans.values()] + [c.groups for c in self.scheduler.computations]
            dropped = 0
            for groups in holders:
                done = [tg for tg in groups if live.get(tg.name) is not tg]
                groups.difference_update(done)
                dropped += len(done)
            dask.utils.key_split.cache_clear()
            return dropped

    return _Forget()


GPU_ENV = "MRHSCALE_WORKER_GPU"


@contextlib.contextmanager
def gpu_client(workers: int | None, level: int):
    """A client of one worker process per visible GPU (``workers`` caps it). dask-cuda's
    LocalCUDACluster when installed (each worker sees only its own device); else a
    LocalCluster whose worker ``i`` takes GPU ``i`` (``PinGPU``, read by ``worker_device``).
    Without either, every worker would load the model on GPU 0."""
    import dask
    import torch
    from distributed import Client, LocalCluster

    n_gpus = torch.cuda.device_count()
    if n_gpus < 1:
        raise MRHError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu")
    n = min(workers or n_gpus, n_gpus)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        LocalCUDACluster = None
    with _parent_environ_kept(), dask.config.set(DRIVER_CONFIG):
        if LocalCUDACluster is not None:
            cluster = LocalCUDACluster(CUDA_VISIBLE_DEVICES=list(range(n)), threads_per_worker=1,
                                       dashboard_address=":0", silence_logs=level)
        else:
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs=level)
        client = Client(cluster)
    try:
        if LocalCUDACluster is None:
            client.register_plugin(PinGPU(n_gpus))
        client.register_plugin(quiet_task_failures(log_file()), name=QUIET_PLUGIN)
        yield client
    finally:
        _close_quietly(client, "the Dask client")
        with _parent_environ_kept():
            _close_quietly(cluster, "the embedded GPU cluster")


def _close_quietly(obj, what: str) -> None:
    """Close a client or an embedded cluster; a failure here is a warning, never an error.

    The stage's work is done (or its own error is on its way) by the time the cluster is
    closed: on a loaded machine ``cluster.close()`` timed out killing a worker and turned a
    finished ingest into exit 1 with a traceback. Worker processes are daemonic: one left
    behind dies with this process.
    """
    import asyncio

    try:
        obj.close()
    except (Exception, asyncio.CancelledError) as e:  # not KeyboardInterrupt: that still stops us
        from mrhscale.log import logger

        logger.warning("closing %s failed (%s: %s); ignored, the stage's outcome stands",
                       what, type(e).__name__, str(e) or "no message")


def _pin_gpu_plugin():
    from distributed.diagnostics.plugin import WorkerPlugin

    class _PinGPU(WorkerPlugin):
        """Worker ``i`` of an embedded GPU cluster uses GPU ``i mod n``."""

        name = "mrhscale-pin-gpu"

        def __init__(self, n_gpus: int):
            self.n_gpus = n_gpus

        def setup(self, worker):
            try:
                index = int(worker.name)
            except (TypeError, ValueError):
                index = abs(hash(worker.name))
            os.environ[GPU_ENV] = str(index % self.n_gpus)

    return _PinGPU


def PinGPU(n_gpus: int):  # noqa: N802 (a class made on first use: distributed is imported lazily)
    return _pin_gpu_plugin()(n_gpus)


def worker_device(device: str) -> str:
    """The torch device for ``device`` in this process: plain ``cuda`` is this worker's own GPU
    when the embedded GPU cluster pinned one."""
    pinned = os.environ.get(GPU_ENV)
    return f"cuda:{pinned}" if device == "cuda" and pinned is not None else device


@contextlib.contextmanager
def _parent_environ_kept():
    """Undo what distributed's Nanny does to THIS process's environment.

    Before spawning a worker the Nanny runs ``os.environ.update(pre-spawn-environ)``
    in the parent (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_=65536, ...) and never
    restores it, so every process started afterwards (torchrun ranks, a training
    subprocess) inherited them: glibc then unmaps every freed buffer over 64 KiB
    and torch ran ~2x slower (measured in benchmarks/bench_scale.py).
    """
    saved = dict(os.environ)
    try:
        yield
    finally:
        for k in set(os.environ) - set(saved):
            del os.environ[k]
        os.environ.update(saved)


def _tunable(memory_limit, threads_per_worker: int) -> bool:
    """Whether an embedded worker with this memory limit gets the malloc tuning."""
    from distributed.worker_memory import parse_memory_limit

    limit = parse_memory_limit(memory_limit, threads_per_worker, total_cores=os.cpu_count() or 1,
                               logger=logging.getLogger(__name__))
    return not limit or limit >= _MALLOC_MIN_LIMIT


_MALLOC_TUNED: bool | None = None
_MALLOC_MIN_LIMIT = 2 << 30  # worker memory limit below which malloc is left as Dask set it


def _worker_memory_limit() -> int | None:
    """This Dask worker's memory limit in bytes (None: not a worker, or no limit)."""
    try:
        from distributed import get_worker

        w = get_worker()
    except (ImportError, ValueError):
        return None
    lim = getattr(getattr(w, "memory_manager", None), "memory_limit", None)
    return int(lim) if lim else None


def tune_malloc() -> bool:
    """Let glibc reuse freed memory in this (worker) process; True where applied.

    Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also
    pins glibc's mmap threshold at 128 KiB: every numpy temporary and torch
    activation above that is mmapped, page-faulted and unmapped each time. Measured
    on 2 cores: a batch-4096 MRH-Net forward ran at half speed (14k vs 30k
    patches/s) and ingest lost ~20%. Serving blocks under 32 MiB from the heap and
    keeping up to 64 MiB of free heap restores it for at most ~64 MiB more RSS per
    worker. Tasks call it on their first run in a process (workers we did not
    start included); a no-op outside glibc and in workers with a memory limit
    under 2 GiB, where that headroom is not there.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is not None:
        return _MALLOC_TUNED
    limit = _worker_memory_limit()
    if limit is not None and limit < _MALLOC_MIN_LIMIT:
        # a small worker keeps Dask's setting: 64 MiB of retained heap (plus fragmentation)
        # pushed a 450 MiB worker past Dask's pause threshold and the stage stalled
        _MALLOC_TUNED = False
        return False
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        _MALLOC_TUNED = False
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    _MALLOC_TUNED = bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 64 << 20))
    return _MALLOC_TUNED


# --------------------------------------------------------------------------- task failures
def log_file() -> str:
    """Where Dask's worker tracebacks go instead of the terminal (MRHSCALE_LOG_DIR to move it)."""
    import tempfile
    import time

    d = os.environ.get("MRHSCALE_LOG_DIR") or os.path.join(tempfile.gettempdir(), "mrhscale-logs")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, f"dask-{time.strftime('%Y%m%d')}-{os.getpid()}.log")


class _DropTaskFailures(logging.Filter):
    """Keeps tracebacks off the terminal: a failing task's block, and the comm errors
    workers log while the cluster shuts down after a stage has failed."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("distributed"):
            return True  # only Dask's own records: a user's logging is theirs
        msg = str(record.msg)
        if msg.startswith(("Compute Failed", "Exception during execution of task")):
            return False
        return record.exc_info is None and "Traceback" not in record.getMessage()


QUIET_PLUGIN = "mrhscale-quiet-task-failures"


@contextlib.contextmanager
def _tracebacks_to_log():
    """In this process too (scheduler, nannies, client), Dask's tracebacks go to the log
    file while the embedded cluster lives: the user sees the stage's one line."""
    handler = logging.FileHandler(log_file())
    handler.setLevel(logging.WARNING)
    dist = logging.getLogger("distributed")
    streams = [h for h in dist.handlers + logging.getLogger().handlers
               if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    drop = _DropTaskFailures()
    dist.addHandler(handler)
    for h in streams:
        h.addFilter(drop)
    try:
        yield
    finally:
        for h in streams:
            h.removeFilter(drop)
        dist.removeHandler(handler)
        handler.close()


def quiet_task_failures(log_path: str):
    """A worker plugin: a failing task's traceback goes to ``log_path``, not the user's terminal.

    The stage reports the failure as one line (``task_error``); the worker's own
    'Compute Failed' block (task arguments and traceback) is kept in the log.
    """
    from distributed.diagnostics.plugin import WorkerPlugin

    class QuietTaskFailures(WorkerPlugin):
        def setup(self, worker):
            handler = logging.FileHandler(log_path)
            handler.setLevel(logging.WARNING)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            dist = logging.getLogger("distributed")
            dist.addHandler(handler)
            for h in dist.handlers + logging.getLogger().handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    h.addFilter(_DropTaskFailures())

    return QuietTaskFailures()


def task_error(exc: BaseException, what: str) -> MRHError:
    """A task's failure as the one-line error the user sees, naming ``what`` failed."""
    import errno

    from distributed.scheduler import KilledWorker

    if isinstance(exc, MRHError):
        msg = str(exc)
        return MRHError(msg if msg.startswith(what) else f"{what}: {msg}")
    if isinstance(exc, KilledWorker):
        return MRHError(f"{what}: a Dask worker died while running it (out of memory, or killed); "
                        f"give the workers more memory or fewer threads (log: {log_file()})")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return MRHError(f"{what}: no space left on the device{_where(exc)}; free space or write elsewhere")
    if isinstance(exc, FileNotFoundError):
        return MRHError(f"{what}: not found on a Dask worker{_where(exc)}; every path must be visible "
                        "from the workers (a shared filesystem, or a URL)")
    if isinstance(exc, PermissionError):
        return MRHError(f"{what}: permission denied{_where(exc)}")
    if isinstance(exc, MemoryError):
        return MRHError(f"{what}: out of memory on a Dask worker; give the workers more memory")
    return MRHError(f"{what}: failed on a Dask worker ({type(exc).__name__}: {exc}); "
                    f"worker log: {log_file()}")


def _where(exc: OSError) -> str:
    return f" ({exc.filename})" if getattr(exc, "filename", None) else ""
