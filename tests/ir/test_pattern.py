import torch

from graphopt.frontend.torch_export import capture
from graphopt.ir.pattern import Constant, Input, Op, Optional, RewriteRule, match

aten = torch.ops.aten
LINEAR = Op(aten.linear.default, Input("x"), Constant("w"), Optional(Constant("b")))


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(4, 3, bias=False)

    def forward(self, x, w):
        return self.a(x) + self.b(x) + torch.nn.functional.linear(x, w)


def _graph():
    return capture(TwoLinears(), (torch.randn(2, 4), torch.randn(3, 4))).graph_module


def test_match_binds_constants_and_optional_bias():
    gm = _graph()
    linears = list(gm.graph.find_nodes(op="call_function", target=aten.linear.default))
    with_bias, without_bias, dynamic_weight = linears
    m = match(LINEAR, with_bias, gm)
    assert m and m["b"] is not None and m["w"].op == "get_attr"
    m = match(LINEAR, without_bias, gm)
    assert m and m.get("b") is None
    failure = match(LINEAR, dynamic_weight, gm)
    assert not failure
    assert "arg 1" in str(failure) and "is not a constant tensor" in str(failure)


def test_match_failure_names_the_node_and_op():
    gm = _graph()
    add = gm.graph.find_nodes(op="call_function", target=aten.add.Tensor)[0]
    failure = match(LINEAR, add, gm)
    assert not failure and "aten.add.Tensor" in str(failure) and "is not aten.linear.default" in str(failure)


class DropBias(RewriteRule):
    """linear(x, w, b) -> linear(x, w) + b, refusing when there is no bias."""

    pattern = LINEAR

    def check(self, gm, m):
        return None if m.get("b") is not None else "no bias to split off"

    def replace(self, gm, m):
        with gm.graph.inserting_after(m.root):
            plain = gm.graph.call_function(aten.linear.default, (m["x"], m["w"]))
        with gm.graph.inserting_after(plain):
            add = gm.graph.call_function(aten.add.Tensor, (plain, m["b"]))
        m.root.replace_all_uses_with(add)
        gm.graph.erase_node(m.root)


def test_rewrite_rule_applies_and_reports_near_misses():
    gm = _graph()
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    before = gm(x, w)
    report = DropBias().apply(gm)
    gm.recompile()
    assert report.applied == 1
    reasons = [str(f) for f in report.near_misses]
    assert any("no bias to split off" in r for r in reasons)
    assert any("is not a constant tensor" in r for r in reasons)
    torch.testing.assert_close(gm(x, w), before, rtol=1e-6, atol=1e-6)
