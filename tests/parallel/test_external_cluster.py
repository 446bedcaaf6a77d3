"""A real external cluster: `dask scheduler` and two `dask worker` processes started in
another working directory, the CLI run with relative paths as a user types them; every
output must land where the user meant it and equal the embedded cluster's."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import write_file_cohort

from mrhscale.stores import CohortStore, PatchStore, PredictionStore

DASK = os.path.join(os.path.dirname(sys.executable), "dask")


@pytest.fixture
def cluster(tmp_path):
    elsewhere = tmp_path / "cluster-cwd"
    elsewhere.mkdir()
    sched_file = elsewhere / "scheduler.json"
    env = {**os.environ, "MRHSCALE_LOG_DIR": str(tmp_path / "logs")}
    procs = [subprocess.Popen([DASK, "scheduler", "--port", "0", "--no-dashboard", "--scheduler-file",
                               str(sched_file)], cwd=elsewhere, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        for _ in range(2):
            procs.append(subprocess.Popen([DASK, "worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                                           "--no-dashboard", "--memory-limit", "2GiB"], cwd=elsewhere, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        import json

        addr = json.loads(sched_file.read_text())["address"]
        from distributed import Client

        with Client(addr, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)
        yield addr, elsewhere
    finally:
        for p in reversed(procs):
            p.kill()  # nothing to save: the test's outputs are already checked
        for p in procs:
            p.wait()


def cli(cwd, *args):
    r = subprocess.run([sys.executable, "-m", "mrhscale", *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.slow  # 35 s, 9 processes: joining a running cluster (--scheduler) is in test_predict and test_ingest
def test_relative_paths_on_an_external_cluster_equal_the_embedded_run(cluster, tmp_path):
    from helpers import write_model

    addr, elsewhere = cluster
    user = tmp_path / "user"
    user.mkdir()
    write_file_cohort(user / "files", n_subjects=2, fmt="nii", shape=(14, 10, 16))
    ext = ["--scheduler", addr]
    cli(user, "ingest", "files/cohort.yaml", "--out", "ext.zarr", "--chunks", "8,8,8", "-q", *ext)
    cli(user, "ingest", "files/cohort.yaml", "--out", "emb.zarr", "--chunks", "8,8,8", "-q", "--dask-workers", "1")
    opts = ["--target", "af", "--stride", "2", "--min-label-sum", "0", "--min-label-nonzero", "0", "-q"]
    cli(user, "patches", "ext.zarr", "--out", "pext.zarr", *opts, *ext)
    cli(user, "patches", "emb.zarr", "--out", "pemb.zarr", *opts, "--dask-workers", "1")
    ch = CohortStore(user / "emb.zarr").open_subject("s01").contrast.values.tolist()
    write_model(str(user / "m.pt"), ch)
    cli(user, "predict", "m.pt", "ext.zarr", "--out", "pred_ext.zarr", "--nifti", "nii", "-q", *ext)
    cli(user, "predict", "m.pt", "emb.zarr", "--out", "pred_emb.zarr", "-q", "--dask-workers", "1")

    assert not [p for p in os.listdir(elsewhere) if p.endswith(".zarr") or p == "nii"]  # nothing there
    a, b = CohortStore(user / "ext.zarr"), CohortStore(user / "emb.zarr")
    assert a.subjects() == b.subjects() == ["s01", "s02"]
    for sid in a.subjects():
        np.testing.assert_array_equal(a.open_subject(sid)["mri"].values, b.open_subject(sid)["mri"].values)
    pa, pb = PatchStore.open(user / "pext.zarr"), PatchStore.open(user / "pemb.zarr")
    assert pa.attrs["n_train"] == pb.attrs["n_train"] > 0
    np.testing.assert_array_equal(pa.split("train")[0][...], pb.split("train")[0][...])
    qa, qb = PredictionStore(user / "pred_ext.zarr"), PredictionStore(user / "pred_emb.zarr")
    for sid in a.subjects():
        np.testing.assert_array_equal(qa.open_subject(sid)["af_virtual"].values,
                                      qb.open_subject(sid)["af_virtual"].values)
    assert sorted(os.listdir(user / "nii")) == ["s01_af_virtual.nii.gz", "s02_af_virtual.nii.gz"]
