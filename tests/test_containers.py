"""The container recipes (containers/Dockerfile, containers/mrhscale.def) parsed, not built (no
docker or apptainer in CI); docs/containers.md shows how to build and run each; the SLURM and
Kubernetes launchers run them."""

import importlib.metadata
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPE = os.path.join(ROOT, "pipelines")


def read(*parts):
    with open(os.path.join(ROOT, *parts)) as fh:
        return fh.read()


def torch_pin():
    return re.search(r"^TORCH_PIN \?= torch==(\S+)$", read("Makefile"), re.M)[1]


def dockerfile():
    """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", read("containers", "Dockerfile"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def docker_args(steps):
    return dict(a.split("=", 1) for op, a in steps if op == "ARG")


def substitute(text, values):
    """${NAME} / {{ NAME }} replaced by their defaults (as a build without --build-arg would)."""
    for _ in range(3):
        text = re.sub(r"\$\{(\w+)\}|\{\{\s*(\w+)\s*\}\}", lambda m: values[m[1] or m[2]], text)
    return text


def test_dockerfile_structure():
    steps = dockerfile()
    ops = [op for op, _ in steps]
    assert ops.count("FROM") == 1 and set(ops[:ops.index("FROM")]) == {"ARG"}  # only ARGs before FROM
    assert "ENTRYPOINT" not in ops  # a command is run as given (Kubernetes' args rely on it)
    args = docker_args(steps)
    assert args["TORCH_VARIANT"] == "cpu" and args["TORCH_VERSION"] == torch_pin()
    assert substitute(args["TORCH_INDEX"], args) == "https://download.pytorch.org/whl/cpu"
    runs = [i for i, (op, a) in enumerate(steps) if op == "RUN" and "pip install" in a]
    torch_run, package_run = runs[0], runs[1]
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in steps[torch_run][1]
    assert '"/src[${EXTRAS}]"' in steps[package_run][1]
    copies = [i for i, (op, _) in enumerate(steps) if op == "COPY"]
    assert torch_run < min(copies) and max(copies) < package_run  # torch's layer survives code edits
    cmd = next(a for op, a in steps if op == "CMD")
    assert yaml.safe_load(cmd)[0] == "mrhscale" and next(a for op, a in steps if op == "USER") != "root"


def test_dockerfile_copies_the_checkout_the_context_allows():
    steps = dockerfile()
    sources = [s for op, a in steps if op == "COPY" for s in a.split()[:-1]]
    assert set(sources) == {"pyproject.toml", "README.md", "LICENSE", "mrhscale"}
    assert all(os.path.exists(os.path.join(ROOT, s)) for s in sources)
    ignore = read(".dockerignore").splitlines()
    assert "*" in ignore and all(f"!{s}" in ignore for s in sources)  # nothing else (.venv) is sent


def test_dockerfile_shell_steps_parse():
    steps = dockerfile()
    values = {**docker_args(steps), "EXTRAS": "s3"}
    for op, a in steps:
        if op == "RUN":
            r = subprocess.run(["bash", "-n", "-c", substitute(a, values)], capture_output=True, text=True)
            assert r.returncode == 0, (a, r.stderr)


def definition():
    """(header {key: value}, sections {name: body}) of the Apptainer definition file."""
    text = "\n".join(line for line in read("containers", "mrhscale.def").splitlines()
                     if not line.startswith("#"))
    head, *rest = re.split(r"^%(\w+)\s*$", text, flags=re.M)
    header = dict(line.split(":", 1) for line in head.splitlines() if ":" in line)
    sections = {rest[i]: rest[i + 1] for i in range(0, len(rest), 2)}
    return {k.strip(): v.strip() for k, v in header.items()}, sections


def test_apptainer_definition_structure():
    header, sections = definition()
    assert header == {"Bootstrap": "docker", "From": "python:3.11-slim"}
    assert docker_args(dockerfile())["PYTHON_VERSION"] == "3.11"  # the Dockerfile's base too
    assert {"arguments", "files", "post", "runscript", "environment", "test"} <= set(sections)
    args = dict(line.strip().split("=", 1) for line in sections["arguments"].strip().splitlines())
    assert args["TORCH_VERSION"] == torch_pin() and args["TORCH_VARIANT"] == "cpu"
    post = sections["post"]
    assert set(re.findall(r"\{\{\s*(\w+)\s*\}\}", post)) <= set(args)
    torch_at = post.index('"torch=={{ TORCH_VERSION }}" --index-url "https://download.pytorch.org/whl/{{ TORCH_VARIANT }}"')
    assert torch_at < post.index('"/src[{{ EXTRAS }}]"')
    r = subprocess.run(["bash", "-n", "-c", substitute(post, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sections["runscript"].strip() == 'exec mrhscale "$@"'


def test_apptainer_files_are_the_checkout():
    _, sections = definition()
    pairs = [line.split() for line in sections["files"].strip().splitlines()]
    assert {src for src, _ in pairs} == {"pyproject.toml", "README.md", "LICENSE", "mrhscale"}
    assert all(os.path.exists(os.path.join(ROOT, src)) and dst == f"/src/{src}" for src, dst in pairs)


def commands(doc, program):
    """The shell commands of docs/containers.md's code blocks that run ``program``, as argv lists."""
    blocks = re.findall(r"```bash\n(.*?)```", doc, re.S)
    return [shlex.split(line) for b in blocks for line in b.splitlines() if line.startswith(program + " ")]


def test_docs_build_and_run_each_image():
    doc = read("docs", "containers.md")
    builds = [c for c in commands(doc, "docker") if c[1] == "build"]
    cpu = next(c for c in builds if "--build-arg" not in c)
    assert cpu[cpu.index("-f") + 1] == "containers/Dockerfile" and cpu[-1] == "."
    tag = cpu[cpu.index("-t") + 1]
    cuda = next(c for c in builds if "--build-arg" in c)
    assert cuda[cuda.index("--build-arg") + 1].startswith("TORCH_VARIANT=cu")
    runs = [c for c in commands(doc, "docker") if c[1] == "run"]
    assert any(tag in c and c[c.index(tag) + 1] == "mrhscale" for c in runs)
    sif_builds = [c for c in commands(doc, "apptainer") if c[1] == "build"]
    assert sif_builds[0][2:] == ["mrhscale.sif", "containers/mrhscale.def"]
    assert any("--build-arg" in c and c[-1] == "containers/mrhscale.def" for c in sif_builds)
    assert ["apptainer", "run", "mrhscale.sif", "demo", "--out", "demo-out"] in commands(doc, "apptainer")


def test_kubernetes_runs_the_documented_image():
    doc = read("docs", "containers.md")
    cpu = next(c for c in commands(doc, "docker") if c[1] == "build" and "--build-arg" not in c)
    cluster = next(d for d in yaml.safe_load_all(read("pipelines", "kubernetes", "daskcluster.yaml"))
                   if d["kind"] == "DaskCluster")["spec"]
    pods = [cluster["worker"]["spec"], cluster["scheduler"]["spec"]]
    assert {c["image"] for p in pods for c in p["containers"]} == {cpu[cpu.index("-t") + 1]}
    dask_cli = {e.name for e in importlib.metadata.entry_points(group="dask_cli")}
    for pod, process in zip(pods, ("worker", "scheduler"), strict=True):
        args = pod["containers"][0]["args"]
        assert args[:2] == ["dask", process] and process in dask_cli  # a command the image has


def stub(folder, name, body):
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture
def slurm(tmp_path):
    """PATH with srun, scontrol, apptainer, torchrun and mrhscale stubs that log what they run."""
    log = tmp_path / "ran.log"
    stub(tmp_path, "srun", 'exec "$@"')
    stub(tmp_path, "scontrol", "echo node1; echo node2")
    for name in ("apptainer", "torchrun", "mrhscale"):
        stub(tmp_path, name, f'echo "{name} $*" >> {log}')
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_CPUS_PER_TASK": "8", "SLURM_GPUS_ON_NODE": "2", "GPUS_PER_NODE": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2"}
    env.pop("SIF", None)

    def run(script, *args, sif=None):
        log.write_text("")
        r = subprocess.run(["bash", os.path.join(PIPE, "slurm", script), *args], capture_output=True,
                           text=True, timeout=60, cwd=tmp_path, env={**env, **({"SIF": sif} if sif else {})})
        assert r.returncode == 0, r.stderr
        return log.read_text().strip()

    return run


def test_slurm_scripts_run_inside_the_image_with_sif(slurm):
    plain = slurm("predict_gpu.sbatch", "m.pt", "c.zarr", "p.zarr", "--quiet")
    assert plain == "mrhscale predict m.pt c.zarr --out p.zarr --device cuda --quiet"
    boxed = slurm("predict_gpu.sbatch", "m.pt", "c.zarr", "p.zarr", sif="/img/mrhscale.sif")
    assert boxed == "apptainer exec --nv /img/mrhscale.sif mrhscale predict m.pt c.zarr --out p.zarr --device cuda"
    assert slurm("train.sbatch", "p.zarr", "run").startswith("torchrun --nnodes=2 --nproc_per_node=2")
    boxed = slurm("train.sbatch", "p.zarr", "run", sif="/img/mrhscale.sif")
    assert boxed.startswith("apptainer exec --nv /img/mrhscale.sif torchrun --nnodes=2")
    assert "rdzv_endpoint=node1:29500 -m mrhscale train p.zarr --out run" in boxed


def test_dask_cluster_workers_start_in_the_image():
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue not installed")
    r = subprocess.run([sys.executable, os.path.join(PIPE, "slurm", "dask_cluster.py"), "--dry-run",
                        "--interface", "lo", "--python", "apptainer exec mrhscale.sif python"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\napptainer exec mrhscale.sif python -m distributed.cli.dask_worker" in r.stdout
