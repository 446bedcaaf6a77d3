"""Stores of one Zarr group per subject (cohort and prediction stores), many writers at once.

A subject is complete when its commit marker ``_commits/<subject>`` exists (a
zarr group whose attrs hold ``complete: true``, its ``fingerprint`` and
``made_by``, copied into the subject's own attrs too): written last, one object
per subject, so several processes can commit different subjects of one store at
once (a SLURM array, one subject per job) and none loses another's. Kept apart
from the subject's group, the marker survives a user appending variables to it
with plain xarray (which rewrites the group's attrs).
The root's ``subjects`` attr is an index: each commit adds its subject to it (one
read and one write of the root, whatever the number of subjects) or leaves that to a
later rebuild (``commit(index=False)``); a writer rebuilds it from the markers when it
closes, and a store is brought up to its markers when it is prepared (serialised by a
lock on local disk; on an object store it is re-checked until it holds what was
written); readers of mrhscale use the markers.

Each writer stages under ``_staging/<run token>/`` (never shared), claims each
subject it writes (a second writer of the same subject is refused; the claim is the
group ``_locks/<subject>``), and moves a subject into place only when it is whole: a
replaced subject stays as it was until its new version is complete.

What a reader without mrhscale sees is the root's snapshot: Zarr v3 consolidated
metadata of the complete subjects only, in natural order, so ``xarray.open_datatree``
and a default ``zarr.open_group`` list subjects and none of the bookkeeping. A writer
holds ``_locks/_writer-<run token>`` while it runs and drops the snapshot before it
moves anything; the last writer to close writes it afresh from the markers. So a
snapshot never describes a subject version that is not in place; while a run writes
(or after one was killed) there is none, and readers list the store itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import xarray as xr
import zarr

from mrhscale.errors import MRHError
from mrhscale.ops.space import with_space
from mrhscale.stores.base import (
    ZarrLocation,
    check_input,
    check_output,
    fingerprint,
    kill_point,
    move_tree,
    put_snapshot,
    quiet_zarr,
    read_root,
    remove,
    snapshot_nodes,
    tidy_config,
    write_text,
)
from mrhscale.stores.locks import Claim, holding, live_holder, node_lock, run_token
from mrhscale.stores.urls import Location, is_local, local_path

STAGING = "_staging"
LOCKS = "_locks"
COMMITS = "_commits"
SUBJECTS_ATTR = "subjects"
WRITER = "_writer-"  # _locks/_writer-<run token>: held by each writer while it runs


class GroupStore(ZarrLocation):
    """Common reading and writing of a store of subject groups; see the module docstring."""

    FORMAT = ""
    FORMAT_VERSION = 1

    # ---- reading
    @classmethod
    def open(cls, loc: Location | str, what: str = ""):
        """An existing store of this kind (MRHError naming what is there otherwise)."""
        store = cls(loc)
        check_input(store.loc, cls.FORMAT, what)
        return store

    @property
    def attrs(self) -> dict:
        """The root's attrs, read without its snapshot (``split_snapshot``)."""
        fs, root = self.loc.filesystem()
        return dict(read_root(fs, f"{root.rstrip('/')}/zarr.json").get("attributes") or {})

    def subject_groups(self) -> dict[str, dict]:
        """{subject id: attrs} of every subject group, complete or not; a complete one's
        attrs include its commit marker (complete, fingerprint, made_by)."""
        fs, root = self.loc.filesystem()
        groups = _child_groups(fs, root.rstrip("/"))
        if fs.exists(f"{root.rstrip('/')}/{COMMITS}/zarr.json"):
            commits = _child_groups(fs, f"{root.rstrip('/')}/{COMMITS}")
        else:  # a store from before commit markers: its index was the truth
            commits = {k: legacy_marker(groups[k]) for k in self.attrs.get(SUBJECTS_ATTR, []) if k in groups}
        for sid, a in groups.items():
            a.pop("complete", None)  # only the commit marker says so
            if commits.get(sid, {}).get("complete") is True:
                a.update(commits[sid])
        return groups

    def subjects(self) -> list[str]:
        """Ids of the complete subjects, in natural order (s2 before s10), from two listings
        and no document read (markers are only ever written complete, after their group is in
        place): the index's rebuild and every stage's first listing cost the same however many
        subjects the store holds, and parse none of their groups' attrs (~6 kB each)."""
        fs, root = self.loc.filesystem()
        base = root.rstrip("/")
        commits = _listed(fs, f"{base}/{COMMITS}")
        if "zarr.json" not in commits:  # a store from before commit markers: its index and attrs say
            return sorted((sid for sid, a in self.subject_groups().items() if a.get("complete") is True),
                          key=natural_key)
        names = {n for n in _listed(fs, base) if not n.startswith(("_", ".")) and n != "zarr.json"}
        return sorted(names & commits, key=natural_key)

    def state(self, sid: str) -> tuple[bool, dict | None]:
        """(whether ``sid`` has a group, its commit marker if it is complete): two reads,
        whatever the number of subjects."""
        fs, root = self.loc.filesystem()
        base = root.rstrip("/")
        exists = fs.exists(f"{base}/{sid}/zarr.json")
        if not fs.exists(f"{base}/{COMMITS}/zarr.json"):  # a store from before commit markers
            index = (read_root(fs, f"{base}/zarr.json").get("attributes") or {}).get(SUBJECTS_ATTR, [])
            group = _read_json(fs, f"{base}/{sid}/zarr.json").get("attributes") or {}
            return exists, (legacy_marker(group) if exists and sid in index else None)
        marker = _read_json(fs, f"{base}/{COMMITS}/{sid}/zarr.json").get("attributes") or {}
        return exists, (marker if exists and marker.get("complete") is True else None)

    def subject_attrs(self, sid: str) -> dict:
        """A complete subject's attrs, its commit marker (fingerprint, made_by) included."""

        _, marker = self.state(sid)
        if marker is None:
            raise MRHError(f"{self.name}: subject {sid!r} not in store "
                           f"(complete subjects: {', '.join(self.subjects()) or 'none'})")
        with quiet_zarr():
            attrs = dict(zarr.open_group(self.url, path=sid, mode="r", storage_options=self.loc.options,
                                         zarr_format=3).attrs)
        attrs.pop("complete", None)
        return {**attrs, **marker}

    def open_subject(self, sid: str, chunks="auto_zarr"):
        """A complete subject as a lazy xarray Dataset (dask-backed with the store's chunks)."""

        self.subject_attrs(sid)
        kw = {} if chunks == "auto_zarr" else {"chunks": chunks}
        with quiet_zarr():
            ds = xr.open_zarr(self.url, group=sid, consolidated=False,
                              storage_options=self.loc.options, **kw)
        return with_space(ds)  # a store written before coordinates gets them on read

    # ---- writing
    def check_output(self, what: str = "--out") -> bool:
        """Refuse a foreign location; True when a store of this kind is already there."""
        return not check_output(self.loc, self.FORMAT, what).absent

    def prepare(self, attrs: dict) -> dict:
        """Create the root (with ``attrs``) if absent; return the root's attrs.

        Several processes may prepare one new store at once: each group is created
        with its attrs in one write, so nobody sees a root without its ``format``. The index
        of an existing store is brought up to its markers (a writer killed after a commit
        whose index rewrite it had deferred left it behind).
        """
        root_attrs = {"format": self.FORMAT, "format_version": self.FORMAT_VERSION, SUBJECTS_ATTR: [],
                      **attrs}
        have = _ensure_group(self.loc, root_attrs)
        self._migrate()
        self._tidy()
        for sub in (LOCKS, STAGING, COMMITS):  # groups: plain zarr listing the root sees no stray folder
            _ensure_group(self.loc.join(sub), {})
        self.refresh_index()
        return have

    def _migrate(self) -> None:
        """Give the subjects of a store written before commit markers (listed in its index)
        their markers, so that the first write under the new contract loses none of them."""

        fs, root = self.loc.filesystem()
        if fs.exists(f"{root.rstrip('/')}/{COMMITS}/zarr.json"):
            return
        with quiet_zarr():
            for sid, a in self.subject_groups().items():
                if a.get("complete") is True:
                    marker = {k: a[k] for k in ("complete", "made_by", "fingerprint")}
                    zarr.open_group(self.url, path=f"{COMMITS}/{sid}", mode="w",
                                    storage_options=self.loc.options, zarr_format=3, attributes=marker)

    def _tidy(self) -> None:
        """Drop the claim files of the layout before claims were groups (``_locks/<x>.lock``:
        a zarr listing warns about each) and fold a stray resolved config into its group."""
        fs, root = self.loc.filesystem()
        locks = f"{root.rstrip('/')}/{LOCKS}"
        for name in _listed(fs, locks):
            if name.endswith(".lock") and fs.isfile(f"{locks}/{name}"):
                fs.rm(f"{locks}/{name}")
        if self.loc.local:
            tidy_config(local_path(self.url))

    def put(self, sid: str, ds, made_by: dict, encoding: dict | None = None) -> str:
        """Write a whole in-memory or lazy xarray Dataset as subject ``sid`` and commit it
        (for notebooks, tests and tools that build subjects themselves)."""
        with self.writer() as w:
            path = w.begin(sid)
            try:
                with quiet_zarr():
                    portable(ds).to_zarr(self.url, group=path, mode="w", consolidated=False, zarr_format=3,
                                         storage_options=self.loc.options, encoding=encoding)
            except BaseException:
                w.abort(sid, path)
                raise
            return w.commit(sid, path, made_by)

    def writer(self) -> SubjectWriter:
        return SubjectWriter(self)

    def lock(self, name: str) -> Location:
        """The group whose ``zarr.json`` is the claim of ``name`` (a subject, or ``_index``)."""
        return self.loc.join(LOCKS, name)

    def index_subject(self, sid: str) -> None:
        """Add a just-committed subject to the root's index: one read and one write of the
        root, however many subjects it holds (``refresh_index`` lists them all)."""
        self._rewrite_index(lambda have: have if sid in have else sorted([*have, sid], key=natural_key), lambda: {sid})

    def refresh_index(self) -> list[str]:
        """Rewrite the root's ``subjects`` index from the markers (they are the truth). On an
        object store the check lists the markers again after the write: a writer that listed
        before another's commit must not leave its older list as the last word."""
        return self._rewrite_index(lambda _have: self.subjects(), self.subjects)

    def _rewrite_index(self, new_of, must) -> list[str]:
        """The root's index set to ``new_of(index)`` (returned), serialised by a lock on local
        disk; on an object store (no lock) re-checked until it holds ``must()`` (asked after
        the write: another writer may have rewritten it in between), a few times at most."""
        lock = self._index_lock()
        for _ in range(6):
            with _blocking(lock):
                have = list(self.attrs.get(SUBJECTS_ATTR, []))
                new = new_of(have)
                if new != have:
                    with quiet_zarr():
                        self.root("r+").attrs[SUBJECTS_ATTR] = new
            if lock is not None:
                break
            if set(self.attrs.get(SUBJECTS_ATTR, [])) >= set(must()):
                break
        return new

    # ---- the snapshot: what xarray and a default zarr open see
    def publish(self, own: str | None = None) -> bool:
        """Give the root the snapshot of its complete subjects (natural order), unless a writer
        other than ``own`` is running (its close publishes): serialised by the index lock on
        local disk; on an object store re-checked after: withdrawn if a writer started, made
        again if the markers changed while it was read (a whole run in between). True when
        published."""
        lock = self._index_lock()
        for _ in range(1 if lock else 4):
            with _blocking(lock):
                if self._writing(own):
                    return False
                names = self.subjects()
                put_snapshot(self.loc, snapshot_nodes(self.loc, names))
            if lock is not None:
                return True
            if self._writing(own):
                self.withdraw()
                return False
            if self.subjects() == names:
                return True
        return True

    def withdraw(self) -> None:
        """Drop the snapshot: a writer does so before it moves anything, so a snapshot never
        describes a subject version that is not the one in place."""
        with _blocking(self._index_lock()):
            put_snapshot(self.loc, None)

    def _index_lock(self) -> str | None:
        return local_path(self.lock("_index").join("zarr.json").url) if self.loc.local else None

    def _writing(self, own: str | None) -> bool:
        """Whether a writer other than ``own`` holds its claim (dead ones' are dropped)."""
        fs, root = self.loc.filesystem()
        base = f"{root.rstrip('/')}/{LOCKS}"
        return any(self._alive(fs, f"{base}/{n}") for n in _listed(fs, base) if n.startswith(WRITER) and n != own)

    def _alive(self, fs, path: str) -> bool:
        if not self.loc.local:
            if live_holder(fs, f"{path}/zarr.json") is not None:
                return True
            remove(self.loc.join(LOCKS, path.rsplit("/", 1)[-1]))  # a dead writer's: its heartbeat stopped
            return False
        fd = node_lock(f"{path}/zarr.json", blocking=False)
        if fd is None:
            return True
        os.close(fd)
        host, pid = path.rsplit("/", 1)[-1][len(WRITER):].rsplit("-", 2)[:2]
        if host == run_token().rsplit("-", 2)[0] and pid.isdigit() and not _alive(int(pid)):
            remove(self.loc.join(LOCKS, path.rsplit("/", 1)[-1]))  # a dead writer's, on this host
        return False


def _child_groups(fs, path: str) -> dict[str, dict]:
    """{name: attrs} of the groups in a folder but bookkeeping (``_``/``.``-named), each read
    from its own ``zarr.json``: a zarr listing would parse the root's snapshot first."""
    docs = {n: _read_json(fs, f"{path}/{n}/zarr.json") for n in _listed(fs, path) if not n.startswith(("_", "."))}
    return {n: dict(d.get("attributes") or {}) for n, d in docs.items() if d.get("node_type") == "group"}


def _listed(fs, path: str) -> set[str]:
    """The names in a folder (prefix), none if it does not exist."""
    try:
        return {e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)}
    except FileNotFoundError:
        return set()


def portable(ds):
    """What a subject group holds on disk: physical coordinates, and strings as variable-length
    UTF-8 (zarr v3's ``string``, readable by other Zarr v3 libraries; numpy's fixed-width
    unicode becomes ``fixed_length_utf32``, which has no specification)."""
    ds = with_space(ds)
    fix = {k: v.astype(object) for k, v in ds.variables.items() if v.dtype.kind in "US"}
    coords = {k: v for k, v in fix.items() if k in ds.coords}
    return ds.assign_coords(coords).assign({k: v for k, v in fix.items() if k not in coords})


def _ensure_group(loc: Location, attrs: dict) -> dict:
    """Open the group at ``loc``, or create it with ``attrs`` in one write; its attrs."""
    url, storage_options = loc.url, loc.options

    fs, path = loc.filesystem()
    for _ in range(5):
        with quiet_zarr():
            doc = read_root(fs, f"{path.rstrip('/')}/zarr.json")  # not zarr's open: it parses the snapshot
            if doc.get("node_type") == "group":
                return dict(doc.get("attributes") or {})
            try:
                zarr.create_group(url, attributes=attrs, storage_options=storage_options, zarr_format=3,
                                  overwrite=False)
            except zarr.errors.ContainsGroupError:
                pass  # another process made it meanwhile: open it
    raise MRHError(f"{loc.masked}: could not be created or opened as a Zarr group")


def legacy_marker(group_attrs: dict) -> dict:
    """The commit marker of a subject committed before markers existed (by the root index):
    what made it, as far as its attrs tell (its sources' checksums)."""
    sources = {role: s.get("checksum") or s.get("path") for role, s in (group_attrs.get("sources") or {}).items()}
    made_by = {"legacy": True, "sources": sources}
    return {"complete": True, "made_by": made_by, "fingerprint": fingerprint(made_by)}


def _read_json(fs, path: str) -> dict:
    try:
        doc = json.loads(fs.cat_file(path))
    except Exception:
        return {}
    return doc if isinstance(doc, dict) else {}


def natural_key(name: str) -> list:
    """Sort key that orders numbered names by number: s2 < s10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@contextlib.contextmanager
def _blocking(path: str | None):
    """Hold a local lock group, waiting for it (the index rewrite takes milliseconds)."""
    if path is None:
        yield
        return
    with holding(path):
        yield


class SubjectWriter:
    """One run's writes into a subject store: claim, stage, commit, clean up."""

    def __init__(self, store: GroupStore):
        self.store = store
        self.token = run_token()
        self.staging = f"{STAGING}/{self.token}"
        self._claims: dict[str, Claim] = {}
        self._committed = False  # the index is rebuilt from the markers on close if so
        self._clean_dead_staging()
        self._running = Claim(store.lock(WRITER + self.token), f"writer {self.token} of {store.name}",
                              node=True).acquire()
        store.withdraw()  # before anything moves: no snapshot outlives the versions it describes

    def begin(self, sid: str) -> str:
        """Claim ``sid`` and return the group path its new version is written to."""
        claim = Claim(self.store.lock(sid), f"subject {sid} of {self.store.name}", node=True).acquire()
        self._claims[sid] = claim
        exists, marker = self.store.state(sid)
        complete = marker is not None
        if exists and not complete:
            self._unmark(sid)
            self._remove(sid)  # half-written remains of a crashed run (ours: we hold the claim)
        path = f"{self.staging}/{sid}" if (is_local(self.store.url) or complete) else sid
        self._remove(path)
        return path

    def lazy_write(self, path: str, ds, encoding: dict | None = None):
        """A Delayed that writes ``ds`` (lazy, dask-backed) to ``path`` from ``begin``: the
        stage computes it on its cluster, then commits."""
        with quiet_zarr():
            return portable(ds).to_zarr(self.store.url, group=path, mode="w", compute=False, consolidated=False,
                                        zarr_format=3, encoding=encoding,
                                        storage_options=self.store.loc.options)

    def commit(self, sid: str, path: str, made_by: dict, extra: dict | None = None, *, index: bool = True) -> str:
        """Move the whole subject at ``path`` into place, then write its marker, last. The root's
        index is rewritten now, or (``index=False``: a run committing many subjects) at ``close``
        or ``refresh_index``: rebuilding it lists the store, so once per subject costs O(N²).
        The group's attrs and the marker are written as files (a zarr.json each), not through
        zarr's API: its round trips were most of a small subject's commit."""
        kill_point("subject:before-move")
        if path != sid:
            self._unmark(sid)  # the old version stops counting before it is replaced
            self._move(path, sid)

        marker = {"made_by": made_by, "fingerprint": fingerprint(made_by)}
        group = self._node(sid)
        group["attributes"] = {**(group.get("attributes") or {}), **(extra or {}), **marker}
        self._put_node(sid, group)
        kill_point("subject:before-marker")
        kill_point(f"subject:before-marker:{sid}")  # a kill after the subjects committed before it
        self._put_node(f"{COMMITS}/{sid}", {"attributes": {**marker, "complete": True}, "zarr_format": 3,
                                            "node_type": "group"})
        self.release(sid)
        self._committed = True
        if index:
            self.store.index_subject(sid)
        return sid

    def refresh_index(self) -> None:
        """The root's index brought up to the markers of the subjects committed so far."""
        self.store.refresh_index()

    def abort(self, sid: str, path: str | None) -> None:
        """Drop a failed subject's new version; the old one (if any) is untouched."""
        if path is not None and (path != sid or not self._complete(sid)):
            self._remove(path)
        self.release(sid)

    def release(self, sid: str) -> None:
        claim = self._claims.pop(sid, None)
        if claim is not None:
            claim.release()

    def close(self) -> None:
        """Release the claims, drop the staging folder, (once per run, not per subject)
        rebuild the index from the markers: it loses what a replaced or crashed write left;
        then, if no other writer runs, publish the snapshot."""
        for sid in list(self._claims):
            self.release(sid)
        self._remove(self.staging)
        if self._committed:
            self.store.refresh_index()
        self._running.release()  # first: of two writers closing at once, one sees the other gone
        self.store.publish(own=WRITER + self.token)
        self._remove(f"{LOCKS}/{WRITER}{self.token}")

    def __enter__(self) -> SubjectWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers
    def _node(self, path: str) -> dict:
        """The zarr.json of the group at ``path`` (relative to the store)."""
        fs, root = self._fs()
        doc = _read_json(fs, f"{root.rstrip('/')}/{path}/zarr.json")
        if doc.get("node_type") != "group":
            raise MRHError(f"{self.store.name}: {path} is not a Zarr group (moved or deleted while written?)")
        return doc

    def _put_node(self, path: str, doc: dict) -> None:
        """Write the zarr.json of the group at ``path``: atomically on local disk (a reader sees
        the old file or the new), one PUT on an object store."""
        fs, root = self._fs()
        where = f"{root.rstrip('/')}/{path}/zarr.json"
        text = json.dumps(doc, indent=2)
        if is_local(self.store.url):
            write_text(where, text)
        else:
            fs.pipe_file(where, text.encode())

    def _complete(self, sid: str) -> bool:
        return self.store.state(sid)[1] is not None

    def _fs(self):
        return self.store.loc.filesystem()

    def _remove(self, path: str) -> None:
        remove(self.store.loc.join(path))

    def _move(self, src: str, dst: str) -> None:
        fs, root = self._fs()
        a, b = f"{root.rstrip('/')}/{src}", f"{root.rstrip('/')}/{dst}"
        if is_local(self.store.url):
            old = f"{root}/{self.staging}/.old-{dst}"
            if os.path.lexists(b):
                os.rename(b, old)
            os.rename(a, b)
            self._remove(f"{self.staging}/.old-{dst}")
            return
        if fs.exists(b):
            fs.rm(b, recursive=True)
        move_tree(fs, a, b)

    def _unmark(self, sid: str) -> None:
        self._remove(f"{COMMITS}/{sid}")

    def _clean_dead_staging(self) -> None:
        """Remove staging folders of runs that died on this host (local stores only)."""
        if not is_local(self.store.url):
            return
        d = os.path.join(local_path(self.store.url), STAGING)
        if not os.path.isdir(d):
            return
        host = self.token.rsplit("-", 2)[0]
        for name in os.listdir(d):
            parts = name.rsplit("-", 2)
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _alive(int(parts[1])):
                self._remove(f"{STAGING}/{name}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
