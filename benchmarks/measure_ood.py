"""Issue 31's table on a finished demo folder (``mrhscale demo --out DEMO``): the held-out
brain's uncertainty and out-of-distribution score under each calibration, same members.

Variants (each predicted on the held-out brain, scored against its reference; the map, and
so r, is the same in every row):
``before``: the previous demo's recipe (the validation brain alone, 4 value bins, no score);
``brains_value4``: the four calibration brains, 4 value bins, no score;
``main``: the demo's own prediction (the four brains, 4 value bins, widened by the score);
``brains_wm_lesion``: the four brains, a factor per tissue, widened by the score.

    python benchmarks/measure_ood.py DEMO OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from measure_uncertainty import scores, with_calibration  # noqa: E402

from mrhscale.io.bundle import read_bundle, write_bundle  # noqa: E402
from mrhscale.parallel.context import Context  # noqa: E402
from mrhscale.stages.calibrate import calibration_on_brains  # noqa: E402
from mrhscale.stages.predict import predict  # noqa: E402
from mrhscale.stores.cohort import CohortStore  # noqa: E402
from mrhscale.stores.predictions import PredictionStore  # noqa: E402


def ood_ratio(pred: str, cohort: str, sid: str) -> dict:
    """The score inside the artefact over the rest, its median, and the share above the training 99th."""
    ds = CohortStore.open(cohort).open_subject(sid)
    p = PredictionStore.open(pred).open_subject(sid)
    if "ood" not in p:
        return {}
    xyz = ("x", "y", "z")
    ood = p["ood"].transpose(*xyz).values.astype(np.float64)
    mask = ds["mask"].transpose(*xyz).values.astype(bool)
    art = ds["artefact"].transpose(*xyz).values.astype(bool)
    q99 = p["ood"].attrs["training_quantiles"]["99"]
    return {"ood_artefact_ratio": float(ood[mask & art].mean() / ood[mask & ~art].mean()),
            "ood_median": float(np.median(ood[mask & ~art])), "ood_median_artefact": float(np.median(ood[mask & art])),
            "share_above_q99": float((ood[mask] > q99).mean()), "share_above_q99_artefact": float((ood[mask & art] > q99).mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("demo")
    ap.add_argument("out")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    summary = json.load(open(os.path.join(a.demo, "summary.json")))
    sid, cal = summary["held_out"], summary["calibration_subjects"]
    cohort = os.path.join(a.demo, "cohort.zarr")
    bundle = read_bundle(os.path.join(a.demo, "run", "model.pt"))
    plain = {k: v for k, v in bundle.items() if k != "ood"}
    stains = list(bundle["stains"])
    results, timing = {}, {}

    def run(name: str, make) -> None:
        t0 = time.perf_counter()
        path = write_bundle(os.path.join(a.out, f"{name}.pt"), make())
        timing[f"calibrate_{name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        predict(path, cohort, os.path.join(a.out, f"{name}.zarr"), subjects=[sid], overwrite=True,
                ctx=Context(scheduler="synchronous", quiet=True))
        timing[f"predict_{name}"] = time.perf_counter() - t0
        results[name] = {**scores(os.path.join(a.out, f"{name}.zarr"), cohort, sid, stains),
                         **ood_ratio(os.path.join(a.out, f"{name}.zarr"), cohort, sid)}
        print(name, json.dumps(results[name]), flush=True)

    def brains(b: dict, subjects: list[str], groups: str):
        return lambda: with_calibration(b, calibration_on_brains(b, subjects, groups, cohort))

    results["main"] = {**scores(os.path.join(a.demo, "pred.zarr"), cohort, sid, stains),
                       **ood_ratio(os.path.join(a.demo, "pred.zarr"), cohort, sid)}
    print("main", json.dumps(results["main"]), flush=True)
    run("before", brains(plain, cal[:1], "value:4"))
    run("brains_value4", brains(plain, cal, "value:4"))
    run("brains_wm_lesion", brains(bundle, cal, "wm,lesion"))
    powers = {t: c.get("ood_power") for t, c in bundle["uncertainty"]["calibration"]["stains"].items()}
    json.dump({"results": results, "timing": timing, "ood_power": powers, "calibration_subjects": cal},
              open(os.path.join(a.out, "results.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
