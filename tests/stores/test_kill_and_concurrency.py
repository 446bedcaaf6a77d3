"""Crashes and concurrent writers, black box: SIGKILL at named points of ingest, patches,
predict and a swap, then a plain rerun, compared with an uninterrupted run; several
ingest processes filling one store at once; a second writer of the same subject refused."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from helpers import make_cohort_store, write_file_cohort

from mrhscale.stores import CohortStore, PatchStore, PredictionStore

VOLATILE = {"ingested", "created", "seconds", "pass_seconds", "provenance", "lineage", "manifest",
            "written", "sources", "mrhscale_version"}


def run(*args, kill_at=None, timeout=300):
    env = {**os.environ, "MRHSCALE_KILL_AT": kill_at or "", "MRHSCALE_LOG_DIR": os.environ.get(
        "MRHSCALE_LOG_DIR", "/tmp/mrhscale-test-logs")}
    return subprocess.run([sys.executable, "-m", "mrhscale", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def here(*args):
    """The same command line in this process (an uninterrupted run or the rerun after a kill:
    only the run that is killed needs a process of its own); its exit code and output."""
    from click.testing import CliRunner

    from mrhscale.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def content(url) -> dict:
    """A store's arrays and its non-volatile attrs, for 'bit-equal' comparisons."""
    out = {}
    root = zarr.open_group(str(url), mode="r")

    def walk(g, prefix):
        for k, a in g.arrays():
            out[f"{prefix}{k}"] = a[...]
        out[f"{prefix}@attrs"] = {k: v for k, v in g.attrs.items() if k not in VOLATILE}
        for k, sub in g.groups():
            if not k.startswith("_"):
                walk(sub, f"{prefix}{k}/")

    walk(root, "")
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    return write_file_cohort(d, n_subjects=2, fmt="nii")


# The default run's writers use an in-process scheduler (the killed one is still a process of
# its own, ~3 s sooner started without a cluster); the slow ones kill a run on its embedded
# cluster, workers and all, and are compared with this same reference.
SYNC = ("--scheduler", "synchronous")


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "c.zarr"
    code, output = here("ingest", files, "--out", out, *SYNC, "--chunks", "4,4,4", "-q")
    assert code == 0, output
    return content(out)


@pytest.mark.parametrize("point", [pytest.param("subject:before-move", marks=pytest.mark.slow),
                                   "subject:before-marker"])
def test_ingest_killed_then_rerun_equals_uninterrupted(files, reference, tmp_path, point):
    out = tmp_path / "c.zarr"
    r = run("ingest", files, "--out", out, *SYNC, "--chunks", "4,4,4", "-q", kill_at=point)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert CohortStore(out).subjects() == []  # nothing half-written looks whole
    code, output = here("ingest", files, "--out", out, *SYNC, "--chunks", "4,4,4", "-q")
    assert code == 0, output
    assert_same(content(out), reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ingest_killed_at_a_random_moment_then_rerun_equals_uninterrupted(files, reference, tmp_path, seed):
    """kill -9 at a random moment (with its workers), then a plain rerun."""
    delay = float(np.random.default_rng(seed).uniform(1.5, 6.0))
    out = tmp_path / "c.zarr"
    p = subprocess.Popen([sys.executable, "-m", "mrhscale", "ingest", str(files), "--out", str(out),
                          "--dask-workers", "1", "--chunks", "4,4,4", "-q"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    r = run("ingest", files, "--out", out, "--dask-workers", "1", "--chunks", "4,4,4", "-q")
    assert r.returncode == 0, r.stderr
    assert_same(content(out), reference)


def test_task_failures_become_one_line_errors_naming_what_failed():
    import errno

    from distributed.scheduler import KilledWorker

    from mrhscale.errors import MRHError
    from mrhscale.parallel.cluster import task_error

    cases = [
        (KilledWorker("key", None, 3), "subject s01: a Dask worker died"),
        (OSError(errno.ENOSPC, "No space left on device", "/data/c.zarr/s01/mri/c/0"),
         "no space left on the device (/data/c.zarr/s01/mri/c/0)"),
        (FileNotFoundError(errno.ENOENT, "No such file", "/data/s01/dwi.nii"),
         "not found on a Dask worker (/data/s01/dwi.nii); every path must be visible from the workers"),
        (PermissionError(errno.EACCES, "denied", "/data/s01/dwi.nii"), "permission denied (/data/s01/dwi.nii)"),
        (MRHError("/data/s01/dwi.nii: unreadable"), "subject s01: /data/s01/dwi.nii: unreadable"),
        (ValueError("boom"), "failed on a Dask worker (ValueError: boom)"),
    ]
    for exc, want in cases:
        err = task_error(exc, "subject s01")
        assert isinstance(err, MRHError) and want in str(err) and "\n" not in str(err), str(err)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    url = tmp_path_factory.mktemp("cohort") / "cohort.zarr"
    make_cohort_store(url)
    return str(url)


@pytest.mark.slow  # 10 s: kill + rerun in the ingest test, an incomplete patch store replaced in test_patches
def test_patches_killed_then_rerun_equals_uninterrupted(cohort, tmp_path):
    args = ("patches", cohort, "--target", "af", "--stride", "2", "--val-fraction", "0.2",
            "--scheduler", "synchronous", "-q")
    ref, out = tmp_path / "ref.zarr", tmp_path / "p.zarr"
    assert run(*args, "--out", ref).returncode == 0
    r = run(*args, "--out", out, kill_at="patches:before-complete")
    assert r.returncode == -signal.SIGKILL
    r = run(*args, "--out", out)
    assert r.returncode == 0, r.stderr
    assert_same(content(out), content(ref))


@pytest.mark.slow  # default-run budget (README: make test <= 6 min on 2 cores); run in .ci/run's slow step
def test_swap_killed_between_renames_is_finished_by_the_next_run(cohort, tmp_path):
    base = ("patches", cohort, "--target", "af", "--scheduler", "synchronous", "-q", "--out", tmp_path / "p.zarr")
    assert here(*base, "--stride", "3")[0] == 0
    r = run(*base, "--stride", "2", "--overwrite", kill_at="swap:between-renames")
    assert r.returncode == -signal.SIGKILL
    assert not (tmp_path / "p.zarr").exists()  # cut between the renames: old moved away, new beside
    code, output = here(*base, "--stride", "2")  # no --overwrite needed: the complete new build is put in place
    assert code == 0, output
    assert PatchStore.open(tmp_path / "p.zarr").attrs["rules"]["stride"] == 2
    assert not [p for p in os.listdir(tmp_path) if "mrhscale-" in p]


@pytest.mark.slow
def test_predict_killed_then_rerun_equals_uninterrupted(cohort, tmp_path):
    from helpers import write_model

    ch = CohortStore(cohort).open_subject("s01").contrast.values.tolist()
    model = write_model(str(tmp_path / "m.pt"), ch)
    ref, out = tmp_path / "ref.zarr", tmp_path / "pred.zarr"
    assert run("predict", model, cohort, "--out", ref, "--dask-workers", "1", "-q").returncode == 0
    r = run("predict", model, cohort, "--out", out, "--dask-workers", "1", "-q", kill_at="subject:before-marker")
    assert r.returncode == -signal.SIGKILL
    assert PredictionStore(out).subjects() == []
    assert run("predict", model, cohort, "--out", out, "--dask-workers", "1", "-q").returncode == 0
    assert_same(content(out), content(ref))


def test_concurrent_ingests_into_one_store_lose_no_subject(tmp_path):
    """A SLURM array, one subject per job, all started at once into one store."""
    man = write_file_cohort(tmp_path / "files", n_subjects=4, fmt="nii")
    out = tmp_path / "c.zarr"
    procs = [subprocess.Popen([sys.executable, "-m", "mrhscale", "ingest", man, "--out", str(out),
                               "--subjects", f"s0{i}", *SYNC, "--chunks", "4,4,4", "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(1, 5)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    store = CohortStore(out)
    assert store.subjects() == ["s01", "s02", "s03", "s04"]
    assert sorted(zarr.open_group(str(out), mode="r").attrs["subjects"]) == store.subjects()
    for sid in store.subjects():
        assert store.open_subject(sid).attrs["subject"] == sid
    assert [d for d in os.listdir(out / "_staging") if d != "zarr.json"] == []


def test_second_writer_of_the_same_subject_is_refused(tmp_path):
    from mrhscale.errors import MRHError

    url = tmp_path / "c.zarr"
    make_cohort_store(url, n_subjects=1)
    store = CohortStore(url)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from mrhscale.stores import CohortStore\n"
        f"w = CohortStore({str(url)!r}).writer(); w.begin('s02'); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MRHError, match="subject s02 .* being written by another mrhscale process"):
            store.writer().begin("s02")
        w = store.writer()
        w.abort("s01", w.begin("s01"))  # other subjects stay free
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.2)
    w = store.writer()  # the dead holder's claim went with it
    w.abort("s02", w.begin("s02"))
