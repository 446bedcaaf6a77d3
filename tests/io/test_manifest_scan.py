"""`mrhscale manifest`: a cohort manifest from a folder per subject or a BIDS dataset."""

import json
import logging
import os
import sys

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.io.manifest import load_manifest
from mrhscale.io.manifest_scan import natural_key, scan_bids, scan_folder, write_manifest
from mrhscale.io.volumes import write_sidecars, write_volume
from mrhscale.parallel.context import Context
from mrhscale.stages.ingest import ingest
from mrhscale.stores import CohortStore, list_subjects, open_subject

SHAPE = (6, 5, 4)
AFF = np.diag([0.1, 0.1, 0.1, 1.0])


@pytest.fixture(scope="module")
def client():
    from mrhscale.parallel.cluster import dask_client

    with dask_client(workers=1, processes=False, quiet=True) as c:
        yield c


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from mrhscale.synth.phantom import make_cohort

    return make_cohort(tmp_path_factory.mktemp("synth") / "cohort", n_subjects=2, shape=(16, 12, 20),
                       seed=3, quiet=True)


def _img(path, n=None, seed=0, mask=False, outside=False):
    """A tiny float volume (4D with n volumes), or a mask (1 inside, or 1 outside)."""
    if mask:
        a = np.zeros(SHAPE, np.uint8)
        a[1:-1, 1:-1, 1:-1] = 1
        a = 1 - a if outside else a
    else:
        rng = np.random.default_rng(seed)
        a = rng.random(SHAPE if n is None else (*SHAPE, n), dtype=np.float32) * 100
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    return write_volume(str(path), a, AFF)


def _subject(root, sid, mri=("dwi", "t2mt"), roles=("mask", "fa", "af", "lesion"), ext=".nii"):
    d = root / sid
    for i, g in enumerate(mri):
        p = _img(d / f"{g}{ext}", n=3, seed=i)
        if g == "dwi":
            write_sidecars(p, [0, 2000, 2000], [[0, 0, 0], [1, 0, 0], [0, 1, 0]])
    for r in roles:
        _img(d / f"{r}{ext}", mask=r in ("mask", "lesion"))
    return d


def _cli(*args):
    r = CliRunner().invoke(main, ["manifest", *map(str, args)])
    return r.exit_code, r.output


def test_natural_key():
    assert sorted(["s10", "S2", "s1", "s02b"], key=natural_key) == ["s1", "S2", "s02b", "s10"]


def test_synth_folder_gives_synths_own_manifest(tmp_path, synth, client):
    """The key property: the generated manifest, with no flag (synth's channel sidecars name
    the T2/MT channels), ingests to exactly what synth's own does."""
    side = os.path.join(os.path.dirname(synth), "s01", "t2MTONOFF.json")
    assert json.load(open(side)) == {"channels": ["t2", "mt_off", "mt_on"]}
    out = tmp_path / "gen" / "cohort.yaml"  # outside the cohort: paths climb with ../
    code, text = _cli(os.path.dirname(synth), "--out", out)
    assert code == 0, text
    assert "2 subject(s), MRI groups dwi2000, dwi5000, t2MTONOFF; targets af, nf, mbp; labels lesion, wm" in text
    assert "../" in out.read_text()
    gen, ref = load_manifest(str(out)), load_manifest(synth)
    assert [s.id for s in gen.subjects] == [s.id for s in ref.subjects] == ["s01", "s02"]
    for a, b in zip(gen.subjects, ref.subjects, strict=True):
        assert a.files() == b.files()  # same files in the same roles (truth/ left out)
        assert [(g.name, g.channels) for g in a.mri] == [(g.name, g.channels) for g in b.mri]
        assert a.mask_inverted == b.mask_inverted
    stores = {}
    for name, man in (("gen", str(out)), ("ref", synth)):
        stores[name] = str(tmp_path / f"{name}.zarr")
        ingest(man, stores[name], ctx=Context(client=client, quiet=True), checksums=False)
    assert list_subjects(stores["gen"]) == list_subjects(stores["ref"]) == ["s01", "s02"]
    assert CohortStore.open(stores["gen"]).channels() == CohortStore.open(stores["ref"]).channels()
    for sid in ("s01", "s02"):
        a, b = open_subject(stores["gen"], sid), open_subject(stores["ref"], sid)
        assert list(a.contrast.values) == list(b.contrast.values)
        assert sorted(a.data_vars) == sorted(b.data_vars)
        for v in a.data_vars:
            np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)
        np.testing.assert_array_equal(a.bval.values, b.bval.values)  # .bval/.bvec picked up
        np.testing.assert_array_equal(a.bvec.values, b.bvec.values)
        assert a.bval.values[0] == 0 and a.bval.values[-4] == 5000
        assert a.attrs["affine"] == b.attrs["affine"]
        assert (a.attrs["targets"], a.attrs["labels"]) == (b.attrs["targets"], b.attrs["labels"])


def test_naming_rules_and_order(tmp_path):
    root = tmp_path / "c"
    for sid in ("s10", "s2", "s1"):
        _subject(root, sid, ext=".hdr" if sid == "s2" else ".nii")
    s1 = root / "s1"
    os.rename(s1 / "mask.nii", s1 / "Brain_Mask.nii")  # names match case-insensitively
    os.rename(s1 / "af.nii", s1 / "Fluo.nii")
    _img(s1 / "histology" / "gfap.nii")
    _img(s1 / "labels" / "roi.nii", mask=True)
    _img(s1 / "truth" / "axon.nii")  # another subfolder: ignored
    (s1 / "notes.txt").write_text("x")
    (root / "docs").mkdir()  # no images: not a subject
    (root / "docs" / "readme.md").write_text("x")
    doc = scan_folder(root)
    assert [s["id"] for s in doc["subjects"]] == ["s1", "s2", "s10"]
    e = doc["subjects"][0]
    assert e == {"id": "s1", "mri": {"dwi": "s1/dwi.nii", "t2mt": "s1/t2mt.nii"}, "fa": "s1/fa.nii",
                 "mask": "s1/Brain_Mask.nii", "targets": {"af": "s1/Fluo.nii", "gfap": "s1/histology/gfap.nii"},
                 "labels": {"lesion": "s1/lesion.nii", "roi": "s1/labels/roi.nii"}}
    assert doc["subjects"][1]["mri"] == {"dwi": "s2/dwi.hdr", "t2mt": "s2/t2mt.hdr"}  # Analyze pair once
    res = write_manifest(root, root / "cohort.yaml")
    assert res["subjects"] == ["s1", "s2", "s10"] and res["groups"] == ["dwi", "t2mt"]
    assert [s.id for s in load_manifest(str(root / "cohort.yaml")).subjects] == ["s1", "s2", "s10"]


def test_channel_names_sidecar_and_channels_from(tmp_path):
    root = tmp_path / "c"
    for sid in ("s1", "s2"):
        _subject(root, sid)
    (root / "s1" / "t2mt.json").write_text(json.dumps({"channels": ["t2", "mt_off", "mt_on"], "TE": 8}))
    (root / "s2" / "dwi.json").write_text(json.dumps({"EchoTime": 0.03}))  # no "channels": ignored
    doc = scan_folder(root, channel_names={"t2mt": ["a", "b", "c"]})
    s1, s2 = (s["mri"] for s in doc["subjects"])
    assert s1["t2mt"] == {"path": "s1/t2mt.nii", "channels": ["t2", "mt_off", "mt_on"]}  # sidecar wins
    assert s2["t2mt"] == {"path": "s2/t2mt.nii", "channels": ["a", "b", "c"]}
    assert s1["dwi"] == "s1/dwi.nii" and s2["dwi"] == "s2/dwi.nii"
    ch = tmp_path / "ch.yaml"
    ch.write_text("dwi: [b0, x, y]\n")
    assert scan_folder(root, channel_names=str(ch))["subjects"][1]["mri"]["dwi"]["channels"] == ["b0", "x", "y"]
    with pytest.raises(MRHError, match="no subject has"):
        scan_folder(root, channel_names={"t2": ["a"]})
    ch.write_text("dwi: b0\n")
    with pytest.raises(MRHError, match=f"{ch}: dwi: expected a list"):
        scan_folder(root, channel_names=str(ch))
    (root / "s1" / "t2mt.json").write_text(json.dumps({"channels": "t2"}))
    with pytest.raises(MRHError, match="t2mt.json: 'channels': expected a list"):
        scan_folder(root)
    (root / "s1" / "t2mt.json").write_text("{not json")
    with pytest.raises(MRHError, match="t2mt.json: not valid JSON"):
        scan_folder(root)


def _drop(p):
    os.remove(p)


@pytest.mark.parametrize("case, match", [
    ("missing", "folder not found"),
    ("file", "is a file"),
    ("empty", "no subject found"),
    ("no_mri", "s2: subject without MRI"),
    ("groups", "s2: MRI groups dwi differ from those of .*s1 \\(missing: t2mt; extra: -\\)"),
    ("no_mask", "s2: no mask"),
    ("twice", "two images share the name 't2mt'"),
    ("lone_bval", "s2/dwi.bval: has no dwi.bvec"),
    ("img_only", "without its .hdr"),
    ("bad_id", "not a plain name"),
    ("bad_target", "histology/mask.nii|targets: 'mask' is not usable"),
])
def test_scan_errors_name_the_path(tmp_path, case, match):
    root = tmp_path / "c"
    for sid in ("s1", "s2"):
        _subject(root, sid)
    s2, target = root / "s2", root
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "file":
        target = s2 / "fa.nii"
    elif case == "empty":
        target = tmp_path / "empty"
        (target / "sub").mkdir(parents=True)
    elif case == "no_mri":
        for g in ("dwi", "t2mt"):
            _drop(s2 / f"{g}.nii")
    elif case == "groups":
        _drop(s2 / "t2mt.nii")
    elif case == "no_mask":
        _drop(s2 / "mask.nii")
        _drop(s2 / "fa.nii")
    elif case == "twice":
        _img(s2 / "t2mt.nii.gz")
    elif case == "lone_bval":
        _drop(s2 / "dwi.bvec")
    elif case == "img_only":
        (s2 / "t1.img").write_bytes(b"\0" * 8)
    elif case == "bad_id":
        os.rename(s2, root / "s 2")
    elif case == "bad_target":
        _img(s2 / "histology" / "mask.nii")
    with pytest.raises(MRHError, match=match) as e:
        scan_folder(target)
    assert "\n" not in str(e.value)
    code, text = _cli(target, "--out", tmp_path / "m.yaml")
    assert code == 2 and text.startswith("mrhscale: error:") and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "m.yaml").exists()


def test_out_refused_unless_overwrite_of_a_manifest(tmp_path):
    root = tmp_path / "c"
    for sid in ("s1", "s2"):
        _subject(root, sid)
    out = tmp_path / "cohort.yaml"
    assert _cli(root, "--out", tmp_path)[0] == 2  # a folder: never
    assert "is a folder" in _cli(root, "--out", tmp_path)[1]
    assert _cli(root, "--out", out, "-q") == (0, "")
    first = out.read_text()
    code, text = _cli(root, "--out", out)
    assert code == 2 and "already exists; use --overwrite" in text
    _img(root / "s1" / "extra.nii")
    _img(root / "s2" / "extra.nii")
    assert _cli(root, "--out", out, "--overwrite")[0] == 0
    assert out.read_text() != first and "s1/extra.nii" in out.read_text()
    other = tmp_path / "notes.yaml"
    other.write_text("title: not a manifest\n")
    code, text = _cli(root, "--out", other, "--overwrite")
    assert code == 2 and "is not a cohort manifest" in text
    assert other.read_text() == "title: not a manifest\n"
    code, text = _cli(root, "--out", root / "s1" / "fa.nii", "--overwrite")  # an image: never
    assert code == 2 and "is not a cohort manifest" in text


def test_mask_set_outside_the_brain_is_reported(tmp_path, caplog):
    root = tmp_path / "c"
    _subject(root, "s1", roles=("fa",))
    _img(root / "s1" / "mask.nii", mask=True, outside=True)
    with caplog.at_level(logging.WARNING, logger="mrhscale"):
        scan_folder(root)
    assert "inverted: true" in caplog.text


# ---------------------------------------------------------------- BIDS


def _bids(root):
    """Raw anat + dwi for sub-01 and two sessions of sub-02; mask, FA, stain, lesion in derivatives."""
    (root / "derivatives" / "manual").mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    (root / "derivatives" / "manual" / "dataset_description.json").write_text(json.dumps(
        {"Name": "manual", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "manual"}]}))
    for sub, ses in (("01", None), ("02", "1"), ("02", "2")):
        rel = os.path.join(f"sub-{sub}", *([f"ses-{ses}"] if ses else []))
        pre = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        raw, der = root / rel, root / "derivatives" / "manual" / rel
        _img(raw / "anat" / f"{pre}_T2w.nii.gz")
        dwi = _img(raw / "dwi" / f"{pre}_acq-b2000_dwi.nii.gz", n=3)
        write_sidecars(dwi, [0, 2000, 2000], [[0, 0, 0], [1, 0, 0], [0, 1, 0]])
        _img(der / "anat" / f"{pre}_desc-brain_mask.nii.gz", mask=True)
        _img(der / "anat" / f"{pre}_label-lesion_mask.nii.gz", mask=True)
        _img(der / "anat" / f"{pre}_stain-AF_histology.nii.gz")
        _img(der / "dwi" / f"{pre}_acq-b2000_param-FA_dwimap.nii.gz")
    return root


def test_bids_dataset_parses_and_ingests(tmp_path, client):
    root = _bids(tmp_path / "ds")
    out = tmp_path / "cohort.yaml"
    code, text = _cli(root, "--bids", "--out", out)
    assert code == 0, text
    man = load_manifest(str(out))
    assert [s.id for s in man.subjects] == ["sub-01", "sub-02_ses-1", "sub-02_ses-2"]
    s = man.subjects[1]
    assert [g.name for g in s.mri] == ["dwi_b2000", "T2w"]
    assert s.mask.endswith("sub-02_ses-1_desc-brain_mask.nii.gz")
    assert s.fa.endswith("sub-02_ses-1_acq-b2000_param-FA_dwimap.nii.gz")
    assert list(s.targets) == ["af"] and list(s.labels) == ["lesion"]
    store = str(tmp_path / "c.zarr")
    ingest(str(out), store, ctx=Context(client=client, quiet=True), checksums=False)
    assert list_subjects(store) == ["sub-01", "sub-02_ses-1", "sub-02_ses-2"]
    ds = open_subject(store, "sub-02_ses-2")
    assert list(ds.contrast.values) == ["dwi_b2000_0", "dwi_b2000_1", "dwi_b2000_2", "T2w"]
    assert ds.bval.values[1] == 2000 and np.isnan(ds.bval.values[3])
    assert "af" in ds.data_vars and "lesion" in ds.data_vars


def test_bids_errors(tmp_path, monkeypatch):
    root = _bids(tmp_path / "ds")
    os.remove(root / "sub-01" / "dwi" / "sub-01_acq-b2000_dwi.bvec")
    with pytest.raises(MRHError, match="sub-01_acq-b2000_dwi.nii.gz: no sub-01_acq-b2000_dwi.bval/.bvec"):
        scan_bids(root)
    os.remove(root / "dataset_description.json")
    with pytest.raises(MRHError, match="no dataset_description.json"):
        scan_bids(root)
    with pytest.raises(MRHError, match="no subject found"):
        scan_folder(tmp_path / "ds" / "derivatives")
    monkeypatch.setitem(sys.modules, "bids", None)  # pybids not installed
    (root / "dataset_description.json").write_text("{}")
    with pytest.raises(MRHError, match=r'pip install "mrhscale\[bids\]"'):
        scan_bids(root)


def test_written_manifest_is_deterministic(tmp_path):
    root = tmp_path / "c"
    for sid in ("s1", "s2"):
        _subject(root, sid)
    write_manifest(root, tmp_path / "a.yaml")
    write_manifest(root, tmp_path / "b.yaml")
    a = yaml.safe_load((tmp_path / "a.yaml").read_text())
    assert (tmp_path / "a.yaml").read_text() == (tmp_path / "b.yaml").read_text()
    assert a["generated_by"]["command"] == "mrhscale manifest" and a["generated_by"]["bids"] is False
