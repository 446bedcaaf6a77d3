"""The whole chain on a synthetic cohort, on the embedded LocalCluster.

synth -> ingest -> patches -> train (a deep ensemble of depth-5 nets, each learning
mbp and nf with one head per stain) -> predict a
held-out subject with its uncertainty -> evaluate (vs every single MRI marker, lesion
ROC, whether the uncertainty flags the errors and the artefact) -> importance -> report.html.
Each stage's output stays in ``out`` so a user can open every store and rerun
any stage by hand; a rerun resumes (finished stages are reused).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass

from mrhscale.errors import MRHError
from mrhscale.log import note
from mrhscale.nn.accel import ENV_COMPILE
from mrhscale.ops.stains import parse_stains
from mrhscale.options import (
    DEMO_FAST_BUDGET,
    DemoOptions,
    PatchOptions,
    PredictOptions,
    SynthVariation,
)
from mrhscale.parallel.context import Context
from mrhscale.report.html import write_report
from mrhscale.report.tables import importance_tables, uncertainty_tables
from mrhscale.results import DemoResult
from mrhscale.stages.calibrate import calibrate
from mrhscale.stages.evaluate import evaluate
from mrhscale.stages.importance import importance
from mrhscale.stages.ingest import ingest
from mrhscale.stages.patches import extract_patches
from mrhscale.stages.predict import predict
from mrhscale.stores import Folder, list_subjects, sha256_file, write_json
from mrhscale.synth.phantom import make_cohort
from mrhscale.training import train
from mrhscale.training.config import RECIPES, run_started

DEMO = DemoOptions()  # the options table states each default once


@dataclass
class DemoConfig:
    """The demo's sizes and recipe; epochs / batch_size None = the demo's budget with the fast
    recipe (``DEMO_FAST_BUDGET``), another recipe's own values."""

    subjects: int = DEMO.n_subjects
    shape: tuple[int, int, int] = DEMO.shape
    target: str = DEMO.target  # one network, a head per stain; the first stain is the headline
    stride: int = 1  # dense: lesions are small and rare, the network must see them
    depth: int = DEMO.depth
    recipe: str = DEMO.recipe  # on its budget: ~1 min per network on 2 CPU cores, same conclusions as "paper"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    # enough for a stable group ranking (the groups differ by far more than their spread)
    importance_patches: int = 1000
    importance_repeats: int = 2
    # the held-out brain on its own scanner (synth/scanner.py): transfer, not a same-scanner retest;
    # the validation brain (what the ensemble's uncertainty is calibrated on) on a third one, so
    # the calibration sees what a new scanner does to the errors (docs/uncertainty.md)
    scanner_variation: bool = True
    # ... with a field-of-view artefact (synth/artefact.py): something its uncertainty must flag
    artefact: bool = True
    members: int = DEMO.members  # a deep ensemble: the virtual stain is their mean, the uncertainty their spread
    # the uncertainty calibrated on the whole validation brain, a factor per bin of the predicted
    # value; no aleatoric head (it ranks the errors a little better but, learnt on the training
    # scanner, narrows the held-out brain's intervals: docs/uncertainty.md, "Issue 31")
    aleatoric: bool = False
    calibration_groups: str = "value:4"
    # brains beside the validation one that the uncertainty is calibrated on (after the held-out
    # one, s06.., each on its own scanner, never trained on): a new scanner's shift differs from
    # brain to brain, and one calibration brain cannot say how much (docs/uncertainty.md)
    calibration_brains: int = 3

    def __post_init__(self):
        budget = DEMO_FAST_BUDGET if self.recipe == "fast" else {}
        self.epochs = self.epochs or budget.get("epochs")
        self.batch_size = self.batch_size or budget.get("batch_size")


QUICK = DemoConfig(subjects=3, shape=(24, 16, 32), stride=2, depth=2, epochs=2, batch_size=128,
                   importance_patches=500, importance_repeats=1, members=2, calibration_brains=0)


def run_demo(out: str, cfg: DemoConfig | None = None, *, quick: bool = False,
             ctx: Context | None = None) -> DemoResult:
    """Run the chain into ``out``; returns a summary with the report path and headline numbers.
    ``ctx``: where every stage runs (an embedded LocalCluster by default), quiet."""
    cfg = cfg or (QUICK if quick else DemoConfig())
    if cfg.subjects < 3:
        raise MRHError("demo: needs at least 3 subjects (training, validation, held-out)")
    bad = [t for t in parse_stains(cfg.target) if t not in ("af", "nf", "mbp")]
    if bad:
        raise MRHError(f"--target: synth makes af, nf and mbp, not {', '.join(bad)}")
    if cfg.recipe not in RECIPES:  # before minutes of synth/ingest, not after
        raise MRHError(f"--recipe {cfg.recipe!r}: choose one of {', '.join(RECIPES)}")
    demo = _Demo(_demo_folder(out, cfg), cfg, ctx or Context())
    demo.synth()
    demo.ingest_and_patches()
    demo.train()
    demo.predict()
    metrics = demo.evaluate()
    imp = demo.importance()
    return demo.report(metrics, imp)


class _Demo:
    """The stages of the demo, each timed; every output stays in the demo folder."""

    PATHS = {"files": "cohort", "store": "cohort.zarr", "patches": "patches.zarr", "run": "run",
             "pred": "pred.zarr", "nifti": "nifti", "eval": "evaluation", "imp": "importance"}

    def __init__(self, out: str, cfg: DemoConfig, ctx: Context):
        self.out, self.cfg, self.ctx, self.quiet = out, cfg, ctx, ctx.quiet
        self.p = {k: os.path.join(out, v) for k, v in self.PATHS.items()}
        self.times: dict[str, float] = {}
        ids = [f"s{i + 1:02d}" for i in range(cfg.subjects)]
        # the last odd-numbered subject has a lesion in synth: hold it out for testing
        self.test_id = ids[-1] if cfg.subjects % 2 == 1 else ids[-2]
        self.train_ids = [s for s in ids if s != self.test_id]
        self.val_id = self.train_ids[-1]
        extra = [f"s{cfg.subjects + i + 1:02d}" for i in range(cfg.calibration_brains if cfg.members > 1 else 0)]
        self.calibration_ids = [self.val_id, *extra]
        self.manifest = os.path.join(self.p["files"], "cohort.yaml")
        self.model = os.path.join(self.p["run"], "model.pt")

    @contextlib.contextmanager
    def stage(self, key: str, what: str):
        note(f"[demo] {what} ...", self.quiet)
        t = time.perf_counter()
        yield
        self.times[key] = time.perf_counter() - t

    def synth(self) -> None:
        cfg = self.cfg
        scanners = [self.val_id, self.test_id, *self.calibration_ids[1:]]
        variation = SynthVariation(scanner_variation=scanners if cfg.scanner_variation else None,
                                   artefact=[self.test_id] if cfg.artefact else None)
        with self.stage("synth", "synth: phantom cohort"):
            if not os.path.exists(self.manifest):
                make_cohort(self.p["files"], n_subjects=cfg.subjects + len(self.calibration_ids) - 1, shape=tuple(cfg.shape), seed=cfg.seed,
                            fmt="nii.gz", variation=variation, quiet=self.quiet)

    def ingest_and_patches(self) -> None:
        cfg, p = self.cfg, self.p
        with self.ctx.runner() as runner:  # one cluster for both stages
            with self.stage("ingest", "ingest: files -> cohort.zarr (Dask)"):
                ingest(self.manifest, p["store"], chunks=(32, 16, 32), ctx=runner.context)
            with self.stage("patches", f"patches: {cfg.target} training samples (train "
                                       f"{', '.join(self.train_ids[:-1])}; val {self.val_id})"):
                # an identical store from an earlier run is reused as it is
                extract_patches(p["store"], cfg.target, p["patches"], subjects=self.train_ids, ctx=runner.context,
                                options=PatchOptions(stride=cfg.stride, val_subjects=[self.val_id], seed=cfg.seed))

    def train(self) -> None:
        cfg = self.cfg
        epochs = cfg.epochs or RECIPES.get(cfg.recipe, {}).get("epochs")
        nets = f"{cfg.members} MRH-Nets" if cfg.members > 1 else "MRH-Net"
        with self.stage("train", f"train: {nets} depth {cfg.depth}, recipe {cfg.recipe} "
                                 f"({epochs} epochs) on the CPU"):
            if not os.path.exists(self.model):
                kw = dict(recipe=cfg.recipe, depth=cfg.depth, epochs=cfg.epochs, batch_size=cfg.batch_size,
                          lr=cfg.lr, seed=cfg.seed, quiet=self.quiet, members=cfg.members,
                          aleatoric=cfg.aleatoric,
                          # eager unless $MRHSCALE_COMPILE asks: a compile (and the probe that weighs it,
                          # ~1 min cold on 2 cores) costs more than it saves on a network this short
                          compile=None if os.environ.get(ENV_COMPILE) else "off")
                resume = run_started(self.p["run"])
                train(self.p["patches"], self.p["run"], resume=resume, **kw)
                if cfg.members > 1:  # on the whole calibration brains, their voxels grouped as asked
                    calibrate(self.model, self.calibration_ids, groups=cfg.calibration_groups,
                              cohort=self.p["store"], ctx=self.ctx.but(quiet=True))

    def predict(self) -> None:
        with self.stage("predict", f"predict: held-out subject {self.test_id}"):
            predict(self.model, self.p["store"], self.p["pred"], nifti_dir=self.p["nifti"],
                    subjects=[self.test_id], overwrite=True, options=PredictOptions(), ctx=self.ctx)

    def evaluate(self) -> dict:
        """Every stain against its reference (``evaluation/<stain>``); returns the headline
        (first) stain's metrics, every stain's in ``by_stain``."""
        with self.stage("evaluate", "evaluate: virtual stains vs reference and single MRI markers"):
            # lesion ROC within white matter: a demyelination against the normal tissue it occurs in
            self.by_stain = evaluate(self.p["pred"], self.p["store"], self.p["eval"], subjects=[self.test_id],
                                     roi="wm", ctx=self.ctx).by_stain
        return self.by_stain[parse_stains(self.cfg.target)[0]]

    def importance(self) -> dict:
        with self.stage("importance", "importance: contrast groups by permutation"):
            imp = _importance_of(self.p["imp"], self.model)
            if imp is None:
                imp = importance(self.model, self.p["patches"], self.p["imp"], max_patches=self.cfg.importance_patches,
                                 repeats=self.cfg.importance_repeats, ctx=self.ctx)
        return imp

    def report(self, metrics: dict, imp: dict) -> DemoResult:
        summary = _headline(metrics, self.test_id, self.cfg)
        lines = {t: _stain_line(m, self.test_id) for t, m in self.by_stain.items()}
        summary["other_stains"] = {t: line for t, line in lines.items() if t != summary["stain"]}
        summary["every_stain"] = lines
        summary.update({
            "held_out": self.test_id, "train_subjects": self.train_ids[:-1], "val_subject": self.val_id,
            "calibration_subjects": self.calibration_ids if self.cfg.members > 1 else [],
            "stage_seconds": {k: round(v, 1) for k, v in self.times.items()},
            "config": asdict(self.cfg), "paths": self.p,
            "subjects_in_store": list_subjects(self.ctx.location(self.p["store"])),
        })
        summary["report"] = write_report(self.out, _tables(summary, metrics, imp, self.p),
                                         self._figures(metrics, imp),
                                         f"mrhscale demo: virtual {self.cfg.target.replace(',', ' and ')} on a synthetic cohort")
        write_json(os.path.join(self.out, "summary.json"), summary)
        return DemoResult(**summary)

    def _figures(self, metrics: dict, imp: dict) -> list:
        p = self.p
        figures = [(os.path.join(metrics["out_dir"], f), c) for f, c in metrics.get("figure_captions", {}).items()]
        figures += _figures_of(imp, p["imp"])
        curve = os.path.join(p["run"], "curve.png")
        if os.path.exists(curve):
            figures.insert(0, (curve, "training and validation loss per epoch"))
        return figures


def _tables(summary: dict, metrics: dict, imp: dict, paths: dict) -> dict:
    headline = ("virtual_pearson", "best_marker", "best_marker_pearson", "virtual_auc", "best_marker_auc",
                "beats_every_marker", *UNCERTAINTY_HEADLINE)
    tables = {
        "Headline": {k: v for k, v in summary.items() if k in headline},
        "Pooled similarity to the reference stain (held-out subject)": {
            n: {c: m.get(c) for c in ("pearson", "spearman", "mae", "psnr", "ssim")}
            for n, m in metrics["pooled"].items() if n != "roc"},
    }
    tables["Every stain of the network (held-out subject)"] = summary["every_stain"]
    if "roc" in metrics["pooled"]:
        tables["Lesion detection (AUC)"] = {n: {"AUC": r.get("auc"), "direction": r.get("direction")}
                                            for n, r in metrics["pooled"]["roc"].items()}
    if metrics.get("uncertainty"):
        tables.update(uncertainty_tables(metrics["uncertainty"], metrics["per_subject"]))
    tables.update({k: v for k, v in importance_tables(imp).items() if not k.startswith("Setup")})
    tables["Stage wall times (s)"] = summary["stage_seconds"]
    tables["Where things are"] = paths
    return tables


def _demo_folder(out: str, cfg: DemoConfig) -> str:
    """The demo's workspace: ours, and made with this configuration (else its stages are stale)."""
    folder = Folder(out, "mrhscale-demo")
    if folder.check() and folder.info().get("config") not in (None, _plain(asdict(cfg))):
        raise MRHError(f"--out {folder.path}: holds a demo run with another configuration (other options, "
                       "or an older mrhscale); its stages would be stale: choose another --out, or delete "
                       "that folder (mrhscale's own demo output) and run again")
    folder.mark(config=_plain(asdict(cfg)))
    return folder.path


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))


def _importance_of(folder: str, model: str) -> dict | None:
    """An earlier importance result of this very model (by checksum), else None."""
    try:
        with open(os.path.join(folder, "importance.json")) as fh:
            imp = json.load(fh)
    except (OSError, ValueError):
        return None
    return imp if imp.get("provenance", {}).get("model_sha256") == sha256_file(model) else None


def _figures_of(res, folder) -> list:
    out = []
    if isinstance(res, dict):
        for f in res.get("figures", []) or []:
            path = f if os.path.isabs(str(f)) else os.path.join(folder, str(f))
            if os.path.exists(path):
                out.append((path, "permutation importance"))
    if not out and os.path.isdir(folder):
        out = [(os.path.join(folder, f), "permutation importance") for f in sorted(os.listdir(folder)) if f.endswith(".png")]
    return out


def _headline(metrics: dict, test_id: str, cfg: DemoConfig) -> dict:
    pooled = {k: v for k, v in metrics["pooled"].items() if k != "roc"}
    virtual = pooled.get("virtual", {})
    markers = {k: v for k, v in pooled.items() if k != "virtual"}
    best = max(markers, key=lambda k: abs(markers[k].get("pearson") or 0), default=None)
    out = {
        "target": cfg.target,
        "stain": parse_stains(cfg.target)[0],
        "virtual_pearson": virtual.get("pearson"),
        "best_marker": best,
        "best_marker_pearson": markers[best].get("pearson") if best else None,
    }
    beats = all(abs(virtual.get("pearson") or 0) > abs(m.get("pearson") or 0) for m in markers.values())
    roc = metrics["pooled"].get("roc")
    if roc:
        m_auc = {k: r.get("auc") for k, r in roc.items() if k != "virtual"}
        best_auc = max(m_auc, key=lambda k: m_auc[k] or 0, default=None)
        out["virtual_auc"] = roc.get("virtual", {}).get("auc")
        out["best_marker_auc"] = f"{best_auc}: {m_auc[best_auc]:.3f}" if best_auc else None
        beats = beats and all((out["virtual_auc"] or 0) > (a or 0) for a in m_auc.values())
    out["beats_every_marker"] = bool(beats)
    out.update(_uncertainty_headline(metrics, test_id))
    ood = ((metrics.get("ood") or {}).get("pooled") or {}).get("by_label", {}).get("artefact") or {}
    out["artefact_ood_ratio"] = ood.get("ratio")  # the out-of-distribution map's flag of the artefact
    return out


def _stain_line(metrics: dict, test_id: str) -> dict:
    """A stain of the network on the held-out brain: its map and uncertainty figures."""
    v = metrics["pooled"].get("virtual", {})
    return {"pearson": v.get("pearson"), "spearman": v.get("spearman"), "mae": v.get("mae"),
            **{k: u for k, u in _uncertainty_headline(metrics, test_id).items()
               if k in ("uncertainty_spearman", "uncertainty_coverage_95", "artefact_uncertainty_ratio")}}


UNCERTAINTY_HEADLINE = ("uncertainty_spearman", "uncertainty_coverage_95", "uncertainty_retention_area",
                        "error_random_order_area", "artefact_uncertainty_ratio")


def _uncertainty_headline(metrics: dict, test_id: str) -> dict:
    """Does the held-out map say how sure it is: ranks errors, covers them, flags the artefact."""
    u = (metrics.get("uncertainty") or {}).get("pooled")
    if not u:
        return {}
    by_label = (metrics["per_subject"].get(test_id, {}).get("uncertainty") or {}).get("by_label", {})
    return dict(zip(UNCERTAINTY_HEADLINE, (
        u["spearman_abs_error"], u["coverage_95"], u["retention"]["area"], u["retention"]["random_area"],
        (by_label.get("artefact") or {}).get("ratio")), strict=True))
