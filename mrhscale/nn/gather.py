"""The predict data path on the network's device: a block's patches gathered, normalised
and batched where the network runs.

``DevicePatches`` uploads a raw block once, normalises it there as one slab (torch ops,
cuda or cpu alike) with the volume's zero padding around it, and gathers each batch's
patches from it by index: on a GPU the CPU only reads, decodes and writes. On the CPU,
``ops.blocks.BlockPatches`` (the compiled gather, no whole-block pass) is the lean path;
``batches`` fills it into two reused buffers, the next batch gathered in a thread while
the network runs the current one when a core is free for it. Both give the same bits as
``ops.blocks.normalise_block``: ``(raw - offset) * inv_scale`` in float32, NaN/inf -> 0,
outside the volume the normalised raw 0.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import warnings

import numpy as np
import torch

from mrhscale.ops.blocks import BlockPatches, edge_values

_POOL: concurrent.futures.ThreadPoolExecutor | None = None  # one gather thread per process
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()  # each task thread's two patch buffers, reused block after block


class DevicePatches:
    """Normalised patches of one raw block ``mri`` (x, y, z, contrast; axes ``order`` slice
    axis first) gathered on ``device``: ``patches(s, r, q)`` -> ``[n, C, P, P]`` float32 there.
    Device memory: the raw block and its normalised, padded slab while the block runs."""

    def __init__(self, mri: np.ndarray, order, offset, inv_scale, half: int, device):
        self.device, self.h = torch.device(device), int(half)
        h = self.h
        with warnings.catch_warnings():  # a read-only block is only read
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.asarray(mri)).to(self.device).permute(*order, 3)
        S, R, Q, C = raw.shape
        off = torch.from_numpy(np.asarray(offset, np.float32)).to(self.device)
        inv = torch.from_numpy(np.asarray(inv_scale, np.float32)).to(self.device)
        edge = torch.from_numpy(edge_values(offset, inv_scale)).to(self.device)
        slab = edge.expand(S, R + 2 * h, Q + 2 * h, C).clone()  # the volume's zero padding, normalised
        inner = slab[:, h : h + R, h : h + Q]
        inner.copy_(raw)  # float32 as np.float32 rounds
        inner.sub_(off).mul_(inv)
        inner.masked_fill_(~torch.isfinite(inner), 0.0)
        self.flat, self.rows, self.cols, self.channels = slab.view(-1, C), R + 2 * h, Q + 2 * h, C
        d = torch.arange(-h, h + 1, device=self.device)
        self.offs = (d[:, None] * self.cols + d[None, :]).reshape(-1)  # the P*P positions, row-major

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        p = 2 * self.h + 1
        return (self.channels, p, p)

    def __call__(self, s, r, q) -> torch.Tensor:
        s, r, q = (torch.as_tensor(np.asarray(a), dtype=torch.int64).to(self.device) for a in (s, r, q))
        base = (s * self.rows + r + self.h) * self.cols + q + self.h
        g = self.flat.index_select(0, (base[:, None] + self.offs[None, :]).reshape(-1))
        return g.view(len(s), -1, self.channels).permute(0, 2, 1).contiguous().view(len(s), *self.patch_shape)


def block_patches(mri: np.ndarray, order, offset, inv_scale, half: int, device):
    """The patch source of a block for a network on ``device``: gathered on the device
    (``DevicePatches``) off the CPU, the compiled CPU gather (``BlockPatches``) on it."""
    if torch.device(device).type == "cpu":
        return BlockPatches(mri, order, offset, inv_scale, half)
    return DevicePatches(mri, order, offset, inv_scale, half, device)


def batches(patches, centres, batch_size: int, device, prefetch: bool | None = None):
    """The batches of ``centres`` (s, r, q) as tensors on ``device``, in order.

    A device-side source gathers each where it is. A CPU source (``BlockPatches``) fills
    two buffers of this thread, reused across batches and blocks (a fresh batch-sized array
    is page-faulted in whenever malloc maps new pages for it, as in a worker that keeps
    Dask's 128 KiB mmap threshold: 2-5 us a patch then, against 0.5); with ``prefetch`` the next
    batch is gathered in the gather thread while the caller runs the current one. A buffer is
    refilled only after the caller has asked for the batch after next, so it must be done
    with a batch (and hold nothing that aliases it) before asking for the next one.
    ``prefetch`` None: when the network is off the CPU or leaves a core free (``free_core``)."""
    s, r, q = centres
    bounds = [slice(a, a + batch_size) for a in range(0, len(s), batch_size)]
    device = torch.device(device)
    if not isinstance(patches, BlockPatches):  # on the device already (or any callable's arrays)
        for b in bounds:
            x = patches(s[b], r[b], q[b])
            yield x if isinstance(x, torch.Tensor) else torch.from_numpy(x).to(device)
        return
    bufs = _buffers(min(batch_size, len(s)), patches.patch_shape)

    def fill(k: int) -> np.ndarray:
        b = bounds[k]
        return patches(s[b], r[b], q[b], out=bufs[k % 2][: len(s[b])])

    pool = _pool() if (free_core(device) if prefetch is None else prefetch) and len(bounds) > 1 else None
    nxt = pool.submit(fill, 0) if pool else None
    for k in range(len(bounds)):
        x = nxt.result() if pool else fill(k)
        if pool and k + 1 < len(bounds):
            nxt = pool.submit(fill, k + 1)
        try:
            yield torch.from_numpy(x).to(device)
        except GeneratorExit:
            if pool and k + 1 < len(bounds):
                nxt.result()  # the gather thread is done with the buffer before it is reused
            raise


def free_core(device) -> bool:
    """Whether a gather thread runs beside the network without taking its cores: the network
    is on another device, or torch's threads leave one of this process's cores free."""
    if torch.device(device).type != "cpu":
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return torch.get_num_threads() < cores


def _buffers(n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """This thread's two ``[n, *shape]`` float32 buffers (kept for the next block; one size at a time)."""
    have = getattr(_LOCAL, "bufs", None)
    if have is None or have[0].shape[1:] != shape or have[0].shape[0] < n:
        have = _LOCAL.bufs = tuple(np.empty((n, *shape), np.float32) for _ in range(2))
    return have


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mrhscale-gather")
        return _POOL
