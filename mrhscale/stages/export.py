"""Export a model bundle for runtimes without mrhscale: ONNX (onnxruntime, TensorRT, ...)
or a ``torch.export`` program (``.pt2``).

The exported graph is the bundle's whole inference map, not the bare network: RAW MRI
patches in, RAW stain units out, with the bundle's normalisation inside the graph::

    x' = (x - offset[c]) / scale[c];  NaN/inf -> 0;  y = MRHNet(x') * target_scale + target_offset

so a runtime cannot scale the inputs wrongly (or by the test brain's own maximum, as the
original did). A model that scales each brain by its own statistics (the default recipe)
takes them as two more inputs, ``offset`` and ``scale`` (float32 [channels]); the sidecar
says how to compute them and ``brain_statistics`` computes them. An ensemble's graph runs
every member and returns, beside ``stain`` (their mean), ``uncertainty``: their spread
calibrated as predict's ``<stain>_uncertainty``. The numbers are also written out: in the
file (ONNX ``metadata_props``; a pt2 extra file ``mrhscale.json``) and in the sidecar
``<out>.json``, which adds the file's sha256 and the export's own check.

Input ``mri`` float32 (batch, channels, height, width), channels in the bundle's order.
Output ``stain`` float32 (batch, stains, height, width). The batch is dynamic, and so are
height and width (MRHNet is fully convolutional); only the bundle's patch size P = 2h+1
reproduces ``mrhscale predict``, which writes ``stain[:, k, h, h]`` to the patch's centre voxel.

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

import numpy as np
import torch
import xarray as xr
from torch import nn
from torch.export import Dim

from mrhscale import __version__
from mrhscale._optional import load as load_extra
from mrhscale.errors import MRHError
from mrhscale.io.bundle import load_model
from mrhscale.io.exported import FORMAT, META_FILE, STATISTICS, read_export_metadata
from mrhscale.nn.model import mean_and_spread
from mrhscale.nn.ood import InputDistance
from mrhscale.ops.norm import PERCENTILES, STAT_VOXELS, subject_stats_graph
from mrhscale.ops.uncertainty import TINY, label_groups, ood_powers, spread_scale, value_groups
from mrhscale.results import ExportResult
from mrhscale.stages.predict_graph import check_channels, stain_calibrations, subject_arrays
from mrhscale.stages.predict_volume import subject_from_files
from mrhscale.stores import atomic_write, is_local, resolve, sha256_file, write_json
from mrhscale.stores.legacy import stains_of

FORMAT_VERSION = 3  # 2: the output always has a stain axis (NTHW); 3: inputs/outputs listed, statistics in
FORMATS = ("onnx", "pt2")
INPUT, OUTPUT, UNCERTAINTY, OOD = "mri", "stain", "uncertainty", "ood"
DIMS = {0: "batch", 2: "height", 3: "width"}  # the input's and outputs' dynamic dims
TOLERANCE = 1e-4  # max |exported - torch| allowed, relative to max(1, max |output|)
APPLIED = ("inside the graph: x' = (x - offset[c]) / scale[c] per input channel c, NaN/inf -> 0; "
           "output = network(x') * target_scale + target_offset (raw stain units)")
APPLIED_SUBJECT = ("inside the graph, offset and scale being the graph inputs of that name (the brain's own "
                   "statistics, see `statistics`): x' = (x - offset[c]) / scale[c] per input channel c, "
                   "NaN/inf -> 0; output = network(x') * target_scale + target_offset (raw stain units)")


def export_model(model_path, out, fmt: str = "onnx", *, overwrite: bool = False,
                 opset: int | None = None) -> ExportResult:
    """Write MODEL (a bundle) as an ONNX or pt2 file ``out`` plus ``<out>.json``.

    Refuses an existing ``out`` (or sidecar) that is not an mrhscale export, and replaces
    an existing export only with ``overwrite``; fails, writing nothing, if the exported
    graph differs from torch by more than ``TOLERANCE``.
    """

    fmt = _check_format(fmt, opset)
    model_path, out = resolve(model_path, "model"), _local_out(out)
    net, meta = load_model(model_path, ensemble=True)
    check_out(out, overwrite)
    graph = inference_graph(net, meta).eval()
    size = int(meta["patch"].get("size") or 2 * int(meta["patch"]["half"]) + 1)
    with torch.no_grad():
        artifact, info = _export(fmt, graph, graph.example(2, size, seed=0), opset)
        doc = {**metadata(model_path, meta, fmt, info["dynamic"], graph), **info["record"]}
        data = serialise(artifact, fmt, doc)
        diff = check_export(graph, data, fmt, size, "height" in info["dynamic"])
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


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# --------------------------------------------------------------------------- plan
class InferenceGraph(nn.Module):
    """Raw patches -> raw stain units: the bundle's normalisation around MRHNet, as predict
    applies it; an ensemble's graph returns its members' mean and their calibrated spread
    (``nn.model.mean_and_spread`` times predict's ``spread_scale``: target scale x factor);
    with the bundle's out-of-distribution record (``ood``) the score is a last output and
    widens the spread to each stain's ``ood_power``, as predict does."""

    inputs: tuple[str, ...] = (INPUT,)

    def __init__(self, net: nn.Module, norm, spread: np.ndarray | None = None, value_groups=None,
                 ood: dict | None = None, ood_power=None):
        super().__init__()
        self.score = InputDistance.from_record(ood) if ood else None
        self.register_buffer("ood_power", _along_axis1(np.zeros(norm.n_stains) if ood_power is None else ood_power))
        self.net, self.ensemble, self.n_channels = net, spread is not None, norm.n_channels
        self._input_buffers(norm)
        t_off, t_scale = norm.target_arrays(np.float32)  # [B, T, P, P]: each stain its own scaling
        self.register_buffer("t_scale", _along_axis1(t_scale))
        self.register_buffer("t_offset", _along_axis1(t_off))
        self.register_buffer("spread_scale", _along_axis1(t_scale if spread is None else spread))
        self.value_groups = [None if g is None else (torch.tensor(g[0], dtype=torch.float32),
                                                     torch.tensor(g[1], dtype=torch.float32))
                             for g in (value_groups or ())]

    def _input_buffers(self, norm) -> None:
        off, inv = norm.input_arrays()
        self.register_buffer("offset", _along_axis1(off))
        self.register_buffer("inv_scale", _along_axis1(inv))

    @property
    def outputs(self) -> tuple[str, ...]:
        return (OUTPUT, *((UNCERTAINTY,) if self.ensemble else ()), *((OOD,) if self.score is not None else ()))

    def stains(self, x: torch.Tensor):
        """Normalised patches (NaN/inf -> 0 here) -> raw stain units (an ensemble: and its
        spread; with a score: and the score)."""
        x = torch.where(torch.isfinite(x), x, 0.0)
        y = self.net(x)
        score = None if self.score is None else self.score(x)
        if not self.ensemble:
            y = y * self.t_scale + self.t_offset
            return y if score is None else (y, score)
        mean, spread = mean_and_spread(y, len(self.t_scale.reshape(-1)))
        mean = mean * self.t_scale + self.t_offset
        spread = self._by_value(mean, spread * self.spread_scale)
        if score is None:
            return mean, spread
        return mean, spread * score.clamp_min(TINY) ** self.ood_power, score

    def _by_value(self, mean: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        """Each stain's spread times the factor of its predicted value's bin over the global one (a
        calibration by value bins, ``ops.uncertainty.scale_by_value``), as steps: ONNX-friendly
        comparisons, not a lookup."""
        if not any(g is not None for g in self.value_groups):
            return spread
        out = []
        for k, g in enumerate(self.value_groups):
            f = torch.ones_like(spread[:, k])
            if g is not None:
                edges, rel = g
                f = f * rel[0]
                for j in range(len(edges)):
                    f = f + (rel[j + 1] - rel[j]) * (mean[:, k] >= edges[j]).to(f.dtype)
            out.append(spread[:, k] * f)
        return torch.stack(out, 1)

    def forward(self, mri: torch.Tensor):
        return self.stains((mri - self.offset) * self.inv_scale)

    def example(self, n: int, size: int, seed: int) -> tuple[torch.Tensor, ...]:
        """The graph's inputs: random raw patches whose normalised values are about N(0, 1)."""
        g = torch.Generator().manual_seed(seed)
        return (self.offset + torch.randn(n, self.n_channels, size, size, generator=g) / self.inv_scale,)


class SubjectGraph(InferenceGraph):
    """A per-subject model's graph: the brain's own ``offset`` and ``scale`` (float32 [C]) are
    inputs beside the patches, composed with the record's as ``Normalisation.for_subject``
    composes them (the subject modes' record is 0 and 1: x' = (x - offset) / scale)."""

    inputs = (INPUT, *STATISTICS)

    def _input_buffers(self, norm) -> None:
        self.register_buffer("r_offset", torch.tensor(norm.offset, dtype=torch.float32))
        self.register_buffer("r_scale", torch.tensor(norm.scale, dtype=torch.float32))

    def forward(self, mri: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor):
        off, sc = offset + scale * self.r_offset, scale * self.r_scale
        return self.stains((mri - off.reshape(1, -1, 1, 1)) / sc.reshape(1, -1, 1, 1))

    def example(self, n: int, size: int, seed: int) -> tuple[torch.Tensor, ...]:
        """Random raw patches and a brain's statistics (offset 0..50, scale 50..150) they fit."""
        g = torch.Generator().manual_seed(seed)
        off, sc = 50 * torch.rand(self.n_channels, generator=g), 50 + 100 * torch.rand(self.n_channels, generator=g)
        x = torch.randn(n, self.n_channels, size, size, generator=g)
        return x * sc.reshape(1, -1, 1, 1) + off.reshape(1, -1, 1, 1), off, sc


def _along_axis1(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.float32)).reshape(1, -1, 1, 1)


def inference_graph(net: nn.Module, meta: dict) -> InferenceGraph:
    """The graph of a bundle's network (an ensemble: all its members) and metadata."""
    norm = meta["norm"]
    spread = spread_scale(meta, norm)
    cals = stain_calibrations(meta) if spread is not None else []
    graph = SubjectGraph if norm.per_subject else InferenceGraph
    return graph(net, norm, spread, value_groups(cals) if cals else None, meta.get("ood"), ood_powers(cals) if cals else None)


def _output_record(meta: dict, dims: list, h, p) -> dict:
    """The graph's output: ``[N, T, H, W]``, T stains (one stain: T = 1)."""
    stains = stains_of(meta)
    return {"name": OUTPUT, "layout": "NTHW", "shape": [dims[0], len(stains), *dims[2:]], "dtype": "float32",
            "stains": list(stains),
            "meaning": f"virtual {', '.join(stains)} (in that order along T) in raw stain units; on a {p}x{p} "
                       f"patch, [:, k, {h}, {h}] is what `mrhscale predict` writes as <stain k>_virtual"
                       + (" (an ensemble: the members' mean)" if int(meta["members"]) > 1 else "")}


def _uncertainty_record(meta: dict, dims: list, h, p) -> dict:
    """An ensemble's second output: each stain's calibrated spread, as predict's ``<stain>_uncertainty``."""
    rec = _output_record(meta, dims, h, p)
    return {**rec, "name": UNCERTAINTY, "meaning": (
        f"the {meta['members']} members' standard deviation (ddof 1) pooled over the whole patch (the same "
        f"at each of its positions), times the target scale and the calibration factor of each stain "
        f"(`uncertainty.calibration`), in raw stain units; on a {p}x{p} patch, [:, k, {h}, {h}] is what "
        "`mrhscale predict` writes as <stain k>_uncertainty; stain +- 1.96 x uncertainty: the 95% interval"
        + _group_note(meta))}


def _ood_record(meta: dict, dims: list, h, p) -> dict:
    """The out-of-distribution score's output (``ops.ood``): one value a patch, at each position."""
    q = meta["ood"]["training_quantiles"]
    return {"name": OOD, "layout": "NTHW", "shape": [dims[0], 1, *dims[2:]], "dtype": "float32",
            "meaning": f"how unlike the training brains the patch's MRI is: {meta['ood']['method']}; 1 = a typical "
                       f"training patch, its 99th percentile {q['99']:.3g}; [:, 0, {h}, {h}] is what `mrhscale predict` "
                       "writes as ood" + ("; the uncertainty is widened by it (`ood_power` of each stain's "
                                           "calibration)" if int(meta["members"]) > 1 else "")}


def _group_note(meta: dict) -> str:
    """What the graph does with a calibration by groups: value bins inside it; tissue labels are not
    inputs, so their factors are not applied (the global one is)."""
    cals = stain_calibrations(meta)
    note = ""
    if value_groups(cals):
        note += "; times the factor of the bin of each stain's predicted value (calibration by value bins)"
    if any(label_groups(cals)):
        note += ("; a calibration by tissue labels is NOT applied (labels are no input): those stains keep the "
                 "global factor")
    return note


def _io_records(meta: dict, graph: InferenceGraph, dims: list) -> dict:
    """The graph's inputs and outputs, by name; ``input``/``output``: the patches and the stains."""
    h, p = meta["patch"].get("half"), meta["patch"].get("size")
    mri = {"name": INPUT, "layout": "NCHW", "shape": dims, "dtype": "float32",
           "meaning": "raw MRI intensities (not normalised), channels in `channels` order, "
                      "in the plane across the slice axis patch.axis"}
    stats = [{"name": k, "layout": "C", "shape": [dims[1]], "dtype": "float32",
              "meaning": f"the brain's own {k} of each channel, in `channels` order: see `statistics`"}
             for k in graph.inputs[1:]]
    outputs = [_output_record(meta, dims, h, p), *([_uncertainty_record(meta, dims, h, p)] if graph.ensemble else []),
               *([_ood_record(meta, dims, h, p)] if graph.score is not None else [])]
    return {"input": mri, "output": outputs[0], "inputs": [mri, *stats], "outputs": outputs}


def statistics_record(mode: str) -> dict:
    """How a per-subject graph's ``offset`` and ``scale`` come from a brain: what
    ``ops.norm.subject_stats`` computes, in words, and the functions that compute it."""
    lo, hi = PERCENTILES
    lattice = (f"the brain mask's voxels (mask > 0) on a lattice: every k-th voxel along x, y and z from "
               f"index 0, k = max(1, ceil((X * Y * Z / {STAT_VOXELS}) ** (1/3))) for an X x Y x Z volume")
    how = {"subject-percentile": (lattice, f"offset[c] = the {lo}th percentile of channel c over those voxels "
                                  f"and scale[c] = its {hi}th minus its {lo}th (linear interpolation, numpy's "
                                  "default; NaN ignored); a scale not finite or <= 0 becomes max(|offset[c]|, 1)"),
           "subject-max": ("every voxel inside the brain mask (mask > 0)",
                           "offset[c] = 0 and scale[c] = the one maximum over every channel of those voxels, "
                           "the same for all c (1 if it is not finite or <= 0): the original MRH_testing's "
                           "data ./ max(data(:))")}[mode]
    return {"inputs": list(STATISTICS), "mode": mode,
            "volume": "the brain's raw MRI as `mrhscale ingest` reads it: (x, y, z, channel), the model's channels "
                      "in `channels` order, NaN/inf -> 0, with its brain mask on the same grid",
            "voxels": how[0], "per_channel": how[1], "formula": "x' = (x - offset[c]) / scale[c]",
            "reference": "mrhscale.brain_statistics(EXPORT_FILE, data) -> {'offset', 'scale'} (data: a cohort "
                         "subject or a mapping of NIfTI files, as predict_volume takes); on arrays: "
                         "mrhscale.ops.norm.graph_statistics(mri, mask, mode)"}


def metadata(model_path: str, meta: dict, fmt: str, dynamic: list[str], graph: InferenceGraph) -> dict:
    """The record written into the file and its sidecar: all a runtime needs to feed the graph."""

    ch, patch = list(meta["channels"]), dict(meta["patch"])
    p, norm = patch.get("size"), meta["norm"]
    dims = ["batch", len(ch), *(["height", "width"] if "height" in dynamic else [p, p])]
    ensemble = {"members": int(meta["members"]), "uncertainty": dict(meta.get("uncertainty") or {})}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "export_format": fmt,
        "target": str(meta["target"]), "stains": stains_of(meta), "channels": ch,
        "normalisation": {**norm.to_dict(), "applied": APPLIED_SUBJECT if norm.per_subject else APPLIED},
        **({"statistics": statistics_record(norm.mode)} if norm.per_subject else {}),
        "patch": patch, **_io_records(meta, graph, dims),
        **(ensemble if graph.ensemble else {}),
        **({"ood": {k: meta["ood"][k] for k in ("method", "n", "training_quantiles")}} if graph.score is not None
           else {}),
        "dynamic": list(dynamic),
        "model": {"file": os.path.basename(model_path), "sha256": sha256_file(model_path),
                  "arch": dict(meta.get("arch") or {})},
        "mrhscale_version": __version__, "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _dynamic_shapes(graph: InferenceGraph, spatial: bool) -> dict:
    dims = {0: Dim("batch", min=1, max=1 << 30)}
    if spatial:
        dims.update({i: Dim(DIMS[i], min=1, max=1 << 20) for i in (2, 3)})
    return {INPUT: dims, **dict.fromkeys(graph.inputs[1:])}  # the statistics: [C], static


def brain_statistics(export, data) -> dict[str, np.ndarray]:
    """The ``offset`` and ``scale`` inputs (float32 [channels]) a per-subject export's graph
    takes for one brain, ``data`` as ``predict_volume`` takes it (a cohort subject Dataset,
    or a mapping of its NIfTI files and mask): the numbers predict computes for that brain.
    ``export``: the exported file or its sidecar JSON."""
    path = os.fspath(export)
    doc = read_export_metadata(path) if os.path.isfile(path) else None
    doc = doc or (_read_json(path) if path.endswith(".json") else None)
    if not doc or doc.get("format") != FORMAT:
        raise MRHError(f"{path}: not an mrhscale export (nor its sidecar JSON)")
    if "statistics" not in doc:
        raise MRHError(f"{path}: the model is normalised globally; its graph takes no brain statistics")
    ds = data if isinstance(data, xr.Dataset) else subject_from_files(data)
    check_channels(doc["channels"], [str(c) for c in ds["contrast"].values], "data")
    got = subject_stats_graph(*subject_arrays(ds, doc["channels"])).compute(scheduler="synchronous")
    return {k: np.asarray(got[doc["statistics"]["mode"]][k], np.float32) for k in STATISTICS}


# --------------------------------------------------------------------------- run
def _export(fmt: str, graph: InferenceGraph, example: tuple, opset):
    """(ExportedProgram or ONNX ModelProto, {"exporter", "dynamic", "record"})."""
    return _onnx_export(graph, example, opset) if fmt == "onnx" else _pt2_export(graph, example)


def _pt2_export(graph, example):
    """torch.export with a dynamic batch, and height/width unless this torch specialises them."""
    errors = []
    for spatial in (True, False):
        shapes = _dynamic_shapes(graph, spatial)
        try:
            ep = torch.export.export(graph, example, dynamic_shapes=shapes, strict=False)
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
        prog = torch.onnx.export(graph, example, dynamo=True, dynamic_shapes=_dynamic_shapes(graph, True),
                                 input_names=list(graph.inputs), output_names=list(graph.outputs),
                                 opset_version=opset, verbose=False, optimize=True)
    return prog.model_proto, "torch.onnx (dynamo)"  # dims named after the Dims: batch, height, width


def _onnx_torchscript(graph, example, opset):
    onnx = load_extra("onnx", "ONNX export")
    buf = io.BytesIO()
    with _quiet_exporter():
        torch.onnx.export(graph, example, buf, dynamo=False, input_names=list(graph.inputs),
                          output_names=list(graph.outputs), opset_version=opset,
                          dynamic_axes={INPUT: DIMS, **dict.fromkeys(graph.outputs, DIMS)})
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
    names = lambda recs: ", ".join(f"`{r['name']}`" for r in recs)  # noqa: E731
    artifact.doc_string = (f"mrhscale {doc['target']} model: raw MRI patches {names(doc['inputs'])} (NCHW, "
                           f"{len(doc['channels'])} channels) -> raw stain units {names(doc['outputs'])} (NTHW); "
                           "see metadata_props")
    return artifact.SerializeToString()


def check_export(graph: InferenceGraph, data: bytes, fmt: str, size: int, spatial: bool) -> float:
    """Max |exported - torch| over every output on random inputs (batch 3 at the patch size,
    plus one larger tile when height/width are dynamic); an MRHError above ``TOLERANCE``,
    before anything is written."""
    run = _onnx_runner(data, graph) if fmt == "onnx" else _pt2_runner(data)
    worst, scale = 0.0, 1.0
    for n, s in ((3, size), (1, size + 4)) if spatial else ((3, size),):
        xs = graph.example(n, s, seed=n)
        with torch.inference_mode():
            refs = as_arrays(graph(*xs))
        for got, ref in zip(run(xs), refs, strict=True):
            if got.shape != ref.shape:
                raise MRHError(f"exported {fmt} graph returned shape {got.shape}, torch {ref.shape}")
            worst = max(worst, float(abs(got - ref).max()))
            scale = max(scale, float(abs(ref).max()))
    if not worst <= TOLERANCE * scale:
        raise MRHError(f"exported {fmt} graph differs from torch by {worst:.3g} "
                       f"(allowed {TOLERANCE * scale:.3g}); nothing written")
    return worst


def as_arrays(y) -> list[np.ndarray]:
    """A graph's output(s) as a list of numpy arrays."""
    return [t.numpy() for t in (y if isinstance(y, (tuple, list)) else (y,))]


def _onnx_runner(data: bytes, graph: InferenceGraph):
    ort = load_extra("onnxruntime", "checking an ONNX export")
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return lambda xs: sess.run(list(graph.outputs), {k: x.numpy() for k, x in zip(graph.inputs, xs, strict=True)})


def _pt2_runner(data: bytes):
    mod = torch.export.load(io.BytesIO(data)).module()

    def run(xs):
        with torch.inference_mode():
            return as_arrays(mod(*xs))

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
