"""Channel pruning with UPSCALE reordering on a ResNet-style CNN, two DenseNet-style CNNs and a
Llama-style transformer (its FFNs and the residual stream that q/k/v/gate/up read), and
attention-head pruning on the transformer.

    python examples/channel_pruning.py [--model resnet|densenet|densenet16|llama|all] [--ratio 0.3]

For each model: the channel segments the analysis finds (and why some channels are pinned),
then five exports at the same ratio through ONNX Runtime: constrained (no copies),
unconstrained without and with reordering, and the same two with consumers keeping whole
16-channel groups (`granularity=16`); for the transformer also a head-pruned export (whole
key/value groups, `AttentionHeadPruning`). On `densenet16`, whose layers add 16 channels each,
the grouped reordered export reads every concatenation by its parts: no gathers. Naive and
reordered exports compute the same function (checked here); reordering only changes how
consumers read their channels (all, a slice, a gather, or concatenation parts). The
models have random weights, so the output change (relative L2) is only indicative; see
benchmarks/channel_reorder.py for trained CNNs and the real SmolLM2.
"""
from __future__ import annotations

import argparse

import torch

import graphopt
from graphopt.analysis.channels import ChannelAnalysis
from graphopt.frontend.torch_export import capture
from graphopt.passes import AttentionHeadPruning, ChannelPruning, DeadCodeElimination

EXPORTS = {
    "constrained": dict(mode="constrained"),
    "unconstrained": dict(mode="unconstrained", reorder=False),
    "unconstrained+reorder": dict(mode="unconstrained", reorder=True),
    "16-groups": dict(mode="unconstrained", reorder=False, granularity=16),
    "16-groups+reorder": dict(mode="unconstrained", reorder=True, granularity=16),
}
MODELS = ["resnet", "densenet", "densenet16", "llama"]


def inputs_for(bundle):
    return bundle.example_inputs() if not bundle.is_sequence_model else bundle.example_inputs(seq_len=32)


def show_segments(bundle, inputs) -> None:
    analysis = ChannelAnalysis(capture(bundle.model, inputs).graph_module)
    print(f"{bundle.name}: {len(analysis.producers)} producers, {len(analysis.consumers)} consumers")
    for seg in analysis.segments:
        if seg.consumers:
            print(f"  {seg.describe()}")
            for reason in analysis.explain(seg)[:1]:
                print(f"      {reason}")


def prune(name: str, ratio: float) -> dict:
    bundle = graphopt.models.load(name)
    inputs = inputs_for(bundle)
    show_segments(bundle, inputs)
    results = {}
    with torch.no_grad():
        reference = bundle.model(*inputs)
        reference = reference.logits if hasattr(reference, "logits") else reference
    for label, options in EXPORTS.items():
        pruning = ChannelPruning(ratio=ratio, **options)
        cm = graphopt.compile(bundle.model, inputs, passes=[pruning, DeadCodeElimination()],
                              backend="onnxruntime", progress=False)
        out = cm(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        s = pruning.stats
        change = float((out - reference).norm() / reference.norm())
        print(f"  {label:22s} weights {cm.stats['parameter_bytes_optimized'] / 1e6:6.2f} MB; consumers reading "
              f"all / a slice / a gather / concatenation parts: {s.consumers_full:2d} / {s.consumers_slice:2d} / "
              f"{s.consumers_gather:2d} / {s.consumers_concat:2d}; output change vs unpruned {change:.1%}")
        results[label] = (out, s)
    if bundle.is_sequence_model:
        heads = AttentionHeadPruning(ratio=0.5, progress=False)    # ablation importance, global scope
        cm = graphopt.compile(bundle.model, inputs, passes=[heads, DeadCodeElimination()], backend="onnxruntime",
                              progress=False)
        out = cm(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        change = float((out - reference).norm() / reference.norm())
        total = sum(len(scores) for scores in heads.scores.values())
        kept = total - sum(p.groups - len(p.kept_groups) for p in heads.pruned.values())
        print(f"  {'heads 50%':22s} weights {cm.stats['parameter_bytes_optimized'] / 1e6:6.2f} MB; key/value groups "
              f"kept {kept} of {total}; output change vs unpruned {change:.1%}")
        results["heads"] = (out, heads.pruned)
    for naive_label in ("unconstrained", "16-groups"):
        naive, reordered = results[naive_label][0], results[f"{naive_label}+reorder"][0]
        assert torch.allclose(naive, reordered, rtol=1e-4, atol=1e-5 * float(naive.abs().max())), \
            "reordering must not change outputs"
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all", choices=[*MODELS, "all"])
    ap.add_argument("--ratio", type=float, default=0.3)
    args = ap.parse_args(argv)
    names = MODELS if args.model == "all" else [args.model]
    return {name: prune(name, args.ratio) for name in names}


if __name__ == "__main__":
    main()
