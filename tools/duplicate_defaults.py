"""Defaults stated twice (issue 27): a CLI option's default (a literal ``default=`` in the click
commands, or an options-table field the CLI is made from) equal to the literal default of a
same-named parameter of a library function (None/False/empty excluded). A name match can be a
coincidence (a kernel's ``half=1``), so read the list.

    python tools/duplicate_defaults.py [REPO]      (REPO: a checkout, default this one)
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pathlib
import sys

EMPTY = (None, False, "", ())


def cli_defaults(root: pathlib.Path) -> dict:
    """Option name -> default, from literal click defaults and from the options table."""
    found = {}
    for p in [*root.glob("mrhscale/cli.py"), *root.glob("mrhscale/cli/*.py")]:
        for node in ast.walk(ast.parse(p.read_text())):
            if not (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("option")):
                continue
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            kw = {k.arg: k.value for k in node.keywords}
            if names and isinstance(kw.get("default"), ast.Constant) and kw["default"].value not in EMPTY:
                plain = [n for n in names if not n.startswith("-")]
                name = plain[0] if plain else max(names, key=len).lstrip("-").replace("-", "_")
                found[name] = kw["default"].value
    if (root / "mrhscale" / "options.py").exists():
        sys.path.insert(0, str(root))
        table = importlib.import_module("mrhscale.options")
        for cls in vars(table).values():
            if isinstance(cls, type) and dataclasses.is_dataclass(cls):
                for f in table.option_fields(cls):
                    if f.default is not dataclasses.MISSING and f.default not in EMPTY:
                        found.setdefault(f.name, f.default)
    return found


def duplicates(root: pathlib.Path) -> list[str]:
    cli = cli_defaults(root)
    out = set()
    for p in root.glob("mrhscale/**/*.py"):
        if "/cli" in p.as_posix() or p.name == "options.py":
            continue
        for fn in ast.walk(ast.parse(p.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            a = fn.args
            pos = a.posonlyargs + a.args
            pairs = list(zip(pos[len(pos) - len(a.defaults):], a.defaults, strict=True))
            pairs += [(k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None]
            for arg, d in pairs:
                if arg.arg in cli and isinstance(d, ast.Constant) and d.value == cli[arg.arg]:
                    out.add(f"{p.relative_to(root)}:{fn.name}({arg.arg}={d.value!r})")
    return sorted(out)


if __name__ == "__main__":
    here = pathlib.Path(__file__).resolve().parents[1]
    found = duplicates(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else here)
    print(len(found))
    for line in found:
        print("  ", line)
