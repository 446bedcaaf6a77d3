"""ops.merge: network outputs of patches -> voxel values, against the obvious loops."""

import numpy as np
import pytest

from mrhscale.ops.merge import BlockMerger, overlap_mean, to_stain_units


def block_mask(shape=(3, 9, 8), seed=0):
    mask = np.random.default_rng(seed).random(shape) > 0.3
    return mask


@pytest.mark.parametrize("halo", [0, 1, 2])
def test_centre_puts_each_output_on_its_own_voxel(halo):
    mask = block_mask()
    m = BlockMerger(mask, halo, 1, "centre", values=2)
    s, r, q = m.centres()
    inner = mask[:, halo : mask.shape[1] - halo, halo : mask.shape[2] - halo]
    assert len(s) == inner.sum() and mask[s, r, q].all()  # the interior's brain voxels, block frame
    pred = np.stack([s * 100 + r * 10 + q, -s], 1).astype(np.float32)
    m.aggregate(pred)
    out = m.finalize()
    assert out.shape == (*inner.shape, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out[s, r - halo, q - halo], pred)
    assert np.all(out[~inner] == 0)


@pytest.mark.parametrize("halo,half", [(2, 1), (1, 1), (0, 1), (4, 2)])
def test_mean_averages_every_overlapping_output(halo, half):
    rng = np.random.default_rng(1)
    mask = block_mask((2, 10, 11), seed=2)
    m = BlockMerger(mask, halo, half, "mean", values=1)
    s, r, q = m.centres()
    p = 2 * half + 1
    pred = rng.normal(size=(len(s), 1, p, p))
    m.aggregate(pred)
    out = m.finalize()[..., 0]
    S, R, Q = mask.shape
    want = np.zeros((S, R - 2 * halo, Q - 2 * halo))
    for a in range(S):
        for i in range(halo, R - halo):
            for j in range(halo, Q - halo):
                if not mask[a, i, j]:
                    continue
                vals = [pred[k, 0, i - r[k] + half, j - q[k] + half] for k in range(len(s))
                        if s[k] == a and abs(r[k] - i) <= half and abs(q[k] - j) <= half]
                want[a, i - halo, j - halo] = np.mean(vals)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_an_empty_block_or_mask_gives_zeros():
    m = BlockMerger(np.zeros((2, 5, 5), bool), 1, 1, "mean")
    assert len(m.centres()[0]) == 0
    assert m.finalize().shape == (2, 3, 3, 1) and not m.finalize().any()
    m = BlockMerger(np.ones((0, 5, 5), bool), 1, 1)
    assert len(m.centres()[0]) == 0 and m.finalize().shape == (0, 3, 3, 1)


def test_overlap_mean_leaves_unreached_voxels_zero():
    pred = np.ones((1, 2, 3, 3))
    got = overlap_mean(pred, (np.array([0]), np.array([0]), np.array([0])), (1, 4, 4), 1)
    assert got.shape == (1, 4, 4, 2)
    assert got[0, :2, :2].min() == 1 and got[0, 2:].max() == 0 and got[0, :, 2:].max() == 0


def test_stain_units_per_stain_and_the_spread_scaled_alone():
    pred = np.ones((4, 4), np.float32)  # 2 stains, then an ensemble's 2 spreads
    to_stain_units(pred, np.array([1.0, 2.0]), np.array([10.0, 20.0]), np.array([3.0, 5.0]))
    np.testing.assert_array_equal(pred[0], [11, 22, 3, 5])
    one = to_stain_units(np.full((3, 1, 3, 3), 2.0), 7.0, 60.0)
    assert np.all(one == 127.0)
