"""Model report benchmark: simulate-before-apply accuracy, and the page's size and render time.

For SmolLM2 (128-token prefill) and our ResNet (one 128x128 image), the report profiles the
compiled model, predicts each change's latency and bytes from that profile, then compiles
the change and measures it beside the unchanged model (interleaved). Target: each prediction
within 15% of the measured latency. Then SmolLM2's report opens in headless chromium: the
time until the page is ready (target < 3 s) and its size (target < 10 MB); a screenshot of
each view is saved (--screenshots, default docs/images).

    python benchmarks/report.py [--json PATH] [--threads N] [--models smollm2,resnet]

A change the model has nothing for prints as "not applicable" (ResNet has no attention
heads; its removable sublayers are the residual blocks with an identity shortcut; weight
quantization covers linear layers, so int8 there is its head).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_json  # noqa: E402

CHANGES = {
    "smollm2": ["int4:model.layers.*", "drop:model.layers.20.mlp,model.layers.24.self_attn,model.layers.26.self_attn",
                "prune:0.3", "heads:0.25"],
    "resnet": ["int8:head", "drop:blocks.1,blocks.3", "prune:0.3", None],
}
KIND_ORDER = ["quantize", "drop sublayers", "prune channels", "drop heads"]


def _inputs(bundle):
    return bundle.example_inputs(size=128) if not bundle.is_sequence_model else bundle.example_inputs(seq_len=128)


def simulate_rows(name: str, threads: int) -> tuple[list[dict], object]:
    import graphopt
    from graphopt.report.sources import report_compiled
    bundle = graphopt.models.load(name)
    compiled = graphopt.compile(bundle.model, _inputs(bundle), passes="default", verify=False, progress=False)
    changes = [c for c in CHANGES[name] if c]
    report = report_compiled(compiled, title=name, threads=threads, simulate=changes, apply=True, progress=True)
    by_change = {row["change"]: row for row in report.data["simulations"]}
    rows = []
    for kind, change in zip(KIND_ORDER, CHANGES[name]):
        row = by_change.get(change) if change else None
        rows.append({
            "name": f"{name} {kind}" + (f" ({change})" if change else " (not applicable)"),
            "baseline_ms": row["baseline_ms"] if row else None,
            "predicted_ms": row["predicted_ms"] if row else None,
            "measured_ms": row["measured_ms"] if row else None,
            "error_pct": 100 * row["error"] if row else None,
            "predicted_mb": row["predicted_bytes"] / 1e6 if row else None,
            "measured_mb": row["measured_bytes"] / 1e6 if row else None,
            "within_15pct": (abs(row["error"]) <= 0.15) if row else None,
        })
    return rows, report


VIEWS = ["overview", "table", "graph", "passes", "simulate"]


def render_row(report, screenshots: str | None) -> dict:
    """Open the report in headless chromium: ready time, size, and a screenshot per view."""
    row = {"name": f"render {report.data['title']} report", "render_ms": None, "html_mb": None}
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    with tempfile.TemporaryDirectory() as tmp:
        path = report.write_html(os.path.join(tmp, "report.html"))
        row["html_mb"] = os.path.getsize(path) / 1e6
        if not (chromium and driver_path):
            row["name"] += " (chromium not installed)"
            return row
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        options = webdriver.ChromeOptions()
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
        ):
            options.add_argument(arg)
        options.binary_location = chromium
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            driver.get("file://" + path)
            row["render_ms"] = float(driver.execute_script("return window.graphoptRenderMs"))
            if screenshots:
                os.makedirs(screenshots, exist_ok=True)
                for view in VIEWS:
                    driver.find_element(By.CSS_SELECTOR, f'nav button[data-view="{view}"]').click()
                    if view == "graph":
                        for module in ("model", "model.layers", "model.layers.0"):
                            driver.find_element(
                                By.CSS_SELECTOR, f'#graph .gitem.module[data-module="{module}"]'
                            ).click()
                    driver.save_screenshot(os.path.join(screenshots, f"report-{view}.png"))
        finally:
            driver.quit()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here as a JSON list")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="smollm2,resnet")
    ap.add_argument("--screenshots", default=os.path.join(os.path.dirname(__file__), "..", "docs", "images"))
    args = ap.parse_args()
    rows, reports = [], {}
    for name in args.models.split(","):
        model_rows, reports[name] = simulate_rows(name, args.threads)
        rows += model_rows
    columns = ["name", "baseline_ms", "predicted_ms", "measured_ms", "error_pct", "predicted_mb", "measured_mb",
               "within_15pct"]
    print_table(rows, columns)
    first = reports.get("smollm2") or next(iter(reports.values()))
    render = render_row(first, args.screenshots if "smollm2" in reports else None)
    print()
    print_table([render], ["name", "render_ms", "html_mb"])
    write_json(rows + [render], args.json)


if __name__ == "__main__":
    main()
