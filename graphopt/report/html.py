"""One self-contained HTML page from a report's data: its script, style, data and Plotly are
inlined, so it opens from disk with no network."""
from __future__ import annotations

import html
import json
from importlib import resources

from ..errors import GraphoptError

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
<script>{plotly}</script>
</head><body>
<header><h1>{title}</h1><div class="machine">{machine}</div></header>
<div class="totals" id="totals"></div>
<div class="error" id="error"></div>
<nav>
<button data-view="overview">Overview</button><button data-view="table">Table</button>
<button data-view="graph">Graph</button><button data-view="passes">Passes</button>
<button data-view="simulate">Simulate</button><button data-view="compare">Compare</button>
</nav>
<section class="view" id="view-overview"><div id="chart" style="height:460px"></div>
<p class="muted">Kernel time from ONNX Runtime's profiler, scaled to the end-to-end latency measured without it
when the profiler inflates it; weights counted once, at their first reader.</p></section>
<section class="view" id="view-table"><div class="controls">
<select id="table-view"></select><select id="filter-op"></select>
<input id="filter-module" placeholder="module contains..."><input id="filter-ms" placeholder="min ms" size="7">
<span id="table-count" class="muted"></span></div>
<div class="tablewrap"><table id="table"></table></div></section>
<section class="view" id="view-graph">
<p class="muted">Click a module to expand or collapse it. <span id="graph-count"></span></p>
<div id="graph"></div></section>
<section class="view" id="view-passes"><table id="passes"></table></section>
<section class="view" id="view-simulate"><p class="muted">Predicted from a cost model fitted to this model's measured
kernel times on this machine; measured after compiling the change (--apply).</p>
<table id="simulations"></table></section>
<section class="view" id="view-compare"><p id="compare-title"></p><div id="compare-chart" style="height:420px"></div>
<table id="compare-table"></table></section>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body></html>
"""


def _static(name: str) -> str:
    return resources.files("graphopt.report").joinpath("static").joinpath(name).read_text(encoding="utf-8")


def _plotly_js() -> str:
    try:
        import plotly.offline
    except ImportError as exc:
        raise GraphoptError("the HTML report inlines Plotly: pip install plotly") from exc
    return plotly.offline.get_plotlyjs()


def _json_for_script(data) -> str:
    """JSON that cannot close its <script> element early."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")


def render(data: dict) -> str:
    machine = data.get("machine") or {}
    parts = [f"backend {data.get('backend')}", f"{machine.get('cpu', '')}", f"{machine.get('cores')} cores",
             f"{machine.get('threads')} threads" if machine.get("threads") else "", data.get("created", "")]
    return _PAGE.format(title=html.escape(data["title"]), machine=html.escape(" · ".join(p for p in parts if p)),
                        css=_static("report.css"), plotly=_plotly_js().replace("</script", "<\\/script"),
                        data=_json_for_script(data), script=_static("report.js"))
