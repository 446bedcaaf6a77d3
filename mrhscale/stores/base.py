"""What every output shares: ownership, identity, build-aside replace, atomic files.

- Ownership: an existing output is replaced or extended only if mrhscale made it
  and it is of the expected kind (a Zarr store whose root ``format`` attr names
  it, or a folder holding ``mrhscale.json``). Anything else is refused untouched.
- Identity: every output records ``made_by`` (what made it: inputs' fingerprints,
  model checksum, options) and ``fingerprint`` (its sha256); reuse or resume is
  allowed only when they match, otherwise the error names the difference.
- Replace: build beside the output (``.<name>.mrhscale-new-<token>``), then swap
  in two renames; a failure before the swap leaves the old output as it was, and
  the next run (holding the output's claim) finishes or discards a swap a crash
  interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from mrhscale.errors import MRHError
from mrhscale.stores.urls import Location, is_local, join, local_path, split

MARKER = "mrhscale.json"  # marks a folder output (run, report, registration...) as ours
NAMES = {
    "mrhscale-cohort": "cohort store", "mrhscale-patches": "patch store",
    "mrhscale-predictions": "prediction store", "mrhscale-run": "training run folder",
    "mrhscale-evaluation": "evaluation report folder", "mrhscale-importance": "importance report folder",
    "mrhscale-demo": "demo folder", "mrhscale-registration": "registration folder",
    "mrhscale-synthetic": "synthetic cohort folder", "mrhscale-crossval": "cross-validation folder",
    "mrhscale-ome-zarr": "viewer image (OME-Zarr)",
    "mrhscale-sections-qc": "section registration QC folder",
}


@contextlib.contextmanager
def quiet_zarr():
    """zarr warns about string dtypes, consolidated metadata and non-zarr files on every v3
    write or listing; they say nothing about our stores."""

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy.*")
        yield


class ZarrLocation:
    """A Zarr store at a ``Location`` (or a path or URL that needs no options), its root group."""

    def __init__(self, loc: Location | str):
        self.loc = Location.of(loc)
        self.url = self.loc.url

    @property
    def name(self) -> str:
        """The URL as it may be shown (credentials masked)."""
        return self.loc.masked

    def root(self, mode: str = "r"):
        import zarr  # 0.6 s: base also serves the CLI's config files, which must not pay for it

        with quiet_zarr():  # the store itself, never its snapshot (``put_snapshot``)
            return zarr.open_group(self.url, mode=mode, storage_options=self.loc.options, zarr_format=3,
                                   use_consolidated=False)


def kill_point(name: str) -> None:
    """Test hook: SIGKILL this process at a named point of a write (MRHSCALE_KILL_AT=name)."""
    if os.environ.get("MRHSCALE_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- identity
def fingerprint(record) -> str:
    """sha256 of a record's canonical JSON: equal records, equal fingerprints."""
    text = json.dumps(record, sort_keys=True, default=str, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def differences(old, new, prefix: str = "") -> list[str]:
    """Human-readable 'key: old -> new' lines where two records differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if old == new:
        return []
    return [f"{prefix.rstrip('.') or 'value'}: {_short(old)} -> {_short(new)}"]


def _short(v) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def explain_mismatch(what: str, old: dict, new: dict, fix: str) -> MRHError:
    diff = differences(old, new)
    shown = "; ".join(diff[:3]) + (f"; ... ({len(diff)} differences)" if len(diff) > 3 else "")
    return MRHError(f"{what} was made from something else ({shown or 'fingerprint differs'}); {fix}")


# --------------------------------------------------------------------------- ownership
@dataclass
class Found:
    """What is at an output location: nothing, one of our outputs, or something else."""

    format: str | None  # our format tag, or None
    description: str  # for errors: "is a file", "is a folder with 3 entries ...", ...
    empty: bool = False
    attrs: dict | None = None

    @property
    def absent(self) -> bool:
        return self.format is None and self.empty


def inspect(loc: Location | str) -> Found:
    """What is at ``loc`` (a Location, or a path or URL that needs no options)."""
    fs, path = Location.of(loc).filesystem()
    if not fs.exists(path):
        return Found(None, "does not exist", empty=True)
    if fs.isfile(path):
        return Found(None, "is a file")
    entries = fs.ls(path, detail=False)
    if not entries:
        return Found(None, "is an empty folder", empty=True)
    names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
    if "zarr.json" in names:
        attrs = read_root(fs, f"{path.rstrip('/')}/zarr.json").get("attributes", {}) or {}
        fmt = attrs.get("format") or _nested_format(attrs) or _legacy_format(attrs)
        if fmt in NAMES:
            return Found(fmt, f"is a {NAMES[fmt]}", attrs=attrs)
        return Found(None, "is a Zarr store not made by mrhscale" if not fmt else f"is a {fmt!r} Zarr store")
    if MARKER in names:
        info = _json(fs, f"{path.rstrip('/')}/{MARKER}")
        fmt = info.get("format")
        if fmt in NAMES:
            return Found(fmt, f"is a {NAMES[fmt]}", attrs=info)
    elif "config.json" in names and names & {"checkpoints", "model.pt"} and \
            _json(fs, f"{path.rstrip('/')}/config.json").get("kind") in ("train", "finetune"):
        return Found("mrhscale-run", "is a training run folder")  # made before mrhscale.json
    return Found(None, f"is a folder with {len(names)} entr{'y' if len(names) == 1 else 'ies'} "
                       "not made by mrhscale")


def _nested_format(attrs: dict) -> str | None:
    """OME-Zarr images keep ours under an ``mrhscale`` key, beside the NGFF ``ome`` key."""
    own = attrs.get("mrhscale")
    return own.get("format") if isinstance(own, dict) else None


def _legacy_format(attrs: dict) -> str | None:
    """Patch stores made before the ``format`` attr: known by their attrs."""
    return "mrhscale-patches" if all(k in attrs for k in ("patch", "channels", "target", "norm")) else None


def _json(fs, path: str) -> dict:
    try:
        doc = json.loads(fs.cat_file(path))
        return doc if isinstance(doc, dict) else {}
    except Exception:
        return {}


def read_root(fs, path: str) -> dict:
    """A store root's ``zarr.json`` without its snapshot ({} if absent or unreadable)."""
    try:
        return split_snapshot(fs.cat_file(path))[0]
    except Exception:
        return {}


def split_snapshot(raw: bytes | str) -> tuple[dict, bool]:
    """(a root ``zarr.json`` parsed without its snapshot, whether it had one).

    The snapshot is ~13 kB a subject: parsing a 2,000-subject one holds ~250 MB of dicts for
    a moment, on every read of the root's attrs. ``put_snapshot`` writes it as the last key,
    so the document before it, closed, is the rest: parsed alone when it is a whole zarr.json
    (a key inside a string or a nested object leaves no valid document before it); any
    other layout (zarr's own writer puts ``node_type`` after it) is parsed whole."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    at = text.find(f'"{SNAPSHOT}"')
    for _ in range(3):
        if at < 0:
            break
        head = text[:at].rstrip()
        if head.endswith(","):
            with contextlib.suppress(ValueError):
                doc = json.loads(head[:-1] + "}")
                if isinstance(doc, dict) and "node_type" in doc:
                    return doc, True
        at = text.find(f'"{SNAPSHOT}"', at + 1)
    doc = json.loads(text)
    doc = doc if isinstance(doc, dict) else {}
    return {k: v for k, v in doc.items() if k != SNAPSHOT}, SNAPSHOT in doc


def check_output(loc: Location | str, fmt: str, what: str = "--out") -> Found:
    """Refuse an output location holding anything but an mrhscale output of kind ``fmt``."""
    loc = Location.of(loc)
    found = inspect(loc)
    if found.absent or found.format == fmt:
        return found
    raise MRHError(f"{what} {loc.masked}: {found.description}, not a {NAMES[fmt]}; "
                   f"mrhscale never replaces what it did not make: choose another {what}")


def check_input(loc: Location | str, fmt: str, what: str = "") -> Found:
    """Refuse an input that is not an mrhscale output of kind ``fmt``."""
    loc = Location.of(loc)
    found = inspect(loc)
    label = f"{what} {loc.masked}" if what else loc.masked
    if found.format != fmt:
        raise MRHError(f"{label}: {found.description}" + ("" if found.absent else f", not a {NAMES[fmt]}"))
    return found


# --------------------------------------------------------------------------- replace
def aside_url(url: str, tag: str, token: str) -> str:
    parent, name = split(url)
    return join(parent, f".{name}.mrhscale-{tag}-{token}") if parent else f".{name}.mrhscale-{tag}-{token}"


def aside(loc: Location, tag: str, token: str) -> Location:
    """The place beside ``loc`` where its new version is built (opened with its options)."""
    return Location(aside_url(loc.url, tag, token), loc.options)


def _asides(loc: Location) -> list[str]:
    fs, path = loc.filesystem()
    parent, name = split(path)
    try:
        entries = fs.ls(parent or ".", detail=False)
    except FileNotFoundError:
        return []
    pre = f".{name}.mrhscale-"
    return [e for e in entries if e.rstrip("/").rsplit("/", 1)[-1].startswith(pre)]


def swap_in(new: Location | str, loc: Location | str, token: str = "swap") -> None:
    """Put the complete output at ``new`` in place of ``loc`` (which may not exist); ``new``
    is opened with ``loc``'s options when it is a plain URL."""
    loc = Location.of(loc)
    fs, path = loc.filesystem()
    _, new_path = Location.of(new, loc.options).filesystem()
    if loc.local:
        old = local_path(aside_url(loc.url, "old", token))
        if os.path.lexists(path):
            os.rename(path, old)
        kill_point("swap:between-renames")
        os.rename(new_path, path)
        if os.path.lexists(old):
            _remove_local(old)
        return
    if fs.exists(path):
        fs.rm(path, recursive=True)
    move_tree(fs, new_path, path)


def recover(loc: Location | str, complete=None) -> None:
    """Finish or discard what a crashed run left beside ``loc``; call holding its claim.

    A complete new build whose swap was cut between the two renames is put in
    place (``complete(aside Location)`` decides); anything else beside the output
    (half builds, old copies) is removed.
    """
    loc = Location.of(loc)
    fs, path = loc.filesystem()
    if not fs.exists(path):
        for a in sorted(_asides(loc)):
            if "mrhscale-new-" in a and (complete is None or complete(Location(_as_url(loc.url, a), loc.options))):
                move_tree(fs, a, path)
                break
    for a in _asides(loc):
        _remove_path(fs, a, loc.local)


def move_tree(fs, src: str, dst: str) -> None:
    """Move a folder (a rename on local disk; copy, then delete, on an object store)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:
        os.rename(src, dst)
        return
    fs.copy(src.rstrip("/") + "/", dst.rstrip("/") + "/", recursive=True)  # s3fs's mv trips on prefixes
    fs.rm(src, recursive=True)


def _as_url(url: str, fs_path: str) -> str:
    return fs_path if is_local(url) else f"{str(url).split('://', 1)[0]}://{fs_path}"


def _remove_path(fs, path: str, local: bool) -> None:
    if local:
        _remove_local(path)
    elif fs.exists(path):
        fs.rm(path, recursive=True)


def remove(loc: Location | str) -> None:
    """Delete an output mrhscale made (callers check ownership first)."""
    loc = Location.of(loc)
    fs, path = loc.filesystem()
    _remove_path(fs, path, loc.local)


def prune_empty(path: str) -> None:
    """Remove a local folder of ours if nothing is left in it (a staging root after a run)."""
    try:
        os.rmdir(path)
    except OSError:
        pass


def _remove_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


# --------------------------------------------------------------------------- snapshot
SNAPSHOT = "consolidated_metadata"  # the root zarr.json's key of Zarr v3 consolidated metadata


def snapshot_nodes(loc: Location, names: list[str]) -> Iterator[tuple[str, dict]]:
    """(path, metadata) of the groups ``names`` of a store and of everything under them, as
    Zarr v3 consolidated metadata lists them (flat, in the order given): read from their
    ``zarr.json`` files, never from chunks, a few groups at a time (``put_snapshot`` writes
    each as it comes: the cohort's whole snapshot is never held)."""
    from concurrent.futures import ThreadPoolExecutor  # only here: a writer's close, once a run

    fs, root = loc.filesystem()
    step = 1 if loc.local else 64  # an object store: 16 round trips overlap
    with ThreadPoolExecutor(1 if loc.local else 16) as pool:
        for start in range(0, len(names), step):
            for part in pool.map(lambda name: _walk_nodes(fs, root.rstrip("/"), name, {}), names[start:start + step]):
                yield from part.items()


def _walk_nodes(fs, root: str, path: str, nodes: dict) -> dict:
    doc = _json(fs, f"{root}/{path}/zarr.json")
    if doc.get("node_type") not in ("group", "array"):
        return nodes
    nodes[path] = {k: v for k, v in doc.items() if k != SNAPSHOT}
    if doc["node_type"] == "group":
        for entry in sorted(fs.ls(f"{root}/{path}", detail=True), key=lambda e: e["name"]):
            child = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] == "directory" and not child.startswith("."):
                _walk_nodes(fs, root, f"{path}/{child}", nodes)
    return nodes


def data_names(loc: Location) -> list[str]:
    """The top-level nodes of a store that hold its data (not ``_``-named bookkeeping)."""
    fs, root = loc.filesystem()
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=True)
                  if e["type"] == "directory" and not e["name"].rstrip("/").rsplit("/", 1)[-1].startswith(("_", ".")))


def snapshot(loc: Location, attrs: dict | None = None) -> None:
    """The snapshot of a store written once and never changed (a patch store): all its data;
    ``attrs`` set on the root in the same write."""
    put_snapshot(loc, snapshot_nodes(loc, data_names(loc)), attrs)


def put_snapshot(loc: Location, nodes: Iterable[tuple[str, dict]] | None, attrs: dict | None = None) -> bool:
    """Make ``nodes`` ((path, metadata) pairs) the root's consolidated metadata (None: remove
    it), rewriting the root's ``zarr.json`` whole (atomically on local disk), with ``attrs``
    added to its attributes; False when nothing changed.

    The snapshot is what ``xarray.open_datatree`` and a default ``zarr.open_group`` see of the
    store (and all they list): the data only, none of the store's bookkeeping. It is written
    piece by piece, as its last key (``split_snapshot`` reads the root without it), in one
    line: ~13 kB a subject of 67 contrasts. On an object store (no lock) the nodes are read
    first and the root last, just before the put: its attributes (the index another writer
    may have just rewritten) are not held across the walk and written back stale."""
    fs, root = loc.filesystem()
    where = f"{root.rstrip('/')}/zarr.json"
    text = None if nodes is None else _nodes_text(nodes)
    if text is not None and not loc.local:  # one object, whole, anyway
        text = ["".join(text)]
    try:
        old = fs.cat_file(where)
        doc, had = split_snapshot(old)
    except Exception:
        return False
    if not doc or (nodes is None and not had and not attrs):
        return False
    if attrs:
        doc["attributes"] = {**(doc.get("attributes") or {}), **attrs}
    pieces = [json.dumps(doc, indent=2, default=_plain)] if text is None else _snapshot_text(doc, text)
    return _put_if_changed(loc, where, pieces, old)


def _snapshot_text(doc: dict, nodes_text: Iterable[str]) -> Iterator[str]:
    """``json.dumps({**doc, SNAPSHOT: {...}})`` in pieces, a node at a time."""
    yield json.dumps(doc, default=_plain)[:-1] + (", " if doc else "")
    yield f'"{SNAPSHOT}": {{"kind": "inline", "must_understand": false, "metadata": {{'
    yield from nodes_text
    yield "}}}"


def _nodes_text(nodes: Iterable[tuple[str, dict]]) -> Iterator[str]:
    """The snapshot's metadata entries, ``"path": {...}``, comma-separated, one at a time."""
    for i, (path, node) in enumerate(nodes):
        yield f'{", " if i else ""}{json.dumps(path)}: {json.dumps(node)}'


def _plain(value):
    """numpy scalars and arrays in attrs as JSON numbers and lists (as zarr's encoder did)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _put_if_changed(loc: Location, where: str, pieces: Iterable[str], old: bytes) -> bool:
    """Write ``pieces`` as the file ``where`` unless they are its bytes ``old`` already."""
    if not loc.local:
        new = "".join(pieces).encode()
        if new != old:
            loc.filesystem()[0].pipe_file(where, new)
        return new != old
    changed = []

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(pieces)
        changed.append(os.path.getsize(tmp) != len(old) or not _same_bytes(tmp, old))
        if not changed[0]:
            raise _Unchanged

    with contextlib.suppress(_Unchanged):
        atomic_write(where, write)
    return changed[0]


class _Unchanged(Exception):
    """The new file is the old one: ``atomic_write`` drops it."""


def _same_bytes(path: str, old: bytes, block: int = 1 << 20) -> bool:
    with open(path, "rb") as fh:
        return all(fh.read(block) == old[i:i + block] for i in range(0, len(old), block)) and not fh.read(1)


# --------------------------------------------------------------------------- files
def sha256_file(path: str, bufsize: int = 1 << 22) -> str:
    """``sha256:<hex>`` of a file's bytes (model bundles, source images)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def atomic_write(path: str, write) -> str:
    """``write(tmp_path)`` then rename over ``path``: a reader sees the old file or the new."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + "-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; a plain open() would not
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str, text: str) -> str:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, w)


def write_json(path: str, doc, **kw) -> str:
    return write_text(path, json.dumps(doc, **{"indent": 1, "default": str, **kw}))


def rename_file(src: str, dst: str) -> None:
    """Rename within one filesystem (atomic on POSIX)."""
    os.replace(src, dst)


@contextlib.contextmanager
def temporary_folder(near: str):
    """A scratch folder beside ``near`` (same filesystem, so results can be renamed in)."""

    parent = os.path.dirname(os.path.abspath(near)) or "."
    os.makedirs(parent, exist_ok=True)
    d = tempfile.mkdtemp(prefix=".mrhscale-work-", dir=parent)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


CONFIG_GROUP = "_config"


def config_file(folder: str, command: str) -> str:
    """Where a command's resolved config goes in a local output folder that is not a Zarr
    store (a store keeps it in its ``_config`` group's attrs: :func:`save_config`)."""
    return os.path.join(folder, f"mrhscale-{command}.yaml")


def is_store(folder: str) -> bool:
    """Whether a local folder is a Zarr store (its root ``zarr.json``)."""
    return os.path.isfile(os.path.join(folder, "zarr.json"))


def save_config(store: str, command: str, doc: dict) -> str:
    """Keep a command's resolved config in a local Zarr store: the ``resolved`` attr (by
    command) of its ``_config`` group, so a listing of the store meets no stray file and
    ``--config STORE`` reruns it. Returns the group's path."""
    tidy_config(store)
    node = os.path.join(store, CONFIG_GROUP, "zarr.json")
    meta = _config_node(node)
    meta["attributes"]["resolved"] = {**(meta["attributes"].get("resolved") or {}), command: doc}
    write_json(node, meta)
    return os.path.dirname(node)


def store_config(store: str) -> dict:
    """The resolved configs a local Zarr store keeps, by command (``{}``: none), in either
    layout (an older store's ``_config/mrhscale-<command>.yaml`` files are read, not moved)."""
    path = os.path.join(store, CONFIG_GROUP, "zarr.json")
    kept = (_config_node(path)["attributes"].get("resolved") or {}) if os.path.isfile(path) else {}
    return {**_config_files(store), **kept}


def tidy_config(store: str) -> None:
    """Fold the ``_config/mrhscale-<command>.yaml`` files of stores written before configs were
    attrs into the group's attrs, then remove them (a zarr listing warned about each)."""
    old = _config_files(store)
    if not old:
        return
    node = os.path.join(store, CONFIG_GROUP, "zarr.json")
    meta = _config_node(node)
    meta["attributes"]["resolved"] = {**old, **(meta["attributes"].get("resolved") or {})}
    write_json(node, meta)
    for command in old:
        os.unlink(os.path.join(store, CONFIG_GROUP, f"mrhscale-{command}.yaml"))


def _config_files(store: str) -> dict:
    """{command: options} of the ``_config/mrhscale-<command>.yaml`` files (the older layout)."""
    import yaml  # only here: base also serves paths that never read a config

    folder = os.path.join(store, CONFIG_GROUP)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    out = {}
    for name in (n for n in names if n.startswith("mrhscale-") and n.endswith(".yaml")):
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            out[name[len("mrhscale-"):-len(".yaml")]] = yaml.safe_load(fh) or {}
    return out


def _config_node(path: str) -> dict:
    meta = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    attrs = {"about": "the resolved options of the mrhscale commands that wrote this store",
             **(meta.get("attributes") or {})}
    return {"zarr_format": 3, "node_type": "group", **meta, "attributes": attrs}
