"""Model cards: what a bundle is, how it was made, what it is for and where it stops.

A card is generated from what the bundle already records (architecture, channels, patch,
normalisation, provenance, calibration), so it never claims more than the bundle knows:
a lab can hand it on with the file. ``write_bundle`` stores one in every bundle it writes
(key ``card``, plain types: old readers ignore it); a bundle written before cards has its
card generated when asked (:func:`card_of`). Markdown for people, the dict (JSON) for tools.
"""

from __future__ import annotations

import math
from typing import Any

from mrhscale.ops.norm import Normalisation
from mrhscale.stores.legacy import calibration_of, stains_of

CARD_FORMAT = "mrhscale-model-card"
CARD_VERSION = 1
ELIFE = ("Liang Z, Lee CH, Arefin TM, Dong Z, Walczak P, Shi SH, Knoll F, Ge Y, Ying L, Zhang J. "
         "Virtual mouse brain histology from multi-contrast MRI via deep learning. "
         "eLife 2022;11:e72331. doi:10.7554/eLife.72331")
INTENDED_USE = ("Research: virtual histology (3D maps that mimic a stain) from co-registered multi-contrast "
                "MRI of ex-vivo mouse brains acquired like the training brains; choosing contrasts, "
                "screening, and comparing groups before or beside real histology.")
LIMITS = (
    "Same MRI protocol: the contrasts listed under inputs, in that order, acquired and preprocessed like "
    "the training brains (the original: 60 um ex-vivo dMRI at b = 2000 and 5000 s/mm^2, T2, MT); another "
    "protocol or scanner needs finetuning or retraining.",
    "Adult C57BL/6 mice, as the original's training brains; other strains, ages, pathologies or species "
    "are outside what it has seen (check against real histology first).",
    "Not for clinical use: a research tool, not validated for diagnosis or any decision about a patient.",
    "A virtual stain is a prediction from MRI, not a measurement of the tissue.",
)
_KINDS = {"train": "trained with mrhscale train", "finetune": "finetuned with mrhscale finetune",
          "import-matlab": "imported from the original MRH-Net (MATLAB) release"}
_INPUT_SCALING = {
    "global-max": "x' = x / {top} for every contrast (one global maximum, as the original's training)",
    "percentile": "x' = (x - offset[c]) / scale[c], the training split's 0.5th..99.5th percentiles of "
                  "each contrast",
    "identity": "x' = x (inputs already scaled)",
    "subject-max": "x' = x / max, the maximum over all contrasts of each brain's own voxels inside its mask "
                   "(as the original's testing, MRH_testing: XTest = data./max(data(:)))",
    "subject-percentile": "x' = (x - p0.5[c]) / (p99.5[c] - p0.5[c]) of each brain's own voxels inside its "
                          "mask",
}


# --------------------------------------------------------------------------- the card as data
def model_card(bundle: dict[str, Any]) -> dict:
    """The card of a bundle (as ``read_bundle`` returns it), from its own records only."""
    prov = bundle.get("provenance") or {}
    stains = stains_of(bundle)
    return _plain({
        "format": CARD_FORMAT, "format_version": CARD_VERSION,
        "model": _model(bundle, prov), "stains": stains, "inputs": _inputs(bundle),
        "normalisation": normalisation_record(Normalisation.from_dict(bundle["norm"]), stains),
        "recipe": _recipe(prov), "training_data": _training_data(prov),
        "validation": _validation(prov, stains), "calibration": _calibration(bundle, stains),
        "precision": _precision(bundle, prov), "intended_use": INTENDED_USE,
        "limits": list(LIMITS), "citation": _citation(prov),
    })


def card_of(bundle: dict[str, Any]) -> dict:
    """The card stored in the bundle, or (a bundle written before cards) one made now."""
    stored = bundle.get("card")
    return stored if isinstance(stored, dict) and stored.get("format") == CARD_FORMAT else model_card(bundle)


def input_scaling(norm: Normalisation) -> str:
    """How raw MRI becomes the network's input, as a formula."""
    top = f"{norm.scale[0]:.6g}" if norm.scale else "?"
    return _INPUT_SCALING[norm.mode].format(top=top)


def normalisation_record(norm: Normalisation, stains: list[str]) -> dict:
    """The input scaling and each stain's output scaling, formulas included."""
    off, scale = norm.target_arrays(float)
    return {"input": {"mode": norm.mode, "per_subject": norm.mode in ("subject-max", "subject-percentile"),
                      "formula": input_scaling(norm), **({"note": norm.meta["note"]} if "note" in norm.meta else {})},
            "output": {t: {"formula": f"{t} = output x {s:.6g} + {o:.6g}", "scale": s, "offset": o}
                       for t, o, s in zip(stains, off.tolist(), scale.tolist(), strict=True)}}


def _model(bundle: dict, prov: dict) -> dict:
    arch, members = bundle["arch"], 1 + len(bundle.get("member_state_dicts") or ())
    state = bundle.get("state_dict") or {}
    kind = _KINDS.get(prov.get("stage"), "origin not recorded")
    return {"kind": kind + (f"; a deep ensemble of {members} networks" if members > 1 else ""),
            "architecture": {"name": arch.get("name", "MRHNet"), "depth": arch["depth"],
                             "width": arch.get("width", 64), "in_channels": arch["in_channels"],
                             "parameters_per_network": sum(int(v.numel()) for v in state.values()),
                             "members": members},
            "created": prov.get("created"), "mrhscale_version": prov.get("mrhscale_version"),
            **_origin(prov)}


def _origin(prov: dict) -> dict:
    """Where the weights came from: a base model (finetune) or a MATLAB file (import)."""
    base = prov.get("base_model")
    if base:
        return {"base_model": {"path": base.get("path"), "stains": base.get("stains") or base.get("target")}}
    src = prov.get("source")
    if prov.get("stage") == "import-matlab" and isinstance(src, dict):
        return {"source": {k: src.get(k) for k in ("file", "sha256", "variable", "reader")}}
    return {}


def _inputs(bundle: dict) -> dict:
    p = bundle["patch"]
    size = p.get("size") or 2 * int(p["half"]) + 1
    return {"channels": list(bundle["channels"]), "n_channels": len(bundle["channels"]),
            "patch": {"size": size, "half": p.get("half"), "slice_axis": p.get("axis"),
                      "meaning": f"{size}x{size} patches in the plane across slice axis {p.get('axis')!r}"}}


def _recipe(prov: dict) -> dict | None:
    if prov.get("stage") == "import-matlab":
        return {"name": "the original's MRH_training (MATLAB)", "recorded": False,
                "note": "the .mat file holds no training options; the original's are in docs/mrhnet-mapping.md"}
    cfg = prov.get("config") or {}
    keys = ("epochs", "batch_size", "lr", "optimizer", "schedule", "loss", "clip", "weight_decay",
            "augment", "norm", "members", "seed", "head_lr_factor", "freeze_backbone")
    return {"name": cfg.get("recipe"), "recorded": True, **{k: cfg[k] for k in keys if k in cfg}} if cfg else None


def _training_data(prov: dict) -> dict | None:
    if prov.get("stage") == "import-matlab":
        return {"recorded": False, "note": "the original's training brains (not recorded in the .mat file); "
                                           "see the citation"}
    ps = prov.get("patch_store")
    if not ps:
        return None
    val = list(ps.get("val_subjects") or [])
    return {"recorded": True, "patches": prov.get("patches"), "n_train": ps.get("n_train"),
            "n_val": ps.get("n_val"), "training_subjects": [s for s in ps.get("subjects") or [] if s not in val],
            "validation_subjects": val, "rules": ps.get("rules")}


def _validation(prov: dict, stains: list[str]) -> dict | None:
    """The validation figures the bundle records (the last epoch's; an ensemble's mean)."""
    fin = prov.get("final_metrics") or {}
    keys = ["val_loss", "val_rmse", "val_r", "val_patches", "epoch",
            *(f"val_{m}_{t}" for t in stains for m in ("rmse", "r"))]
    got = {k: fin[k] for k in keys if k in fin}
    return got or None


def _calibration(bundle: dict, stains: list[str]) -> dict | None:
    if not bundle.get("member_state_dicts"):
        return None
    per = calibration_of(bundle, stains)
    keep = ("factor", "fitted_on", "n", "coverage_before", "coverage_after", "val_r", "val_rmse")
    return {t: ({k: per[t][k] for k in keep if k in per[t]} if per.get(t, {}).get("fitted_on")
                else {"factor": 1.0, "fitted_on": None, "note": "uncalibrated: no validation split"})
            for t in stains}


def _precision(bundle: dict, prov: dict) -> dict:
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in (bundle.get("state_dict") or {}).values()})
    return {"weights": ", ".join(dtypes) or None, "training": prov.get("numerics"),
            "inference": "chosen per device at predict time (--precision auto|fp32|bf16; docs/precision.md)"}


_CITE_NOTES = {
    "import-matlab": "Imported MATLAB network: the weights are the original MRH-Net authors' (MIT licence); "
                     "cite the paper",
    "base": "Finetuned from an imported MATLAB network: the backbone's weights are the original MRH-Net "
            "authors' (MIT licence); cite the paper",
    None: "The method is the paper's: cite it and mrhscale",
}


def _citation(prov: dict) -> dict:
    """The paper, and whether the weights (or the backbone's) are the original's."""
    base = ((prov.get("base_model") or {}).get("provenance") or {}).get("stage") == "import-matlab"
    how = "import-matlab" if prov.get("stage") == "import-matlab" else ("base" if base else None)
    return {"original": ELIFE, "imported_matlab_network": how is not None, "note": _CITE_NOTES[how]}


def _plain(v):
    """Plain JSON types; a non-finite number (a NaN metric) as None."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v if v is None or isinstance(v, str | int | float | bool) else str(v)


# --------------------------------------------------------------------------- Markdown
_SECTIONS = (("recipe", "Recipe"), ("training_data", "Training data"), ("validation", "Validation"),
             ("calibration", "Calibration of the uncertainty"), ("precision", "Precision"))


def card_markdown(card: dict) -> str:
    """The card as Markdown, one section per part, for people (the dict is for tools)."""
    m = card["model"]
    lines = [f"# Model card: MRH-Net virtual {', '.join(card['stains'])}", "",
             f"{m['kind'][0].upper()}{m['kind'][1:]}; created {m.get('created') or 'not recorded'} "
             f"(mrhscale {m.get('mrhscale_version') or '?'}).", ""]
    cite = card["citation"]
    if cite["imported_matlab_network"]:
        lines += [f"> {cite['note']}: {cite['original']}", ""]
    lines += _section("Model", {k: v for k, v in m.items() if k not in ("kind", "created", "mrhscale_version")})
    lines += _section("Stains", card["stains"]) + _inputs_md(card["inputs"])
    lines += _section("Normalisation", card["normalisation"])
    for key, title in _SECTIONS:
        lines += _section(title, card.get(key))
    lines += ["## Intended use", "", card["intended_use"], ""] + _section("Limits", card["limits"])
    lines += ["## Citation", "", cite["original"], "", cite["note"] + "."]
    return "\n".join(lines) + "\n"


def _inputs_md(inputs: dict) -> list[str]:
    ch = inputs["channels"]
    return ["## Inputs", "", f"- channels ({inputs['n_channels']}, in this order): {', '.join(ch)}",
            f"- patch: {inputs['patch']['meaning']}", ""]


def _section(title: str, body) -> list[str]:
    if body is None or body == {}:
        return [f"## {title}", "", "Not recorded in the bundle.", ""]
    return [f"## {title}", "", *_bullets(body), ""]


def _bullets(body, indent: str = "") -> list[str]:
    """Nested dicts (and lists) as Markdown bullets."""
    if isinstance(body, list):
        return [f"{indent}- {_value(v)}" for v in body]
    out = []
    for k, v in body.items():
        if isinstance(v, dict) and v:
            out += [f"{indent}- {k}:", *_bullets(v, indent + "  ")]
        else:
            out.append(f"{indent}- {k}: {_value(v)}")
    return out


def _value(v) -> str:
    if v is None:
        return "not recorded"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(map(_value, v)) or "none"
    return str(v)
