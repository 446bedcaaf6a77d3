"""Outputs that are folders of files: training runs, reports, registrations, synthetic cohorts.

A folder is ours when it holds ``mrhscale.json`` with its ``format`` (written
when the folder is made). An existing folder without it (the user's files, a
store of another kind) is never written into or replaced. ``replace()`` builds
the new contents beside the folder and swaps them in when complete.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os

from mrhscale.errors import MRHError
from mrhscale.stores.base import (
    MARKER,
    NAMES,
    aside_url,
    check_output,
    recover,
    remove,
    swap_in,
    write_json,
)
from mrhscale.stores.locks import Claim, run_token
from mrhscale.stores.urls import is_local, resolve


class Folder:
    """A local output folder of one kind (``fmt``, e.g. ``mrhscale-run``)."""

    def __init__(self, path, fmt: str, what: str = "--out"):
        if fmt not in NAMES:
            raise ValueError(fmt)
        self.path = resolve(path, what)
        if not is_local(self.path):
            raise MRHError(f"{what} {path}: a {NAMES[fmt]} must be a local folder, not a URL")
        self.fmt, self.what = fmt, what

    @property
    def kind(self) -> str:
        return NAMES[self.fmt]

    def check(self) -> bool:
        """Refuse anything but an empty place or a folder of this kind; True if one is there."""
        return not check_output(self.path, self.fmt, self.what).absent

    def info(self) -> dict:
        try:
            with open(os.path.join(self.path, MARKER)) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}

    def mark(self, folder: str | None = None, **info) -> None:
        """Make (or update) the marker that says this folder is ours."""
        folder = folder or self.path
        os.makedirs(folder, exist_ok=True)
        doc = {**(self.info() if folder == self.path else {}), **info, "format": self.fmt}
        doc.setdefault("created", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        write_json(os.path.join(folder, MARKER), doc)

    def claim(self) -> Claim:
        """One writer per folder (a second run on the same --out is refused)."""
        parent, name = os.path.split(self.path)
        return Claim(os.path.join(parent, f".{name}.lock"), f"{self.kind} {self.path}")

    @contextlib.contextmanager
    def replace(self, **info):
        """Yield an empty folder to fill; it replaces this one only when the block completes."""
        self.check()
        with self.claim():
            recover(self.path)
            new = aside_url(self.path, "new", run_token())
            os.makedirs(new)
            self.mark(new, **info)
            try:
                yield new
            except BaseException:

                remove(new)
                raise
            swap_in(new, self.path, token=run_token())

    def create(self, **info) -> None:
        """Make the folder (refusing a foreign one) and mark it as ours."""
        self.check()
        self.mark(**info)
