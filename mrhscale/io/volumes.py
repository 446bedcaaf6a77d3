"""All image file I/O: NIfTI (.nii, .nii.gz) and Analyze 7.5 (.hdr/.img) volumes.

Reads are lazy: nibabel array proxies are sliced per chunk, so uncompressed
files memory-map and .nii.gz uses indexed_gzip's seek points instead of
decompressing from the start for every block.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from mrhscale.errors import MRHError
from mrhscale.stores.base import rename_file, temporary_folder

NIFTI_EXT = (".nii", ".nii.gz")
ANALYZE_EXT = (".hdr", ".img")


def image_kind(path: str) -> str:
    p = str(path).lower()
    if p.endswith(NIFTI_EXT):
        return "nifti"
    if p.endswith(ANALYZE_EXT):
        return "analyze"
    raise MRHError(f"{path}: unknown image format (expected .nii, .nii.gz, or Analyze .hdr/.img)")


def stem(path: str) -> str:
    p = str(path)
    for ext in (".nii.gz", ".nii", ".hdr", ".img"):
        if p.lower().endswith(ext):
            return p[: -len(ext)]
    return p


def member_files(path: str) -> list[str]:
    """The files that make up one image (both halves of an Analyze pair)."""
    if image_kind(path) == "analyze":
        s = stem(path)
        return [s + ".hdr", s + ".img"]
    return [str(path)]


@dataclass
class Volume:
    """A lazily readable volume: shape, geometry and an array proxy."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    affine: np.ndarray
    zooms: tuple[float, ...]
    proxy: object
    header: object

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def orientation(self) -> list[str]:
        return list(nib.aff2axcodes(self.affine))


def open_volume(path: str, *, what: str = "") -> Volume:
    """Open a volume's header and proxy; nothing is read yet. Errors name the file."""
    label = f"{what}: " if what else ""
    kind = image_kind(path)
    for f in member_files(path):
        if not os.path.exists(f):
            raise MRHError(f"{label}{f}: file not found")
        if os.path.isdir(f):
            raise MRHError(f"{label}{f}: is a directory, expected an image file")
    try:
        img = nib.load(str(path), keep_file_open=False) if kind == "nifti" else nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        dtype = np.dtype(img.get_data_dtype())
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except MRHError:
        raise
    except Exception as e:
        raise MRHError(f"{label}{path}: unreadable image ({type(e).__name__}: {e})") from None
    return Volume(str(path), shape, dtype, affine, zooms, img.dataobj, img.header)


def image_volume(img, name: str) -> Volume:
    """An in-memory nibabel image as a Volume (``name`` stands for its path in messages)."""
    if not hasattr(img, "dataobj") or not hasattr(img, "affine"):
        raise MRHError(f"{name}: expected a file path or a nibabel image, got {type(img).__name__}")
    if img.affine is None:
        raise MRHError(f"{name}: the image has no affine")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Volume(name, tuple(int(s) for s in img.shape), np.dtype(img.get_data_dtype()),
                  np.asarray(img.affine, np.float64), zooms, img.dataobj, img.header)


def read_block(proxy, index) -> np.ndarray:
    """One block of a proxy as float32 (scaling applied, NaNs kept for counting)."""
    return np.asarray(proxy[index], dtype=np.float32)


def read_sidecars(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """FSL-style ``.bval``/``.bvec`` beside ``path`` (same stem), or None."""
    s = stem(path)
    bval_f, bvec_f = s + ".bval", s + ".bvec"
    if not (os.path.exists(bval_f) and os.path.exists(bvec_f)):
        return None
    try:
        bvals = np.loadtxt(bval_f, dtype=np.float64, ndmin=1).ravel()
        bvecs = np.loadtxt(bvec_f, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise MRHError(f"{bval_f}/{bvec_f}: malformed sidecar ({e})") from None
    if bvecs.shape[0] != 3 and bvecs.shape[1] == 3:
        bvecs = bvecs.T
    if bvecs.shape != (3, bvals.size):
        raise MRHError(
            f"{bvec_f}: expected 3 rows of {bvals.size} gradient components to match {bval_f}, "
            f"got shape {bvecs.shape}"
        )
    return bvals, bvecs.T


def write_sidecars(path: str, bvals, bvecs) -> None:
    s = stem(path)
    np.savetxt(s + ".bval", np.asarray(bvals, float)[None, :], fmt="%g")
    np.savetxt(s + ".bvec", np.asarray(bvecs, float).reshape(-1, 3).T, fmt="%.6f")


def write_volume(path: str, array, affine, *, header=None, dtype=None, descrip: str | None = None,
                 space: dict | None = None, xform: str | None = None) -> str:
    """Write NIfTI or Analyze by extension, atomically (temp name, then rename).

    ``space`` (a store subject's attrs, or ``ops.space.header_space``) keeps the source's
    qform/sform codes and unit; ``xform`` ("aligned", "template") says the grid is another
    image's. ``descrip`` (NIfTI, 80 characters at most) says what made the file: mrhscale
    rewrites a NIfTI only when its descrip says mrhscale wrote it."""
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    affine = np.asarray(affine, dtype=np.float64)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    if image_kind(path) == "analyze":
        return _write_analyze(path, arr, affine, header)
    img = nib.Nifti1Image(arr, affine, header=header)
    img.header.set_data_dtype(arr.dtype)
    if header is None:
        set_space(img, affine, space, xform)
    if descrip is not None:
        img.header["descrip"] = descrip.encode("ascii", "replace")[:80]
    s = str(path)
    ext = ".nii.gz" if s.lower().endswith(".nii.gz") else ".nii"
    with temporary_folder(s) as work:  # same filesystem: the rename is atomic
        nib.save(img, os.path.join(work, "v" + ext))
        rename_file(os.path.join(work, "v" + ext), s)
    return s


def set_space(img, affine, space: dict | None, xform: str | None = None) -> None:
    """qform/sform as the source had them (``affine`` is what nibabel read from it: its sform
    when coded, else its qform); scanner space when the source said nothing; unit in xyzt_units."""
    space = space or {}
    qcode, scode = int(space.get("qform_code") or 0), int(space.get("sform_code") or 0)
    if xform is not None:  # resampled onto another image's grid: both forms say so
        code = nib.nifti1.xform_codes[xform]
        img.set_sform(affine, code=code)
        img.set_qform(affine, code=code)
    elif scode == 0 and qcode == 0:
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
    else:
        img.set_sform(affine if scode else None, code=scode)
        qform = space.get("qform") if scode else affine
        img.set_qform(np.asarray(qform, float) if qcode and qform is not None else None, code=qcode)
    img.header.set_xyzt_units(xyz=space.get("space_units", "mm"), t=None)


def _write_analyze(path: str, arr, affine, header) -> str:
    img = nib.AnalyzeImage(arr, affine, header=header)
    img.header.set_data_dtype(arr.dtype)
    s = stem(str(path))
    with temporary_folder(s) as work:
        nib.save(img, os.path.join(work, "v.hdr"))
        rename_file(os.path.join(work, "v.img"), s + ".img")
        rename_file(os.path.join(work, "v.hdr"), s + ".hdr")
    return s + ".hdr"


def mrhscale_descrip(path: str) -> str | None:
    """The header ``descrip`` of a NIfTI mrhscale wrote (it starts with "mrhscale"), else None:
    an existing file whose descrip does not is someone else's and is never overwritten."""
    try:
        text = bytes(nib.load(path).header["descrip"]).decode("ascii", "replace").rstrip("\x00")
    except Exception:
        return None
    return text if text.startswith("mrhscale") else None


def checksum(path: str, algo: str = "sha256", bufsize: int = 1 << 22) -> str:
    """Checksum over all member files of an image (both halves of an Analyze pair)."""
    h = hashlib.new(algo)
    for f in member_files(path):
        with open(f, "rb") as fh:
            while chunk := fh.read(bufsize):
                h.update(chunk)
    return f"{algo}:{h.hexdigest()}"
