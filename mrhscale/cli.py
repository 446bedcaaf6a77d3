"""Command line: click commands only; each parses options and calls one library function."""

from __future__ import annotations

import sys

import click

from mrhscale.errors import MRHError


class _Command(click.Command):
    """Every command takes ``--config FILE.yaml`` (flags override it) and records its resolved config."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(click.Option(
            ["--config"], is_eager=True, expose_value=False, callback=self._load_config,
            type=click.Path(dir_okay=False), help="YAML file of this command's options (flags override it).",
        ))
        self.params.append(click.Option(
            ["--verbose", "-v"], count=True, expose_value=False, callback=_keep("verbose"),
            help="More messages (debug records too)."))
        self.params.append(click.Option(
            ["--log-file"], default=None, expose_value=False, callback=_keep("log_file"),
            type=click.Path(dir_okay=False), help="Also write every message, with times, to this file."))

    def _load_config(self, ctx, _param, value):
        if not value:
            return
        from mrhscale.io.config import load_config

        try:
            group = ctx.parent.command.commands if ctx.parent is not None else {}
            stages = {name: _allowed(cmd) for name, cmd in group.items()}
            values = load_config(value, self.name, _allowed(self), stages)
        except MRHError as e:
            click.echo(f"mrhscale: error: {one_line(e)}", err=True)
            sys.exit(2)
        ctx.default_map = {**(ctx.default_map or {}), **values}
        ctx.meta["mrhscale_config_file"] = value

    def invoke(self, ctx):
        from mrhscale import log

        log.setup(quiet=bool(ctx.params.get("quiet")), verbose=ctx.meta.get("mrhscale_verbose", 0),
                  log_file=ctx.meta.get("mrhscale_log_file"))
        try:
            result = super().invoke(ctx)
        finally:
            log.reset()
        out = ctx.params.get("out")
        if out and self.name not in SELF_DESCRIBING:
            from mrhscale.io.config import write_resolved

            write_resolved(str(out), self.name, ctx.params)
        return result


#: commands whose output records its own options (a manifest's generated_by, an export's
#: sidecar): no resolved-config file beside it
SELF_DESCRIBING = {"manifest", "export"}


def _keep(name: str):
    """A callback that keeps an option for the logging set-up, out of the command's arguments."""

    def keep(ctx, _param, value):
        ctx.meta[f"mrhscale_{name}"] = value

    return keep


def one_line(e: Exception) -> str:
    """An error as the single line the user sees (a library's message may hold newlines)."""
    return " ".join(str(e).split())


def _allowed(cmd: click.Command) -> dict[str, str]:
    """The keys a --config may give ``cmd``: option names with dashes or underscores."""
    allowed = {}
    for p in cmd.params:
        if isinstance(p, click.Option) and p.name not in ("config", "verbose", "log_file"):
            allowed[p.name] = p.name
            allowed.update({o.lstrip("-"): p.name for o in p.opts if o.startswith("--")})
        elif isinstance(p, click.Argument):
            allowed[p.name] = p.name
    return allowed


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit status 2, no traceback."""

    command_class = _Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MRHError as e:
            click.echo(f"mrhscale: error: {one_line(e)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("mrhscale: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mrhscale")
def main():
    """Virtual histology from multi-contrast mouse-brain MRI (MRH-Net), at cohort scale."""


def _ints(text: str, n: int, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise MRHError(f"{what}: expected {n} comma-separated integers, got {text!r}") from None
    if len(vals) != n or any(v <= 0 for v in vals):
        raise MRHError(f"{what}: expected {n} positive comma-separated integers, got {text!r}")
    return vals


def _subject_list(values: tuple[str, ...]) -> list[str] | None:
    """--subjects a,b --subjects c (repeats dropped, order kept)."""
    out = list(dict.fromkeys(s.strip() for v in values for s in v.split(",") if s.strip()))
    return out or None


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress output.")
scheduler_option = click.option(
    "--scheduler", default=None, metavar="ADDRESS",
    help="Join an existing Dask scheduler (tcp://host:8786); default: an embedded LocalCluster.",
)
workers_option = click.option(
    "--workers", type=int, default=None, help="Worker processes of the embedded LocalCluster (default: cores)."
)

storage_options_option = click.option(
    "--storage-options", default=None, metavar="JSON", type=click.UNPROCESSED,
    help="fsspec options for URL stores (s3://...), a JSON/YAML mapping, e.g. "
         "'{\"endpoint_url\": \"http://127.0.0.1:9000\", \"key\": \"...\", \"secret\": \"...\"}'; "
         "a mapping in --config. Local paths ignore it. Credentials and endpoint can instead come "
         "from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE).",
)


def _storage_options(value) -> dict | None:
    """--storage-options as a dict: JSON or YAML text, or a mapping already (from --config)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    doc = value
    if not isinstance(value, dict):
        import yaml

        try:
            doc = yaml.safe_load(str(value))  # JSON is YAML
        except yaml.YAMLError as e:
            raise MRHError(f"--storage-options: not valid JSON/YAML ({str(e).splitlines()[0]}); "
                           "expected a mapping like '{\"endpoint_url\": \"http://host:9000\"}'") from None
    if not isinstance(doc, dict):
        raise MRHError(f"--storage-options: expected a JSON/YAML mapping of fsspec options, got {value!r}")
    return {str(k): v for k, v in doc.items()} or None


def _context(storage_options=None, scheduler=None, workers=None, quiet=False, device="cpu"):
    """The execution context of a command's --storage-options, --scheduler, --workers, --quiet."""
    from mrhscale.parallel.context import Context  # imports dask: not at the CLI's start-up

    return Context(storage_options=_storage_options(storage_options), scheduler=scheduler,
                   dask_workers=workers, device=device, quiet=quiet)


# ---- commands (one block each; keep them thin) ----


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=True))
@click.option("--out", "-o", required=True, help="Cohort store to create or extend (path or URL).")
@click.option("--subjects", multiple=True, help="Only these subject ids (repeat or comma-separate).")
@click.option("--chunks", default="64,32,64", show_default=True, help="Spatial chunk X,Y,Z (all contrasts per chunk).")
@click.option("--compression", default="zstd", show_default=True, help="Blosc codec: zstd, lz4, lz4hc, zlib, blosclz.")
@click.option("--skip-bad", is_flag=True, help="Ingest the good subjects and list the bad ones instead of stopping.")
@click.option("--overwrite", is_flag=True,
              help="Rewrite subjects already in the store (each kept until its new version is complete).")
@click.option("--no-checksums", is_flag=True, help="Skip sha256 of source files (faster on huge cohorts).")
@storage_options_option
@scheduler_option
@workers_option
@quiet_option
def ingest(manifest, out, subjects, chunks, compression, skip_bad, overwrite, no_checksums, storage_options,
           scheduler, workers, quiet):
    """Write the subjects of MANIFEST (cohort YAML) into a chunked Zarr cohort store."""
    from mrhscale.stages.ingest import ingest as run

    res = run(manifest, out, subjects=_subject_list(subjects), chunks=_ints(chunks, 3, "--chunks"),
              compression=compression, skip_bad=skip_bad, overwrite=overwrite, checksums=not no_checksums,
              ctx=_context(storage_options, scheduler, workers, quiet))
    if res["skipped"]:
        click.echo(f"already in store, skipped: {', '.join(res['skipped'])}")
    click.echo(f"ingested {len(res['written'])} subject(s) into {res['store']}")
    if res["bad"]:
        click.echo(f"{len(res['bad'])} bad subject(s) not ingested:", err=True)
        for sid, msg in res["bad"].items():
            click.echo(f"  {sid}: {msg}", err=True)
        if not res["written"] and not res["skipped"]:
            sys.exit(2)


@main.command("manifest")
@click.argument("folder", metavar="DIR")
@click.option("--out", "-o", required=True, metavar="FILE.yaml",
              help="Cohort manifest to write (paths in it relative to it).")
@click.option("--bids", is_flag=True, help="DIR is a BIDS dataset (needs pip install \"mrhscale[bids]\").")
@click.option("--channels-from", default=None, metavar="FILE",
              help="YAML/JSON mapping MRI group -> channel names for every subject, e.g. "
                   "'{t2MTONOFF: [t2, mt_off, mt_on]}' (a <group>.json sidecar's \"channels\" wins).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it is a cohort manifest (never any other file).")
@quiet_option
def manifest_cmd(folder, out, bids, channels_from, overwrite, quiet):
    """Write a cohort manifest for DIR: a folder per subject, or a BIDS dataset (naming rules: README)."""
    from mrhscale.io.manifest_scan import write_manifest

    res = write_manifest(folder, out, bids=bids, channel_names=channels_from, overwrite=overwrite)
    if not quiet:
        extra = "".join(f"; {k} {', '.join(res[k])}" for k in ("targets", "labels") if res[k])
        click.echo(f"{res['manifest']}: {len(res['subjects'])} subject(s), MRI groups "
                   f"{', '.join(res['groups'])}{extra}")


@main.command()
@click.argument("path")
@storage_options_option
def info(path, storage_options):
    """Describe a cohort/patch/prediction store or a model bundle."""
    import os

    if os.path.isfile(path):
        from mrhscale.io.bundle import describe_bundle

        click.echo(describe_bundle(path))
    else:
        from mrhscale.stores import describe as describe_store

        click.echo(describe_store(path, _storage_options(storage_options)))


_NUMERICS = [
    click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
                 help="Arithmetic of the network: auto = bf16 where the CPU/GPU has bf16 matrix units "
                      "(training: where measured faster), else fp32 [auto, or $MRHSCALE_PRECISION]. "
                      "See docs/precision.md."),
    click.option("--compile", "compile_mode", type=click.Choice(["auto", "on", "off"]), default=None,
                 help="torch.compile the network: auto = where a working compiler is found "
                      "(training: where measured faster) [auto, or $MRHSCALE_COMPILE]."),
]


def numerics_options(f):
    for o in reversed(_NUMERICS):
        f = o(f)
    return f


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("store")
@click.option("--out", "-o", required=True, help="Prediction store (Zarr) to create or resume.")
@click.option("--nifti", "nifti_dir", default=None, help="Also write one NIfTI per subject into this folder.")
@click.option("--ome-zarr", "ome_zarr", default=None, metavar="DIR",
              help="Also write DIR/<subject>.ome.zarr per subject: OME-Zarr (NGFF 0.5) multiscale images "
                   "for napari, Neuroglancer and other viewers.")
@click.option("--subjects", multiple=True, help="Only these subject ids (repeat or comma-separate).")
@click.option("--batch-size", type=int, default=4096, show_default=True, help="Patches per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (on the workers).")
@click.option("--aggregate", type=click.Choice(["centre", "mean"]), default="centre", show_default=True,
              help="centre: the network's centre output per voxel (as the original); "
                   "mean: average of all overlapping PxP outputs.")
@click.option("--to-native", "to_native", is_flag=False, flag_value="", default=None, metavar="[DIR]",
              help="Also map each virtual stain back to the subject's native (pre-registration) grid: "
                   "<--nifti>/<sid>_<target>_virtual_native.nii.gz (needs --nifti). DIR: the --out of "
                   "`mrhscale register` (default: found beside the registered manifest ingested).")
@click.option("--overwrite", is_flag=True,
              help="Replace subjects (or a whole store of another model) in --out that were made from "
                   "something else; the old ones stay until the new ones are complete.")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation: average the network over each patch's 8 in-plane flips and "
                   "quarter turns (8x the compute).")
@numerics_options
@storage_options_option
@scheduler_option
@workers_option
@quiet_option
def predict(model, store, out, nifti_dir, ome_zarr, subjects, batch_size, device, aggregate, to_native,
            overwrite, tta, precision, compile_mode, storage_options, scheduler, workers, quiet):
    """Virtual histology for every brain voxel of STORE's subjects with MODEL (a bundle)."""
    from mrhscale.stages.predict import predict as run

    res = run(model, store, out, nifti_dir=nifti_dir, subjects=_subject_list(subjects),
              scheduler=scheduler, workers=workers, batch_size=batch_size, device=device,
              aggregate=aggregate, quiet=quiet, to_native=to_native, overwrite=overwrite,
              storage_options=_storage_options(storage_options), ome_zarr=ome_zarr,
              precision=precision, compile=compile_mode, tta=tta)
    if res["skipped"]:
        click.echo(f"already predicted, skipped: {', '.join(res['skipped'])}")
    click.echo(f"predicted {len(res['predicted'])} subject(s) into {res['out']} "
               f"({res['brain_voxels']} brain voxels, {res['voxels_per_s']:.0f} voxels/s)"
               + (f"; {res['variable']} with its {res['uncertainty']}" if res.get("uncertainty") else ""))
    if res.get("native"):
        click.echo(f"native-space NIfTI: {', '.join(res['native'])}")
    if res.get("ome_zarr"):
        click.echo(f"OME-Zarr images: {', '.join(res['ome_zarr'])}")


@main.command("export-image")
@click.argument("store")
@click.option("--subject", required=True, help="Subject id in STORE.")
@click.option("--var", "var", required=True,
              help="Variable: mri (with --contrast), mask, fa, a target (af, ...) or label of a cohort "
                   "store; <target>_virtual or mask of a prediction store.")
@click.option("--contrast", default=None, help="Contrast of --var mri (e.g. t2).")
@click.option("--out", "-o", required=True, metavar="X.ome.zarr", help="OME-Zarr image to write.")
@click.option("--levels", type=int, default=3, show_default=True,
              help="Resolution levels; each halves every axis (block mean; masks: block majority).")
@click.option("--overwrite", is_flag=True,
              help="Replace an OME-Zarr image mrhscale wrote at --out (built aside, swapped in when complete).")
@storage_options_option
@quiet_option
def export_image_cmd(store, subject, var, contrast, out, levels, overwrite, storage_options, quiet):
    """Write one volume of STORE (cohort or prediction store) as an OME-Zarr image for viewers."""
    from mrhscale.stages.export_image import export_image

    res = export_image(store, subject, var, out, contrast=contrast, levels=levels, overwrite=overwrite,
                       ctx=_context(storage_options, quiet=quiet))
    if not quiet:
        shapes = ", ".join("x".join(map(str, s)) for s in res.shapes)
        click.echo(f"{res.out}: {'up to date, kept' if res.reused else 'written'}; "
                   f"{len(res.shapes)} level(s) (z, y, x: {shapes})"
                   + ("" if res.exact_affine else "; the affine's rotation/flips are not representable in "
                      "OME-NGFF and were dropped"))


@main.command()
@click.argument("pred")
@click.argument("store")
@click.option("--target", required=True, help="Reference histology variable in STORE (e.g. af).")
@click.option("--out", "-o", required=True, help="Report folder: metrics.json, PNG figures, report.html.")
@click.option("--label", default=None,
              help="Lesion/condition label for ROC: a bool variable of STORE's subjects (e.g. lesion) "
                   "or a NIfTI path with {subject} in it. Default: 'lesion' if the subjects have it.")
@click.option("--roi", default=None,
              help="Restrict the ROC to this region (a label variable or NIfTI path with {subject}), "
                   "e.g. wm: lesioned vs normal white matter.")
@click.option("--marker", "markers", multiple=True, metavar="NAME_OR_PATH",
              help="Extra marker compared like FA/MT ratio/T2/MD (with the reference, the virtual "
                   "stain and on the label): a contrast/variable of STORE (t2, dwi2000_0, fa) or a "
                   "NIfTI path with {subject} on the store grid. Repeatable.")
@click.option("--marker-transforms", default=None, type=click.Path(file_okay=False),
              help="`mrhscale register` output folder: --marker files are in the subjects' native "
                   "space and are mapped onto the store grid (needs the register extra).")
@click.option("--subjects", multiple=True, help="Only these subject ids (repeat or comma-separate).")
@storage_options_option
@quiet_option
def evaluate(pred, store, target, out, label, roi, markers, marker_transforms, subjects,
             storage_options, quiet):
    """Compare virtual (PRED) with reference histology and single MRI markers (STORE)."""
    from mrhscale.stages.evaluate import evaluate as run

    res = run(pred, store, target, out, label=label, roi=roi, subjects=_subject_list(subjects),
              markers=list(markers) or None, marker_transforms=marker_transforms,
              ctx=_context(storage_options, quiet=quiet))
    p = res["pooled"]["virtual"]
    click.echo(f"pooled virtual {target}: pearson {p['pearson']:.3f}, spearman {p['spearman']:.3f}, "
               f"MAE {p['mae']:.3g}, PSNR {p['psnr']:.2f} dB, SSIM {p['ssim']:.3f}; report in {out}")
    if res.get("uncertainty"):
        u = res["uncertainty"]["pooled"]
        click.echo(f"uncertainty {res['uncertainty']['variable']}: Spearman with |error| "
                   f"{u['spearman_abs_error']:.3f}, 95% interval coverage {u['coverage_95']:.3f}, "
                   f"retention area {u['retention']['area']:.3g} (random {u['retention']['random_area']:.3g}, "
                   f"oracle {u['retention']['oracle_area']:.3g})")
    for name in res["markers"]["extra"]:
        m = res["pooled"][name]
        click.echo(f"marker {name}: pearson vs reference {m['pearson']:.3f}, "
                   f"vs virtual {m['pearson_vs_virtual']:.3f}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("patches")
@click.option("--out", "-o", required=True, help="Report folder: importance.json/.csv, bar chart.")
@click.option("--split", default="val", show_default=True, help="Patch split to permute (val or train).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Permutations per channel/group.")
@click.option("--max-patches", type=int, default=10000, show_default=True, help="Random subset size.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stain", default=None,
              help="For a network of several stains: the stain scored (default: its first that PATCHES has).")
@numerics_options
@storage_options_option
@quiet_option
def importance(model, patches, out, split, repeats, max_patches, seed, stain, precision, compile_mode,
               storage_options, quiet):
    """Contribution of each contrast group and channel to MODEL, by permutation on PATCHES."""
    from mrhscale.stages.importance import importance as run

    res = run(model, patches, out, split=split, repeats=repeats, seed=seed, precision=precision,
              compile=compile_mode, max_patches=max_patches, quiet=quiet, stain=stain,
              storage_options=_storage_options(storage_options))
    top = ", ".join(f"{g['name']} {g['increase']:.3g}" for g in res["groups"][:5])
    click.echo(f"{res['target']}: baseline MSE {res['baseline_mse']:.4g}; MSE increase by group: {top}; "
               f"report in {out}")


@main.command("crossval")
@click.argument("store")
@click.option("--target", required=True, help="Reference stain in STORE (e.g. mbp).")
@click.option("--out", "-o", required=True, help="Folder: one fold-<subject>/ per fold, crossval.csv/.json/.png.")
@click.option("--folds", default="leave-one-subject-out", show_default=True, metavar="leave-one-subject-out|K",
              help="Hold out each subject in turn, or split the subjects into K folds.")
@click.option("--recipe", default=None, metavar="NAME|FILE.yaml",
              help="A training recipe (robust, paper, fast) or a YAML mapping of training options (as `train`) "
                   "and patch options (as `patches`), plus `tta: true` to predict with test-time augmentation, "
                   "e.g. {recipe: fast, epochs: 4, stride: 2} [robust].")
@click.option("--subjects", multiple=True, help="Only these subject ids (repeat or comma-separate).")
@click.option("--fold-workers", type=int, default=None,
              help="Run folds side by side, one per Dask worker process (default: one after another).")
@click.option("--device", default=None, help="Training device (cpu, cuda, cuda:N).")
@click.option("--threads", type=int, default=None, help="Torch threads per fold.")
@scheduler_option
@workers_option
@quiet_option
def crossval_cmd(store, target, out, folds, recipe, subjects, fold_workers, device, threads, scheduler, workers,
                 quiet):
    """Cross-validate a training recipe by held-out subject: per fold patches, train, predict and
    evaluate the held-out brain; a table of r, MAE and SSIM. Under `torchrun --nproc_per_node=N`
    each process runs its own folds."""
    from mrhscale.stages.crossval import crossval

    res = crossval(store, target, out, folds=folds, recipe=recipe, subjects=_subject_list(subjects),
                   fold_workers=fold_workers, threads=threads,
                   ctx=_context(scheduler=scheduler, workers=workers, quiet=quiet, device=device or "cpu"))
    if res is not None:
        s = res["summary"]
        click.echo(f"held-out Pearson r {s['pearson']['mean']:.3f} +- {s['pearson']['sd']:.3f}, MAE "
                   f"{s['mae']['mean']:.3g}, SSIM {s['ssim']['mean']:.3f} over {len(res['rows'])} subject(s); "
                   f"table {res['table']}")


def _training_options(f):
    """Options shared by `train` and `finetune`; unset ones take the --recipe's values
    (or, with --resume, the checkpointed run's own values); [x] in a help: the default
    recipe's (robust) and, where it differs, the paper's."""
    opts = [
        click.option("--out", "-o", required=True, help="Run directory (checkpoints, metrics, curve.png, model.pt)."),
        click.option("--recipe", default=None, metavar="NAME",
                     help="Preset of optimiser, schedule, lr, batch, epochs, normalisation, augmentation: "
                          "robust (AdamW + cosine on each brain scaled by its own range, in-plane flips: "
                          "transfers best to a new scanner, docs/recipes.md), paper (MRH_training.m exactly) "
                          "or fast (AdamW + cosine in 6 epochs, robust's normalisation, tuned for CPUs); "
                          "explicit options override it [robust]."),
        click.option("--epochs", type=int, default=None, help="Epochs [train 30, finetune 30]."),
        click.option("--batch-size", type=int, default=None,
                     help="GLOBAL mini-batch, split over torchrun processes [128]."),
        click.option("--lr", type=float, default=None,
                     help="Initial learning rate [train: robust 2e-3, paper 0.1; another optimiser without "
                          "--lr: 0.1 (sgd) / 1e-3 (adamw); finetune 1e-4]."),
        click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default=None,
                     help="[adamw; paper: sgd, momentum 0.9]."),
        click.option("--schedule", type=click.Choice(["piecewise", "cosine"]), default=None,
                     help="piecewise: x drop-factor every drop-period epochs [cosine; paper: piecewise]."),
        click.option("--drop-period", type=int, default=None, help="Piecewise schedule period [10]."),
        click.option("--drop-factor", type=float, default=None, help="Piecewise schedule factor [0.1]."),
        click.option("--loss", type=click.Choice(["matlab", "mse", "centre-mse"]), default=None,
                     help="matlab: 0.5*sum of squared errors over the PxP outputs, batch mean "
                          "(the scale lr 0.1 and clip 0.01 were tuned for) [matlab]."),
        click.option("--clip", type=float, default=None,
                     help="Gradient L2-norm threshold per parameter tensor; 0 = off [0; paper: 0.01]."),
        click.option("--weight-decay", type=float, default=None, help="L2 on weights, not biases [1e-4]."),
        click.option("--init", type=click.Choice(["glorot", "torch"]), default=None,
                     help="Weight init of new layers [glorot, as MATLAB]."),
        click.option("--seed", type=int, default=None, help="Seed of init and data order [0]."),
        click.option("--augment", default=None, metavar="LIST",
                     help="Training-time augmentation, comma-separated: gain, offset, bias, noise, flip, "
                          "or all (docs/training.md) [robust: flip; paper: none]."),
        click.option("--val-patches", type=int, default=None,
                     help="Validate on this fixed subset each epoch; the last epoch always on the "
                          "whole val split [all]."),
        click.option("--workers", type=int, default=0, show_default=True,
                     help="Data-loading processes per training process."),
        click.option("--threads", type=int, default=None,
                     help="Torch CPU threads per process (default: torch's; torchrun sets 1)."),
        click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available)."),
        click.option("--no-amp", is_flag=True, default=None,
                     help="Old spelling of --precision fp32 (when --precision is auto)."),
        *_NUMERICS,
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
        click.option("--keep-checkpoints", is_flag=True, help="Also keep one checkpoint per epoch."),
        storage_options_option,
        quiet_option,
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _run_training(fn, *args, **kw):
    import os

    from mrhscale.training import TrainingInterrupted

    kw["amp"] = False if kw.pop("no_amp") else None
    kw["compile"] = kw.pop("compile_mode")
    kw["storage_options"] = _storage_options(kw.pop("storage_options", None))
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    try:
        res = fn(*args, **kw)
    except TrainingInterrupted as e:
        if rank0:
            click.echo(f"mrhscale: {e}", err=True)
        sys.exit(143)  # 128 + SIGTERM: batch schedulers requeue
    f = res["final"]
    if rank0 and not kw.get("quiet"):
        click.echo(f"model {res['model']}: {res['epochs']} epochs, train loss {f.get('train_loss', float('nan')):.4g}, "
                   f"val loss {f.get('val_loss', float('nan')):.4g}, val r {f.get('val_r', float('nan')):.3f}"
                   + (f" (ensemble of {len(res['members'])}: mean of the members)" if res.get("members") else ""))


@main.command()
@click.argument("patches")
@click.option("--depth", type=int, default=None, help="Residual blocks [5]; the paper's AF net: 29-30.")
@click.option("--norm", type=click.Choice(["global", "subject-percentile", "subject-max"]), default=None,
              help="Input scaling: the patch store's statistics (global), or each brain's own inside its mask: "
                   "0.5-99.5th percentiles per contrast, or one maximum (the original's test-time scaling); "
                   "kept in the model, applied by predict [robust: subject-percentile; paper: global].")
@click.option("--members", type=int, default=None,
              help="Train a deep ensemble of this many networks (seeds SEED..SEED+K-1, one after another; "
                   "K times the time): predict then writes their mean and a calibrated per-voxel "
                   "<stain>_uncertainty (docs/uncertainty.md) [1].")
@_training_options
def train(patches, **kw):
    """Train MRH-Net on PATCHES; one process, or under `torchrun --nproc_per_node=N` (DDP)."""
    from mrhscale.training import train as run

    _run_training(run, patches, kw.pop("out"), **kw)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("patches")
@click.option("--freeze-backbone", is_flag=True, default=None, help="Train only the new Conv4/Conv5.")
@click.option("--head-lr-factor", type=float, default=None, help="Learning-rate factor of Conv4/Conv5 [10].")
@click.option("--add-stain", is_flag=True, default=None,
              help="Keep MODEL's heads and add a head for each new stain of PATCHES: one network predicts "
                   "them all (needs --freeze-backbone unless PATCHES has MODEL's stains too).")
@_training_options
def finetune(model, patches, **kw):
    """Transfer learning from MODEL to a new stain's PATCHES: fresh Conv4/Conv5 (lr x10), base lr 1e-4."""
    from mrhscale.training import finetune as run

    _run_training(run, model, patches, kw.pop("out"), **kw)


@main.command("import-matlab")
@click.argument("mat", metavar="NET.mat")
@click.option("--out", "-o", required=True, metavar="MODEL", help="Model bundle to write.")
@click.option("--channels", default=None, metavar="FILE|NAMES",
              help="Input channel names in training order: a file (one per line) or "
                   "comma-separated. Default for 67 channels: the original's order "
                   "(dwi2000 x34, dwi5000 x30, t2, mt_off, mt_on).")
@click.option("--norm", default=None, metavar="global-max=VALUE|identity",
              help="Input scaling the network was trained with (the file does not hold it): "
                   "the original divided every input by one global maximum VALUE. Required.")
@click.option("--target-max", type=float, default=1.0, show_default=True,
              help="Global maximum the training labels were divided by; outputs x this = raw "
                   "stain units (1: keep the network's own units).")
@click.option("--target", default=None,
              help="Stain name (default: from the file name: Fluo/AF->af, NF, MBP, Nissl).")
@click.option("--patch-axis", type=click.Choice(["x", "y", "z"]), default="y", show_default=True,
              help="Slice axis: patches lie in the plane of the two other axes (original: y).")
@click.option("--allow-renamed", is_flag=True,
              help="Accept the MRH-Net structure under other layer names.")
@quiet_option
def import_matlab_cmd(mat, out, channels, norm, target_max, target, patch_axis, allow_renamed,
                      quiet):
    """Import a published MATLAB MRH-Net (DAGNetwork NET.mat) as a model bundle."""
    from mrhscale.nn.matlab import import_matlab

    s = import_matlab(mat, out, channels=channels, norm=norm, target_max=target_max,
                      target=target, patch_axis=patch_axis, strict_names=not allow_renamed)
    if not quiet:
        click.echo(
            f"{s['out']}: MRH-Net depth {s['depth']}, {s['in_channels']} channels "
            f"({s['channels_from']}), {s['parameters']:,} parameters, target {s['target']} "
            f"({s['target_from']}), norm {s['norm']}"
            + (f" {s['input_max']:g}" if s["input_max"] is not None else "")
            + (f", {len(s['renamed_layers'])} layers renamed" if s["renamed_layers"] else "")
        )


@main.command("export")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["onnx", "pt2"]), default="onnx", show_default=True,
              help="onnx (onnxruntime and other runtimes) or pt2 (torch.export.load).")
@click.option("--out", "-o", required=True, metavar="FILE",
              help="File to write; its metadata also goes to FILE.json.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier mrhscale export at FILE.")
@quiet_option
def export_cmd(model, fmt, out, opset, overwrite, quiet):
    """Export MODEL (a bundle) for other runtimes: raw MRI patches in, raw stain units out."""
    from mrhscale.stages.export import export_model

    res = export_model(model, out, fmt, overwrite=overwrite, opset=opset)
    if not quiet:
        click.echo(f"{res.out}: {res.format} via {res.exporter}, dynamic {', '.join(res.dynamic)}, "
                   f"max |export - torch| {res.max_abs_diff:.2g}; metadata in {res.sidecar}")


@main.command("patches")
@click.argument("store")
@click.option("--target", required=True,
              help="Histology target variable (e.g. af, nf, mbp), or several comma-separated (nf,mbp): one "
                   "network then learns them all, a head per stain.")
@click.option("--out", "out", required=True, metavar="PATCHES", help="Output patch store (Zarr URL).")
@click.option("--half", type=int, default=1, show_default=True, help="Patch is (2H+1)x(2H+1) in-plane.")
@click.option("--stride", type=int, default=6, show_default=True, help="In-plane grid stride.")
@click.option("--slices", default=None, metavar="A:B",
              help="Half-open 0-based slice range along --axis (default: slices where the target has data).")
@click.option("--axis", type=click.Choice(["x", "y", "z"]), default="y", show_default=True,
              help="Slice axis; patches lie in the plane of the two others.")
@click.option("--subjects", multiple=True, help="Subject ids (repeat or comma-separate; default: all).")
@click.option("--min-label-sum", type=float, default=30, show_default=True,
              help="Keep a sample only if its label patch sums to at least this (raw target units).")
@click.option("--min-label-nonzero", type=int, default=4, show_default=True,
              help="Keep a sample only if at least this many label voxels are nonzero.")
@click.option("--val-fraction", type=float, default=0.0, show_default=True,
              help="Random fraction of samples held out for validation.")
@click.option("--val-subjects", multiple=True, help="Subjects held out whole for validation.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of split and shuffle.")
@click.option("--norm", type=click.Choice(["percentile", "global-max"]), default="percentile",
              show_default=True, help="Input statistics stored with the patches (global-max = original).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--chunk-size", type=int, default=None, help="Patches per output chunk (default ~8 MB).")
@click.option("--compress", is_flag=True,
              help="Blosc lz4 on the patch arrays (smaller; MRI floats shrink little, streaming slower).")
@click.option("--overwrite", is_flag=True,
              help="Replace a complete patch store made from other inputs or options (built aside, "
                   "swapped in when complete). An identical one is reused without it.")
@storage_options_option
@scheduler_option
@workers_option
@quiet_option
def patches_cmd(store, target, out, half, stride, slices, axis, subjects, min_label_sum,
                min_label_nonzero, val_fraction, val_subjects, seed, norm, dtype, chunk_size,
                compress, overwrite, storage_options, scheduler, workers, quiet):
    """Extract shuffled training patches of --target from cohort STORE into --out."""
    from mrhscale.options import PatchOptions
    from mrhscale.stages.patches import extract_patches

    options = PatchOptions(half=half, stride=stride, slices=slices, axis=axis, min_label_sum=min_label_sum,
                           min_label_nonzero=min_label_nonzero, val_fraction=val_fraction,
                           val_subjects=_subject_list(val_subjects), seed=seed, stats=norm, dtype=dtype,
                           chunk_size=chunk_size, compress=compress)
    extract_patches(store, target, out, subjects=_subject_list(subjects), overwrite=overwrite, options=options,
                    ctx=_context(storage_options, scheduler, workers, quiet))


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=True))
@click.option("--reference", "-r", required=True,
              help="Subject id of MANIFEST, or a 3D template NIfTI (of the --contrast), whose grid all "
                   "subjects are brought onto.")
@click.option("--out", "-o", required=True, help="Folder: <sid>/*.nii.gz, <sid>/transforms/, cohort.yaml.")
@click.option("--transform", type=click.Choice(["rigid", "affine", "syn", "affine+syn"]), default="affine+syn",
              show_default=True, help="syn = affine+syn: an affine stage, then SyN (deformable).")
@click.option("--contrast", default="fa", show_default=True,
              help="Contrast that drives the registration: fa, a channel (e.g. dwi2000_0, a b0), t2, mask.")
@click.option("--metric", type=click.Choice(["mattes", "cc", "meansquares"]), default="mattes",
              show_default=True, help="ANTs similarity metric (mattes = mutual information).")
@click.option("--init", type=click.Choice(["com", "header"]), default="com", show_default=True,
              help="com: align centres of mass first; header: trust the headers' world coordinates.")
@click.option("--fast", is_flag=True, help="Fewer iterations (small grids, previews).")
@click.option("--min-similarity", type=float, default=0.4, show_default=True,
              help="A subject whose registered contrast has |Pearson r| with the reference below "
                   "this is reported as not converged.")
@click.option("--threads", type=int, default=1, show_default=True, help="ITK threads per subject task.")
@click.option("--compress", is_flag=True, help="Write .nii.gz instead of .nii (smaller, several times slower).")
@click.option("--subjects", multiple=True, help="Only these subject ids (repeat or comma-separate).")
@click.option("--overwrite", is_flag=True, help="Redo subjects already registered in --out.")
@scheduler_option
@workers_option
@quiet_option
def register(manifest, reference, out, transform, contrast, metric, init, fast, min_similarity, threads,
             compress, subjects, overwrite, scheduler, workers, quiet):
    """Register MANIFEST's subjects onto a reference grid with ANTs (needs mrhscale[register])."""
    from mrhscale.options import RegistrationOptions
    from mrhscale.stages.register import register_cohort

    options = RegistrationOptions(transform=transform, contrast=contrast, metric=metric, init=init, fast=fast,
                                  threads=threads)
    res = register_cohort(manifest, reference, out, subjects=_subject_list(subjects), options=options,
                          min_similarity=min_similarity, compress=compress, overwrite=overwrite,
                          ctx=_context(scheduler=scheduler, workers=workers, quiet=quiet))
    if res["skipped"]:
        click.echo(f"already registered, skipped: {', '.join(res['skipped'])}")
    click.echo(f"registered {len(res['registered'])} subject(s) into {res['out']}"
               + (f"; manifest for ingest: {res['manifest']}" if res["manifest"] else ""))
    if res["failed"]:
        click.echo(f"{len(res['failed'])} subject(s) failed:", err=True)
        for msg in res["failed"].values():
            click.echo(f"  {msg}", err=True)
        if not res["registered"] and not res["skipped"]:
            sys.exit(2)


@main.command("register-histology")
@click.argument("volume", type=click.Path(dir_okay=False))
@click.option("--subject", required=True, help="Subject id of --manifest, or an MRI NIfTI path.")
@click.option("--manifest", "-m", default=None, type=click.Path(dir_okay=True),
              help="Cohort manifest holding --subject.")
@click.option("--out", "-o", required=True, help="Registered stain NIfTI (on the subject's MRI grid).")
@click.option("--contrast", default="fa", show_default=True, help="MRI contrast the stain is matched to.")
@click.option("--transform", type=click.Choice(["rigid", "affine", "syn", "affine+syn"]), default="affine+syn",
              show_default=True)
@click.option("--init", type=click.Choice(["com", "header"]), default="com", show_default=True)
@click.option("--fast", is_flag=True, help="Fewer iterations.")
@click.option("--min-similarity", type=float, default=0.1, show_default=True,
              help="Normalised mutual information below which the registration counts as failed.")
@quiet_option
def register_histology(volume, subject, manifest, out, contrast, transform, init, fast, min_similarity, quiet):
    """Register a 3D stain VOLUME to a subject's MRI (mutual information), for new training targets."""
    from mrhscale.options import RegistrationOptions
    from mrhscale.stages.register import register_histology as run

    options = RegistrationOptions(contrast=contrast, transform=transform, init=init, fast=fast)
    res = run(volume, subject, out, manifest=manifest, options=options, min_similarity=min_similarity)
    m = res["metrics"]
    if not quiet:
        click.echo(f"registered {volume} -> {res['out']} (NMI {m['nmi_before']:.3f} -> {m['nmi_after']:.3f}, "
                   f"{res['seconds']:.1f} s); transforms in {res['transforms']}")


def _some_subjects(spec):
    """None, "all", or a list of subject ids (comma-separated)."""
    return spec if spec in (None, "all") else _subject_list((spec,))


@main.command("synth")
@click.argument("outdir", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--subjects", "-n", type=int, default=4, show_default=True, help="Number of subjects.")
@click.option("--shape", default="48,32,64", show_default=True, metavar="X,Y,Z",
              help="Grid size (each >= 8); 200,128,280 is the real data's grid (0.06 mm voxels).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same cohort.")
@click.option("--format", "fmt", type=click.Choice(["nii.gz", "nii", "analyze"]), default="nii.gz",
              show_default=True, help="File format (nii is fastest at full size).")
@click.option("--no-lesions", is_flag=True, help="No demyelinating lesions (default: every other subject).")
@click.option("--inverted-mask", is_flag=True, help="Write masks as the original does: 1 OUTSIDE the brain.")
@click.option("--overwrite", is_flag=True, help="Replace a cohort already in OUTDIR.")
@click.option("--scanner-variation", "scanner_variation", default=None, metavar="all|ID,...",
              help="Scan these subjects (or all) on their own scanner: per-volume gains, a coil field, "
                   "SNR, b-value and echo-time shifts; the ground truth does not change "
                   "(docs/synthetic.md).")
@click.option("--artefact", default=None, metavar="all|ID,...",
              help="Give these subjects (or all) a field-of-view artefact: a region whose contrasts are "
                   "unlike any tissue, stains unchanged, marked by an `artefact` label (docs/synthetic.md).")
@quiet_option
def synth(outdir, subjects, shape, seed, fmt, no_lesions, inverted_mask, overwrite, scanner_variation, artefact,
          quiet):
    """Write a synthetic phantom cohort (67-channel MRI, FA, mask, af/nf/mbp, lesion labels,
    ground truth) to OUTDIR, with OUTDIR/cohort.yaml for ingest."""
    from mrhscale.options import SynthVariation
    from mrhscale.synth.phantom import make_cohort

    if subjects < 1:
        raise MRHError(f"--subjects: expected an integer >= 1, got {subjects}")
    dims = _ints(shape, 3, "--shape")
    if min(dims) < 8:
        raise MRHError(f"--shape: each size must be >= 8, got {shape!r}")
    variation = SynthVariation(lesions=not no_lesions, scanner_variation=_some_subjects(scanner_variation),
                               artefact=_some_subjects(artefact))
    path = make_cohort(outdir, n_subjects=subjects, shape=dims, seed=seed, fmt=fmt, inverted_mask=inverted_mask,
                       variation=variation, overwrite=overwrite, quiet=quiet)
    click.echo(path)


@main.command()
@click.option("--out", "-o", default="demo-out", show_default=True, help="Folder for every stage's output and report.html.")
@click.option("--subjects", type=int, default=5, show_default=True, help="Synthetic subjects (the last lesioned one is held out).")
@click.option("--shape", default="48,32,64", show_default=True, help="Synthetic grid X,Y,Z.")
@click.option("--target", default="mbp,nf", show_default=True,
              help="Stain(s) to learn, one network with a head each: af, nf, mbp or a comma list (the first is "
                   "the headline; mbp: myelin, the lesion is a demyelination).")
@click.option("--recipe", default="fast", show_default=True, metavar="NAME",
              help="Training recipe (see `mrhscale train --help`): fast, or robust / paper (30 epochs: about 5x "
                   "the training time).")
@click.option("--epochs", type=int, default=None, help="Training epochs [the recipe's].")
@click.option("--depth", type=int, default=5, show_default=True)
@click.option("--members", type=int, default=3, show_default=True,
              help="Networks in the ensemble (their spread is the uncertainty map); 1: a single network, "
                   "no uncertainty, a third of the training time.")
@click.option("--quick", is_flag=True, help="Tiny cohort and 2 epochs: checks the chain in about a minute.")
@workers_option
@quiet_option
def demo(out, subjects, shape, target, recipe, epochs, depth, members, quick, workers, quiet):
    """The whole chain on a synthetic cohort: synth, ingest, patches, train, predict, evaluate, report."""
    from mrhscale.demo import QUICK, DemoConfig, run_demo

    if quick:
        cfg = QUICK
    else:
        cfg = DemoConfig(subjects=subjects, shape=_ints(shape, 3, "--shape"), target=target,
                         recipe=recipe, epochs=epochs, depth=depth, members=members)
    res = run_demo(out, cfg, ctx=_context(workers=workers, quiet=quiet))
    click.echo(f"virtual {res['stain']}: Pearson r {res['virtual_pearson']:.3f} on held-out {res['held_out']} "
               f"(best single marker {res['best_marker']}: {res['best_marker_pearson']:.3f})")
    for stain, r in (res.get("other_stains") or {}).items():
        click.echo(f"virtual {stain} (same network): Pearson r {r['pearson']:.3f} on held-out {res['held_out']}"
                   + (f"; uncertainty Spearman {r['uncertainty_spearman']:.3f}, coverage "
                      f"{r['uncertainty_coverage_95']:.3f}" if r.get("uncertainty_spearman") is not None else ""))
    if "virtual_auc" in res:
        click.echo(f"lesion AUC: virtual {res['virtual_auc']:.3f}, best single marker {res['best_marker_auc']}")
    if res.get("uncertainty_spearman") is not None:
        ratio = res.get("artefact_uncertainty_ratio")
        click.echo(f"uncertainty: Spearman with |error| {res['uncertainty_spearman']:.3f}, 95% interval "
                   f"coverage {res['uncertainty_coverage_95']:.3f}, retention area "
                   f"{res['uncertainty_retention_area']:.3g} (random order {res['error_random_order_area']:.3g})"
                   + (f", {ratio:.2f}x higher in the artefact than in the rest of the brain" if ratio else ""))
    click.echo(f"report: {res['report']}")
