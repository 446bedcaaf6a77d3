"""What a deep ensemble costs (train --members K, docs/uncertainty.md), each figure beside
K times one member measured in the same run, runs alternated, medians of repeats.

- train: `mrhscale train --members K` against K separate `mrhscale train` runs (seeds
  0..K-1) on one patch store (67 channels, 8,192 train + 2,048 val patches, depth 5, batch
  128, 2 epochs, eager fp32, 1 process x all cores): wall time of the whole command(s),
  as patch-steps/s (K x epochs x patches / wall). The ensemble adds its calibration pass
  (K forward passes over the validation split) and saves K - 1 process start-ups.
- predict: the K-member bundle against its member 0 on a bench_predict subject (56x40x80,
  1 embedded Dask worker x all cores, eager fp32, batch 4096), voxels/s; the baseline is
  K predictions with one member each (one member's rate / K). The ensemble gathers each
  patch once and runs the K networks on it, so it should not be slower than K separate runs.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_predict import BATCH, make_model, make_store  # noqa: E402
from benchmarks.common import predict_rates as common_predict_rates  # noqa: E402
from benchmarks.common import repeats_main, row  # noqa: E402

SHAPE = (56, 40, 80)
K = 3
N_TRAIN, EPOCHS = 8192, 2


def _train(store: str, out: str, extra: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [os.path.join(os.path.dirname(sys.executable), "mrhscale"), "train", store, "--out", out,
           "--recipe", "paper", "--depth", "5", "--epochs", str(EPOCHS), "--precision", "fp32",
           "--compile", "off", "-q", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"train {extra}: {p.stderr[-2000:]}")
    return time.perf_counter() - t0


def train_times(repeats: int, work: str) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from helpers import make_patch_store

    store = make_patch_store(os.path.join(work, "patches.zarr"), n_train=N_TRAIN, n_val=2048, n_channels=67,
                             chunk=1024)
    times: dict = {"ensemble": [], "separate": []}
    for _ in range(repeats):
        times["separate"].append(sum(_train(store, os.path.join(work, f"one{k}"), ["--seed", str(k)])
                                     for k in range(K)))
        times["ensemble"].append(_train(store, os.path.join(work, "ens"), ["--members", str(K)]))
    return {k: statistics.median(v) for k, v in times.items()}


def ensemble_model(path: str, work: str) -> tuple[str, str]:
    import torch

    from mrhscale.io.bundle import ensemble_bundle, read_bundle, write_bundle

    singles = []
    for k in range(K):
        torch.manual_seed(k)
        p = make_model(os.path.join(work, f"m{k}.pt"))
        b = read_bundle(p)
        if k:  # make_model seeds 0 itself: give the others their own weights
            b["state_dict"] = {n: v + 0.01 * torch.randn_like(v) for n, v in b["state_dict"].items()}
        singles.append(b)
    unc = {"method": "ensemble", "members": K, "seeds": list(range(K)), "calibration": {"factor": 1.0}}
    write_bundle(path, ensemble_bundle(singles, unc, {}))
    return path, os.path.join(work, "m0.pt")


def predict_rates(repeats: int, work: str) -> tuple[dict, int]:
    store = make_store(os.path.join(work, "cohort.zarr"), SHAPE)
    ens, one = ensemble_model(os.path.join(work, "ens.pt"), work)
    return common_predict_rates({"one": {"model": one}, "ensemble": {"model": ens}}, store, work, repeats, BATCH)


def run(full: bool = False, repeats: int = 3) -> list[dict]:
    del full  # one size
    work = tempfile.mkdtemp(prefix="mrh-bench-ensemble-")
    try:
        tt = train_times(max(1, repeats - 1), work)
        steps = K * EPOCHS * N_TRAIN
        rows = [row(f"train --members {K} (depth 5, batch 128, {EPOCHS} epochs, eager fp32; wall time incl. "
                    "calibration)", steps / tt["ensemble"], "patch-steps/s",
                    f"{K} separate train runs", steps / tt["separate"],
                    note=f"wall {tt['ensemble']:.1f} s vs {tt['separate']:.1f} s")]
        pr, n = predict_rates(repeats, work)
        rows.append(row(f"predict, ensemble of {K} ({n} brain voxels, eager fp32)", pr["ensemble"], "voxels/s",
                        f"{K} predictions with one member", pr["one"] / K,
                        note=f"one member alone: {pr['one']:.4g} voxels/s"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main():
    repeats_main(run, __doc__)


if __name__ == "__main__":
    main()
