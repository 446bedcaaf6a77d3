"""nn.gather: the device-side gather (torch, run here on the CPU) and the batch feed, bit for
bit against the compiled gather, the numpy fallback and a plain loop."""

import os

import numpy as np
import pytest
import torch
from helpers import write_model

from mrhscale.io.bundle import load_model
from mrhscale.nn import gather as G
from mrhscale.nn import worker as W
from mrhscale.ops import blocks
from mrhscale.ops.blocks import BlockPatches, edge_values


def _block(dtype=np.float32, shape=(5, 6, 7, 4), seed=0):
    rng = np.random.default_rng(seed)
    mri = (rng.random(shape) * 200 - 20).astype(dtype)
    if dtype == np.float32:
        mri[1, 2, 3, 1], mri[0, 0, 0, :], mri[4, 5, 6, 2] = np.nan, np.inf, -np.inf
    off = np.linspace(-3, 10, shape[3]).astype(np.float32)
    inv = np.linspace(0.01, 0.5, shape[3]).astype(np.float32)
    inv[-1] = np.inf  # a zero-scale channel: its raw 0 normalises to NaN, which becomes 0
    return mri, off, inv


def _loop(mri, order, off, inv, half, s, r, q):
    """One value at a time: (float32(raw) - off) * inv, NaN/inf -> 0, raw 0 past the edges."""
    src = np.transpose(mri, (*order, 3))
    p = 2 * half + 1
    out = np.zeros((len(s), src.shape[3], p, p), np.float32)
    for i in range(len(s)):
        for a in range(p):
            for b in range(p):
                rr, qq = r[i] + a - half, q[i] + b - half
                inside = 0 <= rr < src.shape[1] and 0 <= qq < src.shape[2]
                for c in range(src.shape[3]):
                    raw = np.float32(src[s[i], rr, qq, c]) if inside else np.float32(0)
                    with np.errstate(invalid="ignore", over="ignore"):
                        v = (raw - off[c]) * inv[c]
                    out[i, c, a, b] = v if np.isfinite(v) else 0
    return out


def _centres(shape, order, n=60, seed=1):
    rng = np.random.default_rng(seed)
    dims = [shape[a] for a in order]
    return tuple(rng.integers(0, d, n) for d in dims)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the numpy fallback: 0 * inf
@pytest.mark.parametrize("order", [(1, 0, 2), (0, 1, 2), (2, 0, 1)])
@pytest.mark.parametrize("half", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_device_gather_equals_the_compiled_gather_numpy_and_a_loop(order, half, dtype, monkeypatch):
    mri, off, inv = _block(dtype)
    s, r, q = _centres(mri.shape, order)
    want = _loop(mri, order, off, inv, half, s, r, q)
    dev = G.DevicePatches(mri, order, off, inv, half, "cpu")
    got = dev(s, r, q)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.is_contiguous()
    assert got.numpy().tobytes() == want.tobytes()  # bit for bit, signed zeros included
    assert dev.patch_shape == want.shape[1:]
    buf = np.full(want.shape, 7.0, np.float32)
    assert BlockPatches(mri, order, off, inv, half)(s, r, q, out=buf) is buf and buf.tobytes() == want.tobytes()
    monkeypatch.setattr(blocks, "gather_normalised_nb", None)  # the numpy fallback
    assert BlockPatches(mri, order, off, inv, half)(s, r, q, out=buf).tobytes() == want.tobytes()
    with np.errstate(invalid="ignore"):
        assert edge_values(off, inv).tobytes() == np.nan_to_num((np.float32(0) - off) * inv, posinf=0, neginf=0).tobytes()


def test_block_patches_picks_the_device_gather_off_the_cpu(monkeypatch):
    mri, off, inv = _block()
    assert isinstance(G.block_patches(mri, (1, 0, 2), off, inv, 1, "cpu"), BlockPatches)
    monkeypatch.setattr(G, "DevicePatches", lambda *a: ("device side", a[-1]))
    assert G.block_patches(mri, (1, 0, 2), off, inv, 1, "cuda:1") == ("device side", "cuda:1")
    assert G.free_core("cuda") and G.free_core("cpu") == (torch.get_num_threads() < len(os.sched_getaffinity(0)))


@pytest.mark.parametrize("prefetch", [False, True])
def test_batches_come_in_order_from_two_reused_buffers(prefetch):
    mri, off, inv = _block(shape=(6, 9, 8, 3))
    order = (1, 0, 2)
    s, r, q = _centres(mri.shape, order, n=23)
    src = BlockPatches(mri, order, off, inv, 1)
    want = src(s, r, q)
    got, ptrs = [], set()
    for x in G.batches(src, (s, r, q), 5, "cpu", prefetch=prefetch):
        got.append(x.clone())
        ptrs.add(x.data_ptr())
    assert [len(x) for x in got] == [5, 5, 5, 5, 3] and len(ptrs) == 2
    assert torch.cat(got).numpy().tobytes() == want.tobytes()
    again = {x.data_ptr() for x in G.batches(src, (s, r, q), 5, "cpu", prefetch=prefetch)}
    assert again == ptrs  # the next block reuses them: no fresh, page-faulted batch arrays
    early = G.batches(src, (s, r, q), 5, "cpu", prefetch=prefetch)
    next(early)
    early.close()  # a block stopped early (an error) leaves no gather running into a buffer
    dev = G.DevicePatches(mri, order, off, inv, 1, "cpu")
    assert torch.cat(list(G.batches(dev, (s, r, q), 5, "cpu"))).numpy().tobytes() == want.tobytes()


@pytest.mark.parametrize("centre", [True, False])
def test_forward_is_the_plain_batch_loop_bit_for_bit(tmp_path, monkeypatch, centre):
    """The fed forward (reused buffers, prefetch or not, one copy back per block) gives the
    bits of the plain loop it replaced: each batch gathered fresh, run, copied back."""
    mp = write_model(tmp_path / "m.pt", ["a", "b", "c"])
    model = W.network(W.NetworkSpec(mp, load_model))
    mri, off, inv = _block(shape=(5, 9, 10, 3), seed=3)
    order = (1, 0, 2)
    s, r, q = _centres(mri.shape, order, n=50)
    src = BlockPatches(mri, order, off, inv, 1)
    with torch.inference_mode():
        want = [model(torch.from_numpy(src(s[a:a + 16], r[a:a + 16], q[a:a + 16]))).float().numpy()
                for a in range(0, 50, 16)]
    want = np.concatenate([w[:, :, 1, 1] if centre else w for w in want])
    for free in (False, True):
        monkeypatch.setattr(G, "free_core", lambda device, free=free: free)
        got = W.forward(model, src, (s, r, q), batch_size=16, half=1, centre=centre)
        assert got.tobytes() == want.tobytes()
    dev = G.DevicePatches(mri, order, off, inv, 1, "cpu")
    assert W.forward(model, dev, (s, r, q), batch_size=16, half=1, centre=centre).tobytes() == want.tobytes()
