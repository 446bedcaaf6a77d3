"""One contract, every output kind (in the spirit of zarr-python's testing/store.py):
each kind of output mrhscale writes is run through the same checks: a foreign --out
refused untouched (your folder, a file, a store of another kind), an identical rerun
reused or rebuilt, a different one refused naming the difference, and a failed
replacement leaving the old output as it was."""

import os

import pytest
from helpers import make_cohort_store, make_patch_store, tree, write_file_cohort

from mrhscale.errors import MRHError
from mrhscale.options import EvaluateOptions, PatchOptions
from mrhscale.parallel.context import Context

# The contract is the store layer's, whatever runs the tasks: every kind here runs in this
# process (a Dask cluster's part is tested in tests/parallel and in each stage's own tests).
SYNC = Context(scheduler="synchronous", quiet=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Inputs every kind needs, made once: files, a cohort store, patches, a model, predictions."""
    from helpers import write_model

    from mrhscale.stages.predict import predict
    from mrhscale.stores import CohortStore

    d = tmp_path_factory.mktemp("contract")
    cohort = str(d / "cohort.zarr")
    make_cohort_store(cohort, n_subjects=2)  # two make every kind of output; a third only slowed evaluate
    ch = CohortStore(cohort).open_subject("s01").contrast.values.tolist()
    e = {"dir": d, "cohort": cohort,
         "manifest": write_file_cohort(d / "files", n_subjects=1, fmt="nii"),
         "patches": make_patch_store(d / "patches.zarr", n_train=256, n_val=64, n_channels=len(ch)),
         "model": write_model(str(d / "m.pt"), ch), "model2": write_model(str(d / "m2.pt"), ch, seed=1),
         "pred": str(d / "pred.zarr")}
    predict(e["model"], cohort, e["pred"], ctx=SYNC)
    return e


class Contract:
    what = ""

    def make(self, env, out, variant: int = 0):
        raise NotImplementedError

    def fail(self, env, out):
        """A replacement of ``out`` that fails (MRHError)."""
        raise NotImplementedError

    mismatch_replaces = False  # reports are rebuilt on every run; stores refuse a different one

    def test_refuses_your_folder(self, env, tmp_path):
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / "notes.txt").write_text("keep")
        with pytest.raises(MRHError, match="not made by mrhscale"):
            self.make(env, str(mine))
        assert tree(mine) == {"notes.txt": b"keep"}

    def test_refuses_a_file(self, env, tmp_path):
        f = tmp_path / "f"
        f.write_text("keep")
        with pytest.raises(MRHError, match="is a file"):
            self.make(env, str(f))
        assert f.read_text() == "keep"

    def test_refuses_another_kind(self, env, tmp_path):
        other = env["patches"] if self.what in ("cohort store", "prediction store") else env["pred"]
        before = tree(other)
        with pytest.raises(MRHError, match=f"not a {self.what}"):
            self.make(env, other)
        assert tree(other) == before

    def test_rerun_and_mismatch(self, env, tmp_path):
        out = str(tmp_path / "out")
        self.make(env, out)
        self.make(env, out)  # the same again: reused or rebuilt, never an error
        if self.mismatch_replaces:
            self.make(env, out, 1)
            return
        before = tree(out)
        with pytest.raises(MRHError, match="--overwrite|--resume|another"):
            self.make(env, out, 1)
        assert tree(out) == before

    def test_failed_replacement_keeps_the_old(self, env, tmp_path):
        out = str(tmp_path / "out")
        self.make(env, out)
        before = tree(out)
        with pytest.raises(MRHError):
            self.fail(env, out)
        assert tree(out) == before
        assert not [p for p in os.listdir(tmp_path) if "mrhscale-" in p]


class TestCohortStore(Contract):
    what = "cohort store"

    def make(self, env, out, variant=0):
        from mrhscale.stages.ingest import ingest

        man = env["manifest"] if not variant else write_file_cohort(
            os.path.dirname(out) + "/files2", n_subjects=1, fmt="nii", seed=5)  # other files, same ids
        return ingest(man, out, ctx=SYNC, chunks=(4, 4, 4))

    def fail(self, env, out):
        from mrhscale.stages.ingest import ingest

        d = os.path.dirname(out) + "/broken"
        man = write_file_cohort(d, n_subjects=1, fmt="nii")
        f = os.path.join(d, "s01", "dwi.nii")
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
        return ingest(man, out, ctx=SYNC, chunks=(4, 4, 4), overwrite=True)


class TestPatchStore(Contract):
    what = "patch store"

    def make(self, env, out, variant=0):
        from mrhscale.stages.patches import extract_patches

        return extract_patches(env["cohort"], "af", out, ctx=SYNC,
                               options=PatchOptions(stride=2 + variant))

    def fail(self, env, out):
        from mrhscale.stages.patches import extract_patches

        return extract_patches(env["cohort"], "af", out, ctx=SYNC,
                               options=PatchOptions(stride=2, min_label_sum=1e12), overwrite=True)


class TestPredictionStore(Contract):
    what = "prediction store"

    def make(self, env, out, variant=0):
        from mrhscale.stages.predict import predict

        return predict(env["model2" if variant else "model"], env["cohort"], out,
                       ctx=SYNC)

    def fail(self, env, out):
        from mrhscale.stages.predict import predict

        return predict(env["model2"], env["cohort"], out, subjects=["s09"], overwrite=True,
                       ctx=SYNC)


class TestRunFolder(Contract):
    what = "training run folder"

    def make(self, env, out, variant=0):
        from mrhscale.training import train

        resume = os.path.exists(os.path.join(out, "model.pt"))
        return train(env["patches"], out, depth=1, width=8, epochs=1 + variant, batch_size=64, quiet=True,
                     resume=resume and not variant, seed=variant)

    def fail(self, env, out):
        from mrhscale.training import train

        other = make_patch_store(os.path.dirname(out) + "/other.zarr", n_train=128, n_val=32, target="mbp",
                                 n_channels=5)
        return train(other, out, epochs=2, resume=True, quiet=True)


class TestEvaluationFolder(Contract):
    what = "evaluation report folder"
    mismatch_replaces = True

    def make(self, env, out, variant=0):
        from mrhscale.stages.evaluate import evaluate

        return evaluate(env["pred"], env["cohort"], out, ctx=Context(quiet=True),
                        options=EvaluateOptions(seed=variant, montage_subjects=0))

    def fail(self, env, out):
        from mrhscale.stages.evaluate import evaluate

        return evaluate(env["pred"], env["cohort"], out, ctx=Context(quiet=True), label="nope")


class TestImportanceFolder(Contract):
    what = "importance report folder"
    mismatch_replaces = True

    def make(self, env, out, variant=0):
        from mrhscale.stages.importance import importance

        return importance(env["model"], env["patches"], out, max_patches=64, repeats=1, seed=variant,
                          ctx=Context(quiet=True))

    def fail(self, env, out):
        from mrhscale.stages.importance import importance

        return importance(env["model"], env["patches"], out, split="test", ctx=Context(quiet=True))


def test_stores_written_before_commit_markers_keep_their_subjects(tmp_path):
    """A cohort store of the first release (its root index was the truth) is read as it is,
    and the first write under the new contract gives its subjects markers: none is lost."""
    import zarr
    from helpers import subject_dataset

    from mrhscale.stores import CohortStore

    url = str(tmp_path / "old.zarr")
    for sid in ("s01", "s02"):
        ds = subject_dataset(sid)
        ds.attrs["sources"] = {"mri/dwi": {"path": "/data/dwi.nii", "checksum": f"sha256:{sid}"}}
        ds.to_zarr(url, group=sid, mode="w", consolidated=False, zarr_format=3)
    ds.to_zarr(url, group="s03", mode="w", consolidated=False, zarr_format=3)  # never listed: incomplete
    zarr.open_group(url, mode="a").attrs.update({"format": "mrhscale-cohort", "subjects": ["s01", "s02"]})
    store = CohortStore(url)
    assert store.subjects() == ["s01", "s02"]
    assert store.subject_attrs("s01")["made_by"]["legacy"] is True
    store.prepare({})
    w = store.writer()
    w.abort("s03", w.begin("s03"))  # the incomplete one is cleared, the listed ones stay
    assert store.subjects() == ["s01", "s02"]
    assert sorted(k for k, _ in zarr.open_group(url, mode="r")["_commits"].groups()) == ["s01", "s02"]
