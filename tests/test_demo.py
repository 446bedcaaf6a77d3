"""The demo chain, end to end at reduced size, through the CLI as the README runs it."""

import json
import os

import pytest
from click.testing import CliRunner

from mrhscale.cli import main


# The chain in this process (--scheduler synchronous) by default; on its embedded cluster
# (the README's `mrhscale demo`) in the slow step: every stage's cluster path has a test of
# its own in the default run (test_ingest, test_patches, test_predict), and ~13 s of the ~30
# here were two clusters starting and a worker importing torch.
@pytest.mark.parametrize("where", [
    pytest.param(("--scheduler", "synchronous"), id="in-process"),
    pytest.param(("--dask-workers", "1"), id="embedded-cluster", marks=pytest.mark.slow),
])
def test_quick_demo_end_to_end(tmp_path, where):
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--quiet", *where])
    assert r.exit_code == 0, r.output
    assert "report:" in r.output and "Pearson r" in r.output
    summary = json.load(open(out / "summary.json"))
    report = summary["report"]
    assert os.path.exists(report) and os.path.getsize(report) > 10_000  # figures embedded
    html = open(report).read()
    assert "data:image/png;base64" in html and "Lesion detection" in html
    for stage in ("synth", "ingest", "patches", "train", "predict", "evaluate", "importance"):
        assert stage in summary["stage_seconds"]
    assert summary["held_out"] not in summary["train_subjects"]
    assert -1 <= summary["virtual_pearson"] <= 1
    assert os.listdir(out / "nifti")
    # an ensemble of 2 (quick): the held-out map comes with its uncertainty, checked
    assert "uncertainty: Spearman with |error|" in r.output and "Uncertainty vs error" in html
    assert 0 <= summary["uncertainty_coverage_95"] <= 1 and summary["artefact_uncertainty_ratio"] > 0
    assert (out / "nifti" / f"{summary['held_out']}_mbp_uncertainty.nii.gz").exists()
    # one network of mbp and nf (a head each): both maps, both uncertainties, both evaluated
    assert (out / "nifti" / f"{summary['held_out']}_nf_uncertainty.nii.gz").exists()
    assert "virtual nf (same network): Pearson r" in r.output and "Every stain of the network" in html
    assert -1 <= summary["other_stains"]["nf"]["pearson"] <= 1 and set(summary["every_stain"]) == {"mbp", "nf"}
    assert all((out / "evaluation" / t / "metrics.json").exists() for t in ("mbp", "nf"))  # one evaluate call
    # a rerun reuses every finished stage
    r2 = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--quiet", *where])
    assert r2.exit_code == 0, r2.output
    s2 = json.load(open(out / "summary.json"))
    assert s2["stage_seconds"]["train"] < summary["stage_seconds"]["train"] + 1
    assert s2["virtual_pearson"] == summary["virtual_pearson"]


def test_demo_bad_options(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = CliRunner().invoke(main, ["demo", "--out", str(f), "--quiet"])
    assert r.exit_code == 2 and "is a file" in r.output
    r = CliRunner().invoke(main, ["demo", "--n-subjects", "2", "--out", str(tmp_path / "d"), "--quiet"])
    assert r.exit_code == 2 and "at least 3" in r.output
