"""The patch store: training samples of one stain (or several), globally shuffled (docs/stores.md).

``PatchStore.open`` is the one way to read a patch store (trainer, PatchStream,
importance); ``PatchStore.build`` the one way to write one: a new store is built
in place, a complete one being replaced is rebuilt beside it and swapped in
only when complete, and an identical rerun reuses what is there.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import weakref
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec
from zarr.core.buffer.cpu import NDBuffer
from zarr.storage import LocalStore

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
    snapshot,
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


def compressors(codec) -> tuple | None:
    """The zarr compressors of a patch-store codec: a name of ``options.PATCH_CODECS``
    (``none``; ``lz4``: Blosc lz4 level 5, byte shuffle; ``zstd``: Blosc zstd level 1, byte
    shuffle; the choice measured in docs/patches.md), a bool (True: lz4), or a zarr
    bytes-to-bytes codec as it is (benchmarks)."""
    if codec is True or codec == "lz4":
        return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
    if codec == "zstd":
        return (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),)
    if codec in (None, False, "none"):
        return None
    if isinstance(codec, str):
        raise MRHError(f"unknown patch-store codec {codec!r} (none, lz4 or zstd)")
    return (codec,)


def create_array(loc: Location, path: str, shape, chunks, dtype, dims, codec):
    """A new (or replaced) zarr array inside a patch store being built, its chunks
    compressed with ``codec`` (see :func:`compressors`)."""

    comp = compressors(codec)
    loc = Location.of(loc)
    return zarr.create_array(
        loc.url, name=path, shape=tuple(int(s) for s in shape),
        chunks=tuple(max(1, int(c)) for c in chunks), dtype=dtype, compressors=comp,
        dimension_names=dims, storage_options=loc.options, overwrite=True, fill_value=0,
        chunk_key_encoding={"name": "default", "separator": "."},
    )


class RowReader:
    """Rows ``[a, e)`` of one patch-store array, all inside one chunk, decoded into a
    caller's C-contiguous buffer (what the stream's windows and the patch cache are made of).

    Chunks of a local store that are plain bytes, or bytes then one Blosc or Zstd codec,
    are read here with one ``preadv`` straight into the buffer (plain), or one read and
    one decode into it: zarr's own path (asynchronous store, codec pipeline, a chunk
    buffer copied out) costs ~2-4x that per 5 MB chunk (benchmarks/RESULTS.md, stream).
    Any other store or codec goes through zarr's ``get_basic_selection``. Both release
    the GIL, so a thread pool overlaps the reads of a window.
    """

    def __init__(self, arr):
        self.arr = arr
        self.shape, self.chunks, self.dtype = tuple(arr.shape), tuple(arr.chunks), np.dtype(arr.dtype)
        inner = getattr(arr, "arr", arr)  # stores/legacy.py's stain-axis view: the same bytes
        self._path, self._decode = _direct_path(inner)
        self._key = inner.metadata.encode_chunk_key if self._path else None
        self._rest = (0,) * (len(inner.shape) - 1)  # the chunk grid's other axes (one chunk each)
        self._row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._fill = inner.metadata.fill_value if self._path else None

    @property
    def direct(self) -> bool:
        """Whether reads bypass zarr (a local store, a codec this reader decodes itself)."""
        return self._path is not None

    def mapped(self) -> np.ndarray | None:
        """The whole array as one read-only numpy array over its chunk files, mapped into
        memory (the page cache, no copy), or None where that cannot be (not Linux, another
        store or codec, chunks that are not whole pages, more chunks than maps allowed).

        Each chunk file is mapped at its place in one reserved address range, so rows
        are addressed as in the array (the last chunk's padding lies beyond ``shape[0]``).
        A complete patch store is never rewritten in place (a rebuild is swapped in by
        rename), which this relies on: a mapped file truncated under a reader would fault.
        """
        if self._path is None or self._decode is not None or not sys.platform.startswith("linux"):
            return None
        nc = self.chunks[0]
        n_chunks = -(-self.shape[0] // nc)
        cb = nc * self._row_bytes
        if cb % mmap.PAGESIZE or n_chunks > _MAX_MAPS or self._fill != 0:
            return None
        names = [os.path.join(self._path, *self._key((k, *self._rest)).split("/")) for k in range(n_chunks)]
        flat = _map_files(names, cb)
        if flat is None:
            return None
        return flat.view(self.dtype).reshape(n_chunks * nc, *self.shape[1:])

    @property
    def plain(self) -> bool:
        """Whether a few rows of a chunk cost only their bytes (a plain local chunk file);
        elsewhere any read decodes or fetches the whole chunk."""
        return self._path is not None and self._decode is None

    def read_ranges(self, ranges: list[tuple[int, int]], out: np.ndarray) -> None:
        """Row ranges of ONE chunk laid end to end into ``out``: a plain chunk file is
        opened once and only those bytes read; elsewhere range by range (each decodes the
        chunk: callers give such a reader one range a chunk)."""
        if len(ranges) > 1 and self.plain:
            a0 = ranges[0][0] // self.chunks[0] * self.chunks[0]
            fn = os.path.join(self._path, *self._key((a0 // self.chunks[0], *self._rest)).split("/"))
            spans = [((a - a0) * self._row_bytes, (e - a) * self._row_bytes) for a, e in ranges]
            if not _pread_ranges(fn, out.reshape(-1).view(np.uint8), spans):
                out[...] = self._fill  # a chunk never written holds the fill value (zarr's rule)
            return
        pos = 0
        for a, e in ranges:
            self.read(a, e, out[pos:pos + e - a])
            pos += e - a

    def read(self, a: int, e: int, out: np.ndarray) -> None:
        if self._path is None:
            self.arr.get_basic_selection(slice(a, e), out=NDBuffer.from_numpy_array(out))
            return
        nc = self.chunks[0]
        k, r0 = divmod(a, nc)
        flat = out.reshape(-1).view(np.uint8)
        fn = os.path.join(self._path, *self._key((k, *self._rest)).split("/"))
        try:
            if self._decode is None:
                _pread(fn, flat, r0 * self._row_bytes)
                return
            with open(fn, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:  # a chunk never written holds the fill value (zarr's rule)
            out[...] = self._fill
            return
        if r0 == 0 and e - a == nc:
            self._decode(raw, flat)
        else:
            whole = np.empty(nc * self._row_bytes, np.uint8)
            self._decode(raw, whole)
            flat[:] = whole[r0 * self._row_bytes:(r0 + e - a) * self._row_bytes]


_MAX_MAPS = 16384  # chunk files one mapped array may take (Linux allows 65530 maps a process)
_MAP_FIXED, _MAP_NORESERVE = 0x10, 0x4000  # Linux's values (the mmap module does not name them)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _map_files(names: list[str], size: int) -> np.ndarray | None:
    """Files of ``size`` bytes each, mapped read-only end to end in one address range (a
    missing one reads as zeros), as a uint8 array unmapped when it is collected; None if
    any mapping fails or a file has another size."""
    libc = _libc()
    total = len(names) * size
    failed = ctypes.c_void_p(-1).value
    base = libc.mmap(None, total, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    if base in (None, failed):
        return None
    try:
        for k, fn in enumerate(names):
            try:
                fd = os.open(fn, os.O_RDONLY)
            except FileNotFoundError:  # a chunk never written: the anonymous zero pages stay
                continue
            try:
                ok = os.fstat(fd).st_size == size and libc.mmap(
                    base + k * size, size, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, 0) == base + k * size
            finally:
                os.close(fd)
            if not ok:
                raise OSError(fn)
    except OSError:
        libc.munmap(base, total)
        return None
    buf = (ctypes.c_char * total).from_address(base)
    weakref.finalize(buf, libc.munmap, base, total)
    arr = np.frombuffer(buf, np.uint8)
    arr.flags.writeable = False
    return arr


def _pread(fn: str, flat: np.ndarray, offset: int) -> None:
    fd = os.open(fn, os.O_RDONLY)
    try:
        got = os.preadv(fd, [flat], offset)
    finally:
        os.close(fd)
    if got != len(flat):
        raise OSError(f"{fn}: chunk file is shorter than its array says ({got} of {len(flat)} bytes)")


def _pread_ranges(fn: str, flat: np.ndarray, spans: list[tuple[int, int]]) -> bool:
    """(offset, length) spans of a file read one after another into ``flat`` through one
    descriptor; False where the file does not exist."""
    try:
        fd = os.open(fn, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        pos = 0
        for off, n in spans:
            if os.preadv(fd, [flat[pos:pos + n]], off) != n:
                raise OSError(f"{fn}: chunk file is shorter than its array says")
            pos += n
    finally:
        os.close(fd)
    return True


def _direct_path(arr):
    """(the array's folder, a decoder or None for plain bytes) where RowReader may read its
    chunks itself, (None, None) where zarr must."""
    import numcodecs

    meta = getattr(arr, "metadata", None)
    store = getattr(getattr(arr, "store_path", None), "store", None)
    if not isinstance(store, LocalStore) or getattr(meta, "zarr_format", None) != 3:
        return None, None
    codecs = tuple(meta.codecs)
    if (tuple(arr.chunks[1:]) != tuple(arr.shape[1:]) or not codecs or not isinstance(codecs[0], BytesCodec)
            or len(codecs) > 2 or getattr(meta.chunk_grid, "chunk_shape", None) is None):
        return None, None
    dt = np.dtype(arr.dtype)
    endian = getattr(codecs[0].endian, "value", codecs[0].endian)
    if dt.itemsize > 1 and endian != sys.byteorder:
        return None, None
    decode = None
    if len(codecs) == 2:
        c = codecs[1]
        if isinstance(c, BloscCodec):
            decoder = numcodecs.Blosc()
        elif isinstance(c, ZstdCodec):
            decoder = numcodecs.Zstd()
        else:
            return None, None

        def decode(raw, flat, decoder=decoder):
            decoder.decode(raw, out=flat)
    folder = os.path.join(str(store.root), *arr.store_path.path.split("/"))
    return folder, decode


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

    def readers(self, split: str, origin: bool = False) -> list[RowReader]:
        """Readers of a split's ``inputs``, ``targets`` (with their stain axis) and, with
        ``origin``, ``origin``, in that order (what PatchStream and the patch cache read)."""
        arrays = list(self.split(split))
        if origin:
            arrays.append(self.root()[f"{split}/origin"])
        return [RowReader(a) for a in arrays]

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
        """Drop staging; write the attrs, ``complete`` and the snapshot (readers of xarray's
        open_datatree or zarr see the splits, nothing else) in one atomic write of the root;
        swap into place if aside. One write, not zarr's attrs updates then the snapshot: the
        attrs hold each subject's statistics (~4 kB a subject), each round a parse and a dump."""

        remove(self.staging())
        kill_point("patches:before-complete")
        snapshot(self.loc, {**attrs, "made_by": made_by, "fingerprint": fingerprint(made_by), "complete": True})
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
                snapshot(loc)  # a store made before snapshots gets one (a no-op otherwise)
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
