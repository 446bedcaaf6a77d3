"""Fine-tune on a rebuilt stain (issue 29's must-show): held-out r of mbp learnt from rebuilt vs true volumes.

A network fine-tuned on mbp volumes rebuilt from degraded 2D section stacks must predict mbp on a held-out
brain within 0.03 r of one fine-tuned on the true mbp.

The demo's cohort (5 synthetic brains 48x32x64, the held-out s05 on its own scanner with a field-of-view
artefact; train s01-s03, validation s04). A base network learns af and nf (recipe fast, depth 5). For each
of s01-s04 the true mbp is cut into a degraded stack (synth's defaults: jitter 4 deg / 0.25 mm, shrinkage
0.85-0.97, smooth warps, 2 deg tilt, 20% torn, 10% lost, stain bias, RGB DAB brightfield; a section on
every coronal plane over the stain, `--every`) and rebuilt on the subject's MRI with `register_sections` (NaN where no
section covers: the patch engine drops those targets). Then `mrhscale finetune --add-stain
--freeze-backbone` twice from the same base, same seed and settings: (A) on patches of the true mbp, (B)
on patches of the rebuilt mbp. Both are scored on the held-out brain's TRUE mbp (evaluate: Pearson r over
the brain mask). One run: everything is seeded (ANTs included), the comparison is the point.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import print_rows, row  # noqa: E402

HELD_OUT, VAL, TRAIN = "s05", "s04", ["s01", "s02", "s03"]
STAIN, BASE = "mbp", "af,nf"
SHAPE = (48, 32, 64)
# planes between sections: y has 0.24 mm voxels, so a section every 0.24 mm (labs cut every 0.05-0.1 mm);
# every 2 planes (0.48 mm) rebuilds at r 0.80-0.86 only, and B then misses the 0.03 (benchmarks/RESULTS.md)
EVERY = 1
TARGET = 0.03  # r_A - r_B at most
# patches' --min-label-sum is in raw target units (default 30 of synth's 0..255 stains); a rebuilt volume
# is in the slides' optical density (~0.06 at its 99.5th percentile), where 30 keeps no sample. Both A and
# B take the same share of their own stain's 99.5th percentile over the training brains.
LABEL_SUM_SHARE = 30 / 255


def _ctx():
    from mrhscale.parallel.context import Context

    return Context(scheduler="threads", quiet=True)


def cohort(work: str) -> tuple[str, str]:
    """The demo's synthetic cohort (files and manifest), ingested: (manifest, store)."""
    from mrhscale.options import SynthVariation
    from mrhscale.stages.ingest import ingest
    from mrhscale.synth.phantom import make_cohort

    manifest = make_cohort(os.path.join(work, "files"), n_subjects=5, shape=SHAPE, seed=0, fmt="nii.gz",
                           quiet=True, variation=SynthVariation(scanner_variation=[HELD_OUT], artefact=[HELD_OUT]))
    store = os.path.join(work, "cohort.zarr")
    ingest(manifest, store, chunks=(32, 16, 32), ctx=_ctx())
    return manifest, store


def cut(files: str, subject: str, folder: str, every: int = EVERY) -> dict:
    """The subject's true stain as a degraded stack (synth's defaults), a section every ``every`` planes."""
    import nibabel as nib

    from mrhscale.options import SectionOptions
    from mrhscale.synth.sections import SECTIONS_STREAM, cut_sections, write_stack

    img = nib.load(os.path.join(files, subject, f"{STAIN}.nii.gz"))
    stain = np.asanyarray(img.dataobj)
    planes = np.flatnonzero(stain.max(axis=(0, 2)) > 0)
    n = int((planes[-1] - planes[0]) // every + 1)
    opts = SectionOptions(sections=n, subject=subject, stain=STAIN, axis="y", every=every)
    seq = np.random.SeedSequence([0, int(subject[1:]) - 1, SECTIONS_STREAM])
    stack = cut_sections(stain, img.affine, opts, seq, subject=subject)
    write_stack(folder, stack)
    return {"sections": n, "missing": sum(s.missing for s in stack.sections),
            "torn": sum(s.tear is not None for s in stack.sections)}


def rebuild(files: str, manifest: str, subject: str, stack: str, out: str, threads: int | None) -> dict:
    """register_sections on one stack; its coverage of the brain and r against the true stain."""
    import nibabel as nib

    from mrhscale.options import SectionRegistrationOptions
    from mrhscale.stages.register.sections import register_sections

    res = register_sections(stack, subject, out, manifest=manifest, stain=STAIN,
                            options=SectionRegistrationOptions(threads=threads),
                            landmarks=os.path.join(stack, "landmarks.csv"), quiet=True)
    vol = nib.load(out).get_fdata()
    truth = nib.load(os.path.join(files, subject, f"{STAIN}.nii.gz")).get_fdata()
    mask = nib.load(os.path.join(files, subject, "mask.nii.gz")).get_fdata() > 0
    covered = mask & np.isfinite(vol)
    return {"seconds": res.seconds, "covered": float(covered.sum() / mask.sum()),
            "r": float(np.corrcoef(vol[covered], truth[covered])[0, 1]),
            "failed": sum(s["status"].startswith("failed") for s in res.sections),
            "tre_after_um": res.landmarks["pooled"]["after"]["median"]}


def rebuilt_manifest(manifest: str, rebuilt: dict[str, str]) -> str:
    """The cohort's manifest with each rebuilt subject's mbp target swapped for its rebuilt NIfTI."""
    import yaml

    with open(manifest) as fh:
        doc = yaml.safe_load(fh)
    for entry in doc["subjects"]:
        if entry["id"] in rebuilt:
            entry["targets"][STAIN] = os.path.abspath(rebuilt[entry["id"]])
    out = os.path.join(os.path.dirname(manifest), "cohort-rebuilt.yaml")
    with open(out, "w") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
    return out


def label_floor(files: str, volumes: dict[str, str]) -> float:
    """--min-label-sum for a stain: LABEL_SUM_SHARE of its 99.5th percentile over these brains."""
    import nibabel as nib

    values = []
    for s, path in volumes.items():
        v = nib.load(path).get_fdata()
        values.append(v[(nib.load(os.path.join(files, s, "mask.nii.gz")).get_fdata() > 0) & np.isfinite(v)])
    return float(LABEL_SUM_SHARE * np.percentile(np.concatenate(values), 99.5))


def patches(store: str, target: str, out: str, stride: int, min_label_sum: float = 30) -> int:
    """Patches of ``target`` from the training and validation subjects; the train split's size."""
    import zarr

    from mrhscale.options import PatchOptions
    from mrhscale.stages.patches import extract_patches

    extract_patches(store, target, out, subjects=[*TRAIN, VAL], ctx=_ctx(),
                    options=PatchOptions(stride=stride, val_subjects=[VAL], min_label_sum=min_label_sum))
    return int(zarr.open_group(out, mode="r").attrs["n_train"])


def cli(*args: str) -> None:
    """`python -m mrhscale ARGS` of this checkout (a clean one: no install needed)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "mrhscale", *args], capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"mrhscale {args[0]}: {p.stderr[-2000:]}")


def learn(command: str, inputs: list[str], out: str, epochs: int, threads: int | None, seed: int) -> None:
    """train / finetune with the fast recipe, eager fp32."""
    extra = ["--add-stain", "--freeze-backbone"] if command == "finetune" else ["--depth", "5"]
    extra += ["--threads", str(threads)] if threads else []
    cli(command, *inputs, "--out", out, "--recipe", "fast", "--epochs", str(epochs), "--batch-size", "128",
        "--seed", str(seed), "--precision", "fp32", "--compile", "off", "-q", *extra)


def held_out_r(model: str, store: str, work: str, client, threads: int | None) -> float:
    """Predict the held-out brain, Pearson r of its mbp against the TRUE mbp over the brain mask."""
    from mrhscale.options import EvaluateOptions, Numerics, PredictOptions
    from mrhscale.parallel.context import Context
    from mrhscale.stages.evaluate import evaluate
    from mrhscale.stages.predict import predict

    pred, ev = os.path.join(work, "pred.zarr"), os.path.join(work, "evaluation")
    predict(model, store, pred, subjects=[HELD_OUT], ctx=Context(scheduler=client.scheduler.address, quiet=True),
            options=PredictOptions(torch_threads=threads or os.cpu_count() or 1, numerics=Numerics("fp32", "off")))
    m = evaluate(pred, store, ev, stains=[STAIN], subjects=[HELD_OUT], ctx=Context(quiet=True),
                 options=EvaluateOptions(montage_subjects=0)).by_stain[STAIN]
    return float(m["pooled"]["virtual"]["pearson"])


class Timer(dict):
    """Wall seconds of each named part."""

    def part(self, name: str, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self[name] = self.get(name, 0.0) + time.perf_counter() - t0
        _say(f"{name}: {time.perf_counter() - t0:.0f} s")
        return out


def _say(msg: str) -> None:
    print(f"[finetune_sections] {msg}", file=sys.stderr, flush=True)


def rebuild_all(files: str, manifest: str, work: str, t: Timer, threads: int | None,
                every: int) -> tuple[dict, dict]:
    """Cut and rebuild each training and validation subject's mbp: (rebuilt paths, figures)."""
    paths, figures = {}, {}
    for s in [*TRAIN, VAL]:
        stack = os.path.join(work, "stacks", s)
        cut_info = t.part("cut stacks", cut, files, s, stack, every)
        paths[s] = os.path.join(work, "rebuilt", f"{STAIN}_{s}.nii.gz")
        os.makedirs(os.path.dirname(paths[s]), exist_ok=True)
        figures[s] = {**cut_info, **t.part("register-sections", rebuild, files, manifest, s, stack, paths[s], threads)}
        _say(f"{s}: {figures[s]}")
    return paths, figures


def run(full: bool = False, repeats: int = 1, stride: int = 2, epochs: int = 3, base_epochs: int = 3,
        threads: int | None = None, seed: int = 0, every: int = EVERY, keep: str | None = None) -> list[dict]:
    """The whole comparison once. threads: torch and ITK threads of every step (default: theirs, every
    core; 1 on a shared, overloaded machine, where spinning thread pools cost far more than they give);
    seed: the networks' (base and both finetunes; the stacks keep theirs); every: planes between
    sections; keep: a folder to leave the work
    in (default: a temporary one, deleted)."""
    from mrhscale.parallel.cluster import dask_client

    del full, repeats  # one size, one run (seeded)
    work = keep or tempfile.mkdtemp(prefix="mrh-bench-secft-")
    t = Timer()
    try:
        manifest, store = t.part("synth + ingest", cohort, work)
        files = os.path.dirname(manifest)
        n = {"base": t.part("patches", patches, store, BASE, os.path.join(work, "p-base.zarr"), stride)}
        t.part("train base (af, nf)", learn, "train", [os.path.join(work, "p-base.zarr")],
               os.path.join(work, "run-base"), base_epochs, threads, seed)
        rebuilt, figures = rebuild_all(files, manifest, work, t, threads, every)
        store_b = os.path.join(work, "cohort-rebuilt.zarr")
        t.part("ingest rebuilt", _ingest, rebuilt_manifest(manifest, rebuilt), store_b)
        stores = {"A": store, "B": store_b}
        truth = {s: os.path.join(files, s, f"{STAIN}.nii.gz") for s in rebuilt}
        floors = {"A": label_floor(files, truth), "B": label_floor(files, rebuilt)}
        base = os.path.join(work, "run-base", "model.pt")
        r = {}
        with dask_client(workers=1, threads_per_worker=1, quiet=True) as client:
            for k, st in stores.items():
                p = os.path.join(work, f"p-{k}.zarr")
                n[k] = t.part(f"patches {k}", patches, st, STAIN, p, stride, floors[k])
                t.part(f"finetune {k}", learn, "finetune", [base, p], os.path.join(work, f"run-{k}"), epochs, threads,
                       seed)
                r[k] = t.part(f"predict + evaluate {k}", held_out_r, os.path.join(work, f"run-{k}", "model.pt"),
                              store, os.path.join(work, f"eval-{k}"), client, threads)
                _say(f"r_{k} = {r[k]:.4f}")
        how = (f"stride {stride}, min label sum {floors['A']:.3g} / {floors['B']:.3g} ({100 * LABEL_SUM_SHARE:.1f}% "
               f"of each stain's p99.5), a section every {every} planes, threads {threads or 'all'}, seed {seed}")
        return rows(r, figures, n, t, how, epochs, base_epochs)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _ingest(manifest: str, store: str) -> None:
    from mrhscale.stages.ingest import ingest

    ingest(manifest, store, subjects=[*TRAIN, VAL], chunks=(32, 16, 32), ctx=_ctx())


def rows(r: dict, figures: dict, n: dict, t: Timer, how: str, epochs: int, base_epochs: int) -> list[dict]:
    diff = r["A"] - r["B"]
    setup = (f"fast, depth 5, base {base_epochs} epochs on {BASE}, finetune --add-stain --freeze-backbone "
             f"{epochs} epochs, batch 128, {how}")
    out = [row(f"held-out {HELD_OUT} r of {STAIN}, finetuned on rebuilt {STAIN} (B)", r["B"], "r",
               f"finetuned on the true {STAIN} (A)", r["A"], note=setup),
           row("r_A - r_B", diff, "r", target=f"<= {TARGET}", met=diff <= TARGET,
               note=f"r_A {r['A']:.4f} > 0.5: {r['A'] > 0.5}")]
    for s, f in figures.items():
        out.append(row(f"{s}: rebuilt {STAIN} vs true r", f["r"], "r",
                       note=f"coverage {100 * f['covered']:.0f}% of the brain; {f['sections']} sections, "
                            f"{f['missing']} lost, {f['torn']} torn, {f['failed']} failed; TRE median "
                            f"{f['tre_after_um']:.0f} um; {f['seconds']:.0f} s"))
    out.append(row("train patches (base / A / B)", n["B"], "patches", "A (true mbp)", n["A"],
                   note=f"base store {n['base']}; B loses the NaN (uncovered) targets"))
    out += [row(f"wall: {k}", v, "s") for k, v in t.items()]
    out.append(row("wall: total", sum(t.values()), "s", target="<= 1500 s", met=sum(t.values()) <= 1500))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stride", type=int, default=2, help="patch stride (every patch store)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each finetune")
    ap.add_argument("--base-epochs", type=int, default=3, help="epochs of the base network")
    ap.add_argument("--threads", type=int, help="torch and ITK threads per step (default: every core)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the networks (base and finetunes)")
    ap.add_argument("--every", type=int, default=EVERY, help="planes between sections")
    ap.add_argument("--keep", help="leave the work in this folder")
    a = ap.parse_args()
    print_rows(run(stride=a.stride, epochs=a.epochs, base_epochs=a.base_epochs, threads=a.threads,
                   seed=a.seed, every=a.every, keep=a.keep))


if __name__ == "__main__":
    main()
