"""Start a Dask cluster on SLURM with dask-jobqueue and run mrhscale's Dask stages on it.

    python pipelines/slurm/dask_cluster.py --jobs 8 --cores 16 --memory 120GB \\
        --partition compute --walltime 04:00:00 -- \\
        ingest cohort.yaml --out /scratch/lab/cohort.zarr

Everything after ``--`` is an mrhscale command; ``--scheduler`` is added with the
address of the new cluster. ``--dry-run`` prints the sbatch script dask-jobqueue
would submit, without submitting anything. Each SLURM job runs one Dask worker
process per ``--processes`` with ``--cores / --processes`` threads; keep one
thread per process for MRH-Net inference on CPU nodes and let torch use it.

GPU nodes: ``--gpus-per-job 1`` makes each SLURM job ONE worker process holding one
GPU (``--gres=gpu:1``), so that no two workers share a device; scale with ``--jobs``
and pass ``--device cuda`` to predict:

    python pipelines/slurm/dask_cluster.py --jobs 4 --gpus-per-job 1 --cores 8 \
        --memory 64GB --partition gpu -- predict run/model.pt cohort.zarr --out pred.zarr --device cuda

Workers inside the Apptainer image (containers/mrhscale.def; docs/containers.md):
``--python 'apptainer exec mrhscale.sif python'`` starts each worker with the image's Python
(``apptainer exec --nv`` on GPU nodes). The scheduler runs in this script's process, so its
``distributed`` must be the image's version.

A job preempted or lost is replaced by dask-jobqueue's adaptive scaling; what was
predicted is committed per subject, so rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def make_cluster(a):
    from dask_jobqueue import SLURMCluster

    extra = list(a.job_extra or [])
    processes = a.processes
    if a.gpus_per_job:
        extra.append(f"--gres=gpu:{a.gpus_per_job}")
        processes = 1  # one worker per job: workers of one job would all share its first GPU
    return SLURMCluster(
        cores=a.cores,
        processes=processes,
        memory=a.memory,
        queue=a.partition,
        account=a.account,
        walltime=a.walltime,
        local_directory=a.local_directory,
        job_extra_directives=extra,
        job_script_prologue=a.prologue or [],
        interface=a.interface,
        python=a.python,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=4, help="SLURM jobs (each a node or part of one).")
    ap.add_argument("--cores", type=int, default=16)
    ap.add_argument("--processes", type=int, default=16, help="Dask worker processes per job.")
    ap.add_argument("--memory", default="120GB", help="Memory per job (split over its processes).")
    ap.add_argument("--partition", default=None)
    ap.add_argument("--account", default=None)
    ap.add_argument("--walltime", default="04:00:00")
    ap.add_argument("--local-directory", default="$TMPDIR", help="Worker spill directory (node-local disk).")
    ap.add_argument("--job-extra", action="append", help="Extra #SBATCH directive, e.g. --job-extra='--exclusive'.")
    ap.add_argument("--prologue", action="append", help="Shell line run before the worker, e.g. 'source venv/bin/activate'.")
    ap.add_argument("--interface", default=None, help="Network interface of scheduler and workers (e.g. ib0).")
    ap.add_argument("--python", default=None,
                    help="Command that starts a worker's Python (default: this one), e.g. 'apptainer exec mrhscale.sif python'.")
    ap.add_argument("--gpus-per-job", type=int, default=0,
                    help="GPUs per SLURM job (--gres); the job then runs one worker process.")
    ap.add_argument("--dry-run", action="store_true", help="Print the job script and exit.")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then an mrhscale command and its arguments")
    a = ap.parse_args(argv)
    cluster = make_cluster(a)
    if a.dry_run:
        print(cluster.job_script())
        cluster.close()
        return 0
    cmd = [c for c in a.command if c != "--"]
    if not cmd:
        ap.error("give an mrhscale command after --")
    try:
        cluster.scale(jobs=a.jobs)
        from distributed import Client

        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=1800)
            full = ["mrhscale", *cmd, "--scheduler", cluster.scheduler_address]
            print("running:", " ".join(full), flush=True)
            return subprocess.call(full)
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
