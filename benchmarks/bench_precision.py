"""Precision and compilation: `predict` and `train` in each mode against eager fp32, the
compile time and what the on-disk cache saves, and (``--demo``) the demo's wall time.

- predict: bench_predict's subject (80x48x112, ~163k brain voxels, 67 channels, depth 5,
  3x3 patches, batch 4096), 1 embedded Dask worker x all cores; each mode's model is
  loaded and compiled on the worker before timing (``prepare``), then the modes are timed
  ALTERNATELY (the machine's speed drifts); medians of repeats. Accuracy: correlation and
  largest difference of each mode's map against eager fp32's, in the brain.
- train: `mrhscale train` (1 process x all cores, depth 5, 67 channels, batch 256 as the
  demo's recipe, 8,192 patches/epoch, 3 epochs), patches/s from the trainer's metrics
  (median of epochs after the first), modes interleaved; the final train loss of each
  against eager fp32's (same seed, same data order).
- compile: seconds to compile (first forward; first forward+backward) in a fresh process
  with an empty cache, then again in another fresh process with the cache of the first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_predict import BATCH, make_model, make_store  # noqa: E402
from benchmarks.common import print_rows, row  # noqa: E402

MODES = [("fp32", "off"), ("fp32", "on"), ("bf16", "off"), ("bf16", "on"), ("auto", "auto")]
SHAPE = (80, 48, 112)


def _label(p, c):
    return "auto" if p == "auto" else f"{p} {'compiled' if c == 'on' else 'eager'}"


# ------------------------------------------------------------------------------ predict
def predict_modes(repeats: int, work: str) -> tuple[dict, dict, dict, int]:
    """Median voxels/s per mode, accuracy vs eager fp32 per mode, the mode auto chose, brain voxels."""
    import xarray as xr

    from mrhscale.options import Numerics, PredictOptions
    from mrhscale.parallel.cluster import dask_client
    from mrhscale.parallel.context import Context
    from mrhscale.stages.predict import predict

    store = make_store(os.path.join(work, "cohort.zarr"), SHAPE)
    model = make_model(os.path.join(work, "model.pt"))
    cores = os.cpu_count() or 1
    rates: dict = {m: [] for m in MODES}
    maps, chosen, n = {}, {}, 0
    with dask_client(workers=1, threads_per_worker=1, quiet=True) as client:
        def go(m, k):
            out = os.path.join(work, f"pred-{m[0]}-{m[1]}-{k}.zarr")
            t0 = time.perf_counter()
            r = predict(model, store, out, ctx=Context(scheduler=client.scheduler.address, quiet=True),
                        options=PredictOptions(batch_size=BATCH, torch_threads=cores, numerics=Numerics(*m)))
            dt = time.perf_counter() - t0
            ds = xr.open_zarr(out, group="b01", consolidated=False)
            if k == 0:
                maps[m] = ds["af_virtual"].values[ds["mask"].values]
                chosen[m] = ds.attrs["lineage"]["numerics"]
            shutil.rmtree(out, ignore_errors=True)
            return r.brain_voxels, dt

        for m in MODES:  # untimed: loads and compiles each mode's model on the worker
            n, _ = go(m, 0)
        for k in range(repeats):
            for m in MODES:
                rates[m].append(n / go(m, k + 1)[1])
    ref = maps[("fp32", "off")]
    acc = {m: (float(np.corrcoef(ref, v)[0, 1]), float(np.abs(v - ref).max() / (ref.max() - ref.min())))
           for m, v in maps.items()}
    return {m: statistics.median(v) for m, v in rates.items()}, acc, chosen[("auto", "auto")], n


# ------------------------------------------------------------------------------ train
def train_modes(repeats: int, work: str, batch: int = 256, epochs: int = 3) -> tuple[dict, dict, dict]:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from helpers import make_patch_store

    store = make_patch_store(os.path.join(work, "patches.zarr"), n_train=8192, n_val=512, n_channels=67,
                             chunk=1024)
    from mrhscale.io.bundle import read_bundle

    rates: dict = {m: [] for m in MODES}
    loss, chosen = {}, {}
    env = dict(os.environ, MRHSCALE_CACHE_DIR=os.path.join(work, "cache"))  # auto measures in this run
    for _ in range(repeats):
        for m in MODES:
            out = os.path.join(work, "run")
            shutil.rmtree(out, ignore_errors=True)
            cmd = [os.path.join(os.path.dirname(sys.executable), "mrhscale"), "train", store, "--out", out,
                   "--depth", "5", "--epochs", str(epochs), "--batch-size", str(batch), "--recipe", "fast",
                   "--precision", m[0], "--compile", m[1], "-q"]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode:
                raise RuntimeError(f"train {m}: {p.stderr[-2000:]}")
            hist = json.load(open(os.path.join(out, "metrics.json")))["epochs"]
            rates[m].append(statistics.median(r["train_patches_per_s"] for r in hist[1:]))
            loss[m] = [r["train_loss"] for r in hist]
            chosen[m] = read_bundle(os.path.join(out, "model.pt"))["provenance"]["numerics"]
    return {m: statistics.median(v) for m, v in rates.items()}, loss, chosen[("auto", "auto")]


# ------------------------------------------------------------------------------ compile time
COMPILE = r"""
import sys, time, torch
from mrhscale.nn.model import MRHNet
from mrhscale.nn.accel import Acceleration, InferenceModel, compiled
torch.set_num_threads(int(sys.argv[2]))
m = MRHNet(67, 5)
t0 = time.perf_counter()
if sys.argv[1] == "predict":
    InferenceModel(m, Acceleration("bf16", True), "cpu", 4096, example=(67, 3)).warm_up(strict=True)
else:
    net = compiled(m, inference=False)
    with torch.autocast("cpu", torch.bfloat16):
        y = net(torch.zeros(256, 67, 3, 3))
    y.float().sum().backward()
print(time.perf_counter() - t0)
"""


def compile_times(work: str) -> dict:
    """(cold, warm) seconds for inference and training compiles, each in a fresh process."""
    res = {}
    for what in ("predict", "train"):
        cache = os.path.join(work, f"cache-{what}")
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        got = []
        for _ in range(2):
            p = subprocess.run([sys.executable, "-c", COMPILE, what, str(os.cpu_count() or 1)], env=env,
                               capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(p.stderr[-2000:])
            got.append(float(p.stdout.strip().splitlines()[-1]))
        res[what] = tuple(got)
    return res


def demo_time(work: str, numerics: dict) -> float:
    env = dict(os.environ, **numerics)
    t0 = time.perf_counter()
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mrhscale"), "demo", "--out",
                        os.path.join(work, "demo-" + "-".join(numerics.values() or ["auto"])), "-q"],
                       env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------ rows
def run(full: bool = False, repeats: int = 3, demo: bool = False) -> list[dict]:
    del full  # one size: the predict subject is already over 150k brain voxels
    work = tempfile.mkdtemp(prefix="mrh-bench-precision-")
    rows = []
    try:
        pr, acc, auto_p, n = predict_modes(repeats, work)
        base = pr[("fp32", "off")]
        for m in MODES[1:]:
            note = f"vs eager fp32 map: r {acc[m][0]:.6f}, max |diff| {acc[m][1]:.2%} of range"
            if m == ("auto", "auto"):
                note += f"; auto chose {auto_p['precision']} {'compiled' if auto_p['compile'] else 'eager'}"
            rows.append(row(f"predict {_label(*m)} ({n} brain voxels)", pr[m], "voxels/s",
                            "predict eager fp32", base, target=">= 3x" if m == ("auto", "auto") else None,
                            met=(pr[m] >= 3 * base) if m == ("auto", "auto") else None, note=note))
        tr, loss, auto_t = train_modes(max(1, repeats - 1), work)
        base = tr[("fp32", "off")]
        ref = loss[("fp32", "off")][-1]
        for m in MODES[1:]:
            note = f"final train loss {loss[m][-1]:.4g} vs {ref:.4g} eager fp32"
            if m == ("auto", "auto"):
                note += f"; auto chose {auto_t['precision']} {'compiled' if auto_t['compile'] else 'eager'}"
            rows.append(row(f"train {_label(*m)} (batch 256, depth 5)", tr[m], "patches/s", "train eager fp32",
                            base, target=">= 1.25x" if m == ("auto", "auto") else None,
                            met=(tr[m] >= 1.25 * base) if m == ("auto", "auto") else None, note=note))
        ct = compile_times(work)
        for what, (cold, warm) in ct.items():
            rows.append(row(f"compile {what} (bf16), fresh process, warm cache", warm, "s",
                            "same with an empty cache", cold, note="ratio < 1: the cache saves time"))
        if demo:
            auto = demo_time(work, {})
            eager = demo_time(work, {"MRHSCALE_PRECISION": "fp32", "MRHSCALE_COMPILE": "off"})
            rows.append(row("mrhscale demo, auto numerics (fresh folder)", auto, "s",
                            "mrhscale demo, eager fp32", eager))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--demo", action="store_true", help="also time the demo in auto vs eager fp32 (~8 min)")
    a = ap.parse_args()
    print_rows(run(repeats=a.repeats, demo=a.demo))


if __name__ == "__main__":
    main()
