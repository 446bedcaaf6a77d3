"""The QC page of a section registration: each 2D section over its MRI slice, before and after,
with its landmark TRE and status, and an overview of the stack (docs/sections.md, "QC page").

A folder (``index.html``, ``overview.png``, ``sections/section_###.png``) rather than one page
with the PNGs inside: a 40-section stack is ~40 images a user opens one at a time. It is built
aside and swapped in (``stores.Folder``), so an interrupted run never leaves half a page, and
a folder mrhscale did not make is refused.

Overlays: MRI in grey; where the section has tissue (finite values; NaN = no tissue, shown
transparent) the section is magenta and the MRI green, so structures that agree are white and
a misregistered edge shows as a magenta/green fringe (the ``imshowpair`` convention).
Arrays are drawn as images: row 0 at the top, points as (col, row).
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np

from mrhscale.report.html import STYLE, _fmt, _table
from mrhscale.stores import Folder, write_text

FORMAT = "mrhscale-sections-qc"
DPI = 80
PANEL_IN = (8.0, 4.3)  # one section's figure: before | after
THUMB_PX = 72  # a cell of the overview's mosaic
MOSAIC_COLS = 10
STATUS_COLOURS = {"ok": "#222222", "missing": "#888888", "failed": "#cc0000", "outlier": "#d9730d"}
TRE_KEYS = ("n", "mean", "median", "p90", "max")


@dataclass
class SectionQC:
    """One section of the stack as the QC page shows it (2D arrays on the section's MRI plane)."""

    order: int  # 1-based
    status: str  # "ok", "missing", "failed: <reason>", "outlier: <reason>"
    position_mm: float | None = None
    mri: np.ndarray | None = None  # the MRI contrast resliced on the section's plane
    before: np.ndarray | None = None  # the section placed by its nominal position only
    after: np.ndarray | None = None  # the registered section
    pixel_mm: float = 0.0
    tre_before: dict | None = None  # {"n", "mean", "median", "p90", "max"} in um
    tre_after: dict | None = None
    points_before: np.ndarray | None = None  # (n, 2) col, row of the section's landmarks before
    points_after: np.ndarray | None = None
    points_mri: np.ndarray | None = None  # (n, 2) col, row of their MRI partners
    metrics: dict = field(default_factory=dict)  # e.g. nmi_before, nmi_after, min_jacobian

    @property
    def kind(self) -> str:
        """The status word before any ':' (ok, missing, failed, outlier)."""
        return self.status.split(":", 1)[0].strip().lower()

    @property
    def has_image(self) -> bool:
        return any(a is not None for a in (self.mri, self.before, self.after))

    @property
    def png(self) -> str:
        return f"sections/section_{self.order:03d}.png"


def check_qc_folder(folder: str, what: str = "--qc") -> Folder:
    """The QC folder, refused now (before any registration work) if mrhscale did not make it."""
    qc = Folder(folder, FORMAT, what=what)
    qc.check()
    return qc


def write_sections_qc(folder: str, sections: list[SectionQC], *, title: str, summary: dict,
                      what: str = "--qc") -> str:
    """Write ``folder/index.html``, ``overview.png`` and ``sections/section_###.png``; returns the
    path of ``index.html``. ``summary``: pooled figures shown first (free-form; a dict value such
    as ``{"tre_after": {"n": .., "median": ..}}`` becomes a row of a table)."""
    sections = sorted(sections, key=lambda s: s.order)
    _check_sections(sections)
    qc = Folder(folder, FORMAT, what=what)
    with qc.replace(title=title, n_sections=len(sections)) as work:
        os.makedirs(os.path.join(work, "sections"))
        _SectionFigure().write_all(work, sections)
        overview_png(os.path.join(work, "overview.png"), sections, voxel_um=(summary or {}).get("voxel_um"))
        write_text(os.path.join(work, "index.html"), index_html(sections, title, summary))
    return os.path.join(qc.path, "index.html")


def _check_sections(sections: list[SectionQC]) -> None:
    """Programming errors of the caller (not the user's): duplicate orders, arrays that differ."""
    orders = [s.order for s in sections]
    if len(set(orders)) != len(orders) or any(o < 1 for o in orders):
        raise ValueError(f"section orders must be unique and >= 1, got {orders}")
    for s in sections:
        shapes = {np.shape(a) for a in (s.mri, s.before, s.after) if a is not None}
        if len(shapes) > 1 or any(len(sh) != 2 for sh in shapes):
            raise ValueError(f"section {s.order}: mri, before and after must be 2D of one shape, got {shapes}")


def _matplotlib() -> SimpleNamespace:
    """The matplotlib pieces the page draws with, imported on first use (0.3 s): a stage that
    imports this module for ``SectionQC`` alone does not pay it. Figures are made without
    pyplot (no global state, nothing to close; they render with Agg)."""
    from matplotlib import collections, figure, ticker

    return SimpleNamespace(Figure=figure.Figure, LineCollection=collections.LineCollection, ticker=ticker)


# --------------------------------------------------------------------------- overlays
def _limits(a: np.ndarray | None) -> tuple[float, float]:
    """1st and 99th percentiles of the finite values (0, 1 when there are none)."""
    if a is None:
        return 0.0, 1.0
    v = np.asarray(a, np.float32)
    v = v[np.isfinite(v)]
    if not v.size:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _unit(a: np.ndarray, limits: tuple[float, float]) -> np.ndarray:
    lo, hi = limits
    u = (np.asarray(a, np.float32) - lo) / (hi - lo)
    return np.nan_to_num(np.clip(u, 0.0, 1.0), nan=0.0)


def overlay(mri, section, mri_limits=None, section_limits=None) -> np.ndarray:
    """RGB (rows, cols, 3) in [0, 1]: MRI grey; where the section has tissue, R = B = section
    and G = MRI (magenta / green, white where both are bright). Either may be None."""
    ref = section if mri is None else mri
    m = np.zeros(np.shape(ref), np.float32) if mri is None else _unit(mri, mri_limits or _limits(mri))
    rgb = np.repeat(m[..., None], 3, axis=-1)
    if section is not None:
        tissue = np.isfinite(section)
        s = _unit(section, section_limits or _limits(section))
        rgb[tissue, 0] = s[tissue]
        rgb[tissue, 2] = s[tissue]
    return rgb


def _points(p) -> np.ndarray:
    return np.zeros((0, 2)) if p is None else np.asarray(p, np.float64).reshape(-1, 2)


def _pairs(moved, fixed) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks (col, row) paired by index, those with a NaN dropped."""
    a, b = _points(moved), _points(fixed)
    n = min(len(a), len(b)) if len(a) and len(b) else max(len(a), len(b))
    a = a[:n] if len(a) else np.full((n, 2), np.nan)
    b = b[:n] if len(b) else np.full((n, 2), np.nan)
    return a, b


def _tre_text(t: dict | None, key: str = "median") -> str:
    v = (t or {}).get(key)
    return "–" if v is None or not math.isfinite(v) else f"{v:.0f}"


def _scale_mm(width_mm: float) -> float:
    """A round scale-bar length, about a quarter of the image's width."""
    nice = [0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 20]
    return max([n for n in nice if n <= width_mm / 4] or [nice[0]])


# --------------------------------------------------------------------------- one section
class _Panel:
    """One half of a section's figure (before or after); its artists are made once and updated."""

    def __init__(self, ax):
        self.ax = ax
        ax.set_axis_off()
        self.image = ax.imshow(np.zeros((2, 2, 3)), interpolation="nearest")
        self.links = _matplotlib().LineCollection([], colors="yellow", linewidths=0.8)
        ax.add_collection(self.links)
        self.mri_pts, = ax.plot([], [], "o", ms=4, mfc="none", mec="cyan", mew=1.0)
        self.moved_pts, = ax.plot([], [], "x", ms=4, color="yellow", mew=1.0)
        self.bar, = ax.plot([], [], "-", color="white", lw=2.5, solid_capstyle="butt")
        self.bar_label = ax.text(0, 0, "", color="white", fontsize=7, va="bottom")
        self.empty = ax.text(0.5, 0.5, "no image", transform=ax.transAxes, ha="center",
                             va="center", color="#888888", fontsize=10)

    def draw(self, rgb, moved, fixed, pixel_mm: float, title: str) -> None:
        self.ax.set_title(title, fontsize=8, y=1.0, parse_math=False)  # a fixed y: no layout pass over the axes per draw
        shown = rgb is not None
        for artist in (self.image, self.links, self.mri_pts, self.moved_pts, self.bar, self.bar_label):
            artist.set_visible(shown)
        self.empty.set_visible(not shown)
        if not shown:
            return
        rows, cols = rgb.shape[:2]
        self.image.set_data(rgb)
        self.image.set_extent((-0.5, cols - 0.5, rows - 0.5, -0.5))
        self.ax.set_xlim(-0.5, cols - 0.5)
        self.ax.set_ylim(rows - 0.5, -0.5)
        self._landmarks(moved, fixed)
        self._scale_bar(rows, cols, pixel_mm)

    def _landmarks(self, moved, fixed) -> None:
        a, b = _pairs(moved, fixed)
        both = np.isfinite(a).all(1) & np.isfinite(b).all(1)
        self.links.set_segments([np.stack([p, q]) for p, q in zip(a[both], b[both])])
        self.mri_pts.set_data(b[:, 0], b[:, 1])
        self.moved_pts.set_data(a[:, 0], a[:, 1])

    def _scale_bar(self, rows: int, cols: int, pixel_mm: float) -> None:
        ok = pixel_mm and pixel_mm > 0
        self.bar.set_visible(bool(ok))
        self.bar_label.set_visible(bool(ok))
        if not ok:
            return
        mm = _scale_mm(cols * pixel_mm)
        x0, y = 0.05 * cols, 0.93 * rows
        self.bar.set_data([x0, x0 + mm / pixel_mm], [y, y])
        self.bar_label.set_position((x0, y - 0.02 * rows))
        self.bar_label.set_text(f"{mm:g} mm")


class _SectionFigure:
    """One reused figure for every section's PNG: only the data changes between sections, so a
    stack of 40 renders in seconds (a new figure and layout each would cost several times that)."""

    def __init__(self):
        self.fig = _matplotlib().Figure(figsize=PANEL_IN)
        axes = self.fig.subplots(1, 2)
        self.fig.subplots_adjust(left=0.01, right=0.99, top=0.84, bottom=0.07, wspace=0.04)
        self.panels = [_Panel(a) for a in axes]
        self.fig.text(0.5, 0.015, "MRI grey/green, section magenta, both white; o MRI landmark, x section's", ha="center", fontsize=7,
                      color="#555555")

    def write_all(self, folder: str, sections: list[SectionQC]) -> None:
        for s in sections:
            if s.has_image:
                self.write(os.path.join(folder, s.png), s)

    def write(self, path: str, s: SectionQC) -> str:
        mri_lim = _limits(s.mri)
        sec_lim = _limits(s.after if s.after is not None else s.before)
        for panel, name, sec, tre, pts in ((self.panels[0], "before", s.before, s.tre_before, s.points_before),
                                           (self.panels[1], "after", s.after, s.tre_after, s.points_after)):
            rgb = None if sec is None and s.mri is None else overlay(s.mri, sec, mri_lim, sec_lim)
            panel.draw(rgb, pts, s.points_mri, s.pixel_mm, _panel_title(name, tre, s.metrics, sec is None))
        self.fig.suptitle(_section_title(s), fontsize=10, color=status_colour(s.kind), parse_math=False)
        self.fig.savefig(path, dpi=DPI, format="png", pil_kwargs={"compress_level": 1})
        return path


def status_colour(kind: str) -> str:
    return STATUS_COLOURS.get(kind, "#222222")


def _section_title(s: SectionQC) -> str:
    where = "" if s.position_mm is None else f" at {s.position_mm:.2f} mm"
    return (f"section {s.order}{where}: {s.status}; TRE median "
            f"{_tre_text(s.tre_before)} -> {_tre_text(s.tre_after)} um")


def _panel_title(name: str, tre: dict | None, metrics: dict, no_section: bool = False) -> str:
    label = "before (nominal position)" if name == "before" else "after registration"
    if no_section:  # the MRI alone: what the section should have matched
        label += ": no section"
    nmi = metrics.get(f"nmi_{name}")
    parts = [label]
    if tre and tre.get("n"):
        parts.append(f"TRE median {_tre_text(tre)}, p90 {_tre_text(tre, 'p90')} um (n={tre['n']})")
    if isinstance(nmi, (int, float)) and math.isfinite(nmi):
        parts.append(f"NMI {nmi:.3f}")
    return "\n".join([parts[0], "; ".join(parts[1:])])


# --------------------------------------------------------------------------- the stack
def _thumbnail(rgb: np.ndarray, size: int = THUMB_PX) -> np.ndarray:
    """``rgb`` shrunk (nearest pixel) into a size x size cell, centred on black."""
    rows, cols = rgb.shape[:2]
    k = size / max(rows, cols)
    r = np.linspace(0, rows - 1, max(1, round(rows * k))).astype(int)
    c = np.linspace(0, cols - 1, max(1, round(cols * k))).astype(int)
    small = rgb[r][:, c]
    cell = np.zeros((size, size, 3), np.float32)
    r0, c0 = (size - len(r)) // 2, (size - len(c)) // 2
    cell[r0:r0 + len(r), c0:c0 + len(c)] = small
    return cell


def _mosaic(sections: list[SectionQC]) -> np.ndarray:
    """Every section's 'after' overlay (its 'before' where it failed), one cell each, in order;
    a missing section's cell is dark grey."""
    n_rows = max(1, math.ceil(len(sections) / MOSAIC_COLS))
    pad = THUMB_PX + 2
    out = np.ones((n_rows * pad, min(len(sections), MOSAIC_COLS) * pad or pad, 3), np.float32)
    for i, s in enumerate(sections):
        sec = s.after if s.after is not None else s.before
        cell = (np.full((THUMB_PX, THUMB_PX, 3), 0.25, np.float32) if not s.has_image
                else _thumbnail(overlay(s.mri, sec)))
        r, c = divmod(i, MOSAIC_COLS)
        out[r * pad + 1:r * pad + 1 + THUMB_PX, c * pad + 1:c * pad + 1 + THUMB_PX] = cell
    return out


def overview_png(path: str, sections: list[SectionQC], voxel_um: float | None = None) -> str:
    """The stack at a glance: the mosaic of overlays (order and status on each cell) over a
    plot of TRE per section along the stack, before and after (with 1 and 2 MRI voxels marked
    when ``voxel_um`` is given: the accuracy the literature states in voxels)."""
    mosaic = _mosaic(sections)
    width = 10.0
    mosaic_h = width * mosaic.shape[0] / mosaic.shape[1]
    fig = _matplotlib().Figure(figsize=(width, mosaic_h + 3.0))
    top = fig.add_axes((0.01, 3.0 / (mosaic_h + 3.0), 0.98, mosaic_h / (mosaic_h + 3.0) - 0.01))
    top.imshow(mosaic, interpolation="nearest")
    top.set_axis_off()
    _label_cells(top, sections)
    plot = fig.add_axes((0.07, 0.45 / (mosaic_h + 3.0), 0.91, 2.1 / (mosaic_h + 3.0)))
    _tre_plot(plot, sections, voxel_um)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _label_cells(ax, sections: list[SectionQC]) -> None:
    pad = THUMB_PX + 2
    for i, s in enumerate(sections):
        r, c = divmod(i, MOSAIC_COLS)
        text = f"{s.order}" + ("" if s.kind == "ok" else f" {s.kind}")
        ax.text(c * pad + 3, r * pad + 3, text, parse_math=False, color=status_colour(s.kind) if s.kind != "ok" else "white",
                fontsize=7, va="top", ha="left",
                bbox={"facecolor": "white" if s.kind != "ok" else "none", "alpha": 0.7, "lw": 0, "pad": 0.5})


def _tre_plot(ax, sections: list[SectionQC], voxel_um: float | None) -> None:
    """TRE median per section (p90 as a thin line above it), before in grey and after in blue;
    failed / outlier / missing sections shaded in their status colour."""
    x = np.array([s.order for s in sections], float)
    for key, colour, label in (("tre_before", "0.55", "before"), ("tre_after", "tab:blue", "after")):
        med = np.array([_value(getattr(s, key), "median") for s in sections])
        p90 = np.array([_value(getattr(s, key), "p90") for s in sections])
        ax.plot(x, med, "o-", color=colour, ms=3, lw=1, label=f"{label}: median")
        ax.plot(x, p90, ":", color=colour, lw=0.8, label=f"{label}: p90")
    for s in sections:
        if s.kind != "ok":
            ax.axvspan(s.order - 0.5, s.order + 0.5, color=status_colour(s.kind), alpha=0.15, lw=0)
    if isinstance(voxel_um, (int, float)) and voxel_um > 0:
        for k in (1, 2):
            ax.axhline(k * voxel_um, color="k", lw=0.6, ls="--")
            ax.text(x.min() - 0.45 if len(x) else 0, k * voxel_um, f"{k} MRI voxel{'s' * (k > 1)}",
                    fontsize=7, ha="left", va="bottom")
    if any(_value(t, "median") > 0 for s in sections for t in (s.tre_before, s.tre_after)):
        _log_axis(ax)
    ax.set_xlabel("section (order along the stack); shaded: missing (grey), failed (red), outlier (orange)",
                  fontsize=8)
    ax.set_ylabel("landmark TRE (um)", fontsize=8)
    ax.tick_params(labelsize=7)
    if len(x):
        ax.set_xlim(x.min() - 0.5, x.max() + 0.5)
    ax.legend(fontsize=7, ncol=4, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)


def _log_axis(ax) -> None:
    """A log TRE axis labelled in plain numbers (TRE before and after differ by 10x or more)."""
    ticker = _matplotlib().ticker
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _value(t: dict | None, key: str) -> float:
    v = (t or {}).get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else float("nan")


# --------------------------------------------------------------------------- the page
PAGE_STYLE = """
td.status, td.left, th.left { text-align: left; }
tr.failed td { background: #fde2e2; } tr.outlier td { background: #fdebd3; }
tr.missing td { color: #888; font-style: italic; }
img.thumb { width: 320px; max-width: none; }
"""
COLUMNS = ("", "order", "position (mm)", "status", "landmarks", "TRE median (um)", "TRE p90 (um)", "NMI")


def index_html(sections: list[SectionQC], title: str, summary: dict) -> str:
    """The page: the pooled summary, the status counts, the overview, then one row per section."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    extra = _extra_metrics(sections)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in (*COLUMNS, *extra))
    rows = "".join(_row(s, extra) for s in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}{PAGE_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p style="color:#666">generated {stamp} by mrhscale</p>
<h2>Summary</h2>
{_summary_tables(summary)}
<p>{_status_counts(sections)}. TRE: landmark distance in the section's plane, in um.</p>
<h2>Overview</h2>
<figure><a href="overview.png"><img src="overview.png" alt="overview of the stack"></a>
<figcaption>each section after registration (MRI green, section magenta) and its landmark TRE
along the stack</figcaption></figure>
<h2>Sections</h2>
<table><tr>{head}</tr>{rows}</table>
</body></html>
"""


def _summary_tables(summary: dict) -> str:
    """Scalars as one two-column table; dict values (e.g. tre_before, tre_after) as rows of another."""
    flat = {k: v for k, v in (summary or {}).items() if not isinstance(v, dict)}
    nested = {k: v for k, v in (summary or {}).items() if isinstance(v, dict)}
    return (_table(flat) if flat else "") + (_table(nested) if nested else "")


def _status_counts(sections: list[SectionQC]) -> str:
    counts: dict[str, int] = {}
    for s in sections:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    return f"{len(sections)} sections: " + ", ".join(f"{k} {n}" for k, n in counts.items())


def _extra_metrics(sections: list[SectionQC]) -> list[str]:
    """Metric columns beyond NMI (e.g. min_jacobian), in first-seen order."""
    keys = dict.fromkeys(k for s in sections for k in s.metrics if k not in ("nmi_before", "nmi_after"))
    return list(keys)


def _arrow(before, after) -> str:
    return f"{_fmt(before)} &rarr; {_fmt(after)}"


def _row(s: SectionQC, extra: list[str]) -> str:
    thumb = (f'<a href="{s.png}"><img class="thumb" src="{s.png}" alt="section {s.order}" loading="lazy"></a>'
             if s.has_image else "")
    n = max(_value(s.tre_before, "n"), _value(s.tre_after, "n"))
    position = None if s.position_mm is None else f"{s.position_mm:.2f}"
    cells = [thumb, str(s.order), _fmt(position), html.escape(s.status),
             _fmt(int(n) if math.isfinite(n) else None),
             _arrow(_rounded(s.tre_before, "median"), _rounded(s.tre_after, "median")),
             _arrow(_rounded(s.tre_before, "p90"), _rounded(s.tre_after, "p90")),
             _arrow(s.metrics.get("nmi_before"), s.metrics.get("nmi_after")),
             *(_fmt(s.metrics.get(k)) for k in extra)]
    tds = "".join(f'<td class="status">{c}</td>' if i == 3 else f"<td>{c}</td>" for i, c in enumerate(cells))
    return f'<tr class="{html.escape(s.kind)}" id="section-{s.order}">{tds}</tr>'


def _rounded(t: dict | None, key: str) -> float | None:
    v = _value(t, key)
    return None if not math.isfinite(v) else round(v, 1)
