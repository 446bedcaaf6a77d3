"""Where predict's maps go: one small writer per kind of output.

``ZarrSink``: the prediction store, through the store layer (opened for one model, each
subject written aside and committed whole: a reader never sees half a subject).
``NiftiSink`` and ``NativeSink``: one NIfTI per subject and map, on the store's grid or
mapped back to the subject's native grid (``--to-native``). ``OmeZarrSink``: OME-Zarr
images for viewers. The file sinks rewrite a file only when it does not hold this
prediction (its header's descrip says which), and refuse one mrhscale did not write.
"""

from __future__ import annotations

import contextlib
import os

import dask
import dask.array as da
import numpy as np
import xarray as xr

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.io.volumes import mrhscale_descrip, write_volume
from mrhscale.parallel.cluster import task_error
from mrhscale.parallel.context import Context
from mrhscale.stages.export_image import export_predictions, image_paths
from mrhscale.stages.predict_graph import SPATIAL, zarr_chunks
from mrhscale.stages.predict_plan import jsonable
from mrhscale.stages.register import (
    Grid,
    ants_module,
    read_transform_info,
    to_native,
    transforms_for_subject,
)
from mrhscale.stores.cohort import forget_soon
from mrhscale.stores.predictions import output, stale_reason
from mrhscale.stores.urls import Location


class ZarrSink:
    """The prediction store of one run's model (``open``), its subjects written whole (``write``)."""

    def __init__(self, loc: Location, plan, *, overwrite: bool = False):
        self.loc, self.plan, self.overwrite = loc, plan, overwrite
        self.url = loc.url
        self.store, self.writer = None, None

    @contextlib.contextmanager
    def open(self):
        """The store for this model: as it is, created, or (``overwrite``) one of another model
        replaced by a new one built aside and swapped in when the block completes."""
        with output(self.loc, self.plan.identity(), self.plan.root_attrs(),
                    overwrite=self.overwrite) as self.store:
            yield self

    def sort_out(self, ids: list[str], made_by: dict) -> tuple[list[str], list[str]]:
        """(subjects to predict, subjects already predicted from the same input and model);
        ``made_by``: each subject's record."""
        todo, skipped = [], []
        for sid in ids:
            why = stale_reason(self.store, sid, made_by[sid])
            if why is None:
                skipped.append(sid)
            elif why == "incomplete" or self.overwrite:
                todo.append(sid)
            else:
                raise MRHError(f"{self.store.name}: subject {sid} there was predicted from another input "
                               f"({why}); pass --overwrite to replace it or choose another --out")
        return todo, skipped

    @contextlib.contextmanager
    def writing(self):
        """Claims and staging of this run's subjects, released and cleaned on exit."""
        with self.store.writer() as self.writer:
            yield self

    def write_group(self, outs, made_by: dict, runner, done=None) -> int:
        """The lazy subject Datasets ``outs`` ((sid, Dataset) pairs, or a dict) computed side by
        side on ``runner`` into their staged places (one call, not one round trip per subject;
        on a local scheduler one after another, each next one opened and staged while this one
        runs), each committed as soon as its own arrays are written: a failure or a kill leaves
        the subjects committed before it whole and reusable, the others absent. Their brain
        voxels, counted in the same pass; ``done(sid)`` after each commit. The root's index is
        rewritten once, at the end."""
        staged: dict[str, str] = {}
        lineage: dict[str, dict] = {}
        pairs = outs.items() if isinstance(outs, dict) else outs
        try:
            tasks = ((sid, self._staged(sid, out, staged, lineage)) for sid, out in pairs)
            return self._commit_each(made_by, tasks, staged, lineage, runner, done)
        finally:
            forget_soon()  # a first block read ahead for a subject not run
            for sid, path in staged.items():  # not committed: dropped, their old versions untouched
                self.writer.abort(sid, path)
            self.writer.refresh_index()

    def _staged(self, sid: str, out: xr.Dataset, staged: dict, lineage: dict):
        """The delayed write of subject ``sid`` into its staged place, which yields its brain voxels."""
        staged[sid], lineage[sid] = self.writer.begin(sid), out.attrs["lineage"]
        return dask.delayed(_brain_voxels, pure=False)(self.writer.lazy_write(staged[sid], out), out["mask"].data.sum())

    def _commit_each(self, made_by: dict, tasks, staged: dict, lineage: dict, runner, done) -> int:
        """Each subject committed as its task ((sid, delayed) pairs, built as they are taken)
        finishes (the first failure stops the group; a task being built is finished first)."""
        ids, brain = [], 0

        def each_task():
            for sid, task in tasks:
                ids.append(sid)
                yield task

        with contextlib.closing(runner.each_finished(each_task(), "predict", unit="subject", quiet=True,
                                                     ahead=True)) as finished:
            for i, n, error in finished:
                sid = ids[i]
                if error is not None:
                    raise task_error(error, f"subject {sid}") from None
                self.writer.commit(sid, staged.pop(sid), made_by[sid], extra={"lineage": lineage[sid]}, index=False)
                brain += int(n)
                if done is not None:
                    done(sid)
        return brain

    def dataset(self, ds: xr.Dataset, pred, lineage: dict) -> xr.Dataset:
        """The subject group: its maps of the lazy prediction ``pred`` (x, y, z, V) and mask on
        the input's grid, with the input's attrs and the ``lineage``."""
        plan, n_t = self.plan, len(self.plan.stains)
        maps = [pred[..., v] for v in range(pred.shape[3])]
        maps = [m.rechunk(zarr_chunks(m.chunks)) for m in maps]
        attrs = {k: v for k, v in jsonable(dict(ds.attrs)).items() if k not in ("complete", "made_by", "fingerprint")}
        virtual = {v: (SPATIAL, m, plan.map_attrs(k)) for k, (v, m) in enumerate(zip(plan.virtuals, maps[:n_t]))}
        out = xr.Dataset(
            {**virtual, "mask": (SPATIAL, da.asarray(ds["mask"].data).rechunk(maps[0].chunks).astype(bool))},
            coords={k: ds.coords[k] for k in SPATIAL if k in ds.coords}, attrs={**attrs, "lineage": lineage})
        for k, (v, m) in enumerate(zip(plan.uncertainties, maps[n_t:n_t + len(plan.uncertainties)], strict=True)):
            out[v] = (SPATIAL, m, plan.uncertainty_attrs(k))
        if plan.ood:
            out[plan.ood] = (SPATIAL, maps[-1], plan.ood_attrs())
        for v in out.variables:
            out[v].encoding.pop("chunks", None)
        return out


class NiftiSink:
    """``<dir>/<sid>_<variable>.nii.gz`` of the store's maps, on the store's grid and affine."""

    native = False

    def __init__(self, nifti_dir: str):
        self.dir = nifti_dir

    def path(self, sid: str, variable: str) -> str:
        return nifti_path(self.dir, sid, variable, self.native)

    def write(self, pstore, sid: str, variable: str, tag: str) -> str | None:
        """The file of ``variable`` of ``sid``, unless it holds this prediction (``tag``) already."""
        path = self.path(sid, variable)
        if current(path, tag):
            return None
        ds = pstore.open_subject(sid)
        arr = ds[variable].transpose(*SPATIAL).values
        return write_nifti(path, arr, dict(ds.attrs), tag)


class NativeSink(NiftiSink):
    """``<dir>/<sid>_<variable>_native.nii.gz``: a map moved back to the subject's native
    (pre-registration) grid by the inverse of its registration."""

    native = True

    def __init__(self, nifti_dir: str, to_native: str | bool, datasets: dict):
        super().__init__(nifti_dir)
        ants_module()  # MRHError naming the optional extra before any work
        self.transforms = {sid: native_transforms(to_native, ds, sid) for sid, ds in datasets.items()}

    def write(self, pstore, sid: str, variable: str, tag: str) -> str | None:
        path = self.path(sid, variable)
        if sid not in self.transforms or current(path, tag):
            return None
        ds = pstore.open_subject(sid)
        arr = ds[variable].transpose(*SPATIAL).values.astype(np.float32)
        native = to_native(arr, self.transforms[sid], interpolator="linear")
        affine = Grid.from_dict(read_transform_info(self.transforms[sid])["native_grid"]).affine
        return write_volume(path, native, affine, descrip=tag)  # written atomically


class OmeZarrSink:
    """``<dir>/<sid>.ome.zarr`` (the first stain's virtual map; other maps ``<sid>.<variable>.ome.zarr``),
    each place checked when the sink is made, before any prediction."""

    def __init__(self, out_dir: str, ids: list[str], plan, ctx: Context):
        self.ctx = ctx
        self.images = {var: image_paths(out_dir, ids, ctx, "" if var == plan.virtuals[0] else f".{var}")
                       for var in plan.variables}

    def write(self, pred_url: str) -> list[str]:
        """Every subject's images from the prediction store; the ones (re)written."""
        return [p for var, paths in self.images.items()
                for p in export_predictions(pred_url, paths, var, self.ctx)]


def _brain_voxels(_written, voxels):
    """A subject task's result once its arrays are written: its brain voxels."""
    return voxels


def nifti_tag(pstore, sid: str, variable: str, model_sha256: str) -> str:
    """What a NIfTI header's descrip says about the prediction it holds (80 chars at most)."""
    fp = pstore.subject_attrs(sid).get("fingerprint", "")[7:19]
    return f"mrhscale {__version__} {variable} model:{model_sha256[7:15]} fp:{fp}"[:80]


def current(path: str, tag: str) -> bool:
    """Whether ``path`` already holds this prediction; refuses a file mrhscale did not write."""
    if not os.path.exists(path):
        return False
    descrip = mrhscale_descrip(path)
    if descrip is None:
        raise MRHError(f"--nifti: {path} exists and was not written by mrhscale; "
                       "move it away or choose another --nifti folder")
    return descrip == tag


def nifti_path(nifti_dir: str, sid: str, variable: str, native: bool = False) -> str:
    return os.path.join(nifti_dir, f"{sid}_{variable}{'_native' if native else ''}.nii.gz")


def write_nifti(path: str, arr: np.ndarray, attrs: dict, descrip: str = "mrhscale") -> str:
    affine = attrs.get("affine")
    if affine is None:
        vs = attrs.get("voxel_size") or [1.0, 1.0, 1.0]
        affine = np.diag([*map(float, vs), 1.0])
    return write_volume(path, np.asarray(arr, np.float32), np.asarray(affine, np.float64),
                        descrip=descrip, space=attrs)


def native_transforms(to_native: str | bool, ds, sid: str) -> str:
    """The registration folder of ``sid`` for ``--to-native``: DIR/<sid> when a DIR is given,
    else the one beside the registered manifest the subject was ingested from."""
    if isinstance(to_native, str) and to_native:
        d = os.path.join(os.fspath(to_native), sid)
        if not os.path.isdir(d):
            raise MRHError(f"--to-native {to_native}: no folder {sid}/ of subject {sid!r} "
                           "(give the --out folder of mrhscale register)")
    else:
        d = transforms_for_subject(ds.attrs.get("manifest"), sid)
        if d is None:
            raise MRHError(f"subject {sid!r} was not registered by mrhscale register "
                           f"(its manifest {ds.attrs.get('manifest')} has no {sid}/transforms beside it); "
                           "give --to-native DIR (the --out folder of mrhscale register)")
    info = read_transform_info(d)  # MRHError when the folder holds no registration
    ref = tuple(int(n) for n in info["reference_grid"]["shape"])
    have = tuple(int(ds.sizes[a]) for a in SPATIAL)
    if ref != have:
        raise MRHError(f"--to-native: subject {sid!r} has grid {have} in the store but its "
                       f"registration in {d} has reference grid {ref}; wrong registration folder?")
    return d
