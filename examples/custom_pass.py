"""Write your own pass: fold BatchNorm into the convolution before it.

    conv2d(x, W, b) -> batch_norm(gamma, beta, mean, var, eps)
        ->  conv2d(x, W * s[:, None, None, None], (b - mean) * s + beta),  s = gamma / sqrt(var + eps)

Run it:  python examples/custom_pass.py
It compiles the project's small ResNet with this pass in front of the default preset, checks
the outputs against eager, and prints what the pass changed and why some nodes were skipped.
"""
from __future__ import annotations

import operator

import torch

import graphopt
from graphopt.ir.graph import add_constant, constant_value
from graphopt.ir.pattern import Constant, Input, Op, Optional, RewriteRule
from graphopt.passes import Pass, PassResult, preset

aten = torch.ops.aten

CONV = Op(aten.conv2d.default, Input("x"), Constant("weight"), Optional(Constant("bias")),
          Optional(Input("stride")), Optional(Input("padding")), Optional(Input("dilation")),
          Optional(Input("groups")), name="conv", single_user=True)
CONV_BN = Op(aten._native_batch_norm_legit_no_training.default, CONV, Constant("gamma"), Constant("beta"),
             Constant("mean"), Constant("var"), Input("momentum"), Input("eps"))


class FoldBatchNormRule(RewriteRule):
    pattern = CONV_BN

    def check(self, gm, m):
        users = list(m.root.users)
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
            return "batch norm's saved statistics are read; only its output may be used"
        return None

    def replace(self, gm, m):
        get = lambda name: constant_value(gm, m[name])  # noqa: E731
        scale = get("gamma") / torch.sqrt(get("var") + m["eps"])
        weight = get("weight") * scale[:, None, None, None]
        bias = get("bias") if m.get("bias") is not None else torch.zeros_like(scale)
        bias = (bias - get("mean")) * scale + get("beta")
        conv = m["conv"]
        with gm.graph.inserting_before(conv):
            w = gm.graph.get_attr(add_constant(gm, conv.name + "_folded_weight", weight))
            b = gm.graph.get_attr(add_constant(gm, conv.name + "_folded_bias", bias))
        conv.args = (conv.args[0], w, b, *conv.args[3:])
        for user in list(m.root.users):
            user.replace_all_uses_with(conv)
            gm.graph.erase_node(user)
        gm.graph.erase_node(m.root)


class FoldBatchNorm(Pass):
    """Exact up to rounding, so it keeps the default tolerance (1e-5 relative)."""

    name = "fold_batch_norm"

    def run(self, gm, ctx):
        report = FoldBatchNormRule().apply(gm)
        return PassResult(gm, report.applied > 0, [f"folded {report.applied} batch norms into convolutions"],
                          [str(f) for f in report.near_misses])


def main() -> None:
    bundle = graphopt.models.load("resnet")
    inputs = bundle.example_inputs(batch=4)
    cm = graphopt.compile(bundle.model, inputs, passes=[FoldBatchNorm(), *preset("default")], progress=False)
    with torch.no_grad():
        expected = bundle.model(*inputs)
    error = float((cm(*inputs) - expected).abs().max() / expected.abs().max())
    print(cm.summary())
    remaining = sum(1 for n in cm.graph_module.graph.nodes
                    if n.target == aten._native_batch_norm_legit_no_training.default)
    print(f"batch norms left: {remaining}; relative error vs eager: {error:.1e}")
    for note in cm.records[0].notes[:3]:
        print("not folded:", note)


if __name__ == "__main__":
    main()
