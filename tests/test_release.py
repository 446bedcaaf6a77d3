"""Release hygiene: the version written once, CHANGELOG.md (Keep a Changelog), CITATION.cff
(CFF 1.2.0, the MRH-Net paper), py.typed in the wheel, the README's citation (docs/release.md)."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import yaml

import mrhscale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ELIFE_DOI = "10.7554/eLife.72331"
SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def read(name):
    with open(os.path.join(ROOT, name)) as fh:
        return fh.read()


def test_version_is_written_once():
    project = tomllib.loads(read("pyproject.toml"))
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mrhscale.__version__"}
    assert SEMVER.match(mrhscale.__version__)
    written = []
    for folder, _, files in os.walk(os.path.join(ROOT, "mrhscale")):
        written += [f for f in files if f.endswith(".py")
                    and re.search(r"^__version__\s*=", open(os.path.join(folder, f)).read(), re.M)]
    assert written == ["__init__.py"]


def changelog_releases():
    """[(version, date, body)] of CHANGELOG.md, newest first; 'Unreleased' has no date."""
    parts = re.split(r"^## ", read("CHANGELOG.md"), flags=re.M)
    out = []
    for part in parts[1:]:
        head, _, body = part.partition("\n")
        m = re.fullmatch(r"\[(Unreleased|[\d.]+)\](?: - (\d{4}-\d{2}-\d{2}))?", head.strip())
        assert m, f"CHANGELOG.md: release heading {head!r} is not '[X.Y.Z] - YYYY-MM-DD'"
        out.append((m[1], m[2], body))
    return out


def test_changelog_keeps_a_changelog():
    text = read("CHANGELOG.md")
    assert text.startswith("# Changelog\n") and "keepachangelog.com" in text
    releases = changelog_releases()
    assert releases[0][0] == "Unreleased" and releases[0][1] is None
    versions = [tuple(map(int, v.split("."))) for v, _, _ in releases[1:]]
    assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions)
    dates = [d for _, d, _ in releases[1:]]
    assert all(dates) and dates == sorted(dates, reverse=True)
    assert releases[1][0] == mrhscale.__version__  # the newest release is the package's version
    for version, _, body in releases:
        kinds = re.findall(r"^### (.+)$", body, re.M)
        assert kinds and set(kinds) <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}, version
        assert re.search(r"^- \S", body, re.M), f"{version}: no entry"


# CFF 1.2.0's top-level keys and the ones it requires (https://citation-file-format.github.io)
CFF_KEYS = {"abstract", "authors", "cff-version", "commit", "contact", "date-released", "doi",
            "identifiers", "keywords", "license", "license-url", "message", "preferred-citation",
            "references", "repository", "repository-artifact", "repository-code", "title", "type",
            "url", "version"}
CFF_REQUIRED = {"authors", "cff-version", "message", "title"}


def check_authors(authors):
    assert authors and all(a.get("name") or (a.get("family-names") and a.get("given-names"))
                           for a in authors)
    assert all(re.fullmatch(r"https://orcid\.org/(\d{4}-){3}\d{3}[\dX]", a["orcid"])
               for a in authors if "orcid" in a)


def test_citation_cff_cites_this_project_and_the_paper():
    cff = yaml.safe_load(read("CITATION.cff"))
    assert cff["cff-version"] == "1.2.0" and CFF_REQUIRED <= set(cff) and set(cff) <= CFF_KEYS
    assert cff["type"] == "software" and "mrhscale" in cff["title"]
    assert str(cff["version"]) == mrhscale.__version__
    assert cff["license"] == tomllib.loads(read("pyproject.toml"))["project"]["license"]
    check_authors(cff["authors"])
    paper = cff["preferred-citation"]
    assert paper["type"] == "article" and paper["journal"] == "eLife" and paper["doi"] == ELIFE_DOI
    assert (paper["volume"], paper["start"], paper["year"]) == (11, "e72331", 2022)
    assert paper["title"] == "Virtual mouse brain histology from multi-contrast MRI via deep learning"
    check_authors(paper["authors"])
    names = [a["family-names"] for a in paper["authors"]]
    assert names[0] == "Liang" and names[-1] == "Zhang" and len(names) == 10
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(paper["date-published"]))


def test_readme_cites_the_elife_paper():
    readme = read("README.md")
    assert f"https://doi.org/{ELIFE_DOI}" in readme and "eLife 2022;11:e72331" in readme
    cite = readme.split("## How to cite", 1)[1]
    assert "CITATION.cff" in cite and "CHANGELOG.md" in cite


def test_wheel_ships_py_typed_and_the_version(tmp_path):
    """The wheel built from the checkout (setuptools, as pip would) carries py.typed."""
    src = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "mrhscale"), src / "mrhscale",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    code = f"from setuptools import build_meta as b; print(b.build_wheel({str(tmp_path / 'dist')!r}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = r.stdout.strip().splitlines()[-1]
    assert wheel == f"mrhscale-{mrhscale.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(tmp_path / "dist" / wheel) as zf:
        names = zf.namelist()
        meta = zf.read(f"mrhscale-{mrhscale.__version__}.dist-info/METADATA").decode()
    assert "mrhscale/py.typed" in names and "mrhscale/demo.py" in names
    assert f"Version: {mrhscale.__version__}\n" in meta and "Provides-Extra: test" in meta
