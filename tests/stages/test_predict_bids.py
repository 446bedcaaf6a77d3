"""predict --bids-derivatives: the derivatives layout file by file, labels, sidecars, ownership,
and the default folder of a cohort ingested from a BIDS dataset."""

from __future__ import annotations

import hashlib
import json
import os

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from helpers import subject_dataset, tree, write_ensemble, write_model

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.io import bids
from mrhscale.io.manifest_scan import write_manifest
from mrhscale.io.volumes import write_volume
from mrhscale.parallel.context import Context
from mrhscale.stages.ingest import ingest
from mrhscale.stages.predict import predict

SYNC = Context(scheduler="synchronous", quiet=True)
IDS = ["s01", "s_01", "sub-07_ses-b"]  # a plain label, one that is not (and collides), a BIDS id
HASHED = "s01x" + hashlib.sha1(b"s_01").hexdigest()[:8]


def files(root) -> list[str]:
    return sorted(p.replace(os.sep, "/") for p in tree(root))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three tiny subjects (ids above) and an ensemble of three random nets over their channels."""
    from mrhscale.stores import CohortStore

    d = tmp_path_factory.mktemp("bids")
    store = CohortStore(str(d / "c.zarr"))
    store.prepare({})
    for i, sid in enumerate(IDS):
        store.put(sid, subject_dataset(sid, (7, 6, 5), 3, seed=i, chunks=(4, 3, 5)), {"stage": "tests", "i": i})
    model, _ = write_ensemble(str(d / "ens.pt"), ["c00", "c01", "c02"], members=3)
    return d, store.url, model


def test_labels_are_bids_labels_deterministically():
    labels = bids.subject_labels(IDS)
    assert labels == {"s01": ("s01", None), "s_01": (HASHED, None), "sub-07_ses-b": ("07", "b")}
    assert bids.subject_labels(IDS) == labels  # the same ids, the same labels
    assert bids.subject_labels(["s_01", "s02"], {"s_01": ("s01", None)})["s_01"] == ("s01", None)  # recorded kept
    assert bids.subject_labels(["s-9", "s.9"]) == {"s-9": ("s9", None),
                                                  "s.9": ("s9x" + hashlib.sha1(b"s.9").hexdigest()[:8], None)}
    assert bids.map_path(("07", "b"), "mbp_x", "uncertainty") == \
        "sub-07/ses-b/anat/sub-07_ses-b_desc-mbpx_uncertainty.nii.gz"
    with pytest.raises(MRHError, match="no letter or digit"):
        bids.stain_label("_-")


def test_ensemble_maps_and_sidecars_file_by_file(cohort, tmp_path):
    d, store, model = cohort
    der = tmp_path / "deriv" / "mrhscale"  # its parent made too, as a dataset's derivatives/ may be
    res = predict(model, store, str(tmp_path / "p.zarr"), bids_derivatives=str(der), ctx=SYNC)
    maps = [f"{folder}/anat/{pre}_desc-af_{kind}.{ext}"
            for folder, pre in ((f"sub-{HASHED}", f"sub-{HASHED}"), ("sub-07/ses-b", "sub-07_ses-b"),
                                ("sub-s01", "sub-s01"))
            for kind in ("uncertainty", "virtual") for ext in ("json", "nii.gz")]
    assert files(der) == sorted(["dataset_description.json", "participants.json", "participants.tsv", *maps])
    assert sorted(res.bids) == sorted(str(der / m) for m in maps) and res.bids_dir == str(der)
    assert bids.layout_problems(str(der)) == []
    desc = json.loads((der / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "mrhscale"
    assert desc["GeneratedBy"][0]["Version"] and desc["BIDSVersion"].startswith("1.")
    assert (der / "participants.tsv").read_text().splitlines() == [
        "participant_id\tmrhscale_subject", "sub-07\tsub-07_ses-b", "sub-s01\ts01", f"sub-{HASHED}\ts_01"]
    side = json.loads((der / f"sub-{HASHED}/anat/sub-{HASHED}_desc-af_uncertainty.json").read_text())
    own = side["mrhscale"]
    assert side["Stain"] == "af" and side["Units"] == "raw stain units"
    assert own["subject"] == "s_01" and own["variable"] == "af_uncertainty" and own["model"]["members"] == 3
    assert own["prediction_store"] == res.out and own["cohort_store"] == store
    assert own["map"]["calibration_factor"] == 1.5 and own["model"]["sha256"].startswith("sha256:")
    for sid, m in (("s_01", maps[2]), ("sub-07_ses-b", maps[7])):
        want = xr.open_zarr(res.out, group=sid, consolidated=False)["af_virtual"].values
        np.testing.assert_array_equal(np.asanyarray(nib.load(der / m.replace(".json", ".nii.gz")).dataobj), want)
    before = tree(der)
    again = predict(model, store, str(tmp_path / "p.zarr"), bids_derivatives=str(der), ctx=SYNC)
    assert again.bids == [] and tree(der) == before  # nothing rewritten: the same bytes
    (der / maps[0]).unlink()  # a sidecar gone: its map written again with it
    again = predict(model, store, str(tmp_path / "p.zarr"), bids_derivatives=str(der), ctx=SYNC)
    assert again.bids == [str(der / maps[1]), str(der / maps[0])] and tree(der) == before


def test_a_folder_not_ours_is_refused_an_empty_one_taken(cohort, tmp_path):
    d, store, _ = cohort
    model = write_model(tmp_path / "one.pt", ["c00", "c01", "c02"], target="mbp")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(MRHError, match="not made by mrhscale"):
        predict(model, store, str(tmp_path / "p.zarr"), bids_derivatives=str(mine), ctx=SYNC)
    assert tree(mine) == {"notes.txt": b"mine"} and not os.path.exists(tmp_path / "p.zarr")
    empty = tmp_path / "empty"
    empty.mkdir()
    res = predict(model, store, str(tmp_path / "p.zarr"), subjects=["s01"], bids_derivatives=str(empty), ctx=SYNC)
    assert files(empty) == ["dataset_description.json", "participants.json", "participants.tsv",
                            "sub-s01/anat/sub-s01_desc-mbp_virtual.json",
                            "sub-s01/anat/sub-s01_desc-mbp_virtual.nii.gz"]
    # a later run adds subjects and keeps the mapping; a file there not written by mrhscale is refused
    foreign = empty / "sub-07/ses-b/anat/sub-07_ses-b_desc-mbp_virtual.nii.gz"
    write_volume(str(foreign), np.zeros((7, 6, 5), np.float32), np.eye(4))
    with pytest.raises(MRHError, match="not written by mrhscale"):
        predict(model, store, res.out, bids_derivatives=str(empty), ctx=SYNC)
    foreign.unlink()
    predict(model, store, res.out, bids_derivatives=str(empty), ctx=SYNC)
    assert bids.layout_problems(str(empty)) == []
    assert len((empty / "participants.tsv").read_text().splitlines()) == 4
    assert bids.read_participants(str(empty / "participants.tsv"))["sub-07_ses-b"] == ("07", "b")


def test_layout_rules_catch_bad_names_and_sidecars(tmp_path):
    (tmp_path / "sub-01/anat").mkdir(parents=True)
    (tmp_path / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.9.0"}))
    (tmp_path / "sub-01/anat/sub-01_desc-af_virtual.nii.gz").write_bytes(b"")
    (tmp_path / "sub-01/anat/sub-02_desc-af_virtual.json").write_text("{}")
    (tmp_path / "sub-01/anat/sub-01_desc-a_f_virtual.nii.gz").write_bytes(b"")
    (tmp_path / "stray.txt").write_text("")
    problems = "\n".join(bids.layout_problems(str(tmp_path)))
    for what in ("DatasetType missing", "GeneratedBy names no mrhscale", "stray.txt: not a file",
                 "sub-01_desc-af_virtual.nii.gz: no JSON sidecar", "sub-02_desc-af_virtual.json: belongs in sub-02/anat",
                 "sub-01_desc-a_f_virtual.nii.gz: not a map's name"):
        assert what in problems


# ---------------------------------------------------------------- a cohort from a BIDS dataset


def _bids_dataset(root):
    """Raw T2w of sub-01 and sub-02, brain masks in derivatives/manual."""
    (root / "derivatives" / "manual").mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    (root / "derivatives" / "manual" / "dataset_description.json").write_text(json.dumps(
        {"Name": "manual", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "manual"}]}))
    mask = np.zeros((6, 5, 4), np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1
    for k, sub in enumerate(("01", "02")):
        t2 = np.random.default_rng(k).random((6, 5, 4), dtype=np.float32) * 100
        write_volume(str(root / f"sub-{sub}/anat/sub-{sub}_T2w.nii.gz"), t2, np.diag([0.1, 0.1, 0.1, 1]))
        write_volume(str(root / f"derivatives/manual/sub-{sub}/anat/sub-{sub}_desc-brain_mask.nii.gz"), mask,
                     np.diag([0.1, 0.1, 0.1, 1]))
    return root


def test_bids_cohort_gets_its_derivatives_by_default(tmp_path):
    ds = _bids_dataset(tmp_path / "ds")
    write_manifest(ds, tmp_path / "cohort.yaml", bids=True)
    store = str(tmp_path / "c.zarr")
    ingest(str(tmp_path / "cohort.yaml"), store, ctx=SYNC, checksums=False)
    model = write_model(tmp_path / "m.pt", ["T2w"], target="mbp")
    before = tree(ds)
    r = CliRunner().invoke(main, ["predict", model, store, "--out", str(tmp_path / "p.zarr"),
                                  "--no-bids-derivatives", "--scheduler", "synchronous", "-q"])
    assert r.exit_code == 0, r.output
    assert tree(ds) == before  # asked for none: the dataset untouched
    res = predict(model, store, str(tmp_path / "p.zarr"), ctx=SYNC)
    der = ds / "derivatives" / "mrhscale"
    assert res.bids_dir == str(der)
    assert files(der) == ["dataset_description.json", "participants.json", "participants.tsv",
                          *[f"sub-{s}/anat/sub-{s}_desc-mbp_virtual.{e}" for s in ("01", "02") for e in ("json", "nii.gz")]]
    assert bids.layout_problems(str(der)) == []
    desc = json.loads((der / "dataset_description.json").read_text())
    assert desc["DatasetLinks"] == {"raw": "../.."} and desc["SourceDatasets"] == [{"URL": "../.."}]
    side = json.loads((der / "sub-02/anat/sub-02_desc-mbp_virtual.json").read_text())
    assert side["Sources"] == ["bids:raw:sub-02/anat/sub-02_T2w.nii.gz",
                               "bids:raw:derivatives/manual/sub-02/anat/sub-02_desc-brain_mask.nii.gz"]
    assert all((ds / s.split(":", 2)[2]).exists() for s in side["Sources"])
    again = write_manifest(ds, tmp_path / "cohort.yaml", bids=True, overwrite=True)  # our maps are not inputs
    assert again.subjects == ["sub-01", "sub-02"] and again.targets == [] and again.groups == ["T2w"]


def test_cli_errors_are_one_line(cohort, tmp_path):
    d, store, model = cohort
    runner = CliRunner()
    r = runner.invoke(main, ["predict", model, store, "--out", str(tmp_path / "p.zarr"), "--bids-derivatives",
                             str(tmp_path / "x"), "--no-bids-derivatives", "-q"])
    assert r.exit_code == 2 and "give one of them" in r.output and "Traceback" not in r.output
    (tmp_path / "f").write_text("")
    r = runner.invoke(main, ["predict", model, store, "--out", str(tmp_path / "p.zarr"), "--bids-derivatives",
                             str(tmp_path / "f"), "--scheduler", "synchronous", "-q"])
    assert r.exit_code == 2 and "is a file, not a folder" in r.output and len(r.output.strip().splitlines()) == 1


def test_which_cohorts_get_derivatives_by_default(tmp_path, caplog):
    """Recorded by ingest, or read from the manifest of a store ingested before it recorded it."""
    from types import SimpleNamespace

    from mrhscale.stages.predict_bids import bids_roots, bids_sink

    man = tmp_path / "cohort.yaml"
    man.write_text(f"generated_by: {{bids: true, source: {tmp_path / 'ds'}}}\nsubjects: []\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text("subjects: []\n")
    subjects = {"a": {"bids_root": "/data/ds"}, "b": {"manifest": str(man)}, "c": {"manifest": str(plain)},
                "d": {"manifest": str(tmp_path / "gone.yaml")}, "e": {},
                "f": {"bids_root": None, "manifest": str(man)}}  # recorded: the manifest is not read
    datasets = {sid: SimpleNamespace(attrs=a) for sid, a in subjects.items()}
    assert bids_roots(datasets) == {"a": "/data/ds", "b": str(tmp_path / "ds"), "c": None, "d": None, "e": None,
                                    "f": None}
    assert bids_sink(None, list(datasets), {"e": datasets["e"]}) is None  # not BIDS: nothing, quietly
    assert bids_sink(None, list(datasets), datasets) is None and "no BIDS derivatives" in caplog.text
    with pytest.raises(MRHError, match="not all ingested from one BIDS dataset"):
        bids_sink(True, list(datasets), datasets)
    sink = bids_sink(None, ["b"], {"b": datasets["b"]})
    assert sink.path == str(tmp_path / "ds" / "derivatives" / "mrhscale") and not os.path.exists(sink.path)
