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
    batches as index arrays into those pending rows; and ``rest``, the positions carried
    to the next window: the pending rows' last ``n % b`` (the window's tail), shuffled
    there (empty after the last window, whose tail is its short batch instead).

    Shuffled, the other pending rows are permuted once per window (drawn from
    ``(*key, window)``: key = (seed, epoch)) and cut into batches. A batch is a set (its
    order changes only the order of float sums), so each batch lists the window's own
    rows in their order, then the carried ones: rank r's slice then lies in about the
    r-th of W parts of the window's rows (the last rank's taking the carried rows, read
    beside its part of the previous window), so a rank reads (or, compressed, decodes)
    about 1/W of each window, not all of it, and gathers its rows in memory order.
    """
    plan = _windows(segs, cap, b)
    k0 = 0
    for k, (ranges, n_rows) in enumerate(plan):
        n_pend = k0 + n_rows
        full = n_pend // b
        last = k == len(plan) - 1
        cut = n_pend if last else full * b
        if shuffle:
            order = np.random.default_rng([*key, k, _WINDOW_KEY]).permutation(cut)
            batches = [_local_order(order[i:i + b], k0) for i in range(0, cut, b)]
        else:
            batches = [np.arange(i, min(i + b, cut)) for i in range(0, cut, b)]
        rest = np.arange(cut, n_pend)
        yield ranges, n_rows, k0, batches, rest
        k0 = len(rest)


def _local_order(batch: np.ndarray, k0: int) -> np.ndarray:
    """A batch's positions: the window's own rows (from ``k0`` on) ascending, then the carried."""
    batch = np.sort(batch)
    split = int(np.searchsorted(batch, k0))
    return np.concatenate([batch[split:], batch[:split]])


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


@dataclass
class _Use:
    """One global window as one share uses it: the store rows of its slices of the batches
    cut there, each row's place among the window's own rows (-1: kept from an earlier
    window), and the window's rows a later window's batch of the share uses."""

    slices: list[np.ndarray]
    local: list[np.ndarray]
    later: list[np.ndarray]


def _uses(windows: list, share: Share, total: int) -> list[_Use]:
    """Per global window, how ``share`` uses it (the first ``total`` global batches only:
    a dropped short last one is nobody's). Linear in the rows: no sorting."""
    carry, carry_home, g, uses = _EMPTY, _EMPTY, 0, []
    for k, (ranges, n_rows, k0, batches, rest) in enumerate(windows):
        rows = np.concatenate([carry, *(np.arange(a, e, dtype=np.int64) for a, e in ranges)])
        home = np.concatenate([carry_home, np.full(n_rows, k, np.int64)])
        use = _Use([], [], [])
        for idx in batches:
            a, e = share.cut(len(idx)) if g < total and share.owns(g) else (0, 0)
            g += 1
            if e > a:
                p = idx[a:e]
                use.slices.append(rows[p])
                use.local.append(np.where(p >= k0, p - k0, -1))
                old = p[p < k0]
                for h in np.unique(home[old]).tolist():
                    uses[h].later.append(rows[old[home[old] == h]])
        uses.append(use)
        carry, carry_home = rows[rest], home[rest]
    return uses


def share_windows(windows: list, share: Share, total: int, chunk_rows: int, gap: int):
    """``share``'s part of the global ``windows``, in :func:`window_batches`' shape, so a
    reader of it reads only the rows its slices need (plus runs of at most ``gap``
    unneeded rows between two needed ones of a chunk, read through: one read instead of
    two; ``gap >= chunk_rows`` reads one range a chunk, for stores that decode whole chunks).

    A row is read in the window its chunk belongs to and kept, in store-row order in
    front of the pending rows, until the window whose batch uses it: ``carried`` counts
    those, ``rest`` says which pending rows stay kept. Windows where this share reads and
    emits nothing are left out.
    """
    offsets = _chunk_offsets(windows, chunk_rows)
    kept = _EMPTY
    for (ranges_g, n_rows, _, _, _), use in zip(windows, _uses(windows, share, total), strict=True):
        later = np.concatenate([_EMPTY, *use.later])
        if not use.slices and not len(later):
            continue
        later_local = offsets[later // chunk_rows] + later % chunk_rows
        wanted = np.zeros(n_rows, bool)
        wanted[later_local] = True
        for loc in use.local:
            wanted[loc[loc >= 0]] = True
        ranges, place = _read_plan(ranges_g, n_rows, np.flatnonzero(wanted), chunk_rows, gap)
        batches = [_positions(s, loc, kept, place) for s, loc in zip(use.slices, use.local, strict=True)]
        stays = np.ones(len(kept), bool)
        for s, loc in zip(use.slices, use.local, strict=True):
            stays[np.searchsorted(kept, s[loc < 0])] = False
        nxt = np.concatenate([kept[stays], later])
        where = np.concatenate([np.flatnonzero(stays), len(kept) + place[later_local]])
        order = np.argsort(nxt, kind="stable")
        yield ranges, sum(e - a for a, e in ranges), len(kept), batches, where[order]
        kept = nxt[order]


def _positions(rows: np.ndarray, local: np.ndarray, kept: np.ndarray, place: np.ndarray) -> np.ndarray:
    """Places in the pending rows ``[kept, rows read]`` of a slice's ``rows``."""
    own = local >= 0
    pos = np.empty(len(rows), np.int64)
    pos[own] = len(kept) + place[local[own]]
    pos[~own] = np.searchsorted(kept, rows[~own])
    return pos


def _chunk_offsets(windows: list, chunk_rows: int) -> np.ndarray:
    """Each chunk's first row among its window's own rows, indexed by chunk."""
    n_chunks = sum(len(w[0]) for w in windows)
    offsets = np.zeros(n_chunks, np.int64)
    for w in windows:
        pos = 0
        for a, e in w[0]:
            offsets[a // chunk_rows] = pos
            pos += e - a
    return offsets


def _read_plan(ranges_g, n_rows: int, wanted: np.ndarray, chunk_rows: int, gap: int):
    """The store ranges to read for a window's ``wanted`` rows (sorted places among its
    own rows ``ranges_g``), each within one chunk, runs of at most ``gap`` unwanted rows
    read through; and ``place``: each window row's place among the rows read (-1: not read)."""
    place = np.full(n_rows, -1, np.int64)
    if not len(wanted):
        return [], place
    rows = np.concatenate([np.arange(a, e, dtype=np.int64) for a, e in ranges_g])
    brk = np.flatnonzero((np.diff(wanted) > gap + 1) | (np.diff(rows[wanted] // chunk_rows) != 0)) + 1
    first, last = wanted[np.r_[0, brk]], wanted[np.r_[brk - 1, len(wanted) - 1]]
    lens = last - first + 1
    start = np.cumsum(lens) - lens
    place[np.repeat(first - start, lens) + np.arange(int(lens.sum()))] = np.arange(int(lens.sum()))
    return list(zip(rows[first].tolist(), (rows[last] + 1).tolist(), strict=True)), place
