import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import graphopt
from graphopt.frontend.torch_export import capture
from graphopt.passes import HorizontalFusion, PassManager, VerifyInstrument

from ..conftest import small_inputs

aten = torch.ops.aten


def _linears(gm):
    return list(gm.graph.find_nodes(op="call_function", target=aten.linear.default))


def _fuse(model, inputs):
    gm = capture(model, inputs).graph_module
    before = len(_linears(gm))
    result = PassManager([HorizontalFusion()], [VerifyInstrument(inputs)]).run(gm)
    return result.graph_module, result.records[0], before


@pytest.mark.parametrize("name,layers", [("llama", 3), ("qwen2", 3), ("mistral", 3)])
def test_llama_family_fuses_qkv_and_gate_up(name, layers):
    bundle = graphopt.models.load(name)
    gm, record, before = _fuse(bundle.model, small_inputs(bundle))
    # per layer: q,k,v -> 1 and gate,up -> 1, i.e. 3 fewer linears
    assert len(_linears(gm)) == before - 3 * layers
    assert sum("q_proj + " in c and "k_proj + " in c for c in record.changes) == layers
    assert sum("gate_proj + " in c and "up_proj" in c for c in record.changes) == layers
    widths = {tuple(n.meta["val"].shape)[-1] for n in _linears(gm)}
    assert 64 + 2 * 32 in widths and 2 * 160 in widths   # [Hq + 2 Hkv] and [2 F]


def test_bert_fuses_query_key_value_with_biases():
    bundle = graphopt.models.load("bert")
    gm, record, before = _fuse(bundle.model, small_inputs(bundle))
    assert len(_linears(gm)) == before - 2 * 3
    assert all("query + " in c and "value" in c for c in record.changes)


def test_gpt2_has_nothing_to_fuse_and_says_so_honestly():
    bundle = graphopt.models.load("gpt2")   # c_attn is already one matmul
    gm, record, before = _fuse(bundle.model, small_inputs(bundle))
    assert not record.modified and len(_linears(gm)) == before


class SharedInput(torch.nn.Module):
    def __init__(self, widths, biases, din):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(din, w, bias=b) for w, b in zip(widths, biases))

    def forward(self, x):
        return tuple(torch.relu(h(x)) for h in self.heads)


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 17), min_size=2, max_size=4), bias_seed=st.integers(0, 15),
       din=st.integers(1, 9), rows=st.integers(1, 5))
def test_fusion_is_exact_for_any_widths_and_bias_mix(widths, bias_seed, din, rows):
    biases = [bool((bias_seed >> i) & 1) for i in range(len(widths))]
    torch.manual_seed(bias_seed)
    model = SharedInput(widths, biases, din)
    x = torch.randn(rows, din)
    gm, record, _ = _fuse(model, (x,))
    assert record.modified and len(_linears(gm)) == 1
    with torch.no_grad():
        for got, want in zip(gm(x), model(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dynamic_weight_is_a_recorded_near_miss():
    class DynamicWeight(torch.nn.Module):
        def forward(self, x, w):
            return torch.nn.functional.linear(x, w) + torch.nn.functional.linear(x, w * 2)

    gm, record, before = _fuse(DynamicWeight(), (torch.randn(2, 3), torch.randn(4, 3)))
    assert not record.modified
    assert any("not a constant tensor" in note for note in record.notes)
