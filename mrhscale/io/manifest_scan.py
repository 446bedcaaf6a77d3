"""Cohort manifest from a folder of files: ``mrhscale manifest DIR --out cohort.yaml``.

Writing a manifest by hand for a cohort of dozens of brains is where typos creep
in; the files' names already say most of it. The rules are fixed and listed
here (and in the README), so the manifest written is predictable; it is a
plain YAML file the user may edit before ``mrhscale ingest`` (which checks
grids, affines, channel counts and b-values).

Folder per subject (the default)::

    DIR/<subject>/            every non-hidden folder holding images is a subject (its name the id)
      <group>.nii[.gz|.hdr]   any other image: an MRI group named by its stem (3D or 4D)
      <group>.bval/.bvec      FSL sidecars, read by ingest (both or neither)
      <group>.json            optional: {"channels": [names, one per volume]}
      mask.* brainmask.* brain_mask.*   the brain mask (1 inside)
      fa.*                    FA
      af.* fluo.* nf.* mbp.* nissl.*    histology targets (fluo -> af)
      lesion.* wm.*           labels
      targets/*, histology/*  more targets, named by stem
      labels/*                more labels, named by stem
      anything else/          ignored (e.g. the synthetic cohort's truth/)

Names match case-insensitively. BIDS (``bids=True``, via pybids): a subject is
``sub-<label>`` (one per session: ``sub-<label>_ses-<label>``); images of the raw
``anat/`` and ``dwi/`` folders are MRI groups named by their suffix then the values
of their other entities (``sub-01_acq-b2000_dwi`` -> ``dwi_b2000``); anywhere, raw
or ``derivatives/<pipeline>/``, an image with a ``stain-<X>`` entity is target x,
one with ``label-<X>`` is label x, suffix ``mask`` is the mask (``desc-brain``
preferred), suffix ``FA`` or ``desc-FA``/``param-FA`` is FA. A dwi image needs its
own ``.bval``/``.bvec`` beside it (inherited sidecars are not read by ingest).

Groups are listed in natural order of their names, so every subject's channels
come out in one order; subjects in natural order (s2 before s10).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field

import yaml

from mrhscale import __version__
from mrhscale._optional import load
from mrhscale.errors import MRHError
from mrhscale.io.manifest import parse_subject
from mrhscale.io.volumes import open_volume, read_block, stem
from mrhscale.results import ManifestResult
from mrhscale.stores import write_json, write_text

logger = logging.getLogger("mrhscale")

MASK_STEMS = ("mask", "brainmask", "brain_mask")
FA_STEMS = ("fa",)
STAINS = {"af": "af", "fluo": "af", "nf": "nf", "mbp": "mbp", "nissl": "nissl"}
LABEL_STEMS = ("lesion", "wm")
TARGET_DIRS = ("targets", "histology")
LABEL_DIRS = ("labels",)
CHANNELS_KEY = "channels"  # the key of a <group>.json sidecar
BIDS_MRI_DATATYPES = ("anat", "dwi")
_IMAGE_EXT = (".nii.gz", ".nii", ".hdr", ".img")
_STAIN_ORDER = list(dict.fromkeys(STAINS.values()))
_MAX_MANIFEST_BYTES = 16 << 20


def natural_key(text: str):
    """Sort key putting s2 before s10 (digit runs compare as numbers), case-insensitively."""
    parts = re.split(r"(\d+)", str(text))
    return [int(p) if i % 2 else p.lower() for i, p in enumerate(parts)], str(text)


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_EXT)


@dataclass
class _Found:
    """One subject's files as they are classified: (kind, name) -> absolute path."""

    id: str
    where: str  # the folder named in errors
    files: dict = field(default_factory=dict)

    def add(self, kind: str, name: str, path: str) -> None:
        old = self.files.get((kind, name))
        if old is not None:
            what = f"{kind} {name!r}" if name else kind
            raise MRHError(f"{path}: {what} is given twice (also {old}); keep one")
        self.files[(kind, name)] = path

    def named(self, kind: str) -> dict[str, str]:
        found = {n: p for (k, n), p in self.files.items() if k == kind}
        return {n: found[n] for n in sorted(found, key=natural_key)}

    @property
    def groups(self) -> list[str]:
        return list(self.named("mri"))


# ---------------------------------------------------------------- folder per subject


def scan_folder(root, *, base=None, channel_names=None) -> dict:
    """The manifest (a plain dict ``load_manifest`` accepts) of a folder per subject.

    base: the folder the manifest's paths are relative to (where it will be written;
    default ``root``). channel_names: group -> channel names for every subject (a
    ``<group>.json`` sidecar's list wins), or a YAML/JSON file holding that mapping.
    """
    root = _check_root(root)
    subjects = [_scan_subject(name, path) for name, path in _subject_dirs(root)]
    if not subjects:
        raise MRHError(f"{root}: no subject found (expected one folder per subject holding "
                       "NIfTI/Analyze images; a BIDS dataset needs --bids)")
    return _document(subjects, base or root, channel_names)


def _check_root(root) -> str:
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.exists(root):
        raise MRHError(f"{root}: folder not found")
    if not os.path.isdir(root):
        raise MRHError(f"{root}: is a file, expected a folder of subjects")
    return root


def _subject_dirs(root: str) -> list[tuple[str, str]]:
    """(name, path) of the non-hidden folders holding images, in natural order."""
    out, skipped = [], []
    for name in sorted(os.listdir(root), key=natural_key):
        path = os.path.join(root, name)
        if name.startswith((".", "_")) or not os.path.isdir(path):
            continue
        subdirs = [path] + [os.path.join(path, d) for d in (*TARGET_DIRS, *LABEL_DIRS)]
        if any(os.path.isdir(d) and any(map(_is_image, os.listdir(d))) for d in subdirs):
            out.append((name, path))
        else:
            skipped.append(name)
    if skipped:
        logger.debug("%s: not subjects (no images): %s", root, ", ".join(skipped))
    return out


def _images(folder: str) -> dict[str, str]:
    """stem -> path of the images in ``folder`` (an Analyze pair once, by its .hdr)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not _is_image(name) or not os.path.isfile(path):
            continue
        s = os.path.basename(stem(path))
        if name.lower().endswith(".img"):
            if not any(os.path.exists(stem(path) + e) for e in (".hdr", ".HDR")):
                raise MRHError(f"{path}: Analyze image without its .hdr header")
            continue
        if s in out:
            raise MRHError(f"{path}: two images share the name {s!r} (also {out[s]}); keep one")
        out[s] = path
    return out


def _role(s: str) -> tuple[str, str]:
    """(kind, name) of an image at the top of a subject folder, by its stem."""
    low = s.lower()
    if low in MASK_STEMS:
        return "mask", ""
    if low in FA_STEMS:
        return "fa", ""
    if low in STAINS:
        return "targets", STAINS[low]
    if low in LABEL_STEMS:
        return "labels", low
    return "mri", s


def _scan_subject(name: str, folder: str) -> _Found:
    found = _Found(name, folder)
    for s, path in _images(folder).items():
        kind, role_name = _role(s)
        if kind == "mri":
            _check_bval_pair(path)
        found.add(kind, role_name, path)
    for kind, dirs in (("targets", TARGET_DIRS), ("labels", LABEL_DIRS)):
        for d in dirs:
            sub = os.path.join(folder, d)
            for s, path in (_images(sub) if os.path.isdir(sub) else {}).items():
                found.add(kind, s, path)
    return found


def _check_bval_pair(path: str) -> None:
    """A .bval without its .bvec (or the reverse) would be silently unused by ingest."""
    s = stem(path)
    have = [e for e in (".bval", ".bvec") if os.path.exists(s + e)]
    if len(have) == 1:
        other = ".bvec" if have[0] == ".bval" else ".bval"
        raise MRHError(f"{s}{have[0]}: has no {os.path.basename(s)}{other} beside it (give both or neither)")


# ---------------------------------------------------------------- shared: entries


def _document(subjects: list[_Found], base: str, channel_names) -> dict:
    """The manifest dict: entries checked by the manifest parser, groups alike across subjects."""
    from_file = isinstance(channel_names, str | os.PathLike)
    names = read_channel_names(channel_names) if from_file else dict(channel_names or {})
    _check_groups(subjects, names, f"--channels-from {channel_names}" if from_file else "channel_names")
    base = os.path.abspath(base)
    entries = []
    for f in subjects:
        entry = _entry(f, base, names)
        parse_subject(entry, base, f.where)  # the checks ingest will make of it, naming the folder
        _warn_outside_mask(f)
        entries.append(entry)
    return {"subjects": entries}


def _check_groups(subjects: list[_Found], names: dict, names_from: str) -> None:
    for f in subjects:
        if not f.groups:
            raise MRHError(f"{f.where}: subject without MRI (only mask/fa/targets/labels images)")
        if not f.files.get(("mask", "")) and not f.files.get(("fa", "")):
            raise MRHError(f"{f.where}: no mask or FA image (folder: mask.*, fa.*; BIDS: *_mask, "
                           "*_FA); the manifest needs one of them")
    ref = subjects[0]
    for f in subjects[1:]:
        if f.groups != ref.groups:
            missing = sorted(set(ref.groups) - set(f.groups))
            extra = sorted(set(f.groups) - set(ref.groups))
            raise MRHError(f"{f.where}: MRI groups {', '.join(f.groups)} differ from those of {ref.where} "
                           f"(missing: {', '.join(missing) or '-'}; extra: {', '.join(extra) or '-'})")
    unknown = sorted(set(names) - set(ref.groups))
    if unknown:
        raise MRHError(f"{names_from}: channel names for group(s) {', '.join(unknown)} that no subject has "
                       f"(groups: {', '.join(ref.groups)})")


def _warn_outside_mask(f: _Found) -> None:
    """The original MRH-Net masks are 1 OUTSIDE the brain; ingest cannot tell, so say it here."""
    path = f.files.get(("mask", ""))
    if path is None:
        return
    vol = open_volume(path, what=f"subject {f.id}: mask")
    if float(read_block(vol.proxy, (0,) * vol.ndim)) > 0.5:
        logger.warning("%s: the mask is 1 at voxel (0, 0, 0), outside any brain; if it marks the outside "
                       "(as the original MRH-Net masks do), add 'inverted: true' to subject %s's mask",
                       path, f.id)


def _entry(f: _Found, base: str, names: dict) -> dict:
    def rel(path):
        return os.path.relpath(path, base).replace(os.sep, "/")

    mri = {}
    for g, path in f.named("mri").items():
        channels = sidecar_channels(path) or names.get(g)
        mri[g] = {"path": rel(path), "channels": list(channels)} if channels else rel(path)
    entry = {"id": f.id, "mri": mri}
    for kind in ("fa", "mask"):
        if (kind, "") in f.files:
            entry[kind] = rel(f.files[(kind, "")])
    targets = f.named("targets")
    order = sorted(targets, key=lambda t: (_STAIN_ORDER.index(t) if t in _STAIN_ORDER else len(_STAIN_ORDER),
                                           natural_key(t)))
    for kind, table in (("targets", {t: targets[t] for t in order}), ("labels", f.named("labels"))):
        if table:
            entry[kind] = {k: rel(v) for k, v in table.items()}
    return entry


def sidecar_channels(path: str) -> list[str] | None:
    """Channel names from ``<stem>.json`` (key "channels"), or None when there is none."""
    side = stem(path) + ".json"
    if not os.path.isfile(side):
        return None
    try:
        with open(side, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as e:
        raise MRHError(f"{side}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or CHANNELS_KEY not in doc:
        return None
    return _names_list(doc[CHANNELS_KEY], f"{side}: {CHANNELS_KEY!r}")


def write_channel_sidecar(path: str, channels: list[str]) -> str:
    """``<stem>.json`` naming an image's channels, the sidecar ``sidecar_channels`` reads (atomic)."""
    return write_json(stem(path) + ".json", {CHANNELS_KEY: list(channels)})


def _names_list(value, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise MRHError(f"{where}: expected a list of channel names, got {value!r}")
    return list(value)


def read_channel_names(path) -> dict[str, list[str]]:
    """A YAML/JSON file mapping MRI group -> channel names (``--channels-from``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MRHError(f"--channels-from {path}: file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MRHError(f"--channels-from {path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not doc:
        raise MRHError(f"--channels-from {path}: expected a mapping group -> [channel names], "
                       "e.g. {t2MTONOFF: [t2, mt_off, mt_on]}")
    return {str(g): _names_list(v, f"--channels-from {path}: {g}") for g, v in doc.items()}


# ---------------------------------------------------------------- BIDS


def scan_bids(root, *, base=None, channel_names=None) -> dict:
    """The manifest of a BIDS dataset (rules in the module docstring); as ``scan_folder``."""
    root = _check_root(root)
    if not os.path.isfile(os.path.join(root, "dataset_description.json")):
        raise MRHError(f"{root}: no dataset_description.json, not a BIDS dataset (without --bids: "
                       "one folder per subject)")
    layout = _layout(root)
    subjects = [_bids_subject(layout, root, uid, sub, ses) for uid, sub, ses in _bids_units(layout)]
    if not subjects:
        raise MRHError(f"{root}: no subject found (no sub-<label> folder with images)")
    return _document(subjects, base or root, channel_names)


def _layout(root: str):
    bids = load("bids", "mrhscale manifest --bids")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bids.BIDSLayout(root, validate=False,
                                   derivatives=os.path.isdir(os.path.join(root, "derivatives")))
    except Exception as e:  # pybids raises its own types, and ValueError for broken descriptions
        raise MRHError(f"{root}: not readable as a BIDS dataset ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _bids_units(layout) -> list[tuple[str, str, str | None]]:
    """(id, subject, session) for every subject, one per session when it has sessions."""
    units = []
    for sub in sorted(layout.get(return_type="id", target="subject", scope="raw"), key=natural_key):
        sessions = layout.get(return_type="id", target="session", subject=sub, scope="raw")
        if not sessions:
            units.append((f"sub-{sub}", sub, None))
        units += [(f"sub-{sub}_ses-{ses}", sub, ses) for ses in sorted(sessions, key=natural_key)]
    return units


def _bids_files(layout, sub: str, ses: str | None, scope: str) -> list[str]:
    """The subject's NIfTI files in ``scope``; with ``ses`` None, those of no session."""
    query = {"session": ses} if ses is not None else {}
    files = layout.get(subject=sub, scope=scope, extension=[".nii", ".nii.gz"], return_type="filename",
                       **query)
    files = sorted(map(str, files))
    return files if ses is not None else [f for f in files if "ses" not in dict(bids_name(f)[0])]


def bids_name(path: str) -> tuple[list[tuple[str, str]], str]:
    """([(entity, value), ...] in file-name order, suffix) of a BIDS file name."""
    parts = os.path.basename(stem(path)).split("_")
    entities = [tuple(p.split("-", 1)) for p in parts[:-1] if "-" in p]
    return entities, parts[-1]


def _bids_role(path: str, raw: bool) -> tuple[str, str] | None:
    """(kind, name) of a BIDS image, or None when it is not used."""
    entities, suffix = bids_name(path)
    ent = {k.lower(): v for k, v in entities}
    if "stain" in ent:
        return "targets", ent["stain"].lower()
    if "label" in ent:
        return "labels", ent["label"].lower()
    if suffix.lower() == "mask":
        return "mask", ent.get("desc", "").lower()
    if suffix.lower() == "fa" or "fa" in (ent.get("desc", "").lower(), ent.get("param", "").lower()):
        return "fa", ""
    if raw and os.path.basename(os.path.dirname(path)) in BIDS_MRI_DATATYPES:
        values = [re.sub(r"[^A-Za-z0-9]", "", v) for k, v in entities if k not in ("sub", "ses")]
        return "mri", "_".join([suffix, *values])
    return None


def _bids_subject(layout, root: str, uid: str, sub: str, ses: str | None) -> _Found:
    where = os.path.join(root, f"sub-{sub}", *([f"ses-{ses}"] if ses is not None else []))
    found = _Found(uid, where)
    masks = {}
    for scope in ("raw", "derivatives"):
        for path in _bids_files(layout, sub, ses, scope):
            role = _bids_role(path, scope == "raw")
            if role is None:
                continue
            if role[0] == "mask":
                masks.setdefault(role[1], []).append(path)
                continue
            if role[0] == "mri" and bids_name(path)[1] == "dwi":
                _require_bval(path)
            found.add(*role, path)
    if masks:
        found.add("mask", "", _pick_mask(masks))
    return found


def _pick_mask(masks: dict[str, list[str]]) -> str:
    """The one brain mask: desc-brain if there is one, else the only mask there is."""
    pick = masks.get("brain") or [p for ps in masks.values() for p in ps]
    if len(pick) > 1:
        raise MRHError(f"{pick[0]}: {len(pick)} masks for one subject ({', '.join(map(os.path.basename, pick))}); "
                       "keep one, or name the brain mask desc-brain")
    return pick[0]


def _require_bval(path: str) -> None:
    s = stem(path)
    if not (os.path.exists(s + ".bval") and os.path.exists(s + ".bvec")):
        raise MRHError(f"{path}: no {os.path.basename(s)}.bval/.bvec beside it (ingest reads the "
                       "b-values from the image's own sidecars; inherited ones are not used)")
    _check_bval_pair(path)


# ---------------------------------------------------------------- writing


def write_manifest(root, out, *, bids: bool = False, channel_names=None, overwrite: bool = False) -> ManifestResult:
    """Scan ``root`` and write its manifest to ``out`` atomically (paths relative to ``out``).

    An existing ``out`` is replaced only with ``overwrite`` and only when it is a
    cohort manifest itself: never a folder or any other file. Returns a summary.
    """
    out = os.path.abspath(os.path.expanduser(os.fspath(out)))
    _check_out(out, overwrite)
    scan = scan_bids if bids else scan_folder
    doc = scan(root, base=os.path.dirname(out), channel_names=channel_names)
    doc = {"generated_by": {"command": "mrhscale manifest", "version": __version__,
                            "source": os.path.abspath(os.fspath(root)), "bids": bool(bids)}, **doc}
    write_text(out, "# mrhscale cohort manifest (mrhscale manifest); paths relative to this file\n"
               + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False))
    subjects = doc["subjects"]
    return ManifestResult(manifest=out, subjects=[s["id"] for s in subjects], groups=list(subjects[0]["mri"]),
                          targets=list(dict.fromkeys(t for s in subjects for t in s.get("targets", {}))),
                          labels=list(dict.fromkeys(t for s in subjects for t in s.get("labels", {}))))


class _Dumper(yaml.SafeDumper):
    """Mappings one key a line (long paths stay readable), lists of channel names on one line."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=all(isinstance(x, str) for x in v)))


def _check_out(out: str, overwrite: bool) -> None:
    if not os.path.lexists(out):
        return
    if os.path.isdir(out):
        raise MRHError(f"--out {out}: is a folder; give the manifest's file name (e.g. {out}/cohort.yaml)")
    if not overwrite:
        raise MRHError(f"--out {out}: already exists; use --overwrite to replace it")
    if not is_manifest(out):
        raise MRHError(f"--out {out}: is not a cohort manifest (a YAML file with a 'subjects:' list); "
                       "not replaced, give another --out")


def is_manifest(path: str) -> bool:
    """Whether ``path`` is a file holding a cohort manifest (the only kind --overwrite replaces)."""
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > _MAX_MANIFEST_BYTES:
            return False
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("subjects"), list)
