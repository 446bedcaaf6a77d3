"""Training fits the out-of-distribution score into the bundle; an older bundle gets it after."""

import numpy as np
import pytest
import zarr
from helpers import make_patch_store

from mrhscale.errors import MRHError
from mrhscale.io.bundle import read_bundle, write_bundle
from mrhscale.ops.norm import Normalisation
from mrhscale.ops.ood import input_distance
from mrhscale.training import train
from mrhscale.training.ood import add_input_distance

pytestmark = pytest.mark.slow  # default-run budget (README: make test <= 6 min on 2 cores); run in .ci/run's slow step
SMALL = dict(depth=1, width=8, epochs=1, batch_size=64, threads=1, quiet=True, seed=3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    store = make_patch_store(tmp_path_factory.mktemp("p") / "patches.zarr", n_train=512, n_val=128)
    return store, train(store, str(tmp_path_factory.mktemp("run") / "run"), **SMALL)


def test_a_trained_bundle_scores_its_own_training_patches_as_typical(run):
    store, res = run
    rec = read_bundle(res.model)["ood"]
    assert rec["n"] == 512 and rec["training_quantiles"]["50"] == 1.0
    norm = Normalisation.from_dict(read_bundle(res.model)["norm"])
    g = zarr.open_group(store, mode="r")
    x, origin = np.asarray(g["train/inputs"][:], np.float64), np.asarray(g["train/origin"][:])
    attrs = dict(g.attrs)
    means = np.empty(x.shape[:2])
    for i, sid in enumerate(attrs["subject_norm"]):  # each brain by its own statistics, as training did
        rows = origin[:, 0] == i
        off, inv = norm.for_subject(attrs["subject_norm"][sid]).input_arrays()
        means[rows] = ((x[rows] - off[None, :, None, None]) * inv[None, :, None, None]).mean((-2, -1))
    assert np.median(input_distance(means, rec)) == pytest.approx(1.0, rel=0.02)


def test_a_bundle_without_the_score_gets_the_same_one_fitted_after(run, tmp_path):
    _, res = run
    b = read_bundle(res.model)
    old = write_bundle(str(tmp_path / "old.pt"), {k: v for k, v in b.items() if k != "ood"})
    rec = add_input_distance(old)
    assert read_bundle(old)["ood"] == rec
    np.testing.assert_allclose(rec["whiten"], b["ood"]["whiten"], rtol=1e-6)  # the same shuffled patches


def test_a_bundle_that_names_no_patch_store_is_refused(run, tmp_path):
    _, res = run
    b = read_bundle(res.model)
    path = write_bundle(str(tmp_path / "anon.pt"), {**b, "provenance": {}})
    with pytest.raises(MRHError, match="patch store"):
        add_input_distance(path)
