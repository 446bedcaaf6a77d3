"""Command line: click commands only; each parses options and calls one library function."""

from __future__ import annotations

import sys

import click

from mrhscale.errors import MRHError


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit status 2, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MRHError as e:
            click.echo(f"mrhscale: error: {e}", err=True)
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
    out = [s for v in values for s in v.split(",") if s]
    return out or None


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress output.")
scheduler_option = click.option(
    "--scheduler", default=None, metavar="ADDRESS",
    help="Join an existing Dask scheduler (tcp://host:8786); default: an embedded LocalCluster.",
)
workers_option = click.option(
    "--workers", type=int, default=None, help="Worker processes of the embedded LocalCluster (default: cores)."
)

# ---- commands (one block each; keep them thin) ----


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=True))
@click.option("--out", "-o", required=True, help="Cohort store to create or extend (path or URL).")
@click.option("--subjects", multiple=True, help="Only these subject ids (repeat or comma-separate).")
@click.option("--chunks", default="64,32,64", show_default=True, help="Spatial chunk X,Y,Z (all contrasts per chunk).")
@click.option("--compression", default="zstd", show_default=True, help="Blosc codec: zstd, lz4, lz4hc, zlib, blosclz.")
@click.option("--skip-bad", is_flag=True, help="Ingest the good subjects and list the bad ones instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Rewrite subjects already in the store.")
@click.option("--no-checksums", is_flag=True, help="Skip sha256 of source files (faster on huge cohorts).")
@scheduler_option
@workers_option
@quiet_option
def ingest(manifest, out, subjects, chunks, compression, skip_bad, overwrite, no_checksums, scheduler, workers, quiet):
    """Write the subjects of MANIFEST (cohort YAML) into a chunked Zarr cohort store."""
    from mrhscale.ingest import ingest as run

    res = run(manifest, out, subjects=_subject_list(subjects), chunks=_ints(chunks, 3, "--chunks"),
              compression=compression, skip_bad=skip_bad, overwrite=overwrite,
              checksums=not no_checksums, scheduler=scheduler, workers=workers, quiet=quiet)
    if res["skipped"]:
        click.echo(f"already in store, skipped: {', '.join(res['skipped'])}")
    click.echo(f"ingested {len(res['written'])} subject(s) into {res['store']}")
    if res["bad"]:
        click.echo(f"{len(res['bad'])} bad subject(s) not ingested:", err=True)
        for sid, msg in res["bad"].items():
            click.echo(f"  {sid}: {msg}", err=True)
        if not res["written"] and not res["skipped"]:
            sys.exit(2)


@main.command()
@click.argument("path")
def info(path):
    """Describe a cohort/patch/prediction store or a model bundle."""
    import os

    if os.path.isfile(path):
        from mrhscale.bundle import describe_bundle

        click.echo(describe_bundle(path))
    else:
        from mrhscale.store import describe_store

        click.echo(describe_store(path))
