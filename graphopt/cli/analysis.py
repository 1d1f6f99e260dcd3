"""`graphopt eval | superweights | sublayers | channels | models`: look inside a model."""
from __future__ import annotations

import sys

from ..errors import GraphoptError
from .common import add_executor_flags, calibration_batches, example_inputs, executor, folded_graph


def cmd_eval(args) -> None:
    import graphopt

    from ..analysis.quality import divergence, perplexity, token_windows
    from ..corpus import corpus_file

    bundle = graphopt.models.load(args.model)
    if bundle.tokenizer is None:
        raise GraphoptError(f"model '{args.model}' has no tokenizer; eval needs a language model")
    seq_len = args.seq_len
    candidate = None
    if args.artifact:
        candidate = graphopt.load(args.artifact)
        fixed = candidate.inputs[0].shape[-1]
        if isinstance(fixed, int) and fixed != seq_len:
            print(f"using the artifact's sequence length {fixed}", file=sys.stderr)
            seq_len = fixed
    path = args.text or corpus_file("evaluation.txt")
    with open(path, encoding="utf-8") as f:
        windows = token_windows(bundle.tokenizer, f.read(), seq_len, args.max_tokens)
    base = perplexity(bundle.model, windows)
    print(f"{args.model} eager: perplexity {base.perplexity:.3f} on {base.tokens} tokens "
          f"({base.windows} windows of {seq_len}) of {path}")
    if candidate is not None:
        result = perplexity(candidate, windows)
        div = divergence(bundle.model, candidate, windows)
        print(f"{args.artifact}: perplexity {result.perplexity:.3f} "
              f"({100 * (result.perplexity / base.perplexity - 1):+.3f}%), KL {div.kl:.2e}, JS {div.js:.2e}, "
              f"top-1 agreement {100 * div.top1_agreement:.2f}%")


def cmd_superweights(args) -> None:
    import graphopt

    from ..analysis.quality import token_windows
    from ..analysis.super_weights import ablation_perplexities, find_super_weights
    from ..corpus import read_text
    from ..frontend.torch_export import capture

    bundle = graphopt.models.load(args.model)
    inputs = example_inputs(bundle, args.seq_len)
    gm = capture(bundle.model, inputs).graph_module
    report = find_super_weights(gm, inputs, args.spike_ratio)
    print(f"{args.model}: {len(report.super_weights)} super-weight candidate(s) from one {args.seq_len}-token "
          f"forward pass (output spike >= {args.spike_ratio:g}x the layer's median channel peak); "
          f"super-activation channels {report.super_activation_channels}")
    for sw in report.super_weights:
        print(f"  {sw}")
    if not args.ablate or not report.super_weights:
        return
    if bundle.tokenizer is None:
        raise GraphoptError(f"model '{args.model}' has no tokenizer; --ablate measures perplexity")
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    else:
        text = read_text("evaluation.txt")
    windows = token_windows(bundle.tokenizer, text, args.seq_len, args.max_tokens)
    base, *ablated = ablation_perplexities(gm, windows, report.super_weights, executor(args))
    print(f"ablation: perplexity on {len(windows)} x {args.seq_len} tokens, all kept: {base:.3f}")
    for sw, ppl in zip(report.super_weights, ablated):
        print(f"  zero {sw.layer}[{sw.row}, {sw.col}]: {ppl:.3f} ({ppl / base:.2f}x)")


def cmd_sublayers(args) -> None:
    import graphopt

    from ..analysis.sublayers import SkipEvaluator, ffn_saturation, find_sublayers
    from ..passes.layer_skipping import rank_removals

    bundle = graphopt.models.load(args.model)
    gm = folded_graph(bundle, example_inputs(bundle, args.seq_len))
    subs = find_sublayers(gm)
    print(f"{args.model}: {len(subs)} residual sublayers "
          f"({sum(s.kind == 'attention' for s in subs)} attention, {sum(s.kind == 'ffn' for s in subs)} FFN)")
    if not args.rank:
        for s in subs:
            print(f"  {s.index:3d} {s.label:14s} {s.name:32s} add {s.add} <- {s.writer}")
        return
    batches = calibration_batches(bundle, args)
    if batches is None and args.rank != "tail":
        raise GraphoptError(f"ranking by {args.rank} needs a tokenizer and calibration text")
    evaluator = SkipEvaluator(gm, batches, subs) if batches else None
    if evaluator is not None:
        print(f"FFN saturation on {len(batches)} x {args.seq_len} calibration tokens (cos(h, h + FFN(h)) per token):")
        for sat in ffn_saturation(evaluator):
            shares = "  ".join(f">={t}: {f:6.1%}" for t, f in sat.fraction_above.items())
            print(f"  {sat.name:32s} mean {sat.mean_cosine:.3f}  {shares}")
    steps = rank_removals(gm, batches, args.rank, args.count, kinds=tuple(args.kinds.split(",")),
                          evaluator=evaluator, executor=executor(args))
    print(f"removal order ({args.rank}); JS and perplexity of removing it and all above it:")
    for n, step in enumerate(steps, 1):
        print(f"  {n:3d} {step.unit[0].label:14s} {'+'.join(step.names):32s} js {step.js:.4f}  "
              f"perplexity {step.perplexity:.3f}")


def cmd_channels(args) -> None:
    import graphopt

    from ..analysis.channels import ChannelAnalysis
    from ..passes import ChannelPruning

    bundle = graphopt.models.load(args.model)
    inputs = example_inputs(bundle, args.seq_len)
    analysis = ChannelAnalysis(folded_graph(bundle, inputs))
    prunable = [s for s in analysis.segments if s.consumers]
    print(f"{args.model}: {len(analysis.segments)} channel segments, {len(prunable)} with consumers; "
          f"{len(analysis.producers)} producers, {len(analysis.consumers)} consumers")
    for seg in analysis.segments[: args.max_segments]:
        print(f"  {seg.describe()}")
        for reason in analysis.explain(seg)[:2]:
            print(f"      {reason}")
    if len(analysis.segments) > args.max_segments:
        print(f"  ... {len(analysis.segments) - args.max_segments} more (--max-segments)")
    if args.ratio:
        print(f"exports at {args.ratio:.0%} of each consumer's input channels dropped (L1):")
        for label, options in (("constrained", dict(mode="constrained")),
                               ("unconstrained, naive", dict(reorder=False)),
                               ("unconstrained, reordered", dict(reorder=True)),
                               ("16-groups, reordered", dict(reorder=True, granularity=16))):
            prune = ChannelPruning(ratio=args.ratio, **options)
            prune(folded_graph(bundle, inputs))
            st = prune.stats
            print(f"  {label:26s} columns {st.consumer_columns_before} -> {st.consumer_columns_after}; "
                  f"consumers reading all / a slice / a gather / concatenation parts: {st.consumers_full} / "
                  f"{st.consumers_slice} / {st.consumers_gather} / {st.consumers_concat}")


def cmd_models(args) -> None:
    from ..models import available
    print("\n".join(available()))


def add_parsers(sub) -> None:
    e = sub.add_parser("eval", help="perplexity on a text file; with --artifact, its cost vs the eager model")
    e.add_argument("--model", default="smollm2")
    e.add_argument("--artifact", help="a compiled artifact of the same model to compare")
    e.add_argument("--text", help="text file (default: ../shared/corpus/evaluation.txt)")
    e.add_argument("--seq-len", type=int, default=128)
    e.add_argument("--max-tokens", type=int, default=4096)
    e.set_defaults(func=cmd_eval)
    w = sub.add_parser("superweights", help="find super weights from one forward pass; --ablate proves them")
    w.add_argument("--model", default="smollm2")
    w.add_argument("--seq-len", type=int, default=128)
    w.add_argument("--spike-ratio", type=float, default=50.0)
    w.add_argument("--ablate", action="store_true", help="perplexity with each one zeroed vs kept")
    w.add_argument("--text", default=None, help="text file for --ablate (default: evaluation.txt)")
    w.add_argument("--max-tokens", type=int, default=1024)
    add_executor_flags(w)
    w.set_defaults(func=cmd_superweights)

    s = sub.add_parser("sublayers", help="list residual sublayers; --rank METHOD orders them for removal")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--rank", choices=["tail", "bi", "finercut", "finercut-oneshot"])
    s.add_argument("--count", type=int, default=10)
    s.add_argument("--kinds", default="attention,ffn")
    s.add_argument("--calibration-text", help="text to score on (default: ../shared/corpus/calibration.txt)")
    s.add_argument("--calibration-tokens", type=int, default=512)
    add_executor_flags(s)
    s.set_defaults(func=cmd_sublayers)

    ch = sub.add_parser("channels", help="channel segments, producers/consumers and pins; --ratio compares exports")
    ch.add_argument("--model", default="resnet")
    ch.add_argument("--seq-len", type=int, default=128)
    ch.add_argument("--ratio", type=float, default=0.0, help="also prune this share three ways and count copies")
    ch.add_argument("--max-segments", type=int, default=20)
    ch.set_defaults(func=cmd_channels)


    m = sub.add_parser("models", help="list model names")
    m.set_defaults(func=cmd_models)

