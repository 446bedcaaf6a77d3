import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_cli", os.path.join(ROOT, "docs", "gen_cli.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with open(os.path.join(ROOT, "docs", "cli.md")) as fh:
        assert fh.read() == mod.render(), "docs/cli.md is stale: run `python docs/gen_cli.py`"


def test_readme_commands_are_the_ci_ones():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in ci
