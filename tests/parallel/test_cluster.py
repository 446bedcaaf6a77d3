"""The embedded cluster: it must not leak worker settings into the calling process."""

from __future__ import annotations

import os
import sys
import time

import pytest

from mrhscale.parallel.cluster import dask_client, tune_malloc


def test_embedded_cluster_leaves_the_parent_environment_alone():
    """distributed's Nanny sets OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_=65536... in the
    parent before spawning; a torchrun or training process started later inherited them."""
    before = dict(os.environ)
    with dask_client(workers=1, quiet=True) as client:
        in_worker = client.submit(lambda k: __import__("os").environ.get(k), "MALLOC_TRIM_THRESHOLD_", pure=False)
        assert in_worker.result() is not None  # the workers still get dask's settings
        assert dict(os.environ) == before
    assert dict(os.environ) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_malloc_tuning_applies_on_glibc():
    assert tune_malloc() is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
@pytest.mark.parametrize(("limit", "expect"), [("1GiB", False), ("4GiB", True)])
def test_malloc_tuning_only_in_workers_with_headroom(limit, expect):
    """A 450 MiB worker with 64 MiB of retained heap crossed Dask's pause threshold and the
    patch stage stalled: small workers keep Dask's setting."""
    with dask_client(workers=1, memory_limit=limit, quiet=True) as client:
        assert client.submit(tune_malloc, pure=False).result() is expect


def test_embedded_workers_start_with_one_malloc_arena():
    """A secondary arena's 64 MiB heaps were created and unmapped around every forward pass
    in a worker's task thread (page faults, a 20% slower network); one arena avoids that
    where tune_malloc applies (with Dask's own settings it made predict slower)."""
    from mrhscale.parallel.cluster import WORKER_ENV

    before = dict(os.environ)
    for limit, expect in (("4GiB", WORKER_ENV), ("1GiB", {k: None for k in WORKER_ENV})):
        with dask_client(workers=1, memory_limit=limit, quiet=True) as client:
            env = client.run(lambda: {k: __import__("os").environ.get(k) for k in WORKER_ENV})
            assert list(env.values()) == [expect], limit  # small workers keep Dask's malloc
        assert dict(os.environ) == before


def test_the_driver_keeps_a_short_log_of_dask_messages_whatever_the_number_of_computes():
    """Dask's developer logs of recent messages held every task's graph and run spec they
    named (~100 KB a subject in the driver of a cohort stage); an embedded cluster and its
    client keep 16 of each, and the caller's Dask config is left as it was."""
    import dask

    from mrhscale.parallel.cluster import DRIVER_CONFIG

    key = "distributed.admin.low-level-log-length"
    before = dask.config.get(key)
    with dask_client(workers=1, processes=False, quiet=True) as client:
        for i in range(40):
            assert client.compute(dask.delayed(sum)([i, 1])).result() == i + 1
        scheduler = client.cluster.scheduler
        logs = [c.recent_message_log for c in scheduler.stream_comms.values()]
        logs += [client.scheduler_comm.recent_message_log, scheduler.transition_log]
        assert {log.maxlen for log in logs} == {DRIVER_CONFIG[key]} and all(len(log) <= 16 for log in logs)
        assert dask.config.get(key) == before
    assert before > 16



def test_the_embedded_scheduler_forgets_the_task_groups_of_finished_work():
    """Distributed's spans and computations keep every task group for ever (~6 a subject of a
    cohort stage); the embedded scheduler drops those it has forgotten, not the live ones,
    and empties dask's cache of task-name prefixes (filled with every subject's keys)."""
    import dask.array as da
    import dask.utils

    from mrhscale.parallel.cluster import FORGET_PLUGIN

    def held(scheduler) -> set:
        spans = scheduler.extensions["spans"].spans.values()
        return {tg.name for h in [*spans, *scheduler.computations] for tg in h.groups}

    with dask_client(workers=1, processes=False, quiet=True) as client:
        for i in range(20):
            assert client.compute(da.full(10, i, chunks=5).sum()).result() == 10 * i
        kept = client.submit(sum, [1, 2])
        scheduler = client.cluster.scheduler
        deadline = time.monotonic() + 10
        while set(scheduler.task_groups) != {"sum"} and time.monotonic() < deadline:
            time.sleep(0.05)  # the finished graphs' keys are released after their results came
        before = held(scheduler)
        assert len(before) >= 20  # a group per graph, each kept
        assert dask.utils.key_split.cache_info().currsize > 20  # every graph's task names
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins[FORGET_PLUGIN].forget()) > 0
        assert held(scheduler) == {"sum"} and kept.result() == 3
        assert dask.utils.key_split.cache_info().currsize <= 2  # emptied (the live key may come back)

@pytest.fixture
def mrhscale_warnings(caplog, monkeypatch):
    """The package logger's warnings (a CLI run in this process may have stopped it propagating)."""
    import logging

    from mrhscale.log import logger

    monkeypatch.setattr(logger, "propagate", True)
    caplog.set_level(logging.WARNING, logger="mrhscale")
    return lambda: [r.getMessage() for r in caplog.records
                    if r.name == "mrhscale" and r.levelno == logging.WARNING]


def _closes_then_raises(cls, exc, monkeypatch):
    """``cls.close`` does its work (no process is left behind) and then raises ``exc``, as a
    teardown that timed out killing a worker on a loaded machine did; not when the garbage
    collector closes an object (``__del__``: pytest would report it as unraisable)."""
    import sys

    real = cls.close

    def close(self, *a, **kw):
        real(self, *a, **kw)
        if sys._getframe(1).f_code.co_name != "__del__":
            raise exc

    monkeypatch.setattr(cls, "close", close)


@pytest.fixture
def thread_clusters(monkeypatch):
    """Embedded clusters start their workers as threads (seconds saved: teardown is the subject)."""
    import distributed

    class ThreadCluster(distributed.LocalCluster):
        def __init__(self, *a, **kw):
            super().__init__(*a, **{**kw, "processes": False})

    monkeypatch.setattr(distributed, "LocalCluster", ThreadCluster)
    return ThreadCluster


def test_a_failing_cluster_teardown_keeps_the_stage_result(tmp_path, monkeypatch, thread_clusters,
                                                           mrhscale_warnings):
    """One of four concurrent ``ingest --subjects`` runs on a loaded 2-core machine exited 1
    after its work was done: ``cluster.close()`` timed out killing a worker."""
    from distributed import Client
    from helpers import write_file_cohort

    from mrhscale.parallel.context import Context
    from mrhscale.stages.ingest import ingest
    from mrhscale.stores import list_subjects

    _closes_then_raises(thread_clusters, TimeoutError("timed out killing a worker"), monkeypatch)
    _closes_then_raises(Client, OSError("client close failed"), monkeypatch)
    man = write_file_cohort(tmp_path / "files", n_subjects=1, fmt="nii")
    out = str(tmp_path / "c.zarr")
    res = ingest(man, out, ctx=Context(dask_workers=1, quiet=True))  # its own embedded cluster
    assert res["written"] == ["s01"] and list_subjects(out) == ["s01"]
    msgs = mrhscale_warnings()
    assert any(m.startswith("closing the embedded Dask cluster failed (TimeoutError: timed out")
               for m in msgs), msgs
    assert any(m.startswith("closing the Dask client failed (OSError: client close failed")
               for m in msgs), msgs


@pytest.mark.parametrize("exc", [TimeoutError(), __import__("asyncio").CancelledError("x"),
                                 OSError("comm closed")], ids=["timeout", "cancelled", "oserror"])
def test_the_body_error_wins_over_a_failing_teardown(monkeypatch, exc, mrhscale_warnings):
    """A stage that failed reports its own error, not the teardown's; a finished one its result."""
    from distributed import LocalCluster

    _closes_then_raises(LocalCluster, exc, monkeypatch)
    with pytest.raises(ValueError, match="the stage's own error"):
        with dask_client(workers=1, processes=False, quiet=True):
            raise ValueError("the stage's own error")
    with dask_client(workers=1, processes=False, quiet=True) as client:
        assert client.submit(lambda: 2, pure=False).result() == 2
    msgs = mrhscale_warnings()
    assert len(msgs) == 2 and all(m.startswith("closing the embedded Dask cluster failed") for m in msgs)


def test_a_failing_gpu_cluster_teardown_is_a_warning(monkeypatch, thread_clusters, mrhscale_warnings):
    """The embedded GPU cluster (a LocalCluster with PinGPU where dask-cuda is missing) closes
    the same way; it starts without a GPU when torch is told there is one."""
    import torch

    from mrhscale.parallel.cluster import gpu_client

    _closes_then_raises(thread_clusters, TimeoutError("teardown"), monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # the LocalCluster path, even if installed
    with pytest.raises(ValueError, match="the stage's own error"):
        with gpu_client(1, 40):
            raise ValueError("the stage's own error")
    assert [m for m in mrhscale_warnings() if m.startswith("closing the embedded GPU cluster failed "
                                                           "(TimeoutError: teardown")]
