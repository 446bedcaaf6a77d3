"""Predict's data path with the network out of the way (issue 28, "Feed the accelerators").

Three subjects of bench_predict's kind (80x48x112, 67 channels, the ellipsoid mask,
Blosc zstd 3 as ingest writes them), eager fp32, batch 4096. Figures (brain voxels per
second, medians of repeats, each figure and its baseline alternated in the same run):

- predict with a near-null network (MRHNet depth 0, width 1) in-process
  (``Context(scheduler="synchronous")``, torch on 1 thread: the network's own threads on a
  busy 2-core machine cost it up to 8x, and the second core is then free for the gather
  thread) against the bare forward of that network on pre-built patches of the same
  number of voxels and threads (the network's own bound), and against a plain read of the
  same subjects' ``mri`` (Zarr read + decode of every voxel, brain or not: the read bound);
- the same on the brains chunked as ingest chunked them before it cut axes evenly;
- the same on the embedded cluster, its startup and close included (``Context()``, as a
  user runs it: one worker of a thread per core in this process), against the in-process
  rate and against an embedded cluster of worker processes (``--dask-workers``);
- predict with a depth-5 network (width 64, torch on all cores) in-process on one
  subject (model load is its only startup: well under a tenth of the run) against the
  bare depth-5 forward on the same number of voxels.

    python -m benchmarks --only feed        or        python benchmarks/bench_feed.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_predict import BATCH, bare_forward, make_model, make_store  # noqa: E402
from benchmarks.common import repeats_main, row  # noqa: E402

SUBJECTS = ("b00", "b01", "b02")
SHAPE = (80, 48, 112)
UNEVEN = (64, 32, 64)  # the chunks ingest wrote before it cut axes evenly: 80 = 64 + 16, 48 = 32 + 16
CORES = os.cpu_count() or 1


def predict_seconds(model: str, store: str, out: str, ctx, threads: int | None, subjects=None) -> tuple[int, float]:
    """(brain voxels, seconds) of one whole ``predict`` into a fresh ``out``."""
    from mrhscale.options import Numerics, PredictOptions
    from mrhscale.stages.predict import predict

    shutil.rmtree(out, ignore_errors=True)
    options = PredictOptions(batch_size=BATCH, torch_threads=threads, numerics=Numerics("fp32", "off"))
    t0 = time.perf_counter()
    r = predict(model, store, out, subjects=list(subjects) if subjects else None, options=options, ctx=ctx)
    dt = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return r.brain_voxels, dt


def plain_read_seconds(store: str, subjects) -> float:
    """Seconds to read and decode every subject's whole ``mri`` (in-process, store chunks)."""
    from mrhscale.stores import CohortStore
    from mrhscale.stores.urls import Location

    source = CohortStore.open(Location.of(store))
    t0 = time.perf_counter()
    for sid in subjects:
        source.open_subject(sid)["mri"].data.compute(scheduler="synchronous")
    return time.perf_counter() - t0


def cluster_seconds() -> float:
    """Seconds to start and close the embedded cluster with nothing run on it."""
    from mrhscale.parallel.cluster import dask_client

    t0 = time.perf_counter()
    with dask_client(quiet=True):
        pass
    return time.perf_counter() - t0


def _median_rates(samples: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in samples.items()}


def with_score(model: str) -> str:
    """A copy of the bundle with an out-of-distribution score (every trained bundle has one:
    training/ood.py), fitted on N(0, 1) patch means: its cost does not depend on the fit."""
    import numpy as np

    from mrhscale.io.bundle import read_bundle, write_bundle
    from mrhscale.ops.ood import fit_input_distance

    b = read_bundle(model)
    means = np.random.default_rng(0).normal(0, 1, (4096, len(b["channels"])))
    return write_bundle(model[: -len(".pt")] + "_ood.pt", {**b, "ood": fit_input_distance(means)})


def near_null(model: str, store: str, work: str, repeats: int) -> list[dict]:
    """Near-null predict in-process and on the embedded cluster, with their baselines."""
    from mrhscale.parallel.context import Context

    sync = Context(scheduler="synchronous", quiet=True)
    out = os.path.join(work, "pred.zarr")
    uneven = make_store(os.path.join(work, "uneven.zarr"), SHAPE, chunks=UNEVEN, subjects=SUBJECTS)
    n, _ = predict_seconds(model, store, out, sync, 1)  # warm-up: numba's cache, torch's first calls
    scored = with_score(model)
    s: dict[str, list[float]] = {k: [] for k in ("proc", "bare", "read", "uneven", "emb", "emb_proc", "cluster",
                                                 "ood")}
    for _ in range(repeats):
        s["proc"].append(n / predict_seconds(model, store, out, sync, 1)[1])
        s["ood"].append(n / predict_seconds(scored, store, out, sync, 1)[1])
        s["bare"].append(bare_forward(model, n, 1, 1, 0))
        s["read"].append(n / plain_read_seconds(store, SUBJECTS))
        s["uneven"].append(n / predict_seconds(model, uneven, out, sync, 1)[1])
        s["emb"].append(n / predict_seconds(model, store, out, Context(quiet=True), None)[1])
        s["emb_proc"].append(n / predict_seconds(model, store, out, Context(quiet=True, dask_workers=CORES),
                                                 None)[1])
        s["cluster"].append(cluster_seconds())
    m = _median_rates(s)
    each = ", ".join(f"{p:.0f}" for p in s["proc"])
    return [
        row(f"near-null predict in-process ({len(SUBJECTS)} subjects, {n} brain voxels, torch 1 thread)",
            m["proc"], "voxels/s", "bare forward of the same network, same voxels and threads", m["bare"],
            target=">= 300k voxels/s", met=m["proc"] >= 3e5, note=f"each run: {each}"),
        row("near-null predict in-process with the out-of-distribution score (every trained bundle's)", m["ood"],
            "voxels/s", "the same without the score", m["proc"]),
        row("near-null predict in-process vs the plain read", m["proc"], "voxels/s",
            "Zarr read + decode of the same subjects' mri (every voxel)", m["read"]),
        row("near-null predict in-process, ingest's even chunks", m["proc"], "voxels/s",
            f"the same brains chunked {','.join(map(str, UNEVEN))} (ingest before: a thin last chunk)",
            m["uneven"]),
        row("near-null predict on the embedded cluster, startup and close included", m["emb"], "voxels/s",
            "the in-process predict above", m["proc"], target=">= 150k voxels/s", met=m["emb"] >= 1.5e5,
            note=f"one worker of {CORES} threads in this process; a process cluster's start + close alone: "
                 f"{m['cluster']:.1f} s"),
        row("near-null predict, embedded cluster of threads (predict's default)", m["emb"], "voxels/s",
            f"the embedded cluster of {CORES} worker processes (--dask-workers {CORES})", m["emb_proc"]),
    ]


def depth5(model: str, store: str, work: str, repeats: int) -> list[dict]:
    """Depth-5 predict in-process on one subject against the bare forward, same voxels."""
    from mrhscale.parallel.context import Context

    sync = Context(scheduler="synchronous", quiet=True)
    out = os.path.join(work, "pred5.zarr")
    cores = os.cpu_count() or 1
    t_load = time.perf_counter()
    n, _ = predict_seconds(model, store, out, sync, cores, SUBJECTS[:1])  # warm-up
    t_load = time.perf_counter() - t_load
    scored = with_score(model)
    s: dict[str, list[float]] = {"pred": [], "bare": [], "ood": []}
    for _ in range(repeats):
        s["pred"].append(n / predict_seconds(model, store, out, sync, cores, SUBJECTS[:1])[1])
        s["ood"].append(n / predict_seconds(scored, store, out, sync, cores, SUBJECTS[:1])[1])
        s["bare"].append(bare_forward(model, n, cores, 1, 0))
    m = _median_rates(s)
    return [row(f"depth-5 predict in-process (1 subject, {n} brain voxels, torch {cores} threads)",
                m["pred"], "voxels/s", "bare depth-5 forward on pre-built patches, same voxels and threads",
                m["bare"], target="ratio >= 0.9", met=m["pred"] >= 0.9 * m["bare"],
                note="per run predict/bare: " + ", ".join(f"{p:.0f}/{b:.0f}" for p, b in zip(s["pred"], s["bare"]))
                     + f"; first run (model load, numba cache) {t_load:.1f} s"),
            row("depth-5 predict in-process with the out-of-distribution score", m["ood"], "voxels/s",
                "the same without the score", m["pred"])]


def run(repeats: int = 3) -> list[dict]:
    work = tempfile.mkdtemp(prefix="mrh-bench-feed-")
    try:
        store = make_store(os.path.join(work, "cohort.zarr"), SHAPE, subjects=SUBJECTS)
        null = make_model(os.path.join(work, "null.pt"), depth=0, width=1)
        deep = make_model(os.path.join(work, "d5.pt"), depth=5, width=64)
        return near_null(null, store, work, repeats) + depth5(deep, store, work, repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":  # the spawned cluster's workers re-import this file: keep the guard
    repeats_main(run, __doc__)
