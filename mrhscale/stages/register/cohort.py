"""A manifest onto one reference grid, subjects in parallel, with a new manifest for ingest."""

from __future__ import annotations

import contextlib
import json
import os
import time

import dask
import numpy as np
import yaml

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.io.manifest import Manifest, load_manifest
from mrhscale.io.volumes import open_volume
from mrhscale.log import note
from mrhscale.options import COHORT_MIN_SIMILARITY, RegistrationOptions
from mrhscale.parallel.cluster import task_error
from mrhscale.parallel.context import Context, Runner
from mrhscale.results import RegisterResult
from mrhscale.stages.ingest import plan_subject
from mrhscale.stages.register.ants import (
    STAGING,
    TRANSFORM_DIR,
    TRANSFORM_JSON,
    ants_module,
    check_options,
)
from mrhscale.stages.register.geometry import (
    Grid,
    contrast_array,
    contrast_names,
    grid_of,
    n_volumes,
    read3,
    short_list,
)
from mrhscale.stages.register.landmarks import subject_landmarks
from mrhscale.stages.register.subject import register_subject
from mrhscale.stores import Claim, Folder, write_text
from mrhscale.stores.base import prune_empty, remove
from mrhscale.stores.locks import run_token
from mrhscale.stores.urls import inside


def _reference(man, reference: str, contrast: str):
    """(description, grid, fixed array, mask or None, reference subject id or None)."""
    ids = {s.id: s for s in man.subjects}
    if reference in ids:
        plan = plan_subject(ids[reference])
        arr = contrast_array(plan, contrast)
        if not np.any(arr):
            raise MRHError(f"--reference {reference}: contrast {contrast!r} is all zero; choose another --contrast")
        return ({"kind": "subject", "subject": reference, "contrast": contrast},
                Grid(plan.shape, plan.affine), arr, plan.mask.copy(), reference)
    if not os.path.exists(reference):
        raise MRHError(f"--reference {reference!r}: neither a subject id of {man.path} "
                       f"(known: {', '.join(short_list(ids))}) nor an existing NIfTI file")
    vol = open_volume(reference, what="--reference")
    if n_volumes(vol) > 1:
        raise MRHError(f"--reference {reference}: a 4D image ({vol.shape}); give a 3D template "
                       "of the --contrast used for registration")
    arr = read3(vol)
    if not np.any(arr) or float(arr.std()) == 0:
        raise MRHError(f"--reference {reference}: the template is empty/constant; nothing to register to")
    return ({"kind": "file", "path": os.path.abspath(reference)}, grid_of(vol), arr, None, None)


def _complete(out_dir: str, sid: str) -> dict | None:
    p = os.path.join(out_dir, sid, TRANSFORM_DIR, TRANSFORM_JSON)
    if not os.path.exists(p):
        return None
    try:
        with open(p) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _write_manifest(out_dir: str, man, params: dict) -> str:
    entries = []
    for s in man.subjects:
        info = _complete(out_dir, s.id)
        if info is not None:
            entries.append(info["manifest_entry"])
    path = os.path.join(out_dir, "cohort.yaml")
    if not entries:
        return path
    doc = {"subjects": entries,
           "registration": {**params, "source_manifest": man.path, "mrhscale_version": __version__}}
    return write_text(path, "# mrhscale register: subjects on one reference grid; paths relative to "
                            "this file\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))


def _output_folder(out_dir: str, man, specs):
    """The registration folder: ours or new, and never the folder of the files it reads."""
    folder = Folder(out_dir, "mrhscale-registration")
    folder.check()  # the user's folder, a synthetic cohort, a store...: refused untouched
    sources = [man.path] + [f for s in specs for f in s.files().values()]
    inside_out = [f for f in sources if inside(f, folder.path)]
    if inside_out:
        raise MRHError(f"--out {folder.path}: holds the files being registered ({inside_out[0]}); "
                       "write the registration to another folder")
    return folder


def register_cohort(
    manifest,
    reference: str,
    out_dir: str,
    *,
    subjects: list[str] | None = None,
    options: RegistrationOptions | None = None,
    min_similarity: float = COHORT_MIN_SIMILARITY,
    compress: bool = False,
    overwrite: bool = False,
    ctx: Context | None = None,
    landmarks: tuple[str, str] | None = None,
) -> RegisterResult:
    """Register the manifest's subjects onto ``reference`` (a subject id of the manifest, or a
    3D template NIfTI of the same contrast) and write them, with a new manifest, under out_dir.

    options (:class:`mrhscale.options.RegistrationOptions`): transform rigid | affine | syn
    (= affine+syn: affine stage, then SyN, as the original's rigid+affine+LDDMM chain);
    contrast, what drives the registration (fa, a channel name such as dwi2000_0, t2, or mask);
    metric, init, fast, threads (ITK threads per subject, default 1) and seed (ANTs' sampling
    seed: same seed, same result; None: from the clock). A subject whose registered contrast
    correlates with the reference by less than ``min_similarity`` (|Pearson r| over the
    reference's brain) is reported as not converged; the others still finish. Subjects already
    complete in out_dir with the same parameters are skipped. compress: write .nii.gz instead
    of .nii (.nii is several times faster to write and memory-maps in ingest; .nii.gz is
    smaller). One Dask task per subject on ``ctx``'s cluster. landmarks: (moving file pattern
    with ``{subject}``, the reference's landmark file): each registered subject's TRE before and
    after, in its transform.json and the result (docs/landmarks.md).
    """
    ctx, options = ctx or Context(), options or RegistrationOptions()
    ants_module()  # fail early, before any cluster starts
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    params = check_options(options)
    specs = man.select(list(dict.fromkeys(subjects)) if subjects else None)
    folder = _output_folder(out_dir, man, specs)
    desc, grid, fixed_arr, ref_mask, ref_sid = _reference(man, reference, options.contrast)
    _check_contrast(specs, options.contrast, ref_sid)
    params["reference"] = desc
    scored = subject_landmarks(*landmarks, [s.id for s in specs]) if landmarks else {}
    folder.mark()
    todo, skipped = _sort_out(folder.path, specs, params, overwrite)
    run = _CohortRun(folder.path, man, params, grid, ref_sid, options=options, compress=compress,
                     min_similarity=min_similarity, ctx=ctx)
    run.landmark_files = scored
    if todo:
        run.register(todo, fixed_arr, ref_mask)
    order = {s.id: i for i, s in enumerate(man.subjects)}
    run.registered.sort(key=order.get)
    manifest_path = _write_manifest(folder.path, man, params)
    return RegisterResult(out=folder.path, manifest=manifest_path if (run.registered or skipped) else None,
                          registered=run.registered, skipped=skipped, failed=run.failed, metrics=run.metrics,
                          seconds=run.seconds, timing=run.timing, landmarks=run.landmarks)


def _check_contrast(specs, contrast: str, ref_sid) -> None:
    """Headers only (and the mask): a bad contrast name fails before any work."""
    for spec in specs:
        if spec.id != ref_sid:
            names = contrast_names(plan_subject(spec))
            if contrast not in names:
                raise MRHError(f"subject {spec.id}: --contrast {contrast!r} does not exist; available: "
                               f"{', '.join(short_list(names))}")


def _sort_out(out_dir: str, specs, params: dict, overwrite: bool):
    """(subjects to register, subjects already complete with the same parameters)."""
    todo, skipped = [], []
    for spec in specs:
        info = _complete(out_dir, spec.id)
        if info is None or overwrite:
            todo.append(spec)
        elif all(info.get(k) == v for k, v in params.items()):
            skipped.append(spec.id)
        else:
            raise MRHError(f"--out {out_dir}: subject {spec.id} was registered with other parameters "
                           f"({info.get('transform')}, contrast {info.get('contrast')}, reference "
                           f"{info.get('reference')}); use --overwrite or another --out")
    return todo, skipped


class _CohortRun:
    """The subjects' registrations on the cluster, each claimed, reported as it finishes."""

    def __init__(self, out_dir, man, params, grid, ref_sid, *, options: RegistrationOptions, compress: bool,
                 min_similarity: float, ctx: Context):
        self.out_dir, self.man, self.params, self.grid, self.ref_sid = out_dir, man, params, grid, ref_sid
        self.threads, self.seed, self.ctx = options.threads or 1, options.seed, ctx
        self.ext, self.min_similarity = ".nii.gz" if compress else ".nii", float(min_similarity)
        self.registered: list[str] = []
        self.failed: dict = {}
        self.metrics: dict = {}
        self.seconds: dict = {}
        self.timing: dict = {}
        self.landmark_files: dict = {}
        self.landmarks: dict = {}

    def job(self, spec, token: str) -> dict:
        return {"spec": spec, "out": self.out_dir, "stage": os.path.join(self.out_dir, STAGING, token, spec.id),
                "reference_grid": self.grid.to_dict(), "identity": spec.id == self.ref_sid,
                "threads": self.threads, "seed": self.seed, "ext": self.ext,
                "min_similarity": self.min_similarity, "check": "r", "manifest": self.man.path,
                "landmarks": self.landmark_files.get(spec.id), **self.params}

    def register(self, todo, fixed_arr, ref_mask) -> None:
        token = run_token()
        jobs = [self.job(s, token) for s in todo]
        claims = [Claim(os.path.join(self.out_dir, "_locks", f"{s.id}.lock"), f"subject {s.id} of {self.out_dir}")
                  for s in todo]
        with contextlib.ExitStack() as held, self.ctx.runner() as runner:
            for c in claims:
                held.enter_context(c)
            self._run_jobs(runner, jobs, fixed_arr, ref_mask)
        remove(os.path.join(self.out_dir, STAGING, token))
        prune_empty(os.path.join(self.out_dir, STAGING))

    def _run_jobs(self, runner: Runner, jobs, fixed_arr, ref_mask) -> None:
        fixed = runner.share(fixed_arr)
        mask = runner.share(ref_mask) if ref_mask is not None else None
        tasks = [dask.delayed(register_subject, pure=False)(
                     j, fixed, mask, dask_key_name=f"register-{j['spec'].id}-{os.getpid()}-{time.time_ns()}")
                 for j in jobs]
        for i, res, err in runner.each_finished(tasks, "register", unit="subject"):
            self._record(res if err is None else self._died(jobs[i]["spec"].id, err))

    @staticmethod
    def _died(sid: str, e: Exception) -> dict:
        """A task that raised (a worker died): reported as the subject's failure, the others go on."""
        return {"subject": sid, "status": "failed", "metrics": {}, "seconds": None,
                "message": str(task_error(e, f"subject {sid}"))}

    def _record(self, res: dict) -> None:
        sid = res["subject"]
        self.metrics[sid], self.seconds[sid] = res["metrics"], res["seconds"]
        if "timing" in res:
            self.timing[sid] = res["timing"]
        if res.get("landmarks"):
            self.landmarks[sid] = res["landmarks"]
        if res["status"] == "ok":
            self.registered.append(sid)
        else:
            self.failed[sid] = res["message"]
        m = res["metrics"]
        extra = f", dice {m['dice_after']:.3f}" if "dice_after" in m else ""
        note(f"  {sid}: {res['status']}, r {m.get('r_before', float('nan')):.3f} -> "
             f"{m.get('r_after', float('nan')):.3f}{extra}, {res['seconds'] or 0:.1f} s", self.ctx.quiet)
