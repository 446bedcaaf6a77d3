"""The README's two commands: `make demo` installs only what the demo needs, `make test` adds
the suite's extras on top of it, each install rerun only when pyproject.toml changes.

The recipes are read from the Makefile and dry-run with `make -n` in a copy (nothing installed)."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from mrhscale._optional import EXTRAS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def parse_makefile(path):
    """(variables, rules): ``NAME ?= / := / = value`` and ``target: prerequisites`` with recipe lines."""
    variables, rules, target = {}, {}, None
    for line in open(path).read().splitlines():
        if line.startswith("\t") and target:
            rules[target][1].append(line.strip().lstrip("@"))
        elif m := re.match(r"^([A-Za-z_]+)\s*(\?=|:=|=)\s*(.*)$", line):
            variables[m[1]], target = m[3].strip(), None
        elif m := re.match(r"^([^\s#.][^:=]*):(?!=)\s*(.*)$", line):
            target = m[1].strip()
            rules[target] = (m[2].split(), [])
    return variables, rules


def expand(text, variables):
    for _ in range(5):
        text = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m[1], ""), text)
    return text


def recipe_chain(target, variables, rules):
    """Every recipe line ``make target`` may run, prerequisites first."""
    names = {expand(k, variables): k for k in rules}
    prereqs, lines = rules[names[target]]
    chain = []
    for p in (expand(p, variables) for p in prereqs):
        if p in names:
            chain += recipe_chain(p, variables, rules)
    return chain + [expand(line, variables) for line in lines]


def pip_installs(lines):
    return [line for line in lines if "pip install" in line and "--upgrade pip" not in line]


def test_demo_install_has_no_extras_and_test_adds_them():
    variables, rules = parse_makefile(os.path.join(ROOT, "Makefile"))
    demo = pip_installs(recipe_chain("demo", variables, rules))
    assert len(demo) == 2 and "torch==" in demo[0] and demo[1].endswith("-e .")
    assert not any(w in " ".join(demo) for w in ("[", "test", "s3", "register", "matlab"))
    test = pip_installs(recipe_chain("test", variables, rules))
    assert test[:2] == demo  # the test environment is the demo's, then its extras
    assert re.search(r'-e "\.\[[^]]*\btest\b[^]]*\]"', test[2]) and "s3" in test[2]
    assert recipe_chain("env", variables, rules) == recipe_chain("test", variables, rules)[:-1]  # CI's step


@pytest.mark.slow  # default-run budget (README: make test <= 6 min on 2 cores); run in .ci/run's slow step
def test_demo_imports_no_extra():
    """What the demo's install lacks (every optional extra, the test tools) is never imported by it."""
    blocked = [*EXTRAS, "moto", "pytest", "nbformat", "ipykernel"]
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "import mrhscale.demo, mrhscale.cli.apply\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def dry_run(work, target):
    """What ``make -n target`` would run in ``work`` (a copy of the Makefile and pyproject)."""
    r = subprocess.run(["make", "-n", "-C", str(work), target, "VENV=venv", "PYTHON=python3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if not line.startswith("make")]


def set_times(work, **mtimes):
    """Set the files' mtimes (seconds); stamp names are the Makefile's (venv/.mrhscale-*)."""
    for name, t in mtimes.items():
        path = work / {"pyproject": "pyproject.toml", "demo": "venv/.mrhscale-demo",
                       "test": "venv/.mrhscale-test"}[name]
        path.parent.mkdir(exist_ok=True)
        path.touch()
        os.utime(path, (t, t))


@pytest.fixture
def work(tmp_path):
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    set_times(tmp_path, pyproject=1_000_000)
    return tmp_path


@needs_make
def test_fresh_machine_bootstraps_each_command(work):
    demo = dry_run(work, "demo")
    assert any("-m venv venv" in line for line in demo)
    pins = [i for i, line in enumerate(demo) if 'pip install -q "torch==' in line]
    core = [i for i, line in enumerate(demo) if line.endswith("pip install -q -e .")]
    assert pins and core and pins[0] < core[0]  # the torch pin first
    assert not any("[test" in line for line in demo) and demo[-1].endswith("mrhscale demo --out demo-out")
    test = dry_run(work, "test")
    assert any("torch==" in line for line in test) and any(line.endswith("-e .") for line in test)
    assert any("[test,matlab,register,s3]" in line for line in test) and "pytest" in test[-1]


@needs_make
def test_installs_rerun_only_when_pyproject_changes(work):
    set_times(work, demo=2_000_000, test=2_000_001)
    assert not pip_installs(dry_run(work, "demo")) and not pip_installs(dry_run(work, "test"))
    set_times(work, pyproject=3_000_000)  # edited: both reinstall, the test extras after the core
    test = pip_installs(dry_run(work, "test"))
    assert "torch==" in test[0] and test[1].endswith("-e .") and "[test," in test[2]
    assert not any("[test" in line for line in dry_run(work, "demo"))


@needs_make
def test_test_after_demo_adds_only_the_extras(work):
    set_times(work, demo=2_000_000)  # `make demo` ran, `make test` never did
    installs = pip_installs(dry_run(work, "test"))
    assert len(installs) == 1 and "[test,matlab,register,s3]" in installs[0]
    set_times(work, test=2_000_001)
    set_times(work, demo=2_000_002)  # the demo reinstalled later (pyproject changed): test follows
    assert any("[test," in line for line in pip_installs(dry_run(work, "test")))
