"""What each generalisation option costs (docs/recipes.md): training with each augmentation
and with per-subject normalisation, prediction with TTA and with per-subject statistics,
each against the plain run in the same process, runs alternated, medians of repeats.

- train: `mrhscale train` (1 process x all cores, eager fp32, depth 5, 67 channels, batch
  128 as the paper, 8,192 patches/epoch, 3 epochs), patches/s from the trainer's metrics
  (median of the epochs after the first).
- predict: a bench_predict subject of 56x40x80 (TTA is 8x the work), 1 embedded Dask
  worker x all cores, eager fp32, batch 4096; a per-subject model adds one pass over the
  brain for its statistics, TTA runs the network 8 times.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_predict import BATCH, make_model, make_store  # noqa: E402
from benchmarks.common import predict_rates as common_predict_rates  # noqa: E402
from benchmarks.common import repeats_main, row  # noqa: E402

SHAPE = (56, 40, 80)
TRAIN = {"plain": [], "augment gain": ["--augment", "gain"], "augment offset": ["--augment", "offset"],
         "augment bias": ["--augment", "bias"], "augment noise": ["--augment", "noise"],
         "augment flip": ["--augment", "flip"], "augment all": ["--augment", "all"],
         "norm subject-percentile": ["--norm", "subject-percentile"]}


def train_rates(repeats: int, work: str, epochs: int = 3) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from helpers import make_patch_store

    store = make_patch_store(os.path.join(work, "patches.zarr"), n_train=8192, n_val=512, n_channels=67,
                             chunk=1024)
    rates: dict = {k: [] for k in TRAIN}
    for _ in range(repeats):
        for name, extra in TRAIN.items():
            out = os.path.join(work, "run")
            shutil.rmtree(out, ignore_errors=True)
            cmd = [os.path.join(os.path.dirname(sys.executable), "mrhscale"), "train", store, "--out", out,
                   "--recipe", "paper", "--depth", "5", "--epochs", str(epochs), "--precision", "fp32",
                   "--compile", "off", "-q", *extra]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(f"train {name}: {p.stderr[-2000:]}")
            hist = json.load(open(os.path.join(out, "metrics.json")))["epochs"]
            rates[name].append(statistics.median(r["train_patches_per_s"] for r in hist[1:]))
    return {k: statistics.median(v) for k, v in rates.items()}


def subject_model(path: str, plain: str) -> str:
    from mrhscale.io.bundle import load_model, save_bundle
    from mrhscale.ops.norm import Normalisation

    net, meta = load_model(plain)
    norm = Normalisation.subject_mode("subject-percentile", len(meta["channels"]), 0.0, 255.0)
    save_bundle(path, net, channels=meta["channels"], norm=norm, patch=meta["patch"])
    return path


def predict_rates(repeats: int, work: str) -> tuple[dict, int]:
    store = make_store(os.path.join(work, "cohort.zarr"), SHAPE)
    plain = make_model(os.path.join(work, "model.pt"))
    cases = {"plain": {"model": plain}, "tta": {"model": plain, "tta": True},
             "norm subject-percentile": {"model": subject_model(os.path.join(work, "subject.pt"), plain)}}
    return common_predict_rates(cases, store, work, repeats, BATCH)


def run(full: bool = False, repeats: int = 3) -> list[dict]:
    del full  # one size
    work = tempfile.mkdtemp(prefix="mrh-bench-options-")
    rows = []
    try:
        tr = train_rates(max(1, repeats - 1), work)
        for name in list(TRAIN)[1:]:
            rows.append(row(f"train, {name} (batch 128, depth 5, eager fp32)", tr[name], "patches/s",
                            "train, no option", tr["plain"]))
        pr, n = predict_rates(repeats, work)
        for name in list(pr)[1:]:
            rows.append(row(f"predict, {name} ({n} brain voxels, eager fp32)", pr[name], "voxels/s",
                            "predict, no option", pr["plain"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main():
    repeats_main(run, __doc__)


if __name__ == "__main__":
    main()
