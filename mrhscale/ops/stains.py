"""Stain names: what one network learns. A network may learn several stains at once
(``--target nf,mbp``): one backbone, one head per stain (docs/training.md, "Several stains").

Stains are always a list: every record that names what was learned (patch store attrs,
model bundle, prediction store) carries ``stains`` (the network's output order; one stain
is a list of one) and every array of them a stain axis. ``target``, their comma-joined
name, stays in records as a label for people. Records and arrays made before this
(one stain, no ``stains``, no stain axis) are read through ``stores/legacy.py``.
"""

from __future__ import annotations

import re

from mrhscale.errors import MRHError

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def parse_stains(spec) -> list[str]:
    """``"nf,mbp"`` or ``["nf", "mbp"]`` -> ["nf", "mbp"]; one line on a bad list."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    names = [str(s).strip() for s in items if str(s).strip()]
    if not names:
        raise MRHError(f"--target: no stain named in {spec!r}")
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise MRHError(f"--target: {', '.join(map(repr, bad))} is not a stain name (letters, digits, _ and -)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MRHError(f"--target: {', '.join(dup)} named twice")
    return names


def target_name(stains: list[str]) -> str:
    """The ``target`` a record of ``stains`` carries: the stain, or the comma-joined list."""
    return ",".join(stains)


def stain_record(stains: list[str]) -> dict:
    """``stains`` and their ``target`` label, for a record's attrs."""
    return {"target": target_name(stains), "stains": list(stains)}
