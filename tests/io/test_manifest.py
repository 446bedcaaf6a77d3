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
