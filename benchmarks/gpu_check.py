"""One-command check of a GPU machine: ``python -m benchmarks --gpu-check``.

Runs what only a GPU exercises, each figure beside the bare model's on the same device:

1. one epoch of ``torchrun --nproc_per_node=<GPUs> -m mrhscale train`` (DDP over nccl,
   bf16 autocast), checked in the run's provenance (world size, device, amp);
2. ``mrhscale predict --device cuda`` of a cohort store on the embedded cluster (one
   Dask worker per GPU), checked against the same prediction on the CPU;
3. the bare MRH-Net: training steps (bf16 autocast) and forward passes, patches/s.

``--cpu`` runs the same script on the CPU (2 gloo ranks, no autocast): how the test
suite checks the script itself on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTH, CHANNELS = 5, 67


def main(cpu: bool = False, small: bool = False) -> int:
    import torch

    if not cpu and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible to torch on this machine; nothing to check "
              "(--cpu runs the same steps on the CPU)")
        return 2
    n_dev = 2 if cpu else torch.cuda.device_count()
    device = "cpu" if cpu else "cuda"
    print(f"gpu-check: {n_dev} x {_device_name(cpu)}, torch {torch.__version__}")
    work = tempfile.mkdtemp(prefix="mrh-gpu-check-")
    try:
        sizes = _sizes(cpu or small)
        rows = [*_train(work, n_dev, device, sizes), *_predict(work, device, sizes)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    for name, value, base_name, base in rows:
        print(f"{name}: {value:,.0f} patches/s  vs  {base_name}: {base:,.0f}  (x{value / base:.2f})")
    return 0


def _device_name(cpu: bool) -> str:
    import torch

    return "CPU (gloo, no autocast)" if cpu else torch.cuda.get_device_name(0)


def _sizes(small: bool) -> dict:
    return ({"n_train": 4096, "batch": 256, "shape": (24, 16, 28)} if small
            else {"n_train": 262144, "batch": 1024, "shape": (100, 48, 140)})


def _train(work: str, n_dev: int, device: str, sizes: dict) -> list:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import make_patch_store

    store = make_patch_store(os.path.join(work, "patches.zarr"), n_train=sizes["n_train"], n_val=512,
                             n_channels=CHANNELS, chunk=1024)
    run = os.path.join(work, "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_dev}",
           "-m", "mrhscale", "train", store, "--out", run, "--epochs", "1", "--depth", str(DEPTH),
           "--batch-size", str(sizes["batch"] * n_dev), "--loader-workers", "2" if device == "cuda" else "0", "-q"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=work)
    wall = time.perf_counter() - t0
    prov = json.load(open(os.path.join(run, "config.json")))
    rows = json.load(open(os.path.join(run, "metrics.json")))["epochs"]
    per_s = rows[-1]["train_patches_per_s"]
    from mrhscale.io.bundle import read_bundle

    numerics = read_bundle(os.path.join(run, "model.pt"))["provenance"].get("numerics", {})
    print(f"train: {n_dev} ranks (world size {prov['world_size']}), numerics {numerics.get('label', numerics)}, "
          f"epoch of {sizes['n_train']} patches in {wall:.0f} s wall")
    bare = _bare_train(device, sizes["batch"])
    return [(f"torchrun train, {n_dev} ranks, global batch {sizes['batch'] * n_dev}", per_s,
             f"bare train step x{n_dev} ranks (1 device measured), batch {sizes['batch']}", bare * n_dev)]


def _bare_train(device: str, batch: int, steps: int = 20) -> float:
    import torch

    from mrhscale.nn.model import MRHNet

    m = MRHNet(CHANNELS, depth=DEPTH).to(device)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    x = torch.randn(batch, CHANNELS, 3, 3, device=device)

    def step():
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
        with amp:
            loss = m(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return batch * steps / _timed(step, steps, device)


def _predict(work: str, device: str, sizes: dict) -> list:
    import numpy as np
    from helpers import make_cohort_store

    import mrhscale

    cohort = os.path.join(work, "cohort.zarr")
    make_cohort_store(cohort, n_subjects=1, shape=sizes["shape"], n_channels=CHANNELS, chunks=(64, 32, 64))
    model = os.path.join(work, "run", "model.pt")
    res = mrhscale.predict(model, cohort, os.path.join(work, "pred.zarr"), ctx=mrhscale.Context(device=device, quiet=True))
    virtual = res.variable.split(",")[0]  # the first stain's map
    got = mrhscale.PredictionStore.open(res.out).open_subject("s01")[virtual].values
    ref = mrhscale.predict_volume(model, mrhscale.open_subject(cohort, "s01"))[virtual]  # this process, CPU
    diff = float(np.max(np.abs(got - ref.values)))
    print(f"predict --device {device}: {res.brain_voxels} voxels in {res.seconds:.1f} s; "
          f"max |difference| to this process's CPU prediction {diff:.3g} stain units")
    bare = _bare_forward(device, 4096)
    return [(f"predict --device {device} (embedded cluster, whole stage)", res.voxels_per_s,
             "bare forward, batch 4096, 1 device", bare)]


def _bare_forward(device: str, batch: int, steps: int = 20) -> float:
    import torch

    from mrhscale.nn.model import MRHNet

    m = MRHNet(CHANNELS, depth=DEPTH).to(device).eval()
    x = torch.randn(batch, CHANNELS, 3, 3, device=device)

    def fwd():
        with torch.inference_mode():
            m(x)

    return batch * steps / _timed(fwd, steps, device)


def _timed(fn, steps: int, device: str) -> float:
    import torch

    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main(cpu="--cpu" in sys.argv, small="--small" in sys.argv))
