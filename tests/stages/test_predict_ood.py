"""predict writes the out-of-distribution score beside the maps, and it flags an artefact."""

import json
import os

import numpy as np
import pytest
from helpers import channel_names, make_cohort_store, write_ensemble, write_model
from scipy import ndimage

from mrhscale.io.bundle import read_bundle, write_bundle
from mrhscale.ops.ood import fit_input_distance
from mrhscale.ops.uncertainty import widen_by_ood
from mrhscale.stages.predict import predict
from mrhscale.stages.predict_volume import predict_volume
from mrhscale.stores.cohort import CohortStore
from mrhscale.stores.predictions import PredictionStore

BOX = (slice(3, 9), slice(2, 8), slice(4, 10))


def artefact(ds, i):
    """Subject 2: signal lost in two contrasts and raised in a third inside a box."""
    if i == 1:
        mri = ds["mri"].values.copy()
        mri[BOX + (slice(0, 2),)] *= 0.15
        mri[BOX + (3,)] *= 2.5
        ds["mri"] = (ds["mri"].dims, mri)
    return ds


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    path = tmp_path_factory.mktemp("ood") / "cohort.zarr"
    make_cohort_store(path, n_subjects=2, edit=artefact)
    return str(path)


def with_score(path: str, cohort: str) -> str:
    """The bundle at ``path`` with a score fitted on subject 1 as predict normalises it
    (3 x 3 in-plane means: the patch axis is y)."""
    b = read_bundle(path)
    ds = CohortStore.open(cohort).open_subject("s01")
    from mrhscale.ops.norm import Normalisation

    off, inv = Normalisation.from_dict(b["norm"]).input_arrays()
    x = (ds["mri"].transpose("x", "y", "z", "contrast").values - off) * inv
    means = ndimage.uniform_filter(x, size=(3, 1, 3, 1), mode="constant")
    inner = ds["mask"].transpose("x", "y", "z").values.astype(bool)
    write_bundle(path, {**b, "ood": fit_input_distance(means[inner])})
    return path


def xyz(v) -> np.ndarray:
    return np.asarray(v.transpose("x", "y", "z").values)


def test_the_score_is_written_beside_the_uncertainty_and_leaves_the_maps_alone(cohort, tmp_path):
    plain, _ = write_ensemble(str(tmp_path / "ens.pt"), channel_names(5), members=2)
    scored = write_bundle(str(tmp_path / "scored.pt"), read_bundle(plain))
    with_score(scored, cohort)
    ds = CohortStore.open(cohort).open_subject("s02")
    a, b = predict_volume(plain, ds), predict_volume(scored, ds)
    assert "ood" not in a and set(b.data_vars) == {*a.data_vars, "ood"}
    for v in a.data_vars:  # the score costs the maps nothing, bit for bit
        assert np.array_equal(a[v].values, b[v].values)
    assert b["ood"].attrs["kind"] == "out-of-distribution score"
    assert b["ood"].attrs["training_quantiles"]["50"] == 1.0


def test_an_artefact_scores_far_above_the_rest_of_the_brain(cohort, tmp_path):
    path = with_score(write_model(str(tmp_path / "one.pt"), channel_names(5)), cohort)
    ds = CohortStore.open(cohort).open_subject("s02")
    ood = xyz(predict_volume(path, ds)["ood"])  # a single network: no ensemble needed for it
    mask = xyz(ds["mask"]).astype(bool)
    box = np.zeros_like(mask)
    box[4:8, 2:8, 5:9] = True  # the box's core: every 3 x 3 patch mean inside it
    assert ood[box & mask].mean() > 3 * ood[mask & ~box].mean()
    assert np.median(xyz(predict_volume(path, CohortStore.open(cohort).open_subject("s01"))["ood"])[mask]) < 1.5


def test_predict_stores_the_score_and_its_nifti(cohort, tmp_path):
    path = with_score(write_model(str(tmp_path / "one.pt"), channel_names(5)), cohort)
    out, nifti = str(tmp_path / "pred.zarr"), str(tmp_path / "nii")
    predict(path, cohort, out, nifti_dir=nifti, subjects=["s02"])
    ds = PredictionStore.open(out).open_subject("s02")
    assert "ood" in ds and ds["ood"].attrs["units"] == "1 = a typical training voxel"
    assert os.path.exists(os.path.join(nifti, "s02_ood.nii.gz"))


def test_an_uncertainty_is_widened_by_the_score_to_its_power():
    pred = np.array([[10.0, 2.0, 4.0], [20.0, 3.0, 1.0]], np.float32)  # map, uncertainty, score (1 stain)
    widen_by_ood(pred, 1, [0.5])
    assert pred[:, 1].tolist() == [4.0, 3.0] and pred[:, 0].tolist() == [10.0, 20.0]


def test_bids_derivatives_hold_the_score_as_its_own_map(cohort, tmp_path):
    from mrhscale.io import bids

    path = with_score(write_model(str(tmp_path / "one.pt"), channel_names(5)), cohort)
    der = tmp_path / "deriv"
    predict(path, cohort, str(tmp_path / "p.zarr"), bids_derivatives=str(der), subjects=["s02"])
    got = der / "sub-s02" / "anat" / "sub-s02_desc-ood_score.nii.gz"
    side = json.loads((der / "sub-s02" / "anat" / "sub-s02_desc-ood_score.json").read_text())
    assert got.exists() and "Stain" not in side and "out-of-distribution" in side["Description"]
    assert bids.layout_problems(str(der)) == []
