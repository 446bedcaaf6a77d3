import os

import pytest

from mrhscale.errors import MRHError
from mrhscale.io.manifest import load_manifest


def _write(tmp_path, text):
    p = tmp_path / "cohort.yaml"
    p.write_text(text)
    return str(p)


def test_paths_relative_to_manifest_and_defaults(tmp_path):
    p = _write(tmp_path, """
subjects:
  - id: s01
    mri:
      dwi2000: s01/dwi2000.nii.gz
      t2MTONOFF: {path: s01/t2.nii.gz, channels: [t2, mt_off, mt_on]}
    fa: s01/fa.nii.gz
    mask: {path: s01/mask.nii.gz, inverted: true}
    targets: {af: s01/af.nii.gz}
    labels: {lesion: s01/lesion.nii.gz}
    truth: {axon: truth/axon.nii.gz}
""")
    m = load_manifest(str(tmp_path))  # a directory with cohort.yaml works too
    s = m.subjects[0]
    assert s.mri[0].path == os.path.join(str(tmp_path), "s01", "dwi2000.nii.gz")
    assert s.mri[0].channels is None and s.mri[1].channels == ["t2", "mt_off", "mt_on"]
    assert s.mask_inverted is True
    assert set(s.files()) == {"mri/dwi2000", "mri/t2MTONOFF", "fa", "mask", "targets/af", "labels/lesion"}
    assert m.path == p
    with pytest.raises(MRHError, match="not in manifest"):
        m.select(["s09"])


@pytest.mark.parametrize("text, msg", [
    ("subjects: {}", "subjects"),
    ("- a\n- b", "subjects"),
    ("subjects:\n  - id: s01\n", "'mri'"),
    ("subjects:\n  - id: s01\n    mri: {a: a.nii}\n    fa: f.nii\n  - id: s01\n    mri: {a: a.nii}\n    fa: f.nii", "twice"),
    ("subjects:\n  - id: s01\n    mri: {a: a.nii}\n", "mask"),
    ("subjects:\n  - id: ../x\n    mri: {a: a.nii}\n    fa: f.nii", "plain name"),
    ("subjects:\n  - id: s01\n    mri: {a: a.nii}\n    fa: f.nii\n    colour: red", "unknown key"),
    ("subjects:\n  - id: s01\n    mri: {a: a.nii}\n    fa: f.nii\n    targets: {mri: t.nii}", "variable name"),
    ("subjects:\n  - id: s01\n    mri: {a: {path: a.nii, channels: 3}}\n    fa: f.nii", "channels"),
])
def test_malformed_manifests(tmp_path, text, msg):
    with pytest.raises(MRHError, match=msg):
        load_manifest(_write(tmp_path, text))


def _cohort_text(n: int, notes: str) -> str:
    entry = """  - id: s{i:04d}
    mri: {{dwi2000: s{i:04d}/dwi.nii, t2MTONOFF: {{path: s{i:04d}/t2.nii, channels: [t2, mt_off, mt_on]}}}}
    mask: {{path: s{i:04d}/mask.nii, inverted: false}}
    targets: {{af: s{i:04d}/af.nii}}
    truth: {{axon: s{i:04d}/truth/axon.nii}}
{notes}
"""
    return "subjects:\n" + "".join(entry.format(i=i, notes=notes) for i in range(n))


NOTES = """    notes:
      gain: 0.8
      oedema: {present: true, blobs: [{site: corpus callosum, centre_mm: [1.0, 2.0, 3.0]}]}"""


def test_without_extra_the_subjects_are_the_same_and_their_notes_never_built(tmp_path):
    full = load_manifest(_write(tmp_path, _cohort_text(200, NOTES)))
    lean = load_manifest(str(tmp_path / "cohort.yaml"), extra=False)
    assert [s.extra for s in lean.subjects] == [{}] * 200
    assert full.subjects[5].extra["notes"]["gain"] == 0.8 and "axon" in full.subjects[5].extra["truth"]
    for s in full.subjects:
        s.extra = {}
    assert lean == full
    # a tag the safe loader refuses to build: skipped unread without extra, an error with it
    _write(tmp_path, _cohort_text(3, "    notes: !!python/object/apply:os.getcwd []"))
    assert [s.id for s in load_manifest(str(tmp_path / "cohort.yaml"), extra=False).subjects] == ["s0000", "s0001", "s0002"]
    with pytest.raises(MRHError, match="not valid YAML"):
        load_manifest(str(tmp_path / "cohort.yaml"))


def test_without_extra_an_alias_into_skipped_notes_is_one_line(tmp_path):
    p = _write(tmp_path, _cohort_text(1, "    notes: {gain: &g 0.8}") + "  - id: s9\n    mri: {a: a.nii}\n    fa: *g\n")
    with pytest.raises(MRHError, match=r"not valid YAML \(found undefined alias"):
        load_manifest(p, extra=False)
