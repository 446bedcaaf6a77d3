"""Commands that bring data in and show it: synth, manifest, ingest, info, export-image, register.

Each command imports its stage inside its body: the stage pulls torch, zarr and Dask
(seconds), which ``mrhscale --help`` and every other command must not pay
(tests/cli/test_options_table.py checks that a --help loads no torch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import click

from mrhscale.cli.base import main
from mrhscale.cli.params import context_from, context_options, subject_list, take, with_options
from mrhscale.errors import MRHError
from mrhscale.options import (
    COHORT_MIN_SIMILARITY,
    HISTOLOGY_MIN_SIMILARITY,
    CohortOptions,
    ImageOptions,
    InfoOptions,
    IngestOptions,
    RegistrationOptions,
    SectionOptions,
    SectionRegistrationOptions,
    SynthVariation,
)

subjects_option = click.option("--subjects", multiple=True, help="Only these subject ids (repeat or comma-separate).")


landmarks_option = click.option(
    "--landmarks", multiple=True, metavar="FILE",
    help="Landmarks to score the registration with (TRE in um, recorded in transform.json): "
         "--landmarks MOVING --landmarks FIXED (Slicer .mrk.json/.fcsv, ANTs CSV), or one BigWarp CSV.")


def landmark_files(files) -> tuple | None:
    """--landmarks given once (a BigWarp pair) or twice (moving, fixed); None when not given."""
    if len(files) > 2:
        raise MRHError(f"--landmarks: give one BigWarp CSV or two files (moving, fixed), got {len(files)}")
    return tuple(files) or None


def tre_line(report: dict) -> str:
    b, a = report["before"]["pooled"], report["after"]["pooled"]
    return (f"landmark TRE ({a['n']} points): median {b['median']:.1f} -> {a['median']:.1f} um, "
            f"90th percentile {b['p90']:.1f} -> {a['p90']:.1f} um")


def some_subjects(spec):
    """None, "all", or a list of subject ids (comma-separated)."""
    return spec if spec in (None, "all") else subject_list((spec,))


@main.command("synth")
@click.argument("outdir", type=click.Path(file_okay=True, dir_okay=True))
@with_options(CohortOptions, SynthVariation, SectionOptions)
@click.option("--overwrite", is_flag=True, help="Replace a cohort already in OUTDIR.")
@context_options()
def synth(outdir, overwrite, **kw):
    """Write a synthetic phantom cohort (67-channel MRI, FA, mask, af/nf/mbp, lesion labels,
    ground truth) to OUTDIR, with OUTDIR/cohort.yaml for ingest; with --sections N also a stack of
    2D histology sections of one subject, with its truth and landmarks, in OUTDIR/sections/."""
    from mrhscale.synth.phantom import make_cohort  # numba kernels: compiled only when synth runs

    opts = take(CohortOptions, kw)
    if opts.n_subjects < 1:
        raise MRHError(f"--n-subjects: expected an integer >= 1, got {opts.n_subjects}")
    if min(opts.shape) < 8:
        raise MRHError(f"--shape: each size must be >= 8, got {','.join(map(str, opts.shape))!r}")
    variation = take(SynthVariation, kw)
    variation = dataclasses.replace(variation, scanner_variation=some_subjects(variation.scanner_variation),
                                    artefact=some_subjects(variation.artefact))
    sections = take(SectionOptions, kw)
    click.echo(make_cohort(outdir, **dataclasses.asdict(opts), variation=variation, overwrite=overwrite,
                           quiet=kw["quiet"], sections=sections if sections.sections else None))


@main.command("manifest")
@click.argument("folder", metavar="DIR")
@click.option("--out", "-o", required=True, metavar="FILE.yaml",
              help="Cohort manifest to write (paths in it relative to it).")
@click.option("--bids", is_flag=True, help="DIR is a BIDS dataset (needs pip install \"mrhscale[bids]\").")
@click.option("--channels-from", default=None, metavar="FILE",
              help="YAML/JSON mapping MRI group -> channel names for every subject, e.g. "
                   "'{t2MTONOFF: [t2, mt_off, mt_on]}' (a <group>.json sidecar's \"channels\" wins).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it is a cohort manifest (never any other file).")
@context_options()
def manifest_cmd(folder, out, bids, channels_from, overwrite, quiet):
    """Write a cohort manifest for DIR: a folder per subject, or a BIDS dataset (naming rules: README)."""
    from mrhscale.io.manifest_scan import write_manifest

    res = write_manifest(folder, out, bids=bids, channel_names=channels_from, overwrite=overwrite)
    if not quiet:
        extra = "".join(f"; {k} {', '.join(res[k])}" for k in ("targets", "labels") if res[k])
        click.echo(f"{res['manifest']}: {len(res['subjects'])} subject(s), MRI groups "
                   f"{', '.join(res['groups'])}{extra}")


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=True))
@click.option("--out", "-o", required=True, help="Cohort store to create or extend (path or URL).")
@subjects_option
@with_options(IngestOptions)
@click.option("--overwrite", is_flag=True,
              help="Rewrite subjects already in the store (each kept until its new version is complete).")
@context_options(storage=True, dask=True)
def ingest(manifest, out, subjects, overwrite, **kw):
    """Write the subjects of MANIFEST (cohort YAML) into a chunked Zarr cohort store."""
    from mrhscale.stages.ingest import ingest as run

    opts = take(IngestOptions, kw)
    res = run(manifest, out, subjects=subject_list(subjects), **dataclasses.asdict(opts), overwrite=overwrite,
              ctx=context_from(kw))
    if res.skipped:
        click.echo(f"already in store, skipped: {', '.join(res.skipped)}")
    click.echo(f"ingested {len(res.written)} subject(s) into {res.store}")
    if res.bad:
        click.echo(f"{len(res.bad)} bad subject(s) not ingested:", err=True)
        for sid, msg in res.bad.items():
            click.echo(f"  {sid}: {msg}", err=True)
        if not res.written and not res.skipped:
            sys.exit(2)


@main.command()
@click.argument("path")
@with_options(InfoOptions)
@context_options(storage=True)
def info(path, **kw):
    """Describe a cohort/patch/prediction store or a model bundle (--card: the bundle's model card)."""
    opts, ctx = take(InfoOptions, kw), context_from(kw)
    if opts.card or opts.as_json:
        click.echo(model_card_text(path, opts), nl=not opts.card or opts.as_json)
    elif os.path.isfile(path):
        from mrhscale.io.bundle import describe_bundle  # torch: only for a bundle

        click.echo(describe_bundle(path))
    else:
        from mrhscale.stores import describe as describe_store

        click.echo(describe_store(ctx.location(path)))


def model_card_text(path: str, opts: InfoOptions) -> str:
    """A bundle's model card, Markdown or (``--json``) JSON."""
    if not opts.card:
        raise MRHError("--json: give it with --card (the model card as JSON)")
    if not os.path.isfile(path):
        raise MRHError(f"--card: {path} is not a model bundle file (stores have no model card)")
    from mrhscale.io.bundle import read_bundle  # torch: only for a bundle
    from mrhscale.io.card import card_markdown, card_of

    card = card_of(read_bundle(path))
    return json.dumps(card, indent=1) if opts.as_json else card_markdown(card)


@main.command("export-image")
@click.argument("store")
@click.option("--subject", required=True, help="Subject id in STORE.")
@click.option("--var", "var", required=True,
              help="Variable: mri (with --contrast), mask, fa, a target (af, ...) or label of a cohort "
                   "store; <target>_virtual or mask of a prediction store.")
@click.option("--out", "-o", required=True, metavar="X.ome.zarr", help="OME-Zarr image to write.")
@with_options(ImageOptions)
@click.option("--overwrite", is_flag=True,
              help="Replace an OME-Zarr image mrhscale wrote at --out (built aside, swapped in when complete).")
@context_options(storage=True)
def export_image_cmd(store, subject, var, out, overwrite, **kw):
    """Write one volume of STORE (cohort or prediction store) as an OME-Zarr image for viewers."""
    from mrhscale.stages.export_image import export_image

    opts = take(ImageOptions, kw)
    ctx = context_from(kw)
    res = export_image(store, subject, var, out, contrast=opts.contrast, levels=opts.levels, overwrite=overwrite,
                       ctx=ctx)
    if not ctx.quiet:
        shapes = ", ".join("x".join(map(str, s)) for s in res.shapes)
        click.echo(f"{res.out}: {'up to date, kept' if res.reused else 'written'}; "
                   f"{len(res.shapes)} level(s) (z, y, x: {shapes})"
                   + ("" if res.exact_affine else "; the affine's rotation/flips are not representable in "
                      "OME-NGFF and were dropped"))


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=True))
@click.option("--reference", "-r", required=True,
              help="Subject id of MANIFEST, or a 3D template NIfTI (of the --contrast), whose grid all "
                   "subjects are brought onto.")
@click.option("--out", "-o", required=True, help="Folder: <sid>/*.nii.gz, <sid>/transforms/, cohort.yaml.")
@with_options(RegistrationOptions)
@click.option("--min-similarity", type=float, default=COHORT_MIN_SIMILARITY, show_default=True,
              help="A subject whose registered contrast has |Pearson r| with the reference below "
                   "this is reported as not converged.")
@click.option("--compress", is_flag=True, help="Write .nii.gz instead of .nii (smaller, several times slower).")
@subjects_option
@click.option("--overwrite", is_flag=True, help="Redo subjects already registered in --out.")
@click.option("--landmarks", nargs=2, default=None, metavar="MOVING FIXED",
              help="Score each subject with landmarks (TRE in um, recorded in its transform.json): MOVING "
                   "a file per subject with {subject} in its name, FIXED the reference's landmarks.")
@context_options(dask=True)
def register(manifest, reference, out, min_similarity, compress, subjects, overwrite, landmarks, **kw):
    """Register MANIFEST's subjects onto a reference grid with ANTs (needs mrhscale[register])."""
    from mrhscale.stages.register import register_cohort

    res = register_cohort(manifest, reference, out, subjects=subject_list(subjects),
                          options=take(RegistrationOptions, kw), min_similarity=min_similarity,
                          compress=compress, overwrite=overwrite, ctx=context_from(kw), landmarks=landmarks)
    if res.skipped:
        click.echo(f"already registered, skipped: {', '.join(res.skipped)}")
    for sid, report in res.landmarks.items():
        click.echo(f"{sid}: {tre_line(report)}")
    click.echo(f"registered {len(res.registered)} subject(s) into {res.out}"
               + (f"; manifest for ingest: {res.manifest}" if res.manifest else ""))
    if res.failed:
        click.echo(f"{len(res.failed)} subject(s) failed:", err=True)
        for msg in res.failed.values():
            click.echo(f"  {msg}", err=True)
        if not res.registered and not res.skipped:
            sys.exit(2)


@main.command("register-histology")
@click.argument("volume", type=click.Path(dir_okay=False))
@click.option("--subject", required=True, help="Subject id of --manifest, or an MRI NIfTI path.")
@click.option("--manifest", "-m", default=None, type=click.Path(dir_okay=True),
              help="Cohort manifest holding --subject.")
@click.option("--out", "-o", required=True, help="Registered stain NIfTI (on the subject's MRI grid).")
@with_options(RegistrationOptions, exclude=("threads",))
@click.option("--min-similarity", type=float, default=HISTOLOGY_MIN_SIMILARITY, show_default=True,
              help="Normalised mutual information below which the registration counts as failed.")
@landmarks_option
@context_options()
def register_histology(volume, subject, manifest, out, min_similarity, landmarks, quiet, **kw):
    """Register a 3D stain VOLUME to a subject's MRI (mutual information), for new training targets."""
    from mrhscale.stages.register import register_histology as run

    res = run(volume, subject, out, manifest=manifest, options=take(RegistrationOptions, kw, threads=None),
              min_similarity=min_similarity, landmarks=landmark_files(landmarks))
    m = res.metrics
    if not quiet:
        click.echo(f"registered {volume} -> {res.out} (NMI {m['nmi_before']:.3f} -> {m['nmi_after']:.3f}, "
                   f"{res.seconds:.1f} s); transforms in {res.transforms}")
        if res.landmarks:
            click.echo(tre_line(res.landmarks))


@main.command("register-sections")
@click.argument("sections", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--subject", required=True, help="Subject id of --manifest whose MRI the sections are rebuilt on.")
@click.option("--manifest", "-m", required=True, type=click.Path(dir_okay=True), help="Cohort manifest holding --subject.")
@click.option("--stain", required=True, help="The stain's name (nf, mbp, af, nissl...): the target it becomes.")
@click.option("--out", "-o", required=True, help="Rebuilt stain NIfTI on the subject's grid (NaN where no section covers).")
@click.option("--landmarks", default=None, type=click.Path(dir_okay=False), metavar="CSV",
              help="Slide pixels and their MRI points (section, col, row, x_mm, y_mm, z_mm; RAS mm): TRE in um "
                   "before and after, per section and pooled.")
@click.option("--qc", default=None, metavar="DIR", help="QC page folder (default: <out stem>_qc).")
@with_options(SectionRegistrationOptions)
@context_options()
def register_sections_cmd(sections, subject, manifest, stain, out, landmarks, qc, quiet, **kw):
    """Rebuild a stain volume from a stack of 2D SECTIONS (a folder or CSV/YAML table of section images) on
    a subject's MRI: plane finding, per-section affine + SyN, NaN across lost sections and tears."""
    from mrhscale.stages.register.sections import register_sections

    res = register_sections(sections, subject, out, manifest=manifest, stain=stain,
                            options=take(SectionRegistrationOptions, kw), landmarks=landmarks, qc=qc, quiet=quiet)
    failed = [s for s in res.sections if s["status"].startswith("failed")]
    if not quiet:
        done = sum(s["status"] == "ok" for s in res.sections)
        click.echo(f"rebuilt {stain} from {done} of {len(res.sections)} sections -> {res.out} ({res.seconds:.0f} s); "
                   f"tilt {res.planes['tilt_deg'][0]:+.1f}, {res.planes['tilt_deg'][1]:+.1f} degrees; QC: {res.qc}")
        if res.landmarks:
            b, a = res.landmarks["pooled"]["before"], res.landmarks["pooled"]["after"]
            click.echo(f"in-plane landmark TRE ({a['n']} points): median {b['median']:.0f} -> {a['median']:.0f} um, "
                       f"90th percentile {b['p90']:.0f} -> {a['p90']:.0f} um")
    for s in failed:
        click.echo(f"section {s['order']}: {s['status']} (left NaN)", err=True)


@main.command("landmarks")
@click.argument("moving", type=click.Path(dir_okay=False))
@click.argument("fixed", required=False, type=click.Path(dir_okay=False))
@click.option("--transform", "-t", "transforms", multiple=True, required=True, metavar="T",
              help="What warps the MOVING image onto the FIXED one: the folder register or register-histology "
                   "wrote (OUT/<sid>, <out>_transforms), or ANTs files in apply_transforms order (repeat).")
@click.option("--invert", "inverts", multiple=True, type=int, metavar="I",
              help="Index (0-based) of a --transform file ANTs should invert, as whichtoinvert (repeat).")
@click.option("--unit", default="mm", show_default=True,
              help="BigWarp coordinates' unit (the images' calibration: mm or um), or moving,fixed (mm,um).")
@click.option("--out", "-o", default=None, metavar="FILE.json", help="Also write the report here.")
@context_options()
def landmarks(moving, fixed, transforms, inverts, unit, out, quiet):
    """Landmark accuracy: TRE (um) of MOVING's landmarks mapped onto FIXED's, before and after the
    transform, per group (e.g. section) and pooled. FIXED may be left out for a BigWarp CSV (it holds both)."""
    from mrhscale.stages.register.landmarks import report_lines, score_landmarks

    if any(not 0 <= i < len(transforms) for i in inverts):
        raise MRHError(f"--invert {', '.join(map(str, inverts))}: an index of the {len(transforms)} --transform(s), from 0")
    flags = [i in inverts for i in range(len(transforms))] if inverts else None
    report = score_landmarks(moving, fixed, list(transforms), out=out, whichtoinvert=flags, unit=unit)
    if not quiet:
        click.echo("\n".join(report_lines(report)))
