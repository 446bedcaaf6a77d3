"""Issue 31's table on a finished demo folder (``mrhscale demo --out DEMO``): the held-out
brain's uncertainty under each calibration, before and after.

Variants, each predicted on the held-out brain and scored against its reference:
``main`` (the demo's own prediction), then the same members recalibrated (conformal on the
validation patches; on the whole validation brain with value bins; with tissue labels),
then the members with an aleatoric head fitted on each member's frozen backbone (the head
and loss ``--aleatoric`` trains, on ``--head-patches`` training patches: the head sees the
backbone's features detached, so the map is the members' map exactly) and calibrated on the
whole validation brain. ``--resume`` keeps the variants already in ``OUT/results.json``.

    python benchmarks/measure_uncertainty.py DEMO OUT [--head-epochs 3] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from scipy import stats

from mrhscale.io.bundle import model_from_bundle, predictor_from_bundle, read_bundle, write_bundle
from mrhscale.nn.model import MRHNet
from mrhscale.ops.uncertainty import Z95
from mrhscale.parallel.context import Context
from mrhscale.stages.calibrate import calibration_on_brains
from mrhscale.stages.predict import predict
from mrhscale.stores.cohort import CohortStore
from mrhscale.stores.predictions import PredictionStore
from mrhscale.training.api import input_normalisation
from mrhscale.training.config import TrainConfig
from mrhscale.training.data import open_data, read_patch_store_attrs
from mrhscale.training.ensemble import calibrate
from mrhscale.training.loop import Runtime
from mrhscale.training.optim import init_weights, scale_loss_function


def scores(pred: str, cohort: str, sid: str, stains: list[str]) -> dict:
    """Per stain: r, Spearman(uncertainty, |error|), 95% coverage overall and per tissue,
    artefact mean uncertainty / rest, mean interval half-width."""
    ds = CohortStore.open(cohort).open_subject(sid)
    p = PredictionStore.open(pred).open_subject(sid)
    xyz = ("x", "y", "z")
    mask = ds["mask"].transpose(*xyz).values.astype(bool)
    lab = {n: ds[n].transpose(*xyz).values.astype(bool) for n in ("wm", "lesion", "artefact") if n in ds}
    tissue = {"wm": lab["wm"] & ~lab["lesion"], "gm": ~lab["wm"] & ~lab["lesion"], "lesion": lab["lesion"]}
    out = {}
    for t in stains:
        ref = ds[t].transpose(*xyz).values.astype(np.float64)
        virt = p[f"{t}_virtual"].transpose(*xyz).values.astype(np.float64)
        unc = p[f"{t}_uncertainty"].transpose(*xyz).values.astype(np.float64)
        m = mask & np.isfinite(ref) & np.isfinite(unc)
        err = np.abs(virt - ref)
        cov = err <= Z95 * unc
        row = {"r": float(np.corrcoef(virt[m], ref[m])[0, 1]),
               "spearman": float(stats.spearmanr(unc[m], err[m]).statistic),
               "coverage": float(cov[m].mean()), "half_width": float(Z95 * unc[m].mean())}
        for name, tis in tissue.items():
            row[f"coverage_{name}"] = float(cov[m & tis].mean()) if (m & tis).any() else None
        row["coverage_artefact"] = float(cov[m & lab["artefact"]].mean())
        row["artefact_ratio"] = float(unc[m & lab["artefact"]].mean() / unc[m & ~lab["artefact"]].mean())
        out[t] = row
    return out


def with_calibration(bundle: dict, cal: dict) -> dict:
    return {**bundle, "uncertainty": {**bundle["uncertainty"], "calibration": cal}}


def fit_scale_heads(bundle: dict, cfg: TrainConfig, store: dict, epochs: int, max_patches: int) -> dict:
    """Each member with a scale head per stain fitted on its frozen backbone's features of
    (up to ``max_patches`` of) the training split."""
    rt, dev = Runtime(quiet=True, cache="off"), torch.device("cpu")
    norm = input_normalisation(cfg.norm, store, cfg.patches)
    states = [bundle["state_dict"], *bundle["member_state_dicts"]]
    new = []
    for k, state in enumerate(states):
        torch.manual_seed(cfg.seed + k)
        net = model_from_bundle(bundle, state).eval()
        al = MRHNet(net.in_channels, net.depth, net.width, net.stains, aleatoric=True)
        al.load_state_dict(net.state_dict(), strict=False)
        init_weights([m for s in al.scales for m in (s.conv4, s.conv5)], cfg.init)
        feats, means, targets = [], [], []
        with torch.no_grad():
            for x, t in open_data(cfg, rt, "train", 1024, dev, norm=norm if norm.per_subject else None).batches(0):
                f = net.backbone(x)
                feats.append(f)
                means.append(torch.cat([h(f) for h in net.heads], 1))
                targets.append(t.float())
                if sum(map(len, feats)) >= max_patches:
                    break
        f, mu, t = torch.cat(feats), torch.cat(means), torch.cat(targets)
        opt = torch.optim.AdamW([p for s in al.scales for p in s.parameters()], lr=2e-3)
        loss_fn = scale_loss_function()
        g = torch.Generator().manual_seed(k)
        for epoch in range(epochs):
            order, total = torch.randperm(len(f), generator=g), 0.0
            for a in range(0, len(f), 256):
                i = order[a:a + 256]
                log_b = torch.cat([s(f[i]) for s in al.scales], 1)
                loss = loss_fn(mu[i], log_b, t[i])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                total += float(loss.detach()) * len(i)
            print(f"member {k} scale head epoch {epoch + 1}: nll {total / len(f):.4f}", flush=True)
        new.append({n: v.detach().clone() for n, v in al.state_dict().items()})
    return {**bundle, "arch": {**bundle["arch"], "aleatoric": True}, "state_dict": new[0],
            "member_state_dicts": new[1:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("demo")
    ap.add_argument("out")
    ap.add_argument("--head-epochs", type=int, default=4)
    ap.add_argument("--head-patches", type=int, default=16384, help="training patches per member for the head")
    ap.add_argument("--resume", action="store_true", help="keep OUT/results.json's variants, run the rest")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    summary = json.load(open(os.path.join(a.demo, "summary.json")))
    sid, val = summary["held_out"], summary["val_subject"]
    cohort = os.path.join(a.demo, "cohort.zarr")
    bundle = read_bundle(os.path.join(a.demo, "run", "model.pt"))
    saved = json.load(open(os.path.join(a.demo, "run", "config.json")))
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    store = read_patch_store_attrs(cfg.patches)
    stains = list(bundle["stains"])
    done = json.load(open(os.path.join(a.out, "results.json"))) if a.resume else {"results": {}, "timing": {}}
    results, timing = done["results"], done["timing"]
    results.setdefault("main", scores(os.path.join(a.demo, "pred.zarr"), cohort, sid, stains))

    def run(name: str, b) -> None:
        if name in results:
            return
        b = b()
        path = write_bundle(os.path.join(a.out, f"{name}.pt"), b)
        t0 = time.perf_counter()
        predict(path, cohort, os.path.join(a.out, f"{name}.zarr"), subjects=[sid], overwrite=True,
                ctx=Context(scheduler="synchronous", quiet=True))
        timing[f"predict_{name}"] = time.perf_counter() - t0
        results[name] = scores(os.path.join(a.out, f"{name}.zarr"), cohort, sid, stains)
        print(name, json.dumps(results[name]), flush=True)
        json.dump({"results": results, "timing": timing}, open(os.path.join(a.out, "results.json"), "w"), indent=1)

    def brains(b: dict, groups: str) -> dict:
        return with_calibration(b, calibration_on_brains(b, [val], groups, cohort))

    rt, dev = Runtime(quiet=True, cache="off"), torch.device("cpu")
    norm = input_normalisation(cfg.norm, store, cfg.patches)
    sn = norm if norm.per_subject else None
    c = TrainConfig(**{**cfg.__dict__, "calibration_groups": "none"})
    run("conformal_patches",
        lambda: with_calibration(bundle, calibrate(predictor_from_bundle(bundle).eval(), c, store, sn, dev, rt)))
    run("brain_value4", lambda: brains(bundle, "value:4"))
    run("brain_wm_lesion", lambda: brains(bundle, "wm,lesion"))
    t0 = time.perf_counter()
    al = fit_scale_heads(bundle, cfg, store, a.head_epochs, a.head_patches)
    timing["scale_heads"] = time.perf_counter() - t0
    run("aleatoric_brain_value4", lambda: brains(al, "value:4"))
    run("aleatoric_brain_wm_lesion", lambda: brains(al, "wm,lesion"))


if __name__ == "__main__":
    main()
