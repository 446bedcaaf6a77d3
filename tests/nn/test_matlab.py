"""MATLAB importer: decode -> check -> convert, against the published file when present.

The published network (../shared/mrhnet/ beside the repo, or $MRHSCALE_MRHNET_DIR) is
checked against an independent numpy executor of the decoded MATLAB layer graph; the
synthetic round trips (random MRHNet -> MATLAB layout -> .mat -> bundle) always run.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.io.bundle import load_model, read_bundle
from mrhscale.io.matlab import read_layer_graph, save_layer_graph_mat
from mrhscale.nn.matlab import (
    DEFAULT_CHANNELS_67,
    check_mrhnet_graph,
    layer_graph_to_model,
    mrhnet_to_layer_graph,
)
from mrhscale.ops.layer_graph import LayerGraph, MatLayer, count_parameters
from mrhscale.stages.import_matlab import import_matlab, infer_target
from mrhscale.nn.model import MRHNet

REAL_NAME = "net_5layerV3Res_HRJG_allMRIs_Fluo.mat"


def _mrhnet_dir() -> Path:
    env = os.environ.get("MRHSCALE_MRHNET_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "mrhnet"


REAL = _mrhnet_dir() / REAL_NAME
needs_real = pytest.mark.skipif(
    not REAL.is_file(),
    reason=f"published MRH-Net file not found at {REAL} (put ../shared/mrhnet/ beside the repo "
    "or set MRHSCALE_MRHNET_DIR)",
)


# ---------------------------------------------------------------- independent executor


def run_matlab_graph(graph: LayerGraph, x: np.ndarray) -> np.ndarray:
    """Forward pass of a decoded MATLAB layer graph, in MATLAB layout, float64.

    x: [B, H, W, C]. Walks the layers in dependency order along ``Connections``:
    convolution = 'same' zero-padded cross-correlation with W[h, w, cin, cout] + bias,
    ReLU, addition of all inputs, regression = identity. Returns [B, H, W, Cout].
    Written from MATLAB's definitions only; shares no code with the importer.
    """
    by_name = {lay.name: lay for lay in graph.layers}
    inputs: dict[str, list[str]] = {n: [] for n in by_name}
    for src, dst in graph.connections:
        inputs[dst.split("/")[0]].append(src.split("/")[0])
    out: dict[str, np.ndarray] = {}
    pending = list(by_name)
    while pending:
        ready = [n for n in pending if all(s in out for s in inputs[n])]
        assert ready, "graph has a cycle"
        for n in ready:
            lay, ins = by_name[n], [out[s] for s in inputs[n]]
            if lay.kind == "input":
                y = x.astype(np.float64)
            elif lay.kind == "conv":
                w = np.asarray(lay.weights, np.float64)
                if w.ndim == 3:
                    w = w[..., None]
                kh, kw = w.shape[:2]
                a = np.pad(ins[0], ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
                hh, ww = ins[0].shape[1:3]
                y = np.zeros((*ins[0].shape[:3], w.shape[3]))
                for i in range(kh):
                    for j in range(kw):
                        y += a[:, i : i + hh, j : j + ww, :] @ w[i, j]
                y += np.asarray(lay.bias, np.float64).reshape(-1)
            elif lay.kind == "relu":
                y = np.maximum(ins[0], 0)
            elif lay.kind == "add":
                y = sum(ins)
            elif lay.kind == "regression":
                y = ins[0]
            else:
                raise AssertionError(f"unexpected layer kind {lay.kind}")
            out[n] = y
            pending.remove(n)
    last = [n for n in by_name if by_name[n].kind == "regression"][0]
    return out[last]


def _torch_out(model, x_bhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x_bhwc.transpose(0, 3, 1, 2).astype(np.float32))).numpy()


# ---------------------------------------------------------------- real file


@pytest.fixture(scope="module")
def real_graph():
    if not REAL.is_file():
        pytest.skip(f"published MRH-Net file not found at {REAL}")
    pytest.importorskip("matio", reason='mat-io not installed (pip install "mrhscale[matlab]")')
    return read_layer_graph(REAL)


@needs_real
def test_real_file_decodes_to_the_published_graph(real_graph):
    g = real_graph
    assert len(g.layers) == 34
    assert g.meta["kinds_from"] == "class"  # each layer's own MATLAB class was recovered
    names = [lay.name for lay in g.layers]
    for n in [
        "InputLayer",
        "Conv1",
        "Conv2",
        "Conv3",
        "Conv3_1",
        "add11",
        "Conv_loop14",
        "add_loop4",
        "ReLU3_5",
        "Conv4",
        "Conv5",
        "FinalRegressionLayer",
    ]:
        assert n in names
    assert ("ReLU2", "add11/in2") in g.connections and len(g.connections) == 38
    assert count_parameters(g) == 482_369
    assert g.layer("Conv5").weights.shape == (3, 3, 64)  # MATLAB dropped the trailing 1
    m = check_mrhnet_graph(g)
    assert (m.depth, m.in_channels, m.width, m.patch_size) == (4, 67, 64, 3)
    assert m.renamed == {}
    assert m.roles["blocks.2.conv_b"] == "Conv_loop23"


@needs_real
def test_real_weights_land_at_the_right_positions(real_graph):
    model, _ = layer_graph_to_model(real_graph)
    assert sum(p.numel() for p in model.parameters()) == 482_369
    assert model.conv1.weight[0, 0, 0, 0].item() == pytest.approx(0.04033332, abs=1e-8)
    assert model.conv5.bias.item() == pytest.approx(0.13047557, abs=1e-8)
    w = real_graph.layer("Conv_loop12").weights
    # MATLAB W[h, w, cin, cout] -> torch weight[cout, cin, h, w]
    assert model.blocks[1].conv_a.weight[5, 7, 2, 1].item() == w[2, 1, 7, 5]
    w5 = real_graph.layer("Conv5").weights
    assert model.conv5.weight[0, 10, 0, 2].item() == w5[0, 2, 10]
    assert model.conv3_1.bias[3].item() == real_graph.layer("Conv3_1").bias.reshape(-1)[3]


@needs_real
def test_real_model_matches_independent_matlab_executor(real_graph):
    model, _ = layer_graph_to_model(real_graph)
    rng = np.random.default_rng(0)
    x = rng.random((16, 3, 3, 67))  # the original's inputs are scaled into [0, 1]
    ref = run_matlab_graph(real_graph, x)[..., 0]
    got = _torch_out(model, x)
    assert np.abs(ref).max() > 0.05  # not a trivially zero output
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # a transposed weight layout would not pass: check the test can tell
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.conv1.weight.copy_(bad.conv1.weight.transpose(2, 3).clone())
    assert not np.allclose(_torch_out(bad, x), ref, rtol=1e-3, atol=1e-4)


@needs_real
def test_cli_imports_real_file(tmp_path):
    pytest.importorskip("matio", reason='mat-io not installed (pip install "mrhscale[matlab]")')
    out = tmp_path / "af.pt"
    r = CliRunner().invoke(
        main,
        [
            "import-matlab",
            str(REAL),
            "--out",
            str(out),
            "--input-scale",
            "global-max=4095",
            "--target-max",
            "255",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "depth 4" in r.output and "482,369" in r.output
    model, meta = load_model(out)
    assert model.config == {"in_channels": 67, "depth": 4, "width": 64}
    assert meta["channels"] == DEFAULT_CHANNELS_67
    assert meta["target"] == "af" and meta["patch"] == {"half": 1, "size": 3, "axis": "y"}
    nrm = meta["norm"]
    assert nrm.mode == "global-max" and set(nrm.scale) == {4095.0} and nrm.target_scale == 255.0
    prov = meta["provenance"]
    assert prov["channels_from"].startswith("default") and prov["norm_from"].startswith("user")
    assert prov["target_from"] == "file name" and prov["parameters"] == 482_369
    assert len(prov["source"]["sha256"]) == 64 and prov["source"]["header"].startswith("MATLAB 5.0")


@needs_real
def test_missing_extra_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matio", None)  # import matio -> ImportError
    with pytest.raises(MRHError, match=r'pip install "mrhscale\[matlab\]"'):
        read_layer_graph(REAL)
    r = CliRunner().invoke(
        main, ["import-matlab", str(REAL), "-o", str(tmp_path / "m.pt"), "--input-scale", "identity"]
    )
    assert r.exit_code == 2 and "mrhscale[matlab]" in r.output and "Traceback" not in r.output


@needs_real
def test_truncated_real_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "net_Fluo.mat"
    bad.write_bytes(REAL.read_bytes()[:1_000_000])
    r = CliRunner().invoke(
        main, ["import-matlab", str(bad), "-o", str(tmp_path / "m.pt"), "--input-scale", "global-max=1"]
    )
    assert r.exit_code == 2, r.output
    assert r.output.count("\n") == 1 and "net_Fluo.mat" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------- synthetic round trips


def _random_model(in_channels=5, depth=2, width=8, seed=0):
    torch.manual_seed(seed)
    m = MRHNet(in_channels, depth, width)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def test_round_trip_through_layer_graph():
    model = _random_model()
    g = mrhnet_to_layer_graph(model)
    assert g.layer("Conv5").weights.shape == (3, 3, 8) and g.layer("Conv5").bias.shape == (1, 1)
    assert g.layer("Conv1").weights.shape == (3, 3, 5, 8) and g.layer("Conv1").bias.shape == (
        1,
        1,
        8,
    )
    assert count_parameters(g) == sum(p.numel() for p in model.parameters())
    back, m = layer_graph_to_model(g)
    assert (m.depth, m.in_channels, m.width) == (2, 5, 8)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = np.random.default_rng(1).random((4, 3, 3, 5))
    ref = run_matlab_graph(g, x)[..., 0]
    np.testing.assert_allclose(_torch_out(back, x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_round_trip_through_mat_file_and_cli(tmp_path):
    model = _random_model(in_channels=4, depth=3, width=6, seed=3)
    mat = save_layer_graph_mat(mrhnet_to_layer_graph(model), tmp_path / "net_3layer_NF.mat")
    g = read_layer_graph(mat)  # scipy only: plain-struct layout
    assert g.meta["reader"].startswith("scipy") and g.meta["kinds_from"] == "class"
    chans = tmp_path / "channels.txt"
    chans.write_text("# my protocol\nt2\nmt_off\nmt_on\nfa\n")
    out = tmp_path / "nf.pt"
    r = CliRunner().invoke(
        main,
        [
            "import-matlab",
            str(mat),
            "-o",
            str(out),
            "--channels",
            str(chans),
            "--input-scale",
            "global-max=300",
            "--patch-axis",
            "z",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert r.output == ""
    loaded, meta = load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert meta["channels"] == ["t2", "mt_off", "mt_on", "fa"] and meta["target"] == "nf"
    assert meta["patch"]["axis"] == "z" and meta["norm"].scale == [300.0] * 4
    assert meta["provenance"]["channels_from"].startswith("user (file")
    assert meta["provenance"]["target_from"] == "file name"
    # predictions the original's way: raw / global max, outputs x target max
    x_raw = np.random.default_rng(2).random((3, 3, 3, 4)) * 300
    ref = run_matlab_graph(g, x_raw / 300.0)[..., 0]
    xn = meta["norm"].apply_inputs(x_raw, channel_axis=-1)
    np.testing.assert_allclose(
        meta["norm"].invert_target(_torch_out(loaded, xn)), ref, rtol=1e-4, atol=1e-5
    )


def test_library_options_and_identity_norm(tmp_path):
    model = _random_model(in_channels=3, depth=0, width=4)
    mat = save_layer_graph_mat(mrhnet_to_layer_graph(model), tmp_path / "mynet.mat")
    s = import_matlab(
        mat,
        tmp_path / "m.pt",
        channels=["a", "b", "c"],
        input_scale="identity",
        target="mbp",
        target_max=180.0,
    )
    assert s["depth"] == 0 and s["parameters"] == sum(p.numel() for p in model.parameters())
    b = read_bundle(tmp_path / "m.pt")
    assert (
        b["norm"]["mode"] == "identity"
        and b["norm"]["target_scale"] == 180.0
        and b["target"] == "mbp"
    )
    s = import_matlab(mat, tmp_path / "m2.pt", channels="a,b,c", input_max=12.5, target="nf")
    assert (
        s.input_scale == "global-max" and read_bundle(tmp_path / "m2.pt")["norm"]["scale"] == [12.5] * 3
    )


def test_infer_target_from_file_name():
    assert infer_target("net_5layerV3Res_HRJG_allMRIs_Fluo.mat") == "af"
    assert infer_target("/x/net_10layer_NF.mat") == "nf"
    assert infer_target("mbp-net.mat") == "mbp"
    assert infer_target("net_allMRIs.mat") is None
    assert infer_target("net_NF_MBP.mat") is None  # ambiguous


# ---------------------------------------------------------------- graph validation errors


@pytest.fixture
def graph():
    return mrhnet_to_layer_graph(_random_model(in_channels=5, depth=2, width=8))


def _drop_layer(g: LayerGraph, name: str, bridge: bool = True) -> LayerGraph:
    ins = [s for s, d in g.connections if d.split("/")[0] == name]
    outs = [d for s, d in g.connections if s == name]
    g.layers = [lay for lay in g.layers if lay.name != name]
    g.connections = [(s, d) for s, d in g.connections if name not in (s, d.split("/")[0])]
    if bridge:
        g.connections += [(ins[0], d) for d in outs]
    return g


def test_missing_layer(graph):
    g = _drop_layer(graph, "ReLU_L21")  # Conv_loop11 -> Conv_loop21 directly
    with pytest.raises(MRHError, match=r"'Conv_loop21' is a convolution where MRH-Net has a ReLU"):
        check_mrhnet_graph(g)


def test_missing_layer_named_in_connections(graph):
    graph.layers = [lay for lay in graph.layers if lay.name != "Conv4"]
    with pytest.raises(MRHError, match=r"names layer 'Conv4', which the network does not have"):
        check_mrhnet_graph(graph)


def test_extra_layer(graph):
    graph.layers.append(MatLayer("Dropout1", "nnet.cnn.layer.DropoutLayer"))
    graph.connections.append(("ReLU4", "Dropout1"))
    with pytest.raises(MRHError, match=r"'ReLU4' feeds .*'Dropout1'"):
        check_mrhnet_graph(graph)
    graph.connections.pop()  # dangling extra layer, not connected at all
    with pytest.raises(MRHError, match=r"not part of the MRH-Net graph: 'Dropout1'"):
        check_mrhnet_graph(graph)


def test_wrong_edge(graph):
    # the first skip taken from ReLU1 instead of ReLU2
    graph.connections = [("ReLU1", d) if d == "add11/in2" else (s, d) for s, d in graph.connections]
    with pytest.raises(MRHError, match=r"'ReLU1' feeds .*'Conv2'.*'add11'"):
        check_mrhnet_graph(graph)


def test_extra_edge(graph):
    graph.connections.append(("Conv1", "add_loop2/in3"))
    with pytest.raises(MRHError, match=r"Conv1"):
        check_mrhnet_graph(graph)


def test_wrong_shape(graph):
    lay = graph.layer("Conv_loop12")
    lay.weights = lay.weights[..., :4]
    with pytest.raises(
        MRHError, match=r"'Conv_loop12' has weights 3 x 3 x 8 x 4; MRH-Net needs 3 x 3 x 8 x 8"
    ):
        check_mrhnet_graph(graph)


def test_wrong_bias_and_settings(graph):
    graph.layer("Conv2").bias = np.zeros((1, 1, 3), np.float32)
    with pytest.raises(MRHError, match=r"'Conv2' has bias 1 x 1 x 3"):
        check_mrhnet_graph(graph)


def test_wrong_stride(graph):
    graph.layer("Conv3").attrs["Stride"] = [2, 2]
    with pytest.raises(MRHError, match=r"'Conv3' has Stride \[2, 2\]"):
        check_mrhnet_graph(graph)


def test_wrong_kind(graph):
    graph.layer("ReLU3").kind = "nnet.cnn.layer.TanhLayer"
    with pytest.raises(
        MRHError,
        match=r"'ReLU3' is a layer of class nnet.cnn.layer.TanhLayer where MRH-Net has a ReLU",
    ):
        check_mrhnet_graph(graph)


def test_renamed_layers(graph):
    graph.layers[graph.layers.index(graph.layer("Conv4"))].name = "Conv4_NF"
    graph.connections = [
        (s.replace("Conv4", "Conv4_NF"), d.replace("Conv4", "Conv4_NF"))
        for s, d in graph.connections
    ]
    with pytest.raises(
        MRHError, match=r"'Conv4_NF' where the published graph has 'Conv4'.*--allow-renamed"
    ):
        check_mrhnet_graph(graph)
    m = check_mrhnet_graph(graph, strict_names=False)
    assert m.renamed == {"Conv4_NF": "Conv4"} and m.roles["conv4"] == "Conv4_NF"


def test_blocks_follow_edges_not_names(graph):
    # swap the names of the two residual blocks' first convolutions: roles follow the data flow
    a, b = graph.layer("Conv_loop11"), graph.layer("Conv_loop12")
    a.name, b.name = "Conv_loop12", "Conv_loop11"
    swap = {"Conv_loop11": "Conv_loop12", "Conv_loop12": "Conv_loop11"}
    graph.connections = [(swap.get(s, s), swap.get(d, d)) for s, d in graph.connections]
    model, m = layer_graph_to_model(graph, strict_names=False)
    assert m.roles["blocks.0.conv_a"] == "Conv_loop12"
    np.testing.assert_array_equal(
        model.blocks[0].conv_a.weight.detach().numpy(), a.weights.transpose(3, 2, 0, 1)
    )


# ---------------------------------------------------------------- bad files and options (CLI)


def _cli(args):
    r = CliRunner().invoke(main, ["import-matlab", *args])
    return r.exit_code, r.output


def _assert_one_line_error(code, out, *words):
    assert code == 2, out
    assert out.startswith("mrhscale: error:") and out.count("\n") == 1 and "Traceback" not in out
    for w in words:
        assert w in out, out


def test_not_a_mat_file(tmp_path):
    bad = tmp_path / "junk_Fluo.mat"
    bad.write_bytes(os.urandom(4096))
    _assert_one_line_error(
        *_cli([str(bad), "-o", str(tmp_path / "m.pt"), "--input-scale", "global-max=1"]), "junk_Fluo.mat"
    )
    assert not (tmp_path / "m.pt").exists()


def test_mat_without_network(tmp_path):
    import scipy.io

    p = tmp_path / "data_Fluo.mat"
    scipy.io.savemat(p, {"mri": np.zeros((3, 3)), "labels": np.ones(4)})
    _assert_one_line_error(
        *_cli([str(p), "-o", str(tmp_path / "m.pt"), "--input-scale", "identity"]),
        "holds no MATLAB network",
        "mri",
    )


def test_non_mrh_network_file(tmp_path):
    g = mrhnet_to_layer_graph(_random_model(in_channels=4, depth=1, width=4))
    g = _drop_layer(g, "add11", bridge=False)  # a plain chain: no first skip
    g.connections += [("Conv3_1", "ReLU_L11")]
    p = save_layer_graph_mat(g, tmp_path / "other_NF.mat")
    _assert_one_line_error(
        *_cli(
            [str(p), "-o", str(tmp_path / "m.pt"), "--input-scale", "identity", "--channels", "a,b,c,d"]
        ),
        "not the MRH-Net graph",
        "ReLU2",
    )
    assert not (tmp_path / "m.pt").exists()


def test_missing_file(tmp_path):
    _assert_one_line_error(
        *_cli([str(tmp_path / "nope_AF.mat"), "-o", "m.pt", "--input-scale", "identity"]), "file not found"
    )


@pytest.fixture
def small_mat(tmp_path):
    return str(
        save_layer_graph_mat(
            mrhnet_to_layer_graph(_random_model(in_channels=3, depth=1, width=4)),
            tmp_path / "net_AF.mat",
        )
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["--channels", "a,b"], ["2 names", "3 input channels"]),
        (["--channels", "a,a,b"], ["repeated", "a"]),
        (["--channels", "missing.txt"], ["1 names", "must exist"]),
        ([], ["3 input channels", "--channels"]),
    ],
)
def test_bad_channels(small_mat, tmp_path, args, words):
    _assert_one_line_error(
        *_cli([small_mat, "-o", str(tmp_path / "m.pt"), "--input-scale", "identity", *args]), *words
    )


@pytest.mark.parametrize(
    "args, words",
    [
        ([], ["--input-scale global-max=VALUE"]),
        (["--input-scale", "max=3"], ["--input-scale", "max=3"]),
        (["--input-scale", "global-max=abc"], ["--input-scale", "abc"]),
        (["--input-scale", "global-max=-2"], ["--input-scale", "positive"]),
        (["--input-scale", "identity", "--target-max", "0"], ["--target-max"]),
        (["--input-scale", "identity", "--target", "a b"], ["--target"]),
    ],
)
def test_bad_options(small_mat, tmp_path, args, words):
    _assert_one_line_error(
        *_cli([small_mat, "-o", str(tmp_path / "m.pt"), "--channels", "a,b,c", *args]), *words
    )


def test_target_required_when_not_in_name(tmp_path):
    p = save_layer_graph_mat(
        mrhnet_to_layer_graph(_random_model(in_channels=2, depth=0, width=4)),
        tmp_path / "mynet.mat",
    )
    _assert_one_line_error(
        *_cli([str(p), "-o", str(tmp_path / "m.pt"), "--input-scale", "identity", "--channels", "a,b"]),
        "--target",
    )


# ---------------------------------------------------------------- other commands accept the bundle


def _imported_bundle(tmp_path, channels, *, input_max=300.0, target_max=200.0, seed=5):
    model = _random_model(in_channels=len(channels), depth=1, width=8, seed=seed)
    with torch.no_grad():
        model.conv5.bias.fill_(0.3)  # outputs mostly positive after the head, so values differ
    graph = mrhnet_to_layer_graph(model)
    mat = save_layer_graph_mat(graph, tmp_path / "net_1layer_Fluo.mat")
    out = tmp_path / "imported.pt"
    import_matlab(mat, out, channels=list(channels), input_max=input_max, target_max=target_max)
    return str(out), graph


def test_predict_accepts_imported_bundle(tmp_path):
    pytest.importorskip("mrhscale.stages.predict")
    import xarray as xr
    from helpers import channel_names, make_cohort_store

    store = tmp_path / "c.zarr"
    ids = make_cohort_store(store, n_subjects=1, shape=(7, 4, 8), n_channels=5)
    mp, graph = _imported_bundle(tmp_path, channel_names(5))
    out = tmp_path / "p.zarr"
    r = CliRunner().invoke(
        main, ["predict", mp, str(store), "--out", str(out), "--workers", "1", "-q"]
    )
    assert r.exit_code == 0, r.output
    pred = xr.open_zarr(str(out), group=ids[0], consolidated=False)["af_virtual"].values
    ds = xr.open_zarr(str(store), group=ids[0], consolidated=False)
    mri, mask = ds["mri"].values.astype(np.float64), ds["mask"].values
    # the original's way: patch in the x-z plane (slice axis y), raw / global max,
    # network output x label max; zero padding outside the volume
    padded = np.pad(mri, ((1, 1), (0, 0), (1, 1), (0, 0)))
    vox = [v for v in [(1, 1, 1), (3, 2, 4), (5, 2, 6), (2, 1, 3)] if mask[v]]
    assert vox
    patches = np.stack([padded[x : x + 3, y, z : z + 3, :] for x, y, z in vox]) / 300.0
    want = run_matlab_graph(graph, patches)[:, 1, 1, 0] * 200.0
    np.testing.assert_allclose([pred[v] for v in vox], want, rtol=1e-4, atol=1e-3)


def test_finetune_accepts_imported_bundle(tmp_path, monkeypatch):

    from helpers import channel_names, make_patch_store

    patches = make_patch_store(tmp_path / "nf.zarr", n_train=128, n_val=0, target="nf", seed=3)
    mp, _ = _imported_bundle(tmp_path, channel_names(5))
    r = CliRunner().invoke(
        main,
        [
            "finetune",
            mp,
            patches,
            "--out",
            str(tmp_path / "ft"),
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--threads",
            "1",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    model, meta = load_model(tmp_path / "ft" / "model.pt")
    assert meta["target"] == "nf" and model.config == {"in_channels": 5, "depth": 1, "width": 8}
    # the backbone keeps the imported input scaling (divide by the global maximum)
    assert meta["norm"].mode == "global-max" and meta["norm"].scale == [300.0] * 5


@needs_real
def test_public_mat_io_api_fallback_infers_kinds_from_fields(real_graph, monkeypatch):
    """Without mat-io's subsystem internals (another version), kinds come from layer fields."""
    import mrhscale.io.matlab as M

    def broken(*a, **k):
        raise AttributeError("internal API changed")

    monkeypatch.setattr(M, "_matio_with_classes", broken)
    g = read_layer_graph(REAL)
    assert g.meta["kinds_from"] == "field signature" and "public" in g.meta["reader"]
    assert [lay.kind for lay in g.layers] == [lay.kind for lay in real_graph.layers]
    model, m = layer_graph_to_model(g)
    assert m.depth == 4 and sum(p.numel() for p in model.parameters()) == 482_369


def test_input_normalisation_layer_is_rejected(graph):
    graph.layer("InputLayer").attrs["Normalization"] = "zerocenter"
    with pytest.raises(MRHError, match=r"'InputLayer' normalises its input \('zerocenter'\)"):
        check_mrhnet_graph(graph)


def test_decoded_objects_as_normalisation_are_rejected():
    from mrhscale.io.matlab import _make_layer

    rec = np.zeros((1, 1), dtype=[("Mean", "O")])
    lay = _make_layer(
        {"Name": np.array(["in"]), "InputSize": np.array([[3.0, 3.0, 2.0]]), "Normalization": rec},
        None,
        "x.mat",
    )
    assert lay.kind == "input" and lay.attrs["Normalization"] not in (None, "", "none")


def test_cli_allow_renamed(tmp_path):
    g = mrhnet_to_layer_graph(_random_model(in_channels=2, depth=1, width=4))
    g.layer("Conv5").name = "Conv5_MBP"
    g.connections = [
        (s.replace("Conv5", "Conv5_MBP"), d.replace("Conv5", "Conv5_MBP")) for s, d in g.connections
    ]
    mat = save_layer_graph_mat(g, tmp_path / "trans_MBP.mat")
    args = [str(mat), "-o", str(tmp_path / "m.pt"), "--input-scale", "identity", "--channels", "a,b"]
    _assert_one_line_error(*_cli(args), "'Conv5_MBP' where the published graph has 'Conv5'")
    code, out = _cli([*args, "--allow-renamed"])
    assert code == 0 and "1 layers renamed" in out and "target mbp" in out, out
    _, meta = load_model(tmp_path / "m.pt")
    assert meta["provenance"]["renamed_layers"] == {"Conv5_MBP": "Conv5"}
