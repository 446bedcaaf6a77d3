"""A MATLAB layer graph as an :class:`~mrhscale.nn.model.MRHNet`, and back.

:func:`check_mrhnet_graph` walks a :class:`~mrhscale.ops.layer_graph.LayerGraph` (as
``io/matlab.py`` reads it) along its edges, checks that it is the MRH-Net graph (names,
edges, kinds, shapes) and says which layer plays which role; :func:`layer_graph_to_model`
turns each convolution into the matching MRHNet parameters. :func:`mrhnet_to_layer_graph`
is the inverse, for round trips and exports. Reading files is io's job, writing a
bundle the ``import-matlab`` stage's (``stages/import_matlab.py``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from mrhscale.errors import MRHError
from mrhscale.nn.model import MRHNet
from mrhscale.ops.layer_graph import KIND_CLASS, LayerGraph, MatLayer

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

_STEM_NAMES = {"input": "InputLayer", "conv1": "Conv1", "relu1": "ReLU1", "conv2": "Conv2",
               "relu2": "ReLU2", "conv3": "Conv3", "relu3": "ReLU3", "conv3_1": "Conv3_1",
               "add0": "add11"}
_BLOCK_NAMES = {"relu_a": "ReLU_L1", "conv_a": "Conv_loop1", "relu_b": "ReLU_L2",
                "conv_b": "Conv_loop2", "add": "add_loop"}  # + the block's number, from 1
_HEAD_NAMES = {"relu_head": "ReLU3_5", "conv4": "Conv4", "relu4": "ReLU4", "conv5": "Conv5",
               "regression": "FinalRegressionLayer"}


def expected_names(depth: int) -> dict[str, str]:
    """Role -> layer name in the published MRH-Net files (``net_5layerV3Res_*``).

    Residual block k (1-based) is ReLU_L1k, Conv_loop1k, ReLU_L2k, Conv_loop2k, add_loopk,
    as the original's training script names them.
    """
    names = dict(_STEM_NAMES)
    for k in range(depth):
        names.update({f"blocks.{k}.{part}": f"{name}{k + 1}" for part, name in _BLOCK_NAMES.items()})
    return {**names, **_HEAD_NAMES}


def _state_key(role: str) -> str:
    """The MRHNet parameter name of a published layer role: the one head is ``heads.0``."""
    return f"heads.0.{role}" if role in ("conv4", "conv5") else role


def _conv_roles(depth: int) -> list[str]:
    roles = ["conv1", "conv2", "conv3", "conv3_1"]
    for k in range(depth):
        roles += [f"blocks.{k}.conv_a", f"blocks.{k}.conv_b"]
    return roles + ["conv4", "conv5"]


# ---------------------------------------------------------------------------
# check the graph
# ---------------------------------------------------------------------------


def _describe(lay: MatLayer) -> str:
    return _KIND_WORDS.get(lay.kind, f"a layer of class {lay.kind}")


class _Walk:
    """Follows the graph's edges from the input, assigning MRH-Net roles as it goes."""

    def __init__(self, graph: LayerGraph):
        self.layers = self._index_layers(graph)
        self.succ: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.pred: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.file_edges: set[tuple[str, str]] = set()
        for src, dst in graph.connections:
            self._add_file_edge(src, dst)
        self.roles: dict[str, str] = {}
        self.seen: set[str] = set()
        self.edges: set[tuple[str, str]] = set()

    @staticmethod
    def _index_layers(graph: LayerGraph) -> dict[str, MatLayer]:
        layers: dict[str, MatLayer] = {}
        for lay in graph.layers:
            if lay.name in layers:
                raise MRHError(f"two layers are named {lay.name!r}; a MATLAB layer graph has unique names")
            layers[lay.name] = lay
        return layers

    def _add_file_edge(self, src: str, dst: str) -> None:
        s = src.partition("/")[0]
        d, _, port = dst.partition("/")
        for n in (s, d):
            if n not in self.layers:
                raise MRHError(f"connection {src} -> {dst} names layer {n!r}, which the network does not have")
        self.succ[s].append((d, port))
        self.pred[d].append((s, port))
        self.file_edges.add((s, d))

    def _list(self, pairs) -> str:
        if not pairs:
            return "nothing"
        return ", ".join(f"{d!r} ({_describe(self.layers[d])})" for d, _ in pairs)

    def take(self, role: str, name: str, kind: str) -> str:
        lay = self.layers[name]
        if lay.kind != kind:
            raise MRHError(f"layer {name!r} is {_describe(lay)} where MRH-Net has {_KIND_WORDS[kind]} ({role})")
        if name in self.seen:
            raise MRHError(f"layer {name!r} is reached twice: the graph has a loop or a connection "
                           "MRH-Net does not have")
        self.seen.add(name)
        self.roles[role] = name
        return name

    def next(self, name: str, role: str, kind: str) -> str:
        out = self.succ.get(name, [])
        if len(out) != 1:
            raise MRHError(f"layer {name!r} feeds {self._list(out)}; in MRH-Net it feeds only "
                           f"{_KIND_WORDS[kind]} ({role})")
        dst = out[0][0]
        self.take(role, dst, kind)
        self.edges.add((name, dst))
        return dst

    def forks(self, name: str) -> bool:
        """Whether ``name`` feeds a convolution and an addition (a residual branch starts)."""
        return sorted(self.layers[d].kind for d, _ in self.succ.get(name, [])) == ["add", "conv"]

    def fork(self, name: str, conv_role: str, add_role: str) -> tuple[str, str]:
        out = self.succ.get(name, [])
        if not self.forks(name):
            raise MRHError(f"layer {name!r} feeds {self._list(out)}; in MRH-Net it feeds a convolution "
                           f"({conv_role}) and the skip input of an addition ({add_role})")
        conv = next(d for d, _ in out if self.layers[d].kind == "conv")
        add = next(d for d, _ in out if self.layers[d].kind == "add")
        self.take(conv_role, conv, "conv")
        self.edges.add((name, conv))
        return conv, add

    def join(self, conv: str, add: str, skip: str, add_role: str) -> None:
        out = self.succ.get(conv, [])
        if [d for d, _ in out] != [add]:
            raise MRHError(f"layer {conv!r} feeds {self._list(out)}; in MRH-Net it feeds only the addition "
                           f"{add!r} ({add_role}) that also receives {skip!r}")
        self.take(add_role, add, "add")
        self._check_addition(add, conv, skip)
        self.edges |= {(conv, add), (skip, add)}

    def _check_addition(self, add: str, conv: str, skip: str) -> None:
        inputs = self.pred.get(add, [])
        if sorted(s for s, _ in inputs) != sorted([conv, skip]):
            got = ", ".join(repr(s) for s, _ in inputs) or "nothing"
            raise MRHError(f"addition {add!r} receives {got}; in MRH-Net it adds {conv!r} and {skip!r}")
        if len({p for _, p in inputs}) != 2:
            raise MRHError(f"addition {add!r} receives both inputs on the same port")
        n_in = self.layers[add].attrs.get("NumInputs")
        if n_in is not None and n_in != 2:
            raise MRHError(f"addition {add!r} has {n_in} inputs; MRH-Net's additions have 2")


def _walk_input(w: _Walk) -> str:
    inputs = [name for name, lay in w.layers.items() if lay.kind == "input"]
    if len(inputs) != 1:
        raise MRHError(f"the network has {len(inputs)} image input layers "
                       f"({', '.join(inputs) or 'none'}); MRH-Net has one")
    inp = w.take("input", inputs[0], "input")
    if w.pred.get(inp):
        raise MRHError(f"input layer {inp!r} receives a connection; MRH-Net's input has none")
    return inp


def _walk_stem(w: _Walk, inp: str) -> str:
    """Conv1 .. ReLU2, then Conv3, ReLU3, Conv3_1 added to ReLU2; returns the addition."""
    c1 = w.next(inp, "conv1", "conv")
    r1 = w.next(c1, "relu1", "relu")
    c2 = w.next(r1, "conv2", "conv")
    r2 = w.next(c2, "relu2", "relu")
    c3, a = w.fork(r2, "conv3", "add0")
    r3 = w.next(c3, "relu3", "relu")
    c31 = w.next(r3, "conv3_1", "conv")
    w.join(c31, a, r2, "add0")
    return a


def _walk_blocks(w: _Walk, cur: str) -> tuple[int, str]:
    """Residual blocks while a ReLU forks; returns (depth, the ReLU that starts the head)."""
    depth = 0
    while True:
        ra = w.next(cur, "relu_head", "relu")
        if not w.forks(ra):
            return depth, ra  # no residual block here: the head follows
        b = f"blocks.{depth}"
        w.roles[f"{b}.relu_a"] = w.roles.pop("relu_head")
        ca, ak = w.fork(ra, f"{b}.conv_a", f"{b}.add")
        rb = w.next(ca, f"{b}.relu_b", "relu")
        cb = w.next(rb, f"{b}.conv_b", "conv")
        w.join(cb, ak, ra, f"{b}.add")
        depth, cur = depth + 1, ak


def _walk_head(w: _Walk, relu_head: str) -> None:
    c4 = w.next(relu_head, "conv4", "conv")
    r4 = w.next(c4, "relu4", "relu")
    c5 = w.next(r4, "conv5", "conv")
    reg = w.next(c5, "regression", "regression")
    if w.succ.get(reg):
        raise MRHError(f"regression layer {reg!r} feeds {w._list(w.succ[reg])}; "
                       "in MRH-Net it is the last layer")


def _check_nothing_else(w: _Walk) -> None:
    extra = [n for n in w.layers if n not in w.seen]
    if extra:
        listed = ", ".join(f"{n!r} ({_describe(w.layers[n])})" for n in extra)
        raise MRHError(f"layers that are not part of the MRH-Net graph: {listed}")
    extra_edges = sorted(w.file_edges - w.edges)
    if extra_edges:
        listed = ", ".join(f"{s} -> {d}" for s, d in extra_edges)
        raise MRHError(f"connections MRH-Net does not have: {listed}")


def _renamed(roles: dict[str, str], depth: int, strict_names: bool) -> dict[str, str]:
    """Layers named otherwise than in the published graph; an error when ``strict_names``."""
    renamed = {roles[r]: n for r, n in expected_names(depth).items() if roles[r] != n}
    if renamed and strict_names:
        shown = list(renamed.items())[:6]
        diffs = ", ".join(f"{got!r} where the published graph has {want!r}" for got, want in shown)
        more = f" (and {len(renamed) - 6} more)" if len(renamed) > 6 else ""
        raise MRHError(f"the graph has MRH-Net's structure but other layer names: {diffs}{more}; "
                       "use --allow-renamed (strict_names=False) to import it anyway")
    return renamed


def check_mrhnet_graph(graph: LayerGraph, *, strict_names: bool = True) -> GraphMatch:
    """Check that ``graph`` is an MRH-Net layer graph; raise :class:`MRHError` saying what differs.

    Roles are assigned by following the edges from the input layer (not by names), so
    the residual blocks map to ``blocks.{k}`` in the order the data flows through them.
    Then kinds, shapes and convolution settings are checked, and finally names against
    the published graph (an error when ``strict_names``, else reported in ``renamed``).
    """
    w = _Walk(graph)
    inp = _walk_input(w)
    depth, relu_head = _walk_blocks(w, _walk_stem(w, inp))
    _walk_head(w, relu_head)
    _check_nothing_else(w)
    in_channels, patch = _check_input(w.layers[inp])
    width = _check_conv_shapes(w, depth, in_channels)
    renamed = _renamed(w.roles, depth, strict_names)
    return GraphMatch(in_channels, depth, width, patch, dict(w.roles), renamed)


def _check_input(lay: MatLayer) -> tuple[int, int]:
    """(channels, patch size) of the input layer, which must take square odd patches unnormalised."""
    size = lay.attrs.get("InputSize")
    if not isinstance(size, list) or len(size) != 3:
        raise MRHError(f"input layer {lay.name!r} has InputSize {size}; MRH-Net takes P x P x C patches")
    p, q, c = (int(v) for v in size)
    if p != q or p < 1 or p % 2 == 0 or c < 1:
        raise MRHError(f"input layer {lay.name!r} takes {p} x {q} x {c}; "
                       "MRH-Net takes square odd patches (3 x 3 x C)")
    norm = lay.attrs.get("Normalization")
    if norm not in (None, "", "none"):
        raise MRHError(f"input layer {lay.name!r} normalises its input ({norm!r}); "
                       "MRH-Net's input layer does not (mrhscale keeps normalisation in the bundle)")
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
        _check_conv_settings(lay)
    return width


def _check_conv_settings(lay: MatLayer) -> None:
    a = lay.attrs
    for key, want in (("FilterSize", [3, 3]), ("Stride", [1, 1]), ("DilationFactor", [1, 1])):
        got = a.get(key)
        if got is not None and [int(v) for v in got] != want:
            raise MRHError(f"convolution {lay.name!r} has {key} {got}; MRH-Net uses {want}")
    mode, pad = a.get("PaddingMode"), a.get("PaddingSize")
    if mode not in (None, "same") and (pad is None or [int(v) for v in pad] != [1, 1, 1, 1]):
        raise MRHError(f"convolution {lay.name!r} pads {mode!r} {pad}; MRH-Net uses 'same' (1 on each side)")


def _conv_weight(lay: MatLayer, cin: int, cout: int) -> np.ndarray:
    """MATLAB H x W x Cin x Cout (trailing singleton Cout restored), checked."""
    if lay.weights is None:
        raise MRHError(f"convolution {lay.name!r} has no weights")
    wt = np.asarray(lay.weights)
    if wt.ndim == 3 and cout == 1:
        wt = wt[..., None]  # MATLAB drops the trailing 1 of Conv5's 3x3x64x1
    if wt.shape != (3, 3, cin, cout):
        raise MRHError(f"convolution {lay.name!r} has weights {' x '.join(map(str, np.shape(lay.weights)))}; "
                       f"MRH-Net needs 3 x 3 x {cin} x {cout}")
    if not np.issubdtype(wt.dtype, np.floating) or not np.all(np.isfinite(wt)):
        raise MRHError(f"convolution {lay.name!r}: weights are not finite floating-point numbers")
    return wt


def _conv_bias(lay: MatLayer, cout: int) -> np.ndarray:
    if lay.bias is None:
        raise MRHError(f"convolution {lay.name!r} has no bias")
    b = np.asarray(lay.bias)
    if b.size != cout or sum(s > 1 for s in b.shape) > 1:
        raise MRHError(f"convolution {lay.name!r} has bias {' x '.join(map(str, b.shape))}; "
                       f"MRH-Net needs 1 x 1 x {cout}")
    if not np.issubdtype(b.dtype, np.floating) or not np.all(np.isfinite(b)):
        raise MRHError(f"convolution {lay.name!r}: bias is not finite floating-point numbers")
    return b.reshape(cout)


# ---------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------


def layer_graph_to_model(graph: LayerGraph, *, strict_names: bool = True, stain: str = "stain"):
    """Check ``graph`` and build the equivalent :class:`MRHNet` of ``stain`` -> (model, GraphMatch).

    MATLAB weight ``W[h, w, cin, cout]`` becomes torch ``weight[cout, cin, h, w]``; both
    compute cross-correlation, so no kernel flip.
    """
    m = check_mrhnet_graph(graph, strict_names=strict_names)
    model = MRHNet(m.in_channels, m.depth, m.width, stains=[stain])
    state = {}
    for role in _conv_roles(m.depth):
        lay = graph.layer(m.roles[role])
        cin = m.in_channels if role == "conv1" else m.width
        cout = 1 if role == "conv5" else m.width
        wt = _conv_weight(lay, cin, cout).astype(np.float32)
        state[f"{_state_key(role)}.weight"] = torch.from_numpy(np.ascontiguousarray(wt.transpose(3, 2, 0, 1)))
        state[f"{_state_key(role)}.bias"] = torch.from_numpy(_conv_bias(lay, cout).astype(np.float32))
    model.load_state_dict(state, strict=True)
    return model.eval(), m


def _set_matlab_conv(lay: MatLayer, weight: np.ndarray, bias: np.ndarray) -> None:
    """A torch convolution's parameters on ``lay``, in MATLAB layout and as MATLAB stores them."""
    wt = weight.transpose(2, 3, 1, 0)  # -> H x W x Cin x Cout
    cout = wt.shape[3]
    lay.weights = wt[..., 0].copy() if cout == 1 else wt.copy()  # MATLAB drops a trailing 1
    lay.bias = bias.reshape(1, 1, cout) if cout > 1 else bias.reshape(1, 1)
    lay.attrs.update(FilterSize=[3, 3], NumChannels=wt.shape[2], NumFilters=cout, Stride=[1, 1],
                     DilationFactor=[1, 1], PaddingMode="same", PaddingSize=[1, 1, 1, 1])


class _GraphBuilder:
    """Layers and edges of the published graph, filled from an MRHNet's parameters."""

    def __init__(self, model):
        self.names = expected_names(model.depth)
        self.state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        self.layers: list[MatLayer] = []
        self.connections: list[tuple[str, str]] = []

    def add(self, role: str, kind: str, **attrs) -> str:
        lay = MatLayer(self.names[role], kind, attrs={"class": KIND_CLASS[kind], **attrs})
        if kind == "conv":
            _set_matlab_conv(lay, self.state[f"{_state_key(role)}.weight"], self.state[f"{_state_key(role)}.bias"])
        self.layers.append(lay)
        return lay.name

    def chain(self, *nodes: str) -> None:
        self.connections.extend(zip(nodes, nodes[1:], strict=False))

    def residual(self, branch: str, skip: str, add: str) -> None:
        """An addition's inputs as MATLAB numbers its ports: the branch in1, the skip in2."""
        self.connections += [(branch, f"{add}/in1"), (skip, f"{add}/in2")]


def mrhnet_to_layer_graph(model, patch_size: int = 3) -> LayerGraph:
    """An MRHNet as the published MATLAB graph (names, edges, MATLAB weight layout).

    Inverse of :func:`layer_graph_to_model`; Conv5's weights are 3 x 3 x width and its
    bias 1 x 1, as MATLAB stores them. ``patch_size`` sets the input layer's InputSize.
    """
    if model.n_stains != 1:
        raise MRHError(f"the published MATLAB graph has one Conv4/Conv5 head; this network has "
                       f"{model.n_stains} ({', '.join(model.stains)})")
    g, p = _GraphBuilder(model), int(patch_size)
    stem = [g.add("input", "input", InputSize=[p, p, model.in_channels], Normalization="none")]
    stem += [g.add("conv1", "conv"), g.add("relu1", "relu")]
    stem += [g.add("conv2", "conv"), g.add("relu2", "relu")]
    g.chain(*stem)
    branch = [g.add("conv3", "conv"), g.add("relu3", "relu"), g.add("conv3_1", "conv")]
    a = g.add("add0", "add", NumInputs=2)
    g.chain(stem[-1], *branch)
    g.residual(branch[-1], stem[-1], a)
    for k in range(model.depth):
        b = f"blocks.{k}"
        ra, ca = g.add(f"{b}.relu_a", "relu"), g.add(f"{b}.conv_a", "conv")
        rb, cb = g.add(f"{b}.relu_b", "relu"), g.add(f"{b}.conv_b", "conv")
        ak = g.add(f"{b}.add", "add", NumInputs=2)
        g.chain(a, ra, ca, rb, cb)
        g.residual(cb, ra, ak)
        a = ak
    head = [g.add("relu_head", "relu"), g.add("conv4", "conv"), g.add("relu4", "relu")]
    head += [g.add("conv5", "conv"), g.add("regression", "regression")]
    g.chain(a, *head)
    meta = {"reader": "mrhnet_to_layer_graph", "kinds_from": "class"}
    return LayerGraph(g.layers, g.connections, meta)
