"""Model export: ONNX and pt2 files that reproduce the bundle's raw-in, raw-out inference.

The reference is built here independently of the export code: the bundle's network with
the normalisation predict applies ((x - offset) / scale, NaN/inf -> 0, output * target_scale
+ target_offset), so the graph baked into the file is checked against predict's convention.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import write_model

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.io.bundle import load_model, read_bundle
from mrhscale.stages.export import FORMAT, export_model, read_export_metadata
from mrhscale.stores import sha256_file

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CHANNELS = ["t2", "mt_off", "mt_on", "dwi2000_0"]
HALF = 2
TOL = 1e-4


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("model") / "m.pt", CHANNELS, half=HALF, depth=1, width=8)


@pytest.fixture(scope="module")
def onnx_export(bundle, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("onnx") / "m.onnx")
    return export_model(bundle, out, "onnx")


@pytest.fixture(scope="module")
def pt2_export(bundle, tmp_path_factory):
    return export_model(bundle, tmp_path_factory.mktemp("pt2") / "m.pt2", "pt2")


def raw_input(n, size=2 * HALF + 1, seed=0, nan=False):
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 50.0, size=(n, len(CHANNELS), size, size)).astype(np.float32)
    if nan:
        x[0, 1, 0, 0] = np.nan
        x[-1, 0, 2, 1] = np.inf
    return x


def reference(bundle, x):
    """Raw stain units from raw patches, the way predict computes them."""
    model, meta = load_model(bundle)
    xn = meta["norm"].apply_inputs(x, channel_axis=1)
    xn[~np.isfinite(xn)] = 0.0
    with torch.inference_mode():
        y = model(torch.from_numpy(xn)).numpy()
    return meta["norm"].invert_target(y)


@pytest.mark.parametrize("n,size,nan", [(1, 5, False), (3, 5, True), (2, 9, False)])
def test_onnx_matches_torch(bundle, onnx_export, n, size, nan):
    sess = ort.InferenceSession(onnx_export.out, providers=["CPUExecutionProvider"])
    x = raw_input(n, size, seed=n, nan=nan)
    got = sess.run(["stain"], {"mri": x})[0]
    ref = reference(bundle, x)
    assert got.shape == (n, 1, size, size)  # NTHW: the stain axis, one stain
    diff = float(np.abs(got - ref).max())
    assert diff < TOL, f"max |onnx - torch| = {diff:.3g} (batch {n}, {size}x{size})"
    assert float(np.abs(ref).max()) > 1.0  # outputs in raw stain units, not normalised ones
    print(f"onnx vs torch: batch {n} {size}x{size}: max abs diff {diff:.3g}")


def test_onnx_metadata_and_sidecar(bundle, onnx_export):
    b = read_bundle(bundle)
    proto = onnx.load(onnx_export.out)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["format"] == FORMAT and props["target"] == "af" and json.loads(props["stains"]) == ["af"]
    assert json.loads(props["channels"]) == CHANNELS
    norm = json.loads(props["normalisation"])
    assert norm["offset"] == b["norm"]["offset"] and norm["scale"] == b["norm"]["scale"]
    assert norm["target_scale"] == [60.0] and "inside the graph" in norm["applied"]
    assert json.loads(props["patch"]) == b["patch"]
    assert json.loads(props["model"])["sha256"] == sha256_file(bundle)
    assert props["mrhscale_version"] and json.loads(props["input"])["layout"] == "NCHW"
    assert [i.name for i in proto.graph.input] == ["mri"] and [o.name for o in proto.graph.output] == ["stain"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", len(CHANNELS), "height", "width"]
    assert read_export_metadata(onnx_export.out)["channels"] == CHANNELS

    with open(onnx_export.sidecar) as fh:
        side = json.load(fh)
    assert onnx_export.sidecar == onnx_export.out + ".json"
    assert side["sha256"] == sha256_file(onnx_export.out)
    assert side["channels"] == CHANNELS and side["target"] == "af" and side["patch"] == b["patch"]
    assert side["input"]["name"] == "mri" and side["output"]["name"] == "stain"
    assert side["dynamic"] == ["batch", "height", "width"] and side["onnx"]["opset"] >= 13
    assert side["check"]["max_abs_diff"] == onnx_export.max_abs_diff < TOL
    print(f"exporter {onnx_export.exporter}, opset {side['onnx']['opset']}, "
          f"check max abs diff {onnx_export.max_abs_diff:.3g}")


def test_pt2_round_trip(bundle, pt2_export):
    res = pt2_export
    extra = {"mrhscale.json": ""}
    mod = torch.export.load(res.out, extra_files=extra).module()
    assert json.loads(extra["mrhscale.json"])["channels"] == CHANNELS
    assert read_export_metadata(res.out)["export_format"] == "pt2"
    for n in (1, 3):
        x = raw_input(n, seed=10 + n, nan=n == 3)
        with torch.inference_mode():
            got = mod(torch.from_numpy(x)).numpy()
        diff = float(np.abs(got - reference(bundle, x)).max())
        assert diff < TOL, f"max |pt2 - torch| = {diff:.3g} (batch {n})"


def test_onnx_without_onnxscript_falls_back(bundle, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    res = export_model(bundle, tmp_path / "m.onnx")
    assert res.exporter == "torch.onnx (torchscript)" and res.max_abs_diff < TOL
    x = raw_input(3, 7, seed=5)
    got = ort.InferenceSession(res.out, providers=["CPUExecutionProvider"]).run(["stain"], {"mri": x})[0]
    diff = float(np.abs(got - reference(bundle, x)).max())
    assert diff < TOL, f"max |onnx (torchscript) - torch| = {diff:.3g}"


def test_library_refusals(bundle, tmp_path, monkeypatch):
    with pytest.raises(MRHError, match="--format"):
        export_model(bundle, tmp_path / "m.x", "tflite")
    with pytest.raises(MRHError, match="--opset"):
        export_model(bundle, tmp_path / "m.pt2", "pt2", opset=17)
    side = tmp_path / "m.onnx.json"
    side.write_text("{}")
    with pytest.raises(MRHError, match="not an mrhscale export"):
        export_model(bundle, tmp_path / "m.onnx")
    assert side.read_text() == "{}" and not (tmp_path / "m.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MRHError, match=r'pip install "mrhscale\[onnx\]"'):
        export_model(bundle, tmp_path / "n.onnx")


def one_error_line(r) -> str:
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_cli_export(bundle, onnx_export, tmp_path):
    runner = CliRunner()
    out = tmp_path / "m.onnx"
    line = one_error_line(runner.invoke(main, ["export", str(tmp_path / "nope.pt"), "--out", str(out)]))
    assert line.startswith("mrhscale: error:") and "not found" in line and not out.exists()

    out.write_bytes(b"someone else's file")
    for extra in ([], ["--overwrite"]):
        line = one_error_line(runner.invoke(main, ["export", bundle, "--out", str(out), "-q", *extra]))
        assert "not an mrhscale export" in line
        assert out.read_bytes() == b"someone else's file" and not os.path.exists(f"{out}.json")
    out.unlink()

    shutil.copy(onnx_export.out, out)  # an earlier export: kept unless --overwrite
    shutil.copy(onnx_export.sidecar, f"{out}.json")
    first = os.stat(out).st_ino
    line = one_error_line(runner.invoke(main, ["export", bundle, "--out", str(out), "-q"]))
    assert "--overwrite" in line and os.stat(out).st_ino == first
    r = runner.invoke(main, ["export", bundle, "--format", "pt2", "--out", str(out), "--overwrite"])
    assert r.exit_code == 0 and "max |export - torch|" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output  # no exporter chatter
    assert os.stat(out).st_ino != first and read_export_metadata(str(out))["export_format"] == "pt2"
    with open(f"{out}.json") as fh:
        assert json.load(fh)["sha256"] == sha256_file(str(out))

    r = runner.invoke(main, ["export", bundle, "--format", "tflite", "--out", str(tmp_path / "m.tfl")])
    assert r.exit_code == 2 and "--format 'tflite': choose one of onnx, pt2" in r.output
