"""Shared benchmark helpers: medians of repeats, rows, machine facts."""

from __future__ import annotations

import os
import statistics
import time


def timed(fn, repeats: int = 3, warmup: int = 0) -> tuple[float, list[float]]:
    """Median seconds of ``repeats`` calls (after ``warmup`` untimed calls), and all times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def row(figure, value, unit, baseline=None, baseline_value=None, target=None, met=None, note=""):
    ratio = (value / baseline_value) if (baseline_value not in (None, 0) and value is not None) else None
    return {
        "figure": figure, "value": value, "unit": unit, "baseline": baseline,
        "baseline_value": baseline_value, "ratio": ratio, "target": target, "met": met, "note": note,
    }


def print_rows(rows) -> None:
    for r in rows:
        base = ""
        if r.get("baseline") is not None and r.get("baseline_value") is not None:
            base = f"  vs {r['baseline']}: {r['baseline_value']:.4g}"
            if r.get("ratio") is not None:
                base += f"  (x{r['ratio']:.2f})"
        tgt = f"  target: {r['target']}" if r.get("target") else ""
        met = {True: "  [met]", False: "  [NOT met]"}.get(r.get("met"), "")
        print(f"{r['figure']}: {r['value']:.4g} {r['unit']}{base}{tgt}{met}" + (f"  ({r['note']})" if r.get("note") else ""))


def machine() -> dict:
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = int(fh.readline().split()[1]) // 1024
    except OSError:
        pass
    return {"cores": os.cpu_count(), "memory_mib": mem}


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- helpers for the runner / scale run
def copy_bandwidth_gbs(nbytes: int = 512 << 20, repeats: int = 7) -> dict:
    """Memory copy bandwidth (numpy copy of a large float32 array): median and all repeats, GB/s.

    GB/s counts the bytes copied (not read + written), the same convention as the patch
    kernel's bandwidth bound; the untimed warm-up touches both arrays first.
    """
    import numpy as np

    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    med, times = timed(lambda: np.copyto(dst, src), repeats=repeats, warmup=1)
    return {"median_gbs": nbytes / med / 1e9, "all_gbs": [nbytes / t / 1e9 for t in times],
            "bytes": nbytes, "repeats": repeats}


def machine_info() -> dict:
    """Cores, memory, CPU model, load averages and free disk of the temporary directory."""
    import platform
    import shutil
    import tempfile

    info = machine()
    info["cpu"] = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable"):
                    info["available_mib"] = int(line.split()[1]) // 1024
    except OSError:
        pass
    info["load"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["python"] = platform.python_version()
    info["platform"] = platform.platform()
    du = shutil.disk_usage(tempfile.gettempdir())
    info["tmp_free_gib"] = du.free / 2**30
    return info


class RSSPoller:
    """Poll the resident memory of a set of processes (and their children) in a thread.

    ``peak`` maps each pid given to the highest RSS seen, in bytes, summed over the
    process and its child processes at each sample (a Dask worker's nanny is not counted:
    give the worker pids). Use as a context manager; ``reset()`` starts a new stage.
    """

    def __init__(self, pids, interval: float = 0.05, children: bool = True):
        import threading

        import psutil

        self.procs = {}
        for p in pids:
            try:
                self.procs[p] = psutil.Process(p)
            except psutil.Error:
                pass
        self.children = children
        self.interval = interval
        self.peak = {p: 0 for p in self.procs}
        self.lost: set[int] = set()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil

        for pid, p in self.procs.items():
            try:
                rss = p.memory_info().rss
                if self.children:
                    for c in p.children(recursive=True):
                        try:
                            rss += c.memory_info().rss
                        except psutil.Error:
                            pass
                self.peak[pid] = max(self.peak[pid], rss)
            except psutil.Error:  # a worker that died (restarted) shows up here
                self.lost.add(pid)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = {p: 0 for p in self.procs}

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.sample()


def fmt_value(v) -> str:
    """A number for a results table: 4 significant digits, thousands kept readable."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        if v != v:  # NaN
            return "nan"
        a = abs(v)
        if a >= 1e5:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        return f"{v:.4g}"
    return str(v)


def predict_rates(cases: dict[str, dict], store: str, work: str, repeats: int, batch_size: int) -> tuple[dict, int]:
    """Voxels/s of ``mrhscale predict`` for each case (name -> predict keywords, ``model``
    included) on one embedded Dask worker x all cores, eager fp32, cases alternated after
    an untimed run each (it loads the model on the worker); medians, and the brain voxels."""
    import shutil

    from mrhscale.options import Numerics, PredictOptions
    from mrhscale.parallel.cluster import dask_client
    from mrhscale.parallel.context import Context
    from mrhscale.stages.predict import predict

    rates: dict = {k: [] for k in cases}
    n = 0
    with dask_client(workers=1, threads_per_worker=1, quiet=True) as client:
        def go(name, k):
            out = os.path.join(work, f"pred-{k}.zarr")
            kw = dict(cases[name])
            model = kw.pop("model")
            options = PredictOptions(batch_size=batch_size, torch_threads=os.cpu_count() or 1,
                                     numerics=Numerics("fp32", "off"), **kw)  # tta...
            t0 = time.perf_counter()
            r = predict(model, store, out, options=options, ctx=Context(scheduler=client.scheduler.address, quiet=True))
            dt = time.perf_counter() - t0
            shutil.rmtree(out, ignore_errors=True)
            return r.brain_voxels, dt

        for name in cases:
            n, _ = go(name, 0)
        for k in range(repeats):
            for name in cases:
                rates[name].append(n / go(name, k + 1)[1])
    return {k: statistics.median(v) for k, v in rates.items()}, n


def repeats_main(run, doc: str) -> None:
    """A benchmark module's command line: ``--repeats N``, then its rows printed."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    print_rows(run(repeats=ap.parse_args().repeats))
