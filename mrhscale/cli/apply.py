"""Commands that use a trained network: predict, evaluate, importance, export, import-matlab; and the demo.

Each command imports its stage inside its body: the stage pulls torch, zarr and Dask
(seconds), which ``mrhscale --help`` and every other command must not pay
(tests/cli/test_options_table.py checks that a --help loads no torch).
"""

from __future__ import annotations

import click

from mrhscale.cli.base import main
from mrhscale.cli.params import (
    context_from,
    context_options,
    renamed,
    subject_list,
    take,
    with_options,
)
from mrhscale.errors import MRHError
from mrhscale.options import (
    DemoOptions,
    ExportOptions,
    ImportanceOptions,
    MatlabImportOptions,
    Numerics,
    PredictOptions,
)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("store")
@click.option("--out", "-o", required=True, help="Prediction store (Zarr) to create or resume.")
@click.option("--nifti", "nifti_dir", default=None, help="Also write one NIfTI per subject into this folder.")
@click.option("--ome-zarr", "ome_zarr", default=None, metavar="DIR",
              help="Also write DIR/<subject>.ome.zarr per subject: OME-Zarr (NGFF 0.5) multiscale images "
                   "for napari, Neuroglancer and other viewers.")
@click.option("--to-native", "to_native", is_flag=False, flag_value="", default=None, metavar="[DIR]",
              help="Also map each virtual stain back to the subject's native (pre-registration) grid: "
                   "<--nifti>/<sid>_<target>_virtual_native.nii.gz (needs --nifti). DIR: the --out of "
                   "`mrhscale register` (default: found beside the registered manifest ingested).")
@click.option("--bids-derivatives", "bids_dir", default=None, metavar="DIR",
              help="Also write a BIDS derivatives folder: DIR/sub-<label>/anat/sub-<label>_desc-<stain>_virtual"
                   ".nii.gz with JSON sidecars and dataset_description.json. Default: <dataset>/derivatives/"
                   "mrhscale when STORE was ingested from a BIDS dataset (mrhscale manifest --bids).")
@click.option("--no-bids-derivatives", "no_bids", is_flag=True,
              help="No BIDS derivatives, even for subjects ingested from a BIDS dataset.")
@click.option("--subjects", multiple=True, help="Only these subject ids (repeat or comma-separate).")
@with_options(PredictOptions, Numerics)
@click.option("--overwrite", is_flag=True,
              help="Replace subjects (or a whole store of another model) in --out that were made from "
                   "something else; the old ones stay until the new ones are complete.")
@context_options(storage=True, dask=True, device="cpu")
def predict(model, store, out, nifti_dir, ome_zarr, to_native, bids_dir, no_bids, subjects, overwrite, **kw):
    """Virtual histology for every brain voxel of STORE's subjects with MODEL (a bundle)."""
    from mrhscale.stages.predict import predict as run

    if bids_dir and no_bids:
        raise MRHError("--bids-derivatives and --no-bids-derivatives: give one of them")
    opts = take(PredictOptions, kw, numerics=take(Numerics, kw))
    res = run(model, store, out, subjects=subject_list(subjects), nifti_dir=nifti_dir, ome_zarr=ome_zarr,
              to_native=to_native, bids_derivatives=False if no_bids else bids_dir, overwrite=overwrite,
              options=opts, ctx=context_from(kw))
    if res.skipped:
        click.echo(f"already predicted, skipped: {', '.join(res.skipped)}")
    click.echo(f"predicted {len(res.predicted)} subject(s) into {res.out} "
               f"({res.brain_voxels} brain voxels, {res.voxels_per_s:.0f} voxels/s)"
               + (f"; {res.variable} with its {res.uncertainty}" if res.get("uncertainty") else ""))
    if res.get("native"):
        click.echo(f"native-space NIfTI: {', '.join(res.native)}")
    if res.get("ome_zarr"):
        click.echo(f"OME-Zarr images: {', '.join(res.ome_zarr)}")
    if res.get("bids_dir"):
        click.echo(f"BIDS derivatives: {res.bids_dir} ({len(res.bids) // 2} map(s) written)")


@main.command()
@click.argument("pred")
@click.argument("store")
@renamed("--target", "--stain")
@click.option("--stain", "stains", multiple=True, metavar="NAME",
              help="Only this stain of PRED (repeat or comma-separate); default: every stain it holds, each "
                   "against STORE's reference of the same name.")
@click.option("--out", "-o", required=True,
              help="Report folder: report.html, metrics.json, and per stain <stain>/metrics.json and figures.")
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
@context_options(storage=True)
def evaluate(pred, store, stains, out, label, roi, markers, marker_transforms, subjects, **kw):
    """Compare virtual stains (PRED) with reference histology and single MRI markers (STORE)."""
    from mrhscale.stages.evaluate import evaluate as run

    res = run(pred, store, out, stains=subject_list(stains), label=label, roi=roi, subjects=subject_list(subjects),
              markers=list(markers) or None, marker_transforms=marker_transforms, ctx=context_from(kw))
    for stain, ev in res.by_stain.items():
        _say_evaluation(stain, ev)
    click.echo(f"report in {res.report}")


def _say_evaluation(stain: str, ev) -> None:
    """One stain's headline: its map, its uncertainty (an ensemble's), the extra markers."""
    p = ev.pooled["virtual"]
    click.echo(f"pooled virtual {stain}: pearson {p['pearson']:.3f}, spearman {p['spearman']:.3f}, "
               f"MAE {p['mae']:.3g}, PSNR {p['psnr']:.2f} dB, SSIM {p['ssim']:.3f}")
    if ev.uncertainty:
        u = ev.uncertainty["pooled"]
        click.echo(f"  uncertainty {ev.uncertainty['variable']}: Spearman with |error| "
                   f"{u['spearman_abs_error']:.3f}, 95% interval coverage {u['coverage_95']:.3f}, "
                   f"retention area {u['retention']['area']:.3g} (random {u['retention']['random_area']:.3g}, "
                   f"oracle {u['retention']['oracle_area']:.3g})")
    for name in ev.markers["extra"]:
        m = ev.pooled[name]
        click.echo(f"  marker {name}: pearson vs reference {m['pearson']:.3f}, "
                   f"vs virtual {m['pearson_vs_virtual']:.3f}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("patches")
@click.option("--out", "-o", required=True, help="Report folder: importance.json/.csv, bar chart.")
@with_options(ImportanceOptions, Numerics)
@context_options(storage=True, device="cpu")
def importance(model, patches, out, **kw):
    """Contribution of each contrast group and channel to MODEL, by permutation on PATCHES."""
    from mrhscale.stages.importance import importance as run

    o = take(ImportanceOptions, kw)
    res = run(model, patches, out, split=o.split, repeats=o.repeats, seed=o.seed, max_patches=o.max_patches,
              stain=o.stain, options=PredictOptions(numerics=take(Numerics, kw)), ctx=context_from(kw))
    top = ", ".join(f"{g['name']} {g['increase']:.3g}" for g in res.groups[:5])
    click.echo(f"{res.target}: baseline MSE {res.baseline_mse:.4g}; MSE increase by group: {top}; report in {out}")


@main.command("import-matlab")
@click.argument("mat", metavar="NET.mat")
@click.option("--out", "-o", required=True, metavar="MODEL", help="Model bundle to write.")
@with_options(MatlabImportOptions)
@context_options()
def import_matlab_cmd(mat, out, quiet, **kw):
    """Import a published MATLAB MRH-Net (DAGNetwork NET.mat) as a model bundle."""
    from mrhscale.stages.import_matlab import import_matlab

    o = take(MatlabImportOptions, kw)
    s = import_matlab(mat, out, channels=o.channels, input_scale=o.input_scale, target_max=o.target_max,
                      target=o.target, patch_axis=o.patch_axis, strict_names=not o.allow_renamed)
    if not quiet:
        click.echo(f"{s.out}: MRH-Net depth {s.depth}, {s.in_channels} channels ({s.channels_from}), "
                   f"{s.parameters:,} parameters, target {s.target} ({s.target_from}), input scale {s.input_scale}"
                   + (f" {s.input_max:g}" if s.input_max is not None else "")
                   + (f", {len(s.renamed_layers)} layers renamed" if s.renamed_layers else ""))


@main.command("export")
@click.argument("model", type=click.Path(dir_okay=False))
@with_options(ExportOptions)
@click.option("--out", "-o", required=True, metavar="FILE", help="File to write; its metadata also goes to FILE.json.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier mrhscale export at FILE.")
@context_options()
def export_cmd(model, out, overwrite, quiet, **kw):
    """Export MODEL (a bundle) for other runtimes: raw MRI patches in, raw stain units out."""
    from mrhscale.stages.export import export_model

    o = take(ExportOptions, kw)
    res = export_model(model, out, o.fmt, overwrite=overwrite, opset=o.opset)
    if not quiet:
        names = {k: ", ".join(r["name"] for r in res.metadata[k]) for k in ("inputs", "outputs")}
        click.echo(f"{res.out}: {res.format} via {res.exporter}, {names['inputs']} -> {names['outputs']}, dynamic "
                   f"{', '.join(res.dynamic)}, max |export - torch| {res.max_abs_diff:.2g}; metadata in {res.sidecar}")


@main.command()
@click.option("--out", "-o", default="demo-out", show_default=True,
              help="Folder for every stage's output and report.html.")
@with_options(DemoOptions)
@context_options(dask=True)
def demo(out, **kw):
    """The whole chain on a synthetic cohort: synth, ingest, patches, train, predict, evaluate, report."""
    from mrhscale.demo import QUICK, DemoConfig, run_demo

    o = take(DemoOptions, kw)
    cfg = QUICK if o.quick else DemoConfig(subjects=o.n_subjects, shape=o.shape, target=o.target,
                                           recipe=o.recipe, epochs=o.epochs, depth=o.depth, members=o.members)
    _print_demo(run_demo(out, cfg, ctx=context_from(kw)))


def _print_demo(res) -> None:
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
    if res.get("artefact_ood_ratio"):
        click.echo(f"out-of-distribution map: {res['artefact_ood_ratio']:.2f}x higher in the artefact than in the "
                   "rest of the brain (both stains)")
    click.echo(f"report: {res['report']}")
