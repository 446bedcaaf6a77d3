import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def cohort_store(tmp_path):
    from helpers import make_cohort_store

    path = tmp_path / "cohort.zarr"
    ids = make_cohort_store(path)
    return str(path), ids
