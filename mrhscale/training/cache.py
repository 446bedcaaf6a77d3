"""Resident patches: a split loaded once, normalised, into device memory (or host RAM on
the CPU), and batches drawn there in exactly the stream's order.

When the split fits (``train --cache auto``: its float32 bytes within a fraction of the
device's free memory, or of the host's available RAM shared by this node's processes),
reading, decoding and normalising happen once per run instead of once per epoch, and a
batch is one gather on the device (``index_select``; on the CPU a compiled row copy).
The batches are the stream's own: :meth:`PatchStream.batch_plan` says which store rows
make this rank's slice of each global batch for (seed, epoch, rank, world size), and the
rows were normalised by :meth:`PatchStream.normalise`, so a run gives the same samples
in the same order, with the same bits, whatever the cache choice (tested). The order
does not depend on the stream's DataLoader workers (they take global batches in turn).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from mrhscale.errors import MRHError
from mrhscale.options import CACHE_MODES
from mrhscale.training.stream import PatchStream, batch_rows, take_rows

CACHE_BUDGET = 0.5  # the fraction of free device memory (available host RAM) a cache may take


@dataclass(frozen=True)
class CacheChoice:
    """Whether a split is held resident, where, and why (the run records it)."""

    resident: bool
    where: str  # "cuda:0", "cpu" or "" when streamed
    bytes: int
    reason: str

    def record(self) -> dict:
        return {"resident": self.resident, "where": self.where, "bytes": self.bytes, "reason": self.reason}


def resident_bytes(stream: PatchStream) -> int:
    """The bytes a split takes resident: float32 inputs and targets (and origin rows)."""
    per = 4 * (int(np.prod(stream.shape_of("inputs"))) + int(np.prod(stream.shape_of("targets"))))
    return stream.num_samples * (per + (16 if stream.with_origin else 0))


def free_bytes(device: torch.device) -> int:
    """Memory a cache may come out of: the device's free memory, or on the CPU the host's
    available RAM shared by this node's training processes (each holds its own copy)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return avail // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def choose(request: str, stream: PatchStream, device: torch.device) -> CacheChoice:
    """``request`` (auto, on, off) resolved for ``stream``'s split on ``device``."""
    if request not in CACHE_MODES:
        raise MRHError(f"--cache {request!r}: must be auto, on or off")
    need = resident_bytes(stream)
    where = str(device)
    if request == "off":
        return CacheChoice(False, "", need, "--cache off")
    if request == "on":
        return CacheChoice(True, where, need, "--cache on")
    free = free_bytes(device)
    fits = need <= CACHE_BUDGET * free
    why = (f"{need / 2**20:.0f} MiB {'within' if fits else 'over'} {CACHE_BUDGET:g} of the "
           f"{free / 2**20:.0f} MiB free on {where}")
    return CacheChoice(fits, where if fits else "", need, why)


class PatchCache:
    """A stream's split resident on ``device``; iterates like the stream (the same batches
    in the same order, with or without DataLoader workers), the tensors on ``device``."""

    def __init__(self, stream: PatchStream, device: torch.device, *, two_threads: bool = False):
        self.stream, self.device = stream, torch.device(device)
        self.two_threads = two_threads  # on the CPU, gather each batch's halves on two threads (a spare core)
        self.num_samples, self.batch_size = stream.num_samples, stream.batch_size
        self.x, self.t, self.origin = _load(stream, self.device)

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.stream.set_epoch(epoch, start)

    def steps_per_epoch(self) -> int:
        return self.stream.steps_per_epoch()

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def rows(self):
        """The store rows of each batch this epoch, in the order the stream yields them."""
        return batch_rows(self.stream.batch_plan())

    def __iter__(self):
        arrays = (self.x, self.t, *(() if self.origin is None else (self.origin,)))
        if self.device.type == "cuda":
            for idx in self.rows():
                i = torch.from_numpy(idx).to(self.device, non_blocking=True)
                yield tuple(a.index_select(0, i) for a in arrays)
            return
        src = [a.numpy() for a in arrays]  # torch's CPU index_select measured ~10x slower than a row copy
        pool = ThreadPoolExecutor(1, thread_name_prefix="PatchCache-gather") if self.two_threads else None
        try:
            for idx in self.rows():
                out = [np.empty((len(idx), *a.shape[1:]), a.dtype) for a in src]
                h = len(idx) // 2 if pool is not None else 0
                job = pool.submit(_gather, src, idx[h:], [o[h:] for o in out]) if h else None
                _gather(src, idx[:h] if h else idx, [o[:h] for o in out] if h else out)
                if job is not None:
                    job.result()
                yield tuple(torch.from_numpy(o) for o in out)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)


def _gather(src, idx, out) -> None:
    for a, o in zip(src, out, strict=True):
        take_rows(a, idx, o)


def _load(stream: PatchStream, device: torch.device):
    """The split read chunk by chunk, normalised by the stream, into tensors on ``device``."""
    arrays = stream.open_readers()
    n, nc = stream.num_samples, stream.chunk_rows
    x = torch.empty((n, *stream.shape_of("inputs")), dtype=torch.float32, device=device)
    t = torch.empty((n, *stream.shape_of("targets")), dtype=torch.float32, device=device)
    origin = (torch.empty((n, 4), dtype=torch.int32, device=device) if stream.with_origin else None)
    bufs = [np.empty((nc, *a.shape[1:]), a.dtype) for a in arrays]
    cuda = device.type == "cuda"
    if cuda:  # a page-locked staging chunk: the copies to the device run asynchronously
        sx = torch.empty((nc, *x.shape[1:]), pin_memory=True)
        st = torch.empty((nc, *t.shape[1:]), pin_memory=True)
    for a in range(0, n, nc):
        e = min(n, a + nc)
        raw = [buf[:e - a] for buf in bufs]
        for arr, buf in zip(arrays, raw, strict=True):
            arr.read(a, e, buf)
        idx = np.arange(e - a, dtype=np.int64)
        if cuda:
            torch.cuda.current_stream(device).synchronize()  # the previous chunk's copy is done
            stream.normalise(raw, idx, sx.numpy()[:e - a], st.numpy()[:e - a])
            x[a:e].copy_(sx[:e - a], non_blocking=True)
            t[a:e].copy_(st[:e - a], non_blocking=True)
        else:
            stream.normalise(raw, idx, x[a:e].numpy(), t[a:e].numpy())
        if origin is not None:
            origin[a:e].copy_(torch.from_numpy(raw[2]))
    if cuda:
        torch.cuda.current_stream(device).synchronize()
    return x, t, origin
