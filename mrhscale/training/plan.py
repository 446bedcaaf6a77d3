"""The epoch plan of a patch store's split: pure functions of (seed, epoch) and the sizes,
no data read. See :mod:`mrhscale.training.stream` for how the stream reads it.

The epoch's global batches (``global_batch`` rows each) depend on (seed, epoch) only:
the chunk order is permuted by (seed, epoch); windows of whole chunks (about
``shuffle_buffer`` rows) are each permuted by (seed, epoch, window) and cut into global
batches, the leftover of a window carried into the next. A :class:`Share` (rank,
world size, DataLoader worker, workers, first batch) takes its rank's slice of the
global batches its worker owns; nothing drawn depends on the share, so any number of
ranks and workers sees the same global batches in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_EMPTY = np.empty(0, np.int64)
_WINDOW_KEY = 7  # the last word of a window permutation's seed (the chunk order has none)


@dataclass(frozen=True)
class Share:
    """One reader's part of the epoch: rank ``rank`` of ``world`` takes rows
    ``[rank*b, (rank+1)*b)`` of every global batch (a short last one split as evenly as
    possible); worker ``worker`` of ``workers`` the batches ``g >= start`` with
    ``(g - start) % workers == worker``, the order the DataLoader asks its workers in."""

    rank: int = 0
    world: int = 1
    worker: int = 0
    workers: int = 1
    start: int = 0

    def owns(self, g: int) -> bool:
        return g >= self.start and (g - self.start) % self.workers == self.worker

    def cut(self, n: int) -> tuple[int, int]:
        """This rank's rows [a, e) of a global batch of ``n`` rows."""
        return rank_cut(n, self.rank, self.world)


def rank_cut(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [a, e) of ``rank`` in ``n`` rows split into ``world`` parts as evenly as possible
    (the first ``n % world`` ranks one more)."""
    base, rem = divmod(n, world)
    a = rank * base + min(rank, rem)
    return a, a + base + (1 if rank < rem else 0)


def batch_count(n: int, global_batch: int, drop_last: bool) -> int:
    """Global batches of an epoch of ``n`` rows: full ones only, or a short last one too."""
    return n // global_batch if drop_last else math.ceil(n / global_batch)


def epoch_segments(n: int, chunk_rows: int, seed: int, epoch: int, shuffle: bool) -> list[tuple[int, int]]:
    """The split's chunks in the epoch's order, as store row ranges [a, e)."""
    n_chunks = math.ceil(n / chunk_rows)
    order = np.random.default_rng([seed, epoch]).permutation(n_chunks) if shuffle else np.arange(n_chunks)
    return [(int(k) * chunk_rows, min(n, (int(k) + 1) * chunk_rows)) for k in order]


def window_batches(segs: list[tuple[int, int]], cap: int, b: int, key: tuple[int, int], shuffle: bool):
    """The global batches of the epoch's row ranges ``segs``, window by window, as positions.

    Yields ``(ranges, rows, carried, batches, rest)`` per window: its store ranges and
    row count; ``carried`` rows (< b) left by the previous window, which come first in
    the window's pending rows ``[carried rows, then the ranges' rows in order]``; the
    batches as index arrays into those pending rows (one permutation per window, drawn
    from ``(*key, window)``: key = (seed, epoch)); and ``rest``, the positions carried to
    the next window (empty after the last, whose short batch is yielded instead).
    """
    plan = _windows(segs, cap, b)
    k0 = 0
    for k, (ranges, n_rows) in enumerate(plan):
        n_pend = k0 + n_rows
        order = (np.random.default_rng([*key, k, _WINDOW_KEY]).permutation(n_pend) if shuffle
                 else np.arange(n_pend))
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
    """The store rows of each batch of ``windows`` (:func:`window_batches` or
    :func:`share_windows`), in order: what a reader of them emits, without reading."""
    carry = _EMPTY
    for ranges, _, _, batches, rest in windows:
        ids = np.concatenate([carry, *(np.arange(a, e, dtype=np.int64) for a, e in ranges)])
        for idx in batches:
            yield ids[idx]
        carry = ids[rest]


def _windows(segs: list[tuple[int, int]], cap: int, b: int) -> list[tuple[list[tuple[int, int]], int]]:
    """Group the epoch's row ranges into shuffle windows: (ranges, rows) each.

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


def share_slices(windows: list, share: Share, total: int) -> list[list[np.ndarray]]:
    """Per global window, the store rows of ``share``'s slices of the batches cut there
    (the first ``total`` global batches only: a dropped short last one is nobody's)."""
    carry, g, out = _EMPTY, 0, []
    for ranges, _, _, batches, rest in windows:
        ids = np.concatenate([carry, *(np.arange(a, e, dtype=np.int64) for a, e in ranges)])
        mine = []
        for idx in batches:
            if g < total and share.owns(g):
                a, e = share.cut(len(idx))
                if e > a:
                    mine.append(ids[idx[a:e]])
            g += 1
        out.append(mine)
        carry = ids[rest]
    return out


def share_windows(windows: list, share: Share, total: int, chunk_rows: int, gap: int):
    """``share``'s part of the global ``windows``, in :func:`window_batches`' shape, so a
    reader of it reads only the rows its slices need (plus runs of at most ``gap``
    unneeded rows between two needed ones of a chunk, read through: one read instead of
    two; ``gap >= chunk_rows`` reads one range a chunk, for stores that decode whole chunks).

    A row is read in the window its chunk belongs to (its home) and kept, in sorted
    order in front of the pending rows, until the window whose batch uses it: ``carried``
    counts those, ``rest`` says which pending rows stay kept. Windows where this share
    reads and emits nothing are left out.
    """
    slices = share_slices(windows, share, total)
    used = [np.concatenate(s) if s else _EMPTY for s in slices]
    ids = np.concatenate([_EMPTY, *used])
    when = np.repeat(np.arange(len(used)), [len(u) for u in used])
    where = _home_windows(windows, chunk_rows)[ids // chunk_rows]
    by_home = np.argsort(where, kind="stable")
    cuts = np.searchsorted(where[by_home], np.arange(len(windows) + 1))
    kept = _EMPTY
    for k in range(len(windows)):
        sel = by_home[cuts[k]:cuts[k + 1]]
        if not len(sel) and not slices[k]:
            continue
        ranges = read_ranges(np.sort(ids[sel]), chunk_rows, gap)
        pending = np.concatenate([kept, *(np.arange(a, e, dtype=np.int64) for a, e in ranges)])
        find = _finder(pending)
        later = ids[sel][when[sel] > k]
        nxt = np.union1d(kept[~np.isin(kept, used[k])], later)
        yield ranges, len(pending) - len(kept), len(kept), [find(s) for s in slices[k]], find(nxt)
        kept = nxt


def _home_windows(windows: list, chunk_rows: int) -> np.ndarray:
    """The window each chunk is read in, indexed by chunk."""
    n_chunks = sum(len(w[0]) for w in windows)
    home = np.zeros(n_chunks, np.int64)
    for k, w in enumerate(windows):
        for a, _ in w[0]:
            home[a // chunk_rows] = k
    return home


def _finder(pending: np.ndarray):
    """Positions in ``pending`` (distinct store rows) of given store rows."""
    order = np.argsort(pending, kind="stable")
    keys = pending[order]
    return lambda rows: order[np.searchsorted(keys, rows)]


def read_ranges(rows: np.ndarray, chunk_rows: int, gap: int) -> list[tuple[int, int]]:
    """Sorted store rows as ranges [a, e) within one chunk each, a run of at most ``gap``
    rows between two wanted ones read through."""
    if not len(rows):
        return []
    step = np.diff(rows)
    brk = np.flatnonzero((step > gap + 1) | (np.diff(rows // chunk_rows) != 0)) + 1
    starts = rows[np.r_[0, brk]]
    ends = rows[np.r_[brk - 1, len(rows) - 1]] + 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))
