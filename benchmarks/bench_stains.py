"""One network for several stains against one network per stain (docs/training.md,
"Several stains"): time and accuracy, both sides trained the same way in the same run.

The demo's cohort (5 synthetic brains 48x32x64, the held-out s05 on its own scanner with
a field-of-view artefact; train s01-s03, validation s04, stride 1) and its recipe (``fast``,
depth 5, one network each, eager fp32, 1 process x all cores):

- accuracy: the held-out brain's Pearson r of each stain, the joint network's against the
  network trained on that stain alone (#17 asks: within 0.02);
- train: `mrhscale train` of the joint store against the single-stain runs one after
  another (wall time of the commands, patches/s = epochs x the stores' train patches / wall);
- predict: the joint bundle against the single-stain bundles one after another on the
  held-out brain (1 embedded Dask worker), voxels/s of maps (brain voxels x stains / wall).

Accuracy is deterministic (seeded); times are medians of ``--repeats``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from mrhscale.parallel.context import Context

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import repeats_main, row  # noqa: E402

STAINS = ("mbp", "nf")
HELD_OUT, VAL, TRAIN = "s05", "s04", ["s01", "s02", "s03"]


def cohort(work: str) -> str:
    """The demo's synthetic cohort, ingested."""
    from mrhscale.options import SynthVariation
    from mrhscale.stages.ingest import ingest
    from mrhscale.synth.phantom import make_cohort

    manifest = make_cohort(os.path.join(work, "files"), n_subjects=5, shape=(48, 32, 64), seed=0, fmt="nii.gz",
                           quiet=True,
                           variation=SynthVariation(scanner_variation=[HELD_OUT], artefact=[HELD_OUT]))
    store = os.path.join(work, "cohort.zarr")
    ingest(manifest, store, chunks=(32, 16, 32), ctx=Context(scheduler="threads", quiet=True))
    return store


def patch_stores(store: str, work: str) -> dict[str, str]:
    """A patch store per single stain and one of them all."""
    from mrhscale.options import PatchOptions
    from mrhscale.stages.patches import extract_patches

    out = {}
    for target in (*STAINS, ",".join(STAINS)):
        out[target] = os.path.join(work, f"p-{target.replace(',', '+')}.zarr")
        extract_patches(store, target, out[target], subjects=[*TRAIN, VAL],
                        ctx=Context(scheduler="threads", quiet=True),
                        options=PatchOptions(stride=1, val_subjects=[VAL]))
    return out


def _train(patches: str, out: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [os.path.join(os.path.dirname(sys.executable), "mrhscale"), "train", patches, "--out", out,
           "--recipe", "fast", "--depth", "5", "--precision", "fp32", "--compile", "off", "-q"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"train {patches}: {p.stderr[-2000:]}")
    return time.perf_counter() - t0


def _predict(model: str, store: str, out: str, client) -> float:
    from mrhscale.options import Numerics, PredictOptions
    from mrhscale.parallel.context import Context
    from mrhscale.stages.predict import predict

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    predict(model, store, out, subjects=[HELD_OUT], ctx=Context(scheduler=client.scheduler.address, quiet=True),
            options=PredictOptions(torch_threads=os.cpu_count() or 1, numerics=Numerics("fp32", "off")))
    return time.perf_counter() - t0


def held_out_r(pred: str, store: str, stain: str, work: str) -> float:
    from mrhscale.options import EvaluateOptions
    from mrhscale.stages.evaluate import evaluate

    out = os.path.join(work, f"ev-{os.path.basename(pred)}-{stain}")
    shutil.rmtree(out, ignore_errors=True)
    ev = evaluate(pred, store, out, stains=[stain], subjects=[HELD_OUT], ctx=Context(quiet=True),
                  options=EvaluateOptions(montage_subjects=0)).by_stain[stain]
    return float(ev["pooled"]["virtual"]["pearson"])


def run(full: bool = False, repeats: int = 1) -> list[dict]:
    from mrhscale.parallel.cluster import dask_client

    del full  # one size
    work = tempfile.mkdtemp(prefix="mrh-bench-stains-")
    joint = ",".join(STAINS)
    try:
        store = cohort(work)
        stores = patch_stores(store, work)
        times: dict = {k: [] for k in stores}
        for _ in range(max(1, repeats)):
            for k, p in stores.items():
                times[k].append(_train(p, os.path.join(work, f"run-{k}")))
        models = {k: os.path.join(work, f"run-{k}", "model.pt") for k in stores}
        pt: dict = {k: [] for k in stores}
        with dask_client(workers=1, threads_per_worker=1, quiet=True) as client:
            for k in stores:  # untimed: loads each model on the worker
                _predict(models[k], store, os.path.join(work, f"pred-{k}.zarr"), client)
            for _ in range(max(1, repeats)):
                for k in stores:
                    pt[k].append(_predict(models[k], store, os.path.join(work, f"pred-{k}.zarr"), client))
        r = {(k, s): held_out_r(os.path.join(work, f"pred-{k}.zarr"), store, s, work)
             for k in stores for s in (STAINS if k == joint else [k])}
        rows = accuracy_rows(r, joint)
        rows += time_rows(stores, times, pt, store, joint)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def accuracy_rows(r: dict, joint: str) -> list[dict]:
    return [row(f"held-out Pearson r of {s}, one network of {joint} (fast, depth 5)", r[(joint, s)], "r",
                f"a network of {s} alone", r[(s, s)], target="within 0.02 of the single-stain r",
                met=abs(r[(joint, s)] - r[(s, s)]) <= 0.02, note=f"difference {r[(joint, s)] - r[(s, s)]:+.3f}")
            for s in STAINS]


def time_rows(stores: dict, times: dict, pt: dict, store: str, joint: str) -> list[dict]:
    import zarr

    from mrhscale.training.config import RECIPES

    n = {k: int(zarr.open_group(p, mode="r").attrs["n_train"]) for k, p in stores.items()}
    epochs = RECIPES["fast"]["epochs"]
    med = {k: statistics.median(v) for k, v in times.items()}
    sep = sum(med[s] for s in STAINS)
    brain = int(zarr.open_group(store, mode="r")[HELD_OUT]["mask"][:].sum())
    pmed = {k: statistics.median(v) for k, v in pt.items()}
    psep = sum(pmed[s] for s in STAINS)
    return [
        row(f"train one network of {joint} (fast, depth 5, eager fp32)", epochs * n[joint] / med[joint],
            "patches/s", f"{len(STAINS)} single-stain networks, one after another",
            epochs * sum(n[s] for s in STAINS) / sep,
            note=f"wall {med[joint]:.0f} s vs {sep:.0f} s; train patches {n[joint]} vs "
                 + " + ".join(str(n[s]) for s in STAINS)),
        row(f"predict {joint} with one network ({brain} brain voxels x {len(STAINS)} stains)",
            brain * len(STAINS) / pmed[joint], "voxel-maps/s", "one network per stain, one after another",
            brain * len(STAINS) / psep, note=f"wall {pmed[joint]:.1f} s vs {psep:.1f} s"),
    ]


def main():
    repeats_main(run, __doc__)


if __name__ == "__main__":
    main()
