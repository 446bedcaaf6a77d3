"""PatchStream: exactly-once sharding, equal steps, epochs, normalisation, remote stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from helpers import make_cohort_store
from torch.utils.data import DataLoader

from mrhscale.errors import MRHError
from mrhscale.options import PatchOptions
from mrhscale.parallel.context import Context
from mrhscale.stages.patches import extract_patches
from mrhscale.training.plan import batch_rows
from mrhscale.training.stream import PatchStream, StreamOptions


def _store(tmp_path_factory, name: str, **options) -> str:
    d = tmp_path_factory.mktemp(name)
    make_cohort_store(d / "c.zarr", n_subjects=3, shape=(16, 10, 18), n_channels=5)
    out = str(d / "p.zarr")
    extract_patches(str(d / "c.zarr"), "af", out, ctx=Context(scheduler="synchronous", quiet=True),
                    options=PatchOptions(stride=1, min_label_sum=0, min_label_nonzero=0, **options))
    return out


@pytest.fixture(scope="module")
def patch_store(tmp_path_factory):
    return _store(tmp_path_factory, "stream", val_fraction=0.2, chunk_size=100)


def _raw(url, split="train"):
    g = zarr.open_group(url, mode="r")
    org = g[f"{split}/origin"][:]
    index = {tuple(o): i for i, o in enumerate(org)}
    return g[f"{split}/inputs"][:], g[f"{split}/targets"][:], index, dict(g.attrs)


def _collect(stream, workers):
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [tuple(t for t in batch) for batch in loader]


@pytest.mark.parametrize("drop_last", [False, pytest.param(True, marks=pytest.mark.slow)])  # default-run budget
def test_two_ranks_two_workers_exactly_once(patch_store, drop_last):
    n = zarr.open_group(patch_store, mode="r").attrs["n_train"]
    seen, steps = [], []
    for rank in range(2):
        s = PatchStream(patch_store, batch_size=64, rank=rank, world_size=2, drop_last=drop_last, seed=5,
                        options=StreamOptions(shuffle_buffer=150, with_origin=True))
        s.set_epoch(3)
        batches = _collect(s, 2)
        assert len(batches) == s.steps_per_epoch() == len(s)
        steps.append(len(batches))
        for x, t, o in batches:
            assert x.dtype == torch.float32 and t.dtype == torch.float32
            assert x.shape[1:] == (5, 3, 3) and t.shape[1:] == (1, 3, 3) and len(x) == len(t) == len(o)
            if drop_last:
                assert len(x) == 64
        seen += [tuple(v) for b in batches for v in b[2].tolist()]
    assert len(seen) == len(set(seen)), "a sample was yielded twice"
    if drop_last:
        assert steps[0] == steps[1] == n // (2 * 64)
        assert n - len(seen) < 2 * 64
    else:
        assert len(seen) == n
        assert abs(steps[0] - steps[1]) <= 1


def test_epochs_reshuffle_deterministically(patch_store):
    def origins(epoch, seed=0):
        s = PatchStream(patch_store, batch_size=50, drop_last=False, seed=seed,
                        options=StreamOptions(with_origin=True))
        s.set_epoch(epoch)
        return np.concatenate([b[2].numpy() for b in s])

    a, a2, b = origins(0), origins(0), origins(1)
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, b)
    assert sorted(map(tuple, a)) == sorted(map(tuple, b))
    assert not np.array_equal(a, origins(0, seed=1))
    s = PatchStream(patch_store, batch_size=50, shuffle=False, drop_last=False,
                    options=StreamOptions(with_origin=True))
    plain = np.concatenate([bt[2].numpy() for bt in s])
    np.testing.assert_array_equal(plain, zarr.open_group(patch_store, mode="r")["train/origin"][:])


@pytest.mark.parametrize("split", ["train", "val"])
def test_stream_applies_stored_normalisation(patch_store, split):
    raw_x, raw_t, index, attrs = _raw(patch_store, split)
    nrm = attrs["norm"]
    off = np.asarray(nrm["offset"], np.float32)[:, None, None]
    scale = np.asarray(nrm["scale"], np.float32)[:, None, None]
    s = PatchStream(patch_store, split=split, batch_size=32, drop_last=False,
                    options=StreamOptions(with_origin=True))
    assert s.norm.to_dict() == nrm and s.channels == attrs["channels"] and s.stains == ["af"]
    assert s.patch == {"half": 1, "size": 3, "axis": "y"}
    n = 0
    for x, t, o in s:
        rows = [index[tuple(v)] for v in o.tolist()]
        np.testing.assert_allclose(x.numpy(), (raw_x[rows] - off) / scale, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(t.numpy(), (raw_t[rows] - nrm["target_offset"]) / nrm["target_scale"],
                                   rtol=1e-6)
        n += len(x)
    assert n == len(raw_x) == s.num_samples


def test_float16_store_and_remote_memory_store(tmp_path):
    """A store on an fsspec URL (memory://) reads the same; float16 inputs come out float32."""
    make_cohort_store(tmp_path / "c.zarr", n_subjects=2)
    url = "memory://mrhscale-test/p.zarr"
    extract_patches(str(tmp_path / "c.zarr"), "af", url, ctx=Context(scheduler="synchronous", quiet=True),
                    options=PatchOptions(stride=1, dtype="float16", min_label_sum=0, min_label_nonzero=0))
    raw_x, _, index, attrs = _raw(url)
    assert raw_x.dtype == np.float16
    s = PatchStream(url, batch_size=16, drop_last=False, options=StreamOptions(with_origin=True))
    got = 0
    for x, _, o in s:
        assert x.dtype == torch.float32
        rows = [index[tuple(v)] for v in o.tolist()]
        expect = s.norm.apply_inputs(raw_x[rows].astype(np.float32), channel_axis=1)
        np.testing.assert_allclose(x.numpy(), expect, rtol=1e-5, atol=1e-6)
        got += len(x)
    assert got == attrs["n_train"]


def test_bad_stores(patch_store, tmp_path):
    with pytest.raises(MRHError, match="does not exist"):
        PatchStream(str(tmp_path / "nope.zarr"))
    with pytest.raises(MRHError, match="fewer than"):
        PatchStream(patch_store, split="val", batch_size=100_000)
    with pytest.raises(MRHError, match="split"):
        PatchStream(patch_store, split="test")
    bad = tmp_path / "inc.zarr"
    zarr.open_group(str(bad), mode="w").attrs["complete"] = False
    with pytest.raises(MRHError, match="not made by mrhscale, not a patch store"):
        PatchStream(str(bad))
    zarr.open_group(str(bad), mode="a").attrs["format"] = "mrhscale-patches"
    with pytest.raises(MRHError, match="incomplete"):
        PatchStream(str(bad))


def _interleaved(plans):
    """Batches of W worker plans in the order the DataLoader asks its workers (in turn)."""
    out, alive = [], [iter(p) for p in plans]
    while alive:
        nxt = []
        for it in alive:
            idx = next(it, None)
            if idx is not None:
                out.append(idx)
                nxt.append(it)
        alive = nxt
    return out


def _global_batches(url, world, workers, global_batch=48, epoch=1, **kw):
    """The epoch's global batches as a world of ranks with loader workers sees them: each
    rank's batches (its workers interleaved), the g-th of every rank put together in rank order."""
    per_rank = []
    for rank in range(world):
        s = PatchStream(url, batch_size=global_batch // world, rank=rank, world_size=world, seed=2, **kw)
        s.set_epoch(epoch)
        got = _interleaved([batch_rows(s.batch_plan(w, workers, gap=g)) for w, g in
                            zip(range(workers), [None, 0, 3, 1000], strict=False)])
        assert len(got) == s.steps_per_epoch()
        per_rank.append(got)
    n = max(len(r) for r in per_rank)
    return [np.concatenate([r[g] for r in per_rank if g < len(r)]) for g in range(n)], s


@pytest.mark.parametrize("drop_last", [False, True])
def test_global_batches_do_not_depend_on_ranks_or_workers(patch_store, drop_last):
    """Elastic determinism, pure plan: for 1, 2, 4 ranks and 1, 2, 3 loader workers the
    global batches are the same; each sample once per epoch (at most once with drop_last)."""
    n = zarr.open_group(patch_store, mode="r").attrs["n_train"]
    want, s = _global_batches(patch_store, 1, 1, drop_last=drop_last, options=StreamOptions(shuffle_buffer=150))
    assert [len(b) for b in want] == [len(b) for b in s.global_batches()]
    assert all(np.array_equal(a, b) for a, b in zip(want, s.global_batches(), strict=True))
    assert len(want) == (n // 48 if drop_last else -(-n // 48)) and n % 48  # a short last batch exists
    rows = np.concatenate(want)
    assert len(set(rows.tolist())) == len(rows)
    assert len(rows) == (n // 48 * 48 if drop_last else n)
    for world in (1, 2, 4):
        for workers in (1, 2, 3):
            got, _ = _global_batches(patch_store, world, workers, drop_last=drop_last,
                                     options=StreamOptions(shuffle_buffer=150))
            assert len(got) == len(want), (world, workers)
            for a, b in zip(got, want, strict=True):
                assert np.array_equal(a, b), (world, workers)


@pytest.mark.parametrize("gap_bytes", [0, 1 << 30])
def test_ranks_yield_the_slices_of_one_process_batches(patch_store, monkeypatch, gap_bytes):
    """The tensors themselves: 2 ranks (one through 2 DataLoader workers) reading only
    their rows (gap 0) or whole chunks yield one process's batches, sliced."""
    import mrhscale.training.stream as st
    from mrhscale.stores.patches import RowReader

    monkeypatch.setattr(st, "_GAP_BYTES", gap_bytes)
    monkeypatch.setattr(RowReader, "mapped", lambda self: None)
    kw = dict(seed=2, drop_last=False, options=StreamOptions(shuffle_buffer=120))

    def run(world, rank, workers):
        s = PatchStream(patch_store, batch_size=48 // world, rank=rank, world_size=world, **kw)
        s.set_epoch(4)
        return _collect(s, workers) if workers else list(s)

    one = run(1, 0, 0)
    ranks = [run(2, 0, 2), run(2, 1, 0)]
    assert len(one) == len(ranks[0]) > 3
    for g, (x, t) in enumerate(one):
        parts = [r[g] for r in ranks if g < len(r)]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(t, torch.cat([p[1] for p in parts]))


def test_a_rank_reads_about_its_share_of_each_window(tmp_path):
    """Guard of the stream's reading cost: a global batch lists its rows in window order, so
    each of 4 ranks reads (decodes, here: one range a chunk) about a quarter of the store."""
    from helpers import make_patch_store

    url = make_patch_store(tmp_path / "p.zarr", n_train=6000, n_val=0, chunk=64)
    for rank in range(4):
        s = PatchStream(url, batch_size=64, rank=rank, world_size=4, seed=1,
                        options=StreamOptions(shuffle_buffer=512))
        read = sum(w[1] for w in s.batch_plan(0, 1, gap=s.chunk_rows))
        assert 0.25 * 6000 * 0.8 < read < 0.25 * 6000 * 1.4, (rank, read)


def test_epochs_and_seeds_change_the_global_batches(patch_store):
    a, _ = _global_batches(patch_store, 2, 1, epoch=1)
    b, _ = _global_batches(patch_store, 2, 1, epoch=2)
    assert not np.array_equal(np.concatenate(a), np.concatenate(b))


def test_a_resumed_epoch_starts_at_its_global_batch(patch_store):
    """set_epoch(e, start) yields the global batches from ``start`` on, whatever the ranks."""
    full, _ = _global_batches(patch_store, 1, 1, drop_last=True)
    for world, workers in ((1, 2), (2, 3)):
        parts = []
        for rank in range(world):
            s = PatchStream(patch_store, batch_size=48 // world, rank=rank, world_size=world, seed=2)
            s.set_epoch(1, start=3)
            parts.append(_interleaved([batch_rows(s.batch_plan(w, workers)) for w in range(workers)]))
        got = [np.concatenate(bs) for bs in zip(*parts, strict=True)]
        assert len(got) == len(full) - 3
        assert all(np.array_equal(a, b) for a, b in zip(got, full[3:], strict=True))


def test_each_rank_reads_only_its_rows(patch_store, monkeypatch):
    """With no read-through (gap 0) a rank reads exactly the rows of its slices, and the
    batches are those of whole-chunk reads."""
    import mrhscale.training.stream as st
    from mrhscale.stores.patches import RowReader

    seen = []
    real = RowReader.read_ranges
    monkeypatch.setattr(RowReader, "read_ranges", lambda self, rs, out: seen.extend(rs) or real(self, rs, out))
    monkeypatch.setattr(RowReader, "mapped", lambda self: None)
    kw = dict(batch_size=24, world_size=2, seed=2, options=StreamOptions(shuffle_buffer=150, with_origin=True))
    monkeypatch.setattr(st, "_GAP_BYTES", 0)
    s = PatchStream(patch_store, rank=1, **kw)
    assert s.read_gap(s.open_readers()) == 0
    got = list(s)
    read = {r for a, e in seen for r in range(a, e)}
    mine = {r for idx in batch_rows(s.batch_plan()) for r in idx.tolist()}
    assert read == mine and len(seen) > len(got)
    monkeypatch.setattr(st, "_GAP_BYTES", 1 << 30)
    whole = list(PatchStream(patch_store, rank=1, **kw))
    for x, y in zip(got, whole, strict=True):
        for u, v in zip(x, y, strict=True):
            assert torch.equal(u, v)


@pytest.mark.parametrize("shuffle", [True, False])
def test_read_ahead_yields_the_same_batches_and_stops_its_thread(patch_store, shuffle):
    """The background reader changes when windows are read, never what is yielded; closing
    the iterator early (SIGTERM mid-epoch) leaves no reader thread behind."""
    import threading

    kw = {"batch_size": 7, "shuffle": shuffle, "seed": 4, "drop_last": False}
    a = PatchStream(patch_store, options=StreamOptions(shuffle_buffer=50, with_origin=True), **kw)
    b = PatchStream(patch_store, options=StreamOptions(shuffle_buffer=50, with_origin=True, read_ahead=True), **kw)
    for s in (a, b):
        s.set_epoch(3)
    got_a, got_b = list(a), list(b)
    assert len(got_a) == len(got_b) > 3
    for x, y in zip(got_a, got_b, strict=True):
        for u, v in zip(x, y, strict=True):
            assert torch.equal(u, v)
    it = iter(b)
    next(it)
    assert any(t.name.startswith("PatchStream") for t in threading.enumerate())
    it.close()
    assert not any(t.name.startswith("PatchStream") for t in threading.enumerate())


def test_windows_are_read_into_reused_buffers(patch_store, monkeypatch):
    """Guard of the stream's speed: one window buffer per iterator (two with read_ahead),
    every range decoded straight into it, no per-window concatenation of chunk copies."""
    import mrhscale.training.stream as st
    from mrhscale.stores.patches import RowReader

    allocs, bufs = [], []
    real = st._alloc

    def alloc(arrays, rows):
        allocs.append(rows)
        bufs.extend(real(arrays, rows))
        return bufs[-len(arrays):]

    monkeypatch.setattr(st, "_alloc", alloc)
    reads = []
    real_read = RowReader.read
    monkeypatch.setattr(RowReader, "read", lambda self, a, e, out: reads.append(
        any(np.shares_memory(out, b) for b in bufs)) or real_read(self, a, e, out))
    monkeypatch.setattr(zarr.Array, "__getitem__", lambda self, sel: pytest.fail("a read allocating its own copy"))
    s = PatchStream(patch_store, batch_size=5, options=StreamOptions(shuffle_buffer=20))
    n = sum(len(x) for x, _ in s)
    assert n == s.steps_per_epoch() * 5 and len(allocs) == 1
    assert reads and all(reads)
    allocs.clear()
    list(PatchStream(patch_store, batch_size=5, options=StreamOptions(shuffle_buffer=20, read_ahead=True)))
    assert len(allocs) == 2


def test_batches_normalised_on_two_threads_are_the_same(patch_store, monkeypatch):
    import mrhscale.training.stream as st

    monkeypatch.setattr(st, "_EMIT_MIN_ROWS", 4)  # split every batch of >= 8 rows
    kw = {"batch_size": 33, "seed": 2, "drop_last": False}
    plain = list(PatchStream(patch_store, options=StreamOptions(with_origin=True), **kw))
    split = list(PatchStream(patch_store, options=StreamOptions(with_origin=True, read_ahead=True), **kw))
    assert len(plain) == len(split) > 2
    for x, y in zip(plain, split, strict=True):
        for u, v in zip(x, y, strict=True):
            assert torch.equal(u, v)


@pytest.fixture(scope="module")
def aligned_store(tmp_path_factory):
    """Chunks of whole pages (1024 rows x 180 B), so the stream maps them (RowReader.mapped)."""
    return _store(tmp_path_factory, "mapped", chunk_size=1024)


@pytest.mark.parametrize("world,drop_last", [(1, True), (2, False)])
def test_mapped_chunks_give_the_windows_batches(aligned_store, monkeypatch, world, drop_last):
    """Gathering each batch from the mapped chunk files yields the very batches that
    reading windows of chunks does (the same plan, the same normalisation)."""
    from mrhscale.stores.patches import RowReader

    kw = {"batch_size": 96, "seed": 3, "drop_last": drop_last, "world_size": world,
          "options": StreamOptions(shuffle_buffer=300, with_origin=True, read_ahead=True)}
    streams = [PatchStream(aligned_store, rank=r, **kw) for r in range(world)]
    assert all(s.mapped_arrays() is not None for s in streams) and streams[0].chunk_rows == 1024
    for s in streams:
        s.set_epoch(2)
    mapped = [list(s) for s in streams]
    monkeypatch.setattr(RowReader, "mapped", lambda self: None)
    for s, got in zip(streams, mapped, strict=True):
        s._mapped = None
        want = list(s)
        assert s.mapped_arrays() is None and len(want) == len(got) > 2
        for x, y in zip(want, got, strict=True):
            for u, v in zip(x, y, strict=True):
                assert torch.equal(u, v)


def test_batch_memory_is_reused_only_when_free():
    from mrhscale.training.stream import _Blocks

    blocks = _Blocks(keep=2)
    x = torch.from_numpy(blocks.get(12))[:6].view(2, 3)  # a consumer's view
    held = blocks.get(12)
    assert not np.shares_memory(held, x.numpy())
    ptr = held.ctypes.data
    del held
    assert blocks.get(12).ctypes.data == ptr  # nothing refers to it any more: reused
    del x
    assert len(blocks.blocks) == 2


def test_float16_kernel_gives_numpys_values():
    """The compiled float16 path (a table of every half's float32) equals numpy's convert,
    subtract, multiply bit for bit, subnormals, infinities and NaN included."""
    import mrhscale.training.stream as st

    if st._nb_norm16 is None:
        pytest.skip("numba not installed")
    bits = np.random.default_rng(0).integers(0, 1 << 16, (64, 45), dtype=np.uint16)
    src = bits.view(np.float16)
    off = np.random.default_rng(1).random((2, 45), dtype=np.float32) * 10
    inv = np.random.default_rng(2).random((2, 45), dtype=np.float32)
    idx, who = np.array([5, 0, 63, 5, 17]), np.array([0, 1, 1, 0, 1])
    got = st._nb_norm16(bits, idx, who, off, inv, st._HALF, np.empty((5, 45), np.float32))
    want = (src[idx].astype(np.float32) - off[who]) * inv[who]
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)) or np.array_equal(got, want, equal_nan=True)
