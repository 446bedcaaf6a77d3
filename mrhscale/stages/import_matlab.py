"""import-matlab: a published MATLAB MRH-Net (DAGNetwork ``.mat``) as a model bundle.

validate (the options that need no file) -> read (``io/matlab.py``: .mat -> LayerGraph)
-> convert (``nn/matlab.py``: LayerGraph -> checked MRHNet) -> commit (``io/bundle.py``).
The file holds no channel names and no input scaling: they come from the user (or the
original's defaults), and the bundle's provenance records where each came from.
"""

from __future__ import annotations

import math
import os
import re
from datetime import UTC, datetime

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.io.bundle import save_bundle
from mrhscale.io.matlab import mat_file_facts, read_layer_graph
from mrhscale.nn.matlab import DEFAULT_CHANNELS_67, GraphMatch, layer_graph_to_model
from mrhscale.ops.layer_graph import LayerGraph, count_parameters
from mrhscale.ops.norm import Normalisation
from mrhscale.options import MatlabImportOptions
from mrhscale.results import ImportMatlabResult

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


DEFAULT_INPUT_SCALE = MatlabImportOptions.input_scale  # subject-max: as the original's MRH_testing
_DEFAULT_CHANNELS_SOURCE = "default: original MRH-Net order (dwi2000 x34, dwi5000 x30, t2, mt_off, mt_on)"

# ---------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------


def _channel_names(channels) -> tuple[list[str], str]:
    """Names from a list, a file (one per line, # comments) or a comma-separated string."""
    if not isinstance(channels, str | os.PathLike):
        return [str(n) for n in channels], "user (list)"
    text = os.fspath(channels)
    if not os.path.isfile(text):
        return [n.strip() for n in text.split(",") if n.strip()], "user (list)"
    with open(text, encoding="utf-8") as fh:
        names = [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
    return names, f"user (file {text})"


def parse_channels(channels, n_channels: int) -> tuple[list[str], str]:
    """Channel names from a list, a file (one per line) or a comma-separated string.

    Returns (names, where they came from). ``None`` gives the original's 67-channel order.
    """
    if channels is None:
        if n_channels == len(DEFAULT_CHANNELS_67):
            return list(DEFAULT_CHANNELS_67), _DEFAULT_CHANNELS_SOURCE
        raise MRHError(f"the network takes {n_channels} input channels and the .mat file holds no "
                       "channel names: give them with --channels FILE|NAMES (one per line, or "
                       "comma-separated), in the training order")
    names, source = _channel_names(channels)
    if len(names) != n_channels:
        hint = "" if len(names) > 1 or "," in str(channels) else " (a file of names must exist)"
        raise MRHError(f"--channels: {len(names)} names given, "
                       f"but the network takes {n_channels} input channels{hint}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MRHError(f"--channels: repeated names {', '.join(dup)}")
    return names, source


def _global_max(text: str) -> float:
    """VALUE of ``global-max=VALUE``."""
    m = re.fullmatch(r"\s*global-max\s*=\s*(\S+)\s*", text)
    if not m:
        raise MRHError(f"--input-scale: expected subject-max, global-max=VALUE or identity, got {text!r}")
    try:
        return float(m.group(1))
    except ValueError:
        raise MRHError(f"--input-scale: {m.group(1)!r} is not a number") from None


def parse_input_scale(
    input_scale: str | None = None, input_max: float | None = None
) -> tuple[str, float | None]:
    """(mode, global maximum or None) from ``--input-scale`` text or ``input_max``.

    The file does not hold the scaling. The default, ``subject-max``, is what the original's
    own testing did (MRH_testing: ``XTest = data./max(data(:))``, each brain divided by its own
    maximum); ``global-max=VALUE`` divides every brain by one fixed VALUE (the original's
    training maximum, when known); ``identity`` is for inputs already scaled.
    """
    if input_scale is not None and input_max is not None:
        raise MRHError("give the input scaling once: --input-scale global-max=VALUE or input_max, not both")
    if input_max is not None:
        v = float(input_max)
    elif input_scale is None or input_scale.strip() in ("subject-max", "identity"):
        return (input_scale or DEFAULT_INPUT_SCALE).strip(), None
    else:
        v = _global_max(input_scale)
    if not math.isfinite(v) or v <= 0:
        raise MRHError(f"--input-scale: the global maximum must be a positive number, got {v}")
    return "global-max", v


def infer_target(path: str) -> str | None:
    """Stain from the file name (``..._Fluo.mat`` -> af); None unless exactly one is named."""
    tokens = re.split(r"[^A-Za-z0-9]+|_", os.path.splitext(os.path.basename(path))[0])
    found = {_TARGET_TOKENS[t.lower()] for t in tokens if t.lower() in _TARGET_TOKENS}
    return found.pop() if len(found) == 1 else None


def _resolve_target(mat: str, target: str | None) -> tuple[str, str]:
    """(target, where it came from): the user's, else the file name's."""
    target_source = "user"
    if target is None:
        target, target_source = infer_target(mat), "file name"
        if target is None:
            raise MRHError(f"{mat}: cannot tell the stain from the file name; give --target (e.g. af, nf, mbp)")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", target):
        raise MRHError(f"--target: {target!r} is not a valid variable name")
    return target, target_source


def _check_options(mat: str, out, target, target_max, patch_axis) -> tuple[str, str]:
    """The options that need no file, checked before it is read; returns the target and its source."""
    if not (isinstance(target_max, int | float) and math.isfinite(target_max) and target_max > 0):
        raise MRHError(f"--target-max: must be a positive number, got {target_max}")
    if patch_axis not in ("x", "y", "z"):
        raise MRHError(f"--patch-axis: must be x, y or z, got {patch_axis!r}")
    target, target_source = _resolve_target(mat, target)
    if os.path.isfile(out) and os.path.isfile(mat) and os.path.samefile(out, mat):
        raise MRHError(f"--out {out}: would overwrite the .mat file being imported")
    return target, target_source


# ---------------------------------------------------------------------------
# convert and commit
# ---------------------------------------------------------------------------


def _convert(mat: str, graph: LayerGraph, strict_names: bool, stain: str):
    """(model, GraphMatch, parameters); every value of the file must land in the model."""
    try:
        model, match = layer_graph_to_model(graph, strict_names=strict_names, stain=stain)
    except MRHError as e:
        raise MRHError(f"{mat}: not the MRH-Net graph: {e}") from None
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != count_parameters(graph):
        raise MRHError(f"{mat}: {count_parameters(graph)} values in the file, {n_params} in the model")
    return model, match, n_params


# How each input scaling reproduces the original, in the bundle's normalisation record.
_NORM_NOTES = {
    "subject-max": "MATLAB network: each brain divided by its own maximum, as the original's testing "
                   "(MRH_testing: XTest = data./max(data(:)))",
    "global-max": "MATLAB network: inputs / one global maximum, as the original's training",
    "identity": "MATLAB network: inputs taken as already scaled",
}


def _import_norm(mode: str, value, in_channels: int, target_max: float) -> Normalisation:
    """The original's scaling as the bundle's normalisation: each brain's own maximum,
    one global maximum, or none."""
    if mode == "subject-max":
        nrm = Normalisation.subject_mode(mode, in_channels, 0.0, float(target_max))
    elif mode == "global-max":
        nrm = Normalisation.global_max(in_channels, value, float(target_max))
    else:
        nrm = Normalisation("identity", [0.0] * in_channels, [1.0] * in_channels, 0.0, float(target_max))
    nrm.meta.update({"source": "MATLAB import", "note": _NORM_NOTES[mode]})
    return nrm


def _norm_from(mode: str, value) -> str:
    """Where the input scaling came from: the default (MRH_testing's), or the user."""
    who = "default: as the original's MRH_testing" if mode == DEFAULT_INPUT_SCALE else "user"
    return f"{who} ({mode}{'' if value is None else f'={value:g}'})"


def _import_provenance(mat: str, graph: LayerGraph, match: GraphMatch, n_params: int) -> dict:
    return {
        "stage": "import-matlab", "mrhscale_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {**mat_file_facts(mat), "variable": graph.meta.get("variable"),
                   "reader": graph.meta.get("reader")},
        "matlab_layers": [lay.name for lay in graph.layers], "layer_roles": match.roles,
        "renamed_layers": match.renamed, "kinds_from": graph.meta.get("kinds_from"),
        "depth": match.depth, "parameters": n_params,
    }


def import_matlab(
    mat: str | os.PathLike,
    out: str | os.PathLike,
    *,
    channels=None,
    input_scale: str | None = None,
    input_max: float | None = None,
    target_max: float = MatlabImportOptions.target_max,
    target: str | None = None,
    patch_axis: str = MatlabImportOptions.patch_axis,
    strict_names: bool = True,
) -> ImportMatlabResult:
    """Convert a MATLAB MRH-Net (.mat) into an mrhscale model bundle at ``out``.

    channels: names in the training order (list, file or comma-separated); default the
        original's 67-channel order when the network takes 67.
    input_scale / input_max: default ``subject-max``, each brain divided by its own maximum
        (the original's testing, MRH_testing); ``input_scale="global-max=VALUE"`` or
        ``input_max=VALUE`` divide by one fixed maximum (the original's training), and
        ``input_scale="identity"`` takes inputs as already scaled. The bundle's
        normalisation reproduces the choice.
    target_max: the original divided labels by their global maximum; outputs times
        ``target_max`` are raw stain units (default 1: the network's own units).
    target: stain name; default inferred from the file name (Fluo/AF, NF, MBP, Nissl).
    strict_names: False accepts MRH-Net's structure under other layer names.
    """
    mat = os.fspath(mat)
    # cheap option checks first, so a bad option does not wait for the file
    mode, value = parse_input_scale(input_scale, input_max)
    target, target_source = _check_options(mat, out, target, target_max, patch_axis)
    graph = read_layer_graph(mat)
    model, match, n_params = _convert(mat, graph, strict_names, target)
    names, channels_source = parse_channels(channels, match.in_channels)
    provenance = {**_import_provenance(mat, graph, match, n_params), "channels_from": channels_source,
                  "norm_from": _norm_from(mode, value),
                  "target_max": float(target_max), "target_from": target_source, "patch_axis": patch_axis}
    patch = {"half": (match.patch_size - 1) // 2, "size": match.patch_size, "axis": patch_axis}
    nrm = _import_norm(mode, value, match.in_channels, target_max)
    written = save_bundle(out, model, channels=names, norm=nrm, patch=patch, provenance=provenance)
    return ImportMatlabResult(
        out=written, depth=match.depth, in_channels=match.in_channels,
        channels_from=channels_source, parameters=n_params, target=target,
        target_from=target_source, input_scale=nrm.mode, input_max=value,
        renamed_layers=match.renamed, source=mat, reader=graph.meta.get("reader"),
        layers=len(graph.layers), width=match.width, target_max=float(target_max),
    )
