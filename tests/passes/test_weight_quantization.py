import pytest
import torch

import graphopt
from graphopt.errors import PreconditionError
from graphopt.frontend.torch_export import capture
from graphopt.ir.graph import parameter_bytes
from graphopt.ir.quantized import EMBEDDING_NBITS, MATMUL_NBITS
from graphopt.passes import MixedPrecisionQuantization, PassContext, PassManager, VerifyInstrument, WeightQuantization

from ..conftest import small_inputs

aten = torch.ops.aten


def _count(gm, target):
    return len(gm.graph.find_nodes(op="call_function", target=target))


def _quantize(name, passes, calibration=None):
    bundle = graphopt.models.load(name)
    inputs = small_inputs(bundle)
    captured = capture(bundle.model, inputs)
    gm = captured.graph_module
    before = {
        "bytes": parameter_bytes(gm),
        "linear": sum(_count(gm, t) for t in (aten.linear.default, aten.addmm.default)),
        "embedding": _count(gm, aten.embedding.default),
        "outputs": gm(*inputs),
    }
    result = PassManager(passes, [VerifyInstrument(inputs)]).run(gm, PassContext(inputs, calibration=calibration))
    return result.graph_module, result.records[0], before, inputs


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "qwen2"])
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_every_linear_and_embedding_is_quantized(name, bits, group):
    gm, record, before, inputs = _quantize(name, [WeightQuantization(bits=bits, group_size=group)])
    assert record.modified
    assert _count(gm, aten.linear.default) + _count(gm, aten.addmm.default) == 0
    assert _count(gm, MATMUL_NBITS) == before["linear"]
    assert _count(gm, EMBEDDING_NBITS) == before["embedding"] and _count(gm, aten.embedding.default) == 0
    assert parameter_bytes(gm) < 0.5 * before["bytes"]
    # numeric: within the declared budget (the verify instrument checked it), and int8 is close
    with torch.no_grad():
        after = gm(*inputs)[0]
    ref = before["outputs"][0].detach()
    rel = float((after - ref).abs().max() / ref.abs().max())
    assert rel < (0.05 if bits == 8 else 0.6), rel


def test_tied_embedding_and_head_share_one_int8_table():
    bundle = graphopt.models.load("llama")
    bundle.model.lm_head.weight = bundle.model.model.embed_tokens.weight     # tie them
    captured = capture(bundle.model, small_inputs(bundle))
    gm = WeightQuantization(bits=4, group_size=32)(captured.graph_module, PassContext()).graph_module
    emb = gm.graph.find_nodes(op="call_function", target=EMBEDDING_NBITS)[0]
    head = [n for n in gm.graph.find_nodes(op="call_function", target=MATMUL_NBITS)
            if n.args[1].target == emb.args[1].target]
    assert len(head) == 1 and emb.args[4] == 8 and head[0].args[4] == 8    # head_bits=8, one shared table
    others = [n for n in gm.graph.find_nodes(op="call_function", target=MATMUL_NBITS) if n not in head]
    assert {n.args[4] for n in others} == {4} and {n.args[5] for n in others} == {32}


def test_exclude_and_overrides_pick_schemes_by_layer_name():
    q = WeightQuantization(bits=4, group_size=64, exclude=("*.q_proj",),
                           layer_overrides={"*.down_proj": (8, None), "*.up_proj": None})
    gm, record, before, _ = _quantize("llama", [q])
    schemes = {}
    for n in gm.graph.find_nodes(op="call_function", target=MATMUL_NBITS):
        schemes.setdefault(n.meta["nn_module_stack"] and list(n.meta["nn_module_stack"].values())[-1][0]
                           .rsplit(".", 1)[-1], set()).add((n.args[4], n.args[5]))
    assert "q_proj" not in schemes and "up_proj" not in schemes
    assert schemes["down_proj"] == {(8, 32)}    # "per channel" on rows of 160: widest pow-2 divisor
    assert schemes["gate_proj"] == {(4, 64)}
    assert _count(gm, aten.linear.default) == 2 * 3               # q_proj and up_proj of 3 layers
    assert any("kept in fp32" in note for note in record.notes)


class _PlantedSuperWeight(torch.nn.Module):
    """A residual MLP block whose down projection has one huge weight fed by one huge input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(64, 128, bias=False)
        self.down = torch.nn.Linear(128, 64, bias=False)
        with torch.no_grad():
            self.up.weight[37].fill_(0.0)
            self.up.weight[37, 5] = 40.0               # input channel 5 -> intermediate 37 spikes
            self.down.weight.mul_(0.1)
            self.down.weight[11, 37] = 3.0             # the super weight

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def test_super_weight_is_found_and_restored_exactly():
    x = torch.randn(1, 8, 64) * 0.1
    x[0, 2, 5] = 4.0
    model = _PlantedSuperWeight()
    captured = capture(model, (x,))
    plain = WeightQuantization(bits=4, group_size=32)(capture(model, (x,)).graph_module, PassContext((x,)))
    restored = WeightQuantization(bits=4, group_size=32, restore_super_weights=True)(
        captured.graph_module, PassContext((x,)))
    assert any("down[11, 37]" in note or "[11, 37]" in note for note in restored.notes), restored.notes
    ref = model(x).detach()
    err_plain = float((plain.graph_module(x)[0] - ref)[0, 2, 11].abs())
    err_restored = float((restored.graph_module(x)[0] - ref)[0, 2, 11].abs())
    assert err_restored < 0.25 * err_plain


def test_gptq_needs_calibration_and_uses_it():
    with pytest.raises(PreconditionError, match="calibration"):
        _quantize("llama", [WeightQuantization(method="gptq")])
    bundle = graphopt.models.load("llama")
    calibration = [bundle.example_inputs(seq_len=16, seed=s) for s in range(4)]
    gm, record, before, inputs = _quantize("llama", [WeightQuantization(bits=4, group_size=32, method="gptq")],
                                           calibration)
    assert _count(gm, MATMUL_NBITS) == before["linear"]


def test_mixed_precision_stays_within_the_byte_budget():
    bundle = graphopt.models.load("llama")
    calibration = [bundle.example_inputs(seq_len=16, seed=s) for s in range(3)]
    for importance in ("lim", "zscore"):
        q = MixedPrecisionQuantization(importance=importance, low=(4, 256), high=(8, None), budget_scheme=(4, 16))
        gm, record, before, _ = _quantize("llama", [q], calibration)
        schemes = [(n.args[4], n.args[5]) for n in gm.graph.find_nodes(op="call_function", target=MATMUL_NBITS)]
        assert any(bits == 8 for bits, _ in schemes)           # some layers were raised to int8
        assert any(bits == 4 for bits, _ in schemes)
        assert "budget" in record.notes[0]
        spent, budget = [float(t.split()[0]) for t in record.notes[0].split("; ")[1].split(" of a ")]
        assert spent <= budget


def test_w8a8_inserts_qdq_keeps_outlier_channels_and_lowers_to_integer_matmul():
    from graphopt.passes import ActivationQuantization
    bundle = graphopt.models.load("llama")
    inputs = small_inputs(bundle)
    calibration = [bundle.example_inputs(seq_len=16, seed=s) for s in range(3)]
    with pytest.raises(PreconditionError, match="calibration"):
        _quantize("llama", [ActivationQuantization()])
    gm, record, before, _ = _quantize(
        "llama", [ActivationQuantization(outlier_ratio=2.0, max_outlier_channels=1000)], calibration
    )
    qdq = torch.ops.quantized_decomposed
    assert _count(gm, qdq.quantize_per_tensor.default) == before["linear"] - 1     # all but the LM head
    assert _count(gm, qdq.dequantize_per_channel.default) == before["linear"] - 1
    assert any("outlier channel" in c for c in record.changes)                      # ratio 2 finds some
    passes = [ActivationQuantization(), WeightQuantization(bits=8, group_size=None)]
    cm = graphopt.compile(bundle.model, inputs, passes=passes, calibration=calibration, progress=False)
    import os

    import onnx
    ops = {n.op_type for n in onnx.load(os.path.join(cm.executable.workdir, "model.onnx"),
                                        load_external_data=False).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMulNBits"} <= ops
    out = cm(*inputs)
    with torch.no_grad():
        ref = bundle.model(*inputs).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.1


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("grid", ["minmax", "offset"])
def test_moe_experts_are_quantized_per_expert_with_the_router_in_fp32(name, grid):
    from graphopt.ir.moe import MOE_EXPERTS, MOE_EXPERTS_NBITS, router_linears
    from graphopt.passes import ConstantFolding
    from graphopt.passes.weight_quantization import head_layers

    from ..conftest import assert_close_to_scale
    bundle = graphopt.models.load(name)
    inputs = small_inputs(bundle)
    captured = capture(bundle.model, inputs)
    moe_layers = _count(captured.graph_module, MOE_EXPERTS)
    routers = sorted(n.name for n in router_linears(captured.graph_module))
    passes = [ConstantFolding(), WeightQuantization(bits=4, group_size=32, grid=grid, accuracy_level=0)]
    cm = graphopt.compile(bundle.model, inputs, passes=passes, progress=False)
    gm = cm.captured.graph_module
    assert _count(gm, MOE_EXPERTS) == 0 and _count(gm, MOE_EXPERTS_NBITS) == moe_layers > 0
    assert sorted(n.name for n in router_linears(gm)) == routers            # still plain fp32 linears
    assert all(n.target is aten.linear.default for n in router_linears(gm) if n not in head_layers(gm))
    record = next(r for r in cm.records if r.name == "weight_quantization")
    assert any("MoE routers kept in fp32" in note for note in record.notes)
    assert any("MoE expert sets" in change for change in record.changes)
    # ONNX Runtime (fp32 compute) runs exactly what the quantized graph means.
    assert_close_to_scale(cm(*inputs), cm.captured(*inputs)[0], 1e-4)


def test_quantized_experts_dequantize_to_each_experts_own_grid():
    from graphopt.ir.moe import dequantize_experts, stack_quantized
    from graphopt.ir.quantized import quantize_weight
    experts = torch.randn(3, 24, 64)
    for grid in ("minmax", "offset"):
        quantized = [quantize_weight(experts[e], 4, 32, grid=grid) for e in range(3)]
        stacked = dequantize_experts(stack_quantized(quantized), 4, 32, 64)
        assert torch.equal(stacked, torch.stack([q.dequantize() for q in quantized]))
