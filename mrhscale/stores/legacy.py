"""What earlier versions wrote, read as today's: the one place that knows one stain was
once a special case.

Before stains were always a list (issue 27), a one-stain record (patch store attrs,
model bundle, prediction attrs) named its stain only in ``target``, a one-stain patch
store's ``targets`` had no stain axis (``[N, P, P]``), and a one-stain network kept the
MATLAB graph's ``conv4``/``conv5`` at its top level. Everything else in mrhscale sees
``stains``, ``[N, T, P, P]`` and one head per stain (``heads.k``); older stores and
bundles stay readable, unchanged on disk.
"""

from __future__ import annotations

import numpy as np
from zarr.core.buffer.cpu import NDBuffer

from mrhscale.ops.stains import parse_stains

ONE_HEAD = ("conv4.", "conv5.")  # a one-stain network's head before heads were a list


def stains_of(record: dict) -> list[str]:
    """The stains a record (patch store attrs, bundle metadata, prediction attrs) is of."""
    return [str(s) for s in record.get("stains") or parse_stains(str(record["target"]))]


def head_state(state: dict) -> dict:
    """A network's weights with its head under ``heads.0``, as :class:`~mrhscale.nn.model.MRHNet`
    names it (an older bundle or a MATLAB import names it ``conv4``/``conv5``)."""
    return {(f"heads.0.{k}" if k.startswith(ONE_HEAD) else k): v for k, v in state.items()}


def with_stain_axis(targets):
    """A patch store's ``targets`` array with its stain axis: ``[N, 1, P, P]`` for an
    older one-stain store's ``[N, P, P]``, the array itself otherwise."""
    return targets if targets.ndim == 4 else _StainAxis(targets)


class _StainAxis:
    """A read-only ``[N, P, P]`` zarr array seen as ``[N, 1, P, P]`` (the reads the stream
    and importance make: ``get_basic_selection`` into a buffer, rows by index, slices)."""

    def __init__(self, arr):
        self.arr, self.dtype, self.ndim = arr, arr.dtype, 4
        self.shape = (arr.shape[0], 1, *arr.shape[1:])
        self.chunks = (arr.chunks[0], 1, *arr.chunks[1:])

    def get_basic_selection(self, rows: slice, out=None):
        if out is None:
            return self.arr.get_basic_selection(rows)[:, None]
        view = out.as_numpy_array()
        self.arr.get_basic_selection(rows, out=NDBuffer.from_numpy_array(view.reshape(view.shape[0], *self.shape[2:])))
        return view

    def get_orthogonal_selection(self, selection):
        return np.asarray(self.arr.get_orthogonal_selection(selection))[:, None]

    def __getitem__(self, key):
        rows = key[0] if isinstance(key, tuple) else key
        rest = key[1:] if isinstance(key, tuple) else ()
        return np.asarray(self.arr[rows])[:, None][(slice(None), *rest)]


def calibration_of(meta: dict, stains: list[str]) -> dict[str, dict]:
    """An ensemble's calibration of each stain (its ``uncertainty.calibration``, or a
    prediction store's ``model`` record of it); an older one-stain record is flat."""
    cal = (meta.get("uncertainty") or {}).get("calibration") or {}
    if "stains" in cal:
        return {t: dict(c) for t, c in cal["stains"].items()}
    return {stains[0]: dict(cal)} if cal.get("fitted_on") else {}
