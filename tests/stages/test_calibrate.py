"""--calibration-subjects: an ensemble calibrated on whole brains, a factor per tissue
label, applied per voxel at predict; the user's errors."""

import numpy as np
import pytest
from helpers import channel_names, make_cohort_store, with_wm, write_ensemble

from mrhscale.errors import MRHError
from mrhscale.io.bundle import read_bundle, write_bundle
from mrhscale.stages.calibrate import calibrate, calibrate_on_brains
from mrhscale.stages.predict_volume import predict_volume
from mrhscale.stores.cohort import CohortStore
from mrhscale.training.config import TrainConfig, calibration_groups
from mrhscale.training.ensemble import calibration_record, fit_stain


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "cohort.zarr"
    make_cohort_store(path, n_subjects=2, edit=with_wm(6))
    return str(path)


def fit(v, u, r, g, labels, ood=None):
    return fit_stain(v, u, r, g, held_out=True, labels=labels, fitted_on="subjects", ood=ood)


def test_factors_per_label_fitted_on_whole_brains_hold_in_each_label(cohort, tmp_path):
    path, _ = write_ensemble(str(tmp_path / "ens.pt"), channel_names(5), members=2)
    bundle = read_bundle(path)
    fits = calibrate_on_brains(bundle, cohort, ["s01", "s02"], ("labels", ["wm"]), fit)
    cal = calibration_record(["af"], fits, "subjects")
    g = cal["stains"]["af"]["groups"]
    assert g["by"] == "labels" and g["labels"] == ["wm"] and len(g["factor"]) == 2
    assert cal["stains"]["af"]["n"] == sum(g["n"]) and cal["stains"]["af"]["alpha"] == 0.05
    calibrated = str(tmp_path / "cal.pt")
    write_bundle(calibrated, {**bundle, "uncertainty": {**bundle["uncertainty"], "calibration": cal}})
    ds = CohortStore.open(cohort).open_subject("s01")
    maps = predict_volume(calibrated, ds)
    err = np.abs(maps["af_virtual"].values - ds["af"].transpose("x", "y", "z").values)
    unc = maps["af_uncertainty"].values
    mask, wm = ds["mask"].values.astype(bool), ds["wm"].values.astype(bool)
    raw = predict_volume(path, ds)["af_uncertainty"].values / 1.5  # write_ensemble: factor 1.5
    for inside, f in ((mask & wm, g["factor"][0]), (mask & ~wm, g["factor"][1])):
        assert np.allclose(unc[inside], f * raw[inside], rtol=1e-4)  # each voxel its tissue's factor
    assert g["coverage"][0] >= 0.94 and g["coverage"][1] >= 0.94
    assert (err[mask] <= 1.96 * unc[mask] + 1e-6).mean() >= 0.95  # fitted on these brains: covered


def test_a_brain_without_the_label_keeps_the_global_factor(cohort, tmp_path):
    path, _ = write_ensemble(str(tmp_path / "ens.pt"), channel_names(5), members=2)
    bundle = read_bundle(path)
    cal = calibration_record(["af"], calibrate_on_brains(bundle, cohort, ["s01"], ("labels", ["wm"]), fit), "subjects")
    calibrated = write_bundle(str(tmp_path / "cal.pt"), {**bundle, "uncertainty": {**bundle["uncertainty"],
                                                                                    "calibration": cal}})
    ds = CohortStore.open(cohort).open_subject("s02").drop_vars("wm")
    unc = predict_volume(calibrated, ds)["af_uncertainty"].values
    raw = predict_volume(path, ds)["af_uncertainty"].values / 1.5
    mask = ds["mask"].values.astype(bool)
    assert np.allclose(unc[mask], cal["factor"][0] * raw[mask], rtol=1e-4)


def test_calibrate_rewrites_the_bundles_record(cohort, tmp_path):
    path, singles = write_ensemble(str(tmp_path / "ens.pt"), channel_names(5), members=2)
    cal = calibrate(path, ["s01", "s02"], groups="value:3", cohort=cohort)
    b = read_bundle(path)
    assert b["uncertainty"]["calibration"] == cal and cal["fitted_on"] == "subjects"
    assert cal["subjects"] == ["s01", "s02"] and cal["stains"]["af"]["groups"]["by"] == "value"
    assert len(cal["stains"]["af"]["groups"]["edges"]) == 2 and b["uncertainty"]["seeds"] == [0, 1]
    with pytest.raises(MRHError, match="one network has no ensemble spread"):
        calibrate(singles[0], ["s01"], cohort=cohort)
    with pytest.raises(MRHError, match="do not name the cohort store"):
        calibrate(path, ["s01"])  # a bundle without the patch store's records


def test_the_users_errors(cohort, tmp_path):
    path, _ = write_ensemble(str(tmp_path / "ens.pt"), channel_names(5), members=2)
    with pytest.raises(MRHError, match="s09 not in the cohort store"):
        calibrate_on_brains(read_bundle(path), cohort, ["s09"], ("none", None), fit)
    with pytest.raises(MRHError, match="has no label lesion"):
        calibrate_on_brains(read_bundle(path), cohort, ["s01"], ("labels", ["lesion"]), fit)
    with pytest.raises(MRHError, match="tissue labels are in whole brains"):
        TrainConfig(calibration_groups="wm").validate()
    with pytest.raises(MRHError, match="N >= 2"):
        calibration_groups("value:1", False)
    assert calibration_groups("value:4", False) == ("value", 4) and calibration_groups("none", True)[0] == "none"
