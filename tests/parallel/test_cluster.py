"""The embedded cluster: it must not leak worker settings into the calling process."""

from __future__ import annotations

import os
import sys

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


@pytest.fixture
def mrhscale_warnings(caplog):
    """The package logger's warnings (it may not propagate after a CLI run in this process)."""
    import logging

    from mrhscale.log import logger

    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    old = logger.level
    logger.setLevel(logging.WARNING)
    yield lambda: [r.getMessage() for r in caplog.records
                   if r.name == "mrhscale" and r.levelno == logging.WARNING]
    logger.setLevel(old)
    logger.removeHandler(caplog.handler)


def _closes_then_raises(cls, exc, monkeypatch):
    """``cls.close`` does its work (no process is left behind) and then raises ``exc``, as a
    teardown that timed out killing a worker on a loaded machine did."""
    real = cls.close

    def close(self, *a, **kw):
        real(self, *a, **kw)
        raise exc

    monkeypatch.setattr(cls, "close", close)


@pytest.mark.parametrize("exc", [TimeoutError("timed out killing a worker"),
                                 __import__("asyncio").TimeoutError(), OSError("comm closed")])
def test_a_failing_cluster_teardown_keeps_the_stage_result(tmp_path, monkeypatch, exc, mrhscale_warnings):
    """One of four concurrent ``ingest --subjects`` runs on a loaded 2-core machine exited 1
    after its work was done: ``cluster.close()`` timed out killing a worker."""
    from distributed import Client, LocalCluster
    from helpers import write_file_cohort

    from mrhscale.stages.ingest import ingest
    from mrhscale.stores import list_subjects

    _closes_then_raises(LocalCluster, exc, monkeypatch)
    _closes_then_raises(Client, OSError("client close failed"), monkeypatch)
    man = write_file_cohort(tmp_path / "files", n_subjects=1, fmt="nii")
    out = str(tmp_path / "c.zarr")
    res = ingest(man, out, workers=1, quiet=True)  # its own embedded cluster
    assert res["written"] == ["s01"] and list_subjects(out) == ["s01"]
    msgs = mrhscale_warnings()
    assert any(m.startswith("closing the embedded Dask cluster failed") for m in msgs), msgs
    assert any(m.startswith("closing the Dask client failed (OSError") for m in msgs), msgs


def test_the_body_error_wins_over_a_failing_teardown(monkeypatch, mrhscale_warnings):
    """A stage that failed reports its own error, not the teardown's."""
    import torch
    from distributed import LocalCluster

    from mrhscale.parallel.cluster import gpu_client

    _closes_then_raises(LocalCluster, TimeoutError("teardown"), monkeypatch)
    with pytest.raises(ValueError, match="the stage's own error"):
        with dask_client(workers=1, processes=False, quiet=True):
            raise ValueError("the stage's own error")
    assert any("TimeoutError: teardown" in m for m in mrhscale_warnings())
    # the embedded GPU cluster (LocalCluster + PinGPU without dask-cuda) closes the same way
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # the LocalCluster path, even if installed
    with pytest.raises(ValueError, match="the stage's own error"):
        with gpu_client(1, 40):
            raise ValueError("the stage's own error")
    assert any(m.startswith("closing the embedded GPU cluster failed") for m in mrhscale_warnings())
    with gpu_client(1, 40) as client:  # and a finished body stays finished
        assert client.submit(lambda: 2, pure=False).result() == 2
