"""Property tests: random graphs of the ops the exact passes touch come out of constant
folding, dead-code elimination, horizontal fusion, channel permutation and parallel-FFN
fusion computing what they computed before; and verification catches a pass that lies."""
import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings

from graphopt.analysis.sublayers import find_sublayers
from graphopt.errors import GraphoptError, VerificationError
from graphopt.frontend.torch_export import capture
from graphopt.ir.graph import infer_meta
from graphopt.passes import (
    ChannelPermutation,
    ConstantFolding,
    DeadCodeElimination,
    FFNFusion,
    HorizontalFusion,
    Pass,
    PassManager,
    PassResult,
    VerifyInstrument,
)
from graphopt.passes.layer_skipping import LayerSkipping

from ..conftest import assert_close_to_scale

WIDTH = 8
ACTIVATIONS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def _step(n_values: int):
    """One op of a random program, reading values 0..n_values-1 (all [rows, WIDTH])."""
    src = st.integers(0, n_values - 1)
    return st.one_of(
        st.tuples(st.just("linear"), src, st.booleans()),
        st.tuples(st.just("siblings"), src, st.lists(st.integers(1, 12), min_size=2, max_size=4), st.booleans()),
        st.tuples(st.just("act"), src, st.sampled_from(sorted(ACTIVATIONS))),
        st.tuples(st.just("add"), src, src),
        st.tuples(st.just("mul"), src, src),
        st.tuples(st.just("folded_scale"), src),
        st.tuples(st.just("dead"), src),
    )


@st.composite
def programs(draw):
    steps = []
    for n in range(draw(st.integers(1, 7))):
        steps.append(draw(_step(n + 1)))
    return steps, draw(st.integers(0, 2 ** 16)), draw(st.integers(1, 5))


class RandomNet(torch.nn.Module):
    """Runs a drawn program: value 0 is the input; each step appends one value."""

    def __init__(self, steps, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.steps = steps
        self.layers = torch.nn.ModuleList()
        for step in steps:
            if step[0] == "linear":
                self.layers.append(torch.nn.Linear(WIDTH, WIDTH, bias=step[2]))
            elif step[0] == "siblings":
                heads = torch.nn.ModuleList(torch.nn.Linear(WIDTH, w, bias=step[3]) for w in step[2])
                backs = torch.nn.ModuleList(torch.nn.Linear(w, WIDTH, bias=False) for w in step[2])
                self.layers.append(torch.nn.ModuleList([heads, backs]))
            elif step[0] == "folded_scale":
                holder = torch.nn.Module()
                holder.register_buffer("log_scale", torch.randn(WIDTH) * 0.1)
                self.layers.append(holder)
            else:
                self.layers.append(torch.nn.Identity())

    def forward(self, x):
        values = [x]
        for step, layer in zip(self.steps, self.layers):
            kind, v = step[0], values[step[1]]
            if kind == "linear":
                out = layer(v)
            elif kind == "siblings":
                heads, backs = layer
                out = sum(back(torch.relu(head(v))) for head, back in zip(heads, backs))
            elif kind == "act":
                out = ACTIVATIONS[step[2]](v)
            elif kind == "add":
                out = v + values[step[2]]
            elif kind == "mul":
                out = v * torch.tanh(values[step[2]])
            elif kind == "folded_scale":                    # a weight-only subgraph: constant folding's work
                out = v * (layer.log_scale.exp() * 2 - 1).reshape(1, -1)
            else:                                           # computed, never used: dead code
                _ = torch.sigmoid(v) @ torch.ones(WIDTH, WIDTH)
                out = v
            values.append(out)
        return values[-1], values[len(values) // 2]


def _exact_pipeline(seed: int):
    return [ConstantFolding(), DeadCodeElimination(), HorizontalFusion(), ChannelPermutation(seed=seed),
            DeadCodeElimination()]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
@example(program=([("linear", 0, False), ("linear", 0, False), ("siblings", 1, [1, 1], False)], 0, 1))
def test_exact_passes_keep_any_random_graph_equal(program):
    """(The example: a fusion group reading a member of an earlier group, which horizontal
    fusion once left reading the erased node.)"""
    steps, seed, rows = program
    model = RandomNet(steps, seed).eval()
    x = torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(seed))
    gm = capture(model, (x,)).graph_module
    with torch.no_grad():
        expected = model(x)
        for p in _exact_pipeline(seed):
            try:
                gm = p(gm).graph_module
            except GraphoptError as exc:                   # a pass may refuse a graph, in words; never miscompute
                assert str(exc) and "\n" not in str(exc)
        got = gm(x)
    for g, e in zip(got, expected, strict=True):
        assert_close_to_scale(g, e, 1e-5)


def _tiny_llama(layers: int, hidden_heads: int, intermediate: int, seed: int):
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=8 * hidden_heads, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=hidden_heads,
                                      num_key_value_heads=hidden_heads, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.integers(2, 4), heads=st.integers(1, 3), intermediate=st.integers(4, 40), seed=st.integers(0, 99),
       seq=st.integers(1, 9))
def test_fusing_parallel_ffns_is_exact(layers, heads, intermediate, seed, seq):
    """With the FFNs made parallel first, fusing them into one wide FFN changes nothing."""
    model = _tiny_llama(layers, heads, intermediate, seed)
    ids = torch.randint(0, 64, (1, seq), generator=torch.Generator().manual_seed(seed))
    gm = capture(model, (ids,)).graph_module
    ConstantFolding()(gm)
    LayerSkipping(remove=tuple(s.name for s in find_sublayers(gm) if s.kind == "attention"))(gm)
    run = tuple(s.name for s in find_sublayers(gm) if s.kind == "ffn")
    parallel, fused = copy.deepcopy(gm), copy.deepcopy(gm)
    FFNFusion(runs=(run,), mode="parallel")(parallel)
    FFNFusion(runs=(run,))(fused)
    with torch.no_grad():
        assert_close_to_scale(fused(ids)[0], parallel(ids)[0], 1e-5)
    assert [s.kind for s in find_sublayers(fused)] == ["ffn"]


class ScalesTheFirstOutput(Pass):
    """A broken pass: claims to be exact, multiplies the first output by (1 + eps)."""

    name = "scales_the_first_output"

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def run(self, gm, ctx):
        output = gm.graph.find_nodes(op="output")[0]
        first = output.args[0][0]
        with gm.graph.inserting_before(output):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (first, 1.0 + self.eps))
        infer_meta(gm, scaled)
        output.args = ((scaled,) + tuple(output.args[0][1:]),)
        return PassResult(gm, True, [f"scaled by {1 + self.eps}"])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), st.sampled_from([1e-3, 1e-2, 0.5]))
def test_verification_catches_a_pass_that_changes_outputs(program, eps):
    steps, seed, rows = program
    model = RandomNet(steps, seed).eval()
    x = torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(seed)) + 3.0
    gm = capture(model, (x,)).graph_module
    with torch.no_grad():
        if float(model(x)[0].abs().max()) == 0:
            return                                          # nothing to scale: no pass can be caught
        with pytest.raises(VerificationError, match="output 0 moved by"):
            PassManager([ScalesTheFirstOutput(eps)], [VerifyInstrument((x,))]).run(gm)
