"""stages/import_matlab.py and the import-matlab command: options, the bundle it commits,
and the commands that use that bundle (predict, finetune)."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from matlab_helpers import (
    REAL,
    drop_layer,
    needs_real,
    random_model,
    run_matlab_graph,
    torch_out,
)

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.io.bundle import load_model, read_bundle
from mrhscale.io.matlab import read_layer_graph, save_layer_graph_mat
from mrhscale.nn.matlab import DEFAULT_CHANNELS_67, mrhnet_to_layer_graph
from mrhscale.results import ImportMatlabResult
from mrhscale.stages.import_matlab import import_matlab, infer_target

# ---------------------------------------------------------------- real file


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
    assert model.config == {"in_channels": 67, "depth": 4, "width": 64, "stains": ["af"]}
    assert meta["channels"] == DEFAULT_CHANNELS_67
    assert meta["target"] == "af" and meta["patch"] == {"half": 1, "size": 3, "axis": "y"}
    nrm = meta["norm"]
    assert nrm.mode == "global-max" and set(nrm.scale) == {4095.0} and nrm.target_scale == [255.0]
    prov = meta["provenance"]
    assert prov["channels_from"].startswith("default") and prov["norm_from"].startswith("user")
    assert prov["target_from"] == "file name" and prov["parameters"] == 482_369
    assert len(prov["source"]["sha256"]) == 64 and prov["source"]["header"].startswith("MATLAB 5.0")


@needs_real
def test_missing_extra_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matio", None)  # import matio -> ImportError
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


def test_round_trip_through_mat_file_and_cli(tmp_path):
    model = random_model(in_channels=4, depth=3, width=6, seed=3)
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
        meta["norm"].invert_target(torch_out(loaded, xn)), ref, rtol=1e-4, atol=1e-5
    )


def test_library_options_and_identity_norm(tmp_path):
    model = random_model(in_channels=3, depth=0, width=4)
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
        and b["norm"]["target_scale"] == [180.0]
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
    g = mrhnet_to_layer_graph(random_model(in_channels=4, depth=1, width=4))
    g = drop_layer(g, "add11", bridge=False)  # a plain chain: no first skip
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
            mrhnet_to_layer_graph(random_model(in_channels=3, depth=1, width=4)),
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
        (["--input-scale", "subject-max=3"], ["--input-scale", "subject-max, global-max=VALUE or identity"]),
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
        mrhnet_to_layer_graph(random_model(in_channels=2, depth=0, width=4)),
        tmp_path / "mynet.mat",
    )
    _assert_one_line_error(
        *_cli([str(p), "-o", str(tmp_path / "m.pt"), "--input-scale", "identity", "--channels", "a,b"]),
        "--target",
    )


# ---------------------------------------------------------------- other commands accept the bundle


def _imported_bundle(tmp_path, channels, *, input_max=300.0, target_max=200.0, seed=5):
    model = random_model(in_channels=len(channels), depth=1, width=8, seed=seed)
    with torch.no_grad():
        model.heads[0].conv5.bias.fill_(0.3)  # outputs mostly positive after the head, so values differ
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
        main, ["predict", mp, str(store), "--out", str(out), "--scheduler", "synchronous", "-q"]
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
    assert meta["stains"] == ["nf"] and model.config == {"in_channels": 5, "depth": 1, "width": 8, "stains": ["nf"]}
    # the backbone keeps the imported input scaling (divide by the global maximum)
    assert meta["norm"].mode == "global-max" and meta["norm"].scale == [300.0] * 5
    card = read_bundle(tmp_path / "ft" / "model.pt")["card"]  # its card: finetuned, on the original's weights
    assert card["model"]["kind"] == "finetuned with mrhscale finetune" and card["citation"]["imported_matlab_network"]
    assert card["citation"]["note"].startswith("Finetuned from an imported MATLAB network")


def test_cli_allow_renamed(tmp_path):
    g = mrhnet_to_layer_graph(random_model(in_channels=2, depth=1, width=4))
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


def test_result_is_a_frozen_dataclass_with_dict_access(small_mat, tmp_path):
    s = import_matlab(small_mat, tmp_path / "m.pt", channels="a,b,c", input_scale="global-max=7")
    assert isinstance(s, ImportMatlabResult)
    assert (s.depth, s.width, s.in_channels, s.input_scale, s.input_max) == (1, 4, 3, "global-max", 7.0)
    assert s["target"] == "af" and s.target_from == "file name" and s.renamed_layers == {}
    assert s.to_dict()["out"] == str(tmp_path / "m.pt") and s.source == small_mat
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.depth = 2


def test_old_norm_option_names_the_new_one(small_mat, tmp_path):
    code, out = _cli([small_mat, "-o", str(tmp_path / "m.pt"), "--norm", "global-max=4095"])
    _assert_one_line_error(code, out, "--norm was renamed --input-scale", "global-max=4095")
    assert not (tmp_path / "m.pt").exists()


def test_input_scale_given_twice_is_an_error(small_mat, tmp_path):
    with pytest.raises(MRHError, match="give the input scaling once"):
        import_matlab(small_mat, tmp_path / "m.pt", input_scale="identity", input_max=3.0)


# ---------------------------------------------------------------- the default input scaling: MRH_testing's


def test_default_input_scale_is_each_brains_own_maximum(small_mat, tmp_path):
    code, out = _cli([small_mat, "-o", str(tmp_path / "m.pt"), "--channels", "a,b,c"])
    assert code == 0 and "input scale subject-max" in out, out
    _, meta = load_model(tmp_path / "m.pt")
    nrm = meta["norm"]
    assert nrm.mode == "subject-max" and nrm.per_subject and "MRH_testing" in nrm.meta["note"]
    assert meta["provenance"]["norm_from"] == "default: as the original's MRH_testing (subject-max)"
    s = import_matlab(small_mat, tmp_path / "m2.pt", channels="a,b,c", input_scale="subject-max")
    assert (s.input_scale, s.input_max) == ("subject-max", None)
    r = CliRunner().invoke(main, ["info", str(tmp_path / "m.pt")])
    assert r.exit_code == 0 and "subject-max: x' = x / max" in r.output and "data./max(data(:))" in r.output


def _synthetic_brain(shape=(12, 10, 14), seed=1):
    """A small 67-channel synth brain as a cohort subject Dataset (NaNs zeroed, as ingest does)."""
    import xarray as xr

    from mrhscale.synth.phantom import make_subject

    s = make_subject(shape, seed=seed, lesion=False, oedema=False)
    mri = np.nan_to_num(np.concatenate([s["mri"][g] for g in ("dwi2000", "dwi5000", "t2MTONOFF")], axis=-1))
    names = [n for g in ("dwi2000", "dwi5000", "t2MTONOFF") for n in s["channels"][g]]
    assert names == DEFAULT_CHANNELS_67
    ds = xr.Dataset({"mri": (("x", "y", "z", "contrast"), mri.astype(np.float32)),
                     "mask": (("x", "y", "z"), s["mask"])},
                    coords={"contrast": names}, attrs={"subject": "b1", "affine": s["affine"].tolist()})
    return ds, float(mri[s["mask"]].max())


@needs_real
def test_published_af_net_default_scaling_equals_global_max_of_the_brain(tmp_path):
    """The issue's check: no scaling flag runs, and equals --input-scale global-max=<the brain's max>."""
    pytest.importorskip("matio", reason='mat-io not installed (pip install "mrhscale[matlab]")')
    import mrhscale

    code, out = _cli([str(REAL), "-o", str(tmp_path / "default.pt"), "-q"])
    assert code == 0, out
    ds, top = _synthetic_brain()
    code, out = _cli([str(REAL), "-o", str(tmp_path / "fixed.pt"), "--input-scale", f"global-max={top!r}", "-q"])
    assert code == 0, out
    own = mrhscale.predict_volume(str(tmp_path / "default.pt"), ds)["af_virtual"].values
    fixed = mrhscale.predict_volume(str(tmp_path / "fixed.pt"), ds)["af_virtual"].values
    assert np.array_equal(own, fixed) and np.count_nonzero(own) > 100 and np.ptp(own[ds["mask"].values]) > 0
    scaled = ds.assign(mri=ds["mri"] * 3.0)  # MRH_testing's scaling: a brain x 3 gives the same map
    again = mrhscale.predict_volume(str(tmp_path / "default.pt"), scaled)["af_virtual"].values
    np.testing.assert_allclose(again, own, rtol=1e-5, atol=1e-6)
