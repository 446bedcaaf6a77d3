"""A store's snapshot grows ~13 kB a subject (issue 28): at 2,000 subjects parsing it whole
held ~250 MB in the driver of every stage that read the root's attrs, and writing it held
it all. The root is read without its snapshot and the snapshot is written a node at a
time; the files are the ones ``json.dumps`` of the whole would give."""

from __future__ import annotations

import json
import os
import tracemalloc

import pytest

from mrhscale.stores import CohortStore
from mrhscale.stores.base import SNAPSHOT, put_snapshot, split_snapshot
from mrhscale.stores.urls import Location

N_NODES = 3000  # ~2 MB of snapshot


def nodes(n: int = N_NODES):
    for i in range(n):
        yield f"s{i:04d}/mri", {"zarr_format": 3, "node_type": "array", "shape": [16, 16, 16, 67],
                                "attributes": {"contrast": [f"dwi_{k}" for k in range(67)]}}


def root_doc(**attrs) -> dict:
    return {"zarr_format": 3, "node_type": "group",
            "attributes": {"format": "mrhscale-cohort", "subjects": ["s0000"], **attrs}}


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "c.zarr"
    path.mkdir()
    (path / "zarr.json").write_text(json.dumps(root_doc(), indent=2))
    return path


def test_the_snapshot_is_written_as_json_dumps_of_the_whole_and_read_back_without_it(root):
    assert put_snapshot(Location.of(str(root)), nodes()) is True
    raw = (root / "zarr.json").read_bytes()
    whole = {**root_doc(), SNAPSHOT: {"kind": "inline", "must_understand": False, "metadata": dict(nodes())}}
    assert raw == json.dumps(whole).encode()
    assert split_snapshot(raw) == (root_doc(), True)
    mtime = os.stat(root / "zarr.json").st_mtime_ns
    assert put_snapshot(Location.of(str(root)), nodes()) is False  # the same snapshot: not rewritten
    assert os.stat(root / "zarr.json").st_mtime_ns == mtime
    assert put_snapshot(Location.of(str(root)), None) is True
    assert json.loads((root / "zarr.json").read_text()) == root_doc()
    assert put_snapshot(Location.of(str(root)), None) is False


def test_reading_the_root_attrs_does_not_parse_the_snapshot(root):
    put_snapshot(Location.of(str(root)), nodes())
    size = os.path.getsize(root / "zarr.json")
    store = CohortStore(str(root))
    tracemalloc.start()
    attrs = store.attrs
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert attrs == root_doc()["attributes"]
    tracemalloc.start()
    json.loads((root / "zarr.json").read_bytes())
    _, whole = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2.5 * size < whole  # the file's bytes and text, not its ~6x in dicts


def test_writing_the_snapshot_holds_a_node_at_a_time(root):
    tracemalloc.start()
    put_snapshot(Location.of(str(root)), nodes())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < os.path.getsize(root / "zarr.json") / 4


@pytest.mark.parametrize("doc", [
    {**root_doc(note='a "consolidated_metadata": {} text'), SNAPSHOT: {"kind": "inline", "metadata": {}}},
    {**root_doc(nested={SNAPSHOT: {"x": 1}}), SNAPSHOT: {"kind": "inline", "metadata": {"a": {}}}},
    {"attributes": {"format": "x"}, "zarr_format": 3, SNAPSHOT: {"kind": "inline", "metadata": {}},
     "node_type": "group"},  # zarr's own layout: node_type after it
    root_doc(),
])
def test_any_layout_of_the_root_reads_as_json_would(doc):
    want = {k: v for k, v in doc.items() if k != SNAPSHOT}
    assert split_snapshot(json.dumps(doc)) == (want, SNAPSHOT in doc)
    assert split_snapshot(json.dumps(doc, indent=2)) == (want, SNAPSHOT in doc)


def test_attrs_written_with_the_snapshot_take_numpy_values(root):
    import numpy as np

    assert put_snapshot(Location.of(str(root)), nodes(2), {"scale": np.float32(1.5), "ranges": np.arange(3)})
    assert CohortStore(str(root)).attrs == {**root_doc()["attributes"], "scale": 1.5, "ranges": [0, 1, 2]}


def test_listing_the_subjects_reads_no_group_document(tmp_path, monkeypatch):
    """A stage lists a cohort first: at 2,000 subjects reading each group's attrs (~6 kB) held
    tens of MB in the driver. The listing is the index's rule: committed names, two listings."""
    import xarray as xr

    from mrhscale.stores import subjects

    store = CohortStore(str(tmp_path / "c.zarr"))
    store.prepare({"channels": ["t2"]})
    for sid in ("s1", "s2", "s10"):
        store.put(sid, xr.Dataset({"mask": (("x",), [True, False])}), {"stage": "test"})
    with store.writer() as w:  # a group being written, not committed: not listed
        w.begin("s3")
        reads = []
        monkeypatch.setattr(subjects, "_read_json", lambda fs, path, f=subjects._read_json: reads.append(path) or f(fs, path))
        assert store.subjects() == ["s1", "s2", "s10"]
    assert reads == []
