"""What the driver keeps per subject stays bounded at cohort size (issue 28): predict plans a
cohort from each subject's record without opening its dataset, and opens the datasets a group
at a time during the run, each once; ingest reads a manifest without its subjects' notes."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import zarr
from helpers import channel_names, subject_dataset, write_model

from mrhscale.errors import MRHError
from mrhscale.options import PredictOptions
from mrhscale.parallel.context import Context
from mrhscale.stages import predict as predict_stage
from mrhscale.stages.predict import predict, subject_groups
from mrhscale.stages.predict_plan import PredictPlan
from mrhscale.stores import CohortStore

SYNC = Context(scheduler="synchronous", quiet=True)
SHAPE = (6, 5, 7)
CHANNELS = channel_names(5)


class RecordedCohort:
    """A stand-in cohort store of ``n`` subjects whose records say their grid, brain voxels and
    channels (as ingest writes them); it counts the datasets opened."""

    name = url = "memory://cohort"

    def __init__(self, n: int, channels=None, unrecorded=()):
        self.ids = [f"s{i:04d}" for i in range(n)]
        self.channels = {sid: list(CHANNELS) for sid in self.ids} | (channels or {})
        self.unrecorded, self.opened = set(unrecorded), []

    def subjects(self):
        return list(self.ids)

    def subject_attrs(self, sid):
        made = {} if sid in self.unrecorded else {"channels": self.channels[sid]}
        return {"shape": [16, 16, 16], "brain_voxels": 1000, "fingerprint": f"fp-{sid}", "made_by": made}

    def identity(self, sid, attrs=None):
        return CohortStore.identity(self, sid, attrs)

    def open_subject(self, sid):
        self.opened.append(sid)
        return subject_dataset(sid, SHAPE, len(CHANNELS))


@pytest.fixture
def plan(tmp_path):
    return PredictPlan(write_model(tmp_path / "m.pt", CHANNELS), PredictOptions())


def test_the_plan_of_200_subjects_opens_no_dataset(plan):
    source = RecordedCohort(200)
    inputs = plan.inputs(source, None)
    assert source.opened == [] and list(inputs) == source.ids and len(inputs) == 200
    assert inputs.brain_voxels() == 200 * 1000 and inputs.identity("s0007")["fingerprint"] == "fp-s0007"
    assert [len(g) for g in subject_groups(inputs.voxels())] == [64, 64, 64, 8]
    assert source.opened == []  # grouping weighs the records, not the datasets
    assert inputs.subset(["s0003"])["s0003"]["mri"].shape == (*SHAPE, 5) and source.opened == ["s0003"]


def test_channels_are_still_checked_on_every_subject_before_any_work(plan):
    source = RecordedCohort(200, channels={"s0150": [*CHANNELS[:4], "other"]})
    with pytest.raises(MRHError, match="s0150"):
        plan.inputs(source, None)
    assert source.opened == []


def test_a_subject_without_recorded_channels_is_opened_once_for_them(plan):
    source = RecordedCohort(20, unrecorded={"s0004"})
    plan.inputs(source, None)
    assert source.opened == ["s0004"]


def recorded_store(path, n: int) -> tuple[str, list[str]]:
    """A cohort store whose subjects record their grid, brain voxels and channels."""
    store = CohortStore(str(path))
    store.prepare({"channels": CHANNELS})
    ids = [f"s{i + 1:02d}" for i in range(n)]
    for i, sid in enumerate(ids):
        ds = subject_dataset(sid, SHAPE, len(CHANNELS), i, (3, 5, 4))
        ds.attrs.update(shape=list(SHAPE), brain_voxels=int(ds["mask"].sum()))
        store.put(sid, ds, {"stage": "tests", "channels": CHANNELS})
    return str(path), ids


@pytest.mark.slow  # default-run budget (README: make test <= 6 min on 2 cores); run in .ci/run's slow step
def test_predict_opens_each_subject_once_a_group_at_a_time(tmp_path, monkeypatch):
    store, ids = recorded_store(tmp_path / "c.zarr", 8)
    model = write_model(tmp_path / "m.pt", CHANNELS)
    ref = str(tmp_path / "ref.zarr")
    predict(model, store, ref, ctx=SYNC)
    opened, alive, counts = [], [], []
    open_subject = CohortStore.open_subject

    def counting(self, sid, *a, **k):
        ds = open_subject(self, sid, *a, **k)
        opened.append(sid)
        alive.append(weakref.ref(ds))
        gc.collect()
        counts.append(sum(r() is not None for r in alive))
        return ds

    monkeypatch.setattr(CohortStore, "open_subject", counting)
    monkeypatch.setattr(predict_stage, "GROUP_SUBJECTS", 2)
    out = str(tmp_path / "p.zarr")
    assert predict(model, store, out, ctx=SYNC)["predicted"] == ids
    assert sorted(opened) == ids  # once each, in its group, none for the plan
    # datasets alive as each is opened: two groups' at most (a group's may outlive its call
    # while the next one runs), never the cohort's
    assert max(counts) <= 4 < len(ids)
    got, want = zarr.open_group(out, mode="r"), zarr.open_group(ref, mode="r")
    for sid in ids:
        np.testing.assert_array_equal(got[sid]["af_virtual"][...], want[sid]["af_virtual"][...])
