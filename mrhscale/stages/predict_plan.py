"""What one predict run is before any work: the bundle checked and named, the maps it
writes and their attrs, its numerics, and the records that say what made each output
(shared by ``predict`` and ``predict_volume``).

Numerics take one round trip to the workers at most. Where they are this machine's (an
embedded cluster, a local scheduler) the request is planned here, and the workers
(only if there is work, and only to compile) load the network and report fall-backs;
on a cluster joined or given, each worker plans for its own hardware while it loads,
and the driver takes their common plan (eager fp32 on all where they differ).
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Mapping

import dask
import numpy as np

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.io.bundle import load_model
from mrhscale.io.exported import exported_meta, load_export
from mrhscale.log import logger
from mrhscale.nn.accel import Acceleration, plan, request
from mrhscale.nn.worker import NetworkSpec, check_device, prepare
from mrhscale.ops.norm import subject_stats_graph
from mrhscale.ops.ood import VARIABLE as OOD_VARIABLE
from mrhscale.ops.stains import target_name
from mrhscale.ops.uncertainty import calibration_factors
from mrhscale.options import AGGREGATES, PredictOptions
from mrhscale.stages.predict_graph import PLANE_BYTES, SPATIAL, check_channels, subject_arrays
from mrhscale.stores import resolve, sha256_file
from mrhscale.stores.legacy import calibration_of, stains_of


class PredictPlan:
    """One predict run's model, options and records; ``spec`` is the network its tasks run."""

    def __init__(self, model_path, options: PredictOptions, device: str = "cpu"):
        if options.aggregate not in AGGREGATES:
            raise MRHError(f"--aggregate {options.aggregate}: expected one of {', '.join(AGGREGATES)}")
        if int(options.batch_size) < 1:
            raise MRHError(f"--batch-size must be >= 1, got {options.batch_size}")
        self.request = request(options.numerics)
        self.device, self.aggregate, self.tta = device, options.aggregate, bool(options.tta)
        self.batch_size, self.threads = int(options.batch_size), options.torch_threads
        self.model_path = resolve(model_path, "model")
        self.meta = exported_meta(self.model_path)  # an ONNX export, run as it is (io/exported.py)
        self.load = load_model if self.meta is None else load_export
        if self.meta is None:
            _, self.meta = load_model(self.model_path)  # validates the bundle; workers load their own copy
        elif self.tta and int(self.meta.get("members", 1)) > 1:
            raise MRHError(f"{self.model_path}: --tta with an exported ensemble: its graph pools the members' "
                           "spread before any symmetry could be averaged; predict with the bundle for TTA")
        self.stains = stains_of(self.meta)
        self.target = target_name(self.stains)  # their label, as records name them
        self.members = int(self.meta.get("members", 1))
        self.virtuals = [f"{t}_virtual" for t in self.stains]
        self.uncertainties = [f"{t}_uncertainty" for t in self.stains] if self.members > 1 else []
        self.variable = ",".join(self.virtuals)  # the one map, or the list (as target)
        self.uncertainty = ",".join(self.uncertainties) or None
        self.ood = OOD_VARIABLE if self.meta.get("ood") else None  # the bundle's score (an export has none)
        self.model_rec = model_record(self.model_path, self.meta)
        self.params = {"aggregate": self.aggregate, "batch_size": self.batch_size, "device": self.device,
                       "tta": self.tta}
        self.accel, self.prepared = Acceleration(why="not resolved"), False
        self.plane_bytes = PLANE_BYTES  # a whole-plane block's input at most (planes_prediction)

    @property
    def spec(self) -> NetworkSpec:
        spec = NetworkSpec(self.model_path, self.load, self.device, self.threads, self.batch_size)
        return spec.planned(self.accel)

    @property
    def variables(self) -> list[str]:
        """The maps a subject gets: the virtual stain(s), an ensemble's uncertainty of each, the
        out-of-distribution score."""
        return [*self.virtuals, *self.uncertainties, *([self.ood] if self.ood else [])]

    def use_threads(self, runner, ctx) -> None:
        """Torch threads per task: the option, else on a cluster not joined by address (an
        embedded one, a client given or active) the cores each task thread gets (its tasks run
        side by side: 2 tasks of 2 torch threads each on 2 cores spin against each other)."""
        if self.threads is None and runner is not None and runner.client is not None and ctx.scheduler is None:
            self.threads = max(1, (os.cpu_count() or 1) // runner.n_threads())
        self.plane_bytes = plane_budget(runner)

    # ---- numerics
    def plan_numerics(self, runner, work: int) -> None:
        """The numerics of ``work`` brain voxels: planned here (``runner`` None: an embedded
        cluster not started yet, or a local scheduler), or by the workers of a cluster while
        they load the network (the one round trip)."""
        patches = work * (8 if self.tta else 1)
        if self.meta.get("exported"):  # onnxruntime runs the file as exported: fp32, nothing to compile
            self._use(Acceleration(why="an ONNX export: onnxruntime, fp32, on the CPU"))
        elif runner is None or runner.client is None:
            self._use(plan(self.request, self.device, patches))
        else:
            self._merge(runner.on_workers(prepare, self.spec, self.request, patches, self.strict))
            self.prepared = True
        logger.info(f"mrhscale predict: {self.accel.label} ({self.accel.why})")

    def prepare_workers(self, runner) -> None:
        """Load and compile the planned network on every worker now, outside the first
        block's task; where compiling fails on any of them, every worker runs eager."""
        if self.prepared or self.accel.eager_fp32 or runner.scheduler_name == "processes":
            return
        self._fall_backs(runner.on_workers(prepare, self.spec, None, 0, self.strict))
        self.prepared = True

    @property
    def strict(self) -> bool:
        return self.request.compile == "on"

    def _merge(self, got: dict) -> None:
        bad = [w for w, r in got.items() if not r["device"]]
        if bad:
            raise MRHError(f"--device {self.device}: no CUDA GPU on worker(s) {', '.join(bad)}; use --device cpu")
        modes = {(r["planned"]["precision"], r["planned"]["compile"]) for r in got.values()}
        if len(modes) > 1:
            self._use(Acceleration(why=f"workers differ ({sorted(modes)}): eager fp32 on all"))
            logger.warning(f"mrhscale: {self.accel.why}")
            return
        self._use(Acceleration(**next(iter(got.values()))["planned"]))
        self._fall_backs(got)

    def _fall_backs(self, got: dict) -> None:
        used = [r["used"] for r in got.values()]
        if any(u["compile"] != self.accel.compile for u in used):
            self._use(self.accel.without_compile(next(u["why"] for u in used if not u["compile"])))

    def _use(self, accel: Acceleration) -> None:
        self.accel = accel
        self.params["numerics"] = accel.record()

    def normalisation(self, ds, runner):
        """The bundle's normalisation made concrete for subject ``ds`` (``normalisations``)."""
        return self.normalisations({"": ds}, runner)[""]

    def normalisations(self, datasets: dict, runner) -> dict:
        """The bundle's normalisation made concrete for each subject of ``datasets``: a per-subject
        mode takes each brain's own statistics inside its mask, as at training, all of them in
        one call on ``runner`` (one round trip, not one per subject)."""
        norm = self.meta["norm"]
        if not norm.per_subject:
            return dict.fromkeys(datasets, norm)
        channels = list(self.meta["channels"])
        graphs = [subject_stats_graph(*subject_arrays(ds, channels)) for ds in datasets.values()]
        stats = runner.compute(graphs, "statistics", quiet=True)
        return {sid: norm.for_subject(st) for sid, st in zip(datasets, stats, strict=True)}

    # ---- records
    def identity(self) -> dict:
        return {"target": self.target, "variable": self.variable, "aggregate": self.aggregate,
                "model_sha256": self.model_rec["sha256"]}

    def root_attrs(self) -> dict:
        return jsonable({"target": self.target, "variable": self.variable, "model": self.model_rec,
                         "stains": self.stains,
                         **({"uncertainty": self.uncertainty} if self.uncertainty else {}),
                         "aggregate": self.aggregate,
                         "provenance": {"stage": "predict", "mrhscale": __version__, **self.params}})

    def made_by(self, fingerprint: str) -> dict:
        """What made a subject predicted from the input subject of ``fingerprint``."""
        made = {"stage": "predict", "model_sha256": self.model_rec["sha256"], "target": self.target,
                "aggregate": self.aggregate, "source": fingerprint}
        if not self.accel.eager_fp32:  # eager fp32 keeps the fingerprints of earlier versions
            made["numerics"] = self.accel.label
        if self.tta:  # absent without TTA, so earlier fingerprints still hold
            made["tta"] = True
        return made

    def lineage(self, source_url: str, sid: str, identity: dict, norm) -> dict:
        """The lineage of subject ``sid`` of the store at ``source_url`` (``identity``: its record there)."""
        return jsonable({
            "stage": "predict", "mrhscale": __version__, "model": self.model_rec,
            "source": {"store": source_url, "subject": sid, **identity}, **self.params,
            **({"subject_norm": norm.meta["subject"]} if "subject" in norm.meta else {})})

    def map_attrs(self, k: int, attrs: dict | None = None) -> dict:
        """The attrs of stain ``k``'s virtual map (``attrs``: more of them)."""
        return {**(attrs or {}), "units": "raw stain units", "target": self.stains[k], "kind": "virtual histology"}

    def uncertainty_attrs(self, k: int = 0) -> dict:
        """The attrs of stain ``k``'s uncertainty map."""
        cal = calibration_of(self.meta, self.stains).get(self.stains[k], {})
        return jsonable({
            "units": "raw stain units", "target": self.stains[k], "kind": "uncertainty",
            "estimator": f"deep ensemble of {self.members} networks: their standard deviation "
                         "(ddof 1) pooled over each voxel's output patch, times the calibration factor"
                         + (f" and the out-of-distribution score to the power {cal['ood_power']:g}"
                            if cal.get("ood_power") else ""),
            "calibration_factor": float(calibration_factors(self.meta, len(self.stains))[k]),
            "calibrated_on": cal.get("fitted_on"),
            "interval": f"{self.virtuals[k]} +- 1.96 x {self.uncertainties[k]}: the 95% interval"})

    def ood_attrs(self) -> dict:
        """The attrs of the out-of-distribution score's map."""
        rec = self.meta["ood"]
        return jsonable({"units": "1 = a typical training voxel", "kind": "out-of-distribution score",
                         "method": rec.get("method"), "training_quantiles": rec.get("training_quantiles"),
                         "flag": f"above {rec['training_quantiles'].get('99', 'nan'):.3g} (the training patches' "
                                 "99th percentile): MRI unlike the training brains"})

    # ---- inputs
    def inputs(self, source, subjects) -> SubjectInputs:
        """The subjects to predict (all complete ones by default), channels checked on each."""
        available = source.subjects()
        if not available:
            raise MRHError(f"{source.name}: store holds no complete subject")
        ids = list(dict.fromkeys(subjects)) if subjects else available
        have = set(available)
        missing = [s for s in ids if s not in have]
        if missing:
            raise MRHError(f"{source.name}: subject(s) not in store: {', '.join(missing)} "
                           f"(complete subjects: {', '.join(available)})")
        inputs = SubjectInputs(source, ids)
        for sid in ids:
            check_channels(list(self.meta["channels"]), inputs.records[sid]["channels"],
                           f"{source.name}: subject {sid!r}")
        return inputs


class SubjectInputs(Mapping):
    """The subjects to predict, {id: lazy Dataset}: each subject's small record (identity, grid
    size, brain voxels, channels) read once here, its Dataset opened only when asked for and
    not kept, so the driver holds a group's datasets, not the cohort's (~130 KB a subject)."""

    def __init__(self, source, ids, records: dict | None = None):
        self.source, self.ids = source, list(ids)
        self.records = records if records is not None else {sid: self._record(sid) for sid in self.ids}

    def __getitem__(self, sid: str):
        if sid not in self.records:
            raise KeyError(sid)
        return self.source.open_subject(sid)

    def __iter__(self):
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, ids) -> SubjectInputs:
        return SubjectInputs(self.source, ids, {sid: self.records[sid] for sid in ids})

    def identity(self, sid: str) -> dict:
        return self.records[sid]["identity"]

    def attrs_only(self) -> dict:
        """{id: an object with the subject's ``attrs``}, read now, no Dataset opened: what a sink
        that needs the records (the BIDS one) takes instead of the datasets."""
        return {sid: types.SimpleNamespace(attrs=self.source.subject_attrs(sid)) for sid in self.ids}

    def voxels(self) -> dict[str, int]:
        """Each subject's grid voxels (what ``subject_groups`` weighs)."""
        return {sid: self.records[sid]["voxels"] for sid in self.ids}

    def brain_voxels(self) -> int:
        """Their brain voxels: as ingest recorded them, the others' masks counted."""
        known = sum(self.records[sid]["brain_voxels"] for sid in self.ids)
        return known + brain_voxels(self[sid] for sid in self.ids if not self.records[sid]["brain_voxels"])

    def _record(self, sid: str) -> dict:
        """What the plan needs of subject ``sid``, from its attrs (one read); a store that does
        not record its grid or channels there has its Dataset opened for them."""
        attrs = self.source.subject_attrs(sid)
        shape, channels = attrs.get("shape"), (attrs.get("made_by") or {}).get("channels")
        if shape is None or channels is None:
            ds = self.source.open_subject(sid)
            shape, channels = [ds.sizes[a] for a in SPATIAL], [str(c) for c in ds["contrast"].values]
        return {"identity": self.source.identity(sid, attrs), "voxels": math.prod(int(n) for n in shape),
                "brain_voxels": int(attrs.get("brain_voxels") or 0), "channels": [str(c) for c in channels]}


def checked_device(ctx) -> str:
    """The context's device, checked here where this machine's GPUs are the workers' (an
    embedded cluster, a local scheduler); on a cluster joined, each worker checks its own."""
    device = str(ctx.device)
    if ctx.scheduler is None or ctx.local:
        return check_device(device)
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        raise MRHError(f"--device {device}: expected cpu, cuda or cuda:N")
    return device


def brain_voxels(datasets) -> int:
    """Brain voxels of subjects: ingest records them, else their masks are counted (in one pass)."""
    datasets = list(datasets)
    recorded = [int(ds.attrs.get("brain_voxels") or 0) for ds in datasets]
    counted = dask.compute(*[ds["mask"].data.sum() for ds, n in zip(datasets, recorded) if not n])
    return sum(recorded) + sum(int(c) for c in counted)


def model_record(model_path: str, meta: dict) -> dict:
    return {"path": model_path, "sha256": sha256_file(model_path), "target": str(meta["target"]),
            "arch": jsonable(meta.get("arch")), "channels": list(meta["channels"]),
            "patch": jsonable(meta.get("patch")), "norm_mode": meta["norm"].mode,
            "provenance": jsonable(meta.get("provenance", {})),
            **({"members": int(meta["members"]), "uncertainty": jsonable(meta.get("uncertainty") or {})}
               if int(meta.get("members", 1)) > 1 else {})}


def jsonable(v):
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def plane_budget(runner) -> int:
    """The input bytes a whole-plane block may hold on ``runner``: ``PLANE_BYTES``, or less
    where a worker's memory limit per task thread would not hold four of them (a task holds
    this block and the next; the network's batches and the outputs beside them)."""
    limits = runner.thread_memory_limits() if runner is not None else []
    return min([PLANE_BYTES] + [b // 4 for b in limits if b > 0])
