"""Claims: at most one writer per unit (a subject of a store, a whole output, a run folder).

On a local filesystem a claim is an OS file lock (``filelock``): the operating
system drops it when the process dies, so a crash never leaves a stale claim.
On an object store (s3://...) it is a claim object created exclusively
(``If-None-Match: *``, supported by AWS S3 and moto) and refreshed by a
heartbeat thread; a claim whose heartbeat is older than ``STALE_S`` belongs to
a dead process and is taken over. A second writer of the same unit is refused
with an error naming who holds it.

A claim inside a Zarr store (a subject being written) is a Zarr group, ``node=True``:
its ``zarr.json`` is the lock (an OS lock on the file opened read-only, or the claim
object itself), so a listing of the store meets a valid group, never a stray file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid

from filelock import FileLock, Timeout

from mrhscale.errors import MRHError
from mrhscale.stores.urls import Location, local_path

HEARTBEAT_S = 30.0
STALE_S = float(os.environ.get("MRHSCALE_CLAIM_STALE_S", "300"))


def run_token() -> str:
    """A name unique to this process and run: host, pid and a random suffix."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Claim:
    """Held by ``acquire()``, dropped by ``release()`` (or the process's death).
    ``node``: the claim is the Zarr group at ``loc`` (a unit inside a store)."""

    def __init__(self, loc: Location | str, what: str, node: bool = False):
        self.loc, self.what, self.node = Location.of(loc), what, node
        self.held = self.loc.join("zarr.json") if node else self.loc  # the file or object that is the claim
        self.url = self.held.url
        self._lock = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.token = run_token()

    def acquire(self) -> Claim:
        if self.loc.local:
            self._acquire_file_lock()
        else:
            self._acquire_object()
        return self

    def release(self) -> None:
        if self._lock is not None:
            if isinstance(self._lock, int):  # a node lock's descriptor
                os.close(self._lock)
            else:
                self._lock.release()
            self._lock = None
        if self._beat is not None:
            self._stop.set()
            self._beat.join(timeout=5)
            self._beat = None
            self._remove_own_object()

    def __enter__(self) -> Claim:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- local: an OS lock, released by the kernel on death
    def _acquire_file_lock(self) -> None:
        path = local_path(self.url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        held = MRHError(f"{self.what} is being written by another mrhscale process "
                        f"(lock {path} is held); wait for it to finish or use another --out")
        if self.node:
            self._lock = node_lock(path, blocking=False)
            if self._lock is None:
                raise held
            return
        lock = FileLock(path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise held from None
        self._lock = lock

    # ---- object store: an exclusively created object with a heartbeat
    def _body(self) -> bytes:
        claim = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "beat": time.time()}
        if self.node:
            claim = {**GROUP, "attributes": {CLAIM_KEY: claim}}
        return json.dumps(claim).encode()

    def _acquire_object(self) -> None:
        fs, path = self.held.filesystem()
        try:
            _create_exclusive(fs, path, self._body())
        except FileExistsError:
            holder = live_holder(fs, path)
            if holder is not None:
                raise MRHError(f"{self.what} is being written by another mrhscale process "
                               f"({holder.get('host')}, pid {holder.get('pid')}; claim {self.loc.masked}); wait "
                               "for it to finish or use another --out") from None
            fs.pipe_file(path, self._body())  # the holder stopped beating: it is dead
        self._beat = threading.Thread(target=self._heartbeat, args=(fs, path), daemon=True,
                                      name="mrhscale-claim")
        self._beat.start()

    def _heartbeat(self, fs, path) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                fs.pipe_file(path, self._body())
            except Exception:  # a missed beat is retried; STALE_S allows several
                continue

    def _remove_own_object(self) -> None:
        fs, path = self.held.filesystem()
        try:
            if _holder(_read_json(fs, path)).get("token") == self.token:
                fs.rm(path)
        except Exception:
            pass


GROUP = {"zarr_format": 3, "node_type": "group"}
CLAIM_KEY = "mrhscale_claim"


def live_holder(fs, path: str) -> dict | None:
    """Who holds the claim object at ``path``, while its heartbeat is fresh (None once it is
    older than ``STALE_S``: a dead holder's, or no claim)."""
    holder = _holder(_read_json(fs, path))
    return holder if time.time() - float(holder.get("beat", 0)) < STALE_S else None


def _holder(doc: dict) -> dict:
    """Who holds a claim object: a group's ``mrhscale_claim`` attr, or the object itself."""
    return (doc.get("attributes") or {}).get(CLAIM_KEY) or doc


def node_lock(path: str, blocking: bool = True, timeout: float = 120.0) -> int | None:
    """An OS lock on the ``zarr.json`` of a local Zarr group (made if absent, all at once):
    an open descriptor (close it to release), or None when another process holds it and
    ``blocking`` is false. The file is opened read-only, so the group stays valid."""
    _make_node(path)
    fd = os.open(path, os.O_RDONLY)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if not blocking or time.monotonic() > deadline:
                os.close(fd)
                if blocking:
                    raise MRHError(f"{path}: held by another process for over {timeout:.0f} s") from None
                return None
            time.sleep(0.01)


@contextlib.contextmanager
def holding(path: str, timeout: float = 120.0):
    """Hold :func:`node_lock` (waiting for it) for the ``with`` block."""
    fd = node_lock(path, timeout=timeout)
    try:
        yield
    finally:
        os.close(fd)


def _make_node(path: str) -> None:
    """A group's ``zarr.json`` at ``path``, created whole if absent (a hard link of a complete
    file: a reader never sees it empty, and a file already there, maybe locked, is kept)."""
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as fh:
        json.dump({**GROUP, "attributes": {}}, fh)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def _create_exclusive(fs, path: str, data: bytes) -> None:
    """Create ``path`` only if absent (FileExistsError otherwise)."""
    try:
        fs.pipe_file(path, data, mode="create")
        return
    except (TypeError, NotImplementedError, ValueError):
        pass  # a filesystem without exclusive create: best effort, documented in stores.md
    if fs.exists(path):
        raise FileExistsError(path)
    fs.pipe_file(path, data)


def _read_json(fs, path: str) -> dict:
    try:
        return json.loads(fs.cat_file(path))
    except Exception:
        return {}
