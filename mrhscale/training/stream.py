"""PatchStream: a patch store streamed to torch, each global batch sliced across DDP ranks.

Use with ``DataLoader(stream, batch_size=None, num_workers=W)``: the dataset
yields whole batches ``(inputs [B, C, P, P], targets [B, T, P, P])`` as float32
tensors (T stains, NaN where a patch lacks one), normalised with the statistics stored in the patch store (so the
trainer and the model bundle use exactly those).

Epoch plan (training/plan.py, pure). The store is already globally shuffled. Each
epoch the chunk order is permuted by (seed, epoch); the chunks laid end to end form the
epoch's sample sequence, grouped into windows of whole chunks holding about
``shuffle_buffer`` patches; each window is permuted by (seed, epoch, window) and cut
into GLOBAL batches of ``batch_size x world_size`` rows (its tail, less than a batch,
carried into the next window). Nothing drawn depends on the rank, the DataLoader worker or the world
size, and the buffer size does not either: any number of processes sees the same
global batches in the same order (elastic determinism), so a run resumed on another
number of processes continues the same sequence. Rank r takes rows
``[r*batch_size, (r+1)*batch_size)`` of every global batch; within a rank, DataLoader
worker w takes the global batches g with ``g % num_workers == w`` (g counted from the
epoch's first batch yielded; the DataLoader asks its workers in turn, so the rank's
order is kept).

Reading. A (rank, worker) reads only the rows of its own slices, each in the window its
chunk belongs to, and keeps the few used by a later window's batch. A global batch
lists its rows in the window's order (a batch is a set), so rank r's slices lie in
about the r-th of W parts of each window: a rank reads about 1/W of the window's
rows (measured 50% and 25% for 2 and 4 ranks, training/plan.py). On a local store of
plain (uncompressed, the default) chunks a subset costs its bytes: runs of wanted rows
are read with one ``preadv`` each through one open file a chunk, short gaps read
through (``_GAP_BYTES``). A compressed or remote store decodes (fetches) whole chunks:
a rank then decodes the chunks of its part of each window, about 1/W of them plus one
at each edge of its part (so W ranks decode each edge chunk twice), and each of its
DataLoader workers holding a batch of the window decodes them again (its batches span
the rank's whole part). Where the chunk
files can be mapped (RowReader.mapped) nothing is read: each batch is gathered from
the page cache. zarr (or the reader) decodes into a preallocated window buffer (no
per-chunk temporaries or concatenation). Batches are normalised in one fused pass and,
in DataLoader workers, built in shared memory so handing them to the main process
copies nothing. ``read_ahead=True`` reads the next window in a background thread while
the current one is cut into batches: on a machine with a spare core this overlaps I/O
and decoding with the consumer without any process hand-off (the DataLoader's
per-batch inter-process hand-off has a fixed cost that caps its rate on few cores: see
benchmarks/RESULTS.md). Leave it off where the consumer already uses every core (CPU
training: torch's threads spin while waiting).

Policies:
- ``drop_last=True`` (equal steps, for DDP training): ``N // (world_size * batch_size)``
  global batches, every rank the same number of full batches; the remainder (fewer than
  a global batch) is dropped for this epoch. As the order changes every epoch, a
  different tail is dropped each time.
- ``drop_last=False`` (exact): every sample is yielded exactly once across the whole
  job; the last global batch may be short and is split as evenly as possible, so a
  rank's last batch may be short (or absent: batch counts differ by at most one). Use
  for validation.

``set_epoch(e, start)`` must be called before each epoch's iterator is created (``start``:
the first global batch, for a resumed epoch); with ``persistent_workers=True`` the
workers keep the epoch they started with.
"""

from __future__ import annotations

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
from mrhscale.training.plan import (
    Share,
    batch_count,
    batch_rows,
    epoch_segments,
    rank_cut,
    share_windows,
    window_batches,
)

VARS = ("inputs", "targets", "origin")
_READ_THREADS = 4  # concurrent zarr chunk reads per iterator (they mostly wait on I/O)
_EMIT_MIN_ROWS = 512  # a batch is split over two threads when each half has at least this many
_GAP_BYTES = 16 << 10  # unneeded bytes of a plain chunk read through rather than a second read


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
        self.epoch, self.start = 0, 0
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

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch the next iterator yields, from its global batch ``start`` (a resumed
        epoch: the batches before it are neither read nor yielded)."""
        self.epoch, self.start = int(epoch), int(start)

    @property
    def global_batch(self) -> int:
        """Rows of a global batch: this stream's ``batch_size`` from each of the ranks."""
        return self.batch_size * self.world_size

    def global_count(self) -> int:
        """Global batches in an epoch (the same for every rank and worker count)."""
        return batch_count(self.num_samples, self.global_batch, self.drop_last)

    def steps_per_epoch(self) -> int:
        """Batches this rank yields per epoch (summed over its DataLoader workers): one per
        global batch, less a short last one too short to reach this rank."""
        n, total = self.num_samples, self.global_count()
        last = n - (total - 1) * self.global_batch
        a, e = rank_cut(last, self.rank, self.world_size)
        return total - (1 if e == a and total else 0)

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def windows(self, epoch: int | None = None) -> list:
        """The epoch's global windows (plan.window_batches): the same for every share."""
        epoch = self.epoch if epoch is None else epoch
        segs = epoch_segments(self.num_samples, self.chunk_rows, self.seed, epoch, self.shuffle)
        return list(window_batches(segs, self.shuffle_buffer, self.global_batch, (self.seed, epoch),
                                   self.shuffle))

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The store rows of each of the epoch's global batches (every rank's slices in rank order)."""
        return list(batch_rows(self.windows(epoch)))[:self.global_count()]

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

    def batch_plan(self, worker: int = 0, num_workers: int = 1, gap: int | None = None):
        """This (rank, worker)'s epoch as windows: ``(ranges, rows, carried, batches, rest)``
        each (see :func:`plan.share_windows`: the rows read are only those of its slices,
        with read-through runs of at most ``gap`` rows; None: one range a chunk); the same
        batches for every reader of the plan (the stream and the patch cache)."""
        share = Share(self.rank, self.world_size, worker, num_workers, self.start)
        gap = self.chunk_rows if gap is None else gap
        return share_windows(self.windows(), share, self.global_count(), self.chunk_rows, gap)

    def read_gap(self, readers) -> int:
        """Unneeded rows read through between two wanted ones: a plain chunk file's rows
        cost their bytes (a read costs about ``_GAP_BYTES`` of copying); elsewhere a read
        decodes its whole chunk, so one range a chunk."""
        if not all(r.plain for r in readers):
            return self.chunk_rows
        row = max(int(np.prod(r.shape[1:])) * r.dtype.itemsize for r in readers)
        return _GAP_BYTES // row

    def __iter__(self):
        """This (rank, worker)'s slices of the global batches, window by window: the rows
        they need read (the mapped chunks need no reading), kept rows carried in front."""
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._in_worker = info is not None
        mapped = self.mapped_arrays()
        arrays = self.open_readers() if mapped is None else None
        windows = list(self.batch_plan(worker, n_workers, None if mapped is not None else self.read_gap(arrays)))
        if not windows:
            return
        if mapped is not None:  # no window to fill: each batch gathered from the page cache
            yield from self._mapped_batches(mapped, windows)
            return
        front = max(w[2] for w in windows)  # kept rows go in front of the window's rows
        plan = [(w[0], w[1]) for w in windows]
        rows = front + max(n for _, n in plan)
        ahead = bool(self.read_ahead) and len(plan) > 1
        pool = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="PatchStream-read")
        # where a core is spare (read_ahead says so), big batches are normalised on two threads
        self._emit_pool = pool if self.read_ahead and not self._in_worker else None
        filled = (_read_ahead(arrays, plan, rows, front, pool) if ahead
                  else _read_inline(arrays, plan, rows, front, pool))
        carry: list[np.ndarray] = []
        try:
            for (_, n_rows, k0, batches, rest), (bufs, _, release) in zip(windows, filled, strict=True):
                for buf, c in zip(bufs, carry, strict=False):
                    buf[front - k0:front] = c
                arrs = [buf[front - k0:front + n_rows] for buf in bufs]
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


def _alloc(arrays, rows: int) -> list[np.ndarray]:
    return [np.empty((rows, *a.shape[1:]), a.dtype) for a in arrays]


def _fill(arrays, bufs, ranges, front: int, pool) -> None:
    """Read ``ranges`` of every array (stores.patches.RowReader) into rows ``front:`` of ``bufs``.

    Each range is decoded straight into the window (no per-chunk temporaries, no
    concatenation), a chunk's ranges by one job (one file opened, one decode), and the
    jobs run concurrently: they release the GIL, so overlapping them measured ~1.5x
    faster than a sequential loop (benchmarks/bench_stream.py).
    """
    jobs = []
    for arr, buf in zip(arrays, bufs, strict=True):
        pos = front
        for group in _by_chunk(ranges, arr.chunks[0]):
            n = sum(e - a for a, e in group)
            jobs.append(pool.submit(arr.read_ranges, group, buf[pos:pos + n]))
            pos += n
    for j in jobs:
        j.result()


def _by_chunk(ranges, chunk_rows: int):
    """Consecutive ranges grouped by the chunk they lie in."""
    group: list[tuple[int, int]] = []
    for a, e in ranges:
        if group and group[0][0] // chunk_rows != a // chunk_rows:
            yield group
            group = []
        group.append((a, e))
    if group:
        yield group


def _read_inline(arrays, plan, rows: int, front: int, pool):
    bufs = _alloc(arrays, rows)  # one window, reused
    for ranges, n in plan:
        _fill(arrays, bufs, ranges, front, pool)
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


def _read_ahead(arrays, plan, rows: int, front: int, pool):
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
                _fill(arrays, bufs, ranges, front, pool)
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
