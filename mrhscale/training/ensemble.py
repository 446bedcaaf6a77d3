"""``train --members K``: a deep ensemble, K networks from different seeds (so different
initial weights and data orders), each an ordinary training run in ``OUT/members/mNN``
(its own checkpoints: an interrupted ensemble resumes inside the member it was in, and
finished members are kept), then one bundle holding all K and the calibration of their
spread, fitted on the validation split.

Members train one after another, each on every process of the run (DDP under torchrun),
so a member takes as long as a single network and the ensemble K times as long.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import asdict, replace

import numpy as np
import torch
from scipy import stats

from mrhscale.errors import MRHError
from mrhscale.io.bundle import ensemble_bundle, predictor_from_bundle, read_bundle, write_bundle
from mrhscale.log import logger, note
from mrhscale.nn.model import mean_and_spread
from mrhscale.nn.ood import InputDistance
from mrhscale.ops.norm import Normalisation
from mrhscale.ops.uncertainty import Z95, fit_calibration, fit_ood_power, widened
from mrhscale.results import TrainResult
from mrhscale.stores import Folder, write_text
from mrhscale.stores.legacy import stains_of
from mrhscale.stores.patches import identity as store_identity
from mrhscale.training.checkpoint import load_checkpoint
from mrhscale.training.config import CHECKPOINT, TrainConfig, calibration_groups
from mrhscale.training.data import open_data
from mrhscale.training.distributed import barrier, dist_env, init_distributed
from mrhscale.training.loop import Runtime, Trainer

MEMBERS_DIR = "members"
CALIBRATION_PATCHES = 200_000  # a fixed random subset of a larger validation split (the store is shuffled)


def member_dir(out_dir: str, k: int) -> str:
    return os.path.join(out_dir, MEMBERS_DIR, f"m{k:02d}")


def member_config(cfg: TrainConfig, k: int) -> TrainConfig:
    """Member k: the ensemble's settings with seed + k (its own init and data order)."""
    return replace(cfg, seed=cfg.seed + k, members=1)


def train_ensemble(cfg: TrainConfig, out_dir: str, rt, *, store: dict, build_model, stream_norm,
                   bundle_norm, resume: bool) -> TrainResult:
    """Train (or finish) every member, then write ``OUT/model.pt`` with all of them."""
    rank, world, local_rank = dist_env()
    started = init_distributed(world, local_rank, rt.timeout_s())
    try:
        if rank == 0 and not resume:
            Folder(out_dir, "mrhscale-run").mark(kind=cfg.kind, members=cfg.members,
                                                 patch_store=store_identity(store))
            write_text(os.path.join(out_dir, "config.json"), json.dumps({**asdict(cfg), "world_size": world},
                                                                        indent=1))
        results = []
        for k in range(cfg.members):
            mdir = member_dir(out_dir, k)
            done = _finished(mdir, member_config(cfg, k))
            if done is not None:
                results.append(done)
                continue
            note(f"ensemble member {k + 1}/{cfg.members} (seed {cfg.seed + k})", rt.quiet or rank != 0)
            again = os.path.exists(os.path.join(mdir, "checkpoints", CHECKPOINT))
            results.append(Trainer(member_config(cfg, k), mdir, rt, store=store, build_model=build_model,
                                   stream_norm=stream_norm, bundle_norm=bundle_norm).run(again))
        summary = _assemble(cfg, out_dir, rt, store, stream_norm, results) if rank == 0 else {}
        barrier()
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return _result(cfg, out_dir, results, summary, world)


def _finished(mdir: str, cfg: TrainConfig) -> TrainResult | None:
    """A member that finished all ``cfg.epochs`` earlier: its summary, from its checkpoint;
    None for one to train or resume."""
    ckpt = os.path.join(mdir, "checkpoints", CHECKPOINT)
    if not (os.path.exists(os.path.join(mdir, "model.pt")) and os.path.exists(ckpt)):
        return None
    ck = load_checkpoint(ckpt)
    if int(ck["epoch"]) < cfg.epochs:
        return None
    if ck.get("config", {}).get("seed") != cfg.seed:
        raise MRHError(f"{mdir}: holds a member of another run (seed {ck.get('config', {}).get('seed')}, "
                       f"expected {cfg.seed}); choose another --out")
    h = list(ck["history"])
    return TrainResult(out_dir=mdir, model=os.path.join(mdir, "model.pt"), checkpoint=mdir, history=h,
                       config=ck["config"], epochs=cfg.epochs, final=h[-1] if h else {},
                       best_val_loss=min((r["val_loss"] for r in h), default=math.nan),
                       world_size=int(ck.get("world_size", 1)), replica_max_abs_diff=0.0)


def _assemble(cfg, out_dir, rt, store, stream_norm, results) -> dict:
    """Rank 0: the members' bundles as one, with the spread calibrated on the validation split."""
    bundles = [read_bundle(r.model) for r in results]
    bundle = ensemble_bundle(bundles, {}, bundles[0]["provenance"])
    dev = torch.device(rt.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cal = calibrate(predictor_from_bundle(bundle).to(dev).eval(), cfg, store, stream_norm, dev, rt, bundle.get("ood"))
    uncertainty = {"method": "ensemble", "members": cfg.members, "seeds": [cfg.seed + k for k in range(cfg.members)],
                   "spread": "standard deviation over members (ddof 1) pooled over the output patch, target units",
                   "calibration": cal}
    prov = {**bundle["provenance"], "config": asdict(cfg),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "final_metrics": {k: cal[k] for k in ("val_r", "val_rmse") if k in cal},
            "members": [{"seed": cfg.seed + k, "final": r.final} for k, r in enumerate(results)]}
    bundle.update(uncertainty=uncertainty, provenance=json.loads(json.dumps(prov, default=str)))
    write_bundle(os.path.join(out_dir, "model.pt"), bundle)
    summary = {"uncertainty": uncertainty, "members": prov["members"]}
    write_text(os.path.join(out_dir, "metrics.json"), json.dumps(summary, indent=1, default=float))
    _say(cal, cfg.members, rt.quiet)
    return summary


@torch.no_grad()
def calibrate(ensemble, cfg: TrainConfig, store: dict, stream_norm, dev, rt: Runtime, ood: dict | None = None) -> dict:
    """The members on (up to CALIBRATION_PATCHES of) the validation split, at each patch's
    centre: the mean's r and RMSE, and the conformal factor(s) that make mean +- 1.96 x
    factor x spread (the spread as predict computes it) cover 95% (``ops.uncertainty.
    fit_calibration``), the spread first widened by the out-of-distribution score (``ood``:
    the bundle's record) where that narrows them. No validation split: factor 1, and a warning."""
    if int(store.get("n_val", 0)) == 0:
        logger.warning("mrhscale: the patch store has no validation split; the ensemble's uncertainty is "
                       "its raw spread (uncalibrated): make patches with --val-subjects to calibrate it")
        return {"factor": [1.0] * len(stains_of(store)), "fitted_on": None, "stains": {}}
    half = int(store["patch"]["half"])
    data = open_data(cfg, rt, "val", 1024, dev, norm=stream_norm)
    mean, spread, target, dist = [], [], [], []
    stains = stains_of(store)
    score = InputDistance.from_record(ood).to(dev) if ood else None
    for x, t in data.batches(0):
        m, s = mean_and_spread(ensemble(x), len(stains))
        if score is not None:
            dist.append(score(x)[:, 0, half, half].cpu().numpy())
        mean.append(m[..., half, half].cpu().numpy())
        spread.append(s[..., half, half].cpu().numpy())
        target.append(t[..., half, half].float().cpu().numpy())
        if sum(map(len, mean)) >= CALIBRATION_PATCHES:
            break
    mean, spread, target = (np.concatenate(a).astype(np.float64) for a in (mean, spread, target))
    off, scale = Normalisation.from_dict(store["norm"]).target_arrays(np.float64)
    groups, held_out = calibration_groups(cfg.calibration_groups, False), _held_out(store)
    dist = np.concatenate(dist).astype(np.float64) if dist else None
    fits = [fit_stain(mean[ok, k] * scale[k] + off[k], spread[ok, k] * scale[k], target[ok, k] * scale[k] + off[k],
                      groups, held_out=held_out, ood=None if dist is None else dist[ok])
            for k in range(len(stains)) for ok in [~np.isnan(target[:, k])]]
    return calibration_record(stains, fits, "val")


def calibration_record(stains: list[str], fits: list[dict], fitted_on: str) -> dict:
    """The bundle's ``uncertainty.calibration``: the factors on top, each stain's fit in ``stains``."""
    return {"factor": [f["factor"] for f in fits], "fitted_on": fitted_on, "n": max(f["n"] for f in fits),
            "val_r": float(np.nanmean([f["val_r"] for f in fits])),
            "val_rmse": float(np.nanmean([f.get("val_rmse", math.nan) for f in fits])),
            "stains": dict(zip(stains, fits, strict=True))}


def _held_out(store: dict) -> bool:
    held_out = store.get("val_mode") == "subject" or bool(store.get("val_subjects"))
    if not held_out:
        logger.warning("mrhscale: the validation split holds patches of the training brains, so the "
                       "calibration is fitted on data like the training data: intervals on a new brain "
                       "will be too narrow; make patches with --val-subjects to hold a brain out")
    return held_out


def fit_stain(virt, unc, ref, groups, *, held_out: bool, labels=None, fitted_on: str = "val", ood=None) -> dict:
    """One stain's calibration (stain units; ``unc``: the raw uncertainty) and how the
    uncertainty ranks its errors; with ``ood`` (the out-of-distribution score of the same
    samples) the uncertainty is first widened by the score's best power (``fit_ood_power``)."""
    if not len(virt):
        return {"factor": 1.0, "fitted_on": None, "n": 0, "val_r": math.nan}
    widen = {"mean_spread": float(np.mean(unc))}
    if ood is not None:
        fit = fit_ood_power(virt, unc, ref, ood, groups, labels)
        widen = {"ood_power": fit["power"], "ood_power_widths": fit["widths"]}
        unc = widened(unc, ood, fit["power"])
    err = virt - ref
    r = float(np.corrcoef(virt, ref)[0, 1]) if np.ptp(virt) > 0 and np.ptp(ref) > 0 else math.nan
    rho = stats.spearmanr(unc, np.abs(err)).statistic if np.ptp(unc) > 0 else math.nan
    return {**fit_calibration(virt, unc, ref, groups, labels), "fitted_on": fitted_on, "held_out_subjects": held_out,
            "quantile": 0.95, "spearman_abs_error": float(rho), "val_r": r,
            "val_rmse": float(np.sqrt((err ** 2).mean())), **widen}


def _say(cal: dict, k: int, quiet: bool) -> None:
    for stain, c in (cal.get("stains") or {}).items():
        if c.get("fitted_on"):
            _say_stain(c, k, quiet, stain)


def _say_stain(cal: dict, k: int, quiet: bool, stain: str) -> None:
    where = "validation patches" if cal.get("fitted_on") == "val" else "voxels of the calibration brains"
    groups = cal.get("groups")
    per = f"; per {groups['by']} group x {', '.join(f'{f:.3g}' for f in groups['factor'])}" if groups else ""
    note(f"ensemble of {k} ({stain}): val r {cal['val_r']:.3f}, rmse {cal['val_rmse']:.4g}; uncertainty x "
         f"{cal['factor']:.3g} covers 95% of {cal['n']} {where} (raw covered {cal['coverage_before']:.1%} "
         f"within {Z95:.2f} sd){per}; Spearman(uncertainty, |error|) {cal['spearman_abs_error']:.3f}", quiet)


def _result(cfg, out_dir, results, summary, world) -> TrainResult:
    cal = (summary.get("uncertainty") or {}).get("calibration") or {}
    finals = [r.final for r in results]
    final = {k: float(np.mean([f[k] for f in finals if k in f])) for k in ("train_loss", "val_loss")
             if any(k in f for f in finals)}
    final.update({k: cal[k] for k in ("val_r", "val_rmse") if k in cal})
    return TrainResult(out_dir=out_dir, model=os.path.join(out_dir, "model.pt"),
                       checkpoint=os.path.join(out_dir, MEMBERS_DIR), history=results[0].history,
                       config=asdict(cfg), epochs=cfg.epochs, final=final,
                       best_val_loss=min(r.best_val_loss for r in results), world_size=world,
                       replica_max_abs_diff=max(r.replica_max_abs_diff for r in results),
                       members=[r.final for r in results], uncertainty=summary.get("uncertainty"))
