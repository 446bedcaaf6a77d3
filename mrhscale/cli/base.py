"""The command group: every command takes --config/--verbose/--log-file, and an error a
user can cause is one line on stderr with exit status 2, no traceback."""

from __future__ import annotations

import sys

import click

from mrhscale import log
from mrhscale.errors import MRHError
from mrhscale.io.config import load_config, write_resolved


class _Command(click.Command):
    """Every command takes ``--config FILE.yaml`` (flags override it) and records its resolved config."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(click.Option(
            ["--config"], is_eager=True, expose_value=False, callback=self._load_config,
            type=click.Path(), metavar="FILE", help="YAML file of this command's options (flags override it).",
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
        log.setup(quiet=bool(ctx.params.get("quiet")), verbose=ctx.meta.get("mrhscale_verbose", 0),
                  log_file=ctx.meta.get("mrhscale_log_file"))
        try:
            result = super().invoke(ctx)
        finally:
            log.reset()
        out = ctx.params.get("out")
        if out and self.name not in SELF_DESCRIBING:
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
        except click.UsageError as e:  # a missing argument, an unknown option: one line too
            click.echo(f"mrhscale: error: {one_line(e.format_message())} (try `mrhscale "
                       f"{e.ctx.info_name if e.ctx else ''} --help`)", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("mrhscale: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mrhscale")
def main():
    """Virtual histology from multi-contrast mouse-brain MRI (MRH-Net), at cohort scale."""
