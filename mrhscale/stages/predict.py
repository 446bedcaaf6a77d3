"""Whole-brain inference: every brain voxel of every subject, on the Dask cluster.

Each voxel gets its in-plane patch of the bundle's channels, normalised as at training,
and the network's centre output is written back to it, as the original MRH_recon did
(``aggregate="mean"`` averages every overlapping PxP output instead). Voxels outside the
brain mask are 0. The stage is validate -> plan -> graph -> run -> commit:

- validate and plan: ``PredictPlan`` (stages/predict_plan.py): the bundle, its maps and
  records, the numerics (one round trip to the workers at most);
- graph: ``subject_prediction`` (stages/predict_graph.py) per subject: blocks of store
  chunks, each gathering its patches (ops/blocks.py), running the network loaded once per
  worker (nn/worker.py) and merging its outputs (ops/merge.py);
- run and commit: subjects in groups (``subject_groups``: enough voxels to fill the cluster,
  many tiny subjects together), each group computed in one call on the context's runner
  into the prediction store, each subject committed whole as soon as its own arrays are
  written; then the NIfTI, native-space and OME-Zarr files (stages/predict_sinks.py) and
  the BIDS derivatives (stages/predict_bids.py).

Output store (Zarr v3, readable with plain xarray)::

    PRED/                      root attrs: subjects (COMPLETE ones), target, variable,
                               model {...}, source, aggregate, provenance
      <subject>/  <target>_virtual  float32 (x, y, z)  raw stain units, 0 outside mask
                  mask              bool (x, y, z)
                  same x/y/z coords and subject attrs (affine, ...) as the input,
                  plus attrs["lineage"] (model, source store, parameters)

A subject is listed in the root's ``subjects`` only after its group is fully written, so
an interrupted run resumes and skips finished subjects. An embedded cluster starts only
when there is something to predict.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from mrhscale.errors import MRHError
from mrhscale.log import progress
from mrhscale.options import PredictOptions
from mrhscale.parallel.context import Context
from mrhscale.results import PredictResult
from mrhscale.stages.predict_bids import bids_sink
from mrhscale.stages.predict_graph import subject_prediction
from mrhscale.stages.predict_plan import PredictPlan, SubjectInputs, checked_device
from mrhscale.stages.predict_sinks import NativeSink, NiftiSink, OmeZarrSink, ZarrSink, nifti_tag
from mrhscale.stores import CohortStore, resolve

GROUP_VOXELS = 4 << 20  # input voxels of the subjects computed in one runner call (subject_groups)
GROUP_SUBJECTS = 64  # subjects of one call at most (more on a cluster of more than 16 workers)


def predict(model_path: str, store_url: str, out_url: str, *, subjects: list[str] | None = None,
            nifti_dir: str | None = None, ome_zarr: str | None = None, to_native: str | bool | None = None,
            bids_derivatives: str | bool | None = None, overwrite: bool = False, options: PredictOptions | None = None,
            ctx: Context | None = None) -> PredictResult:
    """Predict the bundle's stain for every brain voxel of each subject; returns a summary.

    A subject already in ``out_url`` is reused only if it was predicted by the same model
    (checksum), aggregation and numerics from the same input subject (its fingerprint); one
    made from anything else is an error unless ``overwrite`` (then it is replaced, the old
    version kept until the new one is whole). ``store_url`` and ``out_url`` may be URLs
    (s3://...: ``ctx.storage_options``, which the workers get inside the task graph); the
    bundle and ``nifti_dir`` are local paths. ``nifti_dir``: also one NIfTI per subject and
    map. ``to_native``: also map each map back to the subject's own (pre-registration) grid,
    ``<nifti_dir>/<sid>_<variable>_native.nii.gz``; True or "" finds the transforms beside
    the registered manifest the subject was ingested from, a folder (the ``--out`` of
    ``mrhscale register``) uses ``DIR/<sid>``. ``ome_zarr``: also ``<ome_zarr>/<sid>.ome.zarr``
    for viewers (rewritten only when it does not hold this prediction). ``bids_derivatives``: also
    a BIDS derivatives folder (stages/predict_bids.py): a folder, True (the BIDS dataset's own
    ``derivatives/mrhscale``), False (none), or None (that folder when the subjects were
    ingested from a BIDS dataset, else none). ``options``: batch,
    aggregation, TTA and numerics (docs/precision.md); ``ctx``: where it runs (Context).
    """
    ctx, options = ctx or Context(), options or PredictOptions()
    t0 = time.perf_counter()
    to_native = None if to_native is False else to_native
    nifti_dir = resolve(nifti_dir, "--nifti") if nifti_dir else None
    if to_native is not None and not nifti_dir:
        raise MRHError("--to-native needs --nifti DIR: the folder for the native-space NIfTI files")
    plan = PredictPlan(model_path, options, checked_device(ctx))
    store_url, out_url = resolve(store_url), resolve(out_url)
    if out_url == store_url:
        raise MRHError(f"--out {out_url}: is the input store; give a separate prediction store")
    source = CohortStore.open(ctx.location(store_url))
    inputs = plan.inputs(source, subjects)  # records read; datasets opened group by group
    ids = inputs.ids
    files = _file_sinks(nifti_dir, to_native, inputs)
    ome = OmeZarrSink(ome_zarr, ids, plan, ctx) if ome_zarr else None
    bids = bids_sink(bids_derivatives, source.subjects(), inputs.attrs_only())
    sink = ZarrSink(ctx.location(out_url), plan, overwrite=overwrite)
    with contextlib.ExitStack() as stack:
        # an embedded cluster starts only if there is something to predict; its workers are
        # this machine's, so the numerics are planned here (a cluster given or joined: on its workers)
        runner = None if ctx.embedded else stack.enter_context(ctx.runner(threads=True))
        plan.use_threads(runner, ctx)
        plan.plan_numerics(runner, inputs.brain_voxels())
        with sink.open():
            todo, skipped = sink.sort_out(ids, {sid: plan.made_by(inputs.identity(sid)["fingerprint"]) for sid in ids})
            if todo and runner is None:
                runner = stack.enter_context(ctx.runner(threads=True))
                plan.use_threads(runner, ctx)
            n_vox = _predict_all(plan, sink, inputs.subset(todo), runner, ctx)
            nifti, native = _write_files(files, sink.store, ids, plan)
            bids_files = bids.write(sink.store, ids, plan, store_url) if bids else []
    dt = time.perf_counter() - t0
    return PredictResult(out=out_url, variable=plan.variable, predicted=todo, skipped=skipped, brain_voxels=n_vox,
                         seconds=dt, voxels_per_s=n_vox / dt if dt > 0 and n_vox else 0.0, nifti=nifti,
                         native=native, ome_zarr=ome.write(out_url) if ome else [], uncertainty=plan.uncertainty,
                         bids=bids_files, bids_dir=bids.path if bids else None)


def _predict_all(plan: PredictPlan, sink: ZarrSink, inputs: SubjectInputs, runner, ctx: Context) -> int:
    """Every subject of ``inputs`` predicted and committed, group by group (``subject_groups``:
    one runner call each, every subject committed as soon as it is written); the brain voxels
    predicted."""
    if not inputs:
        return 0
    plan.prepare_workers(runner)  # may fall back from a compile: the records follow after it
    made_by = {sid: plan.made_by(inputs.identity(sid)["fingerprint"]) for sid in inputs}
    n_vox = 0
    with sink.writing(), progress(total=len(made_by), desc="predict", unit="subject", quiet=ctx.quiet) as bar:
        for group in subject_groups(inputs.voxels(), runner.n_workers()):
            outs = _group_outputs(plan, sink, inputs, group, runner)
            n_vox += sink.write_group(outs, made_by, runner, done=lambda _sid: bar.update(1))
            del outs  # this group's datasets and graphs go before the next group's are made
    return n_vox


def subject_groups(voxels: dict[str, int], n_workers: int = 1) -> Iterator[list[str]]:
    """The subjects of ``voxels`` ({id: its grid's voxels}) in groups of one runner call each:
    ``GROUP_VOXELS`` of input or more (enough
    blocks to fill the cluster: many tiny subjects share a call, so their fixed costs, a
    round trip, an index rewrite, overlap), at most ``GROUP_SUBJECTS`` (or 4 per worker),
    so that the driver's graphs and claims stay bounded whatever the cohort's size."""
    group, total, most = [], 0, max(GROUP_SUBJECTS, 4 * n_workers)
    for sid, n in voxels.items():
        group.append(sid)
        total += n
        if total >= GROUP_VOXELS or len(group) >= most:
            yield group
            group, total = [], 0
    if group:
        yield group


def _group_outputs(plan: PredictPlan, sink: ZarrSink, inputs: SubjectInputs, group: list[str],
                   runner) -> Iterator[tuple[str, object]]:
    """(id, lazy output Dataset) of each subject of ``group``, each opened when taken (on a
    local scheduler: while the subject before it runs, ``ZarrSink.write_group``); a
    per-subject normalisation opens them all first, its statistics computed in one call."""
    datasets = inputs.subset(group)  # opened on access only
    norms = plan.normalisations(datasets, runner)
    tasks = max(1, runner.n_threads() // len(group))  # a big subject's runs fill the cluster, many small ones it
    for sid in group:
        ds, identity = datasets[sid], inputs.identity(sid)
        if runner.client is None:  # tasks in this process: the mask read now (ahead, in one call), not in the
            ds["mask"].load(scheduler="synchronous")  # task's graph chunk by chunk (zarr round trips each)
        pred = subject_prediction(ds, plan.meta, plan.spec, aggregate=plan.aggregate, tta=plan.tta, norm=norms[sid],
                                  regions=inputs.source.mri_regions(sid, identity), tasks=tasks,
                                  plane_bytes=plan.plane_bytes, soon=runner.client is None)
        yield sid, sink.dataset(ds, pred, plan.lineage(inputs.source.url, sid, identity, norms[sid]))


def _file_sinks(nifti_dir: str | None, to_native, datasets: dict) -> list:
    """The NIfTI sinks asked for, checked now (a native one: every subject's registration)."""
    if not nifti_dir:
        return []
    return [NiftiSink(nifti_dir)] + ([NativeSink(nifti_dir, to_native, datasets)] if to_native is not None else [])


def _write_files(files: list, pstore, ids: list[str], plan: PredictPlan) -> tuple[list[str], list[str]]:
    """The NIfTI (and native-space) files of every requested subject and map: (written, native)."""
    written: dict[bool, list[str]] = {False: [], True: []}
    for sid in ids:
        for var in plan.variables:
            tag = nifti_tag(pstore, sid, var, plan.model_rec["sha256"])
            for sink in files:
                path = sink.write(pstore, sid, var, tag)
                if path:
                    written[sink.native].append(path)
    return written[False], written[True]
