import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_cli", os.path.join(ROOT, "docs", "gen_cli.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    def norm(text):  # click's column layout varies with the terminal; compare the words
        return re.sub(r"\s+", " ", text).strip()

    with open(os.path.join(ROOT, "docs", "cli.md")) as fh:
        have, want = norm(fh.read()), norm(mod.render())
    if have != want:
        i = next(k for k, (a, b) in enumerate(zip(have + "\0", want + "\0")) if a != b)
        raise AssertionError(f"docs/cli.md is stale (run `python docs/gen_cli.py`): ...{have[i - 80:i + 80]!r} "
                             f"vs generated ...{want[i - 80:i + 80]!r}")


def test_readme_commands_are_the_ci_ones():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in ci
