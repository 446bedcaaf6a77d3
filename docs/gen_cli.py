"""Regenerate docs/cli.md from the click commands: ``python docs/gen_cli.py``.

tests/test_docs.py fails when docs/cli.md is stale, so the reference never
drifts from the code.
"""

from __future__ import annotations

import os
import sys

import click


def render() -> str:
    from mrhscale.cli import main

    parts = [
        "# CLI reference",
        "",
        "Generated from the click commands by `python docs/gen_cli.py`; do not edit by hand.",
        "Every command also takes `--config FILE.yaml` (its options as keys; flags override)",
        "and writes its resolved configuration beside its output.",
        "",
    ]
    ctx = click.Context(main, info_name="mrhscale", terminal_width=100, max_content_width=100,
                        help_option_names=["-h", "--help"])
    parts += ["```", main.get_help(ctx), "```", ""]
    for name in sorted(main.commands):
        cmd = main.commands[name]
        sub = click.Context(cmd, info_name=name, parent=ctx, terminal_width=100, max_content_width=100)
        parts += [f"## mrhscale {name}", "", "```", cmd.get_help(sub), "```", ""]
    return "\n".join(parts)


def main() -> int:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli.md")
    with open(path, "w") as fh:
        fh.write(render())
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
