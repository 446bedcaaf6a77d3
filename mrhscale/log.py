"""Messages and progress: stdlib ``logging`` under the ``mrhscale`` logger.

On a terminal, long work shows a tqdm bar; in a log file, under SLURM or any
pipe, it logs one line per ``MRHSCALE_PROGRESS_EVERY`` seconds (30) and one at the
end instead of megabytes of carriage returns. The CLI sets the levels
(``-q`` warnings only, ``-v`` debug) and ``--log-file`` (every record, with time).
"""

from __future__ import annotations

import logging
import os
import sys
import time

logger = logging.getLogger("mrhscale")
_HANDLERS: list[logging.Handler] = []


def setup(*, quiet: bool = False, verbose: int = 0, log_file: str | None = None) -> None:
    """Configure the ``mrhscale`` logger for a command (idempotent: replaces its own handlers)."""
    for h in _HANDLERS:
        logger.removeHandler(h)
        h.close()
    _HANDLERS.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO))
    console.setFormatter(logging.Formatter("%(message)s"))
    _HANDLERS.append(console)
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)) or ".", exist_ok=True)
        f = logging.FileHandler(log_file)
        f.setLevel(logging.DEBUG)
        f.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        _HANDLERS.append(f)
    for h in _HANDLERS:
        logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False


def reset() -> None:
    """Remove what ``setup`` added (after a command: library use keeps the host's logging)."""
    for h in _HANDLERS:
        logger.removeHandler(h)
        h.close()
    _HANDLERS.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _LineProgress:
    """tqdm's small interface, as a log line now and then (for logs, pipes and batch jobs)."""

    def __init__(self, iterable=None, total=None, desc: str = "", unit: str = "it", quiet: bool = False):
        self.iterable, self.desc, self.unit, self.quiet = iterable, desc, unit, quiet
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.t0 = 0, time.monotonic()
        self.every = float(os.environ.get("MRHSCALE_PROGRESS_EVERY", "30"))
        self.last = self.t0
        self.said = False  # a short job says nothing; a long one ends with a "done" line

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.said = True
            self._say()

    def _say(self, done: bool = False) -> None:
        if self.quiet:
            return
        of = f"/{self.total}" if self.total is not None else ""
        rate = self.n / max(time.monotonic() - self.t0, 1e-9)
        logger.info(f"{self.desc}: {self.n}{of} {self.unit}{' done' if done else ''} "
                    f"({rate:.3g} {self.unit}/s)")

    def close(self) -> None:
        if self.n and self.said:
            self._say(done=True)
        self.said = False

    def write(self, text: str) -> None:
        if not self.quiet:
            logger.info(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", quiet: bool = False,
             leave: bool = True):
    """A progress bar on a terminal, periodic log lines elsewhere; nothing with ``quiet``."""
    if on_terminal() and not quiet:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr)
    return _LineProgress(iterable, total=total, desc=desc, unit=unit, quiet=quiet)


def note(text: str, quiet: bool = False) -> None:
    """One line for the user (an INFO record), unless ``quiet``."""
    if not quiet:
        logger.info(text)
