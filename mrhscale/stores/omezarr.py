"""OME-Zarr images for viewers: one volume as an OME-NGFF 0.5 multiscale image (Zarr v3).

The image's root attrs hold the NGFF metadata under ``ome`` (written by
ome-zarr-py) and ours beside it under ``mrhscale``, so neither clashes with the
other: ``format`` (ownership: an image is replaced only if it says it is ours),
``made_by`` and ``fingerprint`` (identity: reused only on a match), the source
record, and ``complete`` (set last). An image is always built aside and swapped
in whole, so a viewer never opens half an image and a failure leaves the old one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt

import zarr

from mrhscale import __version__
from mrhscale.stores.base import (
    NAMES,
    aside,
    check_output,
    explain_mismatch,
    fingerprint,
    quiet_zarr,
    recover,
    remove,
    swap_in,
)
from mrhscale.stores.locks import Claim, run_token
from mrhscale.stores.urls import Location

FORMAT = "mrhscale-ome-zarr"
KEY = "mrhscale"  # our attrs, beside NGFF's "ome"


class ImageBuild:
    """An image being built beside its final place; ``group()`` is what the writer fills."""

    def __init__(self, loc: Location, final: Location):
        self.loc, self.final = loc, final
        self.url = loc.url

    def group(self, mode: str = "r+"):
        with quiet_zarr():
            return zarr.open_group(self.url, mode=mode, storage_options=self.loc.options, zarr_format=3)

    def _mark(self, record: dict) -> None:
        g = self.group()
        g.attrs[KEY] = {**dict(g.attrs.get(KEY) or {}), **record}


def own_attrs(loc: Location | str, what: str = "--out") -> dict:
    """Our record of the image at ``loc`` (``{}``: nothing there); refuses anything else there."""
    found = check_output(loc, FORMAT, what)
    return dict((found.attrs or {}).get(KEY) or {})


@contextlib.contextmanager
def build(loc: Location, made_by: dict, record: dict | None = None, *, overwrite: bool = False,
          refresh: bool = False, what: str = "--out"):
    """Claim the image at ``loc``; yield an ``ImageBuild`` to fill, or None to reuse it.

    None: a complete image with the same ``made_by`` is there (and not ``overwrite``).
    One made from something else is refused unless ``overwrite`` or ``refresh``
    (refresh: rebuild own images only when stale, as predict's sidecars). Anything
    there that mrhscale did not make is refused untouched.
    """
    loc = Location.of(loc, what=what)
    check_output(loc, FORMAT, what)
    with Claim(loc.claim_place(), f"{NAMES[FORMAT]} {loc.masked}"):
        recover(loc, complete=lambda aside: bool(_own(aside).get("complete")))
        if _reusable(loc, made_by, overwrite, refresh, what):
            yield None
            return
        b = ImageBuild(aside(loc, "new", run_token()), loc)
        b.group(mode="w").attrs[KEY] = _record(made_by, record)
        try:
            yield b
            b._mark({"complete": True})
        except BaseException:
            with contextlib.suppress(Exception):
                remove(b.loc)
            raise
        swap_in(b.loc, loc, token=run_token())


def _own(loc: Location) -> dict:
    try:
        return own_attrs(loc)
    except Exception:
        return {}


def _reusable(loc: Location, made_by: dict, overwrite: bool, refresh: bool, what: str) -> bool:
    """Whether the image there is this one; raises when it is another and may not be replaced."""
    own = own_attrs(loc, what)
    if not own.get("complete") or overwrite:
        return False
    if own.get("fingerprint") == fingerprint(made_by):
        return True
    if refresh:
        return False
    raise explain_mismatch(f"{what} {loc.masked}: an OME-Zarr image", own.get("made_by") or {}, made_by,
                           f"pass --overwrite to replace it or choose another {what}")


def _record(made_by: dict, record: dict | None) -> dict:
    return {**(record or {}), "format": FORMAT, "format_version": 1, "mrhscale_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "made_by": made_by, "fingerprint": fingerprint(made_by), "complete": False}


def describe(loc: Location | str) -> str:
    """Human summary of an image (``mrhscale info X.ome.zarr``)."""
    loc = Location.of(loc)
    with quiet_zarr():
        attrs = dict(zarr.open_group(loc.url, mode="r", storage_options=loc.options, zarr_format=3).attrs)
    own, ms = attrs.get(KEY) or {}, ((attrs.get("ome") or {}).get("multiscales") or [{}])[0]
    src = own.get("source") or {}
    scales = [next((t["scale"] for t in d.get("coordinateTransformations", []) if t.get("type") == "scale"), None)
              for d in ms.get("datasets", [])]
    return "\n".join([
        f"OME-Zarr image: {loc.masked}",
        f"format: {FORMAT} (OME-NGFF {(attrs.get('ome') or {}).get('version')})",
        f"volume: {own.get('made_by', {}).get('var')}"
        + (f" [{own['made_by']['contrast']}]" if own.get("made_by", {}).get("contrast") else "")
        + f" of subject {src.get('subject')} in {src.get('store')}",
        f"axes: {', '.join(a.get('name', '?') for a in ms.get('axes', []))}; levels: {len(scales)}",
        *(f"  level {i}: scale {s}" for i, s in enumerate(scales)),
        f"complete: {bool(own.get('complete'))}",
    ])
