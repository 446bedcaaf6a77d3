"""Object storage end to end against a local S3-compatible server (moto) on loopback."""

import os

import numpy as np
import pytest
import xarray as xr
from helpers import write_file_cohort

from mrhscale.store import list_subjects, open_subject

moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed (pip install 'moto[server]')")
pytest.importorskip("s3fs", reason="s3fs not installed (pip install 'mrhscale[s3]')")


@pytest.fixture(scope="module")
def s3():
    try:
        srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        srv.start()
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"local S3 server could not start: {e}")
    host, port = srv.get_host_and_port()
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    so = {"endpoint_url": f"http://{host}:{port}", "key": "test", "secret": "test"}
    import s3fs

    s3fs.S3FileSystem(**so).mkdir("mrh")
    yield so
    srv.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_ingest_to_s3_and_read_back(tmp_path, s3):
    from mrhscale.cluster import dask_client
    from mrhscale.ingest import ingest

    man = write_file_cohort(tmp_path / "files", n_subjects=2, fmt="nii")
    url = "s3://mrh/cohort.zarr"
    with dask_client(workers=2, quiet=True) as client:
        res = ingest(man, url, chunks=(4, 4, 4), client=client, quiet=True, storage_options=s3)
    assert res["written"] == ["s01", "s02"]
    assert list_subjects(url, storage_options=s3) == ["s01", "s02"]
    ds = open_subject(url, "s01", storage_options=s3)
    import nibabel as nib

    dwi = np.asarray(nib.load(str(tmp_path / "files" / "s01" / "dwi.nii")).dataobj)
    np.testing.assert_array_equal(ds.mri.values[..., :5], dwi)
    plain = xr.open_zarr(url, group="s02", consolidated=False, storage_options=s3)
    assert plain.mri.shape == (10, 8, 12, 8)
