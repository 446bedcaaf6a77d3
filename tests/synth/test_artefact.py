"""synth --artefact: a region whose contrasts are unlike any tissue; the brain, stains and
other subjects unchanged; labelled for evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mrhscale.cli import main
from mrhscale.synth.phantom import make_subject

SHAPE = (32, 24, 40)


@pytest.fixture(scope="module")
def pair():
    return make_subject(SHAPE, 3), make_subject(SHAPE, 3, artefact=True)


def test_only_the_mri_inside_the_region_changes(pair):
    plain, art = pair
    lab = art["labels"]["artefact"]
    assert lab.any() and not (lab & ~art["mask"]).any() and "artefact" not in plain["labels"]
    assert 0.002 < lab.sum() / art["mask"].sum() < 0.3
    for t in plain["targets"]:
        assert np.array_equal(plain["targets"][t], art["targets"][t])
    for k in ("axon", "myelin", "cell"):
        assert np.array_equal(plain["truth"][k], art["truth"][k])
    assert np.array_equal(plain["mask"], art["mask"])
    far = art["mask"] & ~_dilated(lab, 6)
    change = []
    for g, v in art["mri"].items():
        assert np.array_equal(np.nan_to_num(v[far]), np.nan_to_num(plain["mri"][g][far])), g
        ratio = np.nanmedian(v[lab], axis=0) / np.nanmedian(plain["mri"][g][lab], axis=0)
        assert np.max(np.abs(ratio - 1)) > 0.1, g  # every group changed inside
        change += list(np.abs(ratio - 1))
    # each volume its own drop and ghost: most change a lot (a drop may meet an equal ghost)
    assert np.mean(np.array(change) > 0.05) >= 0.7 and np.median(change) > 0.15


def test_contrast_relations_inside_are_unlike_the_brains(pair):
    """Each volume changes by its own factor inside the region, so the relations between
    volumes (of one group and across groups) are not those of any tissue: a gain common
    to all would leave them; here the factors' logs spread widely."""
    plain, art = pair
    lab = art["labels"]["artefact"]
    logs = np.concatenate([np.log(np.nanmedian(v[lab], axis=0) / np.nanmedian(plain["mri"][g][lab], axis=0))
                           for g, v in art["mri"].items()])
    assert np.std(logs) > 0.15
    within = np.log(np.nanmedian(art["mri"]["dwi2000"][lab], axis=0)
                    / np.nanmedian(plain["mri"]["dwi2000"][lab], axis=0))
    assert np.ptp(within) > 0.3  # one group's volumes, too


def _dilated(m, n):
    from scipy import ndimage

    return ndimage.binary_dilation(m, iterations=n)


def test_cli_labels_every_subject_and_refuses_unknown_ids(tmp_path):
    out = tmp_path / "c"
    r = CliRunner().invoke(main, ["synth", str(out), "-n", "2", "--shape", "24,16,32", "--artefact", "s02", "-q"])
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load((out / "cohort.yaml").read_text())
    assert doc["synth"]["artefact"] == ["s02"]
    assert all("artefact" in e["labels"] for e in doc["subjects"])
    assert "artefact" in doc["subjects"][1]["notes"] and "artefact" not in doc["subjects"][0]["notes"]
    import nibabel as nib

    first = np.asarray(nib.load(out / doc["subjects"][0]["labels"]["artefact"]).dataobj)
    second = np.asarray(nib.load(out / doc["subjects"][1]["labels"]["artefact"]).dataobj)
    assert first.sum() == 0 and second.sum() > 0
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "d"), "-n", "2", "--artefact", "s09", "-q"])
    assert r.exit_code == 2 and "--artefact: no subject s09" in r.output
