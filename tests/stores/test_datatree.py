"""Stores open cleanly as a DataTree (issue 30): no warning from xarray's open_datatree or a
zarr listing of any store kind, none of the bookkeeping among the subjects, subjects in
natural order; stores of the layout before this keep working and are tidied on a write."""

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import pytest
import xarray as xr
import yaml
import zarr
from click.testing import CliRunner
from helpers import make_cohort_store, subject_dataset, write_model

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.io.config import load_config
from mrhscale.stores import CohortStore, PatchStore, PredictionStore
from mrhscale.stores.base import SNAPSHOT, put_snapshot, store_config
from mrhscale.stores.subjects import portable


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def clean_reads(path) -> list[str]:
    """Open ``path`` as a reader would, every warning an error; the tree's children."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(str(path), engine="zarr")
        list(zarr.open_group(str(path), mode="r").members(max_depth=None))
        raw = zarr.open_group(str(path), mode="r", use_consolidated=False)
        list(raw.members(max_depth=None))  # the store itself, bookkeeping included: valid groups only
    return list(tree.children)


def has_snapshot(path) -> bool:
    with open(os.path.join(path, "zarr.json")) as fh:
        return SNAPSHOT in json.load(fh)


def test_every_store_kind_opens_as_a_tree_without_warning(cohort_store, tmp_path):
    cohort, ids = cohort_store
    patches, pred = tmp_path / "p.zarr", tmp_path / "pred.zarr"
    cli("patches", cohort, "--target", "af", "--out", patches, "--scheduler", "synchronous", "-q")
    model = write_model(tmp_path / "m.pt", CohortStore(cohort).channels())
    cli("predict", model, cohort, "--out", pred, "--scheduler", "synchronous", "-q")
    assert os.path.isdir(os.path.join(cohort, "_locks")) and os.path.isdir(pred / "_commits")
    assert clean_reads(cohort) == ids
    assert clean_reads(pred) == ids
    assert clean_reads(patches) == ["train", "val"]
    assert "patches" in store_config(str(patches)) and "predict" in store_config(str(pred))
    tree = xr.open_datatree(str(pred), engine="zarr")
    assert tree[ids[0]].ds.attrs["fingerprint"] == PredictionStore(pred).subject_attrs(ids[0])["fingerprint"]
    assert PatchStore.open(patches).split("train")[0].shape[0] > 0  # mrhscale reads what it wrote


def test_an_ome_zarr_image_lists_without_warning(cohort_store, tmp_path):
    """An OME-Zarr image is no DataTree (its levels share dimension names at other sizes), but a
    zarr listing of it, its resolved config included, meets no stray file."""
    cohort, ids = cohort_store
    image = tmp_path / "img.ome.zarr"
    cli("export-image", cohort, "--subject", ids[0], "--var", "mask", "--out", image, "-q")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for consolidated in (None, False):
            names = [k for k, _ in zarr.open_group(str(image), mode="r", use_consolidated=consolidated)
                     .members(max_depth=None)]
            assert "s0" in names
    assert "export-image" in store_config(str(image))


def test_subjects_in_natural_order_in_the_store_and_the_tree(tmp_path):
    path = tmp_path / "c.zarr"
    store = CohortStore(str(path))
    store.prepare({"channels": [f"c{i:02d}" for i in range(5)]})
    for sid in ("s10", "s2", "s1"):
        store.put(sid, subject_dataset(sid), {"id": sid})
    assert store.subjects() == ["s1", "s2", "s10"]
    assert clean_reads(path) == ["s1", "s2", "s10"]
    assert zarr.open_group(str(path), mode="r").attrs["subjects"] == ["s1", "s2", "s10"]


def test_the_snapshot_waits_for_the_last_writer_and_follows_a_replaced_subject(tmp_path):
    path = tmp_path / "c.zarr"
    make_cohort_store(path, n_subjects=2)
    store = CohortStore(str(path))
    assert has_snapshot(path)
    first, second = store.writer(), store.writer()
    assert not has_snapshot(path)  # a running writer: readers list the store itself
    sid = first.begin("s01")
    new = subject_dataset("s01", shape=(6, 5, 7))
    portable(new).to_zarr(str(path), group=sid, mode="w", consolidated=False, zarr_format=3)
    first.commit("s01", sid, {"replaced": True})
    first.close()
    assert not has_snapshot(path)  # another writer still runs: its close publishes
    second.close()
    assert has_snapshot(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(str(path), engine="zarr")
    assert dict(tree["s01"].ds.sizes)["x"] == 6  # the new version, not the snapshot of the old
    assert not [n for n in os.listdir(path / "_locks") if n.startswith("_writer-")]


def test_a_killed_writer_does_not_block_the_snapshot(tmp_path):
    path = tmp_path / "c.zarr"
    make_cohort_store(path, n_subjects=1)
    code = ("import os, signal; from mrhscale.stores import CohortStore\n"
            f"w = CohortStore({str(path)!r}).writer(); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert not has_snapshot(path)  # withdrawn by the killed writer; the store reads as before
    assert CohortStore(str(path)).subjects() == ["s01"]
    CohortStore(str(path)).writer().close()
    assert has_snapshot(path) and clean_reads(path) == ["s01"]
    assert not [n for n in os.listdir(path / "_locks") if n.startswith("_writer-")]  # the dead one's dropped


def old_layout(path) -> None:
    """Turn a store into the layout mrhscale wrote before this change: claims as ``.lock``
    files in ``_locks``, the resolved config as ``_config/mrhscale-<command>.yaml``, no
    snapshot."""
    put_snapshot(CohortStore(str(path)).loc, None)
    locks = os.path.join(path, "_locks")
    for name in os.listdir(locks):
        if name != "zarr.json":
            shutil.rmtree(os.path.join(locks, name))
            open(os.path.join(locks, f"{name}.lock"), "w").close()
    config = os.path.join(path, "_config")
    os.makedirs(config, exist_ok=True)
    with open(os.path.join(config, "zarr.json"), "w") as fh:
        json.dump({"zarr_format": 3, "node_type": "group", "attributes": {"about": "configs"}}, fh)
    with open(os.path.join(config, "mrhscale-ingest.yaml"), "w") as fh:
        yaml.safe_dump({"command": "ingest", "chunks": "4,4,4", "quiet": True}, fh)


def test_a_store_of_the_old_layout_reads_then_is_tidied_by_the_next_write(tmp_path):
    path = tmp_path / "c.zarr"
    make_cohort_store(path, n_subjects=2)
    old_layout(path)
    store = CohortStore(str(path))
    assert store.subjects() == ["s01", "s02"] and store.open_subject("s02").attrs["subject"] == "s02"
    with warnings.catch_warnings(record=True) as caught:  # what issue 30 saw
        warnings.simplefilter("always")
        list(zarr.open_group(str(path), mode="r").members(max_depth=None))
    assert any("not recognized as a component" in str(w.message) for w in caught)
    assert store_config(str(path))["ingest"]["chunks"] == "4,4,4"  # read in place, not moved
    assert os.path.exists(path / "_config" / "mrhscale-ingest.yaml")

    store.prepare({})
    store.put("s03", subject_dataset("s03"), {"id": "s03"})
    assert clean_reads(path) == ["s01", "s02", "s03"]
    assert not [n for n in os.listdir(path / "_locks") if n.endswith(".lock")]
    assert os.listdir(path / "_config") == ["zarr.json"]
    assert store_config(str(path))["ingest"]["chunks"] == "4,4,4"  # the old file's options, kept
    allowed = {"chunks": "chunks", "quiet": "quiet"}
    assert load_config(str(path), "ingest", allowed, {"ingest": allowed}) == {"chunks": "4,4,4", "quiet": True}


def test_a_claim_is_a_valid_group_while_held(tmp_path):
    path = tmp_path / "c.zarr"
    make_cohort_store(path, n_subjects=1)
    w = CohortStore(str(path)).writer()
    try:
        w.begin("s02")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            held = zarr.open_group(str(path), mode="r", use_consolidated=False)["_locks/s02"]
        assert dict(held.attrs) == {}
        with CohortStore(str(path)).writer() as other, pytest.raises(MRHError, match="being written by another"):
            other.begin("s02")
    finally:
        w.close()


def test_config_from_a_store_that_keeps_none_is_one_line(tmp_path):
    path = tmp_path / "c.zarr"
    make_cohort_store(path, n_subjects=1)
    with pytest.raises(MRHError, match="keeps no resolved config"):
        load_config(str(path), "ingest", {}, {"ingest": {}})
