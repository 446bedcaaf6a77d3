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
