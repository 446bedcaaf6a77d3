"""Small synthetic stores built directly, so each stage's tests stand on their own."""

from __future__ import annotations

import numpy as np
import xarray as xr
import zarr

from mrhscale.parallel.context import Context

DEFAULT_AFFINE = [[0.06, 0, 0, 0], [0, 0.06, 0, 0], [0, 0, 0.06, 0], [0, 0, 0, 1]]


def channel_names(n_channels: int) -> list[str]:
    if n_channels == 67:
        return (
            [f"dwi2000_{i}" for i in range(34)]
            + [f"dwi5000_{i}" for i in range(30)]
            + ["t2", "mt_off", "mt_on"]
        )
    return [f"c{i:02d}" for i in range(n_channels)]


def subject_dataset(sid: str, shape=(12, 10, 14), n_channels=5, seed=0, chunks=(8, 8, 8),
                    target_names=("af",)) -> xr.Dataset:
    """A subject whose target is a smooth known function of a few channels."""
    rng = np.random.default_rng(seed)
    x, y, z = shape
    mri = rng.gamma(2.0, 50.0, size=(*shape, n_channels)).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    data = {
        "mri": (("x", "y", "z", "contrast"), mri),
        "mask": (("x", "y", "z"), mask),
        "fa": (("x", "y", "z"), rng.random(shape).astype(np.float32)),
    }
    for k, name in enumerate(target_names):
        t = np.clip(mri[..., k % n_channels] * 1.2 - 20, 0, 255) * mask
        data[name] = (("x", "y", "z"), t.astype(np.float32))
    names = channel_names(n_channels)
    ds = xr.Dataset(
        data,
        coords={
            "contrast": names,
            "group": ("contrast", [n.rsplit("_", 1)[0] for n in names]),
            "bval": ("contrast", np.full(n_channels, np.nan)),
        },
        attrs={
            "subject": sid,
            "affine": DEFAULT_AFFINE,
            "voxel_size": [0.06, 0.06, 0.06],
            "orientation": ["R", "A", "S"],
            "targets": list(target_names),
            "labels": [],
        },
    )
    cx, cy, cz = chunks
    ds["mri"] = ds["mri"].chunk({"x": cx, "y": cy, "z": cz, "contrast": -1})
    for v in ["mask", "fa", *target_names]:
        ds[v] = ds[v].chunk({"x": cx, "y": cy, "z": cz})
    for v in ds.variables:
        ds[v].encoding.pop("chunks", None)
    return ds


def with_wm(rows: int):
    """An edit for ``make_cohort_store``: a ``wm`` label over the first ``rows`` x-planes."""

    def edit(ds, i):
        wm = np.zeros(ds["mask"].shape, bool)
        wm[:rows] = True
        return ds.assign(wm=(("x", "y", "z"), wm)).assign_attrs(labels=["wm"])

    return edit


def make_cohort_store(path, n_subjects=3, shape=(12, 10, 14), n_channels=5, seed=0,
                      chunks=(8, 8, 8), target_names=("af",), edit=None) -> list[str]:
    """Write a cohort store through the store layer (as ingest does); returns subject ids.

    edit: optional ``f(ds, i) -> ds`` applied to subject i's dataset before writing
    (e.g. to plant NaNs, zero regions or a channel mismatch).
    """
    from mrhscale.stores import CohortStore

    store = CohortStore(str(path))
    store.prepare({"channels": channel_names(n_channels)})
    ids = [f"s{i + 1:02d}" for i in range(n_subjects)]
    for i, sid in enumerate(ids):
        ds = subject_dataset(sid, shape, n_channels, seed + i, chunks, target_names)
        if edit is not None:
            ds = edit(ds, i)
        store.put(sid, ds, {"stage": "tests.helpers", "seed": seed + i, "shape": list(shape)})
    return ids


def make_patch_store(path, n_train=512, n_val=128, n_channels=5, half=1, seed=0,
                     target="af", chunk=64, complete=True, dtype="float32", legacy=False) -> str:
    """Write a patch store following the CONTRACTS.md layout, with a learnable target.
    ``legacy``: as mrhscale wrote one-stain stores before stains were always a list
    (``targets`` [N, P, P], no ``stains`` attr; read through stores/legacy.py).

    Inputs are raw (gamma distributed, like MRI intensities); the target is a
    smooth nonlinear function of a few channels in 0..255 stain units, so a
    small MRH-Net can learn it and a single contrast cannot explain all of it.
    """
    from mrhscale.ops.norm import Normalisation

    rng = np.random.default_rng(seed)
    p = 2 * half + 1
    names = channel_names(n_channels)

    def split(n):
        x = rng.gamma(2.0, 50.0, size=(n, n_channels, p, p)).astype(np.float32)
        a = x[:, 0]
        b = x[:, 1 % n_channels]
        c = x[:, 2 % n_channels]
        t = np.clip(0.8 * a + 0.4 * np.sqrt(b * c) - 0.002 * a * b + 10.0, 0, 255)
        origin = np.zeros((n, 4), np.int32)
        origin[:, 0] = rng.integers(0, 3, n)
        origin[:, 1:] = rng.integers(0, 50, (n, 3))
        return x.astype(dtype), t.astype(np.float32), origin

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    stats = None
    per_subject = {}
    for name, n in (("train", n_train), ("val", n_val)):
        x, t, origin = split(n)
        per_subject.update(_subject_norm(x, origin, per_subject))
        if name == "train":
            lo = np.percentile(x, 1, axis=(0, 2, 3))
            hi = np.percentile(x, 99, axis=(0, 2, 3))
            stats = Normalisation("percentile", lo.tolist(), (hi - lo).tolist(), 0.0,
                                  float(np.percentile(t, 99)))
        g = root.create_group(name)
        g.create_array("inputs", data=x, chunks=(chunk, n_channels, p, p),
                       dimension_names=["patch", "contrast", "row", "col"])
        if legacy:
            g.create_array("targets", data=t, chunks=(chunk, p, p), dimension_names=["patch", "row", "col"])
        else:
            g.create_array("targets", data=t[:, None], chunks=(chunk, 1, p, p),
                           dimension_names=["patch", "stain", "row", "col"])
        g.create_array("origin", data=origin, chunks=(chunk, 4),
                       dimension_names=["patch", "field"])
    root.attrs.update({
        "format": "mrhscale-patches", "format_version": 1,
        "channels": names, "target": target, **({} if legacy else {"stains": [target]}),
        "patch": {"half": half, "size": p, "axis": "y"},
        "norm": stats.to_dict(), "subject_norm": per_subject, "subjects": ["s01", "s02", "s03"],
        "val_subjects": ["s03"],
        "n_train": n_train, "n_val": n_val, "seed": seed,
        "rules": {"stride": 2, "slices": None, "min_label_sum": 30, "min_label_nonzero": 4},
        "provenance": {"maker": "tests.helpers.make_patch_store"},
    })
    if complete:
        root.attrs["complete"] = True
    return str(path)


def _subject_norm(x, origin, done: dict) -> dict:
    """Per-subject statistics (as ``patches`` stores them) from each subject's patches."""
    from mrhscale.ops.norm import stats_from

    out = {}
    for k in np.unique(origin[:, 0]):
        sid = f"s{k + 1:02d}"
        if sid not in done:
            v = x[origin[:, 0] == k].astype(np.float32).transpose(0, 2, 3, 1)
            out[sid] = stats_from(v, np.ones(v.shape[:3], bool), float(v.max()))
    return out


class StandInPatchStream:
    """Minimal in-memory PatchStream (CONTRACTS.md API) for trainer tests until stream.py lands.

    Order is a function of (seed, epoch); each rank takes an interleaved shard and
    every rank yields the same number of batches (drop_last).
    """

    def __init__(self, url, split="train", batch_size=128, shuffle=True, *, seed=0, rank=None,
                 world_size=None, drop_last=True, norm=None, options=None, ctx=None):
        import torch.distributed as dist

        from mrhscale.errors import MRHError
        from mrhscale.ops.norm import Normalisation

        try:
            root = zarr.open_group(str(url), mode="r")
        except Exception:
            raise MRHError(f"{url}: no patch store here") from None
        if not root.attrs.get("complete"):
            raise MRHError(f"{url}: patch store is incomplete")
        a = dict(root.attrs)
        self.channels, self.target, self.patch = a["channels"], a["target"], a["patch"]
        self.norm = norm or Normalisation.from_dict(a["norm"])
        x = root[f"{split}/inputs"][...]
        self._x = self.norm.apply_inputs(x, channel_axis=1)
        self._t = self.norm.apply_target(root[f"{split}/targets"][...]).astype(np.float32)
        if rank is None:
            init = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if init else 0
            world_size = dist.get_world_size() if init else 1
        self.rank, self.world_size = rank, world_size or 1
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.num_samples = len(self._t)
        self.epoch = 0

    def set_epoch(self, e):
        self.epoch = int(e)

    def steps_per_epoch(self):
        per_rank = self.num_samples // self.world_size
        if self.drop_last:
            return per_rank // self.batch_size
        return -(-per_rank // self.batch_size)

    def __iter__(self):
        import torch

        idx = np.arange(self.num_samples)
        if self.shuffle:
            idx = np.random.default_rng([self.seed, self.epoch]).permutation(idx)
        idx = idx[self.rank::self.world_size][: self.num_samples // self.world_size]
        for s in range(self.steps_per_epoch()):
            j = np.sort(idx[s * self.batch_size:(s + 1) * self.batch_size])
            yield torch.from_numpy(self._x[j]), torch.from_numpy(self._t[j])


def write_file_cohort(root, n_subjects=2, shape=(10, 8, 12), fmt="nii.gz", seed=0, n_dwi=5,
                      mask_inverted=False, sidecars=True, affine=None) -> str:
    """Tiny per-subject NIfTI/Analyze files plus cohort.yaml; returns the manifest path."""
    import os

    import yaml

    from mrhscale.io.volumes import write_sidecars, write_volume

    rng = np.random.default_rng(seed)
    aff = np.asarray(affine if affine is not None else [[0.06, 0, 0, 1.0], [0, 0.06, 0, 2.0], [0, 0, 0.06, -3.0], [0, 0, 0, 1]])
    ext = {"nii.gz": ".nii.gz", "nii": ".nii", "analyze": ".hdr"}[fmt]
    subjects = []
    for i in range(n_subjects):
        sid = f"s{i + 1:02d}"
        d = os.path.join(root, sid)
        os.makedirs(d, exist_ok=True)
        dwi = rng.random((*shape, n_dwi), dtype=np.float32) * 100
        t2mt = rng.random((*shape, 3), dtype=np.float32) * 50
        mask = np.zeros(shape, np.uint8)
        mask[2:-2, 2:-2, 2:-2] = 1
        fa = (rng.random(shape, dtype=np.float32) * mask).astype(np.float32)
        af = (rng.integers(0, 255, shape) * mask).astype(np.uint8)
        paths = {k: os.path.join(d, k + ext) for k in ("dwi", "t2MTONOFF", "fa", "mask", "af")}
        write_volume(paths["dwi"], dwi, aff)
        if sidecars and fmt != "analyze":
            write_sidecars(paths["dwi"], [0] + [2000] * (n_dwi - 1),
                           np.vstack([[0, 0, 0], np.eye(3)[np.arange(n_dwi - 1) % 3]]))
        write_volume(paths["t2MTONOFF"], t2mt, aff)
        write_volume(paths["fa"], fa, aff)
        write_volume(paths["mask"], (1 - mask) if mask_inverted else mask, aff)
        write_volume(paths["af"], af, aff)
        rel = {k: os.path.relpath(v, root) for k, v in paths.items()}
        subjects.append({
            "id": sid,
            "mri": {"dwi": rel["dwi"], "t2MTONOFF": {"path": rel["t2MTONOFF"], "channels": ["t2", "mt_off", "mt_on"]}},
            "fa": rel["fa"],
            "mask": {"path": rel["mask"], "inverted": mask_inverted},
            "targets": {"af": rel["af"]},
        })
    path = os.path.join(root, "cohort.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump({"subjects": subjects}, fh, sort_keys=False)
    return path


def tree(path) -> dict:
    """Every file under ``path`` with its bytes: 'left as it was' means equal trees."""
    import os

    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def write_model(path, channels, half=1, axis="y", seed=0, depth=1, width=8, target="af"):
    """A small random MRH-Net bundle with visible output variation (so prediction tests bite)."""
    import torch

    from mrhscale.io.bundle import save_bundle
    from mrhscale.nn.model import MRHNet
    from mrhscale.ops.norm import Normalisation

    torch.manual_seed(seed)
    m = MRHNet(len(channels), depth=depth, width=width, stains=[target])
    with torch.no_grad():  # larger output variation than default init, so tests bite
        m.heads[0].conv5.weight.mul_(5.0)
    c = len(channels)
    norm = Normalisation("percentile", list(np.linspace(5, 30, c)), list(np.linspace(80, 150, c)),
                         7.0, 60.0)
    save_bundle(path, m, channels=list(channels), norm=norm,
                patch={"half": half, "size": 2 * half + 1, "axis": axis},
                provenance={"test": True})
    return str(path)


def write_ensemble(path, channels, members=3, factor=1.5, **kw):
    """An ensemble bundle of ``members`` random nets (seeds 0..K-1, as write_model), calibration
    ``factor``; also each member alone as ``<path>.m<k>`` (single bundles), for comparisons."""
    from mrhscale.io.bundle import ensemble_bundle, read_bundle, write_bundle

    singles = [write_model(f"{path}.m{k}", channels, seed=k, **kw) for k in range(members)]
    bundles = [read_bundle(p) for p in singles]
    unc = {"method": "ensemble", "members": members, "seeds": list(range(members)),
           "calibration": {"factor": factor, "fitted_on": "val", "n": 100}}
    write_bundle(path, ensemble_bundle(bundles, unc, {"test": True}))
    return str(path), singles


# ---- evaluation pairs: a cohort store and a prediction store of known similarity
EVAL_SHAPE = (14, 9, 16)
EVAL_AFF = [[0.06, 0, 0, 0], [0, 0.06, 0, 0], [0, 0, 0.06, 0], [0, 0, 0, 1]]
MD_TRUE = 0.0007


def protocol(bvals_known=True, b0_named=True):
    names = ([f"dwi2000_b0_{i}" if b0_named else f"dwi2000_{i}" for i in range(2)]
             + [f"dwi2000_dir{i:02d}" if b0_named else f"dwi2000_{i + 2}" for i in range(4)]
             + ["dwi5000_0", "dwi5000_1", "t2", "mt_off", "mt_on"])
    groups = ["dwi2000"] * 6 + ["dwi5000"] * 2 + ["t2MTONOFF"] * 3
    bval = np.array([0, 0, 2000, 2000, 2000, 2000, 5000, 5000, np.nan, np.nan, np.nan], float)
    if not bvals_known:
        bval[:] = np.nan
    return names, groups, bval


def subject(sid, seed, lesion=True, **kw):
    """A subject whose reference stain drops in a lesion where MT ratio also drops (weakly)."""
    rng = np.random.default_rng(seed)
    names, groups, bval = protocol(**kw)
    mask = np.zeros(EVAL_SHAPE, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    les = np.zeros(EVAL_SHAPE, bool)
    les[4:9, 2:6, 5:11] = True
    ref = (100 + 40 * rng.random(EVAL_SHAPE)) * mask
    ref[les] -= 50
    mri = np.zeros((*EVAL_SHAPE, len(names)), np.float32)
    b0 = 1000 + 100 * rng.random(EVAL_SHAPE)
    mri[..., 0:2] = b0[..., None]
    mri[..., 2:6] = (b0 * np.exp(-2000 * MD_TRUE))[..., None]
    mri[..., 6:8] = rng.random((*EVAL_SHAPE, 2)) * 100
    mri[..., 8] = 50 + ref * 0.3 + 5 * rng.standard_normal(EVAL_SHAPE)  # t2 tracks the stain, noisy
    mri[..., 9] = 200.0
    mtr = 0.4 - 0.05 * les + 0.05 * rng.standard_normal(EVAL_SHAPE)
    mri[..., 10] = 200.0 * (1 - mtr)
    ds = xr.Dataset(
        {
            "mri": (("x", "y", "z", "contrast"), mri),
            "mask": (("x", "y", "z"), mask),
            "fa": (("x", "y", "z"), rng.random(EVAL_SHAPE).astype(np.float32)),
            "af": (("x", "y", "z"), ref.astype(np.float32)),
        },
        coords={"contrast": names, "group": ("contrast", groups), "bval": ("contrast", bval)},
        attrs={"subject": sid, "affine": EVAL_AFF, "targets": ["af"], "labels": ["lesion"] if lesion else []},
    )
    if lesion:
        ds["lesion"] = (("x", "y", "z"), les)
    return ds


def write_pair(tmp_path, n=2, noise=5.0, offset=0.0, lesion=True, uncertainty=False, **kw):
    """A cohort and a prediction store; ``uncertainty``: the error's sd is 4x higher in the
    lesion and varies by voxel, and the prediction holds that sd as ``af_uncertainty``."""
    store, pred = str(tmp_path / "c.zarr"), str(tmp_path / "p.zarr")
    ids = [f"s{i + 1:02d}" for i in range(n)]
    rng = np.random.default_rng(9)
    from mrhscale.stores import CohortStore, PredictionStore

    cstore, pstore = CohortStore(store), PredictionStore(pred)
    cstore.prepare({})
    unc_attrs = {"uncertainty": "af_uncertainty",
                 "model": {"members": 3, "uncertainty": {"calibration": {"factor": 2.0, "fitted_on": "val"}}}}
    pstore.prepare({"variable": "af_virtual", "target": "af", **(unc_attrs if uncertainty else {})})
    for i, sid in enumerate(ids):
        ds = subject(sid, i, lesion=lesion, **kw)
        cstore.put(sid, ds, {"stage": "tests", "index": i})
        sd = (noise * rng.uniform(0.5, 1.5, EVAL_SHAPE) * (1 + 3 * ds["lesion"].values if lesion else 1)
              if uncertainty else noise)
        v = (ds["af"].values + offset + sd * rng.standard_normal(EVAL_SHAPE)) * ds["mask"].values
        out = xr.Dataset({"af_virtual": (("x", "y", "z"), v.astype(np.float32)),
                          "mask": ds["mask"]}, attrs=ds.attrs)
        if uncertainty:
            out["af_uncertainty"] = (("x", "y", "z"), (sd * ds["mask"].values).astype(np.float32))
        pstore.put(sid, out, {"stage": "tests", "source": cstore.identity(sid)["fingerprint"]})
    return store, pred, ids


# ---- importance: a patch store whose target depends on one channel, and a known model
def tiny_store(path, n=400, channels=("a", "b", "c"), seed=0):
    """Patch store (CONTRACTS.md layout) whose target depends on channel 'a' only."""
    from mrhscale.ops.norm import Normalisation

    rng = np.random.default_rng(seed)
    c = len(channels)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    for split in ("train", "val"):
        x = rng.gamma(2.0, 1.0, size=(n, c, 3, 3)).astype(np.float32)
        t = (10.0 * x[:, list(channels).index("a")]).astype(np.float32)
        g = root.create_group(split)
        g.create_array("inputs", data=x, chunks=(64, c, 3, 3),
                       dimension_names=["patch", "contrast", "row", "col"])
        g.create_array("targets", data=t, chunks=(64, 3, 3), dimension_names=["patch", "row", "col"])
        g.create_array("origin", data=np.zeros((n, 4), np.int32), chunks=(64, 4),
                       dimension_names=["patch", "field"])
    root.attrs.update({"format": "mrhscale-patches", "channels": list(channels), "target": "af",
                       "patch": {"half": 1, "size": 3, "axis": "y"},
                       "norm": Normalisation("identity", [0.0] * c, [1.0] * c).to_dict(),
                       "n_train": n, "n_val": n, "complete": True})
    return str(path)


def known_model(path, channels=("a", "b", "c")):
    """Weights built by hand: output = 10 * relu(a + 0.1 b); c unused."""
    import torch

    from mrhscale.io.bundle import save_bundle
    from mrhscale.nn.model import MRHNet
    from mrhscale.ops.norm import Normalisation

    m = MRHNet(len(channels), depth=0, width=4, stains=["af"])
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.conv1.weight[0, 0, 1, 1] = 1.0  # feature 0 <- a
        m.conv1.weight[1, 1, 1, 1] = 1.0  # feature 1 <- b
        m.conv2.weight[0, 0, 1, 1] = 1.0
        m.conv2.weight[0, 1, 1, 1] = 0.1
        m.heads[0].conv4.weight[0, 0, 1, 1] = 1.0
        m.heads[0].conv5.weight[0, 0, 1, 1] = 1.0
    norm = Normalisation("identity", [0.0] * len(channels), [1.0] * len(channels), 0.0, 10.0)
    save_bundle(path, m, channels=list(channels), norm=norm,
                patch={"half": 1, "size": 3, "axis": "y"})
    return str(path)


def synth_store(d, subjects=2, shape=(24, 16, 32), seed=4) -> str:
    """A synthetic phantom cohort ingested into d/c.zarr (local threads, no cluster)."""
    from mrhscale.stages.ingest import ingest
    from mrhscale.synth.phantom import make_cohort

    manifest = make_cohort(str(d / "files"), n_subjects=subjects, shape=shape, seed=seed, quiet=True)
    store = str(d / "c.zarr")
    ingest(manifest, store, ctx=Context(scheduler="threads", quiet=True))
    return store
