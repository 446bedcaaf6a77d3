"""Checkpoints (with every RNG state, for exact resume) and the per-epoch metrics files."""

from __future__ import annotations

import csv
import io
import json
import os
import random

import numpy as np
import torch

from mrhscale.errors import MRHError
from mrhscale.stores import write_text


def rng_state() -> dict:
    np_state = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], np.uint32), *n[2:]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MRHError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


_METRIC_KEYS = ["epoch", "lr", "train_loss", "val_loss", "val_rmse", "val_r", "steps",
                "train_patches", "train_patches_per_s", "epoch_s"]


def write_metrics(out_dir: str, history: list[dict], summary: dict | None = None) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_METRIC_KEYS, extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    write_text(os.path.join(out_dir, "metrics.csv"), buf.getvalue())
    doc = {"epochs": history, **({"summary": summary} if summary else {})}
    write_text(os.path.join(out_dir, "metrics.json"), json.dumps(doc, indent=1, default=float))
