"""The page: one static HTML file with inline CSS, relative links to its own files, no script from
anywhere, no font or style sheet from a CDN. Every string from a table, manifest or metadata goes
through ``esc`` (``html.escape``, quotes included) before it reaches the page."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f2d3d;color:#fff;padding:12px 24px}header h1{margin:0;font-size:20px}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:6px 24px;z-index:2}
nav a{margin-right:14px;color:#1f5fa8;text-decoration:none}
main{padding:0 24px 40px}section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;margin:18px 0;padding:6px 18px 16px}
h2{font-size:18px;border-bottom:1px solid #eee;padding-bottom:4px}h3{font-size:15px;margin:14px 0 6px}h4{font-size:13px;margin:8px 0 4px}
table.t{border-collapse:collapse;margin:6px 0}table.t td,table.t th{border:1px solid #ddd;padding:3px 8px;text-align:left;font-size:13px}
table.t th{background:#f2f4f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff6d6;border-left:4px solid #e0b000;padding:6px 10px;margin:8px 0}
.grid{display:flex;flex-wrap:wrap;gap:6px;margin:4px 0 10px}
figure.th{margin:0;width:86px;font-size:10.5px;line-height:1.25;text-align:center;overflow:hidden}
figure.th img{width:80px;height:80px;object-fit:contain;image-rendering:pixelated;background:#eee;border:1px solid #ccc}
figure.th.sus img{border:2px solid #c0392b}figure.th.kept img{border:2px solid #2e7d32}
figure.th figcaption{word-break:break-all}
.row{display:flex;flex-wrap:wrap;gap:22px;align-items:flex-start}.col{flex:1 1 420px;min-width:300px}
.dup{display:inline-block;border:1px solid #ddd;border-radius:4px;padding:4px;margin:3px}
img.plot{max-width:100%;height:auto}
small,.muted{color:#666}
"""


def esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else ("∞" if v == math.inf else "−∞" if v == -math.inf else f"{v:.{digits}g}")
    return esc(v)


def table(headers: Iterable[Any], rows: Iterable[Iterable[Any]]) -> str:
    """A small table; numbers right-aligned, everything escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for v in r:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="n">{num(v)}</td>')
            else:
                cells.append(f"<td>{esc(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="t"><tr>{head}</tr>{"".join(body)}</table>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def img(src: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{esc(cls)}" src="{esc(src)}" alt="{esc(alt)}">'


@dataclass
class Grid:
    """Thumbnails of table rows; rendered once the thumbnails exist. ``lines`` per row: the caption
    under it (key, label, score...); ``css`` per row: an extra class (``sus``, ``kept``)."""

    title: str
    idx: list[int]
    lines: list[list[str]] = field(default_factory=list)
    css: list[str] = field(default_factory=list)
    empty: str = "no rows"

    def render(self, thumbs: dict[int, str]) -> str:
        head = f"<h4>{esc(self.title)}</h4>" if self.title else ""
        if not self.idx:
            return head + f'<p class="muted">{esc(self.empty)}</p>'
        cells = []
        for j, i in enumerate(self.idx):
            lines = self.lines[j] if j < len(self.lines) else []
            cls = self.css[j] if j < len(self.css) else ""
            tip = " · ".join(lines)
            cap = "<br>".join(esc(x) for x in lines)
            cells.append(f'<figure class="th {esc(cls)}" title="{esc(tip)}">'
                         f'<img src="{esc(thumbs.get(i, ""))}" alt="{esc(tip)}" loading="eager">'
                         f"<figcaption>{cap}</figcaption></figure>")
        return head + '<div class="grid">' + "".join(cells) + "</div>"


Block = Any  # str (HTML) or Grid


@dataclass
class Section:
    anchor: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> "Section":
        self.blocks.extend(blocks)
        return self

    def grids(self) -> list[Grid]:
        return [b for b in self.blocks if isinstance(b, Grid)]

    def render(self, thumbs: dict[int, str]) -> str:
        inner = "".join(b.render(thumbs) if isinstance(b, Grid) else b for b in self.blocks)
        return f'<section id="{esc(self.anchor)}"><h2>{esc(self.title)}</h2>{inner}</section>'


def page(title: str, subtitle: str, sections: list[Section], thumbs: dict[int, str]) -> str:
    nav = "".join(f'<a href="#{esc(s.anchor)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(s.render(thumbs) for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><link rel=\"icon\" href=\"assets/favicon.png\"><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><div>{esc(subtitle)}</div></header><nav>{nav}</nav><main>{body}</main>"
            "</body></html>\n")
