"""parallel.runner: which client a stage runs on, and the one task loop (results, failures)."""

import dask
import pytest

from mrhscale.errors import MRHError
from mrhscale.parallel.context import Context
from mrhscale.parallel.runner import active_client, run_tasks


def _boom(x):
    raise ValueError(f"boom {x}")


def test_client_convention_and_the_task_loop():
    from distributed import Client, LocalCluster

    tasks = [dask.delayed(lambda v: v * 2)(i) for i in range(5)]
    with Context(scheduler="synchronous").runner() as r:  # a local scheduler name passes through
        assert r.env == "synchronous" and run_tasks(r.env, tasks, "double") == [0, 2, 4, 6, 8]
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cl, Client(cl) as client:
        with Context().runner() as r:  # no client given: the active one (a notebook's) is reused
            assert r.client is client is active_client()
        with Context(client=client).runner() as r:
            env = r.env
            assert run_tasks(env, tasks, "double") == [0, 2, 4, 6, 8]
            bad = [dask.delayed(_boom)(1), dask.delayed(lambda: 1)()]
            with pytest.raises(MRHError, match=r"^patches \(extract\): failed on a Dask worker \(ValueError: boom 1\)"):
                run_tasks(env, bad, "extract", what="patches (extract)")
