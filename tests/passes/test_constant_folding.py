import torch

import graphopt
from graphopt.frontend.torch_export import capture
from graphopt.passes import ConstantFolding, PassManager, VerifyInstrument

from ..conftest import small_inputs

aten = torch.ops.aten


class Precomputable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.arange(1.0, 9.0))

    def forward(self, x):
        positions = torch.arange(8, dtype=torch.float32)          # no inputs: foldable
        table = torch.sin(positions) * self.scale.exp()           # constants only: foldable
        big = table.expand(16384, 8)                              # would bloat: stays
        return x * table + (big + x[:1]).mean(0) + torch.ones_like(x)  # ones_like reads a shape


def _run(module, inputs):
    gm = capture(module, inputs).graph_module
    result = PassManager([ConstantFolding()], [VerifyInstrument(inputs)]).run(gm)
    return result.graph_module, result.records[0]


def test_folds_input_independent_subgraphs():
    x = torch.randn(2, 8)
    gm, record = _run(Precomputable(), (x,))
    assert record.modified
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert aten.arange.start_step not in targets and aten.arange.default not in targets
    assert aten.sin.default not in targets and aten.exp.default not in targets
    assert aten.ones_like.default not in targets
    assert aten.expand.default in targets, "the 16384x growth must not be stored as a constant"
    largest = max(b.numel() for b in gm.buffers())
    assert largest <= 16   # ones_like(x) for x of shape [2, 8]


def test_no_op_is_reported_honestly():
    gm, record = _run(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    assert not record.modified and record.changes == []


def test_folds_rotary_tables_in_llama():
    bundle = graphopt.models.load("llama")
    gm, record = _run(bundle.model, small_inputs(bundle))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert aten.cos.default not in targets and aten.sin.default not in targets
    assert record.modified


class RotaryTable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 64, 2) / 64))

    def forward(self, positions):
        freqs = torch.arange(8192, dtype=torch.float32).unsqueeze(-1) * self.inv_freq   # [8192, 32] from 32 floats
        return freqs.cos()[positions]


def test_a_table_computed_from_a_few_stored_floats_is_not_stored():
    gm, record = _run(RotaryTable(), (torch.tensor([3, 8000]),))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert aten.cos.default in targets and aten.mul.Tensor in targets
    assert max(b.numel() for b in gm.buffers()) == 8192      # only the positions 0..8191 are stored
    assert record.modified
