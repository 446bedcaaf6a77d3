"""io/matlab.py: a .mat network decoded into a LayerGraph (the published file when present,
the plain-struct layout always), and the reader's errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.io
from matlab_helpers import REAL, needs_real, random_model, read_real_graph

from mrhscale.errors import MRHError
from mrhscale.io.matlab import _make_layer, mat_file_facts, read_layer_graph, save_layer_graph_mat
from mrhscale.nn.matlab import layer_graph_to_model, mrhnet_to_layer_graph
from mrhscale.ops.layer_graph import count_parameters


@pytest.fixture(scope="module")
def real_graph():
    return read_real_graph()


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


@needs_real
def test_read_without_mat_io_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "matio", None)  # import matio -> ImportError
    with pytest.raises(MRHError, match=r'pip install "mrhscale\[matlab\]"'):
        read_layer_graph(REAL)


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


@needs_real
def test_file_facts_of_the_real_file():
    facts = mat_file_facts(str(REAL))
    assert facts["file"] == REAL.name and facts["bytes"] == REAL.stat().st_size
    assert len(facts["sha256"]) == 64 and facts["header"].startswith("MATLAB 5.0")


def test_plain_struct_round_trip(tmp_path):
    g = mrhnet_to_layer_graph(random_model(in_channels=3, depth=1, width=4))
    back = read_layer_graph(save_layer_graph_mat(g, tmp_path / "net.mat"))  # scipy only
    assert back.meta == {"reader": "scipy (plain struct)", "variable": "net", "kinds_from": "class"}
    assert back.connections == g.connections
    assert [(lay.name, lay.kind) for lay in back.layers] == [(lay.name, lay.kind) for lay in g.layers]
    for a, b in zip(g.layers, back.layers, strict=True):
        for w in ("weights", "bias"):
            np.testing.assert_array_equal(getattr(a, w), getattr(b, w))
        assert b.attrs == a.attrs, a.name
    assert mat_file_facts(str(tmp_path / "net.mat"))["header"].startswith("MATLAB 5.0")


def test_decoded_objects_as_normalisation_are_rejected():
    rec = np.zeros((1, 1), dtype=[("Mean", "O")])
    lay = _make_layer(
        {"Name": np.array(["in"]), "InputSize": np.array([[3.0, 3.0, 2.0]]), "Normalization": rec},
        None,
        "x.mat",
    )
    assert lay.kind == "input" and lay.attrs["Normalization"] not in (None, "", "none")


def test_read_missing_file(tmp_path):
    with pytest.raises(MRHError, match="nope.mat: file not found"):
        read_layer_graph(tmp_path / "nope.mat")


def test_read_not_a_mat_file(tmp_path):
    bad = tmp_path / "junk.mat"
    bad.write_bytes(b"not a MAT-file\n" * 300)
    with pytest.raises(MRHError, match=r"junk.mat: not a readable MAT-file"):
        read_layer_graph(bad)


def test_read_mat_without_network(tmp_path):
    p = tmp_path / "data.mat"
    scipy.io.savemat(p, {"mri": np.zeros((3, 3)), "labels": np.ones(4)})
    with pytest.raises(MRHError, match=r"holds no MATLAB network \(variables: mri, labels\)"):
        read_layer_graph(p)
