"""Export a model bundle for runtimes without mrhscale: ONNX (onnxruntime, TensorRT, ...)
or a ``torch.export`` program (``.pt2``).

The exported graph is the bundle's whole inference map, not the bare network: RAW MRI
patches in, RAW stain units out, with the bundle's normalisation inside the graph::

    x' = (x - offset[c]) / scale[c];  NaN/inf -> 0;  y = MRHNet(x') * target_scale + target_offset

so a runtime cannot scale the inputs wrongly (or by the test brain's own maximum, as the
original did). The numbers are also written out: in the file (ONNX ``metadata_props``;
a pt2 extra file ``mrhscale.json``) and in the sidecar ``<out>.json``, which adds the
file's sha256 and the export's own check.

Input ``mri`` float32 (batch, channels, height, width), channels in the bundle's order.
Output ``stain`` float32 (batch, height, width). The batch is dynamic, and so are height
and width (MRHNet is fully convolutional); only the bundle's patch size P = 2h+1
reproduces ``mrhscale predict``, which writes ``stain[:, h, h]`` to the patch's centre voxel.

Steps: validate (bundle readable; --out free, or our own export and --overwrite) ->
plan (graph, metadata, example input) -> run (export, then run the exported graph
against torch on random patches) -> commit (the file, then its sidecar, each written
aside and renamed).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import warnings
import zipfile

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from mrhscale import __version__
from mrhscale._optional import load as load_extra
from mrhscale.errors import MRHError
from mrhscale.io.bundle import load_model
from mrhscale.results import ExportResult
from mrhscale.stores import atomic_write, is_local, resolve, sha256_file, write_json
from mrhscale.stores.legacy import stains_of

FORMAT = "mrhscale-export"
FORMAT_VERSION = 2  # 2: the output always has a stain axis (NTHW; one stain: T = 1)
FORMATS = ("onnx", "pt2")
INPUT, OUTPUT = "mri", "stain"
DIMS = {0: "batch", 2: "height", 3: "width"}  # the input's dynamic dims
META_FILE = "mrhscale.json"  # pt2 extra file, and the ONNX metadata key, holding the whole record
TOLERANCE = 1e-4  # max |exported - torch| allowed, relative to max(1, max |output|)
APPLIED = ("inside the graph: x' = (x - offset[c]) / scale[c] per input channel c, NaN/inf -> 0; "
           "output = network(x') * target_scale + target_offset (raw stain units)")


def export_model(model_path, out, fmt: str = "onnx", *, overwrite: bool = False,
                 opset: int | None = None) -> ExportResult:
    """Write MODEL (a bundle) as an ONNX or pt2 file ``out`` plus ``<out>.json``.

    Refuses an existing ``out`` (or sidecar) that is not an mrhscale export, and replaces
    an existing export only with ``overwrite``; fails, writing nothing, if the exported
    graph differs from torch by more than ``TOLERANCE``.
    """

    fmt = _check_format(fmt, opset)
    model_path, out = resolve(model_path, "model"), _local_out(out)
    net, meta = load_model(model_path)
    if meta["members"] > 1:
        raise MRHError(f"{model_path}: is an ensemble of {meta['members']} networks (train --members); export "
                       "writes one network, and a patch-wise graph would lose the uncertainty: export a "
                       "network trained without --members, or one member's run folder model "
                       "(OUT/members/m00/model.pt)")
    if meta["norm"].per_subject:
        raise MRHError(f"{model_path}: the model scales each brain by its own statistics ({meta['norm'].mode}), "
                       "which a patch-wise exported graph cannot compute; train with --norm global to export")
    check_out(out, overwrite)
    graph = InferenceGraph(net, meta["norm"]).eval()
    size = int(meta["patch"].get("size") or 2 * int(meta["patch"]["half"]) + 1)
    arrays = meta["norm"].input_arrays()
    with torch.no_grad():
        artifact, info = _export(fmt, graph, _raw(arrays, 2, size, seed=0), opset)
        doc = {**metadata(model_path, meta, fmt, info["dynamic"]), **info["record"]}
        data = serialise(artifact, fmt, doc)
        diff = check_export(graph, data, fmt, arrays, size, "height" in info["dynamic"])
    sidecar = commit(out, data, doc, diff)
    return ExportResult(out=out, sidecar=sidecar, format=fmt, exporter=info["exporter"], max_abs_diff=diff,
                        dynamic=info["dynamic"], opset=info["record"].get("onnx", {}).get("opset"),
                        metadata=doc)


# --------------------------------------------------------------------------- validate
def _check_format(fmt: str, opset) -> str:
    fmt = str(fmt).lower()
    if fmt not in FORMATS:
        raise MRHError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise MRHError("--opset applies to --format onnx only")
    if fmt == "onnx":
        load_extra("onnx", "ONNX export")
        load_extra("onnxruntime", "checking an ONNX export")
    return fmt


def _local_out(out) -> str:
    if out is None or not str(out).strip() or not is_local(str(out)):
        raise MRHError(f"--out {out}: expected a local file path")
    return resolve(out, "--out")


def sidecar_path(out: str) -> str:
    return f"{out}.json"


def check_out(out: str, overwrite: bool) -> None:
    """Never replace what mrhscale did not write; replace our own export only with ``overwrite``."""
    found = [p for p in (out, sidecar_path(out)) if os.path.lexists(p)]
    for p in found:
        if os.path.isdir(p) or os.path.islink(p):
            raise MRHError(f"{p}: exists and is a folder or a link; --out must name a file")
        doc = read_export_metadata(p) if p == out else _read_json(p)
        if doc is None or doc.get("format") != FORMAT:
            raise MRHError(f"{p}: exists and is not an mrhscale export; refusing to replace it "
                           "(choose another --out)")
    if found and not overwrite:
        raise MRHError(f"{found[0]}: an mrhscale export is already there; pass --overwrite to replace it")


def read_export_metadata(path: str) -> dict | None:
    """The record inside an mrhscale export (ONNX or pt2), or None if ``path`` is not one.

    Reads the file without running or unpickling it (``torch.export.load`` unpickles).
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith("extra/" + META_FILE)]
                doc = json.loads(z.read(names[0])) if names else None
        else:
            with open(path, "rb") as fh:
                if fh.read(1) != b"\x08":  # an ONNX ModelProto starts with ir_version (field 1)
                    return None
            proto = load_extra("onnx", "reading an ONNX file").load(path, load_external_data=False)
            props = {p.key: p.value for p in proto.metadata_props}
            doc = json.loads(props[META_FILE]) if META_FILE in props else None
    except Exception:  # unreadable, not ONNX/zip, or onnx not installed: not one we can vouch for
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else None


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# --------------------------------------------------------------------------- plan
class InferenceGraph(nn.Module):
    """Raw patches -> raw stain units: the bundle's normalisation around MRHNet, as predict applies it."""

    def __init__(self, net: nn.Module, norm):
        super().__init__()
        self.net = net
        off, inv = norm.input_arrays()
        self.register_buffer("offset", torch.from_numpy(off).reshape(1, -1, 1, 1))
        self.register_buffer("inv_scale", torch.from_numpy(inv).reshape(1, -1, 1, 1))
        t_off, t_scale = norm.target_arrays(np.float32)  # [B, T, P, P]: each stain its own scaling
        self.register_buffer("t_scale", torch.from_numpy(t_scale).reshape(1, -1, 1, 1))
        self.register_buffer("t_offset", torch.from_numpy(t_off).reshape(1, -1, 1, 1))

    def forward(self, mri: torch.Tensor) -> torch.Tensor:
        x = (mri - self.offset) * self.inv_scale
        x = torch.where(torch.isfinite(x), x, 0.0)
        return self.net(x) * self.t_scale + self.t_offset


def _output_record(meta: dict, dims: list, h, p) -> dict:
    """The graph's output: ``[N, T, H, W]``, T stains (one stain: T = 1)."""
    stains = stains_of(meta)
    return {"name": OUTPUT, "layout": "NTHW", "shape": [dims[0], len(stains), *dims[2:]], "dtype": "float32",
            "stains": list(stains),
            "meaning": f"virtual {', '.join(stains)} (in that order along T) in raw stain units; on a {p}x{p} "
                       f"patch, [:, k, {h}, {h}] is what `mrhscale predict` writes as <stain k>_virtual"}


def metadata(model_path: str, meta: dict, fmt: str, dynamic: list[str]) -> dict:
    """The record written into the file and its sidecar: all a runtime needs to feed the graph."""

    ch, patch = list(meta["channels"]), dict(meta["patch"])
    h, p = patch.get("half"), patch.get("size")
    dims = ["batch", len(ch), *(["height", "width"] if "height" in dynamic else [p, p])]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "export_format": fmt,
        "target": str(meta["target"]), "stains": stains_of(meta), "channels": ch,
        "normalisation": {**meta["norm"].to_dict(), "applied": APPLIED},
        "patch": patch,
        "input": {"name": INPUT, "layout": "NCHW", "shape": dims, "dtype": "float32",
                  "meaning": "raw MRI intensities (not normalised), channels in `channels` order, "
                             "in the plane across the slice axis patch.axis"},
        "output": _output_record(meta, dims, h, p),
        "dynamic": list(dynamic),
        "model": {"file": os.path.basename(model_path), "sha256": sha256_file(model_path),
                  "arch": dict(meta.get("arch") or {})},
        "mrhscale_version": __version__, "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _raw(norm_arrays, n: int, size: int, seed: int) -> torch.Tensor:
    """Random raw patches whose normalised values are about N(0, 1)."""
    off, inv = (torch.from_numpy(a).reshape(1, -1, 1, 1) for a in norm_arrays)
    g = torch.Generator().manual_seed(seed)
    return off + torch.randn(n, off.shape[1], size, size, generator=g) / inv


def _dynamic_shapes(spatial: bool) -> dict:
    dims = {0: Dim("batch", min=1, max=1 << 30)}
    if spatial:
        dims.update({i: Dim(DIMS[i], min=1, max=1 << 20) for i in (2, 3)})
    return {INPUT: dims}


# --------------------------------------------------------------------------- run
def _export(fmt: str, graph: nn.Module, example: torch.Tensor, opset):
    """(ExportedProgram or ONNX ModelProto, {"exporter", "dynamic", "record"})."""
    return _onnx_export(graph, example, opset) if fmt == "onnx" else _pt2_export(graph, example)


def _pt2_export(graph, example):
    """torch.export with a dynamic batch, and height/width unless this torch specialises them."""
    errors = []
    for spatial in (True, False):
        shapes = _dynamic_shapes(spatial)
        try:
            ep = torch.export.export(graph, (example,), dynamic_shapes=shapes, strict=False)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {str(e)[:300]}")
            continue
        rec = {"pt2": {"load": "torch.export.load(path).module()", "torch_version": torch.__version__}}
        return ep, {"exporter": "torch.export", "dynamic": [DIMS[i] for i in shapes[INPUT]], "record": rec}
    raise MRHError(f"torch.export failed for this model: {'; '.join(errors)}")


def _onnx_export(graph, example, opset):
    """torch.onnx's dynamo exporter (needs onnxscript); the TorchScript one if that is missing or fails."""
    import importlib.util

    errors = []
    exporters = [_onnx_torchscript]
    if importlib.util.find_spec("onnxscript") is not None:
        exporters.insert(0, _onnx_dynamo)
    for exporter in exporters:
        try:
            proto, name = exporter(graph, example, opset)
        except Exception as e:
            errors.append(f"{exporter.__name__[6:]}: {type(e).__name__}: {str(e)[:300]}")
            continue
        ops = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        rec = {"onnx": {"opset": ops, "ir_version": int(proto.ir_version), "exporter": name}}
        return proto, {"exporter": name, "dynamic": list(DIMS.values()), "record": rec}
    raise MRHError(f"ONNX export failed ({'; '.join(errors)})")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters' deprecation warnings and log chatter (torchvision ops skipped...) are not the user's."""
    logs = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def _onnx_dynamo(graph, example, opset):
    with _quiet_exporter():
        prog = torch.onnx.export(graph, (example,), dynamo=True, dynamic_shapes=_dynamic_shapes(True),
                                 input_names=[INPUT], output_names=[OUTPUT], opset_version=opset,
                                 verbose=False, optimize=True)
    return prog.model_proto, "torch.onnx (dynamo)"  # dims named after the Dims: batch, height, width


def _onnx_torchscript(graph, example, opset):
    onnx = load_extra("onnx", "ONNX export")
    buf = io.BytesIO()
    with _quiet_exporter():
        torch.onnx.export(graph, (example,), buf, dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                          opset_version=opset, dynamic_axes={INPUT: DIMS, OUTPUT: dict(enumerate(
                              ("batch", "height", "width")))})
    return onnx.load_from_string(buf.getvalue()), "torch.onnx (torchscript)"


def serialise(artifact, fmt: str, doc: dict) -> bytes:
    """The file's bytes, with the record inside: ONNX metadata_props, or a pt2 extra file."""
    text = json.dumps(doc, default=str)
    if fmt == "pt2":
        buf = io.BytesIO()
        torch.export.save(artifact, buf, extra_files={META_FILE: text})
        return buf.getvalue()
    onnx = load_extra("onnx", "ONNX export")
    props = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in doc.items()}
    onnx.helper.set_model_props(artifact, {**props, META_FILE: text})
    artifact.doc_string = (f"mrhscale {doc['target']} model: raw MRI patches `{INPUT}` (NCHW, "
                           f"{len(doc['channels'])} channels) -> raw stain units `{OUTPUT}` (NTHW); "
                           "see metadata_props")
    return artifact.SerializeToString()


def check_export(graph, data: bytes, fmt: str, norm_arrays, size: int, spatial: bool) -> float:
    """Max |exported - torch| on random patches (batch 3 at the patch size, plus one larger
    tile when height/width are dynamic); an MRHError above ``TOLERANCE``, before anything is written."""
    run = _onnx_runner(data) if fmt == "onnx" else _pt2_runner(data)
    worst, scale = 0.0, 1.0
    for n, s in ((3, size), (1, size + 4)) if spatial else ((3, size),):
        x = _raw(norm_arrays, n, s, seed=n)
        with torch.inference_mode():
            ref = graph(x).numpy()
        got = run(x)
        if got.shape != ref.shape:
            raise MRHError(f"exported {fmt} graph returned shape {got.shape}, torch {ref.shape}")
        worst = max(worst, float(abs(got - ref).max()))
        scale = max(scale, float(abs(ref).max()))
    if not worst <= TOLERANCE * scale:
        raise MRHError(f"exported {fmt} graph differs from torch by {worst:.3g} "
                       f"(allowed {TOLERANCE * scale:.3g}); nothing written")
    return worst


def _onnx_runner(data: bytes):
    ort = load_extra("onnxruntime", "checking an ONNX export")
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return lambda x: sess.run([OUTPUT], {INPUT: x.numpy()})[0]


def _pt2_runner(data: bytes):
    mod = torch.export.load(io.BytesIO(data)).module()

    def run(x):
        with torch.inference_mode():
            return mod(x).numpy()

    return run


# --------------------------------------------------------------------------- commit
def commit(out: str, data: bytes, doc: dict, diff: float) -> str:
    """The file, then its sidecar (the record plus the file's sha256 and the check), each atomic."""

    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(out, write)
    side = {**doc, "file": os.path.basename(out), "sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
            "check": {"max_abs_diff": diff, "relative_tolerance": TOLERANCE,
                      "against": "the same graph in torch, random patches"}}
    return write_json(sidecar_path(out), side)
