"""Click options made from the options table (``mrhscale.options``), and the Context options.

A command lists the option dataclasses it takes; each field becomes one click option
with the table's type, default, choices and help, and ``take`` turns the parsed values
back into the dataclass. Old spellings (``renamed``) are hidden options that fail with
one line naming the new one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click
import yaml

from mrhscale.errors import MRHError
from mrhscale.options import option_fields
from mrhscale.parallel.context import Context

CONTEXT_KEYS = ("storage_options", "scheduler", "dask_workers", "device", "quiet")


def ints(text, n: int, what: str) -> tuple[int, ...]:
    """'64,32,64' (or a sequence, from --config) as n positive integers."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        vals = tuple(int(v) for v in parts)
    except (TypeError, ValueError):
        raise MRHError(f"{what}: expected {n} comma-separated integers, got {text!r}") from None
    if len(vals) != n or any(v <= 0 for v in vals):
        raise MRHError(f"{what}: expected {n} positive comma-separated integers, got {text!r}")
    return vals


def subject_list(values) -> list[str] | None:
    """--subjects a,b --subjects c (repeats dropped, order kept); None when none given."""
    values = (values,) if isinstance(values, str) else values or ()
    out = list(dict.fromkeys(s.strip() for v in values for s in str(v).split(",") if s.strip()))
    return out or None


def _kind(f: dataclasses.Field) -> str:
    """'bool', 'int', 'float', 'ints' (a tuple of ints), 'many' (names: repeat or comma-separate) or 'str'."""
    t = str(f.type)
    for name in ("bool", "tuple[int", "tuple[str", "list[str", "int", "float"):
        if t.startswith(name):
            return {"tuple[int": "ints", "tuple[str": "many", "list[str": "many"}.get(name, name)
    return "str"


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


class OneOf(click.Choice):
    """A choice whose wrong value is the library's one-line error (``--opt 'x': choose one of ...``)."""

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        raise MRHError(f"{param.opts[0] if param else 'value'} {value!r}: choose one of {', '.join(self.choices)}")


def field_option(f: dataclasses.Field, default=dataclasses.MISSING) -> click.Option:
    """The click option of one options-table field (``default`` overrides the table's)."""
    meta, kind = f.metadata, _kind(f)
    value = _default(f) if default is dataclasses.MISSING else default
    names = [meta.get("flag") or "--" + f.name.replace("_", "-")] + ([meta["short"]] if meta.get("short") else [])
    kw: dict[str, Any] = {"help": meta.get("help", ""), "metavar": meta.get("metavar")}
    if kind == "bool":
        kw.update(is_flag=True, default=value)
    elif kind == "ints":
        kw.update(default=",".join(map(str, value)) if value else None, show_default=value is not None)
    elif kind == "many":
        kw.update(multiple=True)
    else:
        typ = OneOf(meta["choices"]) if meta.get("choices") else {"int": int, "float": float}.get(kind, str)
        kw.update(type=typ, default=value, show_default=value is not None)
    return click.Option([*names, f.name], **kw)


def renamed_option(old: str, new: str, *, flag: bool = False) -> click.Option:
    """A hidden option for an old spelling (a flag, or one taking a value): using it is a
    one-line error naming the new one."""

    def refuse(_ctx, _param, value):
        if value not in (None, (), False):
            given = "" if isinstance(value, bool) else f" {value}"
            raise MRHError(f"{old} was renamed {new}; use {new}{given}")

    kind = {"is_flag": True, "default": False} if flag else {"type": click.UNPROCESSED, "default": None}
    return click.Option([old], hidden=True, expose_value=False, callback=refuse, **kind)


def renamed(old: str, new: str, *, flag: bool = False):
    """A decorator adding the old spelling of one of the command's options (see renamed_option)."""

    def add(fn):
        fn.__click_params__ = [*getattr(fn, "__click_params__", []), renamed_option(old, new, flag=flag)]
        return fn
    return add


def with_options(*classes, exclude: tuple[str, ...] = (), defaults: dict | None = None):
    """A decorator adding every CLI field of ``classes`` (with its renamed spellings) to a command."""

    def add(fn):
        params = getattr(fn, "__click_params__", [])
        for cls in classes:
            for f in reversed(option_fields(cls)):
                if f.name in exclude:
                    continue
                params.append(field_option(f, (defaults or {}).get(f.name, dataclasses.MISSING)))
                new = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
                params.extend(renamed_option(old, new.split("/")[0]) for old in f.metadata.get("renamed", ()))
        fn.__click_params__ = params
        return fn

    return add


def take(cls, kw: dict, **extra):
    """``cls`` built from (and popped off) the parsed values ``kw``; ``extra`` sets other fields."""
    values = {}
    for f in option_fields(cls):
        if f.name in kw:
            values[f.name] = _parsed(f, kw.pop(f.name))
    return cls(**values, **extra)


def _parsed(f: dataclasses.Field, value):
    kind = _kind(f)
    if kind == "ints" and value is not None:
        n = str(f.type).count("int")
        return ints(value, n, f.metadata.get("flag") or "--" + f.name.replace("_", "-"))
    if kind == "many":
        return subject_list(value) or []
    return value


def context_options(*, storage: bool = False, dask: bool = False, device: str | None = None):
    """The Context options a command takes: --storage-options, --scheduler/--dask-workers
    (old --workers refused), --device, and always --quiet."""
    opts = [click.Option(["--quiet", "-q", "quiet"], is_flag=True, help="No progress output.")]
    if storage:
        opts.append(click.Option(
            ["--storage-options", "storage_options"], default=None, metavar="JSON", type=click.UNPROCESSED,
            help="fsspec options for URL stores (s3://...), a JSON/YAML mapping, e.g. "
                 "'{\"endpoint_url\": \"http://127.0.0.1:9000\", \"key\": \"...\", \"secret\": \"...\"}'; a "
                 "mapping in --config. Local paths ignore it. Credentials and endpoint can instead come from the "
                 "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE)."))
    if dask:
        opts += [
            click.Option(["--scheduler", "scheduler"], default=None, metavar="ADDRESS",
                         help="Join an existing Dask scheduler (tcp://host:8786); default: an embedded "
                              "LocalCluster."),
            click.Option(["--dask-workers", "dask_workers"], type=int, default=None,
                         help="Worker processes of the embedded LocalCluster (default: one per core; predict: "
                              "one process with a thread per core)."),
            renamed_option("--workers", "--dask-workers"),
        ]
    if device is not None:
        opts.append(click.Option(["--device", "device"], default=device, show_default=True,
                                 help="cpu, cuda or cuda:N (on the workers)."))

    def add(fn):
        fn.__click_params__ = getattr(fn, "__click_params__", []) + list(reversed(opts))
        return fn

    return add


def context_from(kw: dict) -> Context:
    """The Context of a command from (and popped off) its parsed values."""
    values = {k: kw.pop(k) for k in CONTEXT_KEYS if k in kw}
    values["storage_options"] = storage_options(values.get("storage_options"))
    if values.get("device") is None:
        values.pop("device", None)
    return Context(**values)


def storage_options(value) -> dict | None:
    """--storage-options as a dict: JSON or YAML text, or a mapping already (from --config)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    doc = value
    if not isinstance(value, dict):
        try:
            doc = yaml.safe_load(str(value))  # JSON is YAML
        except yaml.YAMLError as e:
            raise MRHError(f"--storage-options: not valid JSON/YAML ({str(e).splitlines()[0]}); "
                           "expected a mapping like '{\"endpoint_url\": \"http://host:9000\"}'") from None
    if not isinstance(doc, dict):
        raise MRHError(f"--storage-options: expected a JSON/YAML mapping of fsspec options, got {value!r}")
    return {str(k): v for k, v in doc.items()} or None
