"""HTML pieces of the evaluation report: one self-contained page (inline CSS, base64 images, no links out)."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path

CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:8px 0 4px} h2{font-size:20px;margin:34px 0 10px;border-bottom:2px solid #dde2ea;
padding-bottom:4px} .sub{color:#5b6576;margin:0 0 14px}
nav a{margin-right:14px;color:#2456a6;text-decoration:none} nav{margin:10px 0 4px;font-size:14px}
table{border-collapse:collapse;margin:8px 0 14px;background:#fff;font-size:14px}
th,td{border:1px solid #dde2ea;padding:5px 10px;text-align:right} th{background:#eef1f6}
td:first-child,th:first-child{text-align:left}
img.fig{max-width:100%;background:#fff;border:1px solid #dde2ea;border-radius:4px;margin:6px 0}
.kv{display:grid;grid-template-columns:max-content auto;gap:3px 18px;background:#fff;padding:12px 16px;
border:1px solid #dde2ea;border-radius:4px} .kv b{color:#5b6576;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px}
.card{background:#fff;border:1px solid #dde2ea;border-radius:4px;padding:6px;font-size:13px}
.card img{width:100%;height:150px;object-fit:cover;border-radius:3px} .bad{color:#b3261e;font-weight:600}
.note{color:#5b6576;font-size:13.5px;max-width:900px}
"""


def esc(x: object) -> str:
    return html.escape(str(x))


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def figure(png: Path, alt: str) -> str:
    """A PNG written next to the report, embedded so the HTML file stands alone."""
    return f'<img class="fig" alt="{esc(alt)}" src="{data_uri(png.read_bytes(), "image/png")}">'


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_values(pairs: Iterable[tuple[str, object]]) -> str:
    return '<div class="kv">' + "".join(f"<b>{esc(k)}</b><span>{esc(v)}</span>" for k, v in pairs) + "</div>"


def section(sid: str, title: str, body: str, note: str = "") -> str:
    """Every section carries `data-section` so tests (and readers' tools) can find it."""
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{sid}" data-section="{sid}"><h2>{esc(title)}</h2>{note_html}{body}</section>'


def mistake_cards(items: list[dict]) -> str:
    """items: {thumb: bytes | None, true, pred, confidence, path}."""
    cards = []
    for it in items:
        img = (f'<img alt="{esc(it["path"])}" src="{data_uri(it["thumb"], "image/jpeg")}">' if it["thumb"]
               else "<div>(image unavailable)</div>")
        cards.append(f'<div class="card">{img}<div>true: <b>{esc(it["true"])}</b></div>'
                     f'<div class="bad">predicted: {esc(it["pred"])}</div>'
                     f'<div>confidence {it["confidence"]:.3f}</div>'
                     f'<div class="note" title="{esc(it["path"])}">{esc(Path(it["path"]).name)}</div></div>')
    return '<div class="grid">' + "".join(cards) + "</div>"


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """sections: (id, nav title, html)."""
    nav = "".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name, _ in sections)
    body = "".join(s for _, _, s in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
            f'<body><main><h1>{esc(title)}</h1><p class="sub">{esc(subtitle)}</p><nav>{nav}</nav>{body}'
            f"</main></body></html>\n")
