"""One config per run: ``--config FILE.yaml`` supplies a command's options.

Keys are the command's option names (``batch_size`` or ``batch-size``);
flags given on the command line override the file. After a successful run
the full resolved configuration is written beside the output, so any stage
can be rerun exactly (``mrhscale <cmd> --config <out>/mrhscale-<cmd>.yaml``).
"""

from __future__ import annotations

import datetime as _dt
import os

import yaml

from mrhscale.errors import MRHError


def load_config(path: str, command: str, allowed: dict[str, str], stages: set[str] | frozenset = frozenset()) -> dict:
    """Read a YAML mapping and map its keys to parameter names of ``command``.

    ``allowed`` maps accepted spellings (option name with dashes, param name) to
    the param name. A file may hold the options at top level or, as a recipe
    for a whole pipeline, in one block per command (``stages`` names them); a
    recipe without a block for ``command`` gives it no options.
    """
    if not os.path.isfile(path):
        raise MRHError(f"--config {path}: file not found")
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh) or {}
    except yaml.YAMLError as e:
        raise MRHError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise MRHError(f"--config {path}: expected a mapping of option names to values")
    if isinstance(doc.get(command), dict):
        doc = doc[command]
    elif any(isinstance(doc.get(s), dict) for s in stages):
        doc = {}
    doc = {k: v for k, v in doc.items() if k not in ("command", "mrhscale_version", "written")}
    unknown = [k for k in doc if str(k) not in allowed]
    if unknown:
        names = sorted({v.replace("_", "-") for v in allowed.values()})
        raise MRHError(
            f"--config {path}: unknown option(s) for `{command}`: {', '.join(map(str, unknown))} "
            f"(known: {', '.join(names)})"
        )
    return {allowed[str(k)]: v for k, v in doc.items()}


def _plain(v):
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


_SECRET = ("key", "secret", "token", "password", "credential")


def _redact(v):
    """Credentials never land on disk: secret-looking entries of storage options are masked."""
    if isinstance(v, dict):
        return {k: ("***" if any(w in str(k).lower() for w in _SECRET) else _redact(x)) for k, x in v.items()}
    if isinstance(v, str) and v.lstrip().startswith("{"):
        try:
            return _redact(yaml.safe_load(v))
        except yaml.YAMLError:
            return "***"
    return v


def resolved_config(command: str, params: dict) -> dict:
    from mrhscale import __version__

    doc = {k: _plain(_redact(v) if k == "storage_options" else v) for k, v in params.items() if k != "config"}
    return {
        "command": command,
        "mrhscale_version": __version__,
        "written": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **doc,
    }


def config_path_for(out: str, command: str) -> str | None:
    """Where the resolved config goes: inside an output folder, or beside an output file."""
    from mrhscale.store import is_local, local_path

    if not is_local(out):
        return None
    p = local_path(out)
    if os.path.isdir(p):
        return os.path.join(p, f"mrhscale-{command}.yaml")
    if os.path.isfile(p):
        return f"{p}.{command}.yaml"
    return None


def write_resolved(out: str, command: str, params: dict) -> str | None:
    path = config_path_for(out, command)
    if path is None:
        return None
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        yaml.safe_dump(resolved_config(command, params), fh, sort_keys=False)
    os.replace(tmp, path)
    return path
