"""Read a MATLAB network ``.mat`` file into a :class:`~mrhscale.ops.layer_graph.LayerGraph`.

Decoding only: layers (name, kind, weights in MATLAB layout, attributes), ``Connections``
and how the file was read. Whether the graph is MRH-Net is ``nn/matlab.py``'s question.

DAGNetwork objects are MATLAB class (MCOS) data that scipy shows only as an opaque blob,
so they are decoded with the optional ``mat-io`` package (``pip install "mrhscale[matlab]"``).
A plain-struct layout (docs/matlab.md, :func:`save_layer_graph_mat`) is read with scipy alone.
"""

from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
import scipy.io

from mrhscale._optional import get_matio
from mrhscale.errors import MRHError
from mrhscale.ops.layer_graph import CLASS_KINDS, KIND_CLASS, LayerGraph, MatLayer

# Layer fields kept (as plain values) in MatLayer.attrs, and written back by save_layer_graph_mat.
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


def _no_classes(_obj) -> None:
    """Class lookup for readers that know no MCOS classes (scipy, mat-io's public API)."""
    return None


# ---------------------------------------------------------------------------
# MATLAB values as plain Python
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


def _object_fields(obj) -> dict:
    """A mat-io MatlabOpaque object's saved properties (its saveobj struct sits under 'any')."""
    props = obj.properties
    return _fields(props["any"]) if isinstance(props, dict) and "any" in props else _fields(props)


def _text(v) -> str | None:
    """A MATLAB char array or string as str (None if it is neither)."""
    v = _unwrap(v)
    if isinstance(v, str | bytes):
        return v if isinstance(v, str) else v.decode(errors="replace")
    if isinstance(v, np.ndarray) and (v.size == 0 or v.dtype.kind == "U"):
        return "".join(v.reshape(-1).tolist())
    return None


def _plain(v):
    """A MATLAB attribute as str, int/float or list of numbers (None if none of those)."""
    t = _text(v)
    if t is not None:
        return t
    v = _unwrap(v)
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
        flat = [int(x) if float(x).is_integer() else x for x in v.reshape(-1, order="F").tolist()]
        return flat[0] if v.size == 1 else flat
    return v if isinstance(v, int | float) else None


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


# ---------------------------------------------------------------------------
# layers and connections
# ---------------------------------------------------------------------------


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
    kind = CLASS_KINDS.get(cls.rsplit(".", 1)[-1], cls) if cls else _signature_kind(f)
    attrs = {k: _plain(f[k]) for k in _ATTR_KEYS if k in f}
    if "Normalization" in f and attrs["Normalization"] is None:
        # a saved normalisation object (e.g. zerocenter with its mean): not MRH-Net's input
        attrs["Normalization"] = f"<{type(_unwrap(f['Normalization'])).__name__} object>"
    if cls:
        attrs["class"] = cls
    weights = _value(f["Weights"], f"layer {name!r} weights") if "Weights" in f else None
    bias = _value(f["Bias"], f"layer {name!r} bias") if "Bias" in f else None
    return MatLayer(name=name, kind=kind, weights=weights, bias=bias, attrs=attrs)


def _source_destination(c, where: str):
    """The Source and Destination columns of a MATLAB table (pandas), struct or N x 2 cell."""
    if hasattr(c, "columns") and hasattr(c, "__getitem__"):  # pandas.DataFrame from mat-io
        return list(c["Source"]), list(c["Destination"])
    if isinstance(c, np.ndarray) and c.dtype.names or isinstance(c, dict):
        f = _fields(c)
        if "Source" not in f or "Destination" not in f:
            raise MRHError(f"{where}: Connections has no Source/Destination")
        return [np.asarray(_unwrap(f[k]), dtype=object).reshape(-1) for k in ("Source", "Destination")]
    if isinstance(c, np.ndarray) and c.ndim == 2 and c.shape[1] == 2:
        return c[:, 0], c[:, 1]
    raise MRHError(f"{where}: cannot read the network's Connections ({type(c).__name__})")


def _connections(c, where: str) -> list[tuple[str, str]]:
    """(source, destination) layer names, destinations with their port (``add11/in2``)."""
    src, dst = _source_destination(_unwrap(c), where)
    pairs = [(_text(s), _text(d)) for s, d in zip(src, dst, strict=True)]
    if any(not s or not d for s, d in pairs):
        raise MRHError(f"{where}: Connections hold entries that are not layer names")
    return pairs


def _layer_items(raw) -> list:
    """The elements of a network's Layers, whichever container the reader made of it."""
    raw = _unwrap(raw)
    if isinstance(raw, np.ndarray) and raw.dtype.names:  # struct array: one 1x1 struct per layer
        flat = raw.reshape(-1, order="F")
        return [flat[i : i + 1] for i in range(flat.size)]
    if isinstance(raw, np.ndarray):  # cell array or mat-io object array
        return list(raw.reshape(-1, order="F"))
    return [raw]


def _read_layer(item, classes, where: str) -> MatLayer:
    """One element of Layers: a mat-io object (class from ``classes``) or a plain struct."""
    obj = _unwrap(item)
    cls = classes(obj)
    if getattr(obj, "properties", None) is not None:  # mat-io MatlabOpaque
        f = _object_fields(obj)
    else:
        f = _fields(obj)
        cls = cls or _text(f.get("Class"))
    return _make_layer(f, cls, where)


def _graph_from_net(fields: dict, classes, where: str, meta: dict) -> LayerGraph:
    if "Layers" not in fields or "Connections" not in fields:
        raise MRHError(f"{where}: the network has no Layers/Connections "
                       "(a SeriesNetwork or other object is not MRH-Net)")
    layers = []
    for i, item in enumerate(_layer_items(fields["Layers"])):
        try:
            layers.append(_read_layer(item, classes, where))
        except MRHError:
            raise
        except Exception as e:  # malformed layer record
            raise MRHError(f"{where}: layer {i + 1} cannot be read ({type(e).__name__}: {e})") from None
    meta["kinds_from"] = "class" if all("class" in lay.attrs for lay in layers) else "field signature"
    return LayerGraph(layers, _connections(fields["Connections"], where), meta)


# ---------------------------------------------------------------------------
# scipy: plain structs, and what a file holds
# ---------------------------------------------------------------------------


def _find_plain_net(variables: dict):
    """(name, fields) of the first variable that is a struct with Layers and Connections."""
    for name, v in variables.items():
        if name.startswith("__") or not isinstance(v, np.ndarray) or not v.dtype.names:
            continue
        if {"Layers", "Connections"} <= set(v.dtype.names):
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


def _check_holds_dag_network(path: str, variables: dict) -> None:
    """Stop early, with what the file holds, when scipy already shows there is no DAGNetwork."""
    objects = _mcos_names(variables)
    if not objects and "__function_workspace__" not in variables:
        names = ", ".join(k for k in variables if not k.startswith("__")) or "none"
        raise MRHError(f"{path}: holds no MATLAB network (variables: {names}); "
                       "expected a DAGNetwork saved from MATLAB (e.g. the published MRH-Net 'net')")
    if objects and all(c != "DAGNetwork" for _, c in objects):
        raise MRHError(f"{path}: holds {', '.join(f'{n} ({c})' for n, c in objects)}, no DAGNetwork; "
                       "MRH-Net is saved as a DAGNetwork")


def _unreadable_unless_matio(path: str, error: Exception) -> None:
    """scipy could not parse the file: without mat-io to try, that is the user's error."""
    try:
        get_matio()
    except MRHError:
        raise _unreadable(path, error) from None


def _unreadable(path: str, error: Exception) -> MRHError:
    return MRHError(f"{path}: not a readable MAT-file "
                    f"(truncated or corrupted? {type(error).__name__}: {error})")


def _read_with_scipy(path: str) -> LayerGraph | None:
    """The plain-struct layout; None when the file needs mat-io (MCOS data or MAT v7.3)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            variables = scipy.io.loadmat(path, mat_dtype=False)
    except NotImplementedError:  # MATLAB v7.3 (HDF5): mat-io reads those
        return None
    except Exception as e:
        _unreadable_unless_matio(path, e)
        return None
    plain = _find_plain_net(variables)
    if plain is None:
        _check_holds_dag_network(path, variables)
        return None
    name, fields = plain
    meta = {"reader": "scipy (plain struct)", "variable": name}
    return _graph_from_net(fields, _no_classes, path, meta)


# ---------------------------------------------------------------------------
# mat-io: DAGNetwork objects
# ---------------------------------------------------------------------------


def _matio_with_classes(path: str):
    """(variables, class of each object, reader) via mat-io's v5 reader; None if not v5."""
    # mat-io is the optional `matlab` extra: imported here, once _load_with_matio has checked it
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
    by_obj = {id(obj): ss.get_classname(int(meta[oid, 0])) for oid, obj in ss.mcos_object_cache.items()}
    return variables, (lambda o: by_obj.get(id(o))), "mat-io"


def _load_with_matio(path: str):
    """Variables via mat-io, plus each object's own MCOS class name where mat-io knows it.

    mat-io's public loader labels every element of a heterogeneous layer array with
    the array's base class (nnet.cnn.layer.Layer); the subsystem it builds still knows
    each object's class (Convolution2DLayer, ReLULayer...), so it is asked directly.
    If that internal route is unavailable (another mat-io version), the public loader
    is used and kinds come from the layers' fields.
    """
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
        raise _unreadable(path, e) from None
    return variables, _no_classes, "mat-io (public API)"


def _one_dag_network(path: str, variables: dict):
    """(name, object) of the file's only DAGNetwork."""
    user = {k: v for k, v in variables.items() if not k.startswith("__")}
    found = [(k, v) for k, v in user.items() if getattr(v, "classname", None) == "DAGNetwork"]
    if not found:
        desc = ", ".join(f"{k} ({getattr(v, 'classname', type(v).__name__)})" for k, v in user.items())
        raise MRHError(f"{path}: holds no DAGNetwork (variables: {desc or 'none'}); MRH-Net is saved as one")
    if len(found) > 1:
        names = ", ".join(k for k, _ in found)
        raise MRHError(f"{path}: holds several DAGNetworks ({names}); save one per file")
    return found[0]


def _read_with_matio(path: str) -> LayerGraph:
    variables, classes, reader = _load_with_matio(path)
    name, net = _one_dag_network(path, variables)
    try:
        meta = {"reader": reader, "variable": name}
        return _graph_from_net(_object_fields(net), classes, path, meta)
    except MRHError:
        raise
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
        raise MRHError(f"{path}: the DAGNetwork {name!r} cannot be decoded ({why})") from None


# ---------------------------------------------------------------------------
# public
# ---------------------------------------------------------------------------


def read_layer_graph(path: str | os.PathLike) -> LayerGraph:
    """Decode the network in a ``.mat`` file into a :class:`LayerGraph` (no checks yet).

    Plain-struct files (docs/matlab.md) are read with scipy; DAGNetwork objects need
    the ``matlab`` extra (mat-io).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MRHError(f"{path}: file not found")
    graph = _read_with_scipy(path)
    return graph if graph is not None else _read_with_matio(path)


def _layer_struct(lay: MatLayer) -> dict:
    """One layer in the plain-struct layout (Name, Class, attributes, Weights, Bias)."""
    s = {"Name": lay.name, "Class": lay.attrs.get("class", KIND_CLASS.get(lay.kind, lay.kind))}
    for k in _ATTR_KEYS:
        v = lay.attrs.get(k)
        if v is not None:
            s[k] = v if isinstance(v, str) else np.asarray(v, dtype=np.float64)
    if lay.weights is not None:
        s["Weights"] = np.asarray(lay.weights)
        s["Bias"] = np.asarray(lay.bias)
    return s


def _cell_column(values) -> np.ndarray:
    col = np.empty((len(values), 1), dtype=object)
    for i, v in enumerate(values):
        col[i, 0] = v
    return col


def save_layer_graph_mat(graph: LayerGraph, path: str | os.PathLike, variable: str = "net") -> str:
    """Write ``graph`` as a plain-struct ``.mat`` file, which :func:`read_layer_graph` reads.

    Layout: ``net.Layers`` a cell array of structs (Name, Class, Weights, Bias and the
    attributes), ``net.Connections`` a struct of two cell arrays (Source, Destination).
    MATLAB users can build the same struct from a DAGNetwork (docs/matlab.md).
    """
    cells = np.empty((1, len(graph.layers)), dtype=object)
    for i, lay in enumerate(graph.layers):
        cells[0, i] = _layer_struct(lay)
    conns = {
        "Source": _cell_column([s for s, _ in graph.connections]),
        "Destination": _cell_column([d for _, d in graph.connections]),
    }
    path = os.fspath(path)
    scipy.io.savemat(path, {variable: {"Layers": cells, "Connections": conns}}, do_compression=True)
    return path


def mat_file_facts(path: str) -> dict:
    """Name, sha256, size and MAT header text of a file: the provenance of what was imported."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        head = fh.read(116)
        h.update(head)
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    text = head.decode("latin-1", errors="replace").rstrip("\x00 ").strip()
    return {"file": os.path.basename(path), "sha256": h.hexdigest(), "bytes": os.path.getsize(path),
            "header": text if text.startswith("MATLAB") else None}
