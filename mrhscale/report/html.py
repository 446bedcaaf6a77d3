"""One self-contained HTML page of metrics tables and figures (PNGs embedded as base64).

Used by ``evaluate``, ``importance`` and the demo: a report can be mailed or
archived as one file, without the PNGs beside it.
"""

from __future__ import annotations

import base64
import html
import math
import os
from datetime import UTC, datetime

from mrhscale.report.tables import evaluation_tables, importance_tables
from mrhscale.stores import write_text

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 1.5em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; }
figure { margin: 0.8em 0; } img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; }
"""  # every mrhscale page looks the same (report.html, the sections' QC page)


def _fmt(v) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "&ndash;"
        if math.isinf(v):
            return "&infin;"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) > 12:
        return html.escape(", ".join(map(str, v[:12])) + f", ... ({len(v)})")
    return html.escape(str(v))


def _table(d: dict) -> str:
    """dict of rows (each a dict of columns) -> a table; a flat dict -> two columns."""
    if d and all(isinstance(v, dict) for v in d.values()):
        cols: list[str] = []
        for row in d.values():
            cols += [c for c in row if c not in cols and not isinstance(row[c], (dict, list))]
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join(
            f"<tr><th>{html.escape(str(k))}</th>" + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in cols) + "</tr>"
            for k, row in d.items()
        )
        return f"<table><tr><th></th>{head}</tr>{body}</table>"
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in d.items())
    return f"<table>{body}</table>"


def _section(title: str, value) -> str:
    h = f"<h2>{html.escape(str(title))}</h2>"
    if isinstance(value, dict):
        return h + _table(value)
    if isinstance(value, (list, tuple)):
        return h + "<ul>" + "".join(f"<li>{html.escape(str(v))}</li>" for v in value) + "</ul>"
    return h + f"<p>{_fmt(value)}</p>"


def _img(path: str, caption: str) -> str:
    with open(path, "rb") as fh:
        b64 = base64.b64encode(fh.read()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{b64}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _figure_list(figures) -> list[tuple[str, str]]:
    """(path, caption) pairs from a list of paths / pairs or a {caption: path} dict."""
    if isinstance(figures, dict):
        return [(os.fspath(p), str(c)) for c, p in figures.items()]
    return [(os.fspath(f), os.path.basename(f)) if isinstance(f, (str, os.PathLike)) else tuple(f)
            for f in figures or []]


def write_report(out_dir: str, metrics: dict, figures, title: str, filename: str = "report.html") -> str:
    """Write ``out_dir/report.html``; returns its path.

    ``metrics``: {section title: table dict | list | scalar}; a table dict maps row
    names to {column: value} (or is flat: name -> value). ``figures``: a list of
    PNG paths or (path, caption) pairs, or a {caption: path} dict.
    """
    figs = _figure_list(figures)
    parts = [_section(k, v) for k, v in (metrics or {}).items()]
    imgs = [_img(os.fspath(p), c) for p, c in figs if p and os.path.exists(p)]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p style="color:#666">generated {stamp} by mrhscale</p>
{''.join(parts)}
{'<h2>Figures</h2>' if imgs else ''}{''.join(imgs)}
</body></html>
"""

    return write_text(os.path.join(out_dir, filename), doc)


def summary_report(out_dir: str, *, evaluation: dict | None = None, importance: dict | None = None,
                   tables: dict | None = None, figures=None, title: str = "mrhscale report",
                   filename: str = "report.html") -> str:
    """One page from the results of ``evaluate()`` and/or ``importance()`` plus extra parts.

    ``tables``/``figures`` (same forms as :func:`write_report`) come first, e.g. the
    demo's pipeline summary and training curve; then the evaluation's tables and
    figures, then the importance table and bar chart.
    """
    all_tables = dict(tables or {})
    figs = _figure_list(figures)
    if evaluation:
        all_tables.update(evaluation_tables(evaluation))
        caps = evaluation.get("figure_captions", {})
        figs += [(os.path.join(evaluation["out_dir"], f), caps.get(f, f)) for f in evaluation.get("figures", [])]
    if importance:
        all_tables.update({f"Importance: {k}": v for k, v in importance_tables(importance).items()})
        figs += [(os.path.join(importance["out_dir"], f), "contrast importance (permutation)")
                 for f in importance.get("figures", [])]
    return write_report(out_dir, all_tables, figs, title, filename=filename)
