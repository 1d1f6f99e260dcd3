"""Expert pruning: drops the least-routed experts, the router scores only the kept ones."""
import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt.errors import PassError
from graphopt.ir.graph import constant_value
from graphopt.ir.moe import MOE_EXPERTS
from graphopt.passes import ConstantFolding, ExpertPruning, WeightQuantization

from ..conftest import assert_close_to_scale


def _calibration(bundle, count=4):
    return [bundle.example_inputs(seq_len=16, seed=seed) for seed in range(count)]


def _experts_per_layer(gm):
    return [constant_value(gm, n.args[3]).shape[0] for n in gm.graph.find_nodes(op="call_function", target=MOE_EXPERTS)]


def test_mixtral_keeps_the_most_routed_experts_and_equals_a_router_masked_to_them():
    bundle = graphopt.models.load("mixtral")
    inputs = bundle.example_inputs(seq_len=16)
    pruning = ExpertPruning(keep=0.5)
    cm = graphopt.compile(bundle.model, inputs, passes=[ConstantFolding(), pruning], calibration=_calibration(bundle),
                          progress=False)
    assert _experts_per_layer(cm.captured.graph_module) == [2, 2, 2]
    for name, counts in pruning.routing_counts.items():
        assert sum(counts) == 4 * 16 * 2                  # batches x tokens x top-k
        kept = pruning.kept[name]
        assert min(counts[e] for e in kept) >= max(counts[e] for e in range(4) if e not in kept)
    record = next(r for r in cm.records if r.name == "expert_pruning")
    assert record.quality is not None and record.quality["js"] > 0     # the cost is measured

    # Reference: the eager model whose routers give the dropped experts -inf logits.
    routers = [layer.mlp.gate for layer in bundle.model.model.layers]

    def masked(router, kept):
        def forward(hidden):
            logits = F.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
            dropped = [e for e in range(router.num_experts) if e not in kept]
            logits = logits.index_fill(-1, torch.tensor(dropped), float("-inf"))
            top, index = torch.topk(torch.softmax(logits.float(), -1), router.top_k, dim=-1)
            return logits, top / top.sum(-1, keepdim=True), index
        return forward
    for i, router in enumerate(routers):
        router.forward = masked(router, pruning.kept[f"model.layers.{i}.mlp.experts"])
    try:
        with torch.no_grad():
            want = bundle.model(*inputs).logits
    finally:
        for router in routers:
            del router.forward
    assert_close_to_scale(cm(*inputs), want, 1e-5)


def test_qwen3_moe_prunes_its_moe_layers_and_onnxruntime_runs_the_result():
    bundle = graphopt.models.load("qwen3_moe")
    inputs = bundle.example_inputs(seq_len=16)
    cm = graphopt.compile(bundle.model, inputs, passes=[ExpertPruning(keep=0.75)], calibration=_calibration(bundle),
                          progress=False)
    assert _experts_per_layer(cm.captured.graph_module) == [6, 6]
    assert_close_to_scale(cm(*inputs), cm.captured(*inputs)[0], 1e-5)


def test_group_routing_is_left_whole_with_the_reason():
    bundle = graphopt.models.load("deepseek_v3")
    cm = graphopt.compile(bundle.model, bundle.example_inputs(seq_len=16), passes=[ExpertPruning(keep=0.5)],
                          progress=False)
    record = next(r for r in cm.records if r.name == "expert_pruning")
    assert not record.modified
    assert record.notes == [f"model.layers.{i}.mlp.experts: kept whole (its router applies add.Tensor)" for i in (1, 2)]


def test_quantized_experts_must_be_pruned_first():
    bundle = graphopt.models.load("mixtral")
    with pytest.raises(PassError, match="run expert_pruning before weight_quantization"):
        graphopt.compile(bundle.model, bundle.example_inputs(seq_len=8),
                         passes=[WeightQuantization(bits=8), ExpertPruning()], progress=False)
