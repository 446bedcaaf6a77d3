"""predict --tta: the mean over each patch's 8 in-plane symmetries, recorded in what made it."""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from click.testing import CliRunner
from helpers import channel_names, write_model

from mrhscale.cli import main
from mrhscale.io.bundle import read_bundle, save_bundle
from mrhscale.nn.model import MRHNet
from mrhscale.ops.norm import Normalisation
from mrhscale.options import PredictOptions
from mrhscale.parallel.context import Context
from mrhscale.stages.predict import predict


def symmetric_model(path, channels):
    """MRH-Net whose every 3x3 kernel is symmetric under the 8 symmetries: the network is
    then equivariant, and TTA must give what it gives without."""
    torch.manual_seed(1)
    m = MRHNet(len(channels), depth=1, width=8, stains=["af"])
    with torch.no_grad():
        for conv in (mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)):
            w = conv.weight
            sym = sum(torch.rot90(w, r, (-2, -1)) + torch.rot90(w, r, (-2, -1)).flip(-1) for r in range(4)) / 8
            w.copy_(sym * 3)
    norm = Normalisation("percentile", [10.0] * len(channels), [100.0] * len(channels), 0.0, 50.0)
    save_bundle(path, m, channels=list(channels), norm=norm, patch={"half": 1, "size": 3, "axis": "y"})
    return str(path)


def values(out, sid):
    ds = xr.open_zarr(out, group=sid, consolidated=False)
    return ds["af_virtual"].values, ds.attrs


def test_tta_of_an_equivariant_network_changes_nothing(cohort_store, tmp_path):
    store, ids = cohort_store
    model = symmetric_model(tmp_path / "sym.pt", channel_names(5))
    kw = dict(subjects=[ids[0]], ctx=Context(scheduler="synchronous", quiet=True))
    predict(model, store, str(tmp_path / "plain.zarr"), **kw)
    predict(model, store, str(tmp_path / "tta.zarr"), options=PredictOptions(tta=True), **kw)
    a, _ = values(str(tmp_path / "plain.zarr"), ids[0])
    b, attrs = values(str(tmp_path / "tta.zarr"), ids[0])
    assert np.abs(a).max() > 0 and np.allclose(a, b, atol=1e-4 * np.abs(a).max())
    assert attrs["made_by"]["tta"] is True and attrs["lineage"]["tta"] is True


def test_tta_differs_for_a_plain_network_and_is_not_reused_for_a_plain_request(cohort_store, tmp_path):
    store, ids = cohort_store
    model = write_model(tmp_path / "m.pt", channel_names(5))
    out = str(tmp_path / "p.zarr")
    predict(model, store, out, subjects=[ids[0]], options=PredictOptions(tta=True),
            ctx=Context(scheduler="synchronous", quiet=True))
    b, _ = values(out, ids[0])
    r = CliRunner().invoke(main, ["predict", model, store, "--out", out, "--subjects", ids[0],
                                  "--scheduler", "synchronous", "-q"])
    assert r.exit_code == 2 and "tta" in r.output  # made with TTA: not silently reused
    predict(model, store, str(tmp_path / "q.zarr"), subjects=[ids[0]],
            ctx=Context(scheduler="synchronous", quiet=True))
    a, attrs = values(str(tmp_path / "q.zarr"), ids[0])
    assert "tta" not in attrs["made_by"] and not np.allclose(a, b)
    assert read_bundle(model)["arch"]["depth"] == 1
