"""One config per run: ``--config FILE.yaml`` supplies a command's options.

Keys are the command's option names (``batch_size`` or ``batch-size``);
flags given on the command line override the file. After a successful run
the full resolved configuration is written beside the output, so any stage
can be rerun exactly (``mrhscale <cmd> --config <out>/mrhscale-<cmd>.yaml``; a Zarr store
keeps it in its ``_config`` group's attrs: ``mrhscale <cmd> --config STORE``).
"""

from __future__ import annotations

import datetime as _dt
import difflib
import os

import yaml

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.stores import config_file, is_local, local_path, mask_options, write_text
from mrhscale.stores.base import is_store, save_config, store_config

META_KEYS = ("command", "mrhscale_version", "written")


def load_config(path: str, command: str, allowed: dict[str, str],
                stages: dict[str, dict[str, str]] | None = None) -> dict:
    """Read a YAML mapping and map its keys to parameter names of ``command``.

    ``allowed`` maps accepted spellings (option name with dashes, param name) to
    the param name. A file may hold the options at top level or, as a recipe
    for a whole pipeline, one block per command (``stages`` maps each command to
    its own ``allowed``); a recipe without a block for ``command`` gives it no
    options. Every block and key is checked: a misspelt one is an error naming
    the nearest known name, never silently ignored.
    """
    doc = _read_mapping(path)
    stages = stages or {}
    if any(str(k) in stages and isinstance(v, dict) for k, v in doc.items()):
        for block, body in doc.items():
            if str(block) not in stages or not isinstance(body, dict):
                raise MRHError(f"--config {path}: unknown block {block!r}{_nearest(block, stages)} "
                               f"(a recipe holds one block per command: {', '.join(sorted(stages))})")
            _check_keys(path, str(block), body, stages[str(block)])
        doc = doc.get(command) or {}
    _check_keys(path, command, doc, allowed)
    return {allowed[str(k)]: v for k, v in doc.items()}


def _read_mapping(path: str) -> dict:
    if os.path.isdir(path) and is_store(path):
        return _store_mapping(path)
    if not os.path.isfile(path):
        raise MRHError(f"--config {path}: file not found")
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh) or {}
    except yaml.YAMLError as e:
        raise MRHError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise MRHError(f"--config {path}: expected a mapping of option names to values")
    return {k: v for k, v in doc.items() if k not in META_KEYS}


def _store_mapping(path: str) -> dict:
    """The resolved configs a Zarr store keeps, one block per command that wrote it."""
    blocks = {str(k): {n: v for n, v in d.items() if n not in META_KEYS}
              for k, d in store_config(path).items() if isinstance(d, dict)}
    if not blocks:
        raise MRHError(f"--config {path}: a Zarr store that keeps no resolved config")
    return blocks


def _check_keys(path: str, command: str, doc: dict, allowed: dict[str, str]) -> None:
    unknown = [k for k in doc if str(k) not in allowed and str(k) not in META_KEYS]
    if unknown:
        names = sorted({v.replace("_", "-") for v in allowed.values()})
        hint = _nearest(unknown[0], allowed)
        raise MRHError(f"--config {path}: unknown option(s) for `{command}`: "
                       f"{', '.join(map(str, unknown))}{hint} (known: {', '.join(names)})")


def _nearest(name, known) -> str:
    best = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {best[0]!r}?)" if best else ""


def _plain(v):
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def resolved_config(command: str, params: dict) -> dict:
    doc = {k: _plain(mask_options(v) if k == "storage_options" else v)
           for k, v in params.items() if k != "config"}
    return {
        "command": command,
        "mrhscale_version": __version__,
        "written": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **doc,
    }


def config_path_for(out: str, command: str) -> str | None:
    """Where the resolved config goes: inside an output folder, or beside an output file (a
    Zarr store keeps it in its ``_config`` group's attrs: ``write_resolved``)."""

    if not is_local(out):
        return None
    p = local_path(out)
    if os.path.isdir(p) and is_store(p):
        return os.path.join(p, "_config")
    if os.path.isdir(p):
        return config_file(p, command)
    if os.path.isfile(p):
        return f"{p}.{command}.yaml"
    return None


def write_resolved(out: str, command: str, params: dict) -> str | None:
    path = config_path_for(out, command)
    if path is None:
        return None
    if is_store(local_path(out)):
        return save_config(local_path(out), command, resolved_config(command, params))
    return write_text(path, yaml.safe_dump(resolved_config(command, params), sort_keys=False))
