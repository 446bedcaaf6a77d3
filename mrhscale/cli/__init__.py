"""Command line: click commands only, their options made from the options table
(``mrhscale.options``); each command parses, builds one Context and calls one library function."""

from mrhscale.cli import apply, data, learn  # noqa: F401  (registers the commands on main)
from mrhscale.cli.base import main, one_line

__all__ = ["main", "one_line"]
