"""Streaming: patches/s that PatchStream delivers through a DataLoader, against what training eats.

Figures (medians of epochs after a warm-up epoch, persistent workers; baselines measured
in the same run):
- PatchStream + DataLoader(num_workers=2, batch_size=None), local patch store, batch 128
  (the trainer's) and 1024, shuffle buffer on, normalisation applied, float32 tensors out;
  against the CPU training consumption of MRH-Net depth 5 (forward + backward + SGD step,
  batch 128, 2 threads) and against a plain single-process zarr read of the same arrays.
- the DataLoader hand-off bound: 2 workers that only allocate and fill shared-memory
  batches of the same shape (no reading): the most any worker-based stream can deliver.
- PatchStream with no workers (in the consuming process), with and without read_ahead,
  and with per-subject normalisation (train --norm subject-...) against global statistics.
- The training feed (issue 28), on a 337,920-patch store (the issue's 338k; 0.8 GiB),
  batch 4096, in-process, one stream object across epochs (as the trainer keeps it),
  interleaved repeats in one run: the stream on the default codec (none; its chunk files
  mapped, each batch gathered from the page cache) and on lz4 (windows read and decoded),
  the resident cache in host RAM (train --cache), against the
  memcpy of the same bytes (each batch's float32 inputs and targets copied from RAM into
  a reused buffer): the most a feed that touches every byte once could deliver.
Default: 131,072 patches of 67x3x3 (0.3 GiB); --full: 1,048,576 (2.4 GiB). --feed: only the feed rows.
Run under `flock /tmp/bench.lock` on shared machines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from torch.utils.data import IterableDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import print_rows, row, timed  # noqa: E402

C = 67


SUBJECTS = ["s1", "s2", "s3", "s4"]


def make_patch_store(url: str, n: int, n_c: int = C, seed: int = 0, codec: str = "none") -> None:
    """A complete patch store in the contract's layout with random contents (fast to make),
    its chunks the stage's default size, compressed with ``codec``."""
    import zarr

    from mrhscale.ops.norm import Normalisation
    from mrhscale.stages.patches import chunk_rows
    from mrhscale.stores.patches import create_array

    nc = chunk_rows(n_c, 3, 4)
    rng = np.random.default_rng(seed)
    root = zarr.open_group(url, mode="w", zarr_format=3)
    for split, m in (("train", n), ("val", max(1, n // 64))):
        xi = create_array(url, f"{split}/inputs", (m, n_c, 3, 3), (nc, n_c, 3, 3), np.float32,
                          ["patch", "contrast", "row", "col"], codec)
        ti = create_array(url, f"{split}/targets", (m, 1, 3, 3), (nc, 1, 3, 3), np.float32,
                          ["patch", "stain", "row", "col"], codec)
        oi = create_array(url, f"{split}/origin", (m, 4), (nc, 4), np.int32, ["patch", "coord"], codec)
        for a in range(0, m, nc):
            b = min(m, a + nc)
            xi[a:b] = rng.random((b - a, n_c, 3, 3), dtype=np.float32) * 1000
            ti[a:b] = rng.random((b - a, 1, 3, 3), dtype=np.float32) * 255
            oi[a:b] = np.arange(a, b, dtype=np.int32)[:, None]
            oi[a:b, 0] = np.arange(a, b, dtype=np.int32) % len(SUBJECTS)  # each row's subject
    nrm = Normalisation("percentile", [5.0] * n_c, [990.0] * n_c, 0.0, 250.0)
    per_subject = {sid: {"subject-percentile": {"offset": [5.0 + k] * n_c, "scale": [990.0 - k] * n_c}}
                   for k, sid in enumerate(SUBJECTS)}
    root.attrs.update({
        "format": "mrhscale-patches", "format_version": 1,
        "channels": [f"c{i}" for i in range(n_c)], "target": "af",
        "patch": {"half": 1, "size": 3, "axis": "y"}, "norm": nrm.to_dict(), "subjects": SUBJECTS,
        "subject_norm": per_subject,
        "val_subjects": [], "n_train": n, "n_val": max(1, n // 64), "seed": seed, "rules": {},
        "provenance": {"stage": "bench_stream synthetic"},
    })
    root.attrs["complete"] = True


def stream_rate(url: str, batch: int, workers: int, epochs: int, read_ahead: bool = False,
                norm=None) -> float:
    from torch.utils.data import DataLoader

    from mrhscale.training.stream import PatchStream, StreamOptions

    s = PatchStream(url, batch_size=batch, seed=1, options=StreamOptions(read_ahead=read_ahead), norm=norm)
    return _loader_rate(DataLoader(s, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                                   prefetch_factor=4 if workers else None), epochs)


class _Handoff(IterableDataset):
    """An IterableDataset whose workers do nothing but allocate and fill batches the way
    PatchStream's workers do (one shared-memory block per batch): what is left is the
    DataLoader's own per-batch hand-off between processes, the ceiling of any worker."""

    def __init__(self, n: int, batch: int):
        self.n, self.batch = n, batch

    def __iter__(self):
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        steps = self.n // self.batch
        nx, nt = self.batch * C * 9, self.batch * 9
        for _ in range(w, steps, nw):
            flat = torch.empty(nx + nt).share_memory_()
            flat.fill_(1.0)
            yield flat[:nx].view(self.batch, C, 3, 3), flat[nx:].view(self.batch, 3, 3)


def handoff_rate(n: int, batch: int, workers: int, epochs: int) -> float:
    from torch.utils.data import DataLoader

    return _loader_rate(DataLoader(_Handoff(n, batch), batch_size=None, num_workers=workers, persistent_workers=True,
                                   prefetch_factor=4), epochs)


def _loader_rate(loader, epochs: int) -> float:
    rates = []
    for e in range(epochs + 1):  # epoch 0 warms up (worker start-up, JIT cache load)
        t0 = time.perf_counter()
        n = 0
        for x, _ in loader:
            n += len(x)
        if e:
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def zarr_read_rate(url: str) -> float:
    import zarr

    g = zarr.open_group(url, mode="r")
    x, t = g["train/inputs"], g["train/targets"]
    nc = x.chunks[0]

    def go():
        for a in range(0, x.shape[0], nc):
            x[a:a + nc]
            t[a:a + nc]

    sec, _ = timed(go, repeats=3)
    return x.shape[0] / sec


def trainer_rate(depth: int = 5, batch: int = 128, threads: int = 2) -> float:
    import torch

    from mrhscale.nn.model import MRHNet

    torch.set_num_threads(threads)
    m = MRHNet(C, depth)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    x, t = torch.randn(batch, C, 3, 3), torch.randn(batch, 3, 3)

    def step(k=10):
        for _ in range(k):
            opt.zero_grad(set_to_none=True)
            (0.5 * (m(x) - t).square().flatten(1).sum(1).mean()).backward()
            opt.step()

    step(3)
    sec, _ = timed(step, repeats=5)
    return 10 * batch / sec


FEED_N, FEED_BATCH = 337_920, 4096


def _inprocess_rate(stream) -> float:
    """Patches/s of the next epoch of ``stream`` (one object across epochs, as the trainer keeps it)."""
    stream.set_epoch(getattr(stream, "epoch", -1) + 1)
    t0 = time.perf_counter()
    n = sum(len(b[0]) for b in stream)
    return n / (time.perf_counter() - t0)


def _memcpy_rate(x: np.ndarray, t: np.ndarray, batch: int) -> float:
    """Each batch's bytes (float32 inputs and targets) copied from RAM into a reused buffer."""
    dx, dt = np.empty((batch, *x.shape[1:]), x.dtype), np.empty((batch, *t.shape[1:]), t.dtype)
    t0 = time.perf_counter()
    for a in range(0, len(x) - batch + 1, batch):
        np.copyto(dx, x[a:a + batch])
        np.copyto(dt, t[a:a + batch])
    return (len(x) // batch * batch) / (time.perf_counter() - t0)


def feed_rows(work: str, n: int = FEED_N, batch: int = FEED_BATCH, repeats: int = 7) -> list[dict]:
    """The training feed in-process against the memcpy bound, interleaved in one run."""
    import torch
    import zarr

    from mrhscale.stages.patches import chunk_rows
    from mrhscale.training.cache import PatchCache
    from mrhscale.training.stream import PatchStream, StreamOptions

    ahead = StreamOptions(read_ahead=True)
    urls = {c: os.path.join(work, f"feed-{c}.zarr") for c in ("none", "lz4")}
    for c, url in urls.items():
        make_patch_store(url, n, codec=c)
    g = zarr.open_group(urls["none"], mode="r")
    x, t = g["train/inputs"][:], g["train/targets"][:]
    cache = PatchCache(PatchStream(urls["none"], batch_size=batch, seed=1), torch.device("cpu"), two_threads=True)
    streams = {"none": PatchStream(urls["none"], batch_size=batch, seed=1),
               "ahead": PatchStream(urls["none"], batch_size=batch, seed=1, options=ahead),
               "lz4": PatchStream(urls["lz4"], batch_size=batch, seed=1, options=ahead), "cache": cache}
    runs = {"memcpy": lambda: _memcpy_rate(x, t, batch),
            **{k: (lambda s=s: _inprocess_rate(s)) for k, s in streams.items()}}
    got = {k: [] for k in runs}
    for f in runs.values():  # warm-up: JIT cache load, page cache
        f()
    for _ in range(repeats):
        for k, f in runs.items():
            got[k].append(f())
    med = {k: statistics.median(v) for k, v in got.items()}
    nc = chunk_rows(C, 3, 4)
    what = f"{n} patches of {C}x3x3, batch {batch}, in-process, shuffle window on, normalised float32"
    load = os.getloadavg()[0]
    return [
        row(f"feed: PatchStream in-process, batch {batch}, codec none, {nc}-patch chunks", med["none"],
            "patches/s", "memcpy of the same bytes (same run)", med["memcpy"], ">= 1.0 M/s", med["none"] >= 1e6,
            note=f"{what}; median of {repeats} interleaved; load {load:.1f}"),
        row(f"feed: PatchStream in-process, batch {batch}, read_ahead (train on a GPU), codec none, {nc}-patch chunks",
            med["ahead"], "patches/s", "memcpy of the same bytes (same run)", med["memcpy"], ">= 1.0 M/s",
            med["ahead"] >= 1e6, note="next window read, and each batch normalised, on two threads"),
        row(f"feed: PatchStream in-process, batch {batch}, read_ahead, codec lz4 (Blosc, shuffle), {nc}-patch chunks",
            med["lz4"], "patches/s", "the same on codec none", med["ahead"], note=what),
        row(f"feed: resident cache in host RAM (train --cache), batch {batch}", med["cache"], "patches/s",
            "memcpy of the same bytes (same run)", med["memcpy"],
            note="the stream's batches, gathered (two threads) from the normalised split held in RAM"),
    ]


def run(full: bool = False, feed_only: bool = False) -> list[dict]:
    if feed_only:
        work = tempfile.mkdtemp(prefix="bench-feed-")
        try:
            return feed_rows(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    n = (1 << 20) if full else (1 << 17)
    work = tempfile.mkdtemp(prefix="bench-stream-")
    url = os.path.join(work, "patches.zarr")
    try:
        make_patch_store(url, n)
        train = trainer_rate()
        raw = zarr_read_rate(url)
        r128 = stream_rate(url, 128, 2, 3)
        r1024 = stream_rate(url, 1024, 2, 3)
        h128 = handoff_rate(n, 128, 2, 3)
        h1024 = handoff_rate(n, 1024, 2, 3)
        r0 = stream_rate(url, 1024, 0, 3)
        r0a = stream_rate(url, 1024, 0, 3, read_ahead=True)
        r0_128 = stream_rate(url, 128, 0, 3)
        from mrhscale.ops.norm import Normalisation

        per = Normalisation.subject_mode("subject-percentile", C, 0.0, 250.0)
        r0s = stream_rate(url, 1024, 0, 3, norm=per)
        r0g = stream_rate(url, 1024, 0, 3)  # the global baseline again, beside it
        shutil.rmtree(url, ignore_errors=True)
        feed = feed_rows(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    note = f"{n} patches 67x3x3, 2 DataLoader workers, shuffle buffer on, normalised float32"
    bound_note = ("hand-off bound: 2 DataLoader workers that only allocate+fill a shared-memory "
                  "batch (no reading); the DataLoader's per-batch inter-process cost caps every worker")
    best = max(r0, r0a)
    return [
        row("PatchStream batch 128 vs CPU trainer (depth 5)", r128, "patches/s",
            "MRH-Net depth 5 training step, batch 128, 2 threads", train, ">= 20x trainer",
            r128 >= 20 * train, note=note),
        row("PatchStream batch 128, 2 workers vs DataLoader hand-off bound", r128, "patches/s",
            "DataLoader hand-off bound, batch 128, 2 workers", h128, ">= 1 M/s (bound permitting)",
            r128 >= 1e6, note=bound_note),
        row("PatchStream batch 1024, 2 workers vs DataLoader hand-off bound", r1024, "patches/s",
            "DataLoader hand-off bound, batch 1024, 2 workers", h1024, ">= 1 M/s (bound permitting)",
            r1024 >= 1e6, note=bound_note),
        row("PatchStream batch 1024, no workers (in-process)", r0, "patches/s",
            "zarr chunk reads, 1 process, no shuffle/normalise", raw, ">= 1 M/s", r0 >= 1e6,
            note="uncompressed chunks mapped: each batch gathered + normalised from the page cache in one compiled pass"),
        row("PatchStream batch 1024, no workers, read_ahead=True", r0a, "patches/s",
            "no workers, read_ahead=False", r0, note="batches normalised on two threads (a window read ahead where not mapped)"),
        row("PatchStream batch 128, no workers (in-process)", r0_128, "patches/s",
            "MRH-Net depth 5 training step, batch 128, 2 threads", train, ">= 20x trainer",
            r0_128 >= 20 * train),
        row("best in-process PatchStream, batch 1024", best, "patches/s",
            "2 DataLoader workers, batch 1024", r1024),
        row("PatchStream batch 1024, no workers, per-subject normalisation", r0s, "patches/s",
            "the same with the store's global statistics", r0g,
            note=f"{len(SUBJECTS)} subjects: each row's origin read and its own (offset, scale) row"),
        *feed,
    ]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--feed", action="store_true", help="only the training-feed rows")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = run(a.full, feed_only=a.feed)
    print_rows(rows)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
