"""predict --to-native: virtual stains of a registered cohort mapped back to each subject's own grid.

A moving subject is the reference phantom seen through a known rigid motion on a DIFFERENT
grid (shape, voxel origin); after `register` (affine), `ingest` and `predict --to-native`, its
native NIfTI must lie on that native grid and agree with predicting directly in native space.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from scipy import ndimage as ndi

from mrhscale.options import RegistrationOptions
from mrhscale.parallel.context import Context

pytest.importorskip("ants", reason="needs the optional extra mrhscale[register] (antspyx)")
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

from mrhscale.errors import MRHError  # noqa: E402
from mrhscale.io.volumes import write_sidecars, write_volume  # noqa: E402
from mrhscale.options import PredictOptions

SHAPE = (28, 22, 34)
NSHAPE = (30, 26, 32)  # the moving subject's native grid differs from the reference grid
VOX = 0.1
AFFINE = np.array([[VOX, 0, 0, -1.3], [0, VOX, 0, -1.0], [0, 0, VOX, -1.6], [0, 0, 0, 1]])
NAFFINE = np.array([[VOX, 0, 0, -1.6], [0, VOX, 0, -1.2], [0, 0, VOX, -1.4], [0, 0, 0, 1]])
BVECS = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.7071, 0.7071, 0]])
BVALS = np.array([0, 2000, 2000, 2000, 2000])
# In-process Dask: what these tests check is the native mapping, not the cluster (tested in
# tests/parallel and test_predict's cluster end to end).
SYNC = Context(scheduler="synchronous", quiet=True)


def phantom(seed=0):
    c = (np.array(SHAPE) - 1) / 2
    g = np.meshgrid(*[np.arange(n) - c[i] for i, n in enumerate(SHAPE)], indexing="ij")

    def ell(centre, radii):
        return sum(((g[k] - centre[k]) / radii[k]) ** 2 for k in range(3))

    brain = ell((0, 0, 0), (11, 8, 14)) < 1
    blob = ell((4, 2, 5), (3.5, 3, 4)) < 1
    tract = ell((0, 3, 0), (8, 1.5, 2)) < 1
    vent = ell((-2, -1, -4), (2, 1.5, 3)) < 1
    tex = ndi.gaussian_filter(np.random.default_rng(seed).standard_normal(SHAPE), 2.0)
    tex /= tex.std()
    fa = brain * (0.2 + 0.05 * tex) + 0.5 * tract + 0.25 * blob - 0.15 * vent
    t2 = brain * (60 + 6 * tex) + 40 * vent - 20 * tract - 15 * blob
    b0 = brain * (100 + 5 * tex) + 60 * vent - 10 * tract
    af = brain * (80 + 10 * tex) + 120 * tract + 60 * blob
    out = {k: ndi.gaussian_filter(np.clip(v, 0, None).astype(np.float32), 0.7)
           for k, v in {"fa": fa, "t2": t2, "b0": b0, "af": af}.items()}
    out["mask"] = brain.astype(np.float32)
    return out


def rigid(deg_z, deg_x, shift_mm):
    z, x = np.deg2rad(deg_z), np.deg2rad(deg_x)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    t = np.eye(4)
    t[:3, :3] = rz @ rx
    t[:3, 3] = shift_mm
    return t


def to_native_grid(arr, world, order=1):
    """native(v) = reference(AFFINE^-1 @ world @ NAFFINE @ v): the known motion, on the native grid."""
    m = np.linalg.inv(AFFINE) @ world @ NAFFINE
    return ndi.affine_transform(arr, m[:3, :3], offset=m[:3, 3], output_shape=NSHAPE, order=order,
                                mode="constant", cval=0.0).astype(np.float32)


def write_subject(root, sid, vols, affine):
    d = os.path.join(root, sid)
    os.makedirs(d, exist_ok=True)
    dwi = np.stack([vols["b0"]] + [vols["b0"] * (0.3 + 0.1 * k) for k in range(1, 5)], axis=-1)
    write_volume(f"{d}/dwi.nii.gz", dwi, affine)
    write_sidecars(f"{d}/dwi.nii.gz", BVALS, BVECS)
    write_volume(f"{d}/t2.nii.gz", vols["t2"], affine)
    write_volume(f"{d}/fa.nii.gz", vols["fa"], affine)
    write_volume(f"{d}/mask.nii.gz", (vols["mask"] > 0.5).astype(np.uint8), affine)
    write_volume(f"{d}/af.nii.gz", vols["af"], affine)
    return {"id": sid, "mri": {"dwi": f"{sid}/dwi.nii.gz", "t2": f"{sid}/t2.nii.gz"},
            "fa": f"{sid}/fa.nii.gz", "mask": f"{sid}/mask.nii.gz", "targets": {"af": f"{sid}/af.nii.gz"}}


def write_model(path, channels):
    import torch

    from mrhscale.io.bundle import save_bundle
    from mrhscale.nn.model import MRHNet
    from mrhscale.ops.norm import Normalisation

    torch.manual_seed(0)
    m = MRHNet(len(channels), depth=1, width=8, stains=["af"])
    with torch.no_grad():
        m.heads[0].conv5.weight.mul_(5.0)
    c = len(channels)
    norm = Normalisation("percentile", [0.0] * c, [100.0] * c, 50.0, 50.0)
    save_bundle(path, m, channels=list(channels), norm=norm,
                patch={"half": 1, "size": 3, "axis": "y"}, provenance={"test": True})
    return str(path)


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Files (s01 = reference, s02 = moved onto another grid), their registration, two stores."""
    from mrhscale.stages.ingest import ingest
    from mrhscale.stages.register import register_cohort

    root = tmp_path_factory.mktemp("native")
    files = str(root / "files")
    ref = phantom()
    world = rigid(10, 5, (0.15, -0.1, 0.2))
    moved = {k: to_native_grid(v, world, order=0 if k == "mask" else 1) for k, v in ref.items()}
    entries = [write_subject(files, "s01", ref, AFFINE), write_subject(files, "s02", moved, NAFFINE)]
    manifest = os.path.join(files, "cohort.yaml")
    with open(manifest, "w") as fh:
        yaml.safe_dump({"subjects": entries}, fh)
    reg = str(root / "reg")
    res = register_cohort(manifest, "s01", reg,
                          options=RegistrationOptions(transform="affine", contrast="fa", fast=True),
                          ctx=SYNC)
    assert res["registered"] == ["s01", "s02"], res["failed"]
    store, native_store = str(root / "cohort.zarr"), str(root / "native.zarr")
    ingest(res["manifest"], store, ctx=SYNC, checksums=False)
    ingest(manifest, native_store, ctx=SYNC, checksums=False)
    from mrhscale.stores import open_subject

    channels = [str(c) for c in open_subject(store, "s01").contrast.values]
    model = write_model(root / "m.pt", channels)
    return {"root": root, "files": files, "reg": reg, "store": store, "native_store": native_store,
            "model": model, "moved": moved}


def test_to_native_on_the_native_grid_and_like_native_prediction(cohort, tmp_path):
    import nibabel as nib

    from mrhscale.stages.predict import predict

    c = cohort
    nii = str(tmp_path / "nii")
    res = predict(c["model"], c["store"], str(tmp_path / "p.zarr"), nifti_dir=nii, to_native=True,
                  options=PredictOptions(batch_size=2048), ctx=SYNC)
    assert res["native"] == [os.path.join(nii, f"{s}_af_virtual_native.nii.gz") for s in ("s01", "s02")]
    img = nib.load(os.path.join(nii, "s02_af_virtual_native.nii.gz"))
    assert img.shape == NSHAPE
    np.testing.assert_allclose(img.affine, NAFFINE, atol=1e-5)
    got = np.asarray(img.dataobj, np.float32)
    # the same model run directly on the native subject
    direct = predict(c["model"], c["native_store"], str(tmp_path / "n.zarr"), nifti_dir=nii, subjects=["s02"],
                     options=PredictOptions(batch_size=2048), ctx=SYNC)
    assert direct["predicted"] == ["s02"]
    want = np.asarray(nib.load(os.path.join(nii, "s02_af_virtual.nii.gz")).dataobj, np.float32)
    mask = c["moved"]["mask"] > 0.5
    assert dice(got != 0, mask) > 0.8
    inner = ndi.binary_erosion(mask, iterations=2)
    r = np.corrcoef(got[inner], want[inner])[0, 1]
    assert r > 0.85, r
    # the reference subject's registration is the identity: its native file is its prediction
    s01 = np.asarray(nib.load(os.path.join(nii, "s01_af_virtual_native.nii.gz")).dataobj)
    s01_ref = np.asarray(nib.load(os.path.join(nii, "s01_af_virtual.nii.gz")).dataobj)
    np.testing.assert_allclose(s01, s01_ref, atol=1e-3 * np.abs(s01_ref).max())


def test_to_native_dir_resume_and_errors(cohort, tmp_path):
    from mrhscale.cli import main
    from mrhscale.stages.predict import predict

    c = cohort
    out, nii = str(tmp_path / "p.zarr"), str(tmp_path / "nii")
    with pytest.raises(MRHError, match="needs --nifti"):
        predict(c["model"], c["store"], out, to_native=True, ctx=SYNC)
    # a store ingested from the native files: never registered -> names the subject and the fix
    with pytest.raises(MRHError, match="'s02' was not registered.*--to-native DIR"):
        predict(c["model"], c["native_store"], out, nifti_dir=nii, to_native=True, subjects=["s02"],
                ctx=SYNC)
    with pytest.raises(MRHError, match="no folder s02/"):
        predict(c["model"], c["store"], out, nifti_dir=nii, to_native=str(tmp_path), subjects=["s02"],
                ctx=SYNC)
    assert not os.path.exists(out)  # errors come before any work
    # CLI: explicit DIR, one subject
    r = CliRunner().invoke(main, ["predict", c["model"], c["store"], "--out", out, "--nifti", nii,
                                  "--subjects", "s02", "--to-native", c["reg"], "--scheduler", "synchronous", "-q"])
    assert r.exit_code == 0, r.output
    p = os.path.join(nii, "s02_af_virtual_native.nii.gz")
    assert os.path.exists(p)
    # resume: the subject is skipped, a missing native file is written again; bare flag form
    os.remove(p)
    r = CliRunner().invoke(main, ["predict", c["model"], c["store"], "--out", out, "--nifti", nii,
                                  "--subjects", "s02", "--to-native", "--scheduler", "synchronous", "-q"])
    assert r.exit_code == 0, r.output
    assert "already predicted, skipped: s02" in r.output and os.path.exists(p)
    r = CliRunner().invoke(main, ["predict", c["model"], c["store"], "--out", out, "--to-native", "-q"])
    assert r.exit_code == 2 and "--nifti" in r.output and "Traceback" not in r.output
