"""One subject, on a Dask worker: estimate, check, apply to every file, commit."""

from __future__ import annotations

import datetime as _dt
import os
import time

import numpy as np

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.io.volumes import open_volume, read_sidecars, write_sidecars, write_volume
from mrhscale.stages.ingest import plan_subject
from mrhscale.stages.register.ants import (
    FORMAT,
    PRESETS,
    TRANSFORM_DIR,
    TRANSFORM_JSON,
    ants_module,
)
from mrhscale.stages.register.geometry import (
    Grid,
    blank,
    contrast_array,
    dice,
    n_volumes,
    nmi,
    overlap_fraction,
    pearson,
    read3,
    to_ants,
    zooms,
)
from mrhscale.stages.register.landmarks import landmark_pair, registration_tre
from mrhscale.stages.register.transforms import (
    BLOCK,
    apply,
    apply4,
    estimate,
    linear_part,
    rotate_bvecs,
    write_identity,
)
from mrhscale.stores import write_json
from mrhscale.stores.base import remove, swap_in


class NotConverged(Exception):
    pass


def rel(path: str, base: str) -> str:
    return os.path.relpath(path, base)


def register_subject(job: dict, fixed_arr: np.ndarray | None = None,
                     ref_mask: np.ndarray | None = None) -> dict:
    """One subject, on a Dask worker: estimate, check, apply to every file, commit atomically.

    Returns {"subject", "status": "ok"|"failed", "message", "metrics", "seconds", "entry"}.
    A failure is reported, not raised: the other subjects finish.
    """
    reg = _Registration(job, fixed_arr, ref_mask)
    try:
        return reg.run()
    except NotConverged as e:
        reg.result["message"] = f"subject {reg.sid}: {e}"
    except MRHError as e:
        reg.result["message"] = str(e)
    except Exception as e:  # ITK/ANTs failures: report the subject, let the others finish
        before = reg.metrics.get("r_before")
        reg.result["message"] = (f"subject {reg.sid}: registration failed ({type(e).__name__}: {e})"
                                 + (f"; Pearson r with the reference before registration {before:.3f}"
                                    if before is not None else ""))
    remove(reg.stage)
    reg.result["seconds"] = time.perf_counter() - reg.t0
    return reg.result


class _Registration:
    """The steps of one subject's registration, in its own staging folder."""

    def __init__(self, job: dict, fixed_arr, ref_mask):
        self.job, self.fixed_arr, self.ref_mask = job, fixed_arr, ref_mask
        self.t0 = time.perf_counter()
        self.spec = job["spec"]
        self.sid, self.out_dir, self.stage = self.spec.id, job["out"], job["stage"]
        self.tdir = os.path.join(self.stage, TRANSFORM_DIR)
        self.identity = bool(job.get("identity"))
        self.metrics: dict = {}
        self.result = {"subject": self.sid, "status": "failed", "message": "", "metrics": self.metrics,
                       "seconds": None}

    def run(self) -> dict:
        self.ants = ants_module(self.job.get("threads"))
        remove(self.stage)
        os.makedirs(self.tdir)
        self.plan = plan_subject(self.spec)
        self.native = Grid(self.plan.shape, self.plan.affine)
        self.ref = Grid.from_dict(self.job["reference_grid"])
        self.tx = self._estimate()
        self._score_landmarks()
        t_est = time.perf_counter()
        self.mask_reg = self.warp(self.plan.mask.astype(np.float32), "nearestNeighbor") > 0.5
        self._mask_metrics()
        self._check()
        entry = self._apply_all()
        seconds = time.perf_counter() - self.t0
        self.result["timing"] = {"estimate_s": round(t_est - self.t0, 3),
                                 "apply_write_s": round(seconds - (t_est - self.t0), 3)}
        write_json(os.path.join(self.tdir, TRANSFORM_JSON), self._info(entry, seconds))
        swap_in(self.stage, os.path.join(self.out_dir, self.sid),
                token=os.path.basename(os.path.dirname(self.stage)))
        self.result.update(status="ok", entry=entry, seconds=seconds)
        return self.result

    def _estimate(self) -> dict:
        """The transform (identity for the reference subject), with similarity before/after."""
        if self.identity:
            self.metrics.update({"r_before": 1.0, "r_after": 1.0, "nmi_after": 1.0})
            return write_identity(self.ants, self.tdir)
        ants, job, m, ref, native = self.ants, self.job, self.metrics, self.ref, self.native
        moving_arr = contrast_array(self.plan, job["contrast"])
        fixed, moving = to_ants(ants, self.fixed_arr, ref.affine), to_ants(ants, moving_arr, native.affine)
        m["fov_overlap_header"] = round(overlap_fraction(native, ref), 4)
        if job["init"] == "header" and m["fov_overlap_header"] <= 0:
            raise NotConverged("no overlap: the subject's field of view does not meet the reference grid "
                               "in world coordinates (--init header trusts the headers); fix the header "
                               "or use --init com")
        region = self.ref_mask if self.ref_mask is not None else (self.fixed_arr != 0)
        if not region.any():
            region = np.ones(ref.shape, bool)
        before = np.asarray(ants.resample_image_to_target(moving, fixed, interp_type="linear").numpy())
        m["r_before"], m["nmi_before"] = (round(pearson(self.fixed_arr, before, region), 4),
                                          round(nmi(self.fixed_arr, before, region), 4))
        tx = estimate(ants, fixed, moving, job["transform"], self.tdir, metric=job["metric"],
                      preset=job["preset"], init=job["init"], seed=job.get("seed"))
        files = [os.path.join(self.tdir, f) for f in tx["forward"]["files"]]
        warped = apply(ants, moving_arr, native, ref, files, tx["forward"]["invert"], "linear")
        m["r_after"], m["nmi_after"] = (round(pearson(self.fixed_arr, warped, region), 4),
                                        round(nmi(self.fixed_arr, warped, region), 4))
        return tx

    def _score_landmarks(self) -> None:
        """TRE of the subject's landmarks before and after (when register --landmarks gave them)."""
        files = self.job.get("landmarks")
        if files:
            self.result["landmarks"] = registration_tre(landmark_pair(*files), self.tx, self.tdir)

    def warp(self, arr, interp: str = "linear"):
        if self.identity:
            return arr
        files = [os.path.join(self.tdir, f) for f in self.tx["forward"]["files"]]
        return apply(self.ants, arr, self.native, self.ref, files, self.tx["forward"]["invert"], interp)

    def _mask_metrics(self) -> None:
        m, plan = self.metrics, self.plan
        if not self.identity:
            vol_ratio = np.prod(zooms(self.ref)) / np.prod(zooms(self.native))
            m["inside_fraction"] = round(float(self.mask_reg.sum() * vol_ratio / max(1, plan.mask.sum())), 4)
        if self.ref_mask is not None:
            m["dice_after"] = round(dice(self.ref_mask, self.mask_reg), 4)
            if not self.identity:
                before_mask = np.asarray(self.ants.resample_image_to_target(
                    to_ants(self.ants, plan.mask.astype(np.float32), self.native.affine),
                    blank(self.ants, self.ref), interp_type="nearestNeighbor").numpy())
                m["dice_before"] = round(dice(self.ref_mask, before_mask), 4)

    def _check(self) -> None:
        """Convergence: the registered contrast resembles the reference, on its grid."""
        if self.identity:
            return
        m, crit = self.metrics, self.job["check"]
        value = m.get("r_after" if crit == "r" else "nmi_after", 1.0)
        value = abs(value) if crit == "r" else value
        if m["inside_fraction"] < 0.05:
            raise NotConverged(f"no overlap: the registered brain lies outside the reference grid "
                               f"(fraction inside {m['inside_fraction']:.3f})")
        if value < self.job["min_similarity"]:
            name = "|Pearson r|" if crit == "r" else "NMI"
            raise NotConverged(f"did not converge: final {name} with the reference {value:.3f} "
                               f"< --min-similarity {self.job['min_similarity']:g} "
                               f"(before registration {m.get('r_before', float('nan')):.3f})")

    def _apply_all(self) -> dict:
        """Every file of the subject on the reference grid; returns its manifest entry."""
        ext, sid = self.job.get("ext", ".nii"), self.sid
        files_out: dict = {"mri": {g.name: self._apply_group(g, ext) for g in self.spec.mri}}
        write_volume(os.path.join(self.stage, f"mask{ext}"), self.mask_reg.astype(np.uint8), self.ref.affine,
                     xform=self.xform)
        files_out["mask"] = {"path": f"{sid}/mask{ext}", "inverted": False}
        if self.plan.fa is not None:
            write_volume(os.path.join(self.stage, f"fa{ext}"), self.warp(read3(self.plan.fa)),
                         self.ref.affine, dtype=np.float32, xform=self.xform)
            files_out["fa"] = f"{sid}/fa{ext}"
        for kind, vols, interp in (("targets", self.plan.targets, "linear"),
                                   ("labels", self.plan.labels, "nearestNeighbor")):
            if vols:
                files_out[kind] = {name: self._apply_3d(kind, name, vol, interp, ext)
                                   for name, vol in vols.items()}
        entry = {"id": sid, **files_out}
        if "notes" in self.spec.extra:
            entry["notes"] = self.spec.extra["notes"]
        return entry

    @property
    def xform(self) -> str:
        """The NIfTI code of a registered file: another subject's grid, or a template's."""
        return "template" if self.job["reference"].get("kind") == "file" else "aligned"

    def _apply_group(self, g, ext: str):
        """An MRI group (4D files in blocks of volumes); gradient directions rotated."""
        vol = open_volume(g.path, what=f"subject {self.sid}: mri/{g.name}")
        n = n_volumes(vol)
        path = os.path.join(self.stage, f"mri_{g.name}{ext}")
        if n == 1:
            arr = self.warp(read3(vol))
        else:
            arr = np.empty((*self.ref.shape, n), np.float32)
            files = [os.path.join(self.tdir, f) for f in self.tx["forward"]["files"]]
            for i in range(0, n, BLOCK):
                block = np.stack([read3(vol, k) for k in range(i, min(n, i + BLOCK))], axis=-1)
                arr[..., i:i + block.shape[3]] = block if self.identity else apply4(
                    self.ants, block, self.native, self.ref, files, self.tx["forward"]["invert"], "linear")
        write_volume(path, arr, self.ref.affine, dtype=np.float32, xform=self.xform)
        del arr
        side = read_sidecars(g.path)
        if side is not None:
            lin = linear_part(os.path.join(self.tdir, self.tx["linear"]))
            bvecs = side[1] if self.identity else rotate_bvecs(side[1], lin, self.native.affine, self.ref.affine)
            write_sidecars(path, side[0], bvecs)
        entry = rel(path.replace(self.stage, os.path.join(self.out_dir, self.sid)), self.out_dir)
        return {"path": entry, "channels": g.channels} if g.channels else entry

    def _apply_3d(self, kind: str, name: str, vol, interp: str, ext: str) -> str:
        a = self.warp(read3(vol), interp)
        fname = f"{kind[:-1]}_{name}{ext}"
        write_volume(os.path.join(self.stage, fname), (a > 0.5).astype(np.uint8) if kind == "labels"
                     else a.astype(np.float32), self.ref.affine, xform=self.xform)
        return f"{self.sid}/{fname}"

    def _info(self, entry: dict, seconds: float) -> dict:
        job, tx = self.job, self.tx
        return {
            "format": FORMAT, "format_version": 1, "subject": self.sid,
            "transform": job["transform"], "contrast": job["contrast"], "metric": job["metric"],
            "preset": job["preset"], "init": job["init"], "identity": self.identity,
            "reference": job["reference"], "reference_grid": self.ref.to_dict(),
            "native_grid": self.native.to_dict(),
            "forward": tx["forward"], "inverse": tx["inverse"], "linear": tx["linear"],
            "directions": "forward: native -> reference (apply with fixed = reference grid); "
                          "inverse: reference -> native. ITK convention: the files map reference "
                          "points to native points.",
            "metrics": self.metrics, "landmarks": self.result.get("landmarks"), "seconds": round(seconds, 3),
            "timing": self.result["timing"],
            "manifest_entry": entry, "sources": self.spec.files(),
            "provenance": {"mrhscale_version": __version__,
                           "antspyx_version": getattr(self.ants, "__version__", "?"),
                           "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                           "manifest": job.get("manifest"), "seed": job.get("seed"),
                           "preset_parameters": {k: list(v) for k, v in PRESETS[job["preset"]].items()}},
        }
