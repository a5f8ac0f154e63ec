"""The report as blocks (headings, paragraphs, tables, images) rendered twice: ``report.md`` (images as
files beside it, for a repository viewer) and a self-contained ``report.html`` (inline CSS, images as
``data:`` URIs, no script or style from elsewhere: it opens from disk, mailed or copied alone).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Block:
    kind: str  # h1 | h2 | h3 | p | ul | table | img | pre
    text: str = ""
    items: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    marked: set[int] = field(default_factory=set)  # table rows to highlight (the best)
    image: bytes = b""
    path: str = ""  # the image file, relative to report.md


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "ul":
            out.append("\n".join(f"- {i}" for i in b.items))
        elif b.kind == "pre":
            out.append("```\n" + b.text + "\n```")
        elif b.kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            out[-1] += "\n|" + "|".join("---" for _ in b.headers) + "|"
            for i, row in enumerate(b.rows):
                cells = [_md_cell(c) for c in row]
                if i in b.marked:
                    cells = [f"**{c}**" if c else c for c in cells]
                out[-1] += "\n| " + " | ".join(cells) + " |"
        elif b.kind == "img":
            out.append(f"![{b.text}]({b.path})")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escaped text with `code` spans and **bold**."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #1b1b1b; }
h1 { font-size: 1.7em; border-bottom: 2px solid #d62728; padding-bottom: .2em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 12.5px; }
th, td { border: 1px solid #d0d0d0; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr.best td { background: #fde8e8; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font: 12px Menlo, Consolas, monospace; background: #f5f5f5; }
pre { padding: .6em; overflow-x: auto; }
img { max-width: 100%; display: block; margin: .5em 0 1.2em; }
.warn { background: #fff3cd; padding: .5em; }
"""

# Marks <body data-images-loaded="n/m"> once the page has loaded, and warns when an image did not decode
# (a check a headless browser can read from the DOM, and a reader sees).
SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
  if (ok < imgs.length) {
    var p = document.createElement("p"); p.className = "warn";
    p.textContent = (imgs.length - ok) + " image(s) of this report did not load";
    document.body.insertBefore(p, document.body.firstChild);
  }
});
"""

NUMERIC = re.compile(r"^[-+]?[\d.,]+(e[-+]?\d+)?\s*[kMGT%s]?$|^\d+:\d\d(:\d\d)?$|^\d+/\d+$")


def to_html(blocks: list[Block], title: str) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style>",
        f"<script>{SCRIPT}</script>",
        "</head><body>",
    ]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            anchor = re.sub(r"[^a-z0-9]+", "-", b.text.lower()).strip("-")
            out.append(f'<{b.kind} id="{anchor}">{_inline(b.text)}</{b.kind}>')
        elif b.kind == "p":
            out.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "pre":
            out.append(f"<pre>{html.escape(b.text)}</pre>")
        elif b.kind == "table":
            rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.headers) + "</tr>"]
            for i, row in enumerate(b.rows):
                cells = "".join(
                    f'<td class="num">{html.escape(c)}</td>' if NUMERIC.match(c) else f"<td>{_inline(c)}</td>"
                    for c in row
                )
                rows.append(f'<tr class="best">{cells}</tr>' if i in b.marked else f"<tr>{cells}</tr>")
            out.append("<table>" + "".join(rows) + "</table>")
        elif b.kind == "img":
            data = base64.b64encode(b.image).decode("ascii")
            out.append(f'<img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def fmt_num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def fmt_tokens(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    from flame.components.metrics import format_duration

    return format_duration(seconds)


def fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={fmt_num(v, 3) if isinstance(v, float) else v}" for k, v in params.items()) or "-"
