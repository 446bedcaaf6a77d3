"""Structural figures of the package, measured with ``ast`` (issue 27).

    python tools/code_metrics.py [--json]

Counts, over every module of ``mrhscale/``: functions with a ``storage_options``
parameter; functions with 12 or more parameters (self/cls excluded, * and ** counted);
imports inside function bodies; import cycles between subpackages (module- or function-level imports); the
line count of ``stages/predict.py``; functions over 80 lines of body; one-stain branches
outside the stores' adapter for older records (``stores/legacy.py``): a test (``if``, a
conditional expression, a comparison) that asks whether there is one stain or several:
a count of stains compared with 1 or 2, or a stain list or record's ``stains`` used as a truth value
(an ``if`` that only raises, an input check, is none).
"""
from __future__ import annotations

import ast
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mrhscale"


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
    return out


def functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def params(fn) -> list[str]:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return [n for n in names if n not in ("self", "cls")]


def local_imports(fn) -> list[ast.AST]:
    """Imports in ``fn``'s own body (nested functions are counted on their own)."""
    found, stack = [], list(fn.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            stack.extend(ast.iter_child_nodes(node))
    return found


def imports_of(name: str, tree: ast.Module) -> set[str]:
    """Modules of mrhscale that ``name`` imports, at module level or inside functions
    (imports under ``if TYPE_CHECKING`` excluded): a cycle hidden in a function is still one."""
    skip = {id(n) for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    out = set()
    for sub in ast.walk(tree):
        if id(sub) in skip:
            continue
        if isinstance(sub, ast.ImportFrom):
            base = sub.module or ""
            if sub.level:
                pkg = name.split(".")[: len(name.split(".")) - sub.level + (name in PACKAGES)]
                base = ".".join(pkg + ([sub.module] if sub.module else []))
            if base.startswith("mrhscale"):
                out.add(base)
        elif isinstance(sub, ast.Import):
            out |= {a.name for a in sub.names if a.name.startswith("mrhscale")}
    return out


PACKAGES: set[str] = set()


def subpackage(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else mod


def package_cycles(mods: dict[str, ast.Module]) -> list[tuple[str, str]]:
    """Pairs of subpackages that import each other (anywhere in their modules)."""
    edges = defaultdict(set)
    for name, tree in mods.items():
        for target in imports_of(name, tree):
            a, b = subpackage(name), subpackage(target)
            if a != b and a != "mrhscale" and b != "mrhscale":
                edges[a].add(b)
    return sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, ())})


def _mentions_stains(node) -> bool:
    """Whether ``node`` is about the list of stains (``stains``, ``n_stains``, ``stains_of(...)``)."""
    return re.search(r"stains(\b|_of\b)", ast.unparse(node)) is not None


def _is_one_or_two(node) -> bool:
    return isinstance(node, ast.Constant) and node.value in (1, 2) and not isinstance(node.value, bool)


def one_stain_branches(tree: ast.Module) -> list[int]:
    """Lines of ``tree`` that branch on one stain against several (see the module doc)."""
    checks = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and not node.orelse
              and all(isinstance(b, ast.Raise) for b in node.body) for n in [node, *ast.walk(node.test)]}
    lines = set()
    for node in ast.walk(tree):
        if id(node) in checks:
            continue  # an input check that refuses (e.g. "crossval scores one stain at a time") is no branch
        if isinstance(node, ast.Compare) and _mentions_stains(node.left) and any(map(_is_one_or_two, node.comparators)):
            lines.add(node.lineno)
        elif isinstance(node, ast.If | ast.IfExp | ast.While):
            tests = node.test.values if isinstance(node.test, ast.BoolOp) else [node.test]
            for t in tests:
                t = t.operand if isinstance(t, ast.UnaryOp) and isinstance(t.op, ast.Not) else t
                if isinstance(t, ast.Name | ast.Attribute | ast.Call | ast.Subscript) and _mentions_stains(t) \
                        and not (isinstance(t, ast.Call) and ast.unparse(t.func) in ("isinstance", "any", "all")):
                    lines.add(t.lineno)
    return sorted(lines)


def measure() -> dict:
    mods = modules()
    PACKAGES.update(n for n in mods if (ROOT.parent / n.replace(".", "/") / "__init__.py").exists())
    fns = [(m, f) for m, t in mods.items() for f in functions(t)]
    body_lines = [(m, f.name, f.end_lineno - f.body[0].lineno + 1) for m, f in fns]
    local = [(m, f.name, len(local_imports(f))) for m, f in fns if local_imports(f)]
    predict = ROOT / "stages" / "predict.py"
    return {
        "modules": len(mods),
        "functions": len(fns),
        "storage_options_params": sum("storage_options" in params(f) for _, f in fns),
        "functions_12plus_params": sorted(f"{m}.{f.name} ({len(params(f))})" for m, f in fns if len(params(f)) >= 12),
        "function_local_imports": sum(n for *_, n in local),
        "local_imports_by_module": dict(sorted(_by_module(local).items(), key=lambda kv: -kv[1])),
        "functions_over_80_lines": sorted(f"{m}.{n} ({k})" for m, n, k in body_lines if k > 80),
        "median_body_lines": sorted(k for *_, k in body_lines)[len(body_lines) // 2],
        "package_cycles": package_cycles(mods),
        "one_stain_branches": [f"{m}:{n}" for m, t in mods.items() if m != "mrhscale.stores.legacy"
                               for n in one_stain_branches(t)],
        "stages_predict_lines": len(predict.read_text().splitlines()) if predict.exists() else 0,
    }


def _by_module(local) -> dict[str, int]:
    out = defaultdict(int)
    for m, _, n in local:
        out[m] += n
    return out


def main(argv: list[str]) -> None:
    figures = measure()
    if "--json" in argv:
        print(json.dumps(figures, indent=1))
        return
    for key, value in figures.items():
        if isinstance(value, list | dict):
            shown = len(value) if key != "local_imports_by_module" else ""
            print(f"{key}: {shown}")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in list(items)[:25]:
                print(f"    {v}" if isinstance(k, int) else f"    {k}: {v}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main(sys.argv[1:])
