"""predict's maps as a BIDS derivatives folder (``--bids-derivatives``; the names: io/bids.py).

Asked for with a folder, or by default when every predicted subject was ingested from a
manifest that ``mrhscale manifest --bids`` made: then ``<dataset>/derivatives/mrhscale``,
where BIDS tools look. The folder is checked before any prediction (ours, empty or absent;
anything else refused), claimed while written, built aside and swapped in when new; a map
is rewritten only when its NIfTI does not hold this prediction (its header's descrip).
"""

from __future__ import annotations

import logging
import os

import yaml

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.io import bids
from mrhscale.io.manifest import SAFE_LOADER
from mrhscale.io.volumes import mrhscale_descrip
from mrhscale.stages.predict_graph import SPATIAL
from mrhscale.stages.predict_plan import jsonable
from mrhscale.stages.predict_sinks import nifti_tag, write_nifti
from mrhscale.stores import write_json, write_text
from mrhscale.stores.folders import DESCRIPTION, DerivativesFolder

logger = logging.getLogger("mrhscale")
DEFAULT_SUBDIR = os.path.join("derivatives", "mrhscale")
_MODEL_KEYS = ("path", "sha256", "target", "channels", "norm_mode", "members")


def bids_sink(option, store_ids: list[str], datasets: dict) -> BidsSink | None:
    """The sink ``option`` asks for: a folder (str), the BIDS dataset's own derivatives (True),
    none (False), or (None) the dataset's when the subjects were ingested from one."""
    if option is False:
        return None
    roots = bids_roots(datasets)
    if isinstance(option, str | os.PathLike):
        return BidsSink(option, store_ids, datasets, roots)
    found = set(roots.values())
    if len(found) == 1 and None not in found:
        return BidsSink(os.path.join(found.pop(), DEFAULT_SUBDIR), store_ids, datasets, roots)
    if option is True:
        raise MRHError("--bids-derivatives: the subjects were not all ingested from one BIDS dataset "
                       "(mrhscale manifest --bids); give the folder: --bids-derivatives DIR")
    if found - {None}:
        logger.warning("predict: subjects from several BIDS datasets, or some from none: no BIDS derivatives "
                       "written (give --bids-derivatives DIR)")
    return None


def bids_roots(datasets: dict) -> dict[str, str | None]:
    """sid -> the BIDS dataset the cohort subject was ingested from (None: not from one):
    recorded by ingest, or (stores ingested before it recorded it) the ``generated_by`` of
    its manifest, when still there (each manifest read once)."""
    manifests: dict[str, str | None] = {}
    out = {}
    for sid, ds in datasets.items():
        man = ds.attrs.get("manifest")
        if "bids_root" in ds.attrs or not man:  # recorded (None: not from BIDS): no manifest to read
            out[sid] = ds.attrs.get("bids_root") or None
            continue
        if man not in manifests:
            manifests[man] = _manifest_bids_root(man)
        out[sid] = manifests[man]
    return out


def _manifest_bids_root(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:  # a manifest moved or gone: no dataset known
            made = (yaml.load(fh, Loader=SAFE_LOADER) or {}).get("generated_by") or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return None
    return made.get("source") if isinstance(made, dict) and made.get("bids") else None


class BidsSink:
    """Every predicted map of the run's subjects, with its sidecar, in one derivatives folder."""

    def __init__(self, path, store_ids: list[str], datasets: dict, roots: dict):
        self.folder = DerivativesFolder(path)
        self.path = self.folder.path
        recorded = bids.read_participants(os.path.join(self.path, "participants.tsv"))
        self.labels = bids.subject_labels(store_ids, recorded)
        self.sources = {sid: subject_sources(ds.attrs, roots[sid]) for sid, ds in datasets.items()}

    def write(self, pstore, ids: list[str], plan, source_url: str) -> list[str]:
        """The folder's own files and every map of ``ids`` not already there; the paths written."""
        with self.folder.writing() as into:
            self.links, self.stores = self._links(), {"prediction_store": pstore.url, "cohort_store": source_url}
            self._write_top(into)
            written = [p for sid in ids for p in self._subject(into, pstore, sid, plan)]
        return [os.path.join(self.path, os.path.relpath(p, into)) for p in written]

    def _links(self) -> dict[str, str]:
        """The description's DatasetLinks: the folder's earlier ones, and one per source root."""
        old = bids.read_json(os.path.join(self.path, DESCRIPTION), DESCRIPTION) \
            if os.path.isfile(os.path.join(self.path, DESCRIPTION)) else {}
        links = dict(old.get("DatasetLinks") or {})
        for root, _ in self.sources.values():
            if root is not None and self._link_url(root) not in links.values():
                links[_free_name(links)] = self._link_url(root)
        return links

    def _link_url(self, root: str) -> str:
        """A source root as the derivatives folder sees it: relative when the folder lies inside it."""
        rel = os.path.relpath(root, self.path)
        inside = os.path.commonpath([root, self.path]) == root
        return rel.replace(os.sep, "/") if inside else "file://" + root

    def _write_top(self, into: str) -> None:
        write_json(os.path.join(into, DESCRIPTION), bids.dataset_description(self.links))
        write_text(os.path.join(into, "participants.tsv"), bids.participants_tsv(self._recorded()))
        write_json(os.path.join(into, "participants.json"), bids.PARTICIPANTS_JSON)

    def _recorded(self) -> dict:
        """The mapping participants.tsv keeps: the folder's earlier subjects and this run's."""
        old = bids.read_participants(os.path.join(self.path, "participants.tsv"))
        return {**old, **{sid: self.labels[sid] for sid in self.sources}}

    def _subject(self, into: str, pstore, sid: str, plan) -> list[str]:
        """The maps of ``sid`` (its virtual stains, an ensemble's uncertainties, the out-of-distribution
        score as ``desc-ood_score``) not already there."""
        out, ds = [], None
        kinds = [(v, plan.stains[k], "virtual") for k, v in enumerate(plan.virtuals)]
        kinds += [(v, plan.stains[k], "uncertainty") for k, v in enumerate(plan.uncertainties)]
        kinds += [(plan.ood, "ood", "score")] if plan.ood else []
        for var, desc, kind in kinds:
            path = os.path.join(into, bids.map_path(self.labels[sid], desc, kind))
            there = os.path.join(self.path, os.path.relpath(path, into))
            tag = nifti_tag(pstore, sid, var, plan.model_rec["sha256"])
            if _current(there, tag) and os.path.exists(bids.sidecar_path(there)):
                continue
            ds = ds if ds is not None else pstore.open_subject(sid)
            write_nifti(path, ds[var].transpose(*SPATIAL).values, dict(ds.attrs), tag)
            write_json(bids.sidecar_path(path), self._sidecar(sid, var, desc, ds[var].attrs, plan))
            out += [path, bids.sidecar_path(path)]
        return out

    def _sidecar(self, sid: str, var: str, stain: str, attrs, plan) -> dict:
        """A map's JSON sidecar: BIDS' Sources, and what mrhscale knows of the map (model, stores)."""
        root, files = self.sources[sid]
        name = next((n for n, u in self.links.items() if root is not None and u == self._link_url(root)), "")
        attrs = jsonable(dict(attrs))
        what = ("how unlike the training brains the subject's MRI is (out-of-distribution score, 1 = a typical "
                "training voxel)" if var == plan.ood else
                f"mrhscale {'uncertainty' if var in plan.uncertainties else 'virtual histology'} of the {stain} "
                "stain, predicted from the subject's MRI")
        return {
            "Description": what,
            "Sources": [f"bids:{name}:{os.path.relpath(f, root).replace(os.sep, '/')}" for f in files],
            **({} if var == plan.ood else {"Stain": stain}), "Units": attrs.get("units", "raw stain units"),
            "mrhscale": {"version": __version__, "subject": sid, "variable": var, "map": attrs,
                         "model": {k: plan.model_rec[k] for k in _MODEL_KEYS if k in plan.model_rec},
                         "stains": list(plan.stains), **self.stores,
                         "scale": "the values of the stain volumes the model was trained on (0 outside the mask)"}}


def subject_sources(attrs: dict, dataset: str | None) -> tuple[str | None, list[str]]:
    """(root, files) of a cohort subject's inputs to predict: its MRI and mask (or FA) files
    as ingest recorded them, and the folder they lie under (its BIDS dataset, else its
    manifest's folder, widened to hold them all); ``dataset``: its BIDS dataset, if any."""
    recorded = attrs.get("sources") or {}
    roles = [r for r in recorded if r.startswith("mri/")] + (["mask"] if "mask" in recorded else ["fa"])
    files = [str(recorded[r]["path"]) for r in roles if isinstance(recorded.get(r), dict) and
             recorded[r].get("path")]
    if not files:
        return None, []
    root = dataset or os.path.dirname(str(attrs.get("manifest") or files[0]))
    return os.path.commonpath([os.path.abspath(root), *map(os.path.abspath, files)]), files


def _free_name(links: dict) -> str:
    """The next link name: raw, raw2, raw3..."""
    return next(n for n in ("raw", *(f"raw{i}" for i in range(2, len(links) + 3))) if n not in links)


def _current(path: str, tag: str) -> bool:
    """Whether ``path`` already holds this prediction; refuses a file mrhscale did not write."""
    if not os.path.exists(path):
        return False
    descrip = mrhscale_descrip(path)
    if descrip is None:
        raise MRHError(f"--bids-derivatives: {path} exists and was not written by mrhscale; move it away")
    return descrip == tag
