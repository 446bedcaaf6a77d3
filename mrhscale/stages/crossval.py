"""Cross-validation by held-out subject: how well a recipe transfers to a brain it never saw.

For each fold, the training subjects' patches are extracted, a model is trained with
the recipe, the held-out subject(s) predicted and evaluated against the reference
stain; a table gathers r, MAE and SSIM per held-out subject with their mean and spread.
It reuses the stages as they are (``extract_patches``, ``train``, ``predict``,
``evaluate``) and their stores, and a rerun reuses every finished fold.

Folds run one after another in this process (each stage on the Dask client), as Dask
tasks side by side (``fold_workers``: one fold per worker process), or under
``torchrun --nproc_per_node=N`` one process per fold (rank r takes folds r, r+N, ...;
each trains alone, rank 0 writes the table once every fold is done).

Output (``--out DIR``, a folder mrhscale made)::

    DIR/plan.json                    folds, recipe, patch options: what the folds were made with
    DIR/fold-<sid>/patches.zarr      the fold's training patches (its other subjects)
    DIR/fold-<sid>/run/              the fold's training run (model.pt, metrics, curve)
    DIR/fold-<sid>/pred.zarr         the held-out subject's virtual stain
    DIR/fold-<sid>/eval/             its evaluation report
    DIR/fold-<sid>/result.json       written last: the fold is complete
    DIR/crossval.csv, crossval.json, crossval.png    the table, its summary, a figure
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from dataclasses import fields

import yaml

from mrhscale.errors import MRHError
from mrhscale.log import note
from mrhscale.ops.stains import parse_stains
from mrhscale.options import EvaluateOptions, PatchOptions, PredictOptions
from mrhscale.parallel.context import Context
from mrhscale.report.figures import crossval_bars
from mrhscale.results import CrossvalResult
from mrhscale.stages.evaluate import evaluate
from mrhscale.stages.patches import extract_patches
from mrhscale.stages.predict import predict
from mrhscale.stores import CohortStore, Folder, resolve, write_json, write_text
from mrhscale.training import train
from mrhscale.training.config import DEFAULT_RECIPE, RECIPES, TrainConfig, run_started
from mrhscale.training.distributed import dist_env

LOSO = "leave-one-subject-out"
METRICS = ("pearson", "mae", "ssim", "rmse")


def crossval(store: str, target: str, out_dir: str, *, folds: str | int = LOSO, recipe: dict | str | None = None,
             subjects: list[str] | None = None, fold_workers: int | None = None, threads: int | None = None,
             ctx: Context | None = None) -> CrossvalResult | None:
    """Cross-validate ``recipe`` (training options, patch options, or a named recipe) on
    the subjects of ``store`` with stain ``target``; returns the table and its summary
    (None on the ranks but 0 under torchrun).

    ``ctx``: the stages' Dask cluster, the device folds train and predict on, quiet.
    ``fold_workers``: folds side by side, one per Dask worker process of ``ctx``'s cluster
    (an embedded one of ``fold_workers`` processes), each running its stages in its worker;
    ``threads``: torch threads per fold."""
    ctx = ctx or Context()
    if len(parse_stains(target)) > 1:
        raise MRHError(f"--target {target}: crossval scores one stain at a time; run it per stain")
    store = resolve(store)
    plan = make_plan(CohortStore.open(ctx.location(store)), target, folds, recipe_options(recipe),
                     subjects)
    folder = Folder(out_dir, "mrhscale-crossval")
    _check_plan(folder, plan)
    rank, world = _rank_world()
    if rank == 0:
        folder.create(target=target)
        write_json(os.path.join(folder.path, "plan.json"), plan)
    t0 = time.perf_counter()
    job = {"store": store, "out": folder.path, "threads": threads}
    if world > 1:
        _wait_plan(folder.path, plan)
        results = _by_rank(plan, job, ctx, rank, world)
    else:
        with folder.claim():
            results = _on_dask(plan, job, ctx, fold_workers)
    if rank != 0:
        return None  # rank 0 writes and returns the table
    return write_table(folder.path, plan, results, time.perf_counter() - t0)


# --------------------------------------------------------------------------- plan
def recipe_options(recipe) -> dict:
    """A recipe: a mapping, a YAML file of one, or a named training recipe (robust, paper, fast)."""
    if recipe is None:
        return {}
    if isinstance(recipe, dict):
        return dict(recipe)
    if recipe in RECIPES:
        return {"recipe": recipe}
    try:
        with open(recipe) as f:
            doc = yaml.safe_load(f) or {}
    except OSError as e:
        raise MRHError(f"--recipe {recipe}: not a named recipe ({', '.join(RECIPES)}) nor a readable "
                       f"YAML file ({e.strerror})") from None
    if not isinstance(doc, dict):
        raise MRHError(f"--recipe {recipe}: expected a mapping of training and patch options")
    return doc


PREDICT_KEYS = ("tta",)  # prediction options a recipe may hold


def split_recipe(options: dict) -> tuple[dict, dict]:
    """(training options, patch options) by name (the patch store's ``stats``, training's ``norm``);
    prediction options (``tta``) are taken out first by :func:`make_plan`; anything else is an error."""
    train_keys = {f.name for f in fields(TrainConfig)} - {"kind", "patches", "base_model"}
    patch_keys = {f.name for f in fields(PatchOptions)} - {"val_subjects"}
    bad = sorted(set(options) - train_keys - patch_keys)
    if bad:
        raise MRHError(f"--recipe: unknown option(s) {', '.join(bad)} (training options as `mrhscale "
                       "train`, patch options as `mrhscale patches`, with _ for -)")
    return ({k: v for k, v in options.items() if k in train_keys},
            {k: v for k, v in options.items() if k in patch_keys})


def make_plan(cohort, target: str, folds, options: dict, subjects) -> dict:
    """The folds: held-out subjects, training subjects, a validation subject when there
    are enough (else a validation fraction of the training patches)."""
    options = dict(options)
    predict_opts = {k: options.pop(k) for k in PREDICT_KEYS if k in options}
    train_opts, patch_opts = split_recipe(options)
    train_opts.setdefault("recipe", DEFAULT_RECIPE)  # named, so a new default never reuses old folds
    ids = _subjects_with(cohort, target, subjects)
    groups = _fold_groups(ids, folds)
    plan_folds = []
    for held in groups:
        rest = [s for s in ids if s not in held]
        val = rest[-1:] if len(rest) >= 3 else []
        plan_folds.append({"name": held[0], "held_out": held, "train": [s for s in rest if s not in val],
                           "val": val})
    if not patch_opts.get("val_fraction") and any(not f["val"] for f in plan_folds):
        patch_opts["val_fraction"] = 0.2  # too few subjects to hold one out for validation
    plan = {"format": "mrhscale-crossval-plan", "target": target, "scheme": str(folds), "folds": plan_folds,
            "train": train_opts, "patches": patch_opts, "cohort": cohort.url}
    if predict_opts:  # absent when unset, so plans written before it still match
        plan["predict"] = {k: bool(v) for k, v in predict_opts.items()}
    return plan


def _subjects_with(cohort, target: str, subjects) -> list[str]:
    available = cohort.subjects()
    ids = list(dict.fromkeys(subjects)) if subjects else available
    missing = [s for s in ids if s not in available]
    if missing:
        raise MRHError(f"{cohort.name}: subject(s) not in store: {', '.join(missing)}")
    ids = [s for s in ids if target in (cohort.open_subject(s).attrs.get("targets") or [])]
    if len(ids) < 2:
        raise MRHError(f"{cohort.name}: cross-validation needs at least 2 subjects with stain "
                       f"{target!r}, found {len(ids)}")
    return ids


def _fold_groups(ids: list[str], folds) -> list[list[str]]:
    if folds in (LOSO, None):
        return [[s] for s in ids]
    try:
        k = int(folds)
    except (TypeError, ValueError):
        raise MRHError(f"--folds {folds}: expected {LOSO} or a number of folds") from None
    if not 2 <= k <= len(ids):
        raise MRHError(f"--folds {k}: expected 2..{len(ids)} (one subject per fold at most)")
    return [ids[i::k] for i in range(k)]


def _check_plan(folder, plan: dict) -> None:
    """A folder made with another plan is refused (its folds would not be this one's)."""
    if not folder.check():
        return
    try:
        with open(os.path.join(folder.path, "plan.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return
    if {k: old.get(k) for k in plan} != json_plain(plan):
        raise MRHError(f"--out {folder.path}: holds a cross-validation of another plan (folds, recipe or "
                       "cohort differ); choose another --out")


def json_plain(doc):
    return json.loads(json.dumps(doc, default=str))


# --------------------------------------------------------------------------- running folds
def _rank_world() -> tuple[int, int]:
    rank, world, _ = dist_env()
    return rank, world


def _on_dask(plan, job: dict, ctx: Context, fold_workers) -> list[dict]:
    """The folds one after another here (each stage on ``ctx``'s cluster, started once for all),
    or with ``fold_workers`` one per Dask worker, each fold's stages inside its worker."""
    if not fold_workers:
        with ctx.runner() as runner:
            return [run_fold(f, plan, job, runner.context) for f in plan["folds"]]
    with ctx.but(dask_workers=fold_workers).runner() as runner:
        threads = job["threads"] or max(1, (os.cpu_count() or 1) // runner.n_workers())
        inside = ctx.but(client=None, scheduler="synchronous", dask_workers=None, quiet=True)
        return runner.submit_each(run_fold, plan["folds"], "crossval folds", plan, {**job, "threads": threads},
                                  inside, unit="fold")


def _by_rank(plan, job: dict, ctx: Context, rank: int, world: int) -> list[dict]:
    """torchrun: this rank's folds, each trained alone; rank 0 then waits for the others'."""
    mine = plan["folds"][rank::world]
    inside = ctx.but(client=None, scheduler="synchronous", quiet=ctx.quiet or rank > 0)
    with single_process():
        for f in mine:
            run_fold(f, plan, job, inside)
    if rank != 0:
        return []
    return [_wait_result(job["out"], f) for f in plan["folds"]]


@contextlib.contextmanager
def single_process():
    """Hide torchrun's rank variables while a fold trains: each fold is its own run."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _wait_plan(out: str, plan: dict) -> None:
    """Other ranks start once rank 0 has made the folder and written the plan."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        try:
            with open(os.path.join(out, "plan.json")) as f:
                if json.load(f) == json_plain(plan):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise MRHError(f"crossval: rank 0 did not write {out}/plan.json within 120 s")


def _wait_result(out: str, fold: dict) -> dict:
    timeout = float(os.environ.get("MRHSCALE_DIST_TIMEOUT", "1800"))
    path = os.path.join(out, f"fold-{fold['name']}", "result.json")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = _result(path, fold)
        if got is not None:
            return got
        time.sleep(1.0)
    raise MRHError(f"crossval: fold {fold['name']} did not finish within {timeout:.0f} s "
                   "(MRHSCALE_DIST_TIMEOUT); its rank failed or is still running")


def _result(path: str, fold: dict) -> dict | None:
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None
    return res if res.get("fold") == json_plain(fold) else None


def run_fold(fold: dict, plan: dict, job: dict, ctx: Context) -> dict:
    """One fold, each step reused when already done: patches, train, predict, evaluate.
    ``job``: the cohort store, the crossval folder and torch threads; ``ctx``: where its
    stages run."""
    d = os.path.join(job["out"], f"fold-{fold['name']}")
    done = _result(os.path.join(d, "result.json"), fold)
    if done is not None:
        return done
    os.makedirs(d, exist_ok=True)
    note(f"crossval: fold {fold['name']} (held out {', '.join(fold['held_out'])})", ctx.quiet)
    patches = _fold_patches(plan, fold, job, ctx, d)
    model = _fold_model(plan, patches, job, ctx, d)
    rows = _fold_evaluation(plan, fold, model, job, ctx, d)
    res = {"fold": fold, "rows": rows, "model": model}
    write_json(os.path.join(d, "result.json"), res)
    return res


def _fold_patches(plan, fold, job, ctx, d) -> str:
    out = os.path.join(d, "patches.zarr")
    options = PatchOptions(**plan["patches"], val_subjects=fold["val"])
    extract_patches(job["store"], plan["target"], out, subjects=fold["train"] + fold["val"], options=options,
                    ctx=ctx)
    return out


def _fold_model(plan, patches, job, ctx, d) -> str:
    run = os.path.join(d, "run")
    model = os.path.join(run, "model.pt")
    if os.path.exists(model):
        return model
    resume = run_started(run)
    opts = {} if resume else dict(plan["train"])
    train(patches, run, resume=resume, device=ctx.device, threads=job["threads"], quiet=ctx.quiet, **opts)
    return model


def _fold_evaluation(plan, fold, model, job, ctx, d) -> list[dict]:
    pred = os.path.join(d, "pred.zarr")
    options = PredictOptions(**plan.get("predict", {}))
    predict(model, job["store"], pred, subjects=fold["held_out"], overwrite=True, options=options, ctx=ctx)
    ev = evaluate(pred, job["store"], os.path.join(d, "eval"), stains=[plan["target"]], subjects=fold["held_out"],
                  options=EvaluateOptions(montage_subjects=1), ctx=ctx).by_stain[plan["target"]]
    return [{"subject": s, "fold": fold["name"], **{m: ev.per_subject[s]["virtual"].get(m) for m in METRICS},
             **_uncertainty_row(ev.per_subject[s].get("uncertainty"))} for s in fold["held_out"]]


UNCERTAINTY_METRICS = ("unc_spearman", "coverage_95")  # columns of an ensemble's folds


def _uncertainty_row(u: dict | None) -> dict:
    """A held-out subject's uncertainty figures (an ensemble recipe, ``members: K``)."""
    return {} if not u else {"unc_spearman": u["spearman_abs_error"], "coverage_95": u["coverage_95"]}


# --------------------------------------------------------------------------- the table
def write_table(out: str, plan: dict, results: list[dict], seconds: float) -> CrossvalResult:
    """crossval.csv (a row per held-out subject, then mean and sd), crossval.json, crossval.png."""
    rows = [r for res in results for r in res["rows"]]
    cols = METRICS + tuple(m for m in UNCERTAINTY_METRICS if any(m in r for r in rows))
    summary = {m: _mean_sd([r[m] for r in rows if r.get(m) is not None]) for m in cols}
    lines = ["subject,fold," + ",".join(cols)]
    lines += [f"{r['subject']},{r['fold']}," + ",".join(_fmt(r.get(m)) for m in cols) for r in rows]
    lines += ["mean,," + ",".join(_fmt(summary[m][0]) for m in cols),
              "sd,," + ",".join(_fmt(summary[m][1]) for m in cols)]
    write_text(os.path.join(out, "crossval.csv"), "\n".join(lines) + "\n")
    doc = {"target": plan["target"], "scheme": plan["scheme"], "rows": rows,
           "summary": {m: {"mean": v[0], "sd": v[1]} for m, v in summary.items()},
           "recipe": {"train": plan["train"], "patches": plan["patches"], "predict": plan.get("predict", {})},
           "seconds": round(seconds, 1)}
    write_json(os.path.join(out, "crossval.json"), doc)
    crossval_bars(os.path.join(out, "crossval.png"), rows, plan["target"])
    return CrossvalResult(**doc, out_dir=out, table=os.path.join(out, "crossval.csv"))


def _mean_sd(values) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(statistics.fmean(values)), float(statistics.stdev(values)) if len(values) > 1 else 0.0


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6g}"
