"""Resident patches (training/cache.py): the same batches, in the same order, with the same
bits as the stream, for every (seed, epoch, rank, world size, loader workers); the choice."""

from __future__ import annotations

import pytest
import torch
from helpers import make_patch_store
from torch.utils.data import DataLoader

from mrhscale.errors import MRHError
from mrhscale.ops.norm import Normalisation
from mrhscale.training import cache as cache_mod
from mrhscale.training.cache import PatchCache, choose, resident_bytes
from mrhscale.training.stream import PatchStream, StreamOptions


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_patch_store(tmp_path_factory.mktemp("cache") / "p.zarr", n_train=700, n_val=90, chunk=64)


def _same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert len(x) == len(y)
        for u, v in zip(x, y, strict=True):
            assert u.dtype == v.dtype and torch.equal(u, v)


def _stream(store, **kw):
    opts = StreamOptions(shuffle_buffer=kw.pop("buffer", 150), with_origin=True)
    return PatchStream(store, options=opts, **kw)


@pytest.mark.parametrize("world,drop_last,shuffle", [(1, True, True), (2, False, True), (3, True, False)])
def test_resident_batches_are_the_streams(store, world, drop_last, shuffle):
    for rank in range(world):
        for epoch in (0, 3):
            kw = dict(batch_size=48, rank=rank, world_size=world, drop_last=drop_last, shuffle=shuffle, seed=7)
            s, c = _stream(store, **kw), PatchCache(_stream(store, **kw), torch.device("cpu"))
            s.set_epoch(epoch)
            c.set_epoch(epoch)
            _same(list(s), list(c))
            assert c.steps_per_epoch() == s.steps_per_epoch()


def test_per_subject_normalisation_and_val_split(store):
    norm = Normalisation.subject_mode("subject-percentile", 5, 0.0, 200.0)
    kw = dict(split="val", batch_size=32, drop_last=False, seed=1, norm=norm)
    _same(list(_stream(store, **kw)), list(PatchCache(_stream(store, **kw), torch.device("cpu"))))


def test_loader_workers_give_the_caches_order(store):
    """With W loader workers the stream's batches are W plans interleaved by the DataLoader,
    which take the global batches in turn: the cache, in-process, yields that same sequence."""
    kw = dict(batch_size=40, seed=2, drop_last=False)
    s = _stream(store, **kw)
    s.set_epoch(1)
    loader = list(DataLoader(s, batch_size=None, num_workers=2))
    c = PatchCache(_stream(store, **kw), torch.device("cpu"))
    c.set_epoch(1)
    _same(loader, list(c))


def test_choice(store, monkeypatch):
    s = _stream(store, batch_size=32)
    need = resident_bytes(s)
    assert need == 700 * (4 * (5 * 9 + 9) + 16)
    cpu = torch.device("cpu")
    assert not choose("off", s, cpu).resident and choose("on", s, cpu).resident
    monkeypatch.setattr(cache_mod, "free_bytes", lambda d: 4 * need)
    got = choose("auto", s, cpu)
    assert got.resident and got.where == "cpu" and "within" in got.reason
    monkeypatch.setattr(cache_mod, "free_bytes", lambda d: need)
    got = choose("auto", s, cpu)
    assert not got.resident and "over" in got.reason and got.record()["bytes"] == need
    with pytest.raises(MRHError, match="--cache"):
        choose("maybe", s, cpu)


def test_training_does_not_depend_on_the_cache(store, tmp_path):
    """Streamed and resident runs end with the same weights and losses, and record the choice."""
    from mrhscale.io.bundle import read_bundle
    from mrhscale.training import train

    recipe = dict(depth=1, epochs=2, batch_size=64, seed=3, threads=1, quiet=True)
    runs = {mode: train(store, str(tmp_path / mode), cache=mode, **recipe) for mode in ("off", "on")}
    a, b = (read_bundle(runs[m]["model"]) for m in ("off", "on"))
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for ha, hb in zip(runs["off"]["history"], runs["on"]["history"], strict=True):
        assert ha["train_loss"] == hb["train_loss"] and ha["val_loss"] == hb["val_loss"]
    rec = {m: read_bundle(runs[m]["model"])["provenance"]["data_cache"] for m in runs}
    assert rec["on"]["train"]["resident"] and rec["on"]["train"]["where"] == "cpu"
    assert not rec["off"]["train"]["resident"] and rec["off"]["val"]["reason"] == "--cache off"


def test_two_threads_gather_the_same(store):
    kw = dict(batch_size=300, seed=4)
    one = PatchCache(_stream(store, **kw), torch.device("cpu"))
    two = PatchCache(_stream(store, **kw), torch.device("cpu"), two_threads=True)
    _same(list(one), list(two))
