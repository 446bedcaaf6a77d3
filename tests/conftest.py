import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite runs the reference numerics (eager fp32) unless a test asks for more: compiling
# every test's model would cost minutes. tests/*/test_*accel* cover auto, bf16 and compile.
os.environ.setdefault("MRHSCALE_PRECISION", "fp32")
os.environ.setdefault("MRHSCALE_COMPILE", "off")


@pytest.fixture
def cohort_store(tmp_path):
    from helpers import make_cohort_store

    path = tmp_path / "cohort.zarr"
    ids = make_cohort_store(path)
    return str(path), ids
