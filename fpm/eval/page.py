"""Markdown reports as one self-contained HTML page (plots embedded), for `fpm report`, and how
their plots are written."""

from __future__ import annotations

import base64
import html
from pathlib import Path


def to_html(md: str, files: dict[str, Path], title: str) -> str:
    """A small Markdown subset (headings, tables, quotes, paragraphs) → one self-contained page."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
           "blockquote{background:#fff3cd;padding:.5em 1em;border-left:4px solid #e0a800}img{max-width:100%}</style>",
           "</head><body>"]
    images = {f"plots/{p.name}": base64.b64encode(p.read_bytes()).decode() for p in files.values()}
    rows: list[str] = []

    def flush():
        if rows:
            out.append("<table>" + "".join(rows) + "</table>")
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            tag = "th" if not rows else "td"
            rows.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        flush()
        if line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("> "):
            out.append(f"<blockquote>{html.escape(line[2:]).replace('**', '')}</blockquote>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1: -1]
            out.append(f"<p><img alt='{html.escape(src)}' src='data:image/png;base64,{images.get(src, '')}'></p>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    out.append("</body></html>")
    return "\n".join(out)


def save_figure(fig, path: Path) -> Path:
    """A report's matplotlib figure as a PNG at ``path`` (laid out, 110 dpi), then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
