import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite runs the reference numerics (eager fp32) unless a test asks for more: compiling
# every test's model would cost minutes. tests/*/test_*accel* cover auto, bf16 and compile.
os.environ.setdefault("MRHSCALE_PRECISION", "fp32")
os.environ.setdefault("MRHSCALE_COMPILE", "off")


@pytest.fixture(scope="session")
def _cohort_store_template(tmp_path_factory):
    from helpers import make_cohort_store

    path = tmp_path_factory.mktemp("cohort-template") / "cohort.zarr"
    ids = make_cohort_store(path)
    return path, ids


@pytest.fixture
def cohort_store(tmp_path, _cohort_store_template):
    """A fresh copy of one cohort store (made once per session: copying is ~20x faster)."""
    import shutil

    template, ids = _cohort_store_template
    path = tmp_path / "cohort.zarr"
    shutil.copytree(template, path)
    return str(path), list(ids)
