"""nn/matlab.py: a MATLAB layer graph checked as MRH-Net and converted to MRHNet, and back.

The published network (../shared/mrhnet/ beside the repo, or $MRHSCALE_MRHNET_DIR) is
checked against an independent numpy executor of the decoded MATLAB layer graph; the
synthetic round trips (random MRHNet -> MATLAB layout -> MRHNet) and the graph checks
always run.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from matlab_helpers import (
    drop_layer,
    needs_real,
    random_model,
    read_real_graph,
    run_matlab_graph,
    torch_out,
)

from mrhscale.errors import MRHError
from mrhscale.nn.matlab import check_mrhnet_graph, layer_graph_to_model, mrhnet_to_layer_graph
from mrhscale.ops.layer_graph import MatLayer, count_parameters

# ---------------------------------------------------------------- real file


@pytest.fixture(scope="module")
def real_graph():
    return read_real_graph()


@needs_real
def test_real_graph_is_mrhnet(real_graph):
    m = check_mrhnet_graph(real_graph)
    assert (m.depth, m.in_channels, m.width, m.patch_size) == (4, 67, 64, 3)
    assert m.renamed == {}
    assert m.roles["blocks.2.conv_b"] == "Conv_loop23"


@needs_real
def test_real_weights_land_at_the_right_positions(real_graph):
    model, _ = layer_graph_to_model(real_graph)
    assert sum(p.numel() for p in model.parameters()) == 482_369
    assert model.conv1.weight[0, 0, 0, 0].item() == pytest.approx(0.04033332, abs=1e-8)
    assert model.heads[0].conv5.bias.item() == pytest.approx(0.13047557, abs=1e-8)
    w = real_graph.layer("Conv_loop12").weights
    # MATLAB W[h, w, cin, cout] -> torch weight[cout, cin, h, w]
    assert model.blocks[1].conv_a.weight[5, 7, 2, 1].item() == w[2, 1, 7, 5]
    w5 = real_graph.layer("Conv5").weights
    assert model.heads[0].conv5.weight[0, 10, 0, 2].item() == w5[0, 2, 10]
    assert model.conv3_1.bias[3].item() == real_graph.layer("Conv3_1").bias.reshape(-1)[3]


@needs_real
def test_real_model_matches_independent_matlab_executor(real_graph):
    model, _ = layer_graph_to_model(real_graph)
    rng = np.random.default_rng(0)
    x = rng.random((16, 3, 3, 67))  # the original's inputs are scaled into [0, 1]
    ref = run_matlab_graph(real_graph, x)[..., 0]
    got = torch_out(model, x)
    assert np.abs(ref).max() > 0.05  # not a trivially zero output
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # a transposed weight layout would not pass: check the test can tell
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.conv1.weight.copy_(bad.conv1.weight.transpose(2, 3).clone())
    assert not np.allclose(torch_out(bad, x), ref, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- synthetic round trips


def test_round_trip_through_layer_graph():
    model = random_model()
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
    np.testing.assert_allclose(torch_out(back, x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


# ---------------------------------------------------------------- graph validation errors


@pytest.fixture
def graph():
    return mrhnet_to_layer_graph(random_model(in_channels=5, depth=2, width=8))


def test_missing_layer(graph):
    g = drop_layer(graph, "ReLU_L21")  # Conv_loop11 -> Conv_loop21 directly
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


def test_input_normalisation_layer_is_rejected(graph):
    graph.layer("InputLayer").attrs["Normalization"] = "zerocenter"
    with pytest.raises(MRHError, match=r"'InputLayer' normalises its input \('zerocenter'\)"):
        check_mrhnet_graph(graph)
