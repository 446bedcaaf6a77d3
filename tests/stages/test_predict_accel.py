"""The accuracy guard of compiled bf16 inference: a trained network's map of a held-out
synthetic brain in bf16 (compiled where a compiler is found) against eager fp32."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from mrhscale.options import EvaluateOptions, Numerics, PatchOptions, PredictOptions
from mrhscale.parallel.context import Context
from mrhscale.stages.evaluate import evaluate
from mrhscale.stages.predict import predict

SYNC = Context(scheduler="synchronous", quiet=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """synth (3 brains) -> ingest -> patches (s01 train, s02 val) -> a small MRH-Net (fast recipe)."""
    from helpers import synth_store

    from mrhscale.stages.patches import extract_patches
    from mrhscale.training import train

    d = tmp_path_factory.mktemp("guard")
    store = synth_store(d, subjects=3, shape=(32, 20, 40), seed=1)
    patches = str(d / "p.zarr")
    extract_patches(store, "mbp", patches, subjects=["s01", "s02"], ctx=Context(scheduler="threads", quiet=True),
                    options=PatchOptions(stride=1, val_subjects=["s02"]))
    # 2 epochs: validation r ~0.88 on the held-out brain (6 gave ~0.92, for ~4 s more), bf16
    # agreeing with fp32 to the same 1e-5 in correlation either way
    run = train(patches, str(d / "run"), recipe="fast", depth=2, width=32, epochs=2, quiet=True)
    return d, store, run["model"]


def test_compiled_bf16_prediction_matches_fp32(trained):
    d, store, model = trained
    maps, rs = {}, {}
    from mrhscale.nn.accel import compiler_missing

    compiled = "off" if compiler_missing("cpu") else "on"
    for name, precision, comp in (("fp32", "fp32", "off"), ("bf16", "bf16", compiled)):
        out = str(d / f"pred_{name}.zarr")
        predict(model, store, out, subjects=["s03"], ctx=SYNC,
                options=PredictOptions(batch_size=1024, numerics=Numerics(precision, comp)))
        ds = xr.open_zarr(out, group="s03", consolidated=False)
        maps[name] = ds["mbp_virtual"].values[ds["mask"].values]
        if name == "bf16":
            assert ds.attrs["lineage"]["numerics"]["precision"] == "bf16"
            assert ds.attrs["made_by"]["numerics"] == f"bf16 {'compiled' if compiled == 'on' else 'eager'}"
        else:  # eager fp32 records nothing new in what made it: earlier stores stay current
            assert "numerics" not in ds.attrs["made_by"]
        ev = evaluate(out, store, str(d / f"eval_{name}"), stains=["mbp"], subjects=["s03"], ctx=Context(quiet=True),
                      options=EvaluateOptions(montage_subjects=0)).by_stain["mbp"]
        rs[name] = ev["per_subject"]["s03"]["virtual"]["pearson"]
    assert maps["fp32"].size > 2000
    corr = np.corrcoef(maps["fp32"], maps["bf16"])[0, 1]
    assert corr >= 0.9999, corr
    assert abs(rs["bf16"] - rs["fp32"]) <= 0.002, rs
    assert rs["fp32"] > 0.5  # a network that learned something: the guard means something


def _auto_not_pinned(monkeypatch):
    """auto takes $MRHSCALE_PRECISION/$MRHSCALE_COMPILE where set (conftest pins fp32, off)."""
    from mrhscale.nn import accel

    monkeypatch.delenv(accel.ENV_PRECISION, raising=False)
    monkeypatch.delenv(accel.ENV_COMPILE, raising=False)


def test_eager_fp32_request_gives_the_default_result(trained, monkeypatch):
    """--precision fp32 --compile off is the reference path, bit for bit (and auto falls back to it)."""
    d, store, model = trained
    from mrhscale.nn import accel

    monkeypatch.setattr(accel, "cpu_bf16_units", lambda: None)
    monkeypatch.setattr(accel, "compiler_missing", lambda kind: "no C++ compiler (test)")
    _auto_not_pinned(monkeypatch)
    out = str(d / "pred_auto_fallback.zarr")
    predict(model, store, out, subjects=["s03"], options=PredictOptions(numerics=Numerics("auto", "auto")),
            ctx=SYNC)
    ref = xr.open_zarr(str(d / "pred_fp32.zarr"), group="s03", consolidated=False)["mbp_virtual"].values
    got = xr.open_zarr(out, group="s03", consolidated=False)
    assert np.array_equal(got["mbp_virtual"].values, ref)
    assert got.attrs["lineage"]["numerics"]["why"].startswith("fp32: no bf16 matrix units")


def test_auto_compiles_only_jobs_that_pay_for_it(trained, monkeypatch):
    """A small job in auto mode runs eager (a compile costs more than it saves); above
    MRHSCALE_COMPILE_MIN_PATCHES it compiles. (bf16 units assumed: auto then compiles the
    graph the guard above compiled, found in the compile cache, not a second cold compile.)"""
    from mrhscale.nn import accel

    d, store, model = trained
    monkeypatch.setattr(accel, "compiler_missing", lambda kind: None)
    monkeypatch.setattr(accel, "cpu_bf16_units", lambda: "avx512_bf16")
    _auto_not_pinned(monkeypatch)
    out = str(d / "pred_auto_small.zarr")
    predict(model, store, out, subjects=["s03"], options=PredictOptions(numerics=Numerics("auto", "auto")),
            ctx=SYNC)
    why = xr.open_zarr(out, group="s03", consolidated=False).attrs["lineage"]["numerics"]
    assert not why["compile"] and "under the 300000 a compile pays for" in why["why"]
    monkeypatch.setenv("MRHSCALE_COMPILE_MIN_PATCHES", "100")
    out = str(d / "pred_auto_large.zarr")
    predict(model, store, out, subjects=["s03"], ctx=SYNC,
            options=PredictOptions(batch_size=1024, numerics=Numerics("auto", "auto")))
    why = xr.open_zarr(out, group="s03", consolidated=False).attrs["lineage"]["numerics"]
    assert why["compile"] and why["precision"] == "bf16"
