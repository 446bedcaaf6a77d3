"""The thirteen ways a user lost data or got a stale answer with exit 0 (issue: the store layer),
each typed as a user would, each now exit 2 with one line and the data as it was, or the
right thing done."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner
from helpers import make_cohort_store, make_patch_store, tree, write_file_cohort

from mrhscale.cli import main
from mrhscale.stores import CohortStore, PatchStore, PredictionStore


def cli(*args):
    """The command line in this process; stages here run on ``--scheduler synchronous`` (the
    cluster's own failure paths: test_11 and tests/parallel)."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def one_line_error(code, out, *words):
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert code == 2, out
    assert len(lines) == 1 and lines[0].startswith("mrhscale: error:"), out
    assert "Traceback" not in out
    for w in words:
        assert w in lines[0], (w, out)


def arrays(url, group=None) -> dict:
    root = zarr.open_group(str(url), mode="r", path=group) if group else zarr.open_group(str(url), mode="r")
    return {k: a[...] for k, a in root.arrays()}


@pytest.fixture
def cohort(tmp_path):
    url = tmp_path / "cohort.zarr"
    make_cohort_store(url, target_names=("af", "mbp"))
    return str(url)


def test_1_patches_never_deletes_a_foreign_out(cohort, tmp_path):
    mine = tmp_path / "my_results"
    mine.mkdir()
    (mine / "notes.txt").write_text("three months of work")
    before = tree(mine)
    code, out = cli("patches", cohort, "--target", "mbp", "--out", mine, "--scheduler", "synchronous", "-q")
    one_line_error(code, out, "my_results", "not made by mrhscale", "never replaces")
    assert tree(mine) == before
    other = tmp_path / "other.zarr"
    make_cohort_store(other, n_subjects=1)
    before = tree(other)
    code, out = cli("patches", cohort, "--target", "mbp", "--out", other, "--scheduler", "synchronous", "-q")
    one_line_error(code, out, "is a cohort store, not a patch store")
    assert tree(other) == before


def test_2_failed_overwrite_keeps_the_old_patch_store(cohort, tmp_path):
    out = tmp_path / "p.zarr"
    code, msg = cli("patches", cohort, "--target", "af", "--out", out, "--stride", "2",
                    "--scheduler", "synchronous", "-q")
    assert code == 0, msg
    before = tree(out)
    code, msg = cli("patches", cohort, "--target", "af", "--out", out, "--stride", "2", "--overwrite",
                    "--min-label-sum", "1e12", "--scheduler", "synchronous", "-q")
    one_line_error(code, msg, "zero samples")
    assert tree(out) == before
    assert not [p for p in os.listdir(tmp_path) if "mrhscale-" in p]  # no half build left beside it


def test_3_failed_reingest_keeps_the_old_subject(tmp_path):
    man = write_file_cohort(tmp_path / "files", n_subjects=2, fmt="nii")
    out = tmp_path / "c.zarr"
    code, msg = cli("ingest", man, "--out", out, "--scheduler", "synchronous", "--chunks", "4,4,4", "-q")
    assert code == 0, msg
    before = arrays(out, "s01")
    f = tmp_path / "files" / "s01" / "dwi.nii"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    code, msg = cli("ingest", man, "--out", out, "--overwrite", "--subjects", "s01", "--scheduler", "synchronous",
                    "--chunks", "4,4,4", "-q")
    one_line_error(code, msg, "s01", "dwi.nii")
    assert CohortStore(out).subjects() == ["s01", "s02"]
    after = arrays(out, "s01")
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_5_predict_never_reuses_another_cohorts_subject(tmp_path):
    from helpers import write_model

    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    make_cohort_store(a, n_subjects=1, seed=0)
    make_cohort_store(b, n_subjects=1, seed=7)
    ch = CohortStore(a).open_subject("s01").contrast.values.tolist()
    model = write_model(str(tmp_path / "m.pt"), ch)
    pred = tmp_path / "pred.zarr"
    code, msg = cli("predict", model, a, "--out", pred, "--scheduler", "synchronous", "-q")
    assert code == 0, msg
    code, msg = cli("predict", model, b, "--out", pred, "--scheduler", "synchronous", "-q")
    one_line_error(code, msg, "s01", "another input", "--overwrite")
    code, msg = cli("predict", model, b, "--out", pred, "--scheduler", "synchronous", "--overwrite", "-q")
    assert code == 0, msg
    lineage = PredictionStore(pred).subject_attrs("s01")["lineage"]["source"]
    assert lineage["store"] == str(b)


def test_6_evaluate_refuses_another_stain(tmp_path):
    from helpers import write_pair

    store, pred, _ = write_pair(tmp_path, n=1)
    code, msg = cli("evaluate", pred, store, "--stain", "mbp", "--out", tmp_path / "r", "-q")
    one_line_error(code, msg, "virtual af", "--stain af")
    assert not (tmp_path / "r").exists()


def test_7_resume_on_another_patch_store_refused(tmp_path):
    af = make_patch_store(tmp_path / "af.zarr", n_train=256, n_val=64, target="af")
    mbp = make_patch_store(tmp_path / "mbp.zarr", n_train=256, n_val=64, target="mbp", seed=1)
    run = tmp_path / "run"
    code, msg = cli("train", af, "--out", run, "--epochs", "1", "--depth", "1", "--batch-size", "64", "-q")
    assert code == 0, msg
    before = tree(run)
    code, msg = cli("train", mbp, "--out", run, "--resume", "--epochs", "2", "-q")
    one_line_error(code, msg, "another patch store", "'af'", "'mbp'")
    assert tree(run) == before


def test_8_misspelt_config_block_is_an_error(tmp_path):
    af = make_patch_store(tmp_path / "af.zarr", n_train=128, n_val=32)
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump({"patches": {"stride": 4}, "trian": {"depth": 3}}))
    code, msg = cli("train", af, "--out", tmp_path / "run", "--config", cfg, "-q")
    one_line_error(code, msg, "'trian'", "did you mean 'train'")
    cfg.write_text(yaml.safe_dump({"train": {"dpeth": 3}}))
    code, msg = cli("train", af, "--out", tmp_path / "run", "--config", cfg, "-q")
    one_line_error(code, msg, "dpeth", "did you mean 'depth'")
    cfg.write_text(yaml.safe_dump({"train": {"depth": 1}, "patches": {"strid": 3}}))
    code, msg = cli("train", af, "--out", tmp_path / "run", "--config", cfg, "-q")
    one_line_error(code, msg, "strid", "`patches`")
    assert not (tmp_path / "run").exists()


SECRETS = ("AKIAKEYKEY", "sEcReTsEcReT")
FORMS = [
    "key: AKIAKEYKEY\nsecret: sEcReTsEcReT",                                  # YAML block
    '{"key": "AKIAKEYKEY", "secret": "sEcReTsEcReT"}',                         # JSON
    "{key: AKIAKEYKEY, secret: sEcReTsEcReT}",                                 # YAML flow
    "client_kwargs:\n  headers: {Authorization: Bearer sEcReTsEcReT}\nkey: AKIAKEYKEY",
    "connection_string: DefaultEndpointsProtocol=https;AccountKey=sEcReTsEcReT;x=AKIAKEYKEY",
    "endpoint_url: http://AKIAKEYKEY:sEcReTsEcReT@host:9000",
    {"key": "AKIAKEYKEY", "config_kwargs": {"s3": {"token": "sEcReTsEcReT"}}},  # from --config
]


def test_9_storage_options_never_reach_a_file(tmp_path):
    man = write_file_cohort(tmp_path / "files", n_subjects=1, fmt="nii")
    out = tmp_path / "c.zarr"
    code, msg = cli("ingest", man, "--out", out, "--scheduler", "synchronous", "--storage-options", FORMS[0], "-q")
    assert code == 0, msg
    saved = (out / "_config" / "zarr.json").read_text()  # the store keeps it in the group's attrs
    assert "***" in saved and not any(s in saved or s in msg for s in SECRETS)


@pytest.mark.parametrize("form", FORMS)
def test_9_every_form_of_storage_options_is_masked(tmp_path, form):
    from mrhscale.io.config import write_resolved

    (tmp_path / "out").mkdir()
    path = write_resolved(str(tmp_path / "out"), "ingest", {"storage_options": form, "out": "x"})
    saved = open(path).read()
    assert not any(s in saved for s in SECRETS), saved
    if "endpoint_url" in str(form):
        assert "host:9000" in saved  # what is not secret stays readable


def test_9_storage_options_hidden_in_task_reprs():
    from mrhscale.stores import StorageOptions

    so = StorageOptions({"key": "AKIAKEYKEY", "endpoint_url": "http://h:9000",
                         "client_kwargs": {"headers": {"x-token": "sEcReTsEcReT"}}})
    for text in (repr(so), str({"job": so}), repr([so])):
        assert "AKIAKEYKEY" not in text and "sEcReTsEcReT" not in text and "http://h:9000" in text
    import pickle

    assert pickle.loads(pickle.dumps(so)) == so  # workers get the real values


def test_10_repeated_subjects_are_deduplicated(tmp_path):
    man = write_file_cohort(tmp_path / "files", n_subjects=2, fmt="nii")
    out = tmp_path / "c.zarr"
    code, msg = cli("ingest", man, "--out", out, "--subjects", "s01,s01", "--subjects", "s01",
                    "--scheduler", "synchronous", "-q")
    assert code == 0 and "ingested 1 subject" in msg, msg
    assert CohortStore(out).subjects() == ["s01"]


def test_11_truncated_nifti_one_line_naming_the_file_no_worker_traceback(tmp_path):
    man = write_file_cohort(tmp_path / "files", n_subjects=1, fmt="nii")
    f = tmp_path / "files" / "s01" / "t2MTONOFF.nii"
    f.write_bytes(f.read_bytes()[:-200])
    r = subprocess.run([sys.executable, "-m", "mrhscale", "ingest", man, "--out", str(tmp_path / "c.zarr"),
                        "--dask-workers", "1"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MRHSCALE_LOG_DIR": str(tmp_path / "logs")})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "Compute Failed" not in r.stderr, r.stderr
    err = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and "subject s01" in err[0] and "t2MTONOFF.nii" in err[0], r.stderr
    assert "Compute Failed" in "".join(open(tmp_path / "logs" / p).read()
                                       for p in os.listdir(tmp_path / "logs"))  # kept in the log


def test_13_ingest_reuses_a_subject_only_while_its_files_are_the_same(tmp_path):
    man = write_file_cohort(tmp_path / "files", n_subjects=1, fmt="nii")
    out = tmp_path / "c.zarr"
    assert cli("ingest", man, "--out", out, "--scheduler", "synchronous", "-q")[0] == 0
    os.utime(tmp_path / "files" / "s01" / "af.nii")  # touched, same bytes: still reused
    code, msg = cli("ingest", man, "--out", out, "--scheduler", "synchronous", "-q")
    assert code == 0 and "skipped: s01" in msg, msg
    img = nib.load(str(tmp_path / "files" / "s01" / "af.nii"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1, img.affine), str(tmp_path / "files" / "s01" / "af.nii"))
    code, msg = cli("ingest", man, "--out", out, "--scheduler", "synchronous", "-q")
    one_line_error(code, msg, "s01", "af.nii", "--overwrite")
    assert cli("ingest", man, "--out", out, "--scheduler", "synchronous", "--overwrite", "-q")[0] == 0
    got = CohortStore(out).open_subject("s01")["af"].values
    np.testing.assert_array_equal(got, np.asarray(nib.load(str(tmp_path / "files" / "s01" / "af.nii")).dataobj))


def test_13_importance_refuses_another_stains_patches(tmp_path):
    from helpers import known_model, tiny_store

    model = known_model(str(tmp_path / "m.pt"))
    store = tiny_store(tmp_path / "p.zarr")
    zarr.open_group(store, mode="a").attrs.update(target="mbp", stains=["mbp"])
    code, msg = cli("importance", model, store, "--out", tmp_path / "imp", "-q")
    one_line_error(code, msg, "patches of mbp", "predicts af")


def test_13_register_refuses_the_manifests_own_folder(tmp_path):
    from mrhscale.synth.phantom import make_cohort

    man = make_cohort(str(tmp_path / "cohort"), n_subjects=2, shape=(12, 10, 14), quiet=True)
    before = tree(tmp_path / "cohort")
    code, msg = cli("register", man, "--reference", "s01", "--out", tmp_path / "cohort", "--scheduler", "synchronous", "-q")
    assert code == 2 and "Traceback" not in msg, msg
    assert tree(tmp_path / "cohort") == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "cohort.yaml").write_text("my own notes")
    code, msg = cli("synth", mine, "--n-subjects", "1", "--overwrite", "-q")
    one_line_error(code, msg, "not made by mrhscale")
    assert (mine / "cohort.yaml").read_text() == "my own notes"


def test_13_inf_is_treated_like_nan_and_shown_by_info(tmp_path):
    man = write_file_cohort(tmp_path / "files", n_subjects=1, fmt="nii")
    p = tmp_path / "files" / "s01" / "fa.nii"
    img = nib.load(str(p))
    fa = np.asarray(img.dataobj).astype(np.float32)
    fa[0, 0, 0], fa[1, 0, 0], fa[2, 0, 0] = np.inf, -np.inf, np.nan
    nib.save(nib.Nifti1Image(fa, img.affine), str(p))
    out = tmp_path / "c.zarr"
    assert cli("ingest", man, "--out", out, "--scheduler", "synchronous", "-q")[0] == 0
    ds = CohortStore(out).open_subject("s01")
    assert ds.attrs["nonfinite_counts"]["fa"] == 3 and np.isfinite(ds["fa"].values).all()
    code, msg = cli("info", out)
    assert code == 0 and "non-finite values zeroed: 3 (fa 3)" in msg, msg


def test_13_diverging_training_stops_with_exit_2_and_no_model(tmp_path):
    af = make_patch_store(tmp_path / "af.zarr", n_train=512, n_val=64)
    run = tmp_path / "run"
    code, msg = cli("train", af, "--out", run, "--epochs", "2", "--depth", "1", "--lr", "1e12",
                    "--clip", "0", "--batch-size", "64", "-q")
    one_line_error(code, msg, "diverged", "non-finite")
    assert not (run / "model.pt").exists()


def test_13_two_trainings_on_one_out_second_refused(tmp_path):
    af = make_patch_store(tmp_path / "af.zarr", n_train=256, n_val=64)
    run = tmp_path / "run"
    env = {**os.environ, "MRHSCALE_DEBUG_STEP_DELAY": "0.5"}
    first = subprocess.Popen([sys.executable, "-m", "mrhscale", "train", af, "--out", str(run), "--epochs", "3",
                              "--depth", "1", "--batch-size", "64", "-q"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import time

        deadline = time.time() + 60
        while not (run / "config.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        code, msg = cli("train", af, "--out", run, "--epochs", "1", "--depth", "1", "-q")
        one_line_error(code, msg, "being written by another mrhscale process")
    finally:
        first.kill()
        first.wait()
    info = json.loads((run / "mrhscale.json").read_text())
    assert info["format"] == "mrhscale-run"
    assert PatchStore.open(af).attrs["target"] == "af"
