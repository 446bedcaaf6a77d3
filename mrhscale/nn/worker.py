"""The network on a worker: loaded from its bundle in the planned numerics, compiled and
warmed up once per process, and run over the patches of a block.

A Dask task asks ``network(spec)`` for a ready network. ``spec`` (a ``NetworkSpec``)
names the bundle and how to read it (``io.bundle.load_model``: nn does not import io,
which builds nn's networks), the device, torch threads, the batch and the numerics the
driver planned; the process keeps the network (an lru_cache keyed by the bundle's path, size
and mtime: workers must be able to read that path, and a changed file loads again), on
the worker's own GPU in an embedded GPU cluster. ``prepare`` loads it before the first
block and reports what the worker runs after any fall-back (a compile that fails runs
eager); on a cluster the driver cannot see, it first resolves the request for the
worker's own hardware. predict, ``predict_volume`` and importance share this.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Callable

import numpy as np
import torch

from mrhscale.errors import MRHError
from mrhscale.nn.accel import Acceleration, InferenceModel, plan
from mrhscale.nn.gather import batches
from mrhscale.nn.model import mean_and_spread
from mrhscale.nn.ood import InputDistance
from mrhscale.ops.blocks import warm_gather
from mrhscale.ops.symmetry import symmetric_mean
from mrhscale.options import Numerics
from mrhscale.parallel.cluster import tune_malloc, worker_device

_LOADS = 0  # networks loaded by this process (tests check: once per worker, not per block)
_LOAD_LOCK = threading.Lock()  # lru_cache may build twice when two threads miss at once


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """Which network a task runs and how: small, picklable, hashable (the cache's key).
    ``load(path, device=, ensemble=True) -> (network, metadata)`` reads the bundle (a
    module-level function: tasks pickle it by name); ``precision``/``compile``: the
    numerics planned (default: eager fp32, the reference)."""

    path: str
    load: Callable
    device: str = "cpu"
    threads: int | None = None
    batch_size: int = 4096
    precision: str = "fp32"
    compile: bool = False

    def planned(self, accel: Acceleration) -> NetworkSpec:
        return dataclasses.replace(self, precision=accel.precision, compile=accel.compile)

    @property
    def accel(self) -> Acceleration:
        return Acceleration(self.precision, self.compile)


def network(spec: NetworkSpec, strict: bool = False) -> InferenceModel:
    """The bundle's network as this process runs it, loaded and compiled once per process
    (``strict``: a failing compile is an error, not a fall-back: ``--compile on``)."""
    st = os.stat(spec.path)
    key = (spec.precision, spec.compile)
    with _LOAD_LOCK:
        model = _cached(spec.load, os.path.abspath(spec.path), st.st_size, st.st_mtime_ns,
                        worker_device(spec.device), spec.threads, key,
                        spec.batch_size if spec.compile else 0)  # eager: any batch
    return model.warm_up(strict=strict)


@functools.lru_cache(maxsize=8)
def _cached(load: Callable, path: str, size: int, mtime_ns: int, device: str, threads: int | None,
            mode: tuple[str, bool], batch_size: int) -> InferenceModel:
    global _LOADS
    tune_malloc()  # Dask workers start with a malloc setting that halves torch's speed
    if threads:
        torch.set_num_threads(int(threads))
    model, meta = load(path, device=device, ensemble=True)
    runner = inference_model(model, meta, Acceleration(*mode), device, batch_size)
    warm_gather()
    _LOADS += 1
    return runner


def inference_model(model, meta: dict, accel: Acceleration, device: str, batch_size: int) -> InferenceModel:
    """``model`` (of bundle ``meta``) as inference runs it in ``accel``; ``warm_up`` compiles it."""
    runner = InferenceModel(model, accel, device, batch_size, example=(len(meta["channels"]), patch_size(meta)))
    if "whiten" in (meta.get("ood") or {}):  # the score beside the network on its device (an export's is in it)
        runner.ood = InputDistance.from_record(meta["ood"]).to(device)
    return runner


def prepare(spec: NetworkSpec, request: Numerics | None = None, patches: int = 0, strict: bool = False) -> dict:
    """In a worker, before any block: the network loaded and compiled now. With ``request``
    (a cluster the driver cannot see), the numerics are first planned for this worker's own
    device and a job of ``patches`` passes. Returns ``device`` (False: a cuda spec on a worker
    without a GPU, nothing loaded), ``planned`` and ``used`` (after any fall-back) records."""
    if spec.device != "cpu" and not torch.cuda.is_available():
        return {"device": False}
    accel = plan(request, worker_device(spec.device), patches) if request is not None else spec.accel
    used = network(spec.planned(accel), strict=strict).accel
    return {"device": True, "planned": accel.record(), "used": used.record()}


def load_count() -> int:
    return _LOADS


def patch_size(meta: dict) -> int:
    patch = meta.get("patch") or {}
    return int(patch.get("size", 2 * int(patch.get("half", 1)) + 1))


def check_device(device: str) -> str:
    """``device`` if torch can use it here (cpu, cuda, cuda:N), else the user's error."""
    d = str(device)
    if d == "cpu":
        return d
    if d == "cuda" or d.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MRHError(f"--device {d}: no CUDA GPU is visible to torch here; use --device cpu")
        if ":" in d:
            try:
                k = int(d.split(":", 1)[1])
            except ValueError:
                raise MRHError(f"--device {d}: expected cuda or cuda:N") from None
            if k >= torch.cuda.device_count():
                raise MRHError(f"--device {d}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return d
    raise MRHError(f"--device {d}: expected cpu, cuda or cuda:N")


def forward(model: InferenceModel, patches, centres, *, batch_size: int, half: int, centre: bool,
            tta: bool = False, ensemble: bool = False, ood: bool = False) -> np.ndarray:
    """The network (normalised units) at ``centres`` (s, r, q in the block's frame), whose
    patches ``patches(s, r, q)`` gathers (``nn.gather.block_patches``: on the network's
    device, or into reused buffers on the CPU, the next batch while this one runs): [N, V]
    (``centre``) or [N, V, P, P] (the whole outputs); V = the stains, or twice that for an
    ``ensemble`` (its members' means, then their pooled spreads), then with ``ood`` the
    patch's out-of-distribution score (``nn.ood``). Everything per batch stays on the
    device; one copy back per block. ``tta``: the mean over the 8 symmetries."""
    h, n_t = half, getattr(getattr(model, "model", model), "n_stains", None)
    preds = []
    with torch.inference_mode():
        for x in batches(patches, centres, batch_size, model.device):
            y = (symmetric_mean(model, x) if tta else model(x)).float()
            y = torch.cat(mean_and_spread(y, n_t), 1) if ensemble else y
            y = torch.cat([y, model.ood(x)], 1) if ood else y
            y = y[:, :, h, h] if centre else y
            # x's buffer is refilled two batches on: keep nothing that shares it
            preds.append(y.clone() if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() else y)
    return torch.cat(preds).cpu().numpy()
