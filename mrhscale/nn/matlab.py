"""Import the published MRH-Net MATLAB networks (DAGNetwork ``.mat`` files) as model bundles.

Two layers, so each can be checked on its own:

(a) ``read_layer_graph``: ``.mat`` -> :class:`LayerGraph`, a neutral description of the
    MATLAB layer graph (layers with name, kind, weights in MATLAB layout, plus the
    ``Connections`` edges). DAGNetwork objects are MATLAB class (MCOS) data that scipy
    shows only as an opaque blob, so they are decoded with the optional ``mat-io``
    package (``pip install "mrhscale[matlab]"``). A plain-struct layout (see
    docs/matlab.md, :func:`save_layer_graph_mat`) is read with scipy alone.
(b) ``layer_graph_to_model``: walk the graph along its edges, check that it is the MRH-Net
    graph (names, edges, kinds, shapes) and convert each convolution to the matching
    :class:`~mrhscale.nn.model.MRHNet` parameters.

:func:`mrhnet_to_layer_graph` is the inverse of (b), for round trips and exports.
The file holds no channel names and no input scaling: :func:`import_matlab` takes them
from the user and records where each came from in the bundle's provenance.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from mrhscale.errors import MRHError

# MATLAB layer classes MRH-Net is built from, by kind.
_CLASS_KINDS = {
    "ImageInputLayer": "input",
    "Convolution2DLayer": "conv",
    "ReLULayer": "relu",
    "AdditionLayer": "add",
    "RegressionOutputLayer": "regression",
}
_KIND_CLASS = {v: f"nnet.cnn.layer.{k}" for k, v in _CLASS_KINDS.items()}
_KIND_WORDS = {
    "input": "an image input layer",
    "conv": "a convolution",
    "relu": "a ReLU",
    "add": "an addition",
    "regression": "a regression output",
}

# Channel order of the original's 67 inputs: dwi2000 (4 b0 + 30 directions),
# dwi5000 (30 directions), then t2MTONOFF (T2, MT-off, MT-on); names as in the cohort store.
DEFAULT_CHANNELS_67 = (
    [f"dwi2000_{i}" for i in range(34)]
    + [f"dwi5000_{i}" for i in range(30)]
    + ["t2", "mt_off", "mt_on"]
)

# Stain names recognised in a network's file name (token, case-insensitive) -> target.
_TARGET_TOKENS = {
    "fluo": "af",
    "af": "af",
    "autofluorescence": "af",
    "nf": "nf",
    "neurofilament": "nf",
    "mbp": "mbp",
    "myelin": "mbp",
    "nissl": "nissl",
}


@dataclass
class MatLayer:
    """One layer of a MATLAB layer graph, weights kept in MATLAB layout.

    ``kind`` is input, conv, relu, add or regression, or the MATLAB class name of
    any other layer. ``weights`` is H x W x Cin x Cout (MATLAB drops a trailing
    Cout of 1), ``bias`` 1 x 1 x Cout. ``attrs`` holds the layer's other fields
    (InputSize, FilterSize, Stride, DilationFactor, PaddingMode, PaddingSize,
    NumInputs, Normalization) as plain Python values, and ``class`` when known.
    """

    name: str
    kind: str
    weights: np.ndarray | None = None
    bias: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)


@dataclass
class LayerGraph:
    """Layers plus ``Connections`` as (source, destination) pairs.

    A destination may name an input port (``"add11/in2"``), as MATLAB writes it.
    ``meta`` says how the graph was read (reader, variable, how kinds were known).
    """

    layers: list[MatLayer]
    connections: list[tuple[str, str]]
    meta: dict = field(default_factory=dict)

    def layer(self, name: str) -> MatLayer:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)


@dataclass
class GraphMatch:
    """What the MRH-Net check found: configuration and which layer plays which role."""

    in_channels: int
    depth: int
    width: int
    patch_size: int
    roles: dict[str, str]  # role (e.g. "conv1", "blocks.0.conv_a", "relu2") -> layer name
    renamed: dict[str, str]  # layer name in the file -> name in the published graph


# ---------------------------------------------------------------------------
# Names of the published graph
# ---------------------------------------------------------------------------


def expected_names(depth: int) -> dict[str, str]:
    """Role -> layer name in the published MRH-Net files (``net_5layerV3Res_*``).

    Residual block k (1-based) is ReLU_L1k, Conv_loop1k, ReLU_L2k, Conv_loop2k, add_loopk,
    as the original's training script names them.
    """
    names = {
        "input": "InputLayer",
        "conv1": "Conv1",
        "relu1": "ReLU1",
        "conv2": "Conv2",
        "relu2": "ReLU2",
        "conv3": "Conv3",
        "relu3": "ReLU3",
        "conv3_1": "Conv3_1",
        "add0": "add11",
    }
    for k in range(depth):
        b, n = f"blocks.{k}", k + 1
        names.update(
            {
                f"{b}.relu_a": f"ReLU_L1{n}",
                f"{b}.conv_a": f"Conv_loop1{n}",
                f"{b}.relu_b": f"ReLU_L2{n}",
                f"{b}.conv_b": f"Conv_loop2{n}",
                f"{b}.add": f"add_loop{n}",
            }
        )
    names.update(
        {
            "relu_head": "ReLU3_5",
            "conv4": "Conv4",
            "relu4": "ReLU4",
            "conv5": "Conv5",
            "regression": "FinalRegressionLayer",
        }
    )
    return names


def _conv_roles(depth: int) -> list[str]:
    roles = ["conv1", "conv2", "conv3", "conv3_1"]
    for k in range(depth):
        roles += [f"blocks.{k}.conv_a", f"blocks.{k}.conv_b"]
    return roles + ["conv4", "conv5"]


# ---------------------------------------------------------------------------
# (b) check the graph, convert to MRHNet
# ---------------------------------------------------------------------------


def _describe(lay: MatLayer) -> str:
    return _KIND_WORDS.get(lay.kind, f"a layer of class {lay.kind}")


class _Walk:
    """Follows the graph's edges from the input, assigning MRH-Net roles as it goes."""

    def __init__(self, graph: LayerGraph):
        self.layers: dict[str, MatLayer] = {}
        for lay in graph.layers:
            if lay.name in self.layers:
                raise MRHError(
                    f"two layers are named {lay.name!r}; a MATLAB layer graph has unique names"
                )
            self.layers[lay.name] = lay
        self.succ: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.pred: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.file_edges: set[tuple[str, str]] = set()
        for src, dst in graph.connections:
            s = src.partition("/")[0]
            d, _, port = dst.partition("/")
            for n in (s, d):
                if n not in self.layers:
                    raise MRHError(
                        f"connection {src} -> {dst} names layer {n!r}, "
                        "which the network does not have"
                    )
            self.succ[s].append((d, port))
            self.pred[d].append((s, port))
            self.file_edges.add((s, d))
        self.roles: dict[str, str] = {}
        self.seen: set[str] = set()
        self.edges: set[tuple[str, str]] = set()

    def _list(self, pairs) -> str:
        if not pairs:
            return "nothing"
        return ", ".join(f"{d!r} ({_describe(self.layers[d])})" for d, _ in pairs)

    def take(self, role: str, name: str, kind: str) -> str:
        lay = self.layers[name]
        if lay.kind != kind:
            raise MRHError(
                f"layer {name!r} is {_describe(lay)} where MRH-Net has {_KIND_WORDS[kind]} ({role})"
            )
        if name in self.seen:
            raise MRHError(
                f"layer {name!r} is reached twice: the graph has a loop or a connection "
                "MRH-Net does not have"
            )
        self.seen.add(name)
        self.roles[role] = name
        return name

    def next(self, name: str, role: str, kind: str) -> str:
        out = self.succ.get(name, [])
        if len(out) != 1:
            raise MRHError(
                f"layer {name!r} feeds {self._list(out)}; in MRH-Net it feeds only "
                f"{_KIND_WORDS[kind]} ({role})"
            )
        dst = out[0][0]
        self.take(role, dst, kind)
        self.edges.add((name, dst))
        return dst

    def fork(self, name: str, conv_role: str, add_role: str) -> tuple[str, str]:
        out = self.succ.get(name, [])
        kinds = sorted(self.layers[d].kind for d, _ in out)
        if kinds != ["add", "conv"]:
            raise MRHError(
                f"layer {name!r} feeds {self._list(out)}; in MRH-Net it feeds a convolution "
                f"({conv_role}) and the skip input of an addition ({add_role})"
            )
        conv = next(d for d, _ in out if self.layers[d].kind == "conv")
        add = next(d for d, _ in out if self.layers[d].kind == "add")
        self.take(conv_role, conv, "conv")
        self.edges.add((name, conv))
        return conv, add

    def join(self, conv: str, add: str, skip: str, add_role: str) -> None:
        out = self.succ.get(conv, [])
        if [d for d, _ in out] != [add]:
            raise MRHError(
                f"layer {conv!r} feeds {self._list(out)}; in MRH-Net it feeds only the addition "
                f"{add!r} ({add_role}) that also receives {skip!r}"
            )
        self.take(add_role, add, "add")
        inputs = self.pred.get(add, [])
        if sorted(s for s, _ in inputs) != sorted([conv, skip]):
            got = ", ".join(repr(s) for s, _ in inputs) or "nothing"
            raise MRHError(
                f"addition {add!r} receives {got}; in MRH-Net it adds {conv!r} and {skip!r}"
            )
        if len({p for _, p in inputs}) != 2:
            raise MRHError(f"addition {add!r} receives both inputs on the same port")
        n_in = self.layers[add].attrs.get("NumInputs")
        if n_in is not None and n_in != 2:
            raise MRHError(f"addition {add!r} has {n_in} inputs; MRH-Net's additions have 2")
        self.edges |= {(conv, add), (skip, add)}


def check_mrhnet_graph(graph: LayerGraph, *, strict_names: bool = True) -> GraphMatch:
    """Check that ``graph`` is an MRH-Net layer graph; raise :class:`MRHError` saying what differs.

    Roles are assigned by following the edges from the input layer (not by names), so
    the residual blocks map to ``blocks.{k}`` in the order the data flows through them.
    Then kinds, shapes and convolution settings are checked, and finally names against
    the published graph (an error when ``strict_names``, else reported in ``renamed``).
    """
    w = _Walk(graph)
    inputs = [lay.name for lay in graph.layers if lay.kind == "input"]
    if len(inputs) != 1:
        raise MRHError(
            f"the network has {len(inputs)} image input layers "
            f"({', '.join(inputs) or 'none'}); MRH-Net has one"
        )
    inp = w.take("input", inputs[0], "input")
    if w.pred.get(inp):
        raise MRHError(f"input layer {inp!r} receives a connection; MRH-Net's input has none")
    c1 = w.next(inp, "conv1", "conv")
    r1 = w.next(c1, "relu1", "relu")
    c2 = w.next(r1, "conv2", "conv")
    r2 = w.next(c2, "relu2", "relu")
    c3, a = w.fork(r2, "conv3", "add0")
    r3 = w.next(c3, "relu3", "relu")
    c31 = w.next(r3, "conv3_1", "conv")
    w.join(c31, a, r2, "add0")
    depth, cur = 0, a
    while True:
        ra = w.next(cur, "relu_head", "relu")
        out_kinds = sorted(w.layers[d].kind for d, _ in w.succ.get(ra, []))
        if out_kinds != ["add", "conv"]:
            break  # no residual block here: the head follows
        b = f"blocks.{depth}"
        w.roles[f"{b}.relu_a"] = w.roles.pop("relu_head")
        ca, ak = w.fork(ra, f"{b}.conv_a", f"{b}.add")
        rb = w.next(ca, f"{b}.relu_b", "relu")
        cb = w.next(rb, f"{b}.conv_b", "conv")
        w.join(cb, ak, ra, f"{b}.add")
        depth, cur = depth + 1, ak
    c4 = w.next(ra, "conv4", "conv")
    r4 = w.next(c4, "relu4", "relu")
    c5 = w.next(r4, "conv5", "conv")
    reg = w.next(c5, "regression", "regression")
    if w.succ.get(reg):
        raise MRHError(
            f"regression layer {reg!r} feeds {w._list(w.succ[reg])}; "
            "in MRH-Net it is the last layer"
        )

    extra = [n for n in w.layers if n not in w.seen]
    if extra:
        listed = ", ".join(f"{n!r} ({_describe(w.layers[n])})" for n in extra)
        raise MRHError(f"layers that are not part of the MRH-Net graph: {listed}")
    extra_edges = sorted(w.file_edges - w.edges)
    if extra_edges:
        raise MRHError(
            "connections MRH-Net does not have: " + ", ".join(f"{s} -> {d}" for s, d in extra_edges)
        )

    in_channels, patch = _check_input(w.layers[inp])
    width = _check_conv_shapes(w, depth, in_channels)
    renamed = {w.roles[r]: n for r, n in expected_names(depth).items() if w.roles[r] != n}
    if renamed and strict_names:
        diffs = ", ".join(
            f"{got!r} where the published graph has {want!r}"
            for got, want in list(renamed.items())[:6]
        )
        more = f" (and {len(renamed) - 6} more)" if len(renamed) > 6 else ""
        raise MRHError(
            f"the graph has MRH-Net's structure but other layer names: {diffs}{more}; "
            "use --allow-renamed (strict_names=False) to import it anyway"
        )
    return GraphMatch(in_channels, depth, width, patch, dict(w.roles), renamed)


def _check_input(lay: MatLayer) -> tuple[int, int]:
    size = lay.attrs.get("InputSize")
    if not isinstance(size, list) or len(size) != 3:
        raise MRHError(
            f"input layer {lay.name!r} has InputSize {size}; MRH-Net takes P x P x C patches"
        )
    p, q, c = (int(v) for v in size)
    if p != q or p < 1 or p % 2 == 0 or c < 1:
        raise MRHError(
            f"input layer {lay.name!r} takes {p} x {q} x {c}; "
            "MRH-Net takes square odd patches (3 x 3 x C)"
        )
    norm = lay.attrs.get("Normalization")
    if norm not in (None, "", "none"):
        raise MRHError(
            f"input layer {lay.name!r} normalises its input ({norm!r}); "
            "MRH-Net's input layer does not "
            "(mrhscale keeps normalisation in the bundle)"
        )
    return c, p


def _check_conv_shapes(w: _Walk, depth: int, in_channels: int) -> int:
    first = w.layers[w.roles["conv1"]]
    if first.weights is None or np.ndim(first.weights) != 4:
        raise MRHError(f"convolution {first.name!r} has no 4-D weights (H x W x Cin x Cout)")
    width = int(np.shape(first.weights)[3])
    for role in _conv_roles(depth):
        lay = w.layers[w.roles[role]]
        cin = in_channels if role == "conv1" else width
        cout = 1 if role == "conv5" else width
        _conv_weight(lay, cin, cout)  # raises on a bad shape
        _conv_bias(lay, cout)
        a = lay.attrs
        for key, want in (("FilterSize", [3, 3]), ("Stride", [1, 1]), ("DilationFactor", [1, 1])):
            got = a.get(key)
            if got is not None and [int(v) for v in got] != want:
                raise MRHError(f"convolution {lay.name!r} has {key} {got}; MRH-Net uses {want}")
        mode, pad = a.get("PaddingMode"), a.get("PaddingSize")
        if mode not in (None, "same") and (pad is None or [int(v) for v in pad] != [1, 1, 1, 1]):
            raise MRHError(
                f"convolution {lay.name!r} pads {mode!r} {pad}; "
                "MRH-Net uses 'same' (1 on each side)"
            )
    return width


def _conv_weight(lay: MatLayer, cin: int, cout: int) -> np.ndarray:
    """MATLAB H x W x Cin x Cout (trailing singleton Cout restored), checked."""
    if lay.weights is None:
        raise MRHError(f"convolution {lay.name!r} has no weights")
    wt = np.asarray(lay.weights)
    if wt.ndim == 3 and cout == 1:
        wt = wt[..., None]  # MATLAB drops the trailing 1 of Conv5's 3x3x64x1
    if wt.shape != (3, 3, cin, cout):
        raise MRHError(
            f"convolution {lay.name!r} has weights {' x '.join(map(str, np.shape(lay.weights)))}; "
            f"MRH-Net needs 3 x 3 x {cin} x {cout}"
        )
    if not np.issubdtype(wt.dtype, np.floating) or not np.all(np.isfinite(wt)):
        raise MRHError(f"convolution {lay.name!r}: weights are not finite floating-point numbers")
    return wt


def _conv_bias(lay: MatLayer, cout: int) -> np.ndarray:
    if lay.bias is None:
        raise MRHError(f"convolution {lay.name!r} has no bias")
    b = np.asarray(lay.bias)
    if b.size != cout or sum(s > 1 for s in b.shape) > 1:
        raise MRHError(
            f"convolution {lay.name!r} has bias {' x '.join(map(str, b.shape))}; "
            f"MRH-Net needs 1 x 1 x {cout}"
        )
    if not np.issubdtype(b.dtype, np.floating) or not np.all(np.isfinite(b)):
        raise MRHError(f"convolution {lay.name!r}: bias is not finite floating-point numbers")
    return b.reshape(cout)


def layer_graph_to_model(graph: LayerGraph, *, strict_names: bool = True):
    """Check ``graph`` and build the equivalent :class:`MRHNet` -> (model, GraphMatch).

    MATLAB weight ``W[h, w, cin, cout]`` becomes torch ``weight[cout, cin, h, w]``; both
    compute cross-correlation, so no kernel flip.
    """
    import torch

    from mrhscale.nn.model import MRHNet

    m = check_mrhnet_graph(graph, strict_names=strict_names)
    model = MRHNet(m.in_channels, m.depth, m.width)
    state = {}
    for role in _conv_roles(m.depth):
        lay = graph.layer(m.roles[role])
        cin = m.in_channels if role == "conv1" else m.width
        cout = 1 if role == "conv5" else m.width
        wt = _conv_weight(lay, cin, cout).astype(np.float32)
        state[f"{role}.weight"] = torch.from_numpy(np.ascontiguousarray(wt.transpose(3, 2, 0, 1)))
        state[f"{role}.bias"] = torch.from_numpy(_conv_bias(lay, cout).astype(np.float32))
    model.load_state_dict(state, strict=True)
    return model.eval(), m


def mrhnet_to_layer_graph(model, patch_size: int = 3) -> LayerGraph:
    """An MRHNet as the published MATLAB graph (names, edges, MATLAB weight layout).

    Inverse of :func:`layer_graph_to_model`; Conv5's weights are 3 x 3 x width and its
    bias 1 x 1, as MATLAB stores them. ``patch_size`` sets the input layer's InputSize.
    """
    names = expected_names(model.depth)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    p, c = int(patch_size), model.in_channels
    layers: list[MatLayer] = []
    conns: list[tuple[str, str]] = []

    def add(role, kind, **attrs):
        name = names[role]
        lay = MatLayer(name, kind, attrs={"class": _KIND_CLASS[kind], **attrs})
        if kind == "conv":
            wt = state[f"{role}.weight"].transpose(2, 3, 1, 0)  # -> H x W x Cin x Cout
            cout = wt.shape[3]
            lay.weights = wt[..., 0].copy() if cout == 1 else wt.copy()
            lay.bias = (
                state[f"{role}.bias"].reshape(1, 1, cout)
                if cout > 1
                else state[f"{role}.bias"].reshape(1, 1)
            )
            lay.attrs.update(
                FilterSize=[3, 3],
                NumChannels=wt.shape[2],
                NumFilters=cout,
                Stride=[1, 1],
                DilationFactor=[1, 1],
                PaddingMode="same",
                PaddingSize=[1, 1, 1, 1],
            )
        layers.append(lay)
        return name

    def chain(*nodes):
        conns.extend(zip(nodes, nodes[1:], strict=False))

    inp = add("input", "input", InputSize=[p, p, c], Normalization="none")
    seq = [inp]
    for role, kind in (("conv1", "conv"), ("relu1", "relu"), ("conv2", "conv"), ("relu2", "relu")):
        seq.append(add(role, kind))
    chain(*seq)
    skip = seq[-1]
    c3, r3, c31 = add("conv3", "conv"), add("relu3", "relu"), add("conv3_1", "conv")
    a = add("add0", "add", NumInputs=2)
    chain(skip, c3, r3, c31)
    conns += [(c31, f"{a}/in1"), (skip, f"{a}/in2")]
    for k in range(model.depth):
        b = f"blocks.{k}"
        ra, ca, rb, cb = (
            add(f"{b}.relu_a", "relu"),
            add(f"{b}.conv_a", "conv"),
            add(f"{b}.relu_b", "relu"),
            add(f"{b}.conv_b", "conv"),
        )
        ak = add(f"{b}.add", "add", NumInputs=2)
        chain(a, ra, ca, rb, cb)
        conns += [(cb, f"{ak}/in1"), (ra, f"{ak}/in2")]
        a = ak
    head = [
        add("relu_head", "relu"),
        add("conv4", "conv"),
        add("relu4", "relu"),
        add("conv5", "conv"),
        add("regression", "regression"),
    ]
    chain(a, *head)
    return LayerGraph(layers, conns, {"reader": "mrhnet_to_layer_graph", "kinds_from": "class"})


def count_parameters(graph: LayerGraph) -> int:
    """Number of learnable values in the graph's layers (weights and biases)."""
    return int(
        sum(np.size(x) for lay in graph.layers for x in (lay.weights, lay.bias) if x is not None)
    )


# ---------------------------------------------------------------------------
# (a) decode a .mat file
# ---------------------------------------------------------------------------


def _unwrap(v):
    """Strip the 1 x 1 object / cell wrappers scipy and mat-io put around MATLAB values."""
    while isinstance(v, np.ndarray) and v.dtype == object and v.size == 1:
        v = v.reshape(-1)[0]
    return v


def _fields(v) -> dict:
    """A MATLAB scalar struct (structured array, dict, mat_struct) as a dict."""
    v = _unwrap(v)
    if isinstance(v, dict):
        return v
    if isinstance(v, np.ndarray) and v.dtype.names:
        if v.size != 1:
            raise MRHError(f"expected a scalar struct, found a struct array of {v.size}")
        rec = v.reshape(-1)[0]
        return {n: rec[n] for n in v.dtype.names}
    if hasattr(v, "_fieldnames"):
        return {n: getattr(v, n) for n in v._fieldnames}
    raise MRHError(f"expected a MATLAB struct, found {type(v).__name__}")


def _text(v) -> str | None:
    v = _unwrap(v)
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.ndarray):
        if v.size == 0:
            return ""
        if v.dtype.kind == "U":
            return "".join(v.reshape(-1).tolist())
    return None


def _plain(v):
    """A MATLAB attribute as str, int/float or list of numbers (None if none of those)."""
    t = _text(v)
    if t is not None:
        return t
    v = _unwrap(v)
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
        flat = v.reshape(-1, order="F").tolist()
        if v.size == 1:
            x = flat[0]
            return int(x) if float(x).is_integer() else x
        return [int(x) if float(x).is_integer() else x for x in flat]
    if isinstance(v, int | float):
        return v
    return None


def _value(v, what: str):
    """A learnable parameter: a struct with ``Value`` (newer MATLAB) or the array itself."""
    v = _unwrap(v)
    if isinstance(v, np.ndarray) and v.dtype.names and "Value" in v.dtype.names:
        v = _unwrap(_fields(v)["Value"])
    elif isinstance(v, dict) and "Value" in v:
        v = _unwrap(v["Value"])
    if v is None or (isinstance(v, np.ndarray) and v.size == 0):
        return None
    if not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf":
        raise MRHError(f"{what} is not a numeric array ({type(v).__name__})")
    return v


_ATTR_KEYS = (
    "InputSize",
    "FilterSize",
    "NumChannels",
    "NumFilters",
    "Stride",
    "DilationFactor",
    "PaddingMode",
    "PaddingSize",
    "NumInputs",
    "Normalization",
)


def _signature_kind(f: dict) -> str:
    """Kind from a layer's saved fields, when its class name is not known."""
    keys = set(f) - {"Version"}
    if {"Weights", "Bias", "FilterSize"} <= keys:
        return "conv"
    if "InputSize" in keys:
        return "input"
    if keys == {"Name", "NumInputs"}:
        return "add"
    if "ResponseNames" in keys or "LossFunction" in keys:
        return "regression"
    if keys == {"Name"}:
        return "relu"
    return "unknown (fields " + ", ".join(sorted(keys)) + ")"


def _make_layer(f: dict, cls: str | None, where: str) -> MatLayer:
    name = _text(f.get("Name"))
    if not name:
        raise MRHError(f"{where}: a layer without a name")
    if cls:
        kind = _CLASS_KINDS.get(cls.rsplit(".", 1)[-1], cls)
    else:
        kind = _signature_kind(f)
    attrs = {k: _plain(f[k]) for k in _ATTR_KEYS if k in f}
    if "Normalization" in f and attrs["Normalization"] is None:
        # a saved normalisation object (e.g. zerocenter with its mean): not MRH-Net's input
        attrs["Normalization"] = f"<{type(_unwrap(f['Normalization'])).__name__} object>"
    if cls:
        attrs["class"] = cls
    return MatLayer(
        name=name,
        kind=kind,
        weights=_value(f["Weights"], f"layer {name!r} weights") if "Weights" in f else None,
        bias=_value(f["Bias"], f"layer {name!r} bias") if "Bias" in f else None,
        attrs=attrs,
    )


def _connections(c, where: str) -> list[tuple[str, str]]:
    """(source, destination) pairs from a MATLAB table (pandas), a struct or an N x 2 cell."""
    c = _unwrap(c)
    if hasattr(c, "columns") and hasattr(c, "__getitem__"):  # pandas.DataFrame from mat-io
        src, dst = list(c["Source"]), list(c["Destination"])
    elif isinstance(c, np.ndarray) and c.dtype.names or isinstance(c, dict):
        f = _fields(c)
        if "Source" not in f or "Destination" not in f:
            raise MRHError(f"{where}: Connections has no Source/Destination")
        src, dst = [
            np.asarray(_unwrap(f[k]), dtype=object).reshape(-1) for k in ("Source", "Destination")
        ]
    elif isinstance(c, np.ndarray) and c.ndim == 2 and c.shape[1] == 2:
        src, dst = c[:, 0], c[:, 1]
    else:
        raise MRHError(f"{where}: cannot read the network's Connections ({type(c).__name__})")
    pairs = [(_text(s), _text(d)) for s, d in zip(src, dst, strict=True)]
    if any(not s or not d for s, d in pairs):
        raise MRHError(f"{where}: Connections hold entries that are not layer names")
    return pairs


def _graph_from_net(fields: dict, classes, where: str, meta: dict) -> LayerGraph:
    if "Layers" not in fields or "Connections" not in fields:
        raise MRHError(
            f"{where}: the network has no Layers/Connections "
            "(a SeriesNetwork or other object is not MRH-Net)"
        )
    raw = _unwrap(fields["Layers"])
    if isinstance(raw, np.ndarray) and raw.dtype.names:  # struct array: one 1x1 struct per layer
        flat = raw.reshape(-1, order="F")
        items = [flat[i : i + 1] for i in range(flat.size)]
    elif isinstance(raw, np.ndarray):  # cell array or mat-io object array
        items = list(raw.reshape(-1, order="F"))
    else:
        items = [raw]
    layers = []
    for i, item in enumerate(items):
        obj = _unwrap(item)
        cls = classes(obj)
        props = getattr(obj, "properties", None)
        if props is not None:  # mat-io MatlabOpaque: saveobj struct under 'any'
            f = (
                _fields(props["any"])
                if isinstance(props, dict) and "any" in props
                else _fields(props)
            )
        else:
            f = _fields(obj)
            cls = cls or _text(f.get("Class"))
        try:
            layers.append(_make_layer(f, cls, where))
        except MRHError:
            raise
        except Exception as e:  # malformed layer record
            raise MRHError(
                f"{where}: layer {i + 1} cannot be read ({type(e).__name__}: {e})"
            ) from None
    meta["kinds_from"] = (
        "class" if all("class" in lay.attrs for lay in layers) else "field signature"
    )
    return LayerGraph(layers, _connections(fields["Connections"], where), meta)


def _read_scipy(path: str):
    import scipy.io

    return scipy.io.loadmat(path, mat_dtype=False)


def _find_plain_net(variables: dict):
    for name, v in variables.items():
        if name.startswith("__"):
            continue
        if (
            isinstance(v, np.ndarray)
            and v.dtype.names
            and {"Layers", "Connections"} <= set(v.dtype.names)
        ):
            return name, _fields(v)
    return None


def _mcos_names(variables: dict) -> list[str]:
    """Variables scipy could only show as MATLAB class objects (name, class)."""
    out = []
    for v in variables.values():
        if type(v).__name__ == "MatlabOpaque" and getattr(v, "dtype", None) is not None:
            try:
                rec = v.reshape(-1)[0]
                out.append((rec[0].decode(), rec[2].decode()))
            except Exception:
                out.append(("?", "?"))
    return out


def _matio_with_classes(path: str):
    """(variables, class of each object, reader) via mat-io's v5 reader; None if not v5."""
    from matio.utils.matheaders import MAT_FILE_VERSIONS, read_mat_header
    from matio.v5.matreader5 import MatFile5Reader, read_subsystem

    offset, ver, order = read_mat_header(path)
    if ver != MAT_FILE_VERSIONS.V5:
        return None
    with open(path, "rb") as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ss = read_subsystem(fh, offset, order, raw_data=False, add_table_attrs=False)
        variables = MatFile5Reader(fh, byte_order=order, subsystem=ss).get_variables(None)
    meta = np.asarray(ss.object_id_metadata).reshape(-1, 6)
    by_obj = {
        id(obj): ss.get_classname(int(meta[oid, 0])) for oid, obj in ss.mcos_object_cache.items()
    }
    return variables, (lambda o: by_obj.get(id(o))), "mat-io"


def _load_with_matio(path: str):
    """Variables via mat-io, plus each object's own MCOS class name where mat-io knows it.

    mat-io's public loader labels every element of a heterogeneous layer array with
    the array's base class (nnet.cnn.layer.Layer); the subsystem it builds still knows
    each object's class (Convolution2DLayer, ReLULayer...), so it is asked directly.
    If that internal route is unavailable (another mat-io version), the public loader
    is used and kinds come from the layers' fields.
    """
    from mrhscale._optional import get_matio

    matio = get_matio(f"{path}: the network is stored as MATLAB class (MCOS) data; reading it")
    try:
        found = _matio_with_classes(path)
        if found is not None:
            return found
    except Exception:
        pass  # fall back to the public API below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            variables = matio.load_from_mat(path)
    except Exception as e:
        raise MRHError(
            f"{path}: not a readable MAT-file (truncated or corrupted? {type(e).__name__}: {e})"
        ) from None
    return variables, (lambda o: None), "mat-io (public API)"


def read_layer_graph(path: str | os.PathLike) -> LayerGraph:
    """Decode the network in a ``.mat`` file into a :class:`LayerGraph` (no checks yet).

    Plain-struct files (docs/matlab.md) are read with scipy; DAGNetwork objects need
    the ``matlab`` extra (mat-io).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MRHError(f"{path}: file not found")
    scipy_error = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            variables = _read_scipy(path)
    except NotImplementedError:  # MATLAB v7.3 (HDF5): mat-io reads those
        variables = None
    except Exception as e:
        variables, scipy_error = None, e
    if variables is not None:
        plain = _find_plain_net(variables)
        if plain is not None:
            name, fields = plain
            return _graph_from_net(
                fields, lambda o: None, path, {"reader": "scipy (plain struct)", "variable": name}
            )
        objects = _mcos_names(variables)
        if not objects and "__function_workspace__" not in variables:
            names = [k for k in variables if not k.startswith("__")]
            raise MRHError(
                f"{path}: holds no MATLAB network (variables: {', '.join(names) or 'none'}); "
                "expected a DAGNetwork saved from MATLAB (e.g. the published MRH-Net 'net')"
            )
        others = [o for o in objects if o[1] != "DAGNetwork"]
        if objects and len(others) == len(objects):
            raise MRHError(
                f"{path}: holds {', '.join(f'{n} ({c})' for n, c in objects)}, no DAGNetwork; "
                "MRH-Net is saved as a DAGNetwork"
            )
    elif scipy_error is not None:
        # scipy could not even parse the file: try mat-io if present for its message, else report
        try:
            import matio  # noqa: F401
        except ImportError:
            raise MRHError(
                f"{path}: not a readable MAT-file (truncated or corrupted? "
                f"{type(scipy_error).__name__}: {scipy_error})"
            ) from None

    variables, classes, reader = _load_with_matio(path)
    found = [
        (k, v)
        for k, v in variables.items()
        if not k.startswith("__") and getattr(v, "classname", None) == "DAGNetwork"
    ]
    if not found:
        desc = ", ".join(
            f"{k} ({getattr(v, 'classname', type(v).__name__)})"
            for k, v in variables.items()
            if not k.startswith("__")
        )
        raise MRHError(
            f"{path}: holds no DAGNetwork (variables: {desc or 'none'}); MRH-Net is saved as one"
        )
    if len(found) > 1:
        raise MRHError(
            f"{path}: holds several DAGNetworks ({', '.join(k for k, _ in found)}); "
            "save one per file"
        )
    name, net = found[0]
    props = net.properties
    try:
        fields = (
            _fields(props["any"]) if isinstance(props, dict) and "any" in props else _fields(props)
        )
        return _graph_from_net(fields, classes, path, {"reader": reader, "variable": name})
    except MRHError:
        raise
    except Exception as e:
        raise MRHError(
            f"{path}: the DAGNetwork {name!r} cannot be decoded ({type(e).__name__}: {e})"
        ) from None


def save_layer_graph_mat(graph: LayerGraph, path: str | os.PathLike, variable: str = "net") -> str:
    """Write ``graph`` as a plain-struct ``.mat`` file, which :func:`read_layer_graph` reads.

    Layout: ``net.Layers`` a cell array of structs (Name, Class, Weights, Bias and the
    attributes), ``net.Connections`` a struct of two cell arrays (Source, Destination).
    MATLAB users can build the same struct from a DAGNetwork (docs/matlab.md).
    """
    import scipy.io

    cells = np.empty((1, len(graph.layers)), dtype=object)
    for i, lay in enumerate(graph.layers):
        s = {"Name": lay.name, "Class": lay.attrs.get("class", _KIND_CLASS.get(lay.kind, lay.kind))}
        for k in _ATTR_KEYS:
            if k in lay.attrs and lay.attrs[k] is not None:
                v = lay.attrs[k]
                s[k] = v if isinstance(v, str) else np.asarray(v, dtype=np.float64)
        if lay.weights is not None:
            s["Weights"] = np.asarray(lay.weights)
            s["Bias"] = np.asarray(lay.bias)
        cells[0, i] = s
    src = np.empty((len(graph.connections), 1), dtype=object)
    dst = np.empty((len(graph.connections), 1), dtype=object)
    for i, (s, d) in enumerate(graph.connections):
        src[i, 0], dst[i, 0] = s, d
    path = os.fspath(path)
    scipy.io.savemat(
        path,
        {variable: {"Layers": cells, "Connections": {"Source": src, "Destination": dst}}},
        do_compression=True,
    )
    return path


# ---------------------------------------------------------------------------
# bundle import
# ---------------------------------------------------------------------------


def parse_channels(channels, n_channels: int) -> tuple[list[str], str]:
    """Channel names from a list, a file (one per line) or a comma-separated string.

    Returns (names, where they came from). ``None`` gives the original's 67-channel order.
    """
    if channels is None:
        if n_channels == len(DEFAULT_CHANNELS_67):
            return list(
                DEFAULT_CHANNELS_67
            ), "default: original MRH-Net order (dwi2000 x34, dwi5000 x30, t2, mt_off, mt_on)"
        raise MRHError(
            f"the network takes {n_channels} input channels and the .mat file holds no "
            "channel names: give them with --channels FILE|NAMES (one per line, or "
            "comma-separated), in the training order"
        )
    if isinstance(channels, str | os.PathLike):
        text = os.fspath(channels)
        if os.path.isfile(text):
            with open(text, encoding="utf-8") as fh:
                names = [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
            source = f"user (file {text})"
        else:
            names = [n.strip() for n in text.split(",") if n.strip()]
            source = "user (list)"
    else:
        names, source = [str(n) for n in channels], "user (list)"
    if len(names) != n_channels:
        raise MRHError(
            f"--channels: {len(names)} names given, "
            f"but the network takes {n_channels} input channels"
            + ("" if len(names) > 1 or "," in str(channels) else " (a file of names must exist)")
        )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MRHError(f"--channels: repeated names {', '.join(dup)}")
    return names, source


def parse_norm(norm: str | None = None, input_max: float | None = None) -> tuple[str, float | None]:
    """('global-max', value) or ('identity', None) from ``--norm`` text or ``input_max``."""
    if norm is not None and input_max is not None:
        raise MRHError(
            "give the input scaling once: --norm global-max=VALUE or input_max, not both"
        )
    if input_max is not None:
        v = float(input_max)
    elif norm is None:
        raise MRHError(
            "the .mat file holds no input scaling: give --norm global-max=VALUE (the "
            "maximum of the original's training inputs, which it divided every input by), "
            "or --norm identity if your inputs are already scaled that way"
        )
    elif norm.strip() == "identity":
        return "identity", None
    else:
        m = re.fullmatch(r"\s*global-max\s*=\s*(\S+)\s*", norm)
        if not m:
            raise MRHError(f"--norm: expected global-max=VALUE or identity, got {norm!r}")
        try:
            v = float(m.group(1))
        except ValueError:
            raise MRHError(f"--norm: {m.group(1)!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise MRHError(f"--norm: the global maximum must be a positive number, got {v}")
    return "global-max", v


def infer_target(path: str) -> str | None:
    """Stain from the file name (``..._Fluo.mat`` -> af); None unless exactly one is named."""
    tokens = re.split(r"[^A-Za-z0-9]+|_", os.path.splitext(os.path.basename(path))[0])
    found = {_TARGET_TOKENS[t.lower()] for t in tokens if t.lower() in _TARGET_TOKENS}
    return found.pop() if len(found) == 1 else None


def _file_facts(path: str) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        head = fh.read(116)
        h.update(head)
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    text = head.decode("latin-1", errors="replace").rstrip("\x00 ").strip()
    return {
        "file": os.path.basename(path),
        "sha256": h.hexdigest(),
        "bytes": os.path.getsize(path),
        "header": text if text.startswith("MATLAB") else None,
    }


def _check_import_options(mat_path: str, out_path, target, target_max, patch_axis) -> tuple[str, str]:
    """The options that need no file; returns (target, where it came from)."""
    if not (isinstance(target_max, int | float) and math.isfinite(target_max) and target_max > 0):
        raise MRHError(f"--target-max: must be a positive number, got {target_max}")
    if patch_axis not in ("x", "y", "z"):
        raise MRHError(f"--patch-axis: must be x, y or z, got {patch_axis!r}")
    target_source = "user"
    if target is None:
        target, target_source = infer_target(mat_path), "file name"
        if target is None:
            raise MRHError(f"{mat_path}: cannot tell the stain from the file name; give --target (e.g. af, nf, mbp)")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", target):
        raise MRHError(f"--target: {target!r} is not a valid variable name")
    if os.path.isfile(out_path) and os.path.isfile(mat_path) and os.path.samefile(out_path, mat_path):
        raise MRHError(f"--out {out_path}: would overwrite the .mat file being imported")
    return target, target_source


def _import_norm(mode: str, value, in_channels: int, target_max: float):
    """The original's scaling as the bundle's normalisation: one global maximum, or none."""
    from mrhscale.ops.norm import Normalisation

    if mode == "global-max":
        nrm = Normalisation.global_max(in_channels, value, float(target_max))
    else:
        nrm = Normalisation("identity", [0.0] * in_channels, [1.0] * in_channels, 0.0, float(target_max))
    nrm.meta.update({"source": "user", "note": "MATLAB network: inputs / one global maximum, as the original"})
    return nrm


def _import_provenance(mat_path: str, graph, match, n_params: int) -> dict:
    from mrhscale import __version__

    return {
        "stage": "import-matlab", "mrhscale_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {**_file_facts(mat_path), "variable": graph.meta.get("variable"),
                   "reader": graph.meta.get("reader")},
        "matlab_layers": [lay.name for lay in graph.layers], "layer_roles": match.roles,
        "renamed_layers": match.renamed, "kinds_from": graph.meta.get("kinds_from"),
        "depth": match.depth, "parameters": n_params,
    }


def import_matlab(
    mat_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    channels=None,
    input_max: float | None = None,
    norm: str | None = None,
    target_max: float = 1.0,
    target: str | None = None,
    patch_axis: str = "y",
    strict_names: bool = True,
) -> dict:
    """Convert a MATLAB MRH-Net (.mat) into an mrhscale model bundle at ``out_path``.

    channels: names in the training order (list, file or comma-separated); default the
        original's 67-channel order when the network takes 67.
    input_max / norm: the original divided inputs by one global maximum; give it as
        ``input_max=VALUE`` or ``norm="global-max=VALUE"``, or ``norm="identity"`` for
        inputs already scaled. The bundle's normalisation reproduces it.
    target_max: the original divided labels by their global maximum; outputs times
        ``target_max`` are raw stain units (default 1: the network's own units).
    target: stain name; default inferred from the file name (Fluo/AF, NF, MBP, Nissl).
    Returns a summary (depth, channels, parameters, where each setting came from).
    """
    from mrhscale.io.bundle import save_bundle

    mat_path = os.fspath(mat_path)
    # cheap option checks first, so a bad option does not wait for the file
    mode, value = parse_norm(norm, input_max)
    target, target_source = _check_import_options(mat_path, out_path, target, target_max, patch_axis)
    graph = read_layer_graph(mat_path)
    try:
        model, match = layer_graph_to_model(graph, strict_names=strict_names)
    except MRHError as e:
        raise MRHError(f"{mat_path}: not the MRH-Net graph: {e}") from None
    names, channels_source = parse_channels(channels, match.in_channels)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != count_parameters(graph):
        raise MRHError(
            f"{mat_path}: {count_parameters(graph)} values in the file, {n_params} in the model"
        )
    nrm = _import_norm(mode, value, match.in_channels, target_max)
    provenance = {
        **_import_provenance(mat_path, graph, match, n_params),
        "channels_from": channels_source,
        "norm_from": f"user ({mode}{'' if value is None else f'={value:g}'})",
        "target_max": float(target_max), "target_from": target_source, "patch_axis": patch_axis,
    }
    patch = {"half": (match.patch_size - 1) // 2, "size": match.patch_size, "axis": patch_axis}
    out = save_bundle(
        out_path, model, channels=names, norm=nrm, target=target, patch=patch, provenance=provenance
    )
    return {
        "out": out,
        "source": mat_path,
        "reader": graph.meta.get("reader"),
        "layers": len(graph.layers),
        "depth": match.depth,
        "width": match.width,
        "in_channels": match.in_channels,
        "parameters": n_params,
        "target": target,
        "target_from": target_source,
        "channels_from": channels_source,
        "norm": nrm.mode,
        "input_max": value,
        "target_max": float(target_max),
        "renamed_layers": match.renamed,
    }
