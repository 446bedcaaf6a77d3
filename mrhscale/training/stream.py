"""PatchStream: a patch store streamed to torch, sharded across DDP ranks and DataLoader workers.

Use with ``DataLoader(stream, batch_size=None, num_workers=W)``: the dataset
yields whole batches ``(inputs [B, C, P, P], targets [B, T, P, P])`` as float32
tensors (T stains, NaN where a patch lacks one), normalised with the statistics stored in the patch store (so the
trainer and the model bundle use exactly those).

Epoch plan. The store is already globally shuffled. Each epoch the chunk order
is permuted (seed, epoch); the chunks laid end to end form the epoch's sample
sequence, which is cut into contiguous ranges, one per rank and, within a rank,
one per DataLoader worker (whole batches each). Every sample therefore belongs
to exactly one (rank, worker) and ranges follow chunk boundaries except at the
cut points. A worker reads its chunks in order through zarr (local or remote
store alike) into a bounded shuffle buffer: windows of whole chunks holding
about ``shuffle_buffer`` patches are permuted and cut into batches (the store
itself is already globally shuffled; this adds per-epoch variety). zarr decodes
each window straight into a preallocated buffer (no per-chunk temporaries or
concatenation). Batches are normalised in one fused pass and, in DataLoader
workers, built in shared memory so handing them to the main process copies
nothing. ``read_ahead=True`` reads the next window in a background thread while
the current one is cut into batches: on a machine with a spare core this
overlaps I/O and decoding with the consumer without any process hand-off (the
DataLoader's per-batch inter-process hand-off has a fixed cost that caps its
rate on few cores: see benchmarks/RESULTS.md). Leave it off where the consumer
already uses every core (CPU training: torch's threads spin while waiting).

Policies:
- ``drop_last=True`` (equal steps, for DDP training): every rank gets exactly
  ``N // (world_size * batch_size)`` full batches; the remainder (fewer than
  ``world_size * batch_size`` samples) is dropped for this epoch. As the chunk
  order changes every epoch, a different tail is dropped each time.
- ``drop_last=False`` (exact): every sample is yielded exactly once across the
  whole job; ranks get N // world or one more samples, so their batch counts
  may differ by one; the last batch of a rank may be short. Use for validation.

``set_epoch(e)`` must be called before each epoch's iterator is created; with
``persistent_workers=True`` the workers keep the epoch they started with.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from mrhscale.errors import MRHError
from mrhscale.ops.norm import Normalisation
from mrhscale.parallel.context import Context
from mrhscale.stores import PatchStore
from mrhscale.stores.legacy import stains_of

VARS = ("inputs", "targets", "origin")
_READ_THREADS = 4  # concurrent zarr chunk reads per iterator (they mostly wait on I/O)
_EMIT_MIN_ROWS = 512  # a batch is split over two threads when each half has at least this many


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def open_patch_store(url: str, ctx: Context | None = None):
    """The root group of a complete patch store (MRHError otherwise); ``ctx``: its storage options."""
    return PatchStore.open((ctx or Context()).location(url)).root()


@dataclass(frozen=True)
class StreamOptions:
    """How a PatchStream reads (not which samples it yields): see the module docstring."""

    shuffle_buffer: int | None = None  # patches per permuted window (default: 4096 or two chunks)
    with_origin: bool = False  # also yield each patch's origin row (subject index, x, y, z)
    read_ahead: bool = False  # read the next window in a background thread (where a core is free)
    pin_memory: bool = False  # in-process batches in page-locked memory (CUDA only; ignored elsewhere)


class PatchStream(IterableDataset):
    """Batches of normalised patches from a patch store; see the module docstring.

    ``ctx``: where the store lives (its storage options); ``options``: :class:`StreamOptions`.
    """

    def __init__(
        self,
        url: str,
        split: str = "train",
        batch_size: int = 128,
        shuffle: bool = True,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = True,
        norm: Normalisation | None = None,
        options: StreamOptions | None = None,
        ctx: Context | None = None,
    ):
        super().__init__()
        o = options or StreamOptions()
        if split not in ("train", "val"):
            raise MRHError(f"split must be 'train' or 'val', got {split!r}")
        if batch_size < 1:
            raise MRHError(f"batch_size must be >= 1, got {batch_size}")
        self.url = str(url)
        self.split = split
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.ctx = Context(storage_options=ctx.storage_options) if ctx else None  # no client: it pickles
        self.with_origin = o.with_origin
        self.read_ahead = bool(o.read_ahead)
        self.pin_memory = bool(o.pin_memory) and torch.cuda.is_available()
        self.epoch = 0
        root = open_patch_store(self.url, self.ctx)
        attrs = dict(root.attrs)
        self.attrs = attrs
        self.channels = list(attrs["channels"])
        self.patch = dict(attrs["patch"])
        self.stains = stains_of(attrs)
        self.norm = Normalisation.from_dict(attrs["norm"]) if norm is None else norm
        arr = root[f"{split}/inputs"]
        self.num_samples = int(arr.shape[0])
        self.chunk_rows = int(arr.chunks[0])
        self.dtype = np.dtype(arr.dtype)
        if rank is None or world_size is None:
            r, w = _dist_rank_world()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise MRHError(f"rank {rank} out of range for world_size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle_buffer = int(o.shuffle_buffer if o.shuffle_buffer is not None
                                  else max(4096, 2 * self.chunk_rows))
        if self.drop_last and self.steps_per_epoch() == 0:
            raise MRHError(
                f"{url}: {split} split has {self.num_samples} patches, fewer than world_size x batch_size "
                f"= {self.world_size * self.batch_size}; lower the batch size or use drop_last=False"
            )
        self._off, self._inv = subject_tables(self.norm, attrs, url)  # [S, C]: a row per subject
        q = int(self.patch["size"]) ** 2  # per (contrast, voxel) copies for the fused kernel
        self._offx, self._invx = np.repeat(self._off, q, axis=1), np.repeat(self._inv, q, axis=1)
        self._off = self._off[:, :, None, None]
        self._inv = self._inv[:, :, None, None]
        self._by_subject = len(self._off) > 1
        self._arrays = None
        self._in_worker = False
        self._emit_pool = None
        self._mapped = None  # the arrays mapped from the chunk files (False: they cannot be)
        self._blocks = _Blocks()

    # ---- bookkeeping
    def __getstate__(self):
        d = dict(self.__dict__)
        d["_arrays"] = None  # reopened in each worker
        d["_emit_pool"] = None
        d["_mapped"] = None
        d["_blocks"] = _Blocks()
        return d

    def shape_of(self, var: str) -> tuple[int, ...]:
        """One sample's shape in ``inputs`` ([C, P, P]) or ``targets`` ([T, P, P])."""
        p = int(self.patch["size"])
        return (len(self.channels), p, p) if var == "inputs" else (len(self.stains), p, p)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rank_range(self) -> tuple[int, int, int]:
        """(first sample, number of samples, number of batches) of this rank in the epoch sequence."""
        n, b, w, r = self.num_samples, self.batch_size, self.world_size, self.rank
        if self.drop_last:
            steps = n // (w * b)
            return r * steps * b, steps * b, steps
        base, rem = divmod(n, w)
        start = r * base + min(r, rem)
        count = base + (1 if r < rem else 0)
        return start, count, math.ceil(count / b)

    def steps_per_epoch(self) -> int:
        """Batches this rank yields per epoch (summed over its DataLoader workers)."""
        return self._rank_range()[2]

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def plan(self, worker: int = 0, num_workers: int = 1, epoch: int | None = None) -> list[tuple[int, int]]:
        """Row ranges [a, b) of the store this (rank, worker) reads in ``epoch``, in order."""
        epoch = self.epoch if epoch is None else epoch
        n, nc, b = self.num_samples, self.chunk_rows, self.batch_size
        start, count, steps = self._rank_range()
        per, extra = divmod(steps, num_workers)
        first_batch = worker * per + min(worker, extra)
        n_batches = per + (1 if worker < extra else 0)
        lo = start + first_batch * b
        hi = min(lo + n_batches * b, start + count)
        if hi <= lo:
            return []
        n_chunks = math.ceil(n / nc)
        order = (np.random.default_rng([self.seed, epoch]).permutation(n_chunks) if self.shuffle
                 else np.arange(n_chunks))
        lens = np.minimum(nc, n - order * nc)
        ends = np.cumsum(lens)
        begins = ends - lens
        segs = []
        for k in range(int(np.searchsorted(ends, lo, side="right")), len(order)):
            if begins[k] >= hi:
                break
            a, e = max(lo, begins[k]), min(hi, ends[k])
            row0 = int(order[k]) * nc
            segs.append((row0 + int(a - begins[k]), row0 + int(e - begins[k])))
        return segs

    # ---- reading
    def open_readers(self):
        """The split's readers (stores.patches.RowReader): inputs, targets[, origin]."""
        if self._arrays is None:
            store = PatchStore.open((self.ctx or Context()).location(self.url))
            self._arrays = store.readers(self.split, origin=self.with_origin or self._by_subject)
        return self._arrays

    def mapped_arrays(self):
        """The split's arrays mapped from their chunk files (RowReader.mapped), kept for
        the process's later epochs; None where any of them cannot be."""
        if self._mapped is None:
            maps = [r.mapped() for r in self.open_readers()]
            self._mapped = maps if all(m is not None for m in maps) else False
        return self._mapped or None

    def _emit(self, arrs, idx):
        """One batch: gather rows ``idx`` and normalise into fresh float32 tensors (in
        shared memory in a DataLoader worker, page-locked where ``pin_memory`` asks)."""
        n = len(idx)
        shape = (n, *arrs[0].shape[1:])
        t_shape = (n, *arrs[1].shape[1:])
        nx, nt = int(np.prod(shape)), int(np.prod(t_shape))
        if self._in_worker:  # inputs and targets born in ONE shared-memory block: the DataLoader
            flat = torch.empty(nx + nt, dtype=torch.float32).share_memory_()  # sends one handle
        elif self.pin_memory:  # page-locked on CUDA: the copy to the device is then asynchronous
            flat = torch.empty(nx + nt, dtype=torch.float32, pin_memory=True)
        else:  # a block nothing references any more, reused: a fresh one is page-faulted (x2-3 the emit)
            flat = torch.from_numpy(self._blocks.get(nx + nt))
        xt, tt = flat[:nx].view(shape), flat[nx:].view(t_shape)
        x, t = xt.numpy(), tt.numpy()
        pool = self._emit_pool
        if pool is None or n < 2 * _EMIT_MIN_ROWS:
            self.normalise(arrs, idx, x, t)
        else:  # halves on two threads (the kernel releases the GIL)
            h = n // 2
            job = pool.submit(self.normalise, arrs, idx[h:], x[h:], t[h:])
            self.normalise(arrs, idx[:h], x[:h], t[:h])
            job.result()
        out = (xt, tt)
        if self.with_origin:
            out = (*out, torch.from_numpy(take_rows(arrs[2], idx)))
        return out

    def normalise(self, arrs, idx, x: np.ndarray, t: np.ndarray) -> None:
        """Rows ``idx`` of the raw ``arrs`` (inputs, targets[, origin]) into ``x`` and ``t``
        (float32), normalised with the stream's statistics: the one place that does it
        (the stream's batches and the patch cache alike, so their values are the same bits)."""
        who = (arrs[2][idx, 0].astype(np.int64) if self._by_subject  # each row's subject: its own statistics
               else np.zeros(len(idx), np.int64))
        if _nb_norm is not None and arrs[0].dtype == np.float32:
            _nb_norm(arrs[0].reshape(len(arrs[0]), -1), idx, who, self._offx, self._invx,
                     x.reshape(len(idx), -1))
        elif _nb_norm is not None and arrs[0].dtype == np.float16:  # numba has no float16: its bits
            _nb_norm16(arrs[0].reshape(len(arrs[0]), -1).view(np.uint16), idx, who, self._offx, self._invx,
                       _HALF, x.reshape(len(idx), -1))
        else:
            if arrs[0].dtype == np.float32:
                take_rows(arrs[0], idx, x)
            else:
                np.copyto(x, take_rows(arrs[0], idx))
            np.subtract(x, self._off[who], out=x)
            np.multiply(x, self._inv[who], out=x)
        take_rows(arrs[1], idx, t)
        t_off, t_scale = self.norm.target_arrays(np.float64)
        shape = (-1, 1, 1)  # [B, T, P, P], NaN = a stain the patch lacks
        if t_off.any():
            np.subtract(t, t_off.astype(np.float32).reshape(shape), out=t)
        np.multiply(t, (1.0 / t_scale).astype(np.float32).reshape(shape), out=t)

    def batch_plan(self, worker: int = 0, num_workers: int = 1):
        """This (rank, worker)'s epoch as windows: ``(ranges, rows, carried, batches, rest)``
        each (see :func:`window_batches`); the same for every reader of the plan (the
        stream and the patch cache), so both yield the same samples in the same order."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 7])
        return window_batches(self.plan(worker, num_workers), self.shuffle_buffer, self.batch_size, rng,
                              self.shuffle)

    def __iter__(self):
        """Windows of whole chunks (about ``shuffle_buffer`` patches) are read, permuted and cut
        into batches; the < batch_size leftover of a window carries over to the next."""
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._in_worker = info is not None
        windows = list(self.batch_plan(worker, n_workers))
        if not windows:
            return
        mapped = self.mapped_arrays()
        if mapped is not None:  # no window to fill: each batch gathered from the page cache
            yield from self._mapped_batches(mapped, windows)
            return
        arrays = self.open_readers()
        b = self.batch_size
        plan = [(w[0], w[1]) for w in windows]
        rows = b + max(n for _, n in plan)  # carry (< b rows) goes in front of the window's rows
        ahead = bool(self.read_ahead) and len(plan) > 1
        pool = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="PatchStream-read")
        # where a core is spare (read_ahead says so), big batches are normalised on two threads
        self._emit_pool = pool if self.read_ahead and not self._in_worker else None
        filled = (_read_ahead(arrays, plan, rows, b, pool) if ahead
                  else _read_inline(arrays, plan, rows, b, pool))
        carry: list[np.ndarray] = []
        try:
            for (_, n_rows, k0, batches, rest), (bufs, _, release) in zip(windows, filled, strict=True):
                for buf, c in zip(bufs, carry, strict=False):
                    buf[b - k0:b] = c
                arrs = [buf[b - k0:b + n_rows] for buf in bufs]
                for idx in batches:
                    yield self._emit(arrs, idx)
                carry = [take_rows(x, rest) for x in arrs] if len(rest) else []
                release()
        finally:
            filled.close()
            self._emit_pool = None
            pool.shutdown(wait=True, cancel_futures=True)


    def _mapped_batches(self, mapped, windows):
        pool = ThreadPoolExecutor(1, thread_name_prefix="PatchStream-emit") if self.read_ahead else None
        self._emit_pool = None if self._in_worker else pool
        try:
            for idx in batch_rows(windows):
                yield self._emit(mapped, idx)
        finally:
            self._emit_pool = None
            if pool is not None:
                pool.shutdown(wait=True)


class _Blocks:
    """The in-process batches' memory, recycled: a block is handed out again only once no
    tensor, view or array refers to it (its reference count says so), else a new one is
    made; at most ``keep`` are held. Writing a batch into fresh memory page-faults every
    page: in a process whose large blocks glibc maps afresh, 2-3x the cost of the batch."""

    def __init__(self, keep: int = 4):
        self.keep, self.blocks = keep, [np.empty(1, np.float32)]
        for b in self.blocks:  # the count of a block nothing else holds, seen as get() sees it
            self.free = self._refs(b)
        self.blocks = []

    @staticmethod
    def _refs(b) -> int:
        return sys.getrefcount(b)

    def get(self, n: int) -> np.ndarray:
        for b in self.blocks:
            if len(b) == n and self._refs(b) <= self.free:
                return b
        b = np.empty(n, np.float32)
        self.blocks = [*self.blocks[-(self.keep - 1):], b] if self.keep > 1 else [b]
        return b


def window_batches(segs: list[tuple[int, int]], cap: int, b: int, rng: np.random.Generator, shuffle: bool):
    """The batches of a worker's row ranges ``segs``, window by window, as positions only.

    Yields ``(ranges, rows, carried, batches, rest)`` per window: its store ranges and
    row count; ``carried`` rows (< b) left by the previous window, which come first in
    the window's pending rows ``[carried rows, then the ranges' rows in order]``; the
    batches as index arrays into those pending rows (one permutation per window); and
    ``rest``, the positions carried to the next window (empty after the last, whose
    short batch is yielded instead). Pure: no data is read here.
    """
    plan = _windows(segs, cap, b)
    k0 = 0
    for k, (ranges, n_rows) in enumerate(plan):
        n_pend = k0 + n_rows
        order = rng.permutation(n_pend) if shuffle else np.arange(n_pend)
        full = n_pend // b
        batches = [order[i * b:(i + 1) * b] for i in range(full)]
        rest = order[full * b:]
        if k == len(plan) - 1:
            if len(rest):
                batches.append(rest)
            rest = rest[:0]
        elif not shuffle:
            rest = np.sort(rest)
        yield ranges, n_rows, k0, batches, rest
        k0 = len(rest)


def batch_rows(windows):
    """The store rows of each batch of :meth:`PatchStream.batch_plan`'s windows, in order
    (what the stream reads and emits, without reading: the patch cache draws these)."""
    carry = np.empty(0, np.int64)
    for ranges, _, _, batches, rest in windows:
        ids = np.concatenate([carry, *(np.arange(a, e, dtype=np.int64) for a, e in ranges)])
        for idx in batches:
            yield ids[idx]
        carry = ids[rest]


def _windows(segs: list[tuple[int, int]], cap: int, b: int) -> list[tuple[list[tuple[int, int]], int]]:
    """Group a worker's row ranges into shuffle windows: (ranges, rows) each.

    A window closes once it holds >= cap + b patches counting the carry from
    the previous one (its n % b leftover), or at the end.
    """
    out, cur, n_cur, carry = [], [], 0, 0
    for k, (a, e) in enumerate(segs):
        cur.append((a, e))
        n_cur += e - a
        if carry + n_cur < cap + b and k != len(segs) - 1:
            continue
        out.append((cur, n_cur))
        carry = (carry + n_cur) % b
        cur, n_cur = [], 0
    return out


def _alloc(arrays, rows: int) -> list[np.ndarray]:
    return [np.empty((rows, *a.shape[1:]), a.dtype) for a in arrays]


def _fill(arrays, bufs, ranges, b: int, pool) -> None:
    """Read ``ranges`` of every array (stores.patches.RowReader) into rows ``b:`` of ``bufs``.

    Each range is decoded straight into the window (no per-chunk temporaries, no
    concatenation), and the reads run concurrently: they release the GIL, so
    overlapping them measured ~1.5x faster than a sequential loop
    (benchmarks/bench_stream.py).
    """
    jobs = []
    for arr, buf in zip(arrays, bufs, strict=True):
        pos = b
        for a, e in ranges:
            jobs.append(pool.submit(arr.read, a, e, buf[pos:pos + e - a]))
            pos += e - a
    for j in jobs:
        j.result()


def _read_inline(arrays, plan, rows: int, b: int, pool):
    bufs = _alloc(arrays, rows)  # one window, reused
    for ranges, n in plan:
        _fill(arrays, bufs, ranges, b, pool)
        yield bufs, n, _noop


def _noop():
    pass


def subject_tables(norm: Normalisation, attrs: dict, url: str) -> tuple[np.ndarray, np.ndarray]:
    """(offset, 1/scale) per subject of the store ``[S, C]`` for a per-subject ``norm``
    (rows indexed like ``origin[:, 0]``), else one row for every patch."""
    if not norm.per_subject:
        off, inv = norm.input_arrays(np.float32)
        return off[None], inv[None]
    stats = attrs.get("subject_norm")
    if not stats:
        raise MRHError(f"{url}: this patch store has no per-subject statistics (made before "
                       f"{norm.mode} normalisation existed); remake it with `mrhscale patches --overwrite`")
    rows = [norm.for_subject(stats[sid]).input_arrays(np.float32) for sid in attrs["subjects"]]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def _read_ahead(arrays, plan, rows: int, b: int, pool):
    """Windows read by a background thread (zarr I/O and decoding release the GIL), two
    buffers in rotation: the next window is read while this one is cut into batches."""
    free: queue.Queue = queue.Queue()
    for _ in range(2):
        free.put(_alloc(arrays, rows))
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    def take(q):
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def run():
        try:
            for ranges, n in plan:
                bufs = take(free)
                if bufs is None:
                    return
                _fill(arrays, bufs, ranges, b, pool)
                ready.put((bufs, n))
        except BaseException as e:  # surfaced in the consumer
            ready.put(e)

    th = threading.Thread(target=run, name="PatchStream-read-ahead", daemon=True)
    th.start()
    try:
        for _ in plan:
            item = take(ready)
            if isinstance(item, BaseException):
                raise item
            bufs, n = item
            yield bufs, n, (lambda bufs=bufs: free.put(bufs))
    finally:
        stop.set()
        th.join(timeout=10)


def take_rows(x: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x[idx]`` along the first axis into ``out`` (new when None): a compiled row copy
    where numba is (np.take measured ~4x slower for these rows)."""
    out = np.empty((len(idx), *x.shape[1:]), x.dtype) if out is None else out
    if _nb_take is None or not (x.flags.c_contiguous and out.flags.c_contiguous) or x.size == 0:
        np.take(x, idx, axis=0, out=out)
    else:
        _nb_take(x.reshape(len(x), -1).view(np.uint8), np.asarray(idx, np.int64),
                 out.reshape(len(idx), -1).view(np.uint8))
    return out


try:  # fused gather + normalise (one pass); numpy fallback gives the same values
    import numba as _numba

    # Row slices and error_model="numpy" let LLVM vectorise the inner loop (the 2-D indexed
    # form did not): x2 measured on AVX2/AVX-512, bit for bit the same values.
    @_numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
    def _nb_norm(src, idx, who, off, inv, out):  # src [N, M], out [n, M], off/inv [S, M], who [n]
        m = src.shape[1]
        for i in range(idx.shape[0]):
            s, o, v, d = src[idx[i]], off[who[i]], inv[who[i]], out[i]
            for k in range(m):
                d[k] = (s[k] - o[k]) * v[k]
        return out

    @_numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
    def _nb_norm16(src, idx, who, off, inv, half, out):  # src: float16 bits; half: each one's float32
        m = src.shape[1]
        for i in range(idx.shape[0]):
            s, o, v, d = src[idx[i]], off[who[i]], inv[who[i]], out[i]
            for k in range(m):
                d[k] = (half[s[k]] - o[k]) * v[k]
        return out

    @_numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
    def _nb_take(src, idx, out):  # rows of bytes: out[i] = src[idx[i]]
        m = src.shape[1]
        for i in range(idx.shape[0]):
            s, d = src[idx[i]], out[i]
            for k in range(m):
                d[k] = s[k]
        return out
except ImportError:  # pragma: no cover
    _nb_norm = _nb_norm16 = _nb_take = None

# every float16 as float32 (numpy's own, exact conversion): a 256 KiB table the kernel indexes
_HALF = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
