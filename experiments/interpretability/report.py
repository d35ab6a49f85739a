"""The HTML report of an interpretability command: one section per ``ReportItem`` (text, PNG figures, CSV tables
rendered as truncated HTML tables) and the run's provenance, written atomically to ``out_dir/report.html``.

Every analysis returns ``list[ReportItem]`` whose paths are relative to the output directory, so the report can be
moved or served together with its files.
"""

from __future__ import annotations

import csv
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.common import atomic_path

MAX_ROWS, MAX_COLS = 40, 24


@dataclass
class ReportItem:
    """One report section: ``title``, free ``text`` (blank lines separate paragraphs), ``figures`` (PNG paths) and
    ``tables`` (CSV paths), both relative to the output directory."""

    title: str
    text: str = ""
    figures: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)


def _table_html(path: Path, relative: str) -> str:
    """A CSV as an HTML table of at most ``MAX_ROWS`` x ``MAX_COLS`` cells, with a link to the whole file."""
    if not path.is_file():
        return f"<p class='missing'>missing table {html.escape(relative)}</p>"
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return f"<p>empty table <a href='{html.escape(relative)}'>{html.escape(relative)}</a></p>"
    header, body = rows[0], rows[1:]
    cut_rows, cut_cols = len(body) > MAX_ROWS, len(header) > MAX_COLS
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row[:MAX_COLS])  # noqa: E731
    lines = [f"<table><caption><a href='{html.escape(relative)}'>{html.escape(relative)}</a></caption>",
             f"<tr>{cells(header, 'th')}</tr>"]
    lines += [f"<tr>{cells(row, 'td')}</tr>" for row in body[:MAX_ROWS]]
    lines.append("</table>")
    if cut_rows or cut_cols:
        lines.append(f"<p class='note'>showing {min(len(body), MAX_ROWS)} of {len(body)} rows and "
                     f"{min(len(header), MAX_COLS)} of {len(header)} columns</p>")
    return "\n".join(lines)


def _item_html(out_dir: Path, item: ReportItem) -> str:
    parts = [f"<section><h2>{html.escape(item.title)}</h2>"]
    for paragraph in filter(None, (p.strip() for p in item.text.split("\n\n"))):
        parts.append(f"<p>{html.escape(paragraph)}</p>")
    for figure in item.figures:
        src = html.escape(figure)
        if (out_dir / figure).is_file():
            parts.append(f"<figure><a href='{src}'><img src='{src}' alt='{src}'></a>"
                         f"<figcaption>{src}</figcaption></figure>")
        else:
            parts.append(f"<p class='missing'>missing figure {src}</p>")
    parts += [_table_html(out_dir / t, t) for t in item.tables]
    parts.append("</section>")
    return "\n".join(parts)


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
figure{display:inline-block;margin:0.5em;vertical-align:top}img{max-width:640px;image-rendering:pixelated}
table{border-collapse:collapse;margin:0.5em 0;font-size:0.85em}td,th{border:1px solid #ccc;padding:2px 6px}
caption{text-align:left}.missing{color:#b00}.note{color:#666;font-size:0.85em}pre{background:#f4f4f4;padding:1em}"""


def write_report(out_dir: Path, title: str, items: list[ReportItem], provenance: dict[str, Any]) -> Path:
    """Writes out_dir/report.html (atomically) showing the items; returns its path."""
    out_dir = Path(out_dir)
    body = "\n".join(_item_html(out_dir, item) for item in items)
    prov = html.escape(json.dumps(provenance, indent=2, default=str))
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n"
            f"<section><h2>Provenance</h2><details><summary>checkpoint, config, commit, versions</summary>"
            f"<pre>{prov}</pre></details></section>\n</body></html>\n")
    path = out_dir / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path
