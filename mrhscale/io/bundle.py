"""Model bundles: weights plus everything inference needs, in one file.

A bundle is a ``torch.save`` of plain types only (loadable with
``weights_only=True``): no pickled classes, so a bundle from an untrusted
source cannot run code.

A deep ensemble (``train --members K``, format version 2) keeps member 0 as
``state_dict`` (so anything that needs one network, e.g. ``finetune``, has one) and
members 1..K-1 in ``member_state_dicts``; ``uncertainty`` records how its spread is
turned into a calibrated standard deviation. Single-network bundles stay version 1.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from mrhscale.errors import MRHError
from mrhscale.io.card import input_scaling, model_card
from mrhscale.nn.model import MRHEnsemble, MRHNet
from mrhscale.ops.norm import Normalisation
from mrhscale.ops.stains import stain_record
from mrhscale.stores import atomic_write
from mrhscale.stores.legacy import calibration_of, head_state, stains_of

FORMAT = "mrhscale-model"
FORMAT_VERSION = 2  # 2: deep ensembles; a single network is still written as 1


def make_bundle(
    model: MRHNet,
    *,
    channels: list[str],
    norm: Normalisation,
    patch: dict,
    provenance: dict | None = None,
    ood: dict | None = None,
) -> dict[str, Any]:
    """A single network's bundle: its weights, inputs, normalisation and stains (the model's);
    ``ood``: the out-of-distribution score fitted on its training patches (``ops.ood``)."""
    if len(channels) != model.in_channels:
        raise MRHError(f"bundle: {len(channels)} channel names for a model with {model.in_channels} inputs")
    if norm.n_channels != model.in_channels:
        raise MRHError(f"bundle: normalisation has {norm.n_channels} channels, model {model.in_channels}")
    if norm.n_stains != model.n_stains:
        raise MRHError(f"bundle: normalisation has target statistics of {norm.n_stains} stains, "
                       f"the model {model.n_stains} heads")
    bundle = {
        "format": FORMAT,
        "format_version": 1,
        "arch": {"name": "MRHNet", **model.config},
        "state_dict": _state(model),
        "channels": [str(c) for c in channels],
        "norm": norm.to_dict(),
        **stain_record(model.stains),
        "patch": dict(patch),
        "provenance": dict(provenance or {}),
        **({"ood": dict(ood)} if ood else {}),
    }
    return bundle


SHARED = ("arch", "channels", "norm", "stains", "patch")  # what every member of an ensemble must agree on


def ensemble_bundle(members: list[dict[str, Any]], uncertainty: dict, provenance: dict) -> dict[str, Any]:
    """One bundle of K member bundles (the first keeps its place as ``state_dict``)."""
    first = members[0]
    for k, b in enumerate(members[1:], 1):
        bad = [key for key in SHARED if b.get(key) != first.get(key)]
        if bad:
            raise MRHError(f"ensemble: member {k} differs from member 0 in {', '.join(bad)}")
    return {**first, "format_version": 2, "member_state_dicts": [b["state_dict"] for b in members[1:]],
            "uncertainty": dict(uncertainty), "provenance": dict(provenance)}


def write_bundle(path: str | os.PathLike, bundle: dict[str, Any]) -> str:
    """Write a bundle atomically with its model card made now (``card``: plain types, so
    readers from before cards load it unchanged)."""
    bundle = {**bundle, "card": model_card(bundle)}
    return atomic_write(os.fspath(path), lambda tmp: torch.save(bundle, tmp))


def _state(model: MRHNet) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def n_members(b: dict[str, Any]) -> int:
    """How many networks a bundle (or its metadata) holds: 1, or K for an ensemble."""
    return 1 + len(b.get("member_state_dicts") or ()) if "member_state_dicts" in b else int(b.get("members", 1))


def save_bundle(path: str | os.PathLike, model: MRHNet, **meta) -> str:
    """Write a bundle atomically (write aside, then rename)."""
    return write_bundle(path, make_bundle(model, **meta))


def read_bundle(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MRHError(f"{path}: model bundle not found")
    try:
        b = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MRHError(f"{path}: not a readable mrhscale model bundle ({type(e).__name__}: {e})") from None
    if not isinstance(b, dict) or b.get("format") != FORMAT:
        raise MRHError(f"{path}: not an mrhscale model bundle (format tag missing)")
    if b.get("format_version", 0) > FORMAT_VERSION:
        raise MRHError(f"{path}: bundle format {b['format_version']} is newer than this mrhscale understands")
    return b


def model_from_bundle(b: dict[str, Any], state: dict | None = None) -> MRHNet:
    """The bundle's network (member 0 of an ensemble), or its architecture with ``state``."""
    arch = b["arch"]
    model = MRHNet(arch["in_channels"], arch["depth"], arch.get("width", 64), stains=stains_of(b),
                   aleatoric=bool(arch.get("aleatoric", False)))  # bundles before the scale head: none
    model.load_state_dict(head_state(b["state_dict"] if state is None else state))
    return model


def predictor_from_bundle(b: dict[str, Any]) -> MRHNet | MRHEnsemble:
    """What predicts with a bundle: its network, or all members of an ensemble side by side."""
    if not b.get("member_state_dicts"):
        return model_from_bundle(b)
    return MRHEnsemble([model_from_bundle(b), *(model_from_bundle(b, s) for s in b["member_state_dicts"])])


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               ensemble: bool = False) -> tuple[MRHNet | MRHEnsemble, dict[str, Any]]:
    """Model (eval mode, on ``device``) and its metadata (everything but the weights);
    ``ensemble``: every member of an ensemble bundle (else member 0). ``meta["members"]``
    is K (1 for a single network)."""
    b = read_bundle(path)
    model = (predictor_from_bundle(b) if ensemble else model_from_bundle(b)).to(device).eval()
    meta = {k: v for k, v in b.items() if k not in ("state_dict", "member_state_dicts", "card")}
    meta["members"], meta["stains"] = n_members(b), stains_of(b)
    meta["norm"] = Normalisation.from_dict(b["norm"])
    return model, meta


def _norm_line(norm: Normalisation) -> str:
    off, scale = norm.target_arrays(float)
    target = "; ".join(f"target' = (t - {o:.4g}) / {s:.4g}" for o, s in zip(off, scale, strict=True))
    ranges = (f" (offset {min(norm.offset):.4g}..{max(norm.offset):.4g}, scale {min(norm.scale):.4g}.."
              f"{max(norm.scale):.4g})" if norm.mode == "percentile" else "")
    return f"normalisation  {norm.mode}: {input_scaling(norm)}{ranges}; {target}"


def describe_bundle(path: str | os.PathLike) -> str:
    """Human-readable summary of a bundle: architecture, inputs, normalisation, target, provenance."""

    b = read_bundle(path)
    arch = b["arch"]
    n_params = sum(int(v.numel()) for v in b["state_dict"].values())
    norm = Normalisation.from_dict(b["norm"])
    ch = list(b["channels"])
    groups: dict[str, int] = {}
    for c in ch:
        g = c.rsplit("_", 1)[0] if "_" in c else c
        groups[g] = groups.get(g, 0) + 1
    shown = ", ".join(ch) if len(ch) <= 12 else ", ".join(ch[:6]) + ", ..., " + ", ".join(ch[-3:])
    p = b["patch"]
    prov = b.get("provenance", {}) or {}
    lines = [
        f"model bundle   {os.fspath(path)}",
        f"architecture   {arch.get('name', 'MRHNet')} depth={arch['depth']} width={arch.get('width', 64)} "
        f"in_channels={arch['in_channels']}  ({n_params:,} parameters{' per member' if n_members(b) > 1 else ''})",
        f"stains         {', '.join(stains_of(b))}  (one Conv4/Conv5 head each)",
        *_ensemble_lines(b),
        f"patch          {p.get('size')}x{p.get('size')} (half {p.get('half')}), "
        f"in the plane across slice axis {p.get('axis')!r}",
        f"channels       {len(ch)}: " + ", ".join(f"{g} x{n}" for g, n in groups.items()),
        f"               {shown}",
        _norm_line(norm),
        *_ood_lines(b),
    ]
    if prov:
        cfg = prov.get("config", {}) or {}
        fin = prov.get("final_metrics", {}) or {}
        lines.append(f"provenance     stage={prov.get('stage', '?')} mrhscale={prov.get('mrhscale_version', '?')} "
                     f"torch={prov.get('torch_version', '?')} created={prov.get('created', '?')}")
        if prov.get("patches"):
            lines.append(f"               patches={prov['patches']}")
        if cfg:
            keys = ("epochs", "batch_size", "lr", "optimizer", "schedule", "loss", "clip", "seed")
            lines.append("               " + " ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)
                         + f" world_size={prov.get('world_size', '?')}")
        if fin:
            lines.append("               final: " + " ".join(
                f"{k}={fin[k]:.4g}" for k in ("train_loss", "val_loss", "val_rmse", "val_r")
                if isinstance(fin.get(k), (int, float))))
        base = prov.get("base_model")
        if base:
            lines.append(f"               finetuned from {base.get('path')} (target {base.get('target')})")
        other = sorted(k for k in prov if k not in {
            "stage", "mrhscale_version", "torch_version", "created", "patches", "config",
            "final_metrics", "base_model", "patch_store", "world_size", "device",
            "replica_max_abs_diff"})
        for k in other:
            lines.append(f"               {k}={json.dumps(prov[k], default=str)[:200]}")
    return "\n".join(lines)


def _ood_lines(b: dict) -> list[str]:
    """The out-of-distribution score's line (ops/ood.py): what it was fitted on, its flag."""
    rec = b.get("ood")
    if not rec:
        return ["out-of-dist.   none (trained before the score: training.ood.add_input_distance fits it)"]
    return [f"out-of-dist.   `ood` map: distance of a patch's mean contrasts to {rec['n']:,} training patches "
            f"(1 = typical; flag above {rec['training_quantiles']['99']:.3g}, their 99th percentile)"]


def _ensemble_lines(b: dict) -> list[str]:
    k = n_members(b)
    if k == 1:
        return []
    u = b.get("uncertainty") or {}
    per = calibration_of(b, stains_of(b))
    head = f"ensemble       {k} members (seeds {u.get('seeds', '?')}); uncertainty = spread x "
    return [head + "a factor per stain:", *(f"               {t}: {_fitted(per.get(t, {}))}" for t in stains_of(b))]


def _fitted(cal: dict) -> str:
    if not cal.get("fitted_on"):
        return "uncalibrated (factor 1: no validation split)"
    where = "val patches" if cal.get("fitted_on") == "val" else f"voxels of {cal.get('fitted_on')}"
    groups = cal.get("groups")
    per = (f"; per {groups['by']} group x {', '.join(f'{f:.3g}' for f in groups['factor'])}"
           + (f" ({', '.join(groups['labels'])}, rest)" if groups.get("labels") else "")) if groups else ""
    return (f"calibration factor {cal['factor']:.4g} fitted on {cal.get('n', '?')} {where} "
            f"(95% coverage before {cal.get('coverage_before', float('nan')):.3f}"
            f"{', conformal' if cal.get('method') else ''}){per}"
            + (f"; x ood^{cal['ood_power']:g}" if cal.get("ood_power") else "") + _risk(cal))


def _risk(cal: dict) -> str:
    """A risk-controlled calibration's promise (stages/calibrate.py, ops/risk.py)."""
    if cal.get("mode") != "risk":
        return ""
    return (f"; brain-level risk control: at most {cal['alpha']:.3g} of a new brain's voxels outside with "
            f"probability >= {1 - cal['delta']:.3g} ({cal['n_brains']} brains)")
