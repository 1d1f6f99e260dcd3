import torch
from torch import nn

import graphopt
from graphopt.analysis.cost import graph_cost, node_macs
from graphopt.frontend.torch_export import capture

from ..conftest import small_inputs


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.proj = nn.Linear(10, 6)

    def forward(self, x):
        y = self.depthwise(self.conv(x))                         # [1, 8, 10, 10]
        q = self.proj(y)                                         # [1, 8, 10, 6]
        return torch.nn.functional.scaled_dot_product_attention(q, q, q) @ q.transpose(-1, -2)


def test_macs_of_conv_depthwise_linear_attention_and_matmul():
    gm = capture(_Mixed().eval(), (torch.randn(1, 3, 10, 10),)).graph_module
    cost = graph_cost(gm)
    by_op = {}
    for n in gm.graph.nodes:
        if node_macs(n, gm):
            by_op.setdefault(str(n.target).split(".")[1], []).append(node_macs(n, gm))
    assert sorted(by_op["conv2d"]) == [8 * 10 * 10 * 9, 8 * 10 * 10 * 3 * 9]    # depthwise: one input channel each
    assert by_op["linear"] == [8 * 10 * 6 * 10]
    assert by_op["scaled_dot_product_attention"] == [8 * 10 * 10 * (6 + 6)]
    assert by_op["matmul"] == [8 * 10 * 10 * 6]
    assert cost.macs == sum(sum(v) for v in by_op.values()) == sum(cost.per_node.values())
    assert cost.weight_bytes == 4 * sum(p.numel() for p in _Mixed().parameters())


def test_lm_head_macs():
    bundle = graphopt.models.load("llama")
    gm = capture(bundle.model, small_inputs(bundle)).graph_module
    lm_head = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default][-1]
    tokens = small_inputs(bundle)[0].numel()
    vocab, hidden = bundle.model.lm_head.weight.shape
    assert node_macs(lm_head, gm) == tokens * vocab * hidden


def test_compile_reports_macs_and_quantized_matmuls_keep_theirs():
    bundle = graphopt.models.load("llama")
    inputs = small_inputs(bundle)
    plain = graphopt.compile(bundle.model, inputs, passes="default", backend="torch", progress=False)
    int4 = graphopt.compile(bundle.model, inputs, passes="int4", backend="torch", progress=False)
    assert plain.stats["macs_optimized"] == plain.stats["macs_captured"] > 0
    assert any("matmul_nbits" in op for op in int4.stats["ops_optimized"])
    # the offset grid adds blocksum(x) @ offsets: one MAC per 32-weight block and token
    assert plain.stats["macs_optimized"] < int4.stats["macs_optimized"] <= plain.stats["macs_optimized"] * (1 + 1 / 32)


def test_moe_blocks_count_the_routed_tokens_expert_matmuls():
    from graphopt.ir.moe import MOE_EXPERTS
    bundle = graphopt.models.load("mixtral")                 # hidden 64, expert width 96, top-2
    gm = capture(bundle.model, bundle.example_inputs(seq_len=10)).graph_module
    for node in gm.graph.find_nodes(op="call_function", target=MOE_EXPERTS):
        assert node_macs(node, gm) == 10 * 2 * 3 * 64 * 96
