"""The report's two formats: a section holds its HTML and markdown parts, rendered into one page each."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

from matplotlib.figure import Figure

from kt_edge.evaluate.compare import markdown_table

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}thead{background:#f3f3f3}img{max-width:100%}
.missing{color:#a33;font-style:italic}section{margin-bottom:2em}"""


@dataclass
class Section:
    """One part of the report in both formats; ``missing`` replaces the body when it could not be made."""

    key: str
    title: str
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)
    missing: str | None = None


def png(fig: Figure) -> str:
    """An <img> with the figure inlined as a base64 PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="" src="data:image/png;base64,{data}">'


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def table(section: Section, header: list[str], rows: list[list[str]]) -> None:
    section.html.append(_html_table(header, rows))
    section.md.append(markdown_table(header, rows))


def text(section: Section, text: str) -> None:
    section.html.append(f"<p>{html.escape(text)}</p>")
    section.md.append(text + "\n")


def render_html(name: str, created: str, sections: list[Section]) -> str:
    parts = [
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>kt-edge report: {html.escape(name)}</title>',
        f"<style>{CSS}</style></head><body><h1>kt-edge report: {html.escape(name)}</h1>",
        f"<p>Generated {html.escape(created)}.</p>",
    ]
    for s in sections:
        body = f'<p class="missing">missing: {html.escape(s.missing)}</p>' if s.missing else "\n".join(s.html)
        parts.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>\n{body}\n</section>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_md(name: str, created: str, sections: list[Section]) -> str:
    parts = [f"# kt-edge report: {name}\n", f"Generated {created}; figures are in report.html.\n"]
    for s in sections:
        parts.append(f"## {s.title}\n")
        parts.extend([f"_missing: {s.missing}_\n"] if s.missing else s.md)
    return "\n".join(parts)
