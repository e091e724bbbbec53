"""The demo's ``index.html``: every figure and metric of the run, each with one line on what it
means. Self-contained (figures are files next to it, referenced relatively)."""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi.atomic import atomic_write_text


@dataclass
class Section:
    key: str
    title: str
    what: str  # one line: what this stage does
    seconds: float = 0.0
    status: str = "ok"  # ok | failed | skipped
    error: str | None = None
    figures: list[tuple[str, str]] = field(default_factory=list)  # (path relative to out, one-line meaning)
    metrics: list[tuple[str, Any, str]] = field(default_factory=list)  # (name, value, one-line meaning)
    text: str | None = None  # preformatted text (tables, info output)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.what{color:#555;margin:.2em 0 .8em} .failed{color:#b00020} .skipped{color:#a60}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f6f6f6} figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.92em} pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
.toc a{margin-right:1em}
"""


def write_index(
    out: str | os.PathLike, sections: list[Section], *, total_seconds: float, header: str
) -> Path:
    out = Path(out)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>slidestream demo</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>slidestream demo</h1>",
        f"<p class='what'>{html.escape(header)} Total time {total_seconds:.0f} s.</p>",
        "<p class='toc'>"
        + "".join(f"<a href='#{s.key}'>{html.escape(s.title)}</a>" for s in sections)
        + "</p>",
        "<table><tr><th>stage</th><th>status</th><th>seconds</th></tr>",
    ]
    for s in sections:
        parts.append(
            f"<tr><td><a href='#{s.key}'>{html.escape(s.title)}</a></td>"
            f"<td class='{s.status}'>{s.status}</td><td>{s.seconds:.1f}</td></tr>"
        )
    parts.append("</table>")
    for s in sections:
        parts.append(f"<h2 id='{s.key}'>{html.escape(s.title)}</h2><p class='what'>{html.escape(s.what)}</p>")
        if s.error:
            parts.append(f"<p class='failed'>failed: {html.escape(s.error)}</p>")
        if s.metrics:
            parts.append("<table><tr><th>metric</th><th>value</th><th>what it means</th></tr>")
            for name, value, meaning in s.metrics:
                parts.append(
                    f"<tr><td>{html.escape(name)}</td><td>{html.escape(_fmt(value))}</td><td>{html.escape(meaning)}</td></tr>"
                )
            parts.append("</table>")
        if s.text:
            parts.append(f"<pre>{html.escape(s.text)}</pre>")
        for rel, meaning in s.figures:
            if (out / rel).exists():
                parts.append(
                    f"<figure><img src='{html.escape(rel)}' alt='{html.escape(meaning)}'>"
                    f"<figcaption>{html.escape(meaning)}</figcaption></figure>"
                )
    parts.append("</body></html>")
    path = out / "index.html"
    atomic_write_text(path, "\n".join(parts))
    summary = [
        {
            "stage": s.key,
            "status": s.status,
            "seconds": round(s.seconds, 2),
            "error": s.error,
            "metrics": {n: v for n, v, _ in s.metrics},
        }
        for s in sections
    ]
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    return path
