"""Run every mrhscale benchmark and write one results file.

    python -m benchmarks [--full] [--only NAME,...] [--repeats N] [--out benchmarks/RESULTS.md]
    python -m benchmarks --gpu-check        # the GPU machine check (benchmarks/gpu_check.py)

Each module (benchmarks/bench_<name>.py) runs in its own Python process, so that a
crash, a leaked thread pool or a module's memory cannot touch the next one, and so that
each gets its own peak-RSS figure. A module that fails is reported in the table with its
error and the run goes on. The default sizes and repeats (DEFAULT_PLAN) keep the whole
run under ~15 minutes on 2 cores; --full uses each module's own --full size and repeats.
Figures are the modules' own medians of repeats, each beside a baseline measured in the
same run. See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import copy_bandwidth_gbs, fmt_value, machine_info  # noqa: E402

# Run order: the pipeline's stages, then the cohort-scale run, then registration (ANTs, optional).
MODULES = ["ingest", "patches", "stream", "train", "predict", "feed", "precision", "options", "ensemble", "stains",
           "scale", "cohort", "register", "sections", "sections_finetune"]

# Keyword arguments for run() at the default size: reduced repeats where the module's own
# default would push the whole run past ~15 minutes on 2 cores (times measured 2026-11-24).
DEFAULT_PLAN: dict[str, dict] = {
    "ingest": {"repeats": 2},
    "patches": {"repeats": 3},
    "stream": {},
    "train": {"repeats": 2},
    "predict": {"repeats": 2},
    "feed": {"repeats": 2},  # ~4 min
    "precision": {"repeats": 3},
    "options": {"repeats": 2},
    "ensemble": {"repeats": 2},
    "stains": {"repeats": 1},  # ~10 min: three demo-sized trainings; accuracy is deterministic
    "register": {"repeats": 2},
    "sections": {},  # ~5 min: two 40-section stacks, one run each (ANTs is seeded: TRE and r repeat)
    "sections_finetune": {},  # ~4-6 min idle (~15 at load 20): 4 stacks rebuilt, a base net, two finetunes
    "scale": {},
    "cohort": {"sizes": [32, 512]},  # ~15 min; --full: the module's own 32 and 2,000 subjects (hours on 2 cores)
}

_CHILD = r"""
import json, os, resource, sys, time, traceback
sys.path.insert(0, {root!r})
out, name, kw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
res = {{"rows": [], "error": None}}
t0 = time.perf_counter()
try:
    import importlib
    mod = importlib.import_module("benchmarks.bench_" + name)
    res["rows"] = mod.run(**kw)
except BaseException as e:  # report anything, the runner goes on
    res["error"] = f"{{type(e).__name__}}: {{e}}"
    res["traceback"] = traceback.format_exc()[-4000:]
res["seconds"] = time.perf_counter() - t0
res["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
try:  # VmHWM: this process's own high-water mark (ru_maxrss can carry the parent's across vfork+exec)
    with open("/proc/self/status") as fh:
        res["maxrss_mib"] = next(int(x.split()[1]) for x in fh if x.startswith("VmHWM")) / 1024
except (OSError, StopIteration):
    pass
res["children_maxrss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
with open(out, "w") as fh:
    json.dump(res, fh, default=lambda o: o.item() if hasattr(o, "item") else str(o))
"""


def _accepts(name: str) -> set[str]:
    """Keyword arguments the module's run() accepts (read without importing heavy deps twice)."""
    import importlib

    mod = importlib.import_module(f"benchmarks.bench_{name}")
    return set(inspect.signature(mod.run).parameters)


def plan(names: list[str], full: bool, repeats: int | None) -> dict[str, dict]:
    out = {}
    for n in names:
        params = _accepts(n)
        kw = {} if full else dict(DEFAULT_PLAN.get(n, {}))
        kw = {k: v for k, v in kw.items() if k in params}
        if full and "full" in params:
            kw["full"] = True
        if repeats is not None and "repeats" in params:
            kw["repeats"] = repeats
        out[n] = kw
    return out


def run_module(name: str, kw: dict, timeout: float | None) -> dict:
    """Run one module in a child process; returns its rows, error, seconds and peak RSS."""
    fd, path = tempfile.mkstemp(prefix=f"mrh-bench-{name}-", suffix=".json")
    os.close(fd)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-c", _CHILD.format(root=ROOT), path, name, json.dumps(kw)]
    try:
        p = subprocess.run(cmd, cwd=ROOT, timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.perf_counter() - t0
    try:
        with open(path) as fh:
            res = json.load(fh)
    except (OSError, ValueError):
        why = f"timed out after {timeout:.0f} s" if rc is None else f"process exited with status {rc}"
        res = {"rows": [], "error": f"no result: {why}", "seconds": wall}
    finally:
        if os.path.exists(path):
            os.remove(path)
    res["wall"] = wall
    return res


# ------------------------------------------------------------------ report
def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _met(m) -> str:
    return {True: "met", False: "**not met**"}.get(m, "")


def table(rows: list[dict]) -> list[str]:
    lines = ["| Figure | Value | Unit | Baseline (same run) | Baseline value | Ratio | Target | Met | Note |",
             "|---|---:|---|---|---:|---:|---|---|---|"]
    for r in rows:
        ratio = r.get("ratio")
        lines.append("| " + " | ".join(_cell(c) for c in [
            r.get("figure", ""), fmt_value(r.get("value")), r.get("unit", ""), r.get("baseline") or "",
            fmt_value(r.get("baseline_value")), f"x{ratio:.2f}" if isinstance(ratio, (int, float)) else "",
            r.get("target") or "", _met(r.get("met")), r.get("note") or ""]) + " |")
    return lines


def worker_peaks(rows: list[dict]) -> list[dict]:
    """Rows a module reports as peak memory (per worker / per process)."""
    return [r for r in rows if "peak" in str(r.get("figure", "")).lower()
            and str(r.get("unit", "")).lower() in ("mib", "gib", "mb", "gb")]


def write_report(path: str, results: dict, meta: dict) -> None:
    from mrhscale import __version__

    m, bw = meta["machine"], meta["bandwidth"]
    lines = [
        "# mrhscale benchmark results", "",
        f"- date: {meta['date']} (finished {meta['end']})",
        f"- mrhscale version: {__version__}",
        f"- command: `{meta['command']}`",
        f"- size: {'full (--full)' if meta['full'] else 'default (reduced sizes/repeats, see benchmarks/README.md)'}",
        f"- total wall time: {meta['total_s'] / 60:.1f} min",
        f"- load average (1, 5, 15 min) at start: {', '.join(f'{x:.2f}' for x in meta['load_start'])}; "
        f"at end: {', '.join(f'{x:.2f}' for x in meta['load_end'])}"
        + " (the benchmarks themselves keep both cores busy: a load near 2 at the end is their own)"
        + ("  **(machine busy with other work at the start: absolute figures are pessimistic; "
           "ratios to same-run baselines are the meaningful ones)**" if meta["load_start"][0] >= 1.5 else ""),
        "",
        "## Machine", "",
        f"- cores: {m['cores']}; memory: {m['memory_mib'] / 1024:.1f} GiB "
        f"({m.get('available_mib', 0) / 1024:.1f} GiB available at start); CPU: {m['cpu']}",
        f"- memory copy bandwidth (numpy copy of a {bw['bytes'] >> 20} MiB float32 array, median of "
        f"{bw['repeats']}): **{bw['median_gbs']:.2f} GB/s** "
        f"(range {min(bw['all_gbs']):.2f}-{max(bw['all_gbs']):.2f})",
        f"- python {m['python']}, torch {meta['versions'].get('torch')}, dask "
        f"{meta['versions'].get('dask')}, zarr {meta['versions'].get('zarr')}, numba "
        f"{meta['versions'].get('numba')}; {m['platform']}",
        f"- free space in the temporary directory at start: {m['tmp_free_gib']:.0f} GiB",
        f"- runner peak RSS: {meta['runner_maxrss_mib']:.0f} MiB", "",
        "## Summary", "",
        "| Module | Status | Wall time | Peak RSS of the module's process | Largest child's peak RSS | Targets met |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, res in results.items():
        rows = res.get("rows") or []
        tg = [r.get("met") for r in rows if r.get("met") is not None]
        status = "ok" if not res.get("error") else f"**FAILED**: {_cell(res['error'])[:300]}"
        lines.append(f"| {name} | {status} | {res.get('wall', 0):.0f} s | "
                     f"{res.get('maxrss_mib', 0):.0f} MiB | {res.get('children_maxrss_mib', 0):.0f} MiB | "
                     f"{sum(bool(t) for t in tg)}/{len(tg)} |")
    lines += ["", "Peak RSS of the module's process: its VmHWM. Largest child's peak RSS: the biggest "
              "single process the module started and waited for (torchrun rank, subprocess, spawned "
              "worker...), getrusage(RUSAGE_CHILDREN); an upper bound, since Linux can carry the "
              "parent's high-water mark into a child started by vfork+exec. Dask workers' own "
              "peaks, where a module measures them, are in the next section.", ""]
    peaks = [(n, r) for n, res in results.items() for r in worker_peaks(res.get("rows") or [])]
    if peaks:
        lines += ["## Peak memory reported by the modules (per worker)", "",
                  "| Module | Figure | Value | Limit / baseline | Met | Note |", "|---|---|---:|---:|---|---|"]
        for n, r in peaks:
            lines.append(f"| {n} | {_cell(r['figure'])} | {fmt_value(r['value'])} {r['unit']} | "
                         f"{fmt_value(r.get('baseline_value'))} | {_met(r.get('met'))} | "
                         f"{_cell(r.get('note') or '')} |")
        lines.append("")
    for name, res in results.items():
        lines += [f"## {name}", "", f"`benchmarks/bench_{name}.py`, run({_kw(res['kwargs'])}); "
                  f"{res.get('wall', 0):.0f} s.", ""]
        if res.get("error"):
            lines += [f"**FAILED**: `{_cell(res['error'])[:1000]}`", ""]
            if res.get("traceback"):
                lines += ["```", res["traceback"].strip()[-2500:], "```", ""]
        if res.get("rows"):
            lines += table(res["rows"]) + [""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines))
    os.replace(tmp, path)


def _bandwidth() -> dict:
    """copy_bandwidth_gbs() in a child process: its 1 GiB of arrays must not inflate the runner's RSS."""
    code = (f"import json, sys; sys.path.insert(0, {ROOT!r}); "
            "from benchmarks.common import copy_bandwidth_gbs; print(json.dumps(copy_bandwidth_gbs()))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, ValueError, IndexError):
        return copy_bandwidth_gbs(64 << 20)


def _kw(kw: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kw.items())


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for p in ("torch", "dask", "zarr", "numba", "xarray", "distributed"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="each module's full (real-grid) size; slow")
    ap.add_argument("--only", help=f"comma-separated subset of: {','.join(MODULES)}")
    ap.add_argument("--repeats", type=int, help="repeats for every module that takes them")
    ap.add_argument("--out", default=os.path.join("benchmarks", "RESULTS.md"), help="results file")
    ap.add_argument("--json", help="also write all rows and metadata as JSON here")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per module before it is reported as failed (default: none)")
    ap.add_argument("--gpu-check", action="store_true",
                    help="instead: the GPU machine check (torchrun nccl+bf16, predict --device cuda)")
    ap.add_argument("--cpu", action="store_true", help="with --gpu-check: the same steps on the CPU")
    a = ap.parse_args(argv)
    if a.gpu_check:
        from benchmarks.gpu_check import main as gpu_check

        return gpu_check(cpu=a.cpu, small=a.cpu)
    names = MODULES if not a.only else [n.strip().removeprefix("bench_") for n in a.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        ap.error(f"--only: unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    if a.repeats is not None and a.repeats < 1:
        ap.error("--repeats must be >= 1")
    command = "python -m benchmarks" + ("" if argv is None and len(sys.argv) <= 1 else " " + shlex.join(
        sys.argv[1:] if argv is None else argv))
    start = _dt.datetime.now(_dt.UTC)
    t0 = time.perf_counter()
    meta = {"date": start.strftime("%Y-%m-%d %H:%M UTC"), "command": command, "full": a.full,
            "machine": machine_info(), "load_start": os.getloadavg(), "versions": _versions()}
    print(f"machine: {meta['machine']['cores']} cores, {meta['machine']['memory_mib'] / 1024:.1f} GiB, "
          f"load {meta['load_start'][0]:.2f}", flush=True)
    meta["bandwidth"] = _bandwidth()
    print(f"memory copy bandwidth: {meta['bandwidth']['median_gbs']:.2f} GB/s", flush=True)
    plans = plan(names, a.full, a.repeats)
    results: dict[str, dict] = {}
    for n in names:
        print(f"\n=== bench_{n} run({_kw(plans[n])})", flush=True)
        try:
            res = run_module(n, plans[n], a.timeout)
        except Exception as e:  # noqa: BLE001 - the runner itself must go on
            res = {"rows": [], "error": f"{type(e).__name__}: {e}", "wall": 0}
        res["kwargs"] = plans[n]
        results[n] = res
        if res.get("error"):
            print(f"bench_{n} FAILED: {res['error']}", flush=True)
        else:
            from benchmarks.common import print_rows

            try:
                print_rows(res["rows"])
            except Exception:  # noqa: BLE001 - a row without a numeric value still goes in the file
                pass
        print(f"bench_{n}: {res['wall']:.0f} s", flush=True)
        meta.update(end=_dt.datetime.now(_dt.UTC).strftime("%H:%M UTC"),
                    total_s=time.perf_counter() - t0, load_end=os.getloadavg(),
                    runner_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        write_report(a.out, results, meta)  # after every module: a killed run still leaves results
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1, default=str)
    print(f"\nwrote {a.out} ({meta['total_s'] / 60:.1f} min)")
    return 1 if any(r.get("error") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
