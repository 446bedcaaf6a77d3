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
