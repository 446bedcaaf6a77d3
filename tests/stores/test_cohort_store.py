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
