"""Channel pruning exports: copies in the graph, latency and accuracy (UPSCALE's comparison).

    python benchmarks/channel_reorder.py [--models resnet densenet smollm2] [--sparsity 0.3 0.5]
                                         [--budget channels|flops] [--scope layer|global]
                                         [--backends onnxruntime tvm] [--repeats 40]
                                         [--train-steps 300] [--finetune-steps 50] [--json out.json]

For each model and sparsity, four exports (L1 importance). With `--budget channels` (the
default) sparsity is the fraction of every consumer's input channels dropped, so the
unconstrained exports, whose producers compute the union of what their consumers keep, do
more multiply-accumulates than the constrained one; with `--budget flops` every export removes
the same share of the conv/linear MACs (ChannelPruning(budget="flops") searches the channel
ratio that reaches it; the unconstrained exports aim at what the constrained one removed,
which overshoots the nominal share by up to a segment's 16-channel step), the comparison at
equal compute. Exports:
    unpruned
    constrained              every consumer of a segment drops the same channels: no copies
    unconstrained-naive      each consumer keeps its own channels; gathers where needed
    unconstrained-reordered  the same channels, laid out by UPSCALE's ordering
    (+ unconstrained-reordered-slack: consumers may read up to 25% zero columns to avoid a copy)
    grouped-naive            unconstrained, but consumers keep whole 16-channel groups of a block
                             (granularity=16: a DenseNet consumer keeps or drops whole layers)
    grouped-reordered        the same channels; the reordered export reads concatenations by
                             their parts (no gather; a part's conv split into 16-aligned pieces)
Kept channel counts are rounded up to multiples of `--channel-multiple` (16: what ONNX
Runtime's blocked conv kernels need), so `columns_dropped` (the share of consumer input
channels actually dropped) is at or below the nominal sparsity.
Columns: Gather/Slice/Concat ops in the exported ONNX graph (beyond the unpruned graph's), the
share of layer MACs removed, weight MB, median latency on ONNX Runtime, on TVM (with
`--backends ... tvm`: copies fuse into the convolution that reads them) and on the torch
backend (the pruned graph run eagerly,
where a channel slice is a view and costs nothing, as in the paper's PyTorch measurements;
in ONNX Runtime a Slice copies like a Gather), timed round-robin in one run (ratio = unpruned
/ this, > 1 is faster; CNNs on 1 thread, in blocks of 20 calls), and accuracy. The CNNs
(written in graphopt.models.cnn) are first trained here on a synthetic
10-class image task (class templates of low-frequency patterns, random shifts and noise),
so accuracy is test accuracy of the ONNX Runtime artifact on 1,024 held-out samples straight
after pruning; `accuracy_finetuned` is the pruned graph's after `--finetune-steps` of training
at `--finetune-lr` (the brief recovery a pruned model gets; the unpruned row gets the same
steps, and since the CNNs are trained only briefly it gains too: compare with it); `agree`
is top-1 agreement with the unpruned model. For SmolLM2-135M (real weights) accuracy is
perplexity on ../shared/corpus/evaluation.txt
(128-token windows) and agreement is next-token top-1 agreement; its latency is a 128-token
prefill. Naive and reordered exports of one sparsity and granularity compute the same
function (checked).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import onnx
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians, print_table, write_json  # noqa: E402

import graphopt  # noqa: E402
from graphopt.analysis.cost import graph_cost  # noqa: E402
from graphopt.frontend.torch_export import capture  # noqa: E402
from graphopt.ir.graph import fetch_attr, parameter_bytes  # noqa: E402
from graphopt.models.cnn import SmallDenseNet, SmallResNet  # noqa: E402
from graphopt.passes import ConstantFolding, DeadCodeElimination, PassContext, PassManager  # noqa: E402
from graphopt.passes.channel_pruning import ChannelPruning  # noqa: E402

VARIANTS = {
    "unpruned": None,
    "constrained": dict(mode="constrained"),
    "unconstrained-naive": dict(mode="unconstrained", reorder=False),
    "unconstrained-reordered": dict(mode="unconstrained", reorder=True),
    "unconstrained-reordered-slack": dict(mode="unconstrained", reorder=True, slack=0.25),
    "grouped-naive": dict(mode="unconstrained", reorder=False, granularity=16),
    "grouped-reordered": dict(mode="unconstrained", reorder=True, granularity=16),
}


# -- a small task the CNNs learn here ------------------------------------------------------
def synthetic_images(count: int, generator: torch.Generator, templates: torch.Tensor, size: int = 32,
                     distinct: float = 0.15, noise: float = 1.0):
    """Images of 10 classes: a shared pattern plus `distinct` x the class's own, at a random
    contrast, shifted by up to 4 pixels, in Gaussian noise (ResNet-style CNNs reach ~85%)."""
    labels = torch.randint(0, templates.shape[0], (count,), generator=generator)
    shared = templates.mean(0, keepdim=True)
    x = (shared + distinct * (templates[labels] - shared)) * (0.5 + torch.rand(count, 1, 1, 1, generator=generator))
    shifts = torch.randint(-4, 5, (count, 2), generator=generator)
    x = torch.stack([torch.roll(img, (int(dy), int(dx)), (1, 2)) for img, (dy, dx) in zip(x, shifts)])
    return x + noise * torch.randn(count, 3, size, size, generator=generator), labels


def task(seed: int = 0, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(10, 3, 4, 4, generator=g), size=(size, size), mode="bicubic",
                              align_corners=False)
    train = [synthetic_images(64, g, templates) for _ in range(50)]
    test = synthetic_images(1024, g, templates)
    return train, test


def train_cnn(model: torch.nn.Module, batches, steps: int) -> torch.nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def finetune_graph(gm: torch.fx.GraphModule, batches, steps: int, lr: float = 3e-4) -> torch.fx.GraphModule:
    """Train the pruned graph itself (weights and batch-norm affine; running statistics stay)
    for `steps`: the brief recovery a pruned model gets before deployment."""
    gm = copy.deepcopy(gm)
    stats = {n.args[i].target for n in gm.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)
             for i in (3, 4)}
    trainable = [t for n in gm.graph.nodes if n.op == "get_attr" and n.target not in stats
                 for t in [fetch_attr(gm, n.target)] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    for t in trainable:
        t.requires_grad_(True)
    opt = torch.optim.Adam(trainable, lr=lr)
    for step in range(steps):
        x, y = batches[step % len(batches)]
        loss = F.cross_entropy(gm(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for t in trainable:
        t.requires_grad_(False)
    return gm


# -- helpers ---------------------------------------------------------------------------------
def onnx_copies(cm) -> tuple[int, int, int]:
    model = onnx.load(os.path.join(cm.executable.workdir, "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    return ops.count("Gather"), ops.count("Slice"), ops.count("Concat")


def passes_for(options) -> list:
    return [ConstantFolding()] + ([ChannelPruning(**options)] if options else []) + [DeadCodeElimination()]


def compile_variant(model, example, options, dynamic_dims, calibration=None, backend="onnxruntime"):
    """The compiled model and the share of consumer input channels actually dropped."""
    passes = passes_for(options)
    cm = graphopt.compile(model, example, passes=passes, backend=backend, dynamic_dims=dynamic_dims,
                          backend_options={"threads": torch.get_num_threads()}, progress=False,
                          calibration=calibration if options else None)
    stats = passes[1].stats if options else None
    return cm, (1 - stats.consumer_columns_after / stats.consumer_columns_before) if stats else 0.0



def pruned_graph(model, example, options) -> torch.fx.GraphModule:
    """The same pruning on a graph captured for training batches (the latency graph is batch 1);
    the choice depends on the weights only, so it is the same export."""
    gm = capture(model, example).graph_module
    return PassManager(passes_for(options)).run(gm, PassContext(example)).graph_module


def run_model(name: str, args) -> list[dict]:
    if name == "smollm2":
        from graphopt.analysis.quality import perplexity, token_windows
        from graphopt.corpus import read_text
        bundle = graphopt.models.load("smollm2")
        model = bundle.model
        windows = token_windows(bundle.tokenizer, read_text("evaluation.txt"), 128, 128 * args.eval_windows)
        calibration = [(w,) for w in token_windows(bundle.tokenizer, read_text("calibration.txt"), 128, 512)]
        example, dynamic = (windows[0],), None
    else:
        torch.manual_seed(0)
        model = SmallResNet(widths=(32, 64, 128)) if name == "resnet" else SmallDenseNet(growth=16, layers_per_block=6)
        train, (x_test, y_test) = task()
        train_cnn(model, train, args.train_steps)
        example, dynamic, calibration = (x_test[:1],), None, None
    rows = []
    unpruned, _ = compile_variant(model, example, None, dynamic)
    base_macs = graph_cost(unpruned.graph_module).macs
    for sparsity in args.sparsity:
        compiled, dropped = {"unpruned": unpruned}, {"unpruned": 0.0}
        options_of = {v: None if o is None else dict(o, ratio=sparsity, exclude=tuple(args.exclude),
                                                     channel_multiple=args.channel_multiple,
                                                     importance=args.importance, budget=args.budget,
                                                     scope=args.scope)
                      for v, o in VARIANTS.items() if v in args.variants}
        for variant, opts in options_of.items():
            if opts is not None and args.budget == "flops" and opts["mode"] == "unconstrained" and \
                    "constrained" in compiled:
                # the constrained export overshoots the budget by a segment's step: match what it removed
                opts["ratio"] = 1 - graph_cost(compiled["constrained"].graph_module).macs / base_macs
            if opts is not None:
                compiled[variant], dropped[variant] = compile_variant(model, example, opts, dynamic, calibration)
                print(f"  compiled {name} {sparsity:.0%} {variant}", file=sys.stderr)
        calls = 1 if name == "smollm2" else 20
        ort_times = interleaved_medians({v: (lambda cm=cm: cm(*example)) for v, cm in compiled.items()},
                                        args.repeats, calls_per_round=calls)
        with torch.no_grad():
            torch_times = interleaved_medians({v: (lambda gm=cm.graph_module: gm(*example))
                                               for v, cm in compiled.items()}, args.repeats, calls_per_round=calls)
        tvm_times = {}
        if "tvm" in args.backends:
            built = {v: compile_variant(model, example, options_of.get(v), dynamic, calibration, "tvm")[0]
                     for v in compiled}
            tvm_times = interleaved_medians({v: (lambda cm=cm: cm(*example)) for v, cm in built.items()},
                                            args.repeats, calls_per_round=calls)
        base_gather, base_slice, base_concat = onnx_copies(compiled["unpruned"])
        outputs = {}
        for variant, cm in compiled.items():
            if name == "smollm2":
                logits = [torch.as_tensor(cm(w)) for w in windows]
                outputs[variant] = logits
                quality = perplexity(cm, windows, progress=False).perplexity
            else:
                logits = torch.cat([torch.as_tensor(cm(x_test[i:i + 1])) for i in range(len(x_test))])
                outputs[variant] = [logits]
                quality = float((logits.argmax(-1) == y_test).float().mean())
                if args.finetune_steps:
                    tuned = finetune_graph(pruned_graph(model, (train[0][0],), options_of[variant]), train,
                                           args.finetune_steps, args.finetune_lr)
                    with torch.no_grad():
                        tuned_logits = torch.cat([tuned(x)[0] for x in x_test.split(64)])
                    recovered = float((tuned_logits.argmax(-1) == y_test).float().mean())
            ref = outputs["unpruned"]
            agree = float(torch.cat([(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in zip(outputs[variant], ref)])
                          .float().mean())
            gathers, slices, concats = onnx_copies(cm)
            rows.append({
                "name": f"{name} {sparsity:.0%} {variant}", "model": name, "sparsity": sparsity, "variant": variant,
                "columns_dropped": dropped[variant],
                "macs_removed": 1 - graph_cost(cm.graph_module).macs / base_macs,
                "gathers": gathers - base_gather, "slices": slices - base_slice, "concats": concats - base_concat,
                "weights_mb": parameter_bytes(cm.graph_module) / 1e6,
                "ort_ms": ort_times[variant] * 1e3, "ort_speedup": ort_times["unpruned"] / ort_times[variant],
                **({"tvm_ms": tvm_times[variant] * 1e3, "tvm_speedup": tvm_times["unpruned"] / tvm_times[variant]}
                   if tvm_times else {}),
                "torch_ms": torch_times[variant] * 1e3,
                "torch_speedup": torch_times["unpruned"] / torch_times[variant],
                "perplexity" if name == "smollm2" else "accuracy": quality, "agree": agree,
            })
            if name != "smollm2" and args.finetune_steps:
                rows[-1]["accuracy_finetuned"] = recovered
        for family in (("unconstrained-naive", "unconstrained-reordered", "unconstrained-reordered-slack"),
                       ("grouped-naive", "grouped-reordered")):
            same = [outputs[v] for v in family if v in outputs]
            for other in same[1:]:
                for a, b in zip(same[0], other):
                    err = float((a - b).abs().max() / a.abs().max())
                    assert err < 1e-4, f"reordering changed {name}'s outputs by {err:.2e}"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet", "densenet", "smollm2"])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--budget", default="channels", choices=["channels", "flops"],
                    help="sparsity as a share of each consumer's channels, or of the layer MACs (equal compute)")
    ap.add_argument("--scope", default="layer", choices=["layer", "global"],
                    help="layer: every consumer drops the same share; global: ranked across layers (finer steps)")
    ap.add_argument("--backends", nargs="+", default=["onnxruntime"], choices=["onnxruntime", "tvm"],
                    help="onnxruntime is always timed; tvm adds a TVM build of every export")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=50, help="CNNs: training steps after pruning (0: none)")
    ap.add_argument("--finetune-lr", type=float, default=3e-4, help="CNNs: Adam learning rate of those steps (1e-3 "
                    "measured unstable: it took the unpruned ResNet from 0.86 to 0.79)")
    ap.add_argument("--eval-windows", type=int, default=16, help="SmolLM2: 128-token evaluation windows")
    ap.add_argument("--exclude", nargs="*", default=[], help="consumer names left whole (fnmatch)")
    ap.add_argument("--importance", default="l1", help="l1, l2 or activation (SmolLM2: on 4 x 128 tokens of "
                    "calibration.txt; CNNs: on the example image)")
    ap.add_argument("--channel-multiple", type=int, default=16, help="kept channel counts rounded up to multiples")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="SmolLM2's threads")
    ap.add_argument("--cnn-threads", type=int, default=1, help="the CNNs' threads (batch-1 convs this small "
                    "measured slower on 2 threads than on 1)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        torch.set_num_threads(args.threads if name == "smollm2" else args.cnn_threads)
        rows += run_model(name, args)
        print_table([r for r in rows if r["model"] == name],
                    ["name", "columns_dropped", "macs_removed", "gathers", "slices", "concats", "weights_mb", "ort_ms",
                     "ort_speedup", "tvm_ms", "tvm_speedup", "torch_ms", "torch_speedup",
                     "perplexity" if name == "smollm2" else "accuracy", "accuracy_finetuned", "agree"])
        print()
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
