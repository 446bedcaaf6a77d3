"""GPU readiness, checked on the CPU: one Dask worker per GPU, each on its own device, and the
GPU self-check script (its CPU mode runs the same steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from mrhscale.errors import MRHError
from mrhscale.parallel.cluster import GPU_ENV, PinGPU, gpu_client, worker_device

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_each_worker_takes_its_own_gpu(monkeypatch):
    monkeypatch.delenv(GPU_ENV, raising=False)
    assert worker_device("cuda") == "cuda"  # not pinned: torch's current device
    plugin = PinGPU(2)
    seen = []
    for name in (0, 1, 2, "3"):
        plugin.setup(SimpleNamespace(name=name))
        seen.append(worker_device("cuda"))
    assert seen == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert worker_device("cuda:3") == "cuda:3" and worker_device("cpu") == "cpu"  # explicit devices stay


def test_gpu_cluster_is_one_pinned_worker_per_device(monkeypatch):
    import logging

    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(MRHError, match="no CUDA GPU"), gpu_client(None, logging.ERROR):
        pass
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with gpu_client(None, logging.ERROR) as client:  # dask-cuda absent here: LocalCluster + PinGPU
        pinned = client.run(lambda: os.environ.get(GPU_ENV))
    assert sorted(pinned.values()) == ["0", "1"]


def test_gpu_check_without_a_gpu_says_so():
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--gpu-check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real check is for benchmarks/RESULTS.md")
    assert r.returncode == 2 and "no CUDA GPU" in r.stdout


@pytest.mark.slow
def test_gpu_check_steps_run_on_the_cpu():
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--gpu-check", "--cpu"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "world size 2" in r.stdout and "torchrun train, 2 ranks" in r.stdout
    assert "predict --device cpu" in r.stdout and "max |difference|" in r.stdout
