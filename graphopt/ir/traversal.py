"""Walking a graph along its edges: the producers (ancestors) or consumers (descendants) of
nodes, kept within a region or cut where a predicate says stop, and bounded searches.

    branch = ancestors([writer], stop=lambda n: n is stream)
    middle = descendants(inputs, within=branch)
    reaches(stream, writer, limit=64)       # is writer among stream's 64 nearest producers?
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch.fx as fx


def _walk(nodes: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]], within: set | None,
          stop: Callable[[fx.Node], bool] | None) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    frontier = list(nodes)
    while frontier:
        node = frontier.pop()
        if node in seen or (within is not None and node not in within) or (stop is not None and stop(node)):
            continue
        seen.add(node)
        frontier.extend(step(node))
    return seen


def ancestors(nodes: Iterable[fx.Node], within: set | None = None,
              stop: Callable[[fx.Node], bool] | None = None) -> set[fx.Node]:
    """`nodes` and everything they are computed from, staying in `within` (if given) and not
    entering (nor going past) a node for which `stop` is true."""
    return _walk(nodes, lambda n: n.all_input_nodes, within, stop)


def descendants(nodes: Iterable[fx.Node], within: set | None = None,
                stop: Callable[[fx.Node], bool] | None = None) -> set[fx.Node]:
    """`nodes` and everything computed from them, under the same rules as `ancestors`."""
    return _walk(nodes, lambda n: n.users, within, stop)


def reaches(node: fx.Node, ancestor: fx.Node, limit: int) -> bool:
    """Whether `ancestor` is among the nearest `limit` producers of `node` (depth first)."""
    seen, frontier = set(), [node]
    while frontier and len(seen) < limit:
        current = frontier.pop()
        if current is ancestor:
            return True
        if current in seen:
            continue
        seen.add(current)
        frontier.extend(current.all_input_nodes)
    return False
