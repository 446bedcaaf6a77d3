"""Stores and bundles written before stains were always a list read as today's
(stores/legacy.py): a one-stain patch store's [N, P, P] targets, a bundle whose head is
``conv4``/``conv5`` with scalar target statistics and a flat calibration."""

import numpy as np
import pytest
import torch
from helpers import make_patch_store, write_model

from mrhscale.io.bundle import describe_bundle, load_model, read_bundle
from mrhscale.stores import PatchStore
from mrhscale.stores.legacy import calibration_of, head_state, stains_of, with_stain_axis
from mrhscale.training.stream import PatchStream


def test_stains_of_old_and_new_records():
    assert stains_of({"target": "af"}) == ["af"]
    assert stains_of({"target": "nf,mbp"}) == ["nf", "mbp"]
    assert stains_of({"target": "nf,mbp", "stains": ["nf", "mbp"]}) == ["nf", "mbp"]
    assert stains_of({"target": "af", "stains": ["af"]}) == ["af"]


def test_an_old_patch_store_reads_with_a_stain_axis(tmp_path):
    old = make_patch_store(tmp_path / "old.zarr", n_train=100, n_val=20, chunk=32, legacy=True)
    new = make_patch_store(tmp_path / "new.zarr", n_train=100, n_val=20, chunk=32)
    _, t_old = PatchStore.open(old).split("train")
    _, t_new = PatchStore.open(new).split("train")
    assert t_old.shape == t_new.shape == (100, 1, 3, 3) and t_old.chunks == (32, 1, 3, 3)
    np.testing.assert_array_equal(t_old.get_basic_selection(slice(10, 40)), t_new[10:40])
    np.testing.assert_array_equal(t_old.get_orthogonal_selection(([3, 7, 99],)), t_new[[3, 7, 99]])
    np.testing.assert_array_equal(t_old[5:9, 0, 1], t_new[5:9, 0, 1])
    assert with_stain_axis(t_new) is t_new
    # the stream's batches (decoded into its own buffers) are the same, stain axis and all
    a = list(PatchStream(old, batch_size=16, seed=3, drop_last=False))
    b = list(PatchStream(new, batch_size=16, seed=3, drop_last=False))
    assert len(a) == len(b) == 7
    for (xa, ta), (xb, tb) in zip(a, b, strict=True):
        assert ta.shape[1:] == (1, 3, 3)
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(ta, tb, rtol=0, atol=0)


def _as_old_bundle(path, out):
    """``path`` rewritten as a one-stain bundle of before: top-level head, no ``stains``,
    numbers for the target statistics."""
    b = read_bundle(path)
    b["state_dict"] = {k.removeprefix("heads.0."): v for k, v in b["state_dict"].items()}
    b.pop("stains")
    b["arch"].pop("stains")
    b["norm"]["target_offset"], b["norm"]["target_scale"] = b["norm"]["target_offset"][0], b["norm"]["target_scale"][0]
    torch.save(b, out)
    return str(out)


def test_an_old_bundle_loads_and_predicts_the_same(tmp_path):
    new = write_model(tmp_path / "new.pt", ["a", "b", "c"], target="nf")
    old = _as_old_bundle(new, tmp_path / "old.pt")
    assert "conv4.weight" in read_bundle(old)["state_dict"]
    m_old, meta_old = load_model(old)
    m_new, meta_new = load_model(new)
    assert meta_old["stains"] == meta_new["stains"] == ["nf"] and m_old.config == m_new.config
    assert meta_old["norm"].target_scale == meta_new["norm"].target_scale
    x = torch.randn(4, 3, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(m_old(x), m_new(x), rtol=0, atol=0)
    assert "stains         nf" in describe_bundle(old)


def test_head_state_and_calibration_of_old_records():
    w = torch.zeros(1)
    assert set(head_state({"conv1.weight": w, "conv4.bias": w, "conv5.weight": w})) == {
        "conv1.weight", "heads.0.conv4.bias", "heads.0.conv5.weight"}
    flat = {"uncertainty": {"calibration": {"factor": 1.7, "fitted_on": "val", "n": 9}}}
    assert calibration_of(flat, ["af"]) == {"af": {"factor": 1.7, "fitted_on": "val", "n": 9}}
    per = {"uncertainty": {"calibration": {"factor": [1.2], "stains": {"af": {"factor": 1.2}}}}}
    assert calibration_of(per, ["af"]) == {"af": {"factor": 1.2}}
    assert calibration_of({"uncertainty": {"calibration": {"factor": 1.0, "fitted_on": None}}}, ["af"]) == {}


@pytest.mark.parametrize("field", ["target_offset", "target_scale"])
def test_old_scalar_target_statistics_become_lists(field):
    from mrhscale.ops.norm import Normalisation

    d = Normalisation("percentile", [0.0], [1.0], [0.0], [2.0]).to_dict()
    d[field] = 3.0
    assert getattr(Normalisation.from_dict(d), field) == [3.0]
