"""What the MATLAB importer's tests share (reader, conversion, command): the published file,
an independent executor of a decoded MATLAB graph, and random MRHNets.

The published network is looked up in ../shared/mrhnet/ beside the repo, or in
$MRHSCALE_MRHNET_DIR; tests that need it skip without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mrhscale.nn.model import MRHNet
from mrhscale.ops.layer_graph import LayerGraph

REAL_NAME = "net_5layerV3Res_HRJG_allMRIs_Fluo.mat"


def _mrhnet_dir() -> Path:
    env = os.environ.get("MRHSCALE_MRHNET_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "mrhnet"


REAL = _mrhnet_dir() / REAL_NAME
needs_real = pytest.mark.skipif(
    not REAL.is_file(),
    reason=f"published MRH-Net file not found at {REAL} (put ../shared/mrhnet/ beside the repo "
    "or set MRHSCALE_MRHNET_DIR)",
)


def read_real_graph() -> LayerGraph:
    """The published file, decoded (skips without the file or mat-io)."""
    from mrhscale.io.matlab import read_layer_graph

    if not REAL.is_file():
        pytest.skip(f"published MRH-Net file not found at {REAL}")
    pytest.importorskip("matio", reason='mat-io not installed (pip install "mrhscale[matlab]")')
    return read_layer_graph(REAL)


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


def torch_out(model, x_bhwc: np.ndarray) -> np.ndarray:
    """The one-stain network's map [B, H, W] (the MATLAB graph's one output channel)."""
    with torch.no_grad():
        return model(torch.from_numpy(x_bhwc.transpose(0, 3, 1, 2).astype(np.float32)))[:, 0].numpy()


def random_model(in_channels=5, depth=2, width=8, seed=0):
    torch.manual_seed(seed)
    m = MRHNet(in_channels, depth, width)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def drop_layer(g: LayerGraph, name: str, bridge: bool = True) -> LayerGraph:
    """``g`` without layer ``name``; ``bridge`` connects its input to what it fed."""
    ins = [s for s, d in g.connections if d.split("/")[0] == name]
    outs = [d for s, d in g.connections if s == name]
    g.layers = [lay for lay in g.layers if lay.name != name]
    g.connections = [(s, d) for s, d in g.connections if name not in (s, d.split("/")[0])]
    if bridge:
        g.connections += [(ins[0], d) for d in outs]
    return g
