"""Cohort manifest: a YAML file naming each subject's co-registered volumes.

Paths are relative to the manifest file. MRI groups are listed in channel
order; the concatenation of their volumes is the network's input channels.

```yaml
subjects:
  - id: s01
    mri:
      dwi2000: s01/dwi2000.nii.gz
      dwi5000: s01/dwi5000.nii.gz
      t2MTONOFF: {path: s01/t2MTONOFF.nii.gz, channels: [t2, mt_off, mt_on]}
    fa: s01/fa.nii.gz
    mask: {path: s01/mask.nii.gz, inverted: false}
    targets: {af: s01/af.nii.gz}
    labels: {lesion: s01/lesion.nii.gz}
```
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import yaml
from yaml.composer import Composer
from yaml.events import MappingEndEvent, MappingStartEvent, SequenceEndEvent, SequenceStartEvent
from yaml.nodes import ScalarNode

from mrhscale.errors import MRHError

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_VAR = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
RESERVED = {"mri", "mask", "fa", "contrast", "group", "bval", "bvec", "x", "y", "z", "vec"}
# libyaml's safe loader where PyYAML has it: the same documents, in half the time and memory
# of the pure-Python one (a 2,000-subject synthetic manifest: 20 s and ~250 MB otherwise)
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
KNOWN_KEYS = {"id", "mri", "fa", "mask", "targets", "labels", "truth", "notes"}
EXTRA_KEYS = ("truth", "notes")  # a subject's entries that only record (SubjectSpec.extra)


@dataclass
class GroupSpec:
    name: str
    path: str
    channels: list[str] | None = None


@dataclass
class SubjectSpec:
    id: str
    mri: list[GroupSpec]
    mask: str | None = None
    mask_inverted: bool = False
    fa: str | None = None
    targets: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def files(self) -> dict[str, str]:
        """Every source image of the subject, keyed by its role (for checksums and errors)."""
        out = {f"mri/{g.name}": g.path for g in self.mri}
        if self.fa:
            out["fa"] = self.fa
        if self.mask:
            out["mask"] = self.mask
        out.update({f"targets/{k}": v for k, v in self.targets.items()})
        out.update({f"labels/{k}": v for k, v in self.labels.items()})
        return out


@dataclass
class Manifest:
    path: str
    subjects: list[SubjectSpec]
    generated_by: dict = field(default_factory=dict)  # what ``mrhscale manifest`` recorded (its source, bids)

    @property
    def bids_root(self) -> str | None:
        """The BIDS dataset this manifest was scanned from (``mrhscale manifest --bids``), else None."""
        return self.generated_by.get("source") if self.generated_by.get("bids") else None

    def select(self, ids: list[str] | None) -> list[SubjectSpec]:
        if not ids:
            return list(self.subjects)
        known = {s.id: s for s in self.subjects}
        missing = [i for i in ids if i not in known]
        if missing:
            raise MRHError(
                f"{self.path}: subject(s) {', '.join(missing)} not in manifest "
                f"(known: {', '.join(known)})"
            )
        return [known[i] for i in ids]


def _path_of(entry, base: str, where: str) -> tuple[str, dict]:
    if isinstance(entry, str):
        rel, opts = entry, {}
    elif isinstance(entry, dict) and isinstance(entry.get("path"), str):
        rel, opts = entry["path"], {k: v for k, v in entry.items() if k != "path"}
    else:
        raise MRHError(f"{where}: expected a path or a mapping with 'path', got {entry!r}")
    rel = os.path.expanduser(rel)
    return (rel if os.path.isabs(rel) else os.path.normpath(os.path.join(base, rel))), opts


def _named_paths(block, base: str, where: str) -> dict[str, str]:
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise MRHError(f"{where}: expected a mapping name -> path, got {type(block).__name__}")
    out = {}
    for name, entry in block.items():
        name = str(name)
        if not _VAR.match(name) or name in RESERVED:
            raise MRHError(f"{where}: {name!r} is not usable as a variable name (letters, digits, _; not {sorted(RESERVED)})")
        out[name], _ = _path_of(entry, base, f"{where}.{name}")
    return out


def parse_subject(raw, base: str, where: str) -> SubjectSpec:
    if not isinstance(raw, dict):
        raise MRHError(f"{where}: each subject must be a mapping with at least 'id' and 'mri'")
    sid = str(raw.get("id", "")).strip()
    if not sid or not _ID.match(sid) or sid.startswith("_"):
        raise MRHError(f"{where}: subject id {sid!r} is missing or not a plain name (letters, digits, _ . -)")
    where = f"{where} ({sid})"
    unknown = set(raw) - KNOWN_KEYS
    if unknown:
        raise MRHError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; known: {', '.join(sorted(KNOWN_KEYS))}")
    mri = raw.get("mri")
    if not isinstance(mri, dict) or not mri:
        raise MRHError(f"{where}: 'mri' must map group names to files (e.g. dwi2000: s01/dwi2000.nii.gz)")
    groups = []
    for name, entry in mri.items():
        path, opts = _path_of(entry, base, f"{where}.mri.{name}")
        channels = opts.pop("channels", None)
        if opts:
            raise MRHError(f"{where}.mri.{name}: unknown option(s) {', '.join(opts)}")
        if channels is not None:
            if not isinstance(channels, list) or not all(isinstance(c, str) and c for c in channels):
                raise MRHError(f"{where}.mri.{name}: 'channels' must be a list of names")
            channels = [str(c) for c in channels]
        groups.append(GroupSpec(str(name), path, channels))
    mask, inverted = None, False
    if raw.get("mask") is not None:
        mask, opts = _path_of(raw["mask"], base, f"{where}.mask")
        inverted = bool(opts.pop("inverted", False))
        if opts:
            raise MRHError(f"{where}.mask: unknown option(s) {', '.join(opts)}")
    fa = _path_of(raw["fa"], base, f"{where}.fa")[0] if raw.get("fa") is not None else None
    if mask is None and fa is None:
        raise MRHError(f"{where}: give a 'mask' (or at least 'fa', whose nonzero voxels then form the mask)")
    return SubjectSpec(
        id=sid,
        mri=groups,
        mask=mask,
        mask_inverted=inverted,
        fa=fa,
        targets=_named_paths(raw.get("targets"), base, f"{where}.targets"),
        labels=_named_paths(raw.get("labels"), base, f"{where}.labels"),
        extra={k: raw[k] for k in EXTRA_KEYS if k in raw},
    )


# Python's composer first, over the C parser's events (the pure-Python loader has it already)
_COMPOSED = (SAFE_LOADER,) if issubclass(SAFE_LOADER, Composer) else (Composer, SAFE_LOADER)


class _WithoutExtra(*_COMPOSED):
    """The safe loader, each subject's ``truth`` and ``notes`` skipped as they are read (never
    built: a synthetic subject's notes are ~90 KB while parsed, most of a 2,000-subject
    manifest's peak memory); faster than building them too. An alias to an anchor inside skipped entries is an error."""

    def __init__(self, stream):
        SAFE_LOADER.__init__(self, stream)
        Composer.__init__(self)
        self.depth = 0  # 3: inside a subject entry (root mapping, subjects list, the entry)

    def compose_node(self, parent, index):
        if self.depth == 3 and isinstance(index, ScalarNode) and index.value in EXTRA_KEYS:
            return self.skip_node()
        self.depth += 1
        try:
            return Composer.compose_node(self, parent, index)
        finally:
            self.depth -= 1

    def skip_node(self) -> ScalarNode:
        """The next node's events consumed, a null in its place."""
        depth = 0
        while True:
            event = self.get_event()
            if isinstance(event, (MappingStartEvent, SequenceStartEvent)):
                depth += 1
            elif isinstance(event, (MappingEndEvent, SequenceEndEvent)):
                depth -= 1
            if depth <= 0:
                return ScalarNode("tag:yaml.org,2002:null", "", event.start_mark, event.end_mark)


def load_manifest(path: str, extra: bool = True) -> Manifest:
    """The manifest at ``path`` (a file, or a folder holding cohort.yaml), checked; ``extra``
    False leaves each subject's ``truth`` and ``notes`` unread (a stage that does not record
    them: ingest keeps no per-subject notes at cohort scale)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MRHError(f"{path}: manifest not found")
    if os.path.isdir(path):
        cand = os.path.join(path, "cohort.yaml")
        if not os.path.exists(cand):
            raise MRHError(f"{path}: is a directory without cohort.yaml; give the manifest file")
        path = cand
    try:
        with open(path) as fh:
            doc = yaml.load(fh, Loader=SAFE_LOADER if extra else _WithoutExtra)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MRHError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("subjects"), list) or not doc["subjects"]:
        raise MRHError(f"{path}: expected a top-level 'subjects:' list with at least one subject")
    base = os.path.dirname(os.path.abspath(path))
    subjects = [parse_subject(raw, base, f"{path}: subjects[{i}]") for i, raw in enumerate(doc["subjects"])]
    for s in subjects if not extra else ():
        s.extra.clear()  # the nulls left where they were skipped
    seen = set()
    for s in subjects:
        if s.id in seen:
            raise MRHError(f"{path}: subject id {s.id!r} appears twice")
        seen.add(s.id)
    made = doc.get("generated_by")
    return Manifest(os.path.abspath(path), subjects, made if isinstance(made, dict) else {})
