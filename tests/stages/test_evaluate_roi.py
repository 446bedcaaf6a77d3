"""--roi: the lesion ROC against the normal voxels of a region, not against the whole brain."""

import numpy as np
import pytest
import xarray as xr
import zarr
from helpers import EVAL_SHAPE as SHAPE
from helpers import write_pair

from mrhscale.errors import MRHError
from mrhscale.options import EvaluateOptions
from mrhscale.parallel.context import Context
from mrhscale.stages.evaluate import evaluate

NO_MONTAGES = EvaluateOptions(montage_subjects=0)  # no figure is looked at here


def _add_roi(store, pred, ids):
    """ROI = the x < 9 half; the virtual stain is as low as the lesion OUTSIDE the ROI."""
    roi = np.zeros(SHAPE, bool)
    roi[:9] = True
    for sid in ids:
        xr.Dataset({"wm": (("x", "y", "z"), roi)}).to_zarr(store, group=sid, mode="a", consolidated=False)
        p = xr.open_zarr(pred, group=sid, consolidated=False).load()
        les = xr.open_zarr(store, group=sid, consolidated=False)["lesion"].values
        v = p["af_virtual"].values.copy()
        v[~roi] = v[les].mean()  # outside the ROI looks like lesion to a whole-brain ROC
        p["af_virtual"] = (("x", "y", "z"), v * p["mask"].values)
        p.to_zarr(pred, group=sid, mode="a", consolidated=False)


def test_roi_restricts_roc(tmp_path):
    store, pred, ids = write_pair(tmp_path, noise=0.0)
    _add_roi(store, pred, ids)
    whole = evaluate(pred, store, str(tmp_path / "a"), stains=["af"], ctx=Context(quiet=True),
                     options=NO_MONTAGES).by_stain["af"]
    inroi = evaluate(pred, store, str(tmp_path / "b"), stains=["af"], roi="wm", ctx=Context(quiet=True),
                     options=NO_MONTAGES).by_stain["af"]
    assert inroi["roi"] == "wm"
    assert inroi["pooled"]["roc"]["virtual"]["auc"] > 0.99
    assert whole["pooled"]["roc"]["virtual"]["auc"] < inroi["pooled"]["roc"]["virtual"]["auc"] - 0.1
    # similarity metrics are unaffected by the ROI (it only concerns the ROC)
    assert whole["pooled"]["virtual"]["pearson"] == pytest.approx(inroi["pooled"]["virtual"]["pearson"])
    n_roi = inroi["per_subject"][ids[0]]["roc"]["virtual"]
    assert n_roi["n_pos"] + n_roi["n_neg"] < whole["per_subject"][ids[0]]["roc"]["virtual"]["n_pos"] + \
        whole["per_subject"][ids[0]]["roc"]["virtual"]["n_neg"]


def test_unknown_roi_is_a_clear_error(tmp_path):
    store, pred, _ = write_pair(tmp_path, noise=0.0)
    with pytest.raises(MRHError, match="--roi nope: not a variable"):
        evaluate(pred, store, str(tmp_path / "a"), stains=["af"], roi="nope", ctx=Context(quiet=True)).by_stain["af"]
    assert zarr.open_group(store, mode="r").attrs["subjects"]
