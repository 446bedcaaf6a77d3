"""The patch store: training samples of one stain (or several), globally shuffled (docs/stores.md).

``PatchStore.open`` is the one way to read a patch store (trainer, PatchStream,
importance); ``PatchStore.build`` the one way to write one: a new store is built
in place, a complete one being replaced is rebuilt beside it and swapped in
only when complete, and an identical rerun reuses what is there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import zarr
from zarr.codecs import BloscCodec

from mrhscale.errors import MRHError
from mrhscale.stores.base import (
    ZarrLocation,
    aside,
    check_input,
    check_output,
    explain_mismatch,
    fingerprint,
    kill_point,
    quiet_zarr,
    recover,
    remove,
    swap_in,
)
from mrhscale.stores.cohort import short
from mrhscale.stores.legacy import stains_of, with_stain_axis
from mrhscale.stores.locks import Claim, run_token
from mrhscale.stores.urls import Location

FORMAT = "mrhscale-patches"
STAGING = "_staging"
DIMS = {
    "inputs": ["patch", "contrast", "row", "col"],
    "targets": ["patch", "stain", "row", "col"],
    "origin": ["patch", "coord"],
}
REQUIRED = ("channels", "target", "patch", "norm")  # "target": older stores name their stain only there


def dims_of(var: str) -> list[str]:
    """An array's dimension names (``targets`` has a stain axis, of length 1 for one stain)."""
    return DIMS[var]


def create_array(loc: Location, path: str, shape, chunks, dtype, dims, compress: bool):
    """A new (or replaced) zarr array inside a patch store being built."""

    comp = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),) if compress else None
    return zarr.create_array(
        loc.url, name=path, shape=tuple(int(s) for s in shape),
        chunks=tuple(max(1, int(c)) for c in chunks), dtype=dtype, compressors=comp,
        dimension_names=dims, storage_options=loc.options, overwrite=True, fill_value=0,
        chunk_key_encoding={"name": "default", "separator": "."},
    )


def open_array(loc: Location, path: str, mode: str = "r+"):
    """An array of a patch store (the workers' writes and reads)."""
    return zarr.open_array(loc.url, path=path, mode=mode, storage_options=loc.options, zarr_format=3)


class PatchStore(ZarrLocation):
    """A complete patch store, for reading."""

    @classmethod
    def open(cls, loc: Location | str) -> PatchStore:
        """A complete, usable patch store (MRHError saying what is there otherwise)."""
        store = cls(loc)
        found = check_input(store.loc, FORMAT)
        if not found.attrs.get("complete"):
            raise MRHError(f"{store.name}: patch store is incomplete (interrupted `mrhscale patches`?); "
                           "rerun the same command to rebuild it")
        missing = [k for k in REQUIRED if k not in found.attrs]
        if missing:
            raise MRHError(f"{store.name}: not a usable patch store (missing {', '.join(missing)})")
        store.attrs = dict(found.attrs)
        return store

    def split(self, split: str):
        """(inputs, targets) zarr arrays of a split (MRHError when it is absent or empty)."""
        root = self.root()
        if f"{split}/inputs" not in root or f"{split}/targets" not in root:
            raise MRHError(f"{self.name}: no split {split!r} (use train or val)")
        return root[f"{split}/inputs"], with_stain_axis(root[f"{split}/targets"])

    def identity(self) -> dict:
        return identity(self.attrs)

    def describe(self) -> str:
        a = self.attrs

        return "\n".join([
            f"store: {self.name}", f"format: {FORMAT}",
            f"stains: {', '.join(stains_of(a))}  "
            f"patch: {a.get('patch')}",
            f"train patches: {a.get('n_train')}  val patches: {a.get('n_val')}",
            f"from subjects: {', '.join(a.get('subjects', []))}"
            f"  (validation subjects: {', '.join(a.get('val_subjects', [])) or 'none, a random fraction'})",
            f"normalisation: {(a.get('norm') or {}).get('mode', '?')}; per-subject statistics: "
            f"{'yes' if a.get('subject_norm') else 'no (train --norm subject-... needs them: remake the store)'}",
            f"channels ({len(a['channels'])}): {short(a['channels'])}",
            f"complete: {bool(a.get('complete'))}",
            f"fingerprint: {a.get('fingerprint', '?')}",
        ])


def identity(attrs: dict) -> dict:
    """What a model trained on a patch store was trained on (compared on resume)."""
    fp = attrs.get("fingerprint") or fingerprint(
        {k: attrs.get(k) for k in ("channels", "target", "patch", "norm", "n_train", "n_val", "seed",
                                   "subjects", "rules")})
    return {"fingerprint": fp, "target": attrs["target"], "channels": list(attrs["channels"]),
            "patch": dict(attrs["patch"])}


@dataclass
class Build:
    """Where a patch store is being built (``loc``) and where it goes (``final``)."""

    loc: Location
    final: Location
    aside: bool
    clear: bool = True  # False: nothing of ours is there yet (absent, or an empty folder)

    @property
    def url(self) -> str:
        return self.loc.url

    def staging(self) -> Location:
        return self.loc.join(STAGING)

    def start(self) -> None:
        if self.clear:
            remove(self.loc)  # ours: an incomplete store or a stale aside
        so = self.loc.options
        with quiet_zarr():
            root = zarr.open_group(self.url, mode="w", storage_options=so, zarr_format=3)
            root.attrs.update({"format": FORMAT, "format_version": 1, "complete": False})
            zarr.open_group(self.staging().url, mode="w", storage_options=so, zarr_format=3)

    def finish(self, attrs: dict, made_by: dict) -> None:
        """Drop staging, write attrs, mark complete (last), and swap into place if aside."""

        remove(self.staging())
        kill_point("patches:before-complete")
        with quiet_zarr():
            root = zarr.open_group(self.url, mode="r+", storage_options=self.loc.options, zarr_format=3)
            root.attrs.update({**attrs, "made_by": made_by, "fingerprint": fingerprint(made_by)})
            root.attrs["complete"] = True
        if self.aside:
            swap_in(self.loc, self.final, token=run_token())

    def discard(self) -> None:
        remove(self.loc)


@contextlib.contextmanager
def build(loc: Location, made_by: dict, *, overwrite: bool = False):
    """Claim the patch store at ``loc`` and yield a ``Build`` to fill, or None to reuse it.

    None: a complete store made from the same inputs and options is already there.
    A complete store made from something else is refused unless ``overwrite``; then
    the new one is built aside and swapped in by ``Build.finish``. A failure
    discards the build and leaves the old store as it was.
    """
    loc = Location.of(loc)
    found = check_output(loc, FORMAT)
    with Claim(loc.claim_place(), f"patch store {loc.masked}"):
        recover(loc, complete=_complete)
        found = check_output(loc, FORMAT)
        attrs = found.attrs or {}
        complete = bool(attrs.get("complete"))
        if complete and not overwrite:
            if attrs.get("fingerprint") == fingerprint(made_by):
                yield None
                return
            raise explain_mismatch(f"{loc.masked}: a complete patch store",
                                   attrs.get("made_by") or {}, made_by,
                                   "pass --overwrite to replace it or choose another --out")
        b = Build(aside(loc, "new", run_token()) if complete else loc, loc, aside=complete,
                  clear=complete or found.format == FORMAT)
        b.start()
        try:
            yield b
        except BaseException:
            with contextlib.suppress(Exception):
                b.discard()
            raise


def _complete(loc: Location) -> bool:
    try:
        return bool((check_output(loc, FORMAT).attrs or {}).get("complete"))
    except MRHError:
        return False
