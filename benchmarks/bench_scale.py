"""Realistic-scale run: a 10-subject cohort through ingest -> patches -> 1 training epoch -> predict.

Builds 10 synthetic subjects (mrhscale.synth.phantom, uncompressed NIfTI, 67 channels), then on
one embedded Dask cluster of 2 worker processes whose memory limit is set BELOW the
cohort's size (each worker's limit x 2 < the cohort's float32 MRI bytes):
  ingest (files -> cohort.zarr), extract_patches (stride 6, target af, 5% val),
  `mrhscale train` for one epoch at depth 5 (its own process, torch on all cores),
  predict of one subject (joins the same cluster).
For each stage: wall time, throughput, and peak RSS of each Dask worker process (psutil,
sampled every 50 ms from the client side; worker restarts are detected by pid) or of the
training process and its children. There is no baseline: the figures are the scale
behaviour, and the target is that every stage finishes with each worker's peak under
its limit (no worker killed or restarted).
Default: 10 subjects of 100x64x140 (1/8 of the real grid, 2.4 GB cohort, 1 GiB per
worker); --full: 10 subjects of 200x128x280 (19 GB cohort, 3 GiB per worker; ~19 GB of
NIfTI on disk, several minutes per stage). Everything is written under a temporary
folder (--workdir, default the system temp dir; free space is checked first) and deleted
at the end. Setup (writing the synthetic files) is reported but not part of any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from mrhscale.parallel.context import Context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import RSSPoller, print_rows, row  # noqa: E402

C = 67
REAL = (200, 128, 280)
REDUCED = (100, 64, 140)
MiB = 2**20


def _train_cmd(patches: str, out: str, threads: int) -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "mrhscale")
    cli = [exe] if os.path.exists(exe) else [sys.executable, "-m", "mrhscale"]
    return [*cli, "train", patches, "--out", out, "--depth", "5", "--epochs", "1",
            "--threads", str(threads), "--precision", "fp32", "--compile", "off", "-q"]  # as before #19


def _train(patches: str, out: str, cap_s: float) -> dict:
    """One epoch of `mrhscale train` in its own process; peak RSS of it and its children.

    Stopped with SIGTERM (the trainer checkpoints and exits) if it runs past ``cap_s``.
    """
    threads = os.cpu_count() or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    p = subprocess.Popen(_train_cmd(patches, out, threads), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    capped = False
    with RSSPoller([p.pid]) as poll:
        try:
            _, err = p.communicate(timeout=cap_s)
        except subprocess.TimeoutExpired:
            capped = True
            p.send_signal(signal.SIGTERM)
            try:
                _, err = p.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
    wall = time.perf_counter() - t0
    res = {"wall": wall, "peak": poll.peak.get(p.pid, 0), "capped": capped, "rc": p.returncode,
           "metrics": None}
    mpath = os.path.join(out, "metrics.json")
    if os.path.exists(mpath):
        with open(mpath) as fh:
            ep = json.load(fh).get("epochs") or []
        res["metrics"] = ep[-1] if ep else None
    if not capped and p.returncode != 0:
        raise RuntimeError(f"mrhscale train failed ({p.returncode}): {err[-2000:]}")
    return res


def run(full: bool = False, workdir: str | None = None, subjects: int = 10,
        memory_limit: int | None = None, train_cap_s: float = 600.0,
        shape: tuple[int, int, int] | None = None) -> list[dict]:
    from mrhscale.options import Numerics, PatchOptions, PredictOptions
    from mrhscale.parallel.cluster import dask_client
    from mrhscale.stages.ingest import ingest
    from mrhscale.stages.patches import extract_patches
    from mrhscale.stages.predict import predict
    from mrhscale.synth.phantom import make_cohort

    shape = tuple(shape) if shape else (REAL if full else REDUCED)
    limit = memory_limit or ((3 << 30) if full else (1 << 30))
    n_workers = 2
    vox = int(np.prod(shape))
    cohort_bytes = subjects * vox * C * 4
    below = n_workers * limit < cohort_bytes  # the point of the run; a tiny smoke test may break it
    base = workdir or tempfile.gettempdir()
    need = cohort_bytes * 2.3  # NIfTI files (~1x) + compressed store (~0.8x) + patches + predictions
    free = shutil.disk_usage(base).free
    if free < need:
        raise RuntimeError(f"{base}: {free / 2**30:.0f} GiB free, need ~{need / 2**30:.0f} GiB; "
                           "pass workdir= (--workdir) on a larger disk")
    work = tempfile.mkdtemp(prefix="mrh-bench-scale-", dir=base)
    grid = "x".join(map(str, shape))
    note0 = (f"{subjects} subjects {grid}x{C}, cohort {cohort_bytes / 2**30:.2f} GiB float32; "
             f"{n_workers} workers x {limit / 2**30:.2f} GiB limit")
    rows = []
    try:
        t0 = time.perf_counter()
        manifest = make_cohort(os.path.join(work, "files"), n_subjects=subjects, shape=shape, seed=7,
                               fmt="nii", quiet=True)
        t_setup = time.perf_counter() - t0
        print(f"setup: {subjects} synthetic subjects {grid} written in {t_setup:.0f} s", flush=True)
        cohort = os.path.join(work, "cohort.zarr")
        patches = os.path.join(work, "patches.zarr")
        run_dir = os.path.join(work, "run")
        preds = os.path.join(work, "preds.zarr")
        peaks: dict[str, float] = {}
        restarts: dict[str, bool] = {}

        with dask_client(workers=n_workers, memory_limit=limit, quiet=True) as client:
            def stage(name, fn):
                pids0 = sorted(client.run(os.getpid).values())
                with RSSPoller(pids0, children=False) as poll:
                    t = time.perf_counter()
                    out = fn()
                    dt = time.perf_counter() - t
                pids1 = sorted(client.run(os.getpid).values())
                peaks[name] = max(poll.peak.values()) if poll.peak else float("nan")
                restarts[name] = pids0 != pids1 or bool(poll.lost)
                print(f"{name}: {dt:.1f} s, peak worker RSS {peaks[name] / MiB:.0f} MiB"
                      f"{' (WORKER RESTARTED)' if restarts[name] else ''}", flush=True)
                return out, dt, poll.peak

            _, t_ing, p_ing = stage("ingest", lambda: ingest(manifest, cohort,
                                                             ctx=Context(client=client, quiet=True)))
            summ, t_pat, p_pat = stage("patches", lambda: extract_patches(
                cohort, "af", patches, options=PatchOptions(stride=6, val_fraction=0.05, seed=0),
                ctx=Context(quiet=True)))
            n_pat = summ["n_train"] + summ["n_val"]

            # training: its own process (torch on all cores); the idle workers keep their memory
            tr = _train(patches, run_dir, train_cap_s)
            print(f"train: {tr['wall']:.1f} s, peak RSS {tr['peak'] / MiB:.0f} MiB"
                  f"{' (CAPPED)' if tr['capped'] else ''}", flush=True)

            model = os.path.join(run_dir, "model.pt")
            first = "s01"
            pres, t_pred, p_pred = stage("predict", lambda: predict(
                model, cohort, preds, subjects=[first], options=PredictOptions(numerics=Numerics("fp32", "off")),
                ctx=Context(scheduler=client.scheduler.address, quiet=True))
            ) if os.path.exists(model) else (None, float("nan"), {})

        mb = cohort_bytes / 1e6
        lim_mib = limit / MiB

        def mem_row(name, peak_map):
            pk = max(peak_map.values()) / MiB if peak_map else float("nan")
            per = ", ".join(f"{v / MiB:.0f}" for v in peak_map.values())
            return row(f"{name}: peak RSS per Dask worker (max of {n_workers})", pk, "MiB",
                       "worker memory limit", lim_mib, "peak worker memory <= limit, no restart",
                       bool(pk <= lim_mib and not restarts.get(name)),
                       note=f"workers: {per} MiB; restarted: {'yes' if restarts.get(name) else 'no'}")

        rows.append(row("setup: write synthetic NIfTI cohort (not a stage)", t_setup, "s",
                        note=f"{subjects} subjects, uncompressed .nii"))
        rows.append(row("ingest: wall time", t_ing, "s", note=note0))
        rows.append(row("ingest: throughput", mb / t_ing, "MB/s", note="float32 MRI bytes per second"))
        rows.append(mem_row("ingest", p_ing))
        rows.append(row("patches: wall time", t_pat, "s",
                        note=f"{summ['n_train']} train + {summ['n_val']} val of "
                             f"{summ.get('n_candidates', '?')} candidates, stride 6"))
        rows.append(row("patches: throughput", n_pat / t_pat, "patches/s",
                        note=f"cohort read at {mb / t_pat:.0f} MB/s"))
        rows.append(mem_row("patches", p_pat))
        m = tr["metrics"] or {}
        cap_note = (f"CAPPED at {train_cap_s:.0f} s (SIGTERM): epoch not finished" if tr["capped"]
                    else "1 full epoch")
        rows.append(row("train 1 epoch depth 5: wall time", tr["wall"], "s",
                        note=f"{cap_note}; process start, data open and bundle save included"))
        rows.append(row("train 1 epoch depth 5: throughput", m.get("train_patches_per_s", float("nan")),
                        "patches/s", note=f"trainer's own metric of its first (only) epoch, warm-up included "
                                         f"(bench_train: median of later epochs); {m.get('steps', '?')} "
                                         f"steps, {m.get('epoch_s', float('nan')):.0f} s in the epoch loop"))
        rows.append(row("train: peak RSS of the training process (+children)", tr["peak"] / MiB, "MiB",
                        note="torch, not a Dask worker: no Dask limit applies"))
        if pres is not None:
            nb = pres.brain_voxels  # a PredictResult (the dict test here read NaN since results became classes)
            rows.append(row(f"predict 1 subject ({first}): wall time", t_pred, "s",
                            note=f"{nb} brain voxels, joins the same cluster"))
            rows.append(row("predict: throughput", nb / t_pred, "voxels/s"))
            rows.append(mem_row("predict", p_pred))
        else:
            rows.append(row("predict: not run", float("nan"), "s", met=False,
                            note="training produced no model bundle (capped before the end?)"))
        allpk = max([max(p.values()) for p in (p_ing, p_pat, p_pred) if p] or [0]) / MiB
        rows.append(row("peak worker memory <= limit (all Dask stages)", allpk, "MiB", "worker memory limit",
                        lim_mib, "<= limit, no worker restart",
                        bool(allpk <= lim_mib and not any(restarts.values()) and below),
                        note=f"cohort {cohort_bytes / 2**30:.2f} GiB {'>' if below else 'NOT >'} total worker memory "
                             f"{n_workers * limit / 2**30:.2f} GiB"))
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="real grid 200x128x280 (~19 GB on disk)")
    ap.add_argument("--workdir", help="folder for the temporary files (needs ~2.3x the cohort free)")
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--memory-limit-gib", type=float, help="per Dask worker (default 1, --full 3)")
    ap.add_argument("--train-cap-s", type=float, default=600.0,
                    help="stop training (SIGTERM) after this many seconds and say so")
    ap.add_argument("--json")
    a = ap.parse_args()
    t0 = time.perf_counter()
    rows = run(a.full, a.workdir, a.subjects,
               int(a.memory_limit_gib * 2**30) if a.memory_limit_gib else None, a.train_cap_s)
    print_rows(rows)
    print(f"(benchmark wall time {time.perf_counter() - t0:.0f} s)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
