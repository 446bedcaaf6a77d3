"""Training-time augmentation: reproducible per (seed, epoch, step, rank), the target turns
with its patch, and a resumed augmented run is exact."""

from __future__ import annotations

import pytest
import torch
from helpers import make_patch_store

from mrhscale.errors import MRHError
from mrhscale.io.bundle import read_bundle
from mrhscale.ops.symmetry import dihedral, symmetric_mean
from mrhscale.training import train
from mrhscale.training.augment import AUGMENTATIONS, Augment, parse


def batch(seed=0, b=64, c=4, p=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((b, c, p, p), generator=g)
    return x, x[:, 0].clone() * 10  # a target equal to channel 0 (scaled): easy to follow


def test_parse():
    assert parse("flip,gain") == ("gain", "flip") and parse("all") == AUGMENTATIONS and parse("") == ()
    with pytest.raises(MRHError, match="--augment gain,blur: unknown blur"):
        parse("gain,blur")


def test_symmetries_invert_and_are_eight():
    x = torch.arange(2 * 9, dtype=torch.float32).view(2, 3, 3)
    seen = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(seen) == 8
    for k in range(8):
        assert torch.equal(dihedral(dihedral(x, k), k, inverse=True), x)


def test_reproducible_and_the_target_turns_with_its_patch():
    x, t = batch()
    aug = Augment(("flip",), seed=3)
    x1, t1 = aug(x, t, epoch=1, step=5)
    x2, t2 = aug(x, t, epoch=1, step=5)
    assert torch.equal(x1, x2) and torch.equal(t1, t2)
    x3, _ = aug(x, t, epoch=1, step=6)
    assert not torch.equal(x1, x3)
    assert torch.equal(t1, x1[:, 0] * 10)  # still channel 0 after every patch's own symmetry
    assert not torch.equal(x1, x)



def test_a_rank_augments_its_slice_as_one_process_augments_the_global_batch():
    """Draws are made for the global batch from (seed, epoch, step): rank r of 2 gets the
    rows one process gives the same samples in a batch twice as large."""
    x, t = batch()
    kinds = ("gain", "offset", "bias", "noise", "flip")
    xg, tg = Augment(kinds, seed=3)(torch.cat([x, x + 1]), torch.cat([t, t + 1]), 2, 7)
    for rank, (xs, ts) in enumerate([(x, t), (x + 1, t + 1)]):
        xr, tr = Augment(kinds, seed=3, rank=rank, world=2)(xs, ts, 2, 7)
        n = len(x)
        assert torch.equal(xr, xg[rank * n:(rank + 1) * n]) and torch.equal(tr, tg[rank * n:(rank + 1) * n])


def test_intensity_augmentations_change_inputs_not_targets():
    x, t = batch()
    xa, ta = Augment(("gain", "offset", "bias", "noise"), seed=0)(x, t, 0, 0)
    assert torch.equal(ta, t) and xa.shape == x.shape
    gain_only, _ = Augment(("gain",), seed=0)(x, t, 0, 0)
    ratio = gain_only / x  # one factor per patch and contrast
    assert torch.allclose(ratio, ratio[..., :1, :1].expand_as(ratio), rtol=1e-5)
    assert 0.6 < float(ratio.min()) and float(ratio.max()) < 1.6


def test_symmetric_mean_of_an_equivariant_model_is_the_model():
    def model(v):  # pointwise: commutes with every symmetry
        return v.sum(1) ** 2

    x, _ = batch()
    assert torch.allclose(symmetric_mean(model, x), model(x), atol=1e-5)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_patch_store(tmp_path_factory.mktemp("aug") / "patches.zarr", n_train=512, n_val=128)


def test_augmented_run_learns_and_resumes_exactly(store, tmp_path):
    # the paper's piecewise lr does not depend on the epoch count (robust's cosine does), so
    # 2 epochs extended to 3 must equal 3 straight
    kw = dict(depth=1, width=16, batch_size=64, seed=2, threads=1, quiet=True, augment="all", recipe="paper")
    straight = train(store, str(tmp_path / "a"), epochs=3, **kw)
    hist = straight["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert read_bundle(straight["model"])["provenance"]["config"]["augment"] == ",".join(AUGMENTATIONS)
    out = str(tmp_path / "b")
    train(store, out, epochs=2, **kw)
    res = train(store, out, resume=True, epochs=3, quiet=True, threads=1)
    a, b = read_bundle(res["model"])["state_dict"], read_bundle(straight["model"])["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
