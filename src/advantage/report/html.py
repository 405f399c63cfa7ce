"""The report as one self-contained HTML file: template.html with report.css, report.js and the data
inlined. Nothing is fetched when it is opened (no CDN, no fonts, no images), so it works offline and can be
mailed or attached as it is. The page builds every node with textContent, never innerHTML, so trajectory
text (untrusted: the policy wrote it) cannot inject markup."""

from __future__ import annotations

import html
import json
import math
import re
from importlib import resources
from typing import Any

from advantage.report.data import ReportData

PLACEHOLDER = re.compile(r"__(TITLE|CSS|JS|DATA)__")


def _finite(v: Any) -> Any:
    """NaN and inf as None: JSON.parse rejects them."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def script_json(value: Any) -> str:
    """JSON that is safe inside <script type="application/json">: no "</script>", "<!--" or "&" can
    appear raw, because <, > and & are written as \\u escapes (still the same JSON string)."""
    text = json.dumps(_finite(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(ch, esc)
    return text


def render_html(data: ReportData) -> str:
    here = resources.files("advantage.report")
    parts = {
        "TITLE": html.escape(f"advantage report: {data.title}"),
        "CSS": here.joinpath("report.css").read_text(encoding="utf-8"),
        "JS": here.joinpath("report.js").read_text(encoding="utf-8"),
        "DATA": script_json(data.model_dump(mode="json")),
    }
    template = here.joinpath("template.html").read_text(encoding="utf-8")
    return PLACEHOLDER.sub(lambda m: parts[m.group(1)], template)  # one pass: inlined text is not rescanned
