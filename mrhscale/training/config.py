"""What a training run is: its settings (TrainConfig) from a named recipe under the explicit
options, validated, and how a resumed run keeps them."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields

from mrhscale.errors import MRHError
from mrhscale.options import (
    DEFAULT_LR,
    DEFAULT_RECIPE,
    INITS,
    INPUT_NORMS,
    LOSSES,
    OPTIMIZERS,
    RECIPES,
    SCHEDULES,
)
from mrhscale.training.augment import parse
from mrhscale.training.checkpoint import load_checkpoint

# the recipes and vocabularies are options (mrhscale/options.py); re-exported for the training code
__all__ = ["DEFAULT_LR", "DEFAULT_RECIPE", "LOSSES", "RECIPES", "TrainConfig", "recipe_config", "reconcile",
           "run_started"]

CHECKPOINT = "last.pt"
MAX_MEMBERS = 32
STOP_CHECK_EVERY_CUDA = 8  # CPU checks every step: a 1-element gloo all-reduce is ~0.1 ms


class TrainingInterrupted(Exception):
    """The run stopped on SIGTERM after writing a checkpoint; rerun with resume to continue."""

    def __init__(self, message: str, checkpoint: str):
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class TrainConfig:
    """Everything that determines the result of a run (saved in config.json and checkpoints)."""

    kind: str = "train"  # train | finetune
    patches: str = ""
    recipe: str = "paper"  # the preset the unset options below came from (these defaults: the paper's)
    depth: int = 5
    width: int = 64
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "piecewise"
    drop_period: int = 10
    drop_factor: float = 0.1
    clip: float = 0.01
    loss: str = "matlab"
    init: str = "glorot"
    seed: int = 0
    base_model: str | None = None
    head_lr_factor: float = 1.0
    freeze_backbone: bool = False
    add_stain: bool = False  # finetune: keep the model's heads and add the patch store's new stains
    shuffle_buffer: int | None = None
    val_patches: int | None = None  # per-epoch validation on this fixed subset; the last epoch: all
    augment: str = ""  # training-time augmentations (training/augment.py), e.g. "gain,bias,flip"
    norm: str = "global"  # input scaling: the patch store's statistics, or each brain's own (ops/norm.py)
    members: int = 1  # > 1: a deep ensemble of this many networks (training/ensemble.py)
    aleatoric: bool = False  # a noise-scale output per stain (nn/model.py), trained by a Laplace likelihood
    calibration_groups: str = "value:4"  # Mondrian groups of the validation patches: value:N bins, or none

    def validate(self) -> None:
        def bad(opt, val, want):
            raise MRHError(f"--{opt} {val!r}: {want}")

        if self.loss not in LOSSES:
            bad("loss", self.loss, f"choose one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", self.optimizer, f"choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            bad("schedule", self.schedule, f"choose one of {', '.join(SCHEDULES)}")
        if self.init not in INITS:
            bad("init", self.init, f"choose one of {', '.join(INITS)}")
        if self.epochs < 1:
            bad("epochs", self.epochs, "must be at least 1")
        if self.batch_size < 1:
            bad("batch-size", self.batch_size, "must be at least 1")
        if self.depth < 0 or self.width < 1:
            bad("depth", self.depth, "depth must be >= 0 and width >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", self.lr, "must be a positive number")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            bad("clip", self.clip, "must be >= 0 (0 disables clipping)")
        if self.weight_decay < 0 or not (0 <= self.momentum < 1):
            bad("weight-decay", self.weight_decay, "weight decay must be >= 0 and momentum in [0, 1)")
        if self.drop_period < 1 or not (0 < self.drop_factor <= 1):
            bad("drop-period", self.drop_period, "drop period >= 1 and drop factor in (0, 1]")
        if self.head_lr_factor <= 0:
            bad("head-lr-factor", self.head_lr_factor, "must be positive")

        self.augment = ",".join(parse(self.augment))
        if self.norm not in INPUT_NORMS:
            bad("norm", self.norm, f"choose one of {', '.join(INPUT_NORMS)}")
        if not 1 <= self.members <= MAX_MEMBERS:
            bad("members", self.members, f"must be 1 (one network) to {MAX_MEMBERS} (an ensemble)")
        if self.members > 1 and self.kind == "finetune":
            bad("members", self.members, "finetune trains one network (from an ensemble: its member 0)")
        if self.add_stain and self.kind != "finetune":
            bad("add-stain", self.add_stain, "is a finetune option (a new head on a trained network)")
        if self.val_patches is not None and self.val_patches < 1:
            bad("val-patches", self.val_patches, "must be at least 1 (unset: the whole val split)")
        calibration_groups(self.calibration_groups, False)


def calibration_groups(spec: str, brains: bool) -> tuple[str, object]:
    """``--calibration-groups`` parsed: ("value", N bins), ("labels", [names]) or ("none", None)."""
    spec = str(spec or "none").strip()
    if spec == "none":
        return "none", None
    if spec.startswith("value:"):
        try:
            bins = int(spec.split(":", 1)[1])
        except ValueError:
            bins = 0
        if bins < 2:
            raise MRHError(f"--calibration-groups {spec}: value:N needs N >= 2 bins of the predicted value")
        return "value", bins
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not brains:
        raise MRHError(f"--calibration-groups {spec}: tissue labels are in whole brains; give "
                       "--calibration-subjects, or use value:N")
    return "labels", names


def recipe_config(kind: str, given: dict, kind_defaults: dict | None = None) -> TrainConfig:
    """The config of a new run: ``given`` (explicit options; None = unset) over the
    ``kind``'s defaults (finetune: its lr and head factor) over the named recipe.

    An optimiser given without an lr starts at that optimiser's default lr (a train
    run only: finetune keeps its own), since one optimiser's lr is meaningless for another.
    """
    explicit = {k: v for k, v in given.items() if v is not None and k != "kind"}
    name = explicit.setdefault("recipe", DEFAULT_RECIPE)
    if name not in RECIPES:
        raise MRHError(f"--recipe {name!r}: choose one of {', '.join(RECIPES)}")
    values = {**RECIPES[name], **(kind_defaults or {}), **explicit}
    opt = explicit.get("optimizer")
    if kind == "train" and opt and opt != RECIPES[name]["optimizer"] and "lr" not in explicit:
        values["lr"] = DEFAULT_LR.get(opt, values["lr"])
    return TrainConfig(kind=kind, **values)


# Settings a resumed run may change; everything else must match the checkpoint.
# val_patches: what is measured, not learned; calibration: how the trained members are calibrated
RESUMABLE_CHANGES = {"epochs", "patches", "val_patches", "calibration_groups"}


def run_started(out_dir: str) -> bool:
    """Whether ``out_dir`` holds a run that ``resume`` continues (a network's checkpoints, or
    an ensemble's members)."""
    return any(os.path.exists(os.path.join(os.fspath(out_dir), p)) for p in ("checkpoints", "members"))


def reconcile(cfg: TrainConfig, out_dir: str, resume: bool, given: dict) -> TrainConfig:
    """New run: check the directory is free. Resume: take the checkpoint's config."""
    ckpt_path = os.path.join(os.fspath(out_dir), "checkpoints", CHECKPOINT)
    if not resume:
        if run_started(out_dir) or os.path.exists(os.path.join(os.fspath(out_dir), "model.pt")):
            raise MRHError(f"{out_dir}: already holds a training run; pass --resume to continue it "
                           "or choose another --out")
        cfg.validate()
        return cfg
    saved = _saved_config(out_dir, ckpt_path)
    names = {f.name for f in fields(TrainConfig)}
    old = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    for k, v in given.items():
        if v is None or k not in names:
            continue
        if k in RESUMABLE_CHANGES:
            setattr(old, k, v)
        elif getattr(old, k) != v:
            raise MRHError(f"--resume: {k}={v!r} differs from the checkpointed run's "
                           f"{getattr(old, k)!r}; a resumed run keeps its own settings")
    old.validate()
    return old


def _saved_config(out_dir: str, ckpt_path: str) -> dict:
    """The settings of the run in ``out_dir``: its checkpoint's, or an ensemble's config.json
    (each member keeps its own checkpoint)."""

    if os.path.exists(ckpt_path):
        return _checkpoint_config(ckpt_path)
    try:
        with open(os.path.join(os.fspath(out_dir), "config.json")) as fh:
            saved = json.load(fh)
    except (OSError, ValueError):
        saved = {}
    if int(saved.get("members", 1)) > 1:
        return saved
    raise MRHError(f"--resume: no checkpoint at {ckpt_path}; start the run without --resume")


def _checkpoint_config(path: str) -> dict:
    return load_checkpoint(path).get("config", {})
