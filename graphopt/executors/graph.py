"""A workload over an IR graph: used as is in this process, moved to a worker as
graphopt.ir.serialize data (the graph rebuilt once per worker, shapes from `inputs`)."""
from __future__ import annotations

import torch.fx as fx

from ..ir.serialize import pack_graph, unpack_graph
from .base import Workload


class GraphWorkload(Workload):
    def __init__(self, gm: fx.GraphModule, inputs: tuple):
        self.gm, self.inputs = gm, tuple(inputs)
        self.local = None          # state to reuse in this process (never pickled)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["gm"], state["local"] = pack_graph(self.gm), None
        return state

    def graph(self) -> fx.GraphModule:
        if isinstance(self.gm, dict):
            self.gm = unpack_graph(self.gm, self.inputs)
        return self.gm
