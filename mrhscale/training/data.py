"""The training data: a patch store opened, streamed by rank, prefetched, normalised for the model."""

from __future__ import annotations

import importlib
import inspect
import os
import queue
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mrhscale.errors import MRHError
from mrhscale.parallel.context import Context
from mrhscale.stores import PatchStore
from mrhscale.stores.patches import identity
from mrhscale.training.cache import CacheChoice, PatchCache, choose
from mrhscale.training.stream import PatchStream, StreamOptions

if TYPE_CHECKING:  # the loop imports this module
    from mrhscale.training.loop import Runtime


def read_patch_store_attrs(url: str, ctx: Context | None = None) -> dict:
    """Root attrs of a COMPLETE patch store, or an MRHError saying what is wrong."""
    store = PatchStore.open((ctx or Context()).location(url))
    store.split("train")
    return store.attrs


def check_resume_store(ckpt: dict, store: dict, patches: str, out_dir: str) -> None:
    """A run resumes only on the patch store it was trained on (it may have moved)."""
    was, now = ckpt.get("patch_store"), identity(store)
    if was and was.get("fingerprint") != now["fingerprint"]:
        raise MRHError(
            f"--resume: {out_dir} was trained on another patch store (target {was.get('target')!r}, "
            f"{was.get('fingerprint', '?')[:19]}); {patches} holds target {now['target']!r} "
            f"({now['fingerprint'][:19]}); resume with the run's own patches, or start a new run "
            "with another --out")


def stream_class():
    """The PatchStream class; MRHSCALE_STREAM=module:Class substitutes another (tests, plugins)."""
    spec = os.environ.get("MRHSCALE_STREAM")
    if spec:
        mod, _, name = spec.partition(":")
        return getattr(importlib.import_module(mod), name or "PatchStream")
    return PatchStream


class _Failed:
    def __init__(self, exc):
        self.exc = exc


def prefetched(iterable, depth: int = 3):
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead, order preserved.

    Reading and normalising the next batch (zarr + numpy, which release the GIL)
    overlaps the forward/backward of the current one without worker processes.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterable:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # re-raised in the consumer
            put(_Failed(e))

    th = threading.Thread(target=work, name="mrhscale-prefetch", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        th.join(timeout=10)


def spare_core(device: torch.device) -> bool:
    """Whether a prefetch thread can run beside the compute without stalling it.

    On CPU, torch's OpenMP threads spin at barriers: one more busy thread on a
    fully used machine slowed training 10x in measurements, so prefetch only
    when this node's processes leave a core free (always on GPU).
    """
    if device.type == "cuda":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return torch.get_num_threads() * local_world < cores


class Batches:
    """A stream (or the patch cache standing in for it) plus an optional per-channel affine
    correction to the model's normalisation; ``cache``: what was chosen and why."""

    def __init__(self, stream, correction, device, workers, pin, cache: CacheChoice | None = None):
        self.stream, self.device = stream, device
        self.a, self.b = (None, None) if correction is None else correction
        if self.a is not None:
            self.a = self.a.to(device).view(1, -1, 1, 1)
            self.b = self.b.to(device).view(1, -1, 1, 1)
        self.workers, self.pin = workers, pin
        self.cache = cache

    def batches(self, epoch: int, start: int = 0):
        """The epoch's batches from its global batch ``start`` (a resumed epoch): a stream
        that can start there reads nothing before it; another is read and skipped."""
        skip = start
        if "start" in inspect.signature(self.stream.set_epoch).parameters:
            self.stream.set_epoch(epoch, start)
            skip = 0
        else:
            self.stream.set_epoch(epoch)
        if isinstance(self.stream, PatchCache):  # resident: a gather per batch, on the device
            src = prefetched(self.stream) if self.device.type == "cpu" and spare_core(self.device) else self.stream
        elif self.workers > 0:
            src = torch.utils.data.DataLoader(
                self.stream, batch_size=None, num_workers=self.workers, pin_memory=self.pin,
                prefetch_factor=4, persistent_workers=False)
        elif spare_core(self.device):
            src = prefetched(self.stream)
        else:
            src = self.stream
        try:
            for k, (x, t) in enumerate(src):
                if k < skip:
                    continue
                x = torch.as_tensor(x).to(self.device, non_blocking=True)
                t = torch.as_tensor(t).to(self.device, non_blocking=True)
                if self.a is not None:
                    x = torch.addcmul(self.b, x, self.a)
                yield x, t
        finally:
            if hasattr(src, "close"):
                src.close()  # stop a prefetch thread early (SIGTERM mid-epoch)


def open_data(cfg, rt: Runtime, split: str, batch: int, device: torch.device, *, norm=None, rank: int = 0,
              world: int = 1, workers: int = 0) -> Batches:
    """``split`` of the run's patch store (``cfg.patches``, reached with ``rt``'s storage options)
    in batches of ``batch`` on ``device``: this rank's share, read by ``workers`` DataLoader
    processes, normalised as ``norm`` says (None: the store's own statistics); held resident
    on ``device`` instead when ``rt.cache`` says so (training/cache.py: the same batches)."""
    url = cfg.patches
    cls = stream_class()
    params = inspect.signature(cls).parameters
    kw: dict[str, Any] = {"split": split, "batch_size": batch, "shuffle": split == "train",
                          "seed": cfg.seed, "rank": rank, "world_size": world}
    if rt.storage_options is not None:
        kw["ctx"] = rt.context()
    if split != "train" and "drop_last" in params:
        kw["drop_last"] = False
    if "options" in params:  # a reader thread only where it cannot stall torch's threads
        kw["options"] = StreamOptions(shuffle_buffer=cfg.shuffle_buffer or None,
                                      read_ahead=workers == 0 and spare_core(device),
                                      pin_memory=device.type == "cuda" and workers == 0)
    correction = None
    if norm is not None and "norm" in params:
        kw["norm"] = norm
        stream = cls(url, **kw)
    else:
        stream = cls(url, **kw)
        if norm is not None:
            # Stream normalised with its store's stats s: x_s = (x - o_s)/s_s. The model
            # wants (x - o_m)/s_m = x_s * s_s/s_m + (o_s - o_m)/s_m. Targets keep the store's.
            sn = stream.norm
            o_s, s_s = np.asarray(sn.offset, np.float64), np.asarray(sn.scale, np.float64)
            o_m, s_m = np.asarray(norm.offset, np.float64), np.asarray(norm.scale, np.float64)
            correction = (torch.tensor(s_s / s_m, dtype=torch.float32),
                          torch.tensor((o_s - o_m) / s_m, dtype=torch.float32))
    cache = None
    if type(stream) is PatchStream:  # a substituted stream (MRHSCALE_STREAM, a subclass) is streamed as it is
        cache = choose(getattr(rt, "cache", "auto") or "auto", stream, device)
        if cache.resident:
            stream = PatchCache(stream, device, two_threads=spare_core(device))
    return Batches(stream, correction, device, workers, device.type == "cuda", cache)
