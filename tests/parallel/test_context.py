"""Context: one object for where data lives and where work runs; Runner treats a local
scheduler and a distributed Client alike."""

import dask
import pytest
from distributed import Client, LocalCluster

from mrhscale.errors import MRHError
from mrhscale.parallel.context import Context, Runner


def _double(x):
    return 2 * x


def test_local_scheduler_runs_in_this_process():
    ctx = Context(scheduler="synchronous", quiet=True)
    assert ctx.local
    with ctx.runner() as r:
        assert r.client is None and r.scheduler_name == "synchronous"
        assert r.compute([dask.delayed(_double)(i) for i in range(3)], "double") == [0, 2, 4]
        assert r.on_workers(_double, 5) == {"local": 10}
        assert r.submit_each(_double, [1, 2], "double") == [2, 4]
        assert r.n_workers() == 1 and r.worker_memory_limits() == []


def test_a_given_client_is_used_as_it_is_and_left_open():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        ctx = Context(client=client, quiet=True)
        assert not ctx.local
        with ctx.runner() as r:
            assert r.client is client
            assert r.compute([dask.delayed(_double)(i) for i in range(3)], "double") == [0, 2, 4]
            assert list(r.on_workers(_double, 5).values()) == [10]
            assert r.submit_each(_double, [1, 2], "double") == [2, 4]
            assert r.n_workers() == 1
        assert client.status == "running"


def test_storage_options_reach_urls_only():
    ctx = Context(storage_options={"endpoint_url": "http://127.0.0.1:9"})
    assert ctx.location("/data/cohort.zarr").options is None
    loc = ctx.location("s3://bucket/cohort.zarr/")
    assert loc.url == "s3://bucket/cohort.zarr"
    assert dict(loc.options) == {"endpoint_url": "http://127.0.0.1:9"}
    assert dict(loc.join("s01").options) == dict(loc.options) and loc.join("s01").url.endswith("zarr/s01")
    assert Context().location("s3://bucket/x").options is None


def test_a_location_shows_no_secret():
    loc = Context(storage_options={"key": "AKIAKEYKEY", "secret": "SECRETSECRET"}).location("s3://u:pw@b/x")
    for text in (repr(loc), str(loc), repr({"job": loc}), loc.masked):
        assert "AKIAKEYKEY" not in text and "SECRETSECRET" not in text and "pw" not in text


def test_but_changes_fields_and_keeps_the_rest():
    ctx = Context(scheduler="threads", dask_workers=2)
    inner = ctx.but(quiet=True)
    assert inner.quiet and inner.scheduler == "threads" and inner.dask_workers == 2 and not ctx.quiet


def test_bad_worker_count_is_a_user_error():
    with pytest.raises(MRHError, match="--dask-workers must be >= 1"):
        Context(dask_workers=0)


def test_runner_failure_is_one_line():
    def boom():
        raise ValueError("bad block")

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client, Context(client=client, quiet=True).runner() as r:
        with pytest.raises(MRHError, match="blocks: failed on a Dask worker"):
            r.compute([dask.delayed(boom)()], "blocks", what="blocks")
    assert isinstance(Runner("threads").compute([], "nothing"), list)


def test_embedded_says_whether_runner_would_start_a_cluster_here():
    assert Context().embedded and Context(dask_workers=2).embedded
    assert not Context(scheduler="threads").embedded and not Context(scheduler="tcp://127.0.0.1:1").embedded
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        assert not Context().embedded  # the active client is used
        assert Context(dask_workers=1).embedded and not Context(client=client).embedded


def _fails_on_odd(x):
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


@pytest.mark.parametrize("where", ["local", "client"])
def test_each_finished_reports_every_task_and_keeps_going_after_a_failure(where):
    tasks = [dask.delayed(_fails_on_odd, pure=False)(i) for i in range(4)]
    if where == "local":
        with Context(scheduler="threads", quiet=True).runner() as r:
            got = sorted(r.each_finished(tasks, "odd", unit="item"), key=lambda t: t[0])
            assert r.context.scheduler == "threads"
    else:
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
                Client(cluster) as client, Context(client=client, quiet=True).runner() as r:
            got = sorted(r.each_finished(tasks, "odd", unit="item"), key=lambda t: t[0])
            assert r.context.client is client
    assert [(i, res) for i, res, err in got] == [(0, 0), (1, None), (2, 2), (3, None)]
    assert [str(err) for _, _, err in got if err is not None] == ["odd 1", "odd 3"]


def test_an_embedded_cluster_is_handed_on_by_the_runners_context():
    ctx = Context(dask_workers=1, quiet=True)
    with ctx.runner() as r:
        inner = r.context
        assert inner.client is r.client and inner.client is not None and ctx.client is None
        with inner.runner() as again:
            assert again.client is r.client  # the same cluster, not a second one
            assert again.compute([dask.delayed(_double)(2)], "double") == [4]


def _total(a, k):
    return float(a.sum()) * k


@pytest.mark.parametrize("where", ["local", "client"])
def test_a_shared_value_reaches_every_task(where):
    import numpy as np

    big = np.ones(100_000)
    if where == "local":
        with Context(scheduler="synchronous", quiet=True).runner() as r:
            shared = r.share(big)
            assert shared is big
            got = r.compute([dask.delayed(_total, pure=False)(shared, k) for k in (1, 2)], "total")
    else:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
                Client(cluster) as client, Context(client=client, quiet=True).runner() as r:
            shared = r.share(big)
            got = [res for _, res, _ in sorted(r.each_finished(
                [dask.delayed(_total, pure=False)(shared, k) for k in (1, 2)], "total"), key=lambda t: t[0])]
    assert got == [1e5, 2e5]


def _pid(_=None):
    import os

    return os.getpid()


@pytest.mark.parametrize(("workers", "in_process"), [(None, True), (2, False)])
def test_a_gil_free_stage_runs_its_embedded_cluster_in_threads_here(workers, in_process):
    """predict's tasks release the GIL: without --dask-workers its embedded cluster is one
    worker of a thread per core in this process; asking for worker processes still gets them."""
    import os

    with Context(quiet=True, dask_workers=workers).runner(threads=True) as r:
        pids = set(r.on_workers(_pid).values())
        assert (pids == {os.getpid()}) is in_process
        assert r.n_workers() == (1 if in_process else 2)
        assert r.n_threads() == ((os.cpu_count() or 1) if in_process else 2)
        assert r.compute([dask.delayed(_pid)(i) for i in range(2)], "pid") == [os.getpid()] * 2 or not in_process


def test_whole_plane_blocks_fit_the_workers_memory():
    """predict's whole-plane blocks (a task holds two) shrink to a quarter of a worker's
    memory per task thread; without a limit, or in-process, they keep their bound."""
    from mrhscale.stages.predict_plan import PLANE_BYTES, plane_budget

    assert plane_budget(None) == plane_budget(Runner("synchronous")) == PLANE_BYTES
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, memory_limit="1GiB",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        assert plane_budget(Runner(client)) == (1 << 30) // 2 // 4
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, memory_limit=0,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        assert plane_budget(Runner(client)) == PLANE_BYTES


@pytest.mark.parametrize("where", ["local", "client"])
def test_each_finished_takes_tasks_a_window_at_a_time(where):
    """A lazily built stream of tasks: never more than ``window`` built and unfinished at once,
    and every one reported under the index it was taken at."""
    taken, done = [], []

    def tasks():
        for i in range(7):
            taken.append(i)
            assert len(taken) - len(done) <= 2
            yield dask.delayed(_double, pure=False)(i)

    def collect(r):
        for i, res, err in r.each_finished(tasks(), "double", window=2, total=7):
            done.append(i)
            yield i, res, err

    if where == "local":
        with Context(scheduler="synchronous", quiet=True).runner() as r:
            got = sorted(collect(r))
    else:
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
                Client(cluster) as client, Context(client=client, quiet=True).runner() as r:
            got = sorted(collect(r))
            assert r.n_threads() == 2
    assert got == [(i, 2 * i, None) for i in range(7)]
