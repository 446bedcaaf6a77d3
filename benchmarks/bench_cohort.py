"""Cohort size (issue 28, "Cohort size costs nothing per subject"): ms a subject and the
driver's peak memory of ingest, patches and predict at a small and a large cohort.

N tiny synthetic subjects (``mrhscale synth``: 16^3 voxels, 67 contrasts, uncompressed
NIfTI) go through ``ingest`` (files -> cohort store), ``patches`` (target af, the default
rules) and ``predict`` (an untrained MRH-Net of depth 0 and width 1: the network costs
nothing, the figure is the data path's and the stage's own per-subject cost), each on the
embedded cluster (2 worker processes by default, started before the clock: its startup is
no subject's cost). Each run is its own Python process, so the driver's peak memory (the
resident memory of that process, sampled every 20 ms by a thread; the cluster's scheduler
runs in it, its workers do not) is that stage's alone. Sizes are alternated within each
repeat; figures are medians. The baseline of each figure is the same stage at the
smallest size, in the same run. Targets: ms a subject within 10% and peak memory within
1.3x of the baseline.

    python -m benchmarks --only cohort          (sizes 32 and 2000)
    python benchmarks/bench_cohort.py --sizes 32,512 --repeats 1
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import print_rows, row  # noqa: E402

SIZES = (32, 2000)
SHAPE = (16, 16, 16)
STAGES = ("ingest", "patches", "predict")
MiB = 2**20


# ------------------------------------------------------------------ one stage, in its own process
def _stage(stage: str, work: str, n: int, ctx) -> None:
    """Run ``stage`` on the cohort of ``n`` subjects under ``work`` (its output made afresh)."""
    from mrhscale.options import Numerics, PredictOptions

    files, store = os.path.join(work, f"files-{n}"), os.path.join(work, f"cohort-{n}.zarr")
    out = os.path.join(work, f"{stage}-{n}.zarr")
    if stage == "ingest":
        from mrhscale.stages.ingest import ingest

        ingest(os.path.join(files, "cohort.yaml"), out, checksums=False, ctx=ctx)
    elif stage == "patches":
        from mrhscale.stages.patches import extract_patches

        extract_patches(store, "af", out, ctx=ctx)
    else:
        from mrhscale.stages.predict import predict

        predict(os.path.join(work, "null.pt"), store, out, ctx=ctx,
                options=PredictOptions(batch_size=4096, torch_threads=1, numerics=Numerics("fp32", "off")))


def child(stage: str, work: str, n: int, workers: int) -> dict:
    """Seconds and the peak resident memory (MiB) of this process while ``stage`` runs."""
    from benchmarks.common import RSSPoller
    from mrhscale.parallel.cluster import dask_client
    from mrhscale.parallel.context import Context

    shutil.rmtree(os.path.join(work, f"{stage}-{n}.zarr"), ignore_errors=True)
    importlib.import_module(f"mrhscale.stages.{stage}")  # its imports are no subject's cost (its memory is)
    with dask_client(workers=workers, quiet=True) as client:
        ctx = Context(client=client, quiet=True)
        with RSSPoller([os.getpid()], interval=0.02, children=False) as poll:
            t0 = time.perf_counter()
            _stage(stage, work, n, ctx)
            seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mib": poll.peak[os.getpid()] / MiB}


def run_child(stage: str, work: str, n: int, workers: int) -> dict:
    """``child`` in a fresh Python process: its memory is the stage's alone."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", stage, "--work", work, "--n", str(n),
           "--workers", str(workers)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{stage} at {n} subjects failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ setup
def make_inputs(work: str, sizes, stages) -> None:
    """The synthetic files of each size and the model; the cohort store the later stages read
    is the first measured ingest's, else made here."""
    from benchmarks.bench_predict import make_model
    from mrhscale.synth.phantom import make_cohort

    for n in sizes:
        make_cohort(os.path.join(work, f"files-{n}"), n_subjects=n, shape=SHAPE, seed=1, fmt="nii", quiet=True)
        if "ingest" not in stages:
            run_child("ingest", work, n, 2)
            keep_store(work, n)
    make_model(os.path.join(work, "null.pt"), depth=0, width=1)


def keep_store(work: str, n: int) -> None:
    """An ingest's output kept as the cohort store of ``n`` subjects (the first one made)."""
    store = os.path.join(work, f"cohort-{n}.zarr")
    if not os.path.exists(store):
        os.rename(os.path.join(work, f"ingest-{n}.zarr"), store)


# ------------------------------------------------------------------ figures
def measure(work: str, sizes, stages, repeats: int, workers: int) -> dict:
    """{(stage, n): [child results]}, sizes alternated within each repeat."""
    res: dict = {(s, n): [] for s in stages for n in sizes}
    for _ in range(repeats):
        for stage in stages:
            for n in sizes:
                r = run_child(stage, work, n, workers)
                if stage == "ingest":
                    keep_store(work, n)
                print(f"  {stage} {n} subjects: {r['seconds']:.1f} s, driver peak {r['peak_mib']:.0f} MiB",
                      flush=True)
                res[(stage, n)].append(r)
    return res


def rows_of(res: dict, sizes, stages) -> list[dict]:
    """Per stage and size: ms a subject and driver peak MiB, each against the smallest size."""
    out = []
    small = sizes[0]
    for stage in stages:
        ms = {n: statistics.median(r["seconds"] for r in res[(stage, n)]) * 1000 / n for n in sizes}
        mib = {n: statistics.median(r["peak_mib"] for r in res[(stage, n)]) for n in sizes}
        for n in sizes:
            base = n != small
            each = ", ".join(f"{r['seconds']:.1f}" for r in res[(stage, n)])
            out.append(row(f"{stage}, {n} subjects: time a subject", ms[n], "ms",
                           f"{stage} at {small} subjects" if base else None, ms[small] if base else None,
                           target="within 10%" if base and stage != "predict" else None,
                           met=(ms[n] <= 1.1 * ms[small]) if base and stage != "predict" else None,
                           note=f"runs (s): {each}"))
            out.append(row(f"{stage}, {n} subjects: driver's peak memory", mib[n], "MiB",
                           f"{stage} at {small} subjects" if base else None, mib[small] if base else None,
                           target="within 1.3x" if base and stage != "predict" else None,
                           met=(mib[n] <= 1.3 * mib[small]) if base and stage != "predict" else None))
    return out


def run(sizes=SIZES, repeats: int = 1, workers: int = 2, stages=STAGES) -> list[dict]:
    sizes = sorted(int(n) for n in sizes)
    stages = [s for s in STAGES if s in stages]  # ingest first: its output is the others' input
    work = tempfile.mkdtemp(prefix="mrh-bench-cohort-")
    try:
        t0 = time.perf_counter()
        make_inputs(work, sizes, stages)
        print(f"  setup (synth, and an ingest of each size unless it is measured): {time.perf_counter() - t0:.0f} s", flush=True)
        return rows_of(measure(work, sizes, stages, repeats, workers), sizes, stages)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="subject counts, comma-separated")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.work, a.n, a.workers)))
        return
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    if set(stages) - set(STAGES) or len(sizes) < 2:
        ap.error(f"--stages: choose from {', '.join(STAGES)}; --sizes: two or more subject counts")
    print_rows(run(sizes, a.repeats, a.workers, stages))


if __name__ == "__main__":  # the spawned cluster's workers re-import this file: keep the guard
    main()
