"""Simulate before apply: change specs, the cost model, predictions, and apply."""
from __future__ import annotations

import math

import pytest

from graphopt.errors import GraphoptError
from graphopt.ir.graph import module_path, parameter_bytes
from graphopt.ir.quantized import MATMUL_NBITS
from graphopt.report.simulate import apply_change, fit_cost_model, parse_change, predict, simulate
from graphopt.report.sources import report_compiled


@pytest.fixture(scope="module")
def llama_report(llama_compiled):
    return report_compiled(llama_compiled, title="llama", threads=1, runs=3)


@pytest.mark.parametrize("text, message", [
    ("int4", "expected KIND:VALUE"), ("fp8:x", "expected KIND:VALUE"), ("prune:abc", "is not a ratio"),
    ("heads:1.5", r"must be in \(0, 1\)"), ("prune:", "expected KIND:VALUE"),
])
def test_bad_change_specs_are_one_line_errors(text, message):
    with pytest.raises(GraphoptError, match=message):
        parse_change(text)


def test_a_change_that_matches_nothing_is_refused(llama_compiled):
    captured = llama_compiled.captured
    with pytest.raises(GraphoptError, match="changes nothing"):
        apply_change(captured.graph_module, captured.example_inputs, parse_change("int4:no.such.layer*"))


def test_apply_change_leaves_the_original_graph_alone(llama_compiled):
    captured = llama_compiled.captured
    nodes = len(captured.graph_module.graph.nodes)
    after, records = apply_change(captured.graph_module, captured.example_inputs, parse_change("int4:*mlp*"))
    assert len(captured.graph_module.graph.nodes) == nodes
    quantized = list(after.graph.find_nodes(op="call_function", target=MATMUL_NBITS))
    assert quantized and records[0].modified
    assert all(".mlp." in module_path(n) for n in quantized)
    assert len(quantized) == 3 * 3               # gate, up and down of the 3 layers, nothing else


def test_cost_model_recovers_an_affine_law():
    kernels = [{"op": "MatMul", "macs": m, "activation_bytes": 10, "ms": 0.05 + 2e-6 * m} for m in (1e3, 1e4, 5e4)]
    kernels += [{"op": "Add", "macs": 0, "activation_bytes": b, "ms": 0.01 + 1e-7 * b} for b in (100, 1000, 4000)]
    model = fit_cost_model(kernels)
    assert model["MatMul/macs"] == pytest.approx((0.05, 2e-6), rel=1e-6)
    assert model["Add/bytes"] == pytest.approx((0.01, 1e-7), rel=1e-6)


def test_predictions_follow_what_each_change_removes(llama_compiled, llama_report):
    captured, data = llama_compiled.captured, llama_report.data
    baseline = data["totals"]["latency_ms"]
    for text in ("drop:model.layers.1.mlp", "heads:0.5", "prune:0.5"):
        after, _ = apply_change(captured.graph_module, captured.example_inputs, parse_change(text))
        prediction = predict(data, captured.graph_module, after, threads=1)
        assert prediction["predicted_bytes"] == parameter_bytes(after) < parameter_bytes(captured.graph_module)
        # what the change removes makes the kept kernels cheaper; the nodes it inserts (a pruned
        # tiny model's gathers) are costed on their own and may outweigh that
        assert 0 < prediction["predicted_ms"] - prediction["added_ms"] < baseline, text
        assert prediction["added_ms"] >= 0, text
    after, _ = apply_change(captured.graph_module, captured.example_inputs, parse_change("drop:model.layers.1.mlp"))
    assert predict(data, captured.graph_module, after, 1)["kernels_kept"] < len(data["kernels"])


def test_simulate_with_apply_measures_each_change(llama_compiled, llama_report):
    feed = {n: x.numpy() for n, x in zip(llama_compiled.executable.runner.input_names,
                                         llama_compiled.captured.example_inputs)}
    rows = simulate(llama_compiled.captured, llama_report.data, feed,
                    [parse_change("int8:*"), parse_change("drop:model.layers.0.self_attn")], threads=1,
                    apply=True, runs=4, progress=False)
    assert [r["kind"] for r in rows] == ["int8", "drop"]
    for row in rows:
        assert row["measured_ms"] > 0 and row["baseline_ms"] > 0 and math.isfinite(row["error"])
        assert row["predicted_ms"] == pytest.approx(row["predicted_ratio"] * row["baseline_ms"])
        assert row["measured_bytes"] > 0 and row["changes"]
    assert rows[0]["measured_bytes"] < 0.5 * rows[0]["baseline_bytes"]      # int8 weights
