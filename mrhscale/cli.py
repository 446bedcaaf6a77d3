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
