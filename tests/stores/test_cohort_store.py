import pytest
import xarray as xr

from mrhscale.errors import MRHError
from mrhscale.stores import list_subjects, open_cohort, open_subject


def test_helper_store_follows_contract(cohort_store):
    url, ids = cohort_store
    assert list_subjects(url) == ids
    ds = open_subject(url, ids[0])
    assert ds.mri.dims == ("x", "y", "z", "contrast")
    assert ds.mri.data.chunksize[-1] == ds.sizes["contrast"]
    plain = xr.open_zarr(url, group=ids[0], consolidated=False)
    assert list(plain.contrast.values) == list(ds.contrast.values)
    assert set(open_cohort(url)) == set(ids)


def test_missing_store_and_subject(tmp_path, cohort_store):
    with pytest.raises(MRHError, match="does not exist"):
        list_subjects(str(tmp_path / "nope.zarr"))
    url, _ = cohort_store
    with pytest.raises(MRHError, match="not in store"):
        open_subject(url, "zz")


def test_a_commit_touches_the_index_not_every_subject(tmp_path, monkeypatch):
    """Each commit adds its own subject to the root's index; the markers of all subjects are
    listed once, when the writer closes, and the index then agrees with them."""
    import zarr
    from helpers import subject_dataset

    from mrhscale.stores import CohortStore
    from mrhscale.stores.subjects import GroupStore

    store = CohortStore(str(tmp_path / "c.zarr"))
    store.prepare({})
    zarr.open_group(store.url, mode="r+").attrs["subjects"] = ["gone"]  # a stale entry (a crashed run's)
    listed = []
    real = GroupStore.subjects
    monkeypatch.setattr(GroupStore, "subjects", lambda self: listed.append(1) or real(self))
    ds = subject_dataset("x")
    with store.writer() as w:
        for sid in ("s10", "s2", "s1"):
            path = w.begin(sid)
            w.lazy_write(path, ds).compute(scheduler="synchronous")
            w.commit(sid, path, {"v": sid})
            assert sid in zarr.open_group(store.url, mode="r").attrs["subjects"]
        assert listed == []
    assert listed == [1, 1]  # once for the index's rebuild, once for the readers' snapshot
    assert zarr.open_group(store.url, mode="r").attrs["subjects"] == ["s1", "s2", "s10"] == real(store)



def test_an_unlocked_rebuild_does_not_leave_an_older_listing(tmp_path, monkeypatch):
    """On an object store (no lock) a writer that listed the markers before another's commit
    and wrote after it must not leave its older list: the check lists them again and it
    rebuilds (the lost s02 of CI stop 38, three concurrent ingests into one S3 store)."""
    import zarr
    from helpers import subject_dataset

    from mrhscale.stores import CohortStore
    from mrhscale.stores.subjects import GroupStore

    store = CohortStore(str(tmp_path / "c.zarr"))
    store.prepare({})
    with store.writer() as w:
        for sid in ("s01", "s02", "s03"):
            path = w.begin(sid)
            w.lazy_write(path, subject_dataset("x")).compute(scheduler="synchronous")
            w.commit(sid, path, {"v": sid})
    real = GroupStore.subjects
    lists = iter([["s01", "s03"]])  # what it listed before s02's marker was written
    monkeypatch.setattr(GroupStore, "subjects", lambda self: next(lists, None) or real(self))
    monkeypatch.setattr(GroupStore, "_index_lock", lambda self: None)
    assert store.refresh_index() == ["s01", "s02", "s03"]
    assert zarr.open_group(store.url, mode="r").attrs["subjects"] == ["s01", "s02", "s03"]
