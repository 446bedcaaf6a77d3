"""Contrast importance by permutation: which MRI contrasts does the network rely on?

For each contrast group (and each channel), the group's channels are shuffled
across the patches of a split (one permutation shared by all channels of the
group, so the correlations inside the group survive and only its link to the
stain is broken), and the increase of the network's mean squared error (raw
stain units, over all PxP outputs) is recorded; mean and std over ``repeats``
permutations. The paper used this to decide which contrasts to acquire.

Groups: the patch store's ``groups`` attr (one name per channel) when present,
else derived from the channel names: ``dwi2000_*`` -> dwi2000, ``dwi5000_*`` ->
dwi5000, ``mt_on``/``mt_off`` -> mt, ``t2`` -> t2, ``name_<n>`` -> name, any
other name is its own group.

Writes ``importance.json``, ``importance.csv``, ``importance.png`` (bar charts)
and ``report.html`` into ``out_dir``.
"""

from __future__ import annotations

import csv
import os
import re

import numpy as np
import torch

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.io.bundle import load_model
from mrhscale.log import progress
from mrhscale.nn.accel import plan, request
from mrhscale.nn.model import MemberMean, StainOutput
from mrhscale.nn.worker import check_device, inference_model, patch_size
from mrhscale.options import ImportanceOptions, PredictOptions
from mrhscale.parallel.context import Context
from mrhscale.report.figures import importance_bars
from mrhscale.report.html import write_report
from mrhscale.report.tables import importance_tables
from mrhscale.results import ImportanceResult
from mrhscale.stages.predict_graph import check_channels
from mrhscale.stores import Folder, Location, PatchStore, resolve, sha256_file, write_json
from mrhscale.stores.legacy import stains_of
from mrhscale.training.stream import subject_tables

_DEFAULT = ImportanceOptions()


def contrast_group(name: str) -> str:
    n = str(name)
    m = re.match(r"^(dwi\d+)", n, re.IGNORECASE)
    if m:
        return m.group(1).lower()
    if n.lower() in ("mt_on", "mt_off", "mton", "mtoff"):
        return "mt"
    m = re.match(r"^(.+?)_(?:b0_)?(?:dir)?\d+$", n)
    return m.group(1) if m else n


def channel_groups(channels: list[str], groups: list[str] | None = None) -> dict[str, list[int]]:
    """{group name: channel indices} in first-appearance order."""
    if groups is not None and len(groups) != len(channels):
        raise MRHError(f"groups: {len(groups)} names for {len(channels)} channels")
    names = groups if groups is not None else [contrast_group(c) for c in channels]
    out: dict[str, list[int]] = {}
    for i, g in enumerate(names):
        out.setdefault(str(g), []).append(i)
    return out


def _open_split(loc: Location, split: str):
    store = PatchStore.open(loc)
    x, t = store.split(split)
    if x.shape[0] == 0:
        raise MRHError(f"{store.name}: split {split!r} holds no patches; use --split train")
    return store.attrs, x, t


def importance(model_path: str, patches_url: str, out_dir: str, *, split: str = _DEFAULT.split,
               repeats: int = _DEFAULT.repeats, seed: int = _DEFAULT.seed, max_patches: int = _DEFAULT.max_patches,
               stain: str | None = _DEFAULT.stain, options: PredictOptions | None = None,
               ctx: Context | None = None) -> ImportanceResult:
    """Permutation importance of each contrast group and channel; writes a report.
    ``stain``: for a network of several stains, the head scored (default: its first stain
    the patch store has); patches without that stain are left out. ``options``: the batch
    and numerics (docs/precision.md; recorded in the provenance); ``ctx``: the device,
    storage options and quiet (it runs in this process)."""
    ctx, options = ctx or Context(), options or PredictOptions()
    model_path, patches_url = resolve(model_path, "model"), resolve(patches_url)
    folder = Folder(out_dir, "mrhscale-importance")
    folder.check()  # refused before any work, not after it
    if repeats < 1:
        raise MRHError(f"--repeats must be >= 1, got {repeats}")
    if max_patches < 2:
        raise MRHError(f"--max-patches must be >= 2, got {max_patches}")
    numerics, device = request(options.numerics), check_device(ctx.device)
    model, meta = load_model(model_path, device=device, ensemble=True)
    if meta["members"] > 1:  # an ensemble's map is its members' mean: shuffle what drives that
        model = MemberMean(model)
    patches = ctx.location(patches_url)
    attrs, xa, ta = _open_split(patches, split)
    sel = _check_model_and_store(model_path, meta, patches_url, attrs, xa)
    stain, k_model, k_store = _stain(stain, meta, attrs, model_path, patches_url)
    model = StainOutput(model, k_model)
    rng = np.random.default_rng(seed)
    x, t = _sample(xa, ta, sel, _row_norms(meta["norm"], patches, attrs, split, sel),
                   rng, max_patches, k_store)
    gmap = channel_groups(list(meta["channels"]), _groups(attrs, sel))
    n_forward = len(x) * (1 + repeats * (len(gmap) + len(sel)))
    batch_size = options.batch_size
    runner = inference_model(model, meta, plan(numerics, device, n_forward), device, min(batch_size, len(x)))
    runner.warm_up(strict=numerics.compile == "on")
    scorer = _Scorer(runner, meta["norm"].stain(k_model), t, batch_size, device)
    rows, base = _permute_all(scorer, x, gmap, list(meta["channels"]), repeats, rng, ctx.quiet)
    res = {
        "baseline_mse": base, "groups": rows["group"], "channels": rows["channel"],
        "n_patches": int(len(x)), "split": split, "repeats": int(repeats), "target": stain,
        "provenance": {"stage": "importance", "mrhscale": __version__, "model": os.path.abspath(model_path),
                       "model_sha256": sha256_file(model_path), "patches": str(patches_url), "seed": seed,
                       "max_patches": max_patches, "numerics": runner.accel.record()},
        "out_dir": folder.path, "figures": ["importance.png"],
    }
    with folder.replace(target=stain, model=res["provenance"]["model_sha256"]) as work:
        _write_outputs(work, res)
    return ImportanceResult(**res)


def _check_model_and_store(model_path, meta: dict, patches_url, attrs: dict, xa) -> list[int]:
    """The model's stain, channels and patch size must be the store's; returns the store
    indices of the model's channels, in the model's order."""
    if not set(stains_of(attrs)) & set(stains_of(meta)):
        raise MRHError(f"{patches_url}: patches of {', '.join(stains_of(attrs))}, but model {model_path} "
                       f"predicts {', '.join(stains_of(meta))}; give the patch store of one of the model's stains")
    store_ch = [str(c) for c in attrs["channels"]]
    channels = list(meta["channels"])
    check_channels(channels, store_ch, f"{patches_url}")
    p_store = int(xa.shape[-1])
    p_model = patch_size(meta)
    if p_store != p_model:
        raise MRHError(f"{patches_url}: patches are {p_store}x{p_store}, the model was trained on "
                       f"{p_model}x{p_model}")
    return [store_ch.index(c) for c in channels]


def _stain(stain, meta: dict, attrs: dict, model_path, patches_url) -> tuple[str, int, int]:
    """The stain scored, its head in the model and its place in the store's targets."""
    m, s = stains_of(meta), stains_of(attrs)
    stain = stain or next(t for t in m if t in s)
    if stain not in m or stain not in s:
        raise MRHError(f"--stain {stain}: model {model_path} predicts {', '.join(m)} and {patches_url} "
                       f"holds {', '.join(s)}; give a stain of both")
    return stain, m.index(stain), s.index(stain)


def _row_norms(norm, loc: Location, attrs: dict, split: str, sel: list[int]):
    """``normalise(x, rows)``: the model's normalisation of store rows, per subject where it is."""
    if not norm.per_subject:
        return lambda x, idx: norm.apply_inputs(x, channel_axis=1)
    off, inv = subject_tables(norm, {**attrs, "subject_norm": _stats_of(attrs, sel, loc.url)}, loc.url)
    origin = PatchStore.open(loc).root()[f"{split}/origin"]

    def normalise(x, idx):
        who = np.asarray(origin.get_orthogonal_selection((idx, 0)))
        return (x - off[who][:, :, None, None]) * inv[who][:, :, None, None]
    return normalise


def _stats_of(attrs: dict, sel: list[int], url: str) -> dict:
    """The store's per-subject statistics restricted to the model's channels, in its order."""
    stats = attrs.get("subject_norm") or {}
    return {sid: {m: {k: [v[k][i] for i in sel] for k in ("offset", "scale")}
                  for m, v in st.items() if isinstance(v, dict)} for sid, st in stats.items()}


def _sample(xa, ta, sel: list[int], normalise, rng, max_patches: int, k_store: int = 0):
    """A random subset of the split: normalised inputs (model's channels) and raw targets
    (of store stain ``k_store``; patches without it are left out)."""
    n_all = int(xa.shape[0])
    idx = np.sort(rng.choice(n_all, min(n_all, max_patches), replace=False))
    t = np.asarray(ta.get_orthogonal_selection((idx,)), np.float64)[:, k_store]
    keep = ~np.isnan(t).any(axis=(1, 2))
    if keep.sum() < 2:
        raise MRHError("importance: fewer than 2 sampled patches have the stain; raise --max-patches")
    idx, t = idx[keep], t[keep]
    x = np.asarray(xa.get_orthogonal_selection((idx,)), np.float32)[:, sel]
    x = normalise(x, idx).astype(np.float32, copy=False)
    np.nan_to_num(x, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return x, t


def _groups(attrs: dict, sel: list[int]):
    """Group names per model channel: the store's ``groups`` attr, else None (from the names)."""
    if attrs.get("groups"):
        g_attr = [str(g) for g in attrs["groups"]]
        return [g_attr[i] for i in sel] if len(g_attr) == len(attrs["channels"]) else None
    return None


class _Scorer:
    """The network's mean squared error (raw stain units, all PxP outputs) on patches."""

    def __init__(self, model, norm, targets: np.ndarray, batch_size: int, device: str):
        self.model, self.norm, self.t, self.bs, self.device = model, norm, targets, batch_size, device

    def __call__(self, x: np.ndarray) -> float:
        tot = 0.0
        with torch.inference_mode():
            for a in range(0, len(x), self.bs):
                y = self.model(torch.from_numpy(x[a : a + self.bs]).to(self.device)).double().cpu().numpy()
                tot += float(((self.norm.invert_target(y) - self.t[a : a + self.bs]) ** 2).sum())
        return tot / self.t.size


def _permute_all(scorer, x, gmap: dict, channels: list[str], repeats: int, rng, quiet: bool):
    """MSE increase when each group (then each channel) is shuffled across patches."""
    base = scorer(x)
    units = [("group", g, ix) for g, ix in gmap.items()] + [("channel", c, [i]) for i, c in enumerate(channels)]
    rows: dict[str, list[dict]] = {"group": [], "channel": []}
    with progress(total=len(units) * repeats, desc="importance", unit="perm", quiet=quiet) as bar:
        for kind, name, ix in units:
            vals = _permute(scorer, x, ix, repeats, rng, base, bar)
            rows[kind].append({"name": name, "channels": [channels[i] for i in ix],
                               "increase": float(np.mean(vals)), "std": float(np.std(vals)),
                               "relative": float(np.mean(vals) / base) if base > 0 else float("nan")})
    for kind in rows:
        rows[kind].sort(key=lambda r: -r["increase"])
        for k, r in enumerate(rows[kind]):
            r["rank"] = k + 1
    return rows, base


def _permute(scorer, x, ix, repeats: int, rng, base: float, bar) -> list[float]:
    """One permutation shared by the unit's channels (their correlations survive), repeated."""
    vals = []
    saved = x[:, ix].copy()
    for _ in range(repeats):
        x[:, ix] = saved[rng.permutation(len(x))]
        vals.append(scorer(x) - base)
        bar.update(1)
    x[:, ix] = saved
    return vals


def _write_outputs(out_dir: str, res: dict) -> None:
    write_json(os.path.join(out_dir, "importance.json"), res)
    with open(os.path.join(out_dir, "importance.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "rank", "name", "n_channels", "mse_increase", "std", "relative"])
        for kind in ("groups", "channels"):
            for r in res[kind]:
                w.writerow([kind[:-1], r["rank"], r["name"], len(r["channels"]),
                            f"{r['increase']:.6g}", f"{r['std']:.6g}", f"{r['relative']:.6g}"])
    fig = importance_bars(os.path.join(out_dir, "importance.png"), res)
    write_report(out_dir, importance_tables(res), [(fig, "permutation importance: groups and channels")],
                 f"mrhscale contrast importance: {res['target']}")
