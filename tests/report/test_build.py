"""The report's data (totals, rollups, pass log, failures) and its self-contained HTML page."""
from __future__ import annotations

import json
import math
import os
import re

import pytest

import graphopt
from graphopt.report.build import compare_layers, layer_of
from graphopt.report.sources import report_artifact, report_compiled


def test_layer_of_finds_the_repeated_block():
    assert layer_of("model.layers.3.mlp.up_proj") == "model.layers.3"
    assert layer_of("blocks.2.conv1") == "blocks.2"
    assert layer_of("head") == "head"
    assert layer_of("") == ""


def test_totals_add_up_to_the_end_to_end_latency(resnet_report):
    t = resnet_report.data["totals"]
    kernels = resnet_report.data["kernels"]
    assert t["kernels"] == len(kernels) > 0
    assert math.isclose(t["attributed_ms"], sum(k["ms"] for k in kernels), rel_tol=1e-9)
    assert math.isclose(t["attributed_ms"] + t["unattributed_ms"], t["latency_ms"], rel_tol=1e-9)
    assert t["attributed_ms"] <= t["latency_ms"] * (1 + 1e-9)     # scaled down when the profiler inflates
    assert 0 < t["profiler_scale"] <= 1


def test_module_rollup_sums_its_kernels_at_every_depth(resnet_report):
    data = resnet_report.data
    modules = {m["module"]: m for m in data["modules"]}
    assert math.isclose(modules[""]["ms"], data["totals"]["attributed_ms"], rel_tol=1e-9)
    for row in data["modules"]:
        inside = [k for k in data["kernels"] if row["module"] == "" or k["module"] == row["module"]
                  or k["module"].startswith(row["module"] + ".")]
        assert row["kernels"] == len(inside)
        assert math.isclose(row["ms"], sum(k["ms"] for k in inside), rel_tol=1e-9, abs_tol=1e-12)
        assert row["weight_bytes"] == sum(k["weight_bytes"] for k in inside)
    assert modules["blocks.0"]["module_class"] == "BasicBlock"
    assert modules["blocks.0"]["parent"] == "blocks"


def test_layers_follow_execution_order(resnet_report):
    layers = [row["layer"] for row in resnet_report.data["layers"]]
    assert layers.index("stem.1") < layers.index("blocks.0") < layers.index("blocks.5") < layers.index("head")


def test_pass_log_has_bytes_and_macs_before_and_after(resnet_report):
    passes = resnet_report.data["passes"]
    assert passes
    cleanup = next(p for p in passes if p["name"] == "dead_code_elimination")
    assert cleanup["modified"] and cleanup["nodes_after"] < cleanup["nodes_before"]
    assert cleanup["bytes_after"] < cleanup["bytes_before"] and cleanup["changes"]
    for p in passes:
        assert p["bytes_before"] > 0 and p["macs_before"] > 0 and p["bytes_after"] > 0 and p["macs_after"] > 0


def test_graph_view_nodes_carry_the_kernel_time(resnet_report):
    graph = resnet_report.data["graph"]["nodes"]
    assert math.isclose(sum(n["ms"] for n in graph), resnet_report.data["totals"]["attributed_ms"], rel_tol=1e-9)
    for i, node in enumerate(graph):
        assert all(j < i for j in node["inputs"])                  # topological order


def test_html_is_self_contained_and_small(resnet_report, tmp_path):
    path = resnet_report.write_html(str(tmp_path / "r.html"))
    text = open(path, encoding="utf-8").read()
    assert os.path.getsize(path) < 10e6
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text)      # nothing fetched
    assert "Plotly" in text and 'id="report-data"' in text
    embedded = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S).group(1)
    assert json.loads(embedded)["totals"]["kernels"] == resnet_report.data["totals"]["kernels"]


def test_json_is_the_same_data(resnet_report, tmp_path):
    path = resnet_report.write_json(str(tmp_path / "r.json"))
    with open(path) as f:
        data = json.load(f)
    assert data["totals"] == resnet_report.data["totals"]
    assert len(data["kernels"]) == len(resnet_report.data["kernels"])


def test_artifact_report_reads_the_manifest_pass_log(resnet_compiled, tmp_path):
    directory = resnet_compiled.save(str(tmp_path / "artifact"))
    report = report_artifact(directory, threads=1, runs=2)
    assert report.data["totals"]["kernels"] > 0 and report.data["totals"]["unmapped_kernel_ms"] == 0
    assert [p["name"] for p in report.data["passes"]] == [r.name for r in resnet_compiled.records]
    assert report.data["totals"]["artifact_bytes"] > report.data["totals"]["weight_bytes"]


def test_compare_puts_two_reports_side_by_side(resnet_report, llama_compiled):
    other = report_compiled(llama_compiled, title="llama", runs=2)
    compared = compare_layers(resnet_report, other)
    layers = {row["layer"]: row for row in compared["layers"]}
    assert layers["blocks.0"]["ms_a"] > 0 and layers["blocks.0"]["ms_b"] is None
    assert compared["latency_ms_b"] == other.latency_ms


def test_failure_report_marks_the_node_that_failed(failure_report):
    data = failure_report.data
    assert data["error"] and "aten.cummax" in data["error"]["message"]
    assert data["error"]["node"] == "cummax" and data["error"]["stage"] == "UnsupportedOpError"
    names = [n["name"] for n in data["graph"]["nodes"]]
    assert "cummax" in names and data["kernels"] == []
    assert any(n["module"] == "proj" for n in data["graph"]["nodes"])
    failed = next(n for n in data["graph"]["nodes"] if n["name"] == "cummax")
    assert failed["source"].startswith("conftest.py:")


def test_text_generation_and_tvm_reports_are_refused(resnet_compiled):
    from graphopt.errors import GraphoptError
    resnet_compiled.task = {"name": "text-generation"}
    try:
        with pytest.raises(GraphoptError, match="text-generation artifacts are not supported yet"):
            report_compiled(resnet_compiled)
    finally:
        resnet_compiled.task = None
    bundle = graphopt.models.load("resnet")
    compiled = graphopt.compile(bundle.model, bundle.example_inputs(), backend="torch", progress=False)
    with pytest.raises(GraphoptError, match="'torch' is not supported yet"):
        report_compiled(compiled)
