"""Commands that learn: patches, train, finetune, crossval.

Each command imports its stage inside its body: the stage pulls torch, zarr and Dask
(seconds), which ``mrhscale --help`` and every other command must not pay
(tests/cli/test_options_table.py checks that a --help loads no torch).
"""

from __future__ import annotations

import os
import sys

import click

from mrhscale.cli.base import main
from mrhscale.cli.params import (
    context_from,
    context_options,
    renamed_option,
    subject_list,
    take,
    with_options,
)
from mrhscale.errors import MRHError
from mrhscale.options import (
    CrossvalOptions,
    FinetuneOptions,
    NetworkOptions,
    Numerics,
    PatchOptions,
    RunOptions,
    TrainingOptions,
)


@main.command("patches")
@click.argument("store")
@click.option("--target", required=True,
              help="Histology target variable (e.g. af, nf, mbp), or several comma-separated (nf,mbp): one "
                   "network then learns them all, a head per stain.")
@click.option("--out", "out", required=True, metavar="PATCHES", help="Output patch store (Zarr URL).")
@click.option("--subjects", multiple=True, help="Subject ids (repeat or comma-separate; default: all).")
@with_options(PatchOptions)
@click.option("--overwrite", is_flag=True,
              help="Replace a complete patch store made from other inputs or options (built aside, "
                   "swapped in when complete). An identical one is reused without it.")
@context_options(storage=True, dask=True)
def patches_cmd(store, target, out, subjects, overwrite, **kw):
    """Extract shuffled training patches of --target from cohort STORE into --out."""
    from mrhscale.stages.patches import extract_patches

    opts = take(PatchOptions, kw)
    extract_patches(store, target, out, subjects=subject_list(subjects), overwrite=overwrite, options=opts,
                    ctx=context_from(kw))


def training_options(f):
    """Options shared by `train` and `finetune`; unset ones take the --recipe's values (or, with
    --resume, the checkpointed run's own values)."""
    f = context_options(storage=True)(f)
    f = with_options(RunOptions)(f)
    f = with_options(Numerics, defaults={"precision": None, "compile": None})(f)
    f.__click_params__.append(renamed_option("--no-amp", "--precision fp32", flag=True))
    f = with_options(TrainingOptions)(f)
    return click.option("--out", "-o", required=True,
                        help="Run directory (checkpoints, metrics, curve.png, model.pt).")(f)


def _run_training(fn, *args, **kw):
    """Run ``fn`` (train or finetune) with the CLI's values: SIGTERM exits 143, rank 0 reports."""
    from mrhscale.training import TrainingInterrupted  # torch: only when a command trains

    ctx = context_from(kw)
    rt = take(RunOptions, kw)
    numerics = take(Numerics, kw)
    try:
        res = fn(*args, **kw, loader_workers=rt.loader_workers, cache=rt.cache, threads=rt.threads, device=rt.device,
                 resume=rt.resume, keep_checkpoints=rt.keep_checkpoints, precision=numerics.precision,
                 compile=numerics.compile, quiet=ctx.quiet, storage_options=ctx.storage_options)
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") == "0":
            click.echo(f"mrhscale: {e}", err=True)
        sys.exit(143)  # 128 + SIGTERM: batch schedulers requeue
    _report(res, ctx.quiet)
    return res


def _report(res, quiet: bool) -> None:
    f = res.final
    if os.environ.get("RANK", "0") == "0" and not quiet:  # under torchrun only rank 0 talks
        click.echo(f"model {res.model}: {res.epochs} epochs, train loss {f.get('train_loss', float('nan')):.4g}, "
                   f"val loss {f.get('val_loss', float('nan')):.4g}, val r {f.get('val_r', float('nan')):.3f}"
                   + (f" (ensemble of {len(res.members)}: mean of the members)" if res.get("members") else ""))


@main.command()
@click.argument("patches")
@with_options(NetworkOptions)
@training_options
def train(patches, out, **kw):
    """Train MRH-Net on PATCHES; one process, or under `torchrun --nproc_per_node=N` (DDP)."""
    from mrhscale.training import train as run

    subjects, groups = subject_list(kw.pop("calibration_subjects")), kw["calibration_groups"]
    risk = {k: kw.pop(k) for k in ("calibration_mode", "risk_alpha", "risk_delta")}
    if subjects:  # the validation patches keep the default groups; the brains get the ones asked for
        if (kw.get("members") or 1) < 2:
            raise MRHError("--calibration-subjects: calibrates an ensemble's spread; add --members K")
        kw["calibration_groups"] = None
    _check_risk(risk, subjects)
    res = _run_training(run, patches, out, **kw)
    if subjects and os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0, after every rank finished
        from mrhscale.stages.calibrate import calibrate

        calibrate(res.model, subjects, groups=groups or "value:4", ctx=context_from(kw),
                  mode=risk["calibration_mode"], risk_alpha=risk["risk_alpha"], risk_delta=risk["risk_delta"])


def _check_risk(risk: dict, subjects: list[str]) -> None:
    """--calibration-mode risk refused before training when it cannot be fitted."""
    if risk["calibration_mode"] != "risk":
        return
    if not subjects:
        raise MRHError("--calibration-mode risk: controls each brain's risk; give --calibration-subjects")
    from mrhscale.ops.risk import check_brains  # numpy only: the CLI's import stays light otherwise

    check_brains(len(subjects), risk["risk_delta"], risk["risk_alpha"])


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("patches")
@with_options(FinetuneOptions)
@training_options
def finetune(model, patches, out, **kw):
    """Transfer learning from MODEL to a new stain's PATCHES: fresh Conv4/Conv5 (lr x10), base lr 1e-4."""
    from mrhscale.training import finetune as run

    _run_training(run, model, patches, out, **kw)


@main.command("crossval")
@click.argument("store")
@click.option("--target", required=True, help="Reference stain in STORE (e.g. mbp).")
@click.option("--out", "-o", required=True, help="Folder: one fold-<subject>/ per fold, crossval.csv/.json/.png.")
@click.option("--subjects", multiple=True, help="Only these subject ids (repeat or comma-separate).")
@with_options(CrossvalOptions)
@click.option("--device", default=None, help="Training device (cpu, cuda, cuda:N).")
@context_options(dask=True)
def crossval_cmd(store, target, out, subjects, **kw):
    """Cross-validate a training recipe by held-out subject: per fold patches, train, predict and
    evaluate the held-out brain; a table of r, MAE and SSIM. Under `torchrun --nproc_per_node=N`
    each process runs its own folds."""
    from mrhscale.stages.crossval import crossval

    opts = take(CrossvalOptions, kw)
    res = crossval(store, target, out, folds=opts.folds, recipe=opts.recipe, subjects=subject_list(subjects),
                   fold_workers=opts.fold_workers, threads=opts.threads, ctx=context_from(kw))
    if res is not None:
        s = res["summary"]
        click.echo(f"held-out Pearson r {s['pearson']['mean']:.3f} +- {s['pearson']['sd']:.3f}, MAE "
                   f"{s['mae']['mean']:.3g}, SSIM {s['ssim']['mean']:.3f} over {len(res['rows'])} subject(s); "
                   f"table {res['table']}")
