"""BIDS derivatives: the layout rules of predict's maps, in one place (names, labels, JSON).

A derivatives folder (BIDS 1.9, BEP-003 conventions) holds::

    dataset_description.json   DatasetType "derivative", GeneratedBy mrhscale, SourceDatasets
    participants.tsv (+ .json) participant_id -> the mrhscale subject id(s) it holds
    sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>]_desc-<stain>_virtual.nii.gz (+ .json)
                                   ... _desc-<stain>_uncertainty.nii.gz (+ .json), an ensemble's
                                   ... _desc-ood_score.nii.gz (+ .json), the out-of-distribution score

Files of one stain share the ``desc`` entity (a query by desc gets the map and its
uncertainty); the suffix says what a voxel holds, as the store's ``<stain>_virtual`` and
``<stain>_uncertainty`` do. Labels are alphanumeric: a subject id ``sub-<a>[_ses-<b>]`` (as
``mrhscale manifest --bids`` makes them) gives its own labels, any other id its letters and
digits (``s_01`` -> ``s01``), with a hash of the id appended when that label is empty or
already another subject's; the mapping is kept in participants.tsv and every sidecar.
``layout_problems`` checks a folder against these rules (tests; bids-validator is a node tool).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from importlib import metadata

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.stores.folders import made_by_mrhscale

BIDS_VERSION = "1.9.0"
NAME = "mrhscale"
KINDS = ("virtual", "uncertainty", "score")  # the suffixes, one per kind of map (score: desc-ood only)
SUBJECT_COLUMN = "mrhscale_subject"
_LABEL = re.compile(r"[A-Za-z0-9]+")
_BIDS_ID = re.compile(r"sub-([A-Za-z0-9]+)(?:_ses-([A-Za-z0-9]+))?")
_MAP = re.compile(r"sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?_desc-(?P<desc>[A-Za-z0-9]+)"
                  r"_(?P<suffix>virtual|uncertainty|score)\.(?:nii\.gz|json)")
_TOP = {"dataset_description.json", "participants.tsv", "participants.json", "README", "README.md"}
SIDECAR_KEYS = ("Description", "Sources", "Stain", "Units", "mrhscale")


# ---------------------------------------------------------------- labels and names
def own_labels(sid: str) -> tuple[str, str | None]:
    """(participant, session) a subject id asks for: its BIDS labels, else its letters and digits."""
    m = _BIDS_ID.fullmatch(sid)
    return (m.group(1), m.group(2)) if m else (re.sub(r"[^A-Za-z0-9]", "", sid), None)


def subject_labels(ids: list[str], recorded: dict | None = None) -> dict[str, tuple[str, str | None]]:
    """sid -> (participant, session) for ``ids`` (every subject of the store, so that a subject's
    label does not depend on which ones a run predicts), in their order; ``recorded`` (a
    folder's earlier mapping) is kept. A label that is empty or taken gets the id's hash."""
    out = dict(recorded or {})
    taken = set(out.values())
    for sid in ids:
        if sid in out:
            continue
        sub, ses = own_labels(sid)
        if not sub or (sub, ses) in taken:
            sub = f"{sub}x{hashlib.sha1(sid.encode()).hexdigest()[:8]}"
        out[sid] = (sub, ses)
        taken.add((sub, ses))
    return out


def stain_label(stain: str) -> str:
    """The ``desc`` label of a stain: its letters and digits (``mbp``, ``nissl``)."""
    label = re.sub(r"[^A-Za-z0-9]", "", stain)
    if not label:
        raise MRHError(f"stain {stain!r}: no letter or digit to name it in a BIDS file")
    return label


def map_path(labels: tuple[str, str | None], stain: str, kind: str) -> str:
    """The relative path of a map (``kind``: virtual or uncertainty) of one subject's stain."""
    sub, ses = labels
    prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    folder = f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + "anat"
    return f"{folder}/{prefix}_desc-{stain_label(stain)}_{kind}.nii.gz"


def sidecar_path(nifti: str) -> str:
    return nifti[: -len(".nii.gz")] + ".json"


# ---------------------------------------------------------------- the folder's own files
def dataset_description(links: dict[str, str]) -> dict:
    """dataset_description.json of mrhscale's derivatives; ``links``: name -> source dataset."""
    generated = {"Name": NAME, "Version": __version__, **({"CodeURL": url} if (url := code_url()) else {})}
    return {"Name": "mrhscale virtual histology", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": [generated], "SourceDatasets": [{"URL": u} for u in links.values()],
            "DatasetLinks": dict(links)}


def code_url() -> str | None:
    """The project's source URL from the installed package's metadata, when it names one."""
    try:
        urls = metadata.metadata("mrhscale").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    return next((u.split(",", 1)[1].strip() for u in urls if "," in u), None)


def read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as e:
        raise MRHError(f"{what} {path}: not readable JSON ({e})") from None
    if not isinstance(doc, dict):
        raise MRHError(f"{what} {path}: expected a JSON object")
    return doc


def participants_tsv(labels: dict[str, tuple[str, str | None]]) -> str:
    """participants.tsv: one row per participant, its mrhscale subject ids (comma-separated
    when it has sessions, each ``sub-<a>_ses-<b>``)."""
    rows: dict[str, list[str]] = {}
    for sid, (sub, _) in labels.items():
        rows.setdefault(sub, []).append(sid)
    out = io.StringIO()
    out.write(f"participant_id\t{SUBJECT_COLUMN}\n")
    for sub in sorted(rows):
        out.write(f"sub-{sub}\t{','.join(sorted(rows[sub]))}\n")
    return out.getvalue()


PARTICIPANTS_JSON = {SUBJECT_COLUMN: {
    "Description": "The subject id(s) in mrhscale's cohort and prediction stores (several: one per session)"}}


def read_participants(path: str) -> dict[str, tuple[str, str | None]]:
    """The mapping a participants.tsv of ours records: sid -> (participant, session)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    out = {}
    for row in rows:
        sub = str(row.get("participant_id") or "").removeprefix("sub-")
        for sid in filter(None, str(row.get(SUBJECT_COLUMN) or "").split(",")):
            ses = _BIDS_ID.fullmatch(sid)
            out[sid] = (sub, ses.group(2) if ses and ses.group(1) == sub else None)
    return out


# ---------------------------------------------------------------- checks (the layout rules in code)
def layout_problems(root: str) -> list[str]:
    """Every way the folder breaks the rules above (empty: none): top-level files, the
    description, each map's name, folder and entities, each sidecar's keys and Sources."""
    problems = _description_problems(os.path.join(root, "dataset_description.json"))
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        rel = os.path.relpath(d, root)
        for f in (f for f in files if not f.startswith(".")):
            problems += _file_problems(root, rel, f) if rel != "." else (
                [] if f in _TOP else [f"{f}: not a file of a BIDS derivatives folder's top level"])
    return problems


def _description_problems(path: str) -> list[str]:
    if not os.path.exists(path):
        return ["dataset_description.json: missing"]
    doc = read_json(path, "dataset_description.json")
    need = {"Name": str, "BIDSVersion": str, "DatasetType": str, "GeneratedBy": list}
    out = [f"dataset_description.json: {k} missing or not a {t.__name__}"
           for k, t in need.items() if not isinstance(doc.get(k), t)]
    if doc.get("DatasetType") != "derivative":
        out.append("dataset_description.json: DatasetType is not 'derivative'")
    return out + ([] if made_by_mrhscale(doc) else ["dataset_description.json: GeneratedBy names no mrhscale"])


def _file_problems(root: str, rel: str, name: str) -> list[str]:
    where = f"{rel}/{name}"
    m = _MAP.fullmatch(name)
    if m is None:
        return [f"{where}: not a map's name (sub-<label>[_ses-<label>]_desc-<stain>_<virtual|uncertainty>, "
                "or _desc-ood_score)"]
    want = "/".join([f"sub-{m['sub']}", *([f"ses-{m['ses']}"] if m["ses"] else []), "anat"])
    if rel.replace(os.sep, "/") != want:
        return [f"{where}: belongs in {want}/"]
    if name.endswith(".json"):
        return _sidecar_problems(os.path.join(root, rel, name), where)
    return [] if os.path.exists(os.path.join(root, rel, sidecar_path(name))) else [f"{where}: no JSON sidecar"]


def _sidecar_problems(path: str, where: str) -> list[str]:
    doc = read_json(path, "sidecar")
    out = [f"{where}: no {k}" for k in SIDECAR_KEYS if k not in doc and not (k == "Stain" and "desc-ood_" in where)]
    sources = doc.get("Sources") or []
    out += [f"{where}: Source {s!r} is not a BIDS URI (bids:<dataset>:<path>)"
            for s in sources if not re.fullmatch(r"bids:[A-Za-z0-9]*:[^\s]+", str(s))]
    return out
