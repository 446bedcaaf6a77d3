"""Training throughput: `mrhscale train` (1 process; 2 processes under torchrun/DDP on gloo)
against the bare model's forward+backward on in-memory tensors (plain and under DDP).

Every figure is patches/s of the training loop (PatchStream reading the patch store,
normalisation, forward, MATLAB loss, backward, per-tensor clipping, SGD step),
taken from the trainer's own per-epoch metrics (median of epochs after the first),
median over repeats. Baselines, measured in the same run and interleaved with the
trainer runs (the machine is shared): the bare MRH-Net forward+backward of batches
already in memory, with the same threads (and the same under DDP with 2 processes). DDP scaling efficiency =
2-process throughput / (2 x 1-process-1-thread throughput).
Default: depth 5, 67 channels, 3x3 patches, 8,192 patches/epoch; --full: 65,536.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import print_rows, row  # noqa: E402

BARE = r"""
import sys, time, torch
from mrhscale.nn.model import MRHNet
torch.set_num_threads(int(sys.argv[1])); depth, batch = int(sys.argv[2]), int(sys.argv[3])
m = MRHNet(67, depth); x = torch.randn(batch, 67, 3, 3); t = torch.randn(batch, 3, 3)
def go(n):
    for _ in range(n):
        (0.5 * (m(x) - t).square().flatten(1).sum(1).mean()).backward()
        m.zero_grad(set_to_none=True)
go(5); rates = []
for _ in range(5):
    t0 = time.perf_counter(); go(20); rates.append(20 * batch / (time.perf_counter() - t0))
print(sorted(rates)[2])
"""

BARE_DDP = r"""
import sys, time, torch, torch.distributed as dist
from mrhscale.nn.model import MRHNet
dist.init_process_group("gloo"); torch.set_num_threads(1)
depth, batch = int(sys.argv[1]), int(sys.argv[2]) // dist.get_world_size()
m = torch.nn.parallel.DistributedDataParallel(MRHNet(67, depth), gradient_as_bucket_view=True)
x = torch.randn(batch, 67, 3, 3); t = torch.randn(batch, 3, 3)
def go(n):
    for _ in range(n):
        (0.5 * (m(x) - t).square().flatten(1).sum(1).mean()).backward()
        m.zero_grad(set_to_none=True)
go(5); rates = []
for _ in range(5):
    dist.barrier(); t0 = time.perf_counter(); go(20)
    rates.append(20 * batch * dist.get_world_size() / (time.perf_counter() - t0))
if dist.get_rank() == 0:
    print(sorted(rates)[2])
dist.destroy_process_group()
"""


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MRHSCALE_DIST_TIMEOUT="120")
    try:
        import importlib.util

        have_stream = importlib.util.find_spec("mrhscale.training.stream") is not None
    except Exception:
        have_stream = False
    if not have_stream:
        env["MRHSCALE_STREAM"] = "helpers:StandInPatchStream"
        env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    return env


def _run(cmd: list[str], env: dict, tries: int = 2) -> subprocess.CompletedProcess:
    """Run a command; retry once (a torchrun --standalone port clash is transient)."""
    for k in range(tries):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode == 0:
            return p
        if k + 1 == tries:
            raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({p.returncode}): {p.stderr[-2000:]}")
    raise AssertionError("unreachable")


def bare(threads: int, depth: int, batch: int) -> float:
    out = _run([sys.executable, "-c", BARE, str(threads), str(depth), str(batch)], _env(threads))
    return float(out.stdout.strip().splitlines()[-1])


def bare_ddp(procs: int, depth: int, batch: int, work: str) -> float:
    script = os.path.join(work, "bare_ddp.py")
    with open(script, "w") as f:
        f.write(BARE_DDP)
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={procs}", script, str(depth), str(batch)], _env(1))
    return float(out.stdout.strip().splitlines()[-1])


def trainer(store: str, out: str, procs: int, threads: int, depth: int, batch: int,
            epochs: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cli = [os.path.join(os.path.dirname(sys.executable), "mrhscale"), "train", store, "--out", out,
           "--depth", str(depth), "--epochs", str(epochs), "--batch-size", str(batch),
           "--precision", "fp32", "--compile", "off", "-q"]  # eager, as the bare baseline (see bench_precision)
    if procs == 1:
        cmd = [*cli, "--threads", str(threads)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", "--no-python", *cli]
    for k in range(2):  # one retry from scratch (transient torchrun port clash)
        shutil.rmtree(out, ignore_errors=True)
        try:
            _run(cmd, _env(threads), tries=1)
            break
        except RuntimeError:
            if k:
                raise
    with open(os.path.join(out, "metrics.json")) as f:
        rows = json.load(f)["epochs"]
    return statistics.median(r["train_patches_per_s"] for r in rows[1:] or rows)


def run(full: bool = False, repeats: int = 3) -> list[dict]:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import make_patch_store

    depth, batch, epochs = 5, 128, 3
    n = 65536 if full else 8192
    work = tempfile.mkdtemp(prefix="mrh-bench-train-")
    try:
        store = make_patch_store(os.path.join(work, "patches.zarr"), n_train=n, n_val=512,
                                 n_channels=67, chunk=1024)
        res: dict[str, list[float]] = {
            k: [] for k in ("bare2", "bare1", "bare_ddp", "t1p2t", "t1p1t", "t2p")}
        for _ in range(repeats):  # interleaved: others share the machine
            res["bare2"].append(bare(2, depth, batch))
            res["t1p2t"].append(trainer(store, os.path.join(work, "r"), 1, 2, depth, batch, epochs))
            res["bare1"].append(bare(1, depth, batch))
            res["t1p1t"].append(trainer(store, os.path.join(work, "r"), 1, 1, depth, batch, epochs))
            res["bare_ddp"].append(bare_ddp(2, depth, batch, work))
            res["t2p"].append(trainer(store, os.path.join(work, "r"), 2, 1, depth, batch, epochs))
        m = {k: statistics.median(v) for k, v in res.items()}
        stream = "stand-in stream" if "MRHSCALE_STREAM" in _env(1) else "PatchStream"
        note = f"depth {depth}, 67 ch, batch {batch}, {n} patches/epoch, {stream}"
        eff = m["t2p"] / (2 * m["t1p1t"])
        return [
            row("train 1 process x 2 threads", m["t1p2t"], "patches/s",
                "bare model fwd+bwd, 2 threads", m["bare2"], target=">= 0.8 x bare",
                met=m["t1p2t"] >= 0.8 * m["bare2"], note=note),
            row("train 1 process x 1 thread", m["t1p1t"], "patches/s",
                "bare model fwd+bwd, 1 thread", m["bare1"], target=">= 0.8 x bare",
                met=m["t1p1t"] >= 0.8 * m["bare1"], note=note),
            row("train torchrun 2 processes x 1 thread (DDP gloo)", m["t2p"], "patches/s",
                "bare DDP model fwd+bwd, 2 processes x 1 thread", m["bare_ddp"],
                target=">= 0.8 x bare", met=m["t2p"] >= 0.8 * m["bare_ddp"], note=note),
            row("train torchrun 2 processes vs 1 process x 2 threads", m["t2p"], "patches/s",
                "train 1 process x 2 threads", m["t1p2t"], note=note),
            row("DDP scaling efficiency of the trainer (2 proc vs 2 x 1 proc, 1 thread each)",
                eff, "fraction", "same for the bare model under DDP",
                m["bare_ddp"] / (2 * m["bare1"]),
                note="2 cores shared with other work: the bare model's own scaling is the ceiling"),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    print_rows(run(full=a.full, repeats=a.repeats))
