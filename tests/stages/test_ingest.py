"""Ingest: files -> cohort store, read back with plain xarray; bad input; resume and crash."""

import os

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
import yaml
import zarr
from click.testing import CliRunner
from helpers import write_file_cohort

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.parallel.context import Context
from mrhscale.stages.ingest import even_chunks, ingest
from mrhscale.stores import list_subjects, open_subject


@pytest.fixture(scope="module")
def client():
    from mrhscale.parallel.cluster import dask_client

    with dask_client(workers=2, processes=True, quiet=True) as c:
        yield c


def _read(path):
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


@pytest.mark.parametrize(("chunks", "shape", "expect"), [
    ((64, 32, 64), (80, 48, 112), (40, 24, 56)),  # not 64 + 16: a thin last chunk decodes whole
    ((64, 32, 64), (200, 130, 64), (50, 26, 64)),
    ((64, 64, 64), (16, 1, 65), (16, 1, 33)),
])
def test_chunks_tile_the_volume_evenly(chunks, shape, expect):
    got = even_chunks(chunks, shape)
    assert got == expect and all(g <= c for g, c in zip(got, chunks))
    n = [-(-s // g) for s, g in zip(shape, got)]  # as many chunks as the largest size needs
    assert n == [-(-s // c) for s, c in zip(shape, chunks)]


@pytest.mark.parametrize("fmt", [pytest.param("nii.gz", marks=pytest.mark.slow), "nii", "analyze"])
def test_round_trip_plain_xarray(tmp_path, client, fmt):
    man = write_file_cohort(tmp_path / "files", n_subjects=2, fmt=fmt)
    out = str(tmp_path / "cohort.zarr")
    res = ingest(man, out, chunks=(4, 4, 5), ctx=Context(client=client, quiet=True))
    assert res["written"] == ["s01", "s02"]
    assert zarr.open_group(out, mode="r").attrs["subjects"] == ["s01", "s02"]
    ds = xr.open_zarr(out, group="s01", consolidated=False)  # plain xarray, no mrhscale
    ext = {"nii.gz": ".nii.gz", "nii": ".nii", "analyze": ".hdr"}[fmt]
    src = tmp_path / "files" / "s01"
    dwi, t2mt = _read(str(src / f"dwi{ext}")), _read(str(src / f"t2MTONOFF{ext}"))
    np.testing.assert_array_equal(ds.mri.values, np.concatenate([dwi, t2mt], axis=3))
    assert ds.mri.dims == ("x", "y", "z", "contrast")
    assert ds.mri.dtype == np.float32
    # all contrasts in one chunk, contrast fastest; z (12) cut evenly by at most 5: 4 + 4 + 4
    assert ds.mri.data.chunksize == (4, 4, 4, 8)
    assert zarr.open_group(out, mode="r")["s01/mri"].chunks == (4, 4, 4, 8)
    assert list(ds.contrast.values) == [f"dwi_{i}" for i in range(5)] + ["t2", "mt_off", "mt_on"]
    np.testing.assert_array_equal(ds.af.values, _read(str(src / f"af{ext}")))
    np.testing.assert_array_equal(ds.mask.values, _read(str(src / f"mask{ext}")) > 0.5)
    assert ds.mask.dtype == bool
    affine = nib.load(str(src / f"dwi{ext}")).affine
    np.testing.assert_allclose(np.array(ds.attrs["affine"]), affine)
    assert ds.attrs["targets"] == ["af"]
    assert all(v["checksum"].startswith("sha256:") for v in ds.attrs["sources"].values())
    if fmt != "analyze":
        assert ds.bval.values[0] == 0 and ds.bval.values[1] == 2000
        np.testing.assert_allclose(ds.bvec.values[1], [1, 0, 0])
        assert np.isnan(ds.bval.values[-1])
    comp = zarr.open_group(out, mode="r")["s01/mri"].metadata.codecs
    assert any("Blosc" in type(c).__name__ for c in comp)


def test_inverted_mask_and_nans(tmp_path, client):
    man = write_file_cohort(tmp_path / "files", n_subjects=1, fmt="nii", mask_inverted=True)
    p = tmp_path / "files" / "s01" / "fa.nii"
    img = nib.load(str(p))
    fa = np.asarray(img.dataobj).copy()
    fa[0, 0, 0] = np.nan
    fa[1, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(fa, img.affine), str(p))
    out = str(tmp_path / "c.zarr")
    ingest(man, out, chunks=(4, 4, 4), ctx=Context(client=client, quiet=True))
    ds = open_subject(out, "s01")
    assert ds.mask.values.sum() == 6 * 4 * 8  # the brain, not the outside
    assert ds.attrs["nonfinite_counts"]["fa"] == 2
    assert not np.isnan(ds.fa.values).any() and ds.fa.values[0, 0, 0] == 0


def test_resume_skips_complete_and_clears_half_written(tmp_path, client):
    man = write_file_cohort(tmp_path / "files", n_subjects=2, fmt="nii")
    out = str(tmp_path / "c.zarr")
    ingest(man, out, subjects=["s01"], chunks=(4, 4, 4), ctx=Context(client=client, quiet=True))
    # a crash mid-way through s02: data present in a dead run's staging, never committed
    import socket

    dead = f"{socket.gethostname().split('.')[0]}-4194000-deadbeef"
    stale = os.path.join(out, "_staging", dead, "s02")
    os.makedirs(stale)
    open(os.path.join(stale, "junk"), "w").close()
    live = os.path.join(out, "_staging", f"otherhost-{os.getpid()}-cafecafe")  # another machine's run
    os.makedirs(live)
    assert list_subjects(out) == ["s01"]
    mtime = os.path.getmtime(os.path.join(out, "s01", "mri", "zarr.json"))
    res = ingest(man, out, chunks=(4, 4, 4), ctx=Context(client=client, quiet=True))
    assert res["skipped"] == ["s01"] and res["written"] == ["s02"]
    assert os.path.getmtime(os.path.join(out, "s01", "mri", "zarr.json")) == mtime
    assert list_subjects(out) == ["s01", "s02"]
    runs = [d for d in os.listdir(os.path.join(out, "_staging")) if d != "zarr.json"]
    assert runs == [os.path.basename(live)]  # the dead run's staging is gone, no one else's touched


def test_failure_mid_write_leaves_no_subject(tmp_path, client):
    man = write_file_cohort(tmp_path / "files", n_subjects=2, fmt="nii")
    # truncate one file after its header was read: the write fails inside a Dask task
    f = tmp_path / "files" / "s02" / "dwi.nii"
    data = f.read_bytes()
    out = str(tmp_path / "c.zarr")
    from mrhscale.io.manifest import load_manifest

    m = load_manifest(man)
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(MRHError):
        ingest(m, out, chunks=(4, 4, 4), ctx=Context(client=client, quiet=True))
    assert "s02" not in list_subjects(out)
    assert not os.path.exists(os.path.join(out, "s02"))
    f.write_bytes(data)
    res = ingest(man, out, chunks=(4, 4, 4), ctx=Context(client=client, quiet=True))
    assert "s02" in res["written"]


def _mutate(man, fn):
    doc = yaml.safe_load(open(man))
    fn(doc)
    yaml.safe_dump(doc, open(man, "w"))


def _cli(args):
    r = CliRunner().invoke(main, args)
    return r.exit_code, r.output


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing_file", "file not found"),
        ("unreadable", "unreadable image"),
        ("shape", "grid"),
        ("affine", "affine differs"),
        ("channels", "channels differ"),
        ("ndim", "expected a 3D volume"),
        ("empty_mask", "empty mask"),
        ("bad_yaml", "not valid YAML"),
        ("no_subjects", "subjects"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, case, expect):
    from mrhscale.io.volumes import write_volume

    man = write_file_cohort(tmp_path / "files", n_subjects=2, fmt="nii")
    s2 = tmp_path / "files" / "s02"
    aff = nib.load(str(s2 / "fa.nii")).affine
    if case == "missing_file":
        os.remove(s2 / "af.nii")
    elif case == "unreadable":
        (s2 / "af.nii").write_bytes(b"garbage" * 10)
    elif case == "shape":
        write_volume(str(s2 / "af.nii"), np.zeros((9, 8, 12), np.uint8), aff)
    elif case == "affine":
        write_volume(str(s2 / "af.nii"), np.zeros((10, 8, 12), np.uint8), np.diag([0.1, 0.1, 0.1, 1]))
    elif case == "channels":
        _mutate(man, lambda d: d["subjects"][1]["mri"]["t2MTONOFF"].update(channels=["t2", "mtoff", "mton"]))
    elif case == "ndim":
        write_volume(str(s2 / "fa.nii"), np.zeros((10, 8, 12, 2), np.float32), aff)
    elif case == "empty_mask":
        write_volume(str(s2 / "mask.nii"), np.zeros((10, 8, 12), np.uint8), aff)
    elif case == "bad_yaml":
        open(man, "w").write("subjects: [\n  - id: x\n   bad")
    elif case == "no_subjects":
        open(man, "w").write("subjects: []\n")
    out = tmp_path / "c.zarr"
    code, output = _cli(["ingest", man, "--out", str(out), "--quiet", "--dask-workers", "1"])
    assert code == 2, output
    lines = [ln for ln in output.strip().splitlines() if ln]
    assert len(lines) == 1 and expect in lines[0], output
    assert "Traceback" not in output
    if case not in ("bad_yaml", "no_subjects"):
        assert "s02" in lines[0]
    assert not out.exists() or list_subjects(str(out)) == []


def test_skip_bad_ingests_the_good(tmp_path, client):
    man = write_file_cohort(tmp_path / "files", n_subjects=2, fmt="nii")
    os.remove(tmp_path / "files" / "s01" / "af.nii")
    out = tmp_path / "c.zarr"
    # on the module's worker processes (joined by address, as a user joins a cluster): no start-up of its own
    code, output = _cli(["ingest", man, "--out", str(out), "--skip-bad", "--quiet", "--scheduler",
                         client.scheduler.address, "--chunks", "4,4,4"])
    assert code == 0, output
    assert "s01" in output and "file not found" in output
    assert list_subjects(str(out)) == ["s02"]


def test_out_is_a_file_and_bad_options(tmp_path):
    man = write_file_cohort(tmp_path / "files", n_subjects=1, fmt="nii")
    f = tmp_path / "afile"
    f.write_text("x")
    code, output = _cli(["ingest", man, "--out", str(f), "--quiet"])
    assert code == 2 and "is a file" in output
    code, output = _cli(["ingest", man, "--out", str(tmp_path / "c.zarr"), "--chunks", "4,4"])
    assert code == 2 and "--chunks" in output
    code, output = _cli(["ingest", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "c.zarr")])
    assert code == 2 and "manifest not found" in output


def test_info_lists_subjects(tmp_path, client):
    man = write_file_cohort(tmp_path / "files", n_subjects=2, fmt="nii")
    out = str(tmp_path / "c.zarr")
    ingest(man, out, chunks=(4, 4, 4), ctx=Context(client=client, quiet=True))
    code, output = _cli(["info", out])
    assert code == 0
    assert "s01" in output and "10x8x12" in output and "mt_on" in output and "af" in output


@pytest.mark.slow  # default-run budget (README: make test <= 6 min on 2 cores); run in .ci/run's slow step
def test_many_subjects_are_written_a_window_at_a_time_each_committed_once(tmp_path, client, monkeypatch):
    """A cohort larger than the window: a few subjects claimed at a time, each committed once,
    all in the index; a re-run reuses every one."""
    from mrhscale.stages import ingest as stage
    from mrhscale.stores.subjects import SubjectWriter

    man = write_file_cohort(tmp_path / "files", n_subjects=6, fmt="nii")
    out = str(tmp_path / "cohort.zarr")
    monkeypatch.setattr(stage._WriteJob, "PER_THREAD", 1)  # 2 worker threads: 2 subjects at a time
    claimed, commits = [], []
    begin, commit = SubjectWriter.begin, SubjectWriter.commit

    def counting_begin(self, sid):
        path = begin(self, sid)
        claimed.append(len(self._claims))
        return path

    monkeypatch.setattr(SubjectWriter, "begin", counting_begin)
    monkeypatch.setattr(SubjectWriter, "commit", lambda self, sid, *a, **k: commits.append(sid) or commit(self, sid, *a, **k))
    ids = [f"s0{i}" for i in range(1, 7)]
    assert ingest(man, out, chunks=(4, 4, 5), ctx=Context(client=client, quiet=True))["written"] == ids
    assert sorted(commits) == ids and max(claimed) <= 2
    assert zarr.open_group(out, mode="r").attrs["subjects"] == ids == list_subjects(out)
    again = ingest(man, out, chunks=(4, 4, 5), ctx=Context(client=client, quiet=True))
    assert again["written"] == [] and again["skipped"] == ids and len(commits) == 6
