"""The report's figures (matplotlib, Agg): evaluation montages, scatter plots, ROC curves,
importance bars and the training curve."""

from __future__ import annotations

import math
import os

import numpy as np

from mrhscale.stores import atomic_write

SPATIAL = ("x", "y", "z")
DPI = 90


def plt_agg():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, **kw) -> None:
    """Lay ``fig`` out (tight) and write it at the report's resolution. The layout is done
    once, here: matplotlib keeps a placeholder layout engine after ``tight_layout``, for
    which ``savefig`` would draw the whole figure an extra time first, to no effect."""
    fig.tight_layout()
    fig.set_layout_engine(None)
    fig.savefig(path, dpi=DPI, **kw)


def _take(vol, axis: int, k: int):
    return np.take(vol, k, axis=axis)


def montage(path, sid, slice_axis, mri_name, mri, ref, virt, mask, lab, target):
    plt = plt_agg()
    ax = SPATIAL.index(slice_axis) if slice_axis in SPATIAL else 1
    counts = mask.sum(axis=tuple(a for a in range(3) if a != ax))
    k = int(np.argmax(counts))
    err = np.where(mask, virt - ref, 0.0)
    vmax = float(np.percentile(ref[mask], 99.5)) if mask.any() else 1.0
    emax = float(np.percentile(np.abs(err[mask]), 99)) if mask.any() else 1.0
    panels = [(f"MRI ({mri_name})", mri, "gray", None, None),
              (f"reference {target}", ref, "magma", 0, vmax),
              (f"virtual {target}", np.where(mask, virt, 0), "magma", 0, vmax),
              ("virtual - reference", err, "RdBu_r", -emax or -1, emax or 1)]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for a, (title, vol, cmap, lo, hi) in zip(axes, panels, strict=True):
        im = a.imshow(_take(vol, ax, k), cmap=cmap, vmin=lo, vmax=hi, origin="lower")
        if lab is not None and title.startswith("reference") and _take(lab, ax, k).any():
            a.contour(_take(lab, ax, k).astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        a.set_title(title, fontsize=9)
        a.axis("off")
        fig.colorbar(im, ax=a, fraction=0.046)
    fig.suptitle(f"{sid}, slice {slice_axis}={k}", fontsize=10)
    _save(fig, path)
    plt.close(fig)
    return path


def uncertainty_montage(path, sid, slice_axis, virt, ref, unc, mask, regions: dict, target):
    """The virtual stain, its absolute error and its 95% half-width (1.96 x uncertainty) on
    one slice (the one with most artefact, else lesion, else brain voxels), the two last
    on one colour scale, labels outlined: does the map flag where it is wrong?"""
    plt = plt_agg()
    ax = SPATIAL.index(slice_axis) if slice_axis in SPATIAL else 1
    other = tuple(a for a in range(3) if a != ax)
    focus = next((regions[n] & mask for n in ("artefact", "lesion") if n in regions and (regions[n] & mask).any()),
                 mask)
    k = int(np.argmax(focus.sum(axis=other)))
    err = np.where(mask, np.abs(virt - ref), 0.0)
    half = np.where(mask, 1.96 * unc, 0.0)
    vmax = float(np.percentile(ref[mask], 99.5)) if mask.any() else 1.0
    emax = float(np.percentile(np.r_[err[mask], half[mask]], 99)) if mask.any() else 1.0
    panels = [(f"virtual {target}", np.where(mask, virt, 0), "magma", vmax),
              ("|virtual - reference|", err, "viridis", emax or 1),
              ("1.96 x uncertainty", half, "viridis", emax or 1)]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    colours = ["cyan", "white", "red", "lime"]
    for a, (title, vol, cmap, hi) in zip(axes, panels, strict=True):
        im = a.imshow(_take(vol, ax, k), cmap=cmap, vmin=0, vmax=hi, origin="lower")
        for lab, c in zip(regions.values(), colours * 4):
            if _take(lab, ax, k).any():
                a.contour(_take(lab, ax, k).astype(float), levels=[0.5], colors=c, linewidths=0.8)
        a.set_title(title, fontsize=9)
        a.axis("off")
        fig.colorbar(im, ax=a, fraction=0.046)
    names = ", ".join(f"{n} ({c})" for n, c in zip(regions, colours * 4) if _take(regions[n], ax, k).any())
    fig.suptitle(f"{sid}, slice {slice_axis}={k}" + (f"; outlined: {names}" if names else ""), fontsize=10)
    _save(fig, path)
    plt.close(fig)
    return path


def retention_plot(path, curves: dict, target):
    """Error-retention curves: MAE of the most confident fraction of voxels, per subject and
    pooled, with the oracle's (ordered by the error itself) dashed; flat = uninformative."""
    plt = plt_agg()
    fig, a = plt.subplots(figsize=(4.8, 3.8))
    for i, (name, c) in enumerate(curves.items()):
        pooled = name == "pooled"
        colour = "k" if pooled else f"C{i % 10}"
        a.plot(c["fractions"], c["mae"], color=colour, lw=2 if pooled else 1,
               label=f"{name}: area {c['area']:.3g} (random {c['random_area']:.3g})")
        if pooled:
            a.plot(c["fractions"], c["oracle_mae"], "k--", lw=0.8, label=f"oracle: {c['oracle_area']:.3g}")
    a.set_xlabel("fraction of voxels kept (most confident first)")
    a.set_ylabel(f"MAE of virtual {target}")
    a.set_title("error retention", fontsize=10)
    a.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)
    return path


def reliability_plot(path, rel: dict, target):
    """Observed coverage of virtual +- z x uncertainty against the nominal level, a line
    per tissue group (all voxels in black), the diagonal dashed: below it, overconfident."""
    plt = plt_agg()
    fig, a = plt.subplots(figsize=(4.6, 4.0))
    levels = rel["levels"]
    a.plot([levels[0], 1], [levels[0], 1], "k--", lw=0.8, label="nominal")
    for i, (name, cov) in enumerate(rel["coverage"].items()):
        colour, lw = ("k", 2) if name == "all" else (f"C{i % 10}", 1)
        a.plot(levels, [math.nan if c is None else c for c in cov], "o-", color=colour, lw=lw, ms=3, label=name)
    a.set_xlabel("nominal level")
    a.set_ylabel("observed coverage")
    a.set_ylim(0, 1.01)
    a.set_title(f"reliability: {target} uncertainty", fontsize=10)
    a.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)
    return path


def scatter(path, pool, target, n_max=20000, xlabel=None):
    plt = plt_agg()
    ref = np.concatenate(pool["ref"]) if pool["ref"] else np.zeros(0)
    names = [n for n in pool if n not in ("ref", "lab")]
    rng = np.random.default_rng(0)
    idx = rng.choice(ref.size, min(ref.size, n_max), replace=False) if ref.size else np.zeros(0, int)
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.2), squeeze=False)
    for a, n in zip(axes[0], names, strict=True):
        v = np.concatenate(pool[n])[idx]
        a.scatter(ref[idx], v, s=2, alpha=0.3, lw=0)
        if n == "virtual" and ref.size:
            lim = [float(min(ref.min(), v.min())), float(max(ref.max(), v.max()))]
            a.plot(lim, lim, "k--", lw=0.8)
        a.set_xlabel(xlabel or f"reference {target}")
        a.set_ylabel(n)
        a.set_title(n, fontsize=9)
    _save(fig, path)
    plt.close(fig)
    return path


def roc_plot(path, rocs, label):
    plt = plt_agg()
    fig, a = plt.subplots(figsize=(4.2, 4))
    for n, r in rocs.items():
        if "fpr" in r:
            sign = "" if r["direction"] == "higher" else " (lower)"
            a.plot(r["fpr"], r["tpr"], label=f"{n}{sign}: AUC {r['auc']:.3f}",
                   lw=2 if n == "virtual" else 1)
    a.plot([0, 1], [0, 1], "k:", lw=0.8)
    a.set_xlabel("1 - specificity")
    a.set_ylabel("sensitivity")
    a.set_title(f"detecting {label}", fontsize=10)
    if a.get_legend_handles_labels()[0]:  # a subject without the lesion has no curve to name
        a.legend(fontsize=7, loc="lower right")
    _save(fig, path)
    plt.close(fig)
    return path


def importance_bars(path: str, res: dict, top: int = 30) -> str:
    plt = plt_agg()
    panels = [("contrast groups", res["groups"])]
    if res["channels"]:
        panels.append((f"channels (top {min(top, len(res['channels']))})", res["channels"][:top]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.5 + 0.28 * max(
        len(p[1]) for p in panels) + 1), squeeze=False)
    for a, (title, rows) in zip(axes[0], panels, strict=True):
        names = [r["name"] for r in rows][::-1]
        vals = [r["increase"] for r in rows][::-1]
        errs = [r["std"] for r in rows][::-1]
        a.barh(names, vals, xerr=errs, color="tab:blue")
        a.set_xlabel("MSE increase when shuffled (stain units$^2$)")
        a.set_title(title, fontsize=10)
        a.tick_params(axis="y", labelsize=7)
    _save(fig, path)
    plt.close(fig)
    return path


def training_curve(out_dir: str, history: list[dict], title: str = "") -> str | None:
    """Training curve PNG (loss per epoch, log scale; validation r on a second panel)."""
    if not history:
        return None
    plt = plt_agg()
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", ms=3, label="train")
    if any(math.isfinite(h["val_loss"]) for h in history):
        a1.plot(ep, [h["val_loss"] for h in history], "s-", ms=3, label="validation")
    a1.set_yscale("log")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    a1.set_title(title or "loss")
    a2.plot(ep, [h["val_r"] for h in history], "s-", ms=3, color="C2")
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation r (centre voxel)")
    a2.set_title("validation correlation")
    path = os.path.join(out_dir, "curve.png")
    atomic_write(path, lambda tmp: _save(fig, tmp, format="png"))
    plt.close(fig)
    return path


def crossval_bars(path: str, rows: list[dict], target: str) -> str:
    """Held-out Pearson r per subject (cross-validation), with the mean as a line."""
    plt = plt_agg()
    names = [r["subject"] for r in rows]
    vals = [r["pearson"] if r["pearson"] is not None else float("nan") for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(rows), 3.2))
    ax.bar(names, vals, color="tab:blue")
    finite = [v for v in vals if math.isfinite(v)]
    if finite:
        ax.axhline(float(np.mean(finite)), color="k", lw=1, ls="--", label=f"mean {np.mean(finite):.3f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_ylim(min(0.0, min(finite, default=0.0)), 1.0)
    ax.set_ylabel("held-out Pearson r")
    ax.set_title(f"virtual {target}: cross-validation", fontsize=10)
    atomic_write(path, lambda tmp: _save(fig, tmp, format="png"))
    plt.close(fig)
    return path
