"""The public API: one import, every stage a function returning a small result dataclass."""

import subprocess
import sys

import mrhscale
from mrhscale.parallel.context import Context


def test_import_is_cheap_and_every_public_name_resolves():
    code = ("import sys, mrhscale; heavy = [m for m in ('torch', 'dask', 'zarr', 'xarray') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
    for name in mrhscale.__all__:
        assert getattr(mrhscale, name) is not None, name
    assert set(mrhscale.__all__) <= set(dir(mrhscale))


def test_stage_results_are_dataclasses_with_dict_access(tmp_path):
    res = mrhscale.ingest(mrhscale.make_cohort(str(tmp_path / "files"), n_subjects=1, shape=(12, 10, 14), quiet=True),
                          str(tmp_path / "c.zarr"), ctx=Context(scheduler="synchronous", quiet=True), chunks=(8, 8, 8))
    assert isinstance(res, mrhscale.IngestResult)
    assert res.written == ["s01"] and res["written"] == ["s01"] and res.get("bad") == {}
    assert res.to_dict() == {"store": str(tmp_path / "c.zarr"), "written": ["s01"], "skipped": [], "bad": {}}
    assert mrhscale.list_subjects(res.store) == ["s01"]
