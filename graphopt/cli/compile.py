"""`graphopt compile`: capture, run the passes, verify, time against the reference, save."""
from __future__ import annotations

import sys

from ..artifact import directory_bytes
from ..errors import GraphoptError
from ..runtime import default_threads
from .common import (
    add_executor_flags,
    backend_options,
    calibration_batches,
    dim_size,
    example_inputs,
    executor,
    median_ms,
    option_flag,
    precision_override,
    reduced_precision,
)


def print_graph_stats(s: dict) -> None:
    print(f"  graph nodes        {s['nodes_captured']} -> {s['nodes_optimized']}")
    print(f"  constants          {s['parameter_bytes_captured'] / 1e6:.1f} MB -> "
          f"{s['parameter_bytes_optimized'] / 1e6:.1f} MB")


def print_compile_time_and_save(cm, out: str | None) -> None:
    print("  compile time       " + ", ".join(f"{k} {v:.1f}s" for k, v in cm.stats["seconds"].items()))
    if out:
        path = cm.save(out)
        print(f"  artifact           {path} ({directory_bytes(path) / 1e6:.1f} MB)")


def cmd_compile(args) -> None:
    import torch

    import graphopt

    from ..frontend.torch_export import flat_tensors, sequence_dims
    from ..passes import DumpInstrument, PrintOnChangeInstrument

    torch.set_num_threads(args.threads or default_threads())
    print(f"loading {args.model} ...", file=sys.stderr)
    if args.task:
        return _compile_task(args)
    if args.cache_dtype:
        raise GraphoptError("--cache-dtype is for --task text-generation")
    onnx_file = args.model.endswith(".onnx")
    if onnx_file:            # the reference is ONNX Runtime on the file as given
        from ..backends.onnxruntime.runner import OrtRunner
        from ..frontend.onnx import example_inputs_for
        from ..specs import dtype_name
        model = args.model
        inputs = example_inputs_for(model, dict(args.dim))
        original = OrtRunner(model, [graphopt.TensorSpec(f"input{i}", tuple(x.shape), dtype_name(x))
                                     for i, x in enumerate(inputs)], [], args.threads)
        reference, reference_name = (lambda: [torch.from_numpy(o) for o in original.run(inputs)]), \
            "onnxruntime on the file"
    else:
        bundle = graphopt.models.load(args.model)
        inputs = example_inputs(bundle, args.seq_len)
        model = bundle.model
        reference, reference_name = (lambda: flat_tensors(model(*inputs))), "torch eager"
        if isinstance(model, str):          # a checkpoint folder: its weights stream, no eager model to time
            reference = None
    instruments = [PrintOnChangeInstrument()]
    if args.dump_dir:
        instruments.append(DumpInstrument(args.dump_dir))
    passes = pass_list(args)
    options = backend_options(args)
    lossless = (args.passes in ("none", "default", "fuse") and not args.skip_sublayers and not args.prune_channels
                and not args.prune_heads and not args.prune_experts and not reduced_precision(options))
    calibration = None if lossless or onnx_file else calibration_batches(bundle, args)
    cm = graphopt.compile(model, inputs, passes=passes, backend=args.backend, calibration=calibration,
                          dynamic_dims=sequence_dims(inputs) if args.dynamic_seq else None,
                          verify=not args.no_verify, instruments=instruments,
                          backend_options=options, executor=executor(args))
    out = cm(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    compiled_ms = median_ms(lambda: cm(*inputs), args.repeats)
    s = cm.stats
    print(cm.summary())
    print(f"\n{args.model}: inputs {', '.join(i.describe() for i in cm.inputs)}")
    print_graph_stats(s)
    print(f"  compute            {s['macs_captured'] / 1e9:.3f} -> {s['macs_optimized'] / 1e9:.3f} GMAC per call "
          "(convolutions, linear layers, matmuls, attention)")
    if reference is None:
        print(f"  latency (median of {args.repeats})  graphopt {args.backend} {compiled_ms:.1f} ms; no eager "
              "reference (the checkpoint's weights were streamed, the model never loaded whole; "
              f"{'each pass verified on the streamed graph' if not args.no_verify else 'not verified'})")
    else:
        with torch.no_grad():
            eager_out = reference()[0]
            eager_ms = median_ms(reference, args.repeats)
        diff = float((out - eager_out).abs().max())
        scale = float(eager_out.abs().max())
        print(f"  latency (median of {args.repeats})  {reference_name} {eager_ms:.1f} ms -> graphopt {args.backend} "
              f"{compiled_ms:.1f} ms  ({eager_ms / compiled_ms:.2f}x)")
        print(f"  max |diff| vs {reference_name} {diff:.2e} (output scale {scale:.3g}, "
              f"relative {diff / max(scale, 1e-30):.2e})")
    print_compile_time_and_save(cm, args.out)


def _compile_task(args) -> None:
    """compile --task text-generation: a generation artifact, checked against the eager model's
    next-token logits on a window of evaluation text."""
    import torch

    import graphopt

    from ..passes import PrintOnChangeInstrument
    if args.model.endswith(".onnx"):
        raise GraphoptError(f"--task {args.task} compiles a Hugging Face causal LM by name, not an .onnx file")
    if args.dynamic_seq:
        raise GraphoptError(f"--task {args.task} makes every length dynamic already; drop --dynamic-seq")
    bundle = graphopt.models.load(args.model)
    if not bundle.is_sequence_model:
        raise GraphoptError(f"--task {args.task} needs a causal language model; {args.model} is not one")
    options = backend_options(args)
    reduced = reduced_precision(options)
    lossless = (args.passes in ("none", "default", "fuse") and not args.skip_sublayers and not args.prune_heads
                and not args.prune_experts and not reduced)
    calibration = None if lossless else calibration_batches(bundle, args)
    cm = graphopt.compile(bundle.model, passes=pass_list(args), backend=args.backend, task=args.task,
                          tokenizer=bundle.tokenizer, cache_dtype=args.cache_dtype, calibration=calibration,
                          verify=not args.no_verify,
                          instruments=[PrintOnChangeInstrument()],
                          backend_options=options, executor=executor(args))
    ids = example_inputs(bundle, args.seq_len)[0]
    with torch.no_grad():
        eager = bundle.model(input_ids=ids).logits
    from ..generation import generator_for
    ours = torch.from_numpy(generator_for("(in memory)", {"task": cm.task, "backend": cm.backend},
                                          cm.executable.runner, cm.extra_files).next_token_logits(ids.numpy()))
    diff, scale = float((ours - eager).abs().max()), float(eager.abs().max())
    s = cm.stats
    print(cm.summary())
    print(f"\n{args.model} for {args.task}: one graph for prompt and decode, cache in place")
    print_graph_stats(s)
    print(f"  next-token logits on {ids.shape[1]} tokens: max |diff| vs torch eager {diff:.2e} "
          f"(scale {scale:.3g}, relative {diff / max(scale, 1e-30):.2e})")
    print_compile_time_and_save(cm, args.out)
    if args.out:
        print(f"  try: graphopt generate {args.out} --prompt \"Tell me about cats.\" --chat")


def pass_list(args) -> list:
    """The preset's passes, with layer skipping (and FFN fusion), then head and channel
    pruning, after constant folding."""
    from ..passes import (
        AttentionHeadPruning,
        ChannelPruning,
        ConstantFolding,
        DeadCodeElimination,
        ExpertPruning,
        preset,
    )
    from ..passes.ffn_fusion import FFNFusion
    from ..passes.layer_skipping import LayerSkipping
    passes = preset(args.passes)
    if args.fuse_ffn and not args.skip_sublayers:
        raise GraphoptError("--fuse-ffn fuses FFNs made consecutive by --skip-sublayers; give both")
    extra = []
    if args.skip_sublayers:
        extra.append(LayerSkipping(method=args.skip_method, sublayers=args.skip_sublayers,
                                   kinds=tuple(args.skip_kinds.split(","))))
        if args.fuse_ffn:
            extra.append(FFNFusion())
    if args.prune_experts:
        extra.append(ExpertPruning(keep=args.prune_experts))
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


def add_pruning_flags(c) -> None:
    """Channel, head and expert pruning flags, built from the passes' option fields (they import torch)."""
    from ..passes.channel_pruning import ChannelPruningOptions
    from ..passes.expert_pruning import ExpertPruningOptions
    from ..passes.head_pruning import AttentionHeadPruningOptions
    option_flag(c, "--prune-channels", ChannelPruningOptions, "ratio", default=0.0)
    option_flag(c, "--prune-budget", ChannelPruningOptions, "budget")
    option_flag(c, "--prune-scope", ChannelPruningOptions, "scope")
    option_flag(c, "--prune-mode", ChannelPruningOptions, "mode")
    option_flag(c, "--prune-importance", ChannelPruningOptions, "importance")
    option_flag(c, "--prune-exclude", ChannelPruningOptions, "exclude", nargs="*", default=[])
    c.add_argument("--no-reorder", action="store_true", help="skip UPSCALE channel reordering")
    option_flag(c, "--prune-granularity", ChannelPruningOptions, "granularity")
    option_flag(c, "--prune-heads", AttentionHeadPruningOptions, "ratio", default=0.0)
    option_flag(c, "--head-importance", AttentionHeadPruningOptions, "importance")
    option_flag(c, "--head-scope", AttentionHeadPruningOptions, "scope")
    option_flag(c, "--prune-experts", ExpertPruningOptions, "keep", default=0.0)


def add_parsers(sub, with_pass_flags: bool = True) -> None:
    """`with_pass_flags=False` leaves out the flags built from pass options, so that parsing
    another command's arguments does not import torch."""
    c = sub.add_parser("compile", help="compile a model, print what it gained, save an artifact")
    c.add_argument("--model", default="smollm2",
                   help="a name from `graphopt models`, an .onnx file, or a Hugging Face checkpoint folder "
                        "(its weights streamed from its safetensors files)")
    c.add_argument("--dim", action="append", default=[], type=dim_size, metavar="NAME=SIZE",
                   help="an .onnx file's named input dim (repeat: --dim batch=1 --dim sequence=128)")
    c.add_argument("--backend", default="onnxruntime")
    c.add_argument("--task", choices=["text-generation"],
                   help="text-generation: prompt and decode steps with an in-place KV cache, tokenizer included")
    c.add_argument("--cache-dtype", choices=["float32", "float16"],
                   help="--task text-generation: the KV cache's type (default float32; float16 halves its bytes)")
    c.add_argument("--passes", default="default", help="preset name: none, default, fuse, int8, int4")
    c.add_argument("--skip-sublayers", type=int, default=0, help="remove this many attention/FFN sublayers")
    c.add_argument("--skip-method", default="finercut", help="tail, bi, finercut, finercut-oneshot")
    c.add_argument("--skip-kinds", default="attention,ffn", help="which sublayers may go")
    c.add_argument("--fuse-ffn", action="store_true", help="then fuse runs of consecutive FFNs (FFN Fusion)")
    if with_pass_flags:
        add_pruning_flags(c)
    c.add_argument("--calibration-text", help="text for calibration (default: ../shared/corpus/calibration.txt)")
    c.add_argument("--calibration-tokens", type=int, default=2048, help="0 disables calibration")
    c.add_argument("--seq-len", type=int, default=128)
    c.add_argument("--dynamic-seq", action="store_true", help="make the sequence length dynamic")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--tvm-target", default="host",
                   help="CPU the TVM library is built for: host (this CPU's every feature), or an x86-64 level "
                        "such as x86-64-v3 (AVX2) for an artifact that runs on any CPU of that level")
    c.add_argument("--precision", default=None,
                   help="arithmetic of the backend: tvm f32 (default) | bf16 | int8 (graphopt's AMX / AVX-512 "
                        "kernels); openvino f32 (default) | bf16 | f16 | default (the plugin's choice)")
    c.add_argument("--precision-override", action="append", type=precision_override, metavar="PATTERN=PRECISION",
                   help="tvm mixed precision: weights whose name matches PATTERN (a regular expression, e.g. "
                        "lm_head) computed in PRECISION (f32 | bf16 | int8); repeatable, first match wins")
    add_executor_flags(c)
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--no-verify", action="store_true", help="skip output verification after each pass")
    c.add_argument("--dump-dir", help="write the graph before/after each changing pass here")
    c.add_argument("--out", help="artifact directory to write")
    c.set_defaults(func=cmd_compile)

