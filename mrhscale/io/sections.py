"""A lab's histology sections read as per-section 2D stain-density images, ready for registration
(issue 29's input side; docs/sections.md).

SECTIONS is a folder of images (natural order = cutting order, or the ``sections.csv``/``.yaml``
inside it) or such a table. Each image becomes ``density`` (the stain's amount, >= 0, glass ~0,
levelled across the stack) and ``tissue`` (a mask, holes kept) at the file's full resolution:

- brightfield RGB: optical density by colour deconvolution (``dab``, ``haematoxylin``: scikit-image's
  HDX vectors, the units synth renders in; ``estimate``: one stain vector found in the image by
  Macenko's method, for stains without a fixed vector such as Nissl);
- fluorescence: one channel's intensity (``fluorescence`` or ``fluorescence:<OME name or index>``).

The tissue mask is Otsu on total optical density (brightfield) or intensity (fluorescence), cleaned
of specks; the background is the median of the pixels outside it.
"""

from __future__ import annotations

import csv
import io
import os
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import yaml
from scipy import ndimage

from mrhscale.errors import MRHError
from mrhscale.io.manifest_scan import natural_key

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".nii", ".nii.gz")
TABLE_NAMES = ("sections.csv", "sections.yaml", "sections.yml")
CHANNELS = ("dab", "haematoxylin", "estimate", "fluorescence", "fluorescence:<name or index>")
BRIGHTFIELD = ("dab", "haematoxylin", "estimate")
ALIASES = {"brightfield-dab": "dab", "hematoxylin": "haematoxylin", "brightfield-haematoxylin": "haematoxylin",
           "brightfield-estimate": "estimate"}
AUTO = "auto"  # a row that does not say: decided by the image (RGB or one channel) and the stain
FLUORESCENT_STAINS = ("af",)  # synth's fluorescence stain: one channel
ESTIMATED_STAINS = ("nissl", "cresyl")  # no fixed colour vector: estimate it from the image
TRUE = ("1", "true", "yes", "y")
FALSE = ("", "0", "false", "no", "n")
SPECK_MM2 = 0.01  # tissue pieces smaller than this (and 16 pixels) are dust, unless the tissue is as small
MIN_CONTRAST = 4.0  # tissue vs glass, in the glass's noise sd (Otsu on pure noise gives ~1.4)
MIN_OD = 0.05  # brightfield tissue's total optical density (natural log units) above the glass
SCALE_PERCENTILE = 90  # the per-section intensity scale: this percentile of density over tissue
OD_UNITS = -np.log(1e-6)  # skimage's stain units: natural optical density / ln(10^6)
UNITS_UM = {"um": 1.0, "µm": 1.0, "\u03bcm": 1.0, "micron": 1.0, "microns": 1.0, "nm": 1e-3, "mm": 1e3,
            "cm": 1e4, "m": 1e6, "meter": 1e6, "in": 25400.0, "inch": 25400.0}


@dataclass(frozen=True)
class SectionSpec:
    """One section: a row of the table, or one image of a folder."""

    order: int  # 1-based cutting order (a folder: natural sort of file names)
    file: str | None  # absolute path; None for a missing section
    position_mm: float | None  # along the cut axis, grid mm (voxel index x voxel size); None if not given
    thickness_mm: float | None
    pixel_um: float | None  # from the table (or read_section_table's pixel_um); None -> from the file
    flip: bool  # mounted mirrored: the reader un-mirrors columns
    channel: str  # dab, haematoxylin, estimate, fluorescence[:<name or index>], or "auto"
    missing: bool


@dataclass
class SectionImage:
    """One section read: its stain density and tissue mask at full resolution, columns un-mirrored."""

    spec: SectionSpec
    density: np.ndarray  # float32 (rows, cols): stain amount >= 0, background ~0, NaN nowhere
    tissue: np.ndarray  # bool (rows, cols): tissue (holes such as tears stay False)
    pixel_mm: float  # isotropic pixel size actually used
    channel: str = ""  # the channel actually read (AUTO resolved)
    scale: float = 1.0  # the section's own 90th percentile of density over tissue, before levelling


# ---------------------------------------------------------------- channels


def parse_channel(text, where: str = "") -> str:
    """A channel name in its canonical spelling (aliases such as synth's ``brightfield-dab`` mapped);
    None or empty -> AUTO. One line naming ``where`` on an unknown name."""
    name = "" if text is None else str(text).strip()
    low = ALIASES.get(name.lower(), name.lower())
    if low in ("", AUTO):
        return AUTO
    if low in BRIGHTFIELD or low == "fluorescence":
        return low
    if low.startswith("fluorescence:") and name.split(":", 1)[1].strip():
        return "fluorescence:" + name.split(":", 1)[1].strip()
    raise MRHError(f"{where}: unknown channel {name!r} (channels: {', '.join(CHANNELS)})")


def _resolve(channel: str, n: int, stain: str | None, file: str) -> str:
    """AUTO -> a channel from the image (one channel: fluorescence; RGB: the stain's brightfield)."""
    if channel != AUTO:
        return channel
    stain = (stain or "").lower()
    if n == 1:
        return "fluorescence"
    if n == 3 and stain not in FLUORESCENT_STAINS:
        return "estimate" if stain in ESTIMATED_STAINS else "dab"
    raise MRHError(f"{file}: a {n}-channel image: say which channel to read in the table's channel column "
                   f"(fluorescence:<name or index>)")


def _channel_index(channel: str, n: int, names, file: str) -> int:
    """The 0-based channel of ``fluorescence[:<name or index>]`` in an image of n channels."""
    if channel == "fluorescence":
        if n != 1:
            raise MRHError(f"{file}: channel 'fluorescence' on a {n}-channel image: name one, e.g. "
                           f"fluorescence:0 or fluorescence:<name>")
        return 0
    key = channel.split(":", 1)[1]
    if names and key in names:
        return list(names).index(key)
    if not key.isdigit():
        known = f"channels: {', '.join(names)}" if names else "the file names no channels"
        raise MRHError(f"{file}: no channel named {key!r} ({known})")
    if int(key) >= n:
        raise MRHError(f"{file}: channel index {key} out of range: the image has {n} channel(s) (0..{n - 1})")
    return int(key)


# ---------------------------------------------------------------- the table


def read_section_table(path, *, pixel_um=None, channel=None) -> list[SectionSpec]:
    """The sections of a folder or a CSV/YAML table, in cutting order. ``pixel_um`` and ``channel`` are
    the defaults of rows that do not say (a folder's images take them all)."""
    path = os.path.abspath(os.fspath(path))
    default = {"pixel_um": _number(pixel_um, "pixel_um", "pixel_um argument", positive=True),
               "channel": parse_channel(channel, "channel argument")}
    if os.path.isdir(path):
        table = next((os.path.join(path, n) for n in TABLE_NAMES if os.path.isfile(os.path.join(path, n))), None)
        if table is None:
            return _folder_specs(path, default)
        path = table
    if not os.path.isfile(path):
        raise MRHError(f"{path}: no such section folder or table")
    specs = [_spec(row, i, path, default) for i, row in enumerate(_read_rows(path))]
    _check_orders(specs, path)
    return sorted(specs, key=lambda s: s.order)


def _folder_specs(folder: str, default: dict) -> list[SectionSpec]:
    names = sorted((n for n in os.listdir(folder) if _is_image(n) and os.path.isfile(os.path.join(folder, n))),
                   key=natural_key)
    if not names:
        raise MRHError(f"{folder}: no section images ({', '.join(IMAGE_EXT)}) and no "
                       f"{' or '.join(TABLE_NAMES)}")
    return [SectionSpec(i + 1, os.path.join(folder, n), None, None, default["pixel_um"], False, default["channel"],
                        False) for i, n in enumerate(names)]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXT) and not name.startswith(".")


def _read_rows(path: str) -> list[dict]:
    """The table's rows as dicts; a CSV or YAML list of rows with a ``file`` column."""
    low = path.lower()
    if low.endswith((".yaml", ".yml")):
        rows = _yaml_rows(path)
    elif low.endswith((".csv", ".tsv", ".txt")):
        rows = _csv_rows(path)
    else:
        raise MRHError(f"{path}: not a section table (.csv, .yaml) or folder")
    if not rows:
        raise MRHError(f"{path}: the section table has no rows")
    if not all("file" in row for row in rows):
        raise MRHError(f"{path}: the section table has no 'file' column")
    return rows


def _csv_rows(path: str) -> list[dict]:
    """Comma, semicolon (a spreadsheet's CSV in some locales) or tab separated, by the header line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
        header = text.split("\n", 1)[0]
        delimiter = max(",;\t", key=header.count)
        reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
        return [{k.strip(): v for k, v in row.items() if k} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MRHError(f"{path}: not a readable CSV table ({exc})") from None


def _yaml_rows(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MRHError(f"{path}: not a readable YAML table ({str(exc).splitlines()[0]})") from None
    if isinstance(doc, dict) and "sections" in doc:
        doc = doc["sections"]
    if not isinstance(doc, list) or not all(isinstance(row, dict) for row in doc):
        raise MRHError(f"{path}: a YAML section table must be a list of rows (mappings with file, order, ...)")
    return [{str(k): v for k, v in row.items()} for row in doc]


def _spec(row: dict, i: int, table: str, default: dict) -> SectionSpec:
    """One row -> SectionSpec; numbers, flags and the file checked, each error naming the row."""
    where = f"{table}: row {i + 1}"
    order = _order(row.get("order"), i, where)
    missing = _flag(row.get("missing"), "missing", where)
    name = "" if row.get("file") is None else str(row.get("file")).strip()
    file = None if missing or not name else os.path.join(os.path.dirname(table), os.path.expanduser(name))
    if file is not None and not os.path.isfile(file):
        raise MRHError(f"{where}: section file {file} does not exist")
    pixel = _number(row.get("pixel_size_um"), "pixel_size_um", where, positive=True)
    return SectionSpec(order, file, _number(row.get("position_mm"), "position_mm", where),
                       _number(row.get("thickness_mm"), "thickness_mm", where, positive=True),
                       default["pixel_um"] if pixel is None else pixel, _flag(row.get("flip"), "flip", where),
                       default["channel"] if _blank(row.get("channel")) else parse_channel(row["channel"], where),
                       file is None)


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value, column: str, where: str, positive: bool = False) -> float | None:
    if _blank(value):
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise MRHError(f"{where}: {column} {value!r} is not a number") from None
    if not np.isfinite(number) or (positive and number <= 0):
        raise MRHError(f"{where}: {column} must be a finite number{' > 0' if positive else ''}, got {value!r}")
    return number


def _order(value, i: int, where: str) -> int:
    number = _number(value, "order", where)
    if number is None:
        return i + 1
    if number != int(number) or number < 1:
        raise MRHError(f"{where}: order must be a whole number >= 1, got {value!r}")
    return int(number)


def _flag(value, column: str, where: str) -> bool:
    text = str(value).strip().lower() if value is not None else ""
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise MRHError(f"{where}: {column} must be 0/1 (or yes/no, true/false), got {value!r}")


def _check_orders(specs: list[SectionSpec], table: str) -> None:
    seen: dict[int, int] = {}
    for i, spec in enumerate(specs):
        if spec.order in seen:
            raise MRHError(f"{table}: order {spec.order} given twice (rows {seen[spec.order] + 1} and {i + 1})")
        seen[spec.order] = i


# ---------------------------------------------------------------- image files


def load_image(file: str):
    """(pixels (rows, cols, channels), (x, y) pixel size in um or None, channel names or None)."""
    low = file.lower()
    try:
        if low.endswith((".nii", ".nii.gz")):
            return _load_nifti(file)
        if low.endswith((".tif", ".tiff")):
            return _load_tiff(file)
        return _load_pillow(file)
    except MRHError:
        raise
    except Exception as exc:  # any decoder's complaint about a bad file is the user's: one line
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise MRHError(f"{file}: not a readable image ({reason})") from None


def _load_pillow(file: str):
    """PNG / JPEG / ...: palette and alpha dropped; pixel size from the dpi (PNG pHYs, JPEG JFIF)."""
    from PIL import Image

    with Image.open(file) as im:
        im.load()
        modes = {"P": "RGB", "PA": "RGB", "RGBA": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "LA": "L", "1": "L"}
        dpi = im.info.get("dpi")
        pixels = np.asarray(im.convert(modes[im.mode]) if im.mode in modes else im)
    size = (25400.0 / float(dpi[0]), 25400.0 / float(dpi[1])) if dpi and min(map(float, dpi)) > 0 else None
    return _channels_last(pixels), size, None


def _load_tiff(file: str):
    """TIFF / OME-TIFF: the first series' full resolution; OME channel names and physical sizes, else
    the resolution tags (or ImageJ's unit)."""
    import tifffile

    with tifffile.TiffFile(file) as tif:
        series = tif.series[0]
        pixels, axes = series.asarray(), series.axes
        if tif.is_ome:
            size, names = _ome(tif.ome_metadata, file)
        else:
            size, names = _tiff_resolution(tif), None
    return _yx_channels(pixels, axes, file), size, names


def _yx_channels(pixels, axes: str, file: str) -> np.ndarray:
    """An array with tifffile's axes -> (rows, cols, channels); more than one plane is an error."""
    if "Y" not in axes or "X" not in axes:
        raise MRHError(f"{file}: not a 2D image (axes {axes}, shape {pixels.shape})")
    other = [i for i, a in enumerate(axes) if a not in "YX"]
    if sum(pixels.shape[i] > 1 for i in other) > 1:
        raise MRHError(f"{file}: more than one plane (axes {axes}, shape {pixels.shape}): one 2D section per file")
    arr = np.moveaxis(pixels, [axes.index("Y"), axes.index("X")], [0, 1])
    arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
    return arr[..., :3] if "S" in axes and arr.shape[2] == 4 else arr  # RGBA: alpha dropped


def _ome(xml: str, file: str):
    """((x, y) um or None, channel names) from OME-XML's first Pixels element."""
    pixels = next((e for e in ET.fromstring(xml).iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None, None
    names = [c.get("Name") or "" for c in pixels if c.tag.rsplit("}", 1)[-1] == "Channel"]
    sizes = [pixels.get(f"PhysicalSize{a}") for a in "XY"]
    if None in sizes:
        return None, names or None
    units = [pixels.get(f"PhysicalSize{a}Unit", "µm") for a in "XY"]
    bad = [u for u in units if u not in UNITS_UM]
    if bad:
        raise MRHError(f"{file}: unknown OME PhysicalSize unit {bad[0]!r} (known: {', '.join(UNITS_UM)})")
    return tuple(float(s) * UNITS_UM[u] for s, u in zip(sizes, units)), names or None


def _tiff_resolution(tif):
    """(x, y) um from XResolution/YResolution (pixels per inch or cm; ImageJ's unit when the tag says
    none), or None."""
    tags = tif.pages[0].tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    res = [(lambda v: v[0] / v[1] if v[1] else 0.0)(tags[t].value) for t in ("XResolution", "YResolution")]
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    per = {2: 25400.0, 3: 1e4}.get(unit)
    if per is None and tif.is_imagej:
        per = UNITS_UM.get(str((tif.imagej_metadata or {}).get("unit", "")).replace("\\u00B5", "µ"))
    if per is None or min(res) <= 0:
        return None
    return per / res[0], per / res[1]


def _load_nifti(file: str):
    """2D NIfTI (X, Y) or (X, Y, 1) (channels along a 4th axis): rows run along Y (the second voxel
    axis), columns along X, as ITK, SimpleITK and Fiji lay out a 2D image; pixel size from the zooms in
    the header's unit (mm when it says none)."""
    import nibabel as nib

    img = nib.load(file)
    data = np.asanyarray(img.dataobj)
    if data.dtype.names:  # RGB24 / RGBA32
        data = np.stack([data[n] for n in data.dtype.names if n != "A"], -1)[..., None, :]
    if data.ndim > 4 or (data.ndim >= 3 and data.shape[2] != 1):
        raise MRHError(f"{file}: a {data.ndim}D volume of shape {data.shape}, not a 2D section (X, Y) or (X, Y, 1)")
    data = data.reshape(data.shape[0], data.shape[1], -1)
    unit = UNITS_UM.get(img.header.get_xyzt_units()[0], 1e3)
    zooms = img.header.get_zooms()[:2]
    return np.swapaxes(data, 0, 1), tuple(float(z) * unit for z in zooms), None


def _channels_last(pixels: np.ndarray) -> np.ndarray:
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _pixel_mm(spec: SectionSpec, file_um, file: str) -> float:
    """The table's pixel size, else the file's (square pixels only)."""
    if spec.pixel_um is not None:
        return spec.pixel_um / 1000.0
    if file_um is None or not all(np.isfinite(file_um)) or min(file_um) <= 0:
        raise MRHError(f"{file}: no pixel size in the file: give it in the table's pixel_size_um column")
    x, y = file_um
    if abs(x - y) > 1e-3 * max(x, y):
        raise MRHError(f"{file}: pixels are not square ({x:g} x {y:g} um): resample the image or give "
                       f"pixel_size_um in the table")
    return x / 1000.0


# ---------------------------------------------------------------- density and tissue


def read_section(spec: SectionSpec, *, stain: str | None = None) -> SectionImage:
    """One section's density (background subtracted, >= 0, in the channel's own units) and tissue mask,
    columns un-mirrored when flipped. ``stain`` picks the channel of a row that does not say."""
    if spec.missing or spec.file is None:
        raise MRHError(f"section {spec.order} is missing: there is no image to read")
    file = spec.file
    pixels, file_um, names = load_image(file)
    pixel_mm = _pixel_mm(spec, file_um, file)
    channel = _resolve(spec.channel, pixels.shape[2], stain, file)
    density, signal, floor = _measure(pixels, channel, names, file)
    tissue = _tissue(signal, pixel_mm, floor, file)
    density = _subtract_background(density, tissue)
    if spec.flip:
        density, tissue = density[:, ::-1], tissue[:, ::-1]
    scale = float(np.percentile(density[tissue], SCALE_PERCENTILE))
    return SectionImage(spec, np.ascontiguousarray(density), np.ascontiguousarray(tissue), pixel_mm, channel, scale)


def _measure(pixels, channel: str, names, file: str):
    """(density, the signal the tissue mask thresholds, that signal's least tissue-glass contrast)."""
    if channel.startswith("fluorescence"):
        index = _channel_index(channel, pixels.shape[2], names, file)
        intensity = np.nan_to_num(pixels[..., index].astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        return intensity, intensity, 0.0
    if pixels.shape[2] != 3:
        raise MRHError(f"{file}: channel {channel!r} needs an RGB brightfield image; this one has "
                       f"{pixels.shape[2]} channel(s) (fluorescence[:<channel>] reads those)")
    rgb = _unit_rgb(pixels)
    od = -np.log(np.maximum(rgb, 1e-6))
    return _deconvolve(rgb, od, channel, file), od.sum(-1), MIN_OD


def _unit_rgb(pixels) -> np.ndarray:
    """RGB in [0, 1]: integers by their type's range, floats as given (clipped)."""
    if np.issubdtype(pixels.dtype, np.integer):
        return pixels.astype(np.float32) / np.iinfo(pixels.dtype).max
    return np.clip(np.nan_to_num(pixels.astype(np.float32), nan=1.0), 0, 1)


def _deconvolve(rgb, od, channel: str, file: str) -> np.ndarray:
    """The stain's amount in skimage's stain units (natural optical density / ln 10^6)."""
    from skimage.color import hdx_from_rgb, separate_stains

    if channel == "estimate":
        return macenko_density(od, file)
    return separate_stains(rgb, hdx_from_rgb)[..., 0 if channel == "haematoxylin" else 1].astype(np.float32)


def macenko_density(od, file: str = "", beta: float = 0.15, min_angle_deg: float = 5.0) -> np.ndarray:
    """The dominant stain's amount from stain vectors estimated in the image (Macenko et al. 2009): the
    optical density of stained pixels projected on its two main directions; the 1st and 99th percentile
    angles there are the stain vectors (one, their mean, when they are closer than ``min_angle_deg``)."""
    flat = od.reshape(-1, 3)
    stained = flat[(flat > beta).all(1)]
    if len(stained) < 50:
        raise MRHError(f"{file}: too little stain to estimate a stain vector (channel 'estimate')")
    stained = stained[:: max(1, len(stained) // 200_000)]
    plane = np.linalg.eigh(np.cov(stained.T))[1][:, [2, 1]]
    plane[:, 0] *= np.sign(plane[:, 0].sum()) or 1
    angles = np.percentile(np.arctan2(stained @ plane[:, 1], stained @ plane[:, 0]), [1, 99])
    vectors = [_positive_unit(plane @ [np.cos(a), np.sin(a)]) for a in angles]
    if np.degrees(np.arccos(np.clip(vectors[0] @ vectors[1], -1, 1))) < min_angle_deg:
        vectors = [_positive_unit(vectors[0] + vectors[1])]
    conc = np.linalg.pinv(np.stack(vectors, 1)) @ flat.T  # least squares; lstsq is slow with 10^6 columns
    main = int(np.argmax(np.maximum(conc, 0).sum(1)))
    return (np.maximum(conc[main], 0) / OD_UNITS).reshape(od.shape[:2]).astype(np.float32)


def _positive_unit(v) -> np.ndarray:
    v = np.asarray(v, float) * (np.sign(np.sum(v)) or 1)
    return v / max(np.linalg.norm(v), 1e-12)


def _tissue(signal, pixel_mm: float, floor: float, file: str) -> np.ndarray:
    """Otsu on the signal's 3 x 3 median (noise down, edges kept), specks removed, holes kept; an image
    without clear tissue (too little contrast to its glass) is refused."""
    from skimage.filters import threshold_otsu

    smooth = ndimage.median_filter(signal.astype(np.float32), 3)
    mask = smooth > threshold_otsu(smooth) if np.ptp(smooth) > 0 else np.zeros(smooth.shape, bool)
    mask = _drop_specks(mask, max(16, int(SPECK_MM2 / pixel_mm**2)))
    glass = smooth[~mask]
    if not mask.any() or (glass.size and not _contrasted(smooth[mask], glass, floor)):
        raise MRHError(f"{file}: no tissue found: the image looks like empty background")
    return mask


def _drop_specks(mask, min_pixels: int) -> np.ndarray:
    """Pieces smaller than min_pixels and than a tenth of the largest piece dropped (the largest stays)."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= min(min_pixels, sizes.max() // 10)
    keep[0] = False
    return keep[labels]


def _contrasted(tissue, glass, floor: float) -> bool:
    """Tissue's median stands clear of the glass: MIN_CONTRAST noise sds and ``floor`` above it."""
    centre = np.median(glass)
    noise = 1.4826 * np.median(np.abs(glass - centre))
    return np.median(tissue) - centre > max(MIN_CONTRAST * noise, floor)


def _subtract_background(density, tissue) -> np.ndarray:
    """Density minus the median of the glass (none when tissue fills the image), clipped at 0."""
    background = np.median(density[~tissue]) if (~tissue).any() else 0.0
    return np.maximum(density - background, 0).astype(np.float32)


# ---------------------------------------------------------------- a stack


def read_sections(specs, *, stain: str | None = None, workers: int | None = None,
                  levelled: bool = True) -> list[SectionImage | None]:
    """Every section of ``specs`` read (in threads: the decoders release the GIL), None for missing
    ones, and (levelled) each density divided by its own scale times the stack's median scale, so the
    sections are comparable and keep the channel's units. register-sections reads them unlevelled: a
    section's own percentile also moves with its anatomy (the stack's ends hold less stain), so it
    levels each section against its registered neighbours instead."""
    specs = list(specs)
    present = [s for s in specs if not s.missing and s.file is not None]
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        images = dict(zip((s.order for s in present), pool.map(lambda s: read_section(s, stain=stain), present)))
    if levelled:
        level(list(images.values()))
    return [None if s.missing or s.file is None else images[s.order] for s in specs]


def level(images: list[SectionImage]) -> None:
    """Scale each section's density (in place) by the stack's median scale over its own."""
    scales = [im.scale for im in images if im.scale > 0]
    if not scales:
        return
    common = float(np.median(scales))
    for im in images:
        if im.scale > 0:
            im.density = (im.density * np.float32(common / im.scale)).astype(np.float32)

