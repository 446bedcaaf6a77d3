import nibabel as nib
import numpy as np
import pytest

from mrhscale.errors import MRHError
from mrhscale.io.volumes import checksum, open_volume, read_sidecars, write_sidecars, write_volume


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".hdr"])
def test_write_read_lazy(tmp_path, ext):
    a = np.arange(4 * 5 * 6 * 2, dtype=np.float32).reshape(4, 5, 6, 2)
    aff = np.diag([0.06, 0.07, 0.08, 1.0])
    p = write_volume(str(tmp_path / f"v{ext}"), a, aff)
    v = open_volume(p)
    assert v.shape == (4, 5, 6, 2) and v.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(v.proxy[1:3, :, 2:4]), a[1:3, :, 2:4])
    np.testing.assert_allclose(v.zooms, [0.06, 0.07, 0.08], rtol=1e-6)
    if ext != ".hdr":
        np.testing.assert_allclose(v.affine, aff, atol=1e-7)
    assert checksum(p) == checksum(p) and checksum(p).startswith("sha256:")


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_analyze_dtypes(tmp_path, dtype):
    a = (np.arange(60).reshape(3, 4, 5) % 100).astype(dtype)
    img = nib.AnalyzeImage(a, np.eye(4))
    nib.save(img, str(tmp_path / "a.hdr"))
    v = open_volume(str(tmp_path / "a.img"))
    np.testing.assert_array_equal(np.asarray(v.proxy), a)


def test_sidecars_round_trip(tmp_path):
    p = str(tmp_path / "dwi.nii.gz")
    bvecs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float)
    write_sidecars(p, [0, 2000, 2000], bvecs)
    bvals, bv = read_sidecars(p)
    np.testing.assert_array_equal(bvals, [0, 2000, 2000])
    np.testing.assert_allclose(bv, bvecs)
    assert read_sidecars(str(tmp_path / "other.nii")) is None


def test_errors_name_the_file(tmp_path):
    with pytest.raises(MRHError, match="file not found"):
        open_volume(str(tmp_path / "none.nii"))
    with pytest.raises(MRHError, match="unknown image format"):
        open_volume(str(tmp_path / "x.png"))
    (tmp_path / "bad.nii").write_bytes(b"\0" * 20)
    with pytest.raises(MRHError, match="bad.nii: unreadable"):
        open_volume(str(tmp_path / "bad.nii"))
    (tmp_path / "only.hdr").write_bytes(b"")
    with pytest.raises(MRHError, match="only.img: file not found"):
        open_volume(str(tmp_path / "only.hdr"))
