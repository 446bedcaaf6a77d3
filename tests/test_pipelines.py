"""Each pipeline recipe and launcher, exercised at reduced size on the CPU."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml
import zarr

from mrhscale.stores import PredictionStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPE = os.path.join(ROOT, "pipelines")
MRH = os.path.join(os.path.dirname(sys.executable), "mrhscale")
REDUCE = {
    "EXTRA_INGEST": "--dask-workers 1 --quiet --chunks 16,16,16",
    "EXTRA_PATCHES": "--dask-workers 1 --quiet --stride 2 --val-fraction 0.2",
    "EXTRA_TRAIN": "--depth 1 --epochs 1 --quiet",
    "EXTRA_PREDICT": "--dask-workers 1 --quiet",
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from mrhscale.synth.phantom import make_cohort

    d = tmp_path_factory.mktemp("pipe")
    return make_cohort(str(d / "files"), n_subjects=2, shape=(24, 16, 32), seed=3, quiet=True)


def _run_recipe(recipe, manifest, work, *extra, env_extra=None):
    env = {**os.environ, "MRHSCALE": MRH, **REDUCE, **(env_extra or {})}
    r = subprocess.run(["bash", os.path.join(PIPE, "run_recipe.sh"), os.path.join(PIPE, "recipes", recipe),
                        manifest, str(work), *extra], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def af_model(cohort, tmp_path_factory):
    work = tmp_path_factory.mktemp("af")
    _run_recipe("mrh-af.yaml", cohort, work)
    return work


@pytest.mark.slow  # 30 s, the chain of 4 CLI runs: each stage is tested on its own, the recipes' keys below
def test_af_recipe_reduced(af_model):
    work = af_model
    assert os.path.exists(work / "run" / "model.pt")
    assert PredictionStore(str(work / "pred.zarr")).subjects() == ["s01", "s02"]
    resolved = zarr.open_group(str(work / "patches.zarr"), mode="r", use_consolidated=False)["_config"].attrs["resolved"]["patches"]
    assert resolved["target"] == "af" and resolved["min_label_sum"] == 30 and resolved["stride"] == 2
    tr = yaml.safe_load(open(work / "run" / "mrhscale-train.yaml"))
    assert tr["lr"] == 0.1 and tr["loss"] == "matlab" and tr["clip"] == 0.01 and tr["depth"] == 1
    assert sorted(os.listdir(work / "nifti")) == [f"{s}_{v}.nii.gz" for s in ("s01", "s02") for v in ("af_virtual", "ood")]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["mrh-nf.yaml", "mrh-mbp.yaml"])
def test_transfer_recipes_reduced(recipe, cohort, af_model, tmp_path):
    _run_recipe(recipe, cohort, tmp_path, "--from-model", str(af_model / "run" / "model.pt"),
                env_extra={"EXTRA_TRAIN": "--epochs 1 --quiet"})
    ft = yaml.safe_load(open(tmp_path / "run" / "mrhscale-finetune.yaml"))
    assert ft["lr"] == 0.0001 and ft["head_lr_factor"] == 10
    assert os.path.exists(tmp_path / "run" / "model.pt")


@pytest.mark.slow
def test_small_data_recipe_reduced(cohort, tmp_path):
    _run_recipe("small-data.yaml", cohort, tmp_path)
    assert os.path.exists(tmp_path / "run" / "model.pt")


def test_recipes_only_use_real_options():
    """Every key of every recipe block is an option of that command (typos fail here, not on a cluster)."""
    from click.testing import CliRunner

    from mrhscale.cli import main

    for name in os.listdir(os.path.join(PIPE, "recipes")):
        doc = yaml.safe_load(open(os.path.join(PIPE, "recipes", name)))
        for stage, opts in doc.items():
            assert stage in main.commands, (name, stage)
            params = {p.name for p in main.commands[stage].params}
            assert set(opts) <= params, (name, stage, set(opts) - params)
        assert CliRunner().invoke(main, ["patches", "--help"]).exit_code == 0


def test_slurm_launchers():
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue not installed")
    r = subprocess.run([sys.executable, os.path.join(PIPE, "slurm", "dask_cluster.py"), "--dry-run",
                        "--interface", "lo", "--cores", "8", "--processes", "4", "--memory", "32GB",
                        "--partition", "gpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH" in r.stdout and "-p gpu" in r.stdout and "--nworkers 4" in r.stdout
    assert subprocess.run(["bash", "-n", os.path.join(PIPE, "slurm", "train.sbatch")]).returncode == 0
    text = open(os.path.join(PIPE, "slurm", "train.sbatch")).read()
    assert "torchrun" in text and "-m mrhscale train" in text and "rdzv_backend=c10d" in text
    r = subprocess.run([sys.executable, os.path.join(PIPE, "slurm", "dask_cluster.py"), "--dry-run",
                        "--interface", "lo", "--cores", "8", "--processes", "4", "--memory", "32GB",
                        "--gpus-per-job", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--gres=gpu:1" in r.stdout and "--nworkers" not in r.stdout  # one worker per GPU job
    gpu = os.path.join(PIPE, "slurm", "predict_gpu.sbatch")
    assert subprocess.run(["bash", "-n", gpu]).returncode == 0
    text = open(gpu).read()
    assert "--requeue" in text and "--device cuda" in text and "--signal=TERM" in text


def test_kubernetes_manifest():
    docs = list(yaml.safe_load_all(open(os.path.join(PIPE, "kubernetes", "daskcluster.yaml"))))
    kinds = {d["kind"]: d for d in docs}
    assert kinds["DaskCluster"]["apiVersion"] == "kubernetes.dask.org/v1"
    worker = kinds["DaskCluster"]["spec"]["worker"]["spec"]["containers"][0]
    assert worker["args"][:2] == ["dask", "worker"] and "--memory-limit" in worker["args"]  # tests/test_containers.py
    assert shutil.which("bash")
