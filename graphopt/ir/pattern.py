"""Pattern matching on the IR: pattern + replacement + check, where a failed match says why.

    LINEAR = Op(aten.linear.default, Input("x"), Constant("w"), Optional(Constant("b")))
    result = match(LINEAR, node, gm)
    if not result:                  # a MatchFailure: falsy, with a readable reason
        print(result)               # "node 'linear_3' (aten.linear.default) ...: arg 1: not a constant"
    else:
        result["w"]                 # the bound get_attr node

A RewriteRule bundles a pattern, an extra `check` (returns a reason string to refuse) and a
`replace`; `RewriteRule.apply(gm)` rewrites every match and keeps the near misses, so a
user can ask why a rewrite did not apply.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch.fx as fx

from .graph import constant_value, describe


@dataclass
class MatchFailure:
    """Why a pattern did not match at `node`. Falsy."""

    reason: str
    node: fx.Node | None = None

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"{describe(self.node)}: {self.reason}" if self.node is not None else self.reason


@dataclass
class Match:
    """Bindings of a successful match; `match[name]` gives a bound node or value. Truthy."""

    root: fx.Node
    bindings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.bindings.get(name, default)


class Pattern:
    def match_into(self, value: Any, gm: fx.GraphModule, bindings: dict) -> str | None:
        """Return None and extend `bindings` on success, or a reason string."""
        raise NotImplementedError

    @staticmethod
    def _bind(bindings: dict, name: str | None, value: Any) -> str | None:
        if name is None:
            return None
        if name in bindings and bindings[name] is not value:
            return f"'{name}' bound to two different values"
        bindings[name] = value
        return None


class Input(Pattern):
    """Matches any argument (a node or a literal) and binds it to `name`."""

    def __init__(self, name: str | None = None):
        self.name = name

    def match_into(self, value, gm, bindings):
        return self._bind(bindings, self.name, value)


class Constant(Pattern):
    """Matches a get_attr node holding a tensor (a weight, a buffer, a folded constant)."""

    def __init__(self, name: str | None = None):
        self.name = name

    def match_into(self, value, gm, bindings):
        if constant_value(gm, value) is None:
            what = describe(value) if isinstance(value, fx.Node) else repr(value)
            return f"{what} is not a constant tensor"
        return self._bind(bindings, self.name, value)


class Literal(Pattern):
    """Matches a non-node argument equal to `value`."""

    def __init__(self, value: Any):
        self.value = value

    def match_into(self, value, gm, bindings):
        return (
            None
            if not isinstance(value, fx.Node) and value == self.value
            else f"expected {self.value!r}, got {value!r}"
        )


class Optional(Pattern):
    """Matches `pattern`, or an absent/None argument."""

    def __init__(self, pattern: Pattern):
        self.pattern = pattern

    def match_into(self, value, gm, bindings):
        if value is None:
            return None
        return self.pattern.match_into(value, gm, bindings)


class Op(Pattern):
    """Matches a call_function node whose target is one of `targets` and whose positional
    args match `args` (missing trailing args count as None, for Optional)."""

    def __init__(self, targets, *args: Pattern, name: str | None = None, single_user: bool = False):
        self.targets = tuple(targets) if isinstance(targets, (tuple, list, set)) else (targets,)
        self.args = args
        self.name = name
        self.single_user = single_user

    def match_into(self, value, gm, bindings):
        if not isinstance(value, fx.Node) or value.op != "call_function":
            return f"expected a call to {self._names()}, got {value!r}"
        if value.target not in self.targets:
            return f"{describe(value)} is not {self._names()}"
        if self.single_user and len(value.users) != 1:
            return f"{describe(value)} has {len(value.users)} users; the rewrite needs exactly one"
        if len(value.args) > len(self.args):
            return f"{describe(value)} has {len(value.args)} args, the pattern expects at most {len(self.args)}"
        for i, sub in enumerate(self.args):
            arg = value.args[i] if i < len(value.args) else None
            reason = sub.match_into(arg, gm, bindings)
            if reason is not None:
                return f"arg {i}: {reason}"
        return self._bind(bindings, self.name, value)

    def _names(self) -> str:
        return " or ".join(str(t) for t in self.targets)


def match(pattern: Pattern, node: fx.Node, gm: fx.GraphModule) -> Match | MatchFailure:
    bindings: dict[str, Any] = {}
    reason = pattern.match_into(node, gm, bindings)
    if reason is not None:
        return MatchFailure(reason, node)
    return Match(node, bindings)


@dataclass
class RewriteReport:
    applied: int = 0
    near_misses: list[MatchFailure] = field(default_factory=list)


class RewriteRule:
    """Subclass with `pattern`, optionally `check`, and `replace`.

    A near miss is a node of the pattern's root op that failed deeper in the pattern or in
    `check`; those are kept in the report so users can see why a rewrite did not apply.
    """

    pattern: Op

    def check(self, gm: fx.GraphModule, m: Match) -> str | None:
        return None

    def replace(self, gm: fx.GraphModule, m: Match) -> None:
        raise NotImplementedError

    def apply(self, gm: fx.GraphModule, nodes: Iterable[fx.Node] | None = None) -> RewriteReport:
        report = RewriteReport()
        for node in list(nodes if nodes is not None else gm.graph.nodes):
            if node.graph is not gm.graph or node.op != "call_function" or node.target not in self.pattern.targets:
                continue
            m = match(self.pattern, node, gm)
            if not m:
                report.near_misses.append(m)
                continue
            reason = self.check(gm, m)
            if reason is not None:
                report.near_misses.append(MatchFailure(reason, node))
                continue
            self.replace(gm, m)
            report.applied += 1
        return report
