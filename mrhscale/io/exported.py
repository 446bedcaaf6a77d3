"""Exported models (``mrhscale export``) read back: their record, and an ONNX export as a
predictor with the metadata a bundle gives (``io.bundle.load_model``), so ``predict`` and
``predict_volume`` run the exported file itself.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from mrhscale._optional import load as load_extra
from mrhscale.errors import MRHError
from mrhscale.nn.onnx import OnnxNetwork
from mrhscale.ops.norm import SUBJECT_MODES, Normalisation

FORMAT = "mrhscale-export"
META_FILE = "mrhscale.json"  # pt2 extra file, and the ONNX metadata key, holding the whole record
STATISTICS = ("offset", "scale")  # a per-subject graph's inputs beside the patches: the brain's own


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


def export_meta(doc: dict, path: str) -> dict:
    """An ONNX export's record as ``load_model``'s metadata (plus ``exported``: its graph's
    input and output names); a pt2 export or a record of before format 3 is refused."""
    if doc.get("export_format") != "onnx":
        raise MRHError(f"{path}: a {doc.get('export_format')} export; predict runs model bundles and "
                       "ONNX exports (export the bundle with --format onnx)")
    if int(doc.get("format_version", 0)) < 3:
        raise MRHError(f"{path}: an export of an earlier mrhscale (format {doc.get('format_version')}); "
                       "export the bundle again to predict with it")
    meta = {k: doc[k] for k in ("target", "stains", "channels", "patch", "arch", "uncertainty", "ood") if k in doc}
    meta.update(norm=Normalisation.from_dict(doc["normalisation"]), members=int(doc.get("members", 1)),
                provenance={"exported_from": doc.get("model", {})},
                exported={"inputs": [i["name"] for i in doc["inputs"]],
                          "outputs": [o["name"] for o in doc["outputs"]]})
    return meta


def exported_meta(path: str) -> dict | None:
    """``export_meta`` of the export at ``path``, or None where ``path`` is not an export."""
    doc = read_export_metadata(path) if os.path.isfile(path) else None
    return None if doc is None else export_meta(doc, path)


def load_export(path: str, device=None, ensemble: bool = True) -> tuple[OnnxNetwork, dict]:
    """An ONNX export as predict runs it (``nn.worker.NetworkSpec.load``): its graph in an
    onnxruntime session on the CPU (``device`` ignored; ``ensemble``: the graph is whole
    already), and its metadata."""
    meta = exported_meta(path)
    if meta is None:
        raise MRHError(f"{path}: not an mrhscale export")
    return OnnxNetwork(path, meta["exported"]["outputs"]), meta


def graph_feeds(norm: Normalisation) -> dict | None:
    """The per-subject graph's ``offset``/``scale`` inputs of one brain: its own statistics,
    as ``Normalisation.for_subject`` recorded them (None for a globally normalised model)."""
    got = norm.meta.get("subject")
    if norm.mode not in SUBJECT_MODES or not got:
        return None
    return {k: np.asarray(got[k], np.float32) for k in STATISTICS}
