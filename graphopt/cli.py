"""Command line: `graphopt compile | generate | inspect | bench | eval | superweights | sublayers | channels | models`.

    graphopt compile --model smollm2 --backend onnxruntime --out dist/smollm2
    graphopt compile --model smollm2 --task text-generation --passes int4 --out dist/smollm2-gen
    graphopt generate dist/smollm2-gen --prompt "Tell me about cats." --chat
    graphopt compile --model model.onnx --dim batch=1 --dim sequence=128 --out dist/model
    graphopt inspect dist/smollm2
    graphopt bench dist/smollm2
    graphopt eval --model smollm2 --artifact dist/smollm2
`generate`, `inspect` and `bench` need only numpy and onnxruntime (and tokenizers to generate).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .artifact import directory_bytes
from .errors import GraphoptError
from .runtime import default_threads


def _median_ms(fn, repeats: int) -> float:
    from .timing import median_seconds
    return median_seconds(fn, repeats, warmup=1) * 1e3


def _dim_size(text: str) -> tuple[str, int]:
    name, _, size = text.partition("=")
    if not name or not size.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE, got {text!r}")
    return name, int(size)


def _backend_options(args) -> dict | None:
    if args.backend == "tvm":
        return {"threads": args.threads, "target": args.tvm_target}
    if args.tvm_target != "host":
        raise GraphoptError("--tvm-target is for --backend tvm")
    return {"threads": args.threads} if args.backend == "onnxruntime" else None


def _example_inputs(bundle, seq_len: int):
    if not bundle.is_sequence_model:
        return bundle.example_inputs()
    if bundle.tokenizer is None:
        return bundle.example_inputs(seq_len=seq_len)
    try:
        from .corpus import read_text
        return bundle.example_inputs(seq_len=seq_len, text=read_text("evaluation.txt", 20000))
    except GraphoptError:
        return bundle.example_inputs(seq_len=seq_len)


def _calibration_batches(bundle, args):
    """Windows of calibration.txt (or --calibration-text) for passes that learn from data;
    random token ids for test models without a tokenizer."""
    if args.calibration_tokens <= 0 or not bundle.is_sequence_model:
        return None
    if bundle.tokenizer is None:
        print(f"{bundle.name} has no tokenizer: calibrating on random token ids", file=sys.stderr)
        return [bundle.example_inputs(seq_len=args.seq_len, seed=s)
                for s in range(1, 1 + max(1, args.calibration_tokens // args.seq_len))]
    from .analysis.quality import token_windows
    from .corpus import read_text
    if args.calibration_text:
        with open(args.calibration_text, encoding="utf-8") as f:
            text = f.read()
    else:
        try:
            text = read_text("calibration.txt")
        except GraphoptError:
            return None
    return [(w,) for w in token_windows(bundle.tokenizer, text, args.seq_len, args.calibration_tokens)]


def cmd_compile(args) -> None:
    import torch

    import graphopt

    from .frontend.torch_export import flat_tensors, sequence_dims
    from .passes import DumpInstrument, PrintOnChangeInstrument

    torch.set_num_threads(args.threads or default_threads())
    print(f"loading {args.model} ...", file=sys.stderr)
    if args.task:
        return _compile_task(args)
    onnx_file = args.model.endswith(".onnx")
    if onnx_file:            # the reference is ONNX Runtime on the file as given
        from .frontend.onnx import example_inputs_for
        from .runtime import OrtRunner
        from .specs import dtype_name
        model = args.model
        inputs = example_inputs_for(model, dict(args.dim))
        original = OrtRunner(model, [graphopt.TensorSpec(f"input{i}", tuple(x.shape), dtype_name(x))
                                     for i, x in enumerate(inputs)], [], args.threads)
        reference, reference_name = (lambda: [torch.from_numpy(o) for o in original.run(inputs)]), \
            "onnxruntime on the file"
    else:
        bundle = graphopt.models.load(args.model)
        inputs = _example_inputs(bundle, args.seq_len)
        model = bundle.model
        reference, reference_name = (lambda: flat_tensors(model(*inputs))), "torch eager"
    instruments = [PrintOnChangeInstrument()]
    if args.dump_dir:
        instruments.append(DumpInstrument(args.dump_dir))
    passes = _pass_list(args)
    lossless = (args.passes in ("none", "default", "fuse") and not args.skip_sublayers and not args.prune_channels
                and not args.prune_heads)
    calibration = None if lossless or onnx_file else _calibration_batches(bundle, args)
    cm = graphopt.compile(model, inputs, passes=passes, backend=args.backend, calibration=calibration,
                          dynamic_dims=sequence_dims(inputs) if args.dynamic_seq else None,
                          verify=not args.no_verify, instruments=instruments,
                          backend_options=_backend_options(args))
    with torch.no_grad():
        eager_out = reference()[0]
        eager_ms = _median_ms(reference, args.repeats)
    out = cm(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    compiled_ms = _median_ms(lambda: cm(*inputs), args.repeats)
    diff = float((out - eager_out).abs().max())
    scale = float(eager_out.abs().max())
    s = cm.stats
    print(cm.summary())
    print(f"\n{args.model}: inputs {', '.join(i.describe() for i in cm.inputs)}")
    print(f"  graph nodes        {s['nodes_captured']} -> {s['nodes_optimized']}")
    print(f"  constants          {s['parameter_bytes_captured'] / 1e6:.1f} MB -> "
          f"{s['parameter_bytes_optimized'] / 1e6:.1f} MB")
    print(f"  compute            {s['macs_captured'] / 1e9:.3f} -> {s['macs_optimized'] / 1e9:.3f} GMAC per call "
          "(convolutions, linear layers, matmuls, attention)")
    print(f"  latency (median of {args.repeats})  {reference_name} {eager_ms:.1f} ms -> graphopt {args.backend} "
          f"{compiled_ms:.1f} ms  ({eager_ms / compiled_ms:.2f}x)")
    print(f"  max |diff| vs {reference_name} {diff:.2e} (output scale {scale:.3g}, "
          f"relative {diff / max(scale, 1e-30):.2e})")
    print("  compile time       " + ", ".join(f"{k} {v:.1f}s" for k, v in s["seconds"].items()))
    if args.out:
        path = cm.save(args.out)
        print(f"  artifact           {path} ({directory_bytes(path) / 1e6:.1f} MB)")


def _compile_task(args) -> None:
    """compile --task text-generation: a generation artifact, checked against the eager model's
    next-token logits on a window of evaluation text."""
    import torch

    import graphopt

    from .passes import PrintOnChangeInstrument
    if args.model.endswith(".onnx"):
        raise GraphoptError(f"--task {args.task} compiles a Hugging Face causal LM by name, not an .onnx file")
    if args.dynamic_seq:
        raise GraphoptError(f"--task {args.task} makes every length dynamic already; drop --dynamic-seq")
    bundle = graphopt.models.load(args.model)
    if not bundle.is_sequence_model:
        raise GraphoptError(f"--task {args.task} needs a causal language model; {args.model} is not one")
    lossless = args.passes in ("none", "default", "fuse") and not args.skip_sublayers and not args.prune_heads
    calibration = None if lossless else _calibration_batches(bundle, args)
    cm = graphopt.compile(bundle.model, passes=_pass_list(args), backend=args.backend, task=args.task,
                          tokenizer=bundle.tokenizer, calibration=calibration, verify=not args.no_verify,
                          instruments=[PrintOnChangeInstrument()],
                          backend_options={"threads": args.threads} if args.threads else None)
    ids = _example_inputs(bundle, args.seq_len)[0]
    with torch.no_grad():
        eager = bundle.model(input_ids=ids).logits
    from .generation import generator_for
    ours = torch.from_numpy(generator_for("(in memory)", {"task": cm.task, "backend": cm.backend},
                                          cm.executable.runner, cm.extra_files).next_token_logits(ids.numpy()))
    diff, scale = float((ours - eager).abs().max()), float(eager.abs().max())
    s = cm.stats
    print(cm.summary())
    print(f"\n{args.model} for {args.task}: one graph for prompt and decode, cache in place")
    print(f"  graph nodes        {s['nodes_captured']} -> {s['nodes_optimized']}")
    print(f"  constants          {s['parameter_bytes_captured'] / 1e6:.1f} MB -> "
          f"{s['parameter_bytes_optimized'] / 1e6:.1f} MB")
    print(f"  next-token logits on {ids.shape[1]} tokens: max |diff| vs torch eager {diff:.2e} "
          f"(scale {scale:.3g}, relative {diff / max(scale, 1e-30):.2e})")
    print("  compile time       " + ", ".join(f"{k} {v:.1f}s" for k, v in s["seconds"].items()))
    if args.out:
        path = cm.save(args.out)
        print(f"  artifact           {path} ({directory_bytes(path) / 1e6:.1f} MB)")
        print(f"  try: graphopt generate {args.out} --prompt \"Tell me about cats.\" --chat")


def cmd_generate(args) -> None:
    from .artifact import load
    lm = load(args.artifact, threads=args.threads)
    pieces = lm.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or None,
                         chat=args.chat, stream=True)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(lm.generation_stats.line(), file=sys.stderr)


def _pass_list(args) -> list:
    """The preset's passes, with layer skipping (and FFN fusion), then head and channel
    pruning, after constant folding."""
    from .passes import AttentionHeadPruning, ChannelPruning, ConstantFolding, DeadCodeElimination, preset
    from .passes.ffn_fusion import FFNFusion
    from .passes.layer_skipping import LayerSkipping
    passes = preset(args.passes)
    if args.fuse_ffn and not args.skip_sublayers:
        raise GraphoptError("--fuse-ffn fuses FFNs made consecutive by --skip-sublayers; give both")
    extra = []
    if args.skip_sublayers:
        extra.append(LayerSkipping(method=args.skip_method, sublayers=args.skip_sublayers,
                                   kinds=tuple(args.skip_kinds.split(","))))
        if args.fuse_ffn:
            extra.append(FFNFusion())
    if args.prune_heads:
        extra.append(AttentionHeadPruning(ratio=args.prune_heads, importance=args.head_importance,
                                          scope=args.head_scope))
    if args.prune_channels:
        extra.append(ChannelPruning(ratio=args.prune_channels, mode=args.prune_mode, reorder=not args.no_reorder,
                                    importance=args.prune_importance, exclude=tuple(args.prune_exclude),
                                    budget=args.prune_budget, scope=args.prune_scope,
                                    granularity=args.prune_granularity))
    at = 1 if passes and isinstance(passes[0], ConstantFolding) else 0
    passes[at:at] = extra
    if extra and not any(isinstance(p, DeadCodeElimination) for p in passes):
        passes.append(DeadCodeElimination())
    return passes


def cmd_inspect(args) -> None:
    from .artifact import read_manifest, verify_files
    m = read_manifest(args.artifact)
    verify_files(args.artifact, m)
    if args.json:
        print(json.dumps(m, indent=2))
        return
    print(f"artifact   {os.path.abspath(args.artifact)}  (checksums OK)")
    print(f"backend    {m['backend']}  {m.get('backend_options', {})}")
    print(f"created    {m.get('created')}  source model: {m.get('stats', {}).get('source', '?')}")
    for kind in ("inputs", "outputs"):
        for spec in m[kind]:
            print(f"{kind[:-1]:10s} {spec['name']}: {spec['dtype']}{spec['shape']}")
    print("files")
    for name, info in m["files"].items():
        print(f"  {name:24s} {info['bytes'] / 1e6:10.2f} MB  sha256 {info['sha256'][:12]}")
    print("passes")
    for r in m.get("passes", []):
        diff = "" if r.get("max_output_diff") is None else f"  max|Δout| {r['max_output_diff']:.1e}"
        print(f"  {r['index']:02d} {r['name']:24s} {'changed' if r['modified'] else 'no change':9s} "
              f"{r['nodes_before']} -> {r['nodes_after']} nodes  {r['seconds']:.2f}s{diff}")
        for change in r.get("changes", [])[: args.max_lines]:
            print(f"       + {change}")
        for note in r.get("notes", [])[: args.max_lines]:
            print(f"       ? {note}")
    stats = m.get("stats", {})
    if stats:
        print(
            f"graph      {stats.get('nodes_captured')} -> {stats.get('nodes_optimized')} nodes; constants "
            f"{stats.get('parameter_bytes_captured', 0) / 1e6:.1f} -> "
            f"{stats.get('parameter_bytes_optimized', 0) / 1e6:.1f} MB"
            + (
                f"; {stats['macs_captured'] / 1e9:.3f} -> {stats['macs_optimized'] / 1e9:.3f} GMAC per call"
                if "macs_captured" in stats
                else ""
            )
        )
    print("versions   " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()))


def cmd_bench(args) -> None:
    import numpy as np

    from .artifact import load
    rt = load(args.artifact, threads=args.threads)
    rng = np.random.default_rng(0)
    feed = []
    for spec in rt.inputs:
        shape = [d if isinstance(d, int) else args.dynamic_size for d in spec.shape]
        if spec.dtype.startswith("int"):
            feed.append(rng.integers(0, 100, size=shape).astype(spec.dtype))
        else:
            feed.append(rng.standard_normal(shape).astype(spec.dtype))
    ms = _median_ms(lambda: rt(*feed), args.repeats)
    print(f"{args.artifact}: median {ms:.2f} ms over {args.repeats} runs "
          f"(inputs {', '.join(f'{s.name}{list(a.shape)}' for s, a in zip(rt.inputs, feed))})")


def cmd_eval(args) -> None:
    import graphopt

    from .analysis.quality import divergence, perplexity, token_windows
    from .corpus import corpus_file

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

    from .analysis.quality import perplexity, token_windows
    from .analysis.super_weights import ablate, find_super_weights
    from .corpus import read_text
    from .frontend.torch_export import capture

    bundle = graphopt.models.load(args.model)
    inputs = _example_inputs(bundle, args.seq_len)
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
    base = perplexity(gm, windows).perplexity
    print(f"ablation: perplexity on {len(windows)} x {args.seq_len} tokens, all kept: {base:.3f}")
    for sw in report.super_weights:
        with ablate(gm, sw):
            ppl = perplexity(gm, windows).perplexity
        print(f"  zero {sw.layer}[{sw.row}, {sw.col}]: {ppl:.3f} ({ppl / base:.2f}x)")


def _folded_graph(bundle, inputs):
    """The model's IR after constant folding: what the analysis commands look at."""
    from .frontend.torch_export import capture
    from .passes import ConstantFolding
    gm = capture(bundle.model, inputs).graph_module
    ConstantFolding()(gm)
    return gm


def cmd_sublayers(args) -> None:
    import graphopt

    from .analysis.sublayers import SkipEvaluator, ffn_saturation, find_sublayers
    from .passes.layer_skipping import rank_removals

    bundle = graphopt.models.load(args.model)
    gm = _folded_graph(bundle, _example_inputs(bundle, args.seq_len))
    subs = find_sublayers(gm)
    print(f"{args.model}: {len(subs)} residual sublayers "
          f"({sum(s.kind == 'attention' for s in subs)} attention, {sum(s.kind == 'ffn' for s in subs)} FFN)")
    if not args.rank:
        for s in subs:
            print(f"  {s.index:3d} {s.label:14s} {s.name:32s} add {s.add} <- {s.writer}")
        return
    batches = _calibration_batches(bundle, args)
    if batches is None and args.rank != "tail":
        raise GraphoptError(f"ranking by {args.rank} needs a tokenizer and calibration text")
    evaluator = SkipEvaluator(gm, batches, subs) if batches else None
    if evaluator is not None:
        print(f"FFN saturation on {len(batches)} x {args.seq_len} calibration tokens (cos(h, h + FFN(h)) per token):")
        for sat in ffn_saturation(evaluator):
            shares = "  ".join(f">={t}: {f:6.1%}" for t, f in sat.fraction_above.items())
            print(f"  {sat.name:32s} mean {sat.mean_cosine:.3f}  {shares}")
    steps = rank_removals(gm, batches, args.rank, args.count, kinds=tuple(args.kinds.split(",")),
                          evaluator=evaluator)
    print(f"removal order ({args.rank}); JS and perplexity of removing it and all above it:")
    for n, step in enumerate(steps, 1):
        print(f"  {n:3d} {step.unit[0].label:14s} {'+'.join(step.names):32s} js {step.js:.4f}  "
              f"perplexity {step.perplexity:.3f}")


def cmd_channels(args) -> None:
    import graphopt

    from .analysis.channels import ChannelAnalysis
    from .passes import ChannelPruning

    bundle = graphopt.models.load(args.model)
    inputs = _example_inputs(bundle, args.seq_len)
    analysis = ChannelAnalysis(_folded_graph(bundle, inputs))
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
            prune(_folded_graph(bundle, inputs))
            st = prune.stats
            print(f"  {label:26s} columns {st.consumer_columns_before} -> {st.consumer_columns_after}; "
                  f"consumers reading all / a slice / a gather / concatenation parts: {st.consumers_full} / "
                  f"{st.consumers_slice} / {st.consumers_gather} / {st.consumers_concat}")


def cmd_models(args) -> None:
    from .models import available
    print("\n".join(available()))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="graphopt", description="Compile neural networks into smaller, faster artifacts.")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model, print what it gained, save an artifact")
    c.add_argument("--model", default="smollm2", help="a name from `graphopt models`, or an .onnx file")
    c.add_argument("--dim", action="append", default=[], type=_dim_size, metavar="NAME=SIZE",
                   help="an .onnx file's named input dim (repeat: --dim batch=1 --dim sequence=128)")
    c.add_argument("--backend", default="onnxruntime")
    c.add_argument("--task", choices=["text-generation"],
                   help="text-generation: prompt and decode steps with an in-place KV cache, tokenizer included")
    c.add_argument("--passes", default="default", help="preset name: none, default, fuse, int8, int4")
    c.add_argument("--skip-sublayers", type=int, default=0, help="remove this many attention/FFN sublayers")
    c.add_argument("--skip-method", default="finercut", help="tail, bi, finercut, finercut-oneshot")
    c.add_argument("--skip-kinds", default="attention,ffn", help="which sublayers may go")
    c.add_argument("--fuse-ffn", action="store_true", help="then fuse runs of consecutive FFNs (FFN Fusion)")
    c.add_argument("--prune-channels", type=float, default=0.0,
                   help="channel pruning: drop this fraction of every consumer's input channels "
                        "(of the layer MACs / weights with --prune-budget flops / weights)")
    c.add_argument("--prune-budget", default="channels", choices=["channels", "flops", "weights"],
                   help="what --prune-channels is a share of")
    c.add_argument("--prune-scope", default="layer", choices=["layer", "global"],
                   help="layer: every consumer drops the same share; global: channels ranked across layers")
    c.add_argument("--prune-heads", type=float, default=0.0,
                   help="drop this share of key/value head groups (AttentionHeadPruning)")
    c.add_argument("--head-importance", default="ablation", choices=["ablation", "l2"],
                   help="ablation: measured output divergence per group on calibration text; l2: weight norms")
    c.add_argument("--head-scope", default="global", choices=["global", "layer"],
                   help="global: the share of all groups, least important first; layer: of every attention")
    c.add_argument("--prune-mode", default="unconstrained", choices=["unconstrained", "constrained"])
    c.add_argument("--prune-importance", default="l1", help="l1, l2 or activation")
    c.add_argument("--prune-exclude", nargs="*", default=[], help="consumers left whole (module paths, fnmatch)")
    c.add_argument("--no-reorder", action="store_true", help="skip UPSCALE channel reordering")
    c.add_argument("--prune-granularity", type=int, default=1,
                   help="unconstrained: consumers keep whole groups of this many channels of a block (16: "
                        "whole 16-channel DenseNet layers, read as one concatenation without copies)")
    c.add_argument("--calibration-text", help="text for calibration (default: ../shared/corpus/calibration.txt)")
    c.add_argument("--calibration-tokens", type=int, default=2048, help="0 disables calibration")
    c.add_argument("--seq-len", type=int, default=128)
    c.add_argument("--dynamic-seq", action="store_true", help="make the sequence length dynamic")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--tvm-target", default="host",
                   help="CPU the TVM library is built for: host (this CPU's every feature), or an x86-64 level "
                        "such as x86-64-v3 (AVX2) for an artifact that runs on any CPU of that level")
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--no-verify", action="store_true", help="skip output verification after each pass")
    c.add_argument("--dump-dir", help="write the graph before/after each changing pass here")
    c.add_argument("--out", help="artifact directory to write")
    c.set_defaults(func=cmd_compile)
    g = sub.add_parser("generate", help="stream text from a text-generation artifact")
    g.add_argument("artifact")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    g.add_argument("--threads", type=int, default=None)
    g.set_defaults(func=cmd_generate)
    i = sub.add_parser("inspect", help="show an artifact's manifest: passes, sizes, specs, versions")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")
    i.add_argument("--max-lines", type=int, default=8)
    i.set_defaults(func=cmd_inspect)
    b = sub.add_parser("bench", help="time an artifact on random inputs")
    b.add_argument("artifact")
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--dynamic-size", type=int, default=128)
    b.set_defaults(func=cmd_bench)
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
    w.set_defaults(func=cmd_superweights)

    s = sub.add_parser("sublayers", help="list residual sublayers; --rank METHOD orders them for removal")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--rank", choices=["tail", "bi", "finercut", "finercut-oneshot"])
    s.add_argument("--count", type=int, default=10)
    s.add_argument("--kinds", default="attention,ffn")
    s.add_argument("--calibration-text", help="text to score on (default: ../shared/corpus/calibration.txt)")
    s.add_argument("--calibration-tokens", type=int, default=512)
    s.set_defaults(func=cmd_sublayers)

    ch = sub.add_parser("channels", help="channel segments, producers/consumers and pins; --ratio compares exports")
    ch.add_argument("--model", default="resnet")
    ch.add_argument("--seq-len", type=int, default=128)
    ch.add_argument("--ratio", type=float, default=0.0, help="also prune this share three ways and count copies")
    ch.add_argument("--max-segments", type=int, default=20)
    ch.set_defaults(func=cmd_channels)

    from .report.command import add_parser as add_report_parser
    add_report_parser(sub)

    m = sub.add_parser("models", help="list model names")
    m.set_defaults(func=cmd_models)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GraphoptError as exc:
        print(f"graphopt: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
