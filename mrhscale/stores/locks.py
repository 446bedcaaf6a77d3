"""Claims: at most one writer per unit (a subject of a store, a whole output, a run folder).

On a local filesystem a claim is an OS file lock (``filelock``): the operating
system drops it when the process dies, so a crash never leaves a stale claim.
On an object store (s3://...) it is a claim object created exclusively
(``If-None-Match: *``, supported by AWS S3 and moto) and refreshed by a
heartbeat thread; a claim whose heartbeat is older than ``STALE_S`` belongs to
a dead process and is taken over. A second writer of the same unit is refused
with an error naming who holds it.
"""

from __future__ import annotations

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
    """Held by ``acquire()``, dropped by ``release()`` (or the process's death)."""

    def __init__(self, loc: Location | str, what: str):
        self.loc, self.what = Location.of(loc), what
        self.url = self.loc.url
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
        lock = FileLock(path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise MRHError(f"{self.what} is being written by another mrhscale process "
                           f"(lock {path} is held); wait for it to finish or use another --out") from None
        self._lock = lock

    # ---- object store: an exclusively created object with a heartbeat
    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "beat": time.time()}).encode()

    def _acquire_object(self) -> None:
        fs, path = self.loc.filesystem()
        try:
            _create_exclusive(fs, path, self._body())
        except FileExistsError:
            holder = _read_json(fs, path)
            if time.time() - float(holder.get("beat", 0)) < STALE_S:
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
        fs, path = self.loc.filesystem()
        try:
            if _read_json(fs, path).get("token") == self.token:
                fs.rm(path)
        except Exception:
            pass


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
