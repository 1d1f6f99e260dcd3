"""Dead-code elimination.

Rewrites:
    node whose result nobody reads and that has no side effect -> (removed)
    parameter/buffer that no get_attr reads                     -> (removed from the module)
"""
from __future__ import annotations

from ..ir.graph import eliminate_dead_code, parameter_bytes, remove_unused_attributes
from .base import Pass, PassResult


class DeadCodeElimination(Pass):
    name = "dead_code_elimination"

    def run(self, gm, ctx):
        nodes_before, bytes_before = len(gm.graph.nodes), parameter_bytes(gm)
        graph_changed = eliminate_dead_code(gm)
        attrs_removed = remove_unused_attributes(gm)
        changes = []
        if graph_changed:
            changes.append(f"removed {nodes_before - len(gm.graph.nodes)} nodes")
        if attrs_removed:
            changes.append(f"removed {attrs_removed} unused constants "
                           f"({(bytes_before - parameter_bytes(gm)) / 1e6:.2f} MB)")
        return PassResult(gm, bool(graph_changed or attrs_removed), changes)
