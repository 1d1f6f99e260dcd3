import torch

from graphopt.frontend.torch_export import capture
from graphopt.passes import DeadCodeElimination, PassManager, VerifyInstrument


class Unused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(4, 4)
        self.unused = torch.nn.Linear(4, 1000)

    def forward(self, x):
        self.unused(x)
        return self.used(x)


def test_removes_dead_nodes_and_their_weights():
    x = torch.randn(2, 4)
    gm = capture(Unused(), (x,)).graph_module
    gm_bytes = sum(p.numel() for p in gm.parameters())
    result = PassManager([DeadCodeElimination()], [VerifyInstrument((x,))]).run(gm)
    record = result.records[0]
    assert record.modified and record.nodes_after < record.nodes_before
    assert sum(p.numel() for p in result.graph_module.parameters()) == gm_bytes - 4 * 1000 - 1000
    again = PassManager([DeadCodeElimination()]).run(result.graph_module).records[0]
    assert not again.modified
