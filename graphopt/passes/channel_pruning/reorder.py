"""Channel orders that make most consumers' kept channels contiguous (a gather becomes a slice).
"""
from __future__ import annotations

from ...analysis.channels import ChannelAnalysis


# -- choosing what to keep -------------------------------------------------------------------
def contiguous_order(channels: list[int], sets: list[set[int]]) -> list[int]:
    """An order of `channels` in which as many of `sets` as possible are contiguous runs.

    UPSCALE's ordering: the largest sets become nodes of a graph whose edges weigh the
    channels two sets share; the heaviest acyclic paths are laid out set by set as
    (shared with the previous, own, shared with the next); each region is ordered the same
    way for the smaller sets inside it. Channels in no set keep their order at the end.
    """
    universe = set(channels)
    family = []
    for s in sets:
        part = frozenset(s & universe)
        if 0 < len(part) < len(universe) and part not in family:
            family.append(part)
    if not family:
        return list(channels)
    maximal = [s for s in family if not any(s < t for t in family)]
    paths = _heaviest_paths(maximal)
    order: list[int] = []
    placed: set[int] = set()

    def lay(region: set[int]) -> None:
        region -= placed
        if region:
            sub = contiguous_order([c for c in channels if c in region], [set(s) for s in family])
            order.extend(sub)
            placed.update(sub)

    for path in paths:
        for k, s in enumerate(path):
            nxt = path[k + 1] if k + 1 < len(path) else frozenset()
            lay(set(s - nxt))
            lay(set(s & nxt))
    order.extend(c for c in channels if c not in placed)
    return order


def _heaviest_paths(sets: list[frozenset]) -> list[list[frozenset]]:
    """Greedy maximum-weight path cover: take edges by shared-channel count, keeping every
    node's degree <= 2 and no cycles; largest paths first."""
    n = len(sets)
    edges = sorted(((len(sets[i] & sets[j]), i, j) for i in range(n) for j in range(i + 1, n)
                    if sets[i] & sets[j]), reverse=True)
    root = list(range(n))

    def find(x):
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    adjacent: dict[int, list[int]] = {i: [] for i in range(n)}
    for _, i, j in edges:
        if len(adjacent[i]) < 2 and len(adjacent[j]) < 2 and find(i) != find(j):
            adjacent[i].append(j)
            adjacent[j].append(i)
            root[find(i)] = find(j)
    paths, seen = [], set()
    for start in sorted(range(n), key=lambda i: -len(sets[i])):
        if start in seen or len(adjacent[start]) > 1:
            continue
        path, prev, cur = [], None, start
        while cur is not None:
            path.append(cur)
            seen.add(cur)
            cur, prev = next((x for x in adjacent[cur] if x != prev), None), cur
        paths.append(path)
    paths.sort(key=lambda p: -sum(len(sets[i]) for i in p))
    return [[sets[i] for i in p] for p in paths]


def reorder_ranks(analysis: ChannelAnalysis, keep: dict[int, set[int]]) -> dict[int, int]:
    """Ranks that lay each movable block out with `contiguous_order` over its consumers' kept sets."""
    kept = set(analysis.needed).union(*keep.values()) if keep else set(analysis.needed)
    readers: dict[int, list[set[int]]] = {}
    for i, c in enumerate(analysis.consumers):
        for ch in set(analysis.canonical(c.channels)):
            readers.setdefault(ch, []).append(keep[i])
    rank: dict[int, int] = {}
    for block in analysis.blocks():
        if any(c in analysis.frozen for c in block):
            continue
        alive = [c for c in block if c in kept]
        sets = {id(s): s for c in alive for s in readers.get(c, [])}
        for r, c in enumerate(contiguous_order(alive, list(sets.values()))):
            rank[c] = r
    return rank
