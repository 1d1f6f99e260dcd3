"""128-token SmolLM2 prefill latency: torch eager, torch.compile, ONNX Runtime on the plain
torch.onnx export, graphopt (onnxruntime) with the "none", "default" and "fuse" presets, int8
weights with int8 activations in MatMulNBits (accuracy level 4: "int8 compute") and the "int4"
preset, and
graphopt (tvm) with the "default" and "fuse" presets, at bf16 and int8 precision (weight
matmuls in graphopt's AMX / AVX512-BF16 / AVX512-VNNI kernels; int8's per-channel smoothing
and outlier channels learnt from 4 128-token windows of calibration.txt), mixed (bf16 with the
LM head in int8) and with the "int4" preset
(4-bit codes dequantized into the bf16 kernels; "not supported on this CPU" without them);
OpenVINO
as a peer on graphopt's own model.onnx (f32 precision hint, and its default hint: bf16 on CPUs
with AVX-512 BF16 or AMX), and graphopt's openvino backend at both and with the "int4" preset (a peer that is not
installed prints "not installed").
The header names the CPU's vector and matrix features. `--isa avx2` runs as an AVX2-only CPU
(Zen 3) would, on any x86 host: graphopt's TVM rows target x86-64-v3 (their kernels chosen for
AVX2, the bf16 rows "not supported on this CPU"), and OpenVINO and torch are capped to AVX2
(ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS; the process restarts with
them) with OpenVINO's default hint taken as f32, what it picks without bf16; ONNX Runtime's MLAS
has no cap, so its rows keep the host's instructions (said in the header). `--quality` adds each row's
perplexity on evaluation.txt (128-token windows, the first --quality-tokens tokens), its
change from eager's, and how far its next-token distributions are from eager's at every
position: the mean KL divergence (nats) and the share of positions with the same top token.
What reduced-precision rows cost; the perplexity change alone can have either sign.

    python benchmarks/prefill.py [--seq-len 128] [--repeats 10] [--threads 2] [--skip-tvm] [--isa avx2]
                                 [--rows NAME ...] [--json out.json]

`--rows` times only the named rows (and the two the ratios need): a longer interleaved check of a few.

setup_s is the compile time (export, passes, lowering; for TVM the LLVM build too).

Two rows bound what any exact fp32 rewrite can reach on this machine: "fp32 linear layers
alone (torch)" runs just the model's linear layers (its weights, random activations of the
prefill's shape), timed in the same rounds as the peers, so it is the part of eager's time
spent in matrix products; "fp32 floor (MACs at peak GEMM rate)" is the graph's
multiply-accumulates (graphopt.analysis.cost) divided by the best fp32 GEMM rate measured in
this run (torch.mm on 2048 x 2048 matrices, the most favourable shape).

All peers run in this process on the same tokens with the same thread count, and are timed
round-robin (one call of each per round) so that load on a shared machine hits all alike;
compare the ratios, not the absolute times.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians, print_table, write_json  # noqa: E402

import graphopt  # noqa: E402
from graphopt.analysis.cost import graph_cost  # noqa: E402
from graphopt.analysis.quality import token_windows  # noqa: E402
from graphopt.backends.onnxruntime.runner import OrtRunner  # noqa: E402
from graphopt.backends.tvm.dense_kernels import kernel_for  # noqa: E402
from graphopt.backends.tvm.runner import cpu_flags, required_cpu_features, tvm_target  # noqa: E402
from graphopt.corpus import read_text  # noqa: E402
from graphopt.passes import ConstantFolding, DeadCodeElimination  # noqa: E402
from graphopt.passes.weight_quantization import WeightQuantization  # noqa: E402


def linear_layers_alone(model: torch.nn.Module, tokens: int):
    """A callable doing exactly the model's linear layers for `tokens` tokens, nothing else."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(tokens, m.in_features) for m in layers]

    def run():
        with torch.no_grad():
            for m, x in zip(layers, inputs):
                torch.nn.functional.linear(x, m.weight, m.bias)
    return run


def peak_gemm_flops(size: int = 2048, calls: int = 10) -> float:
    """The best fp32 FLOP/s torch.mm reaches on square matrices here, over 3 blocks of calls."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * size ** 3 / best


# what --isa avx2 sets before torch and OpenVINO start (their oneDNN, ATen and MKL kernels)
AVX2_ENVIRONMENT = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
OPENVINO_ROWS = ("openvino f32 (graphopt's model.onnx)", "openvino default hint (graphopt's model.onnx)",
                 "graphopt openvino (f32)", "graphopt openvino (default)", "graphopt openvino (int4, default)")


def windows_quality(run, windows, ids: torch.Tensor, reference: list | None = None) -> dict:
    """Perplexity (exp of the mean next-token NLL) of a candidate over [1, seq_len] windows and,
    given `reference` (eager's log-probabilities, one [seq_len, vocab] tensor per window), the
    mean KL(eager || candidate) per position and how often both pick the same top token; with
    reference=None, `log_probs` holds the candidate's, to be the reference. A candidate is a
    closure over the benchmark's `ids`, so each window is copied into that tensor first."""
    total, count, kl, agree, log_probs = 0.0, 0, 0.0, 0, []
    for i, window in enumerate(windows):
        ids.copy_(window)
        with torch.no_grad():
            out = run()
        logits = torch.as_tensor(out.logits if hasattr(out, "logits") else out)[0].double()
        total += float(torch.nn.functional.cross_entropy(logits[:-1], window[0, 1:], reduction="sum"))
        count += logits.shape[0] - 1
        logq = torch.log_softmax(logits, -1)
        if reference is None:
            log_probs.append(logq.float())
            continue
        logp = reference[i].double()
        kl += float((logp.exp() * (logp - logq)).sum())
        agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
    positions = sum(w.shape[1] for w in windows)
    return {"perplexity": math.exp(total / count), "kl": kl / positions if reference else 0.0,
            "top1_agreement": agree / positions if reference else 1.0, "log_probs": log_probs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-torch-compile", action="store_true")
    ap.add_argument("--skip-tvm", action="store_true")
    ap.add_argument("--quality", action="store_true",
                    help="perplexity of every row on evaluation.txt (128-token windows) and its change from eager")
    ap.add_argument("--quality-tokens", type=int, default=4096)
    ap.add_argument("--isa", choices=("host", "avx2"), default="host",
                    help="avx2: run as an AVX2-only CPU would (see the module docstring)")
    ap.add_argument("--rows", nargs="*", metavar="NAME",
                    help="only these rows (names as printed; torch eager and onnxruntime (plain export), the "
                         "ratios' bases, always run)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ENVIRONMENT.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENVIRONMENT})
    avx2 = args.isa == "avx2"
    tvm_options = {"target": "x86-64-v3"} if avx2 else {}
    features = set(required_cpu_features(tvm_target("x86-64-v3"))) if avx2 else cpu_flags()
    torch.set_num_threads(args.threads)

    bundle = graphopt.models.load("smollm2")
    model = bundle.model
    (ids,) = bundle.example_inputs(seq_len=args.seq_len, text=read_text("evaluation.txt", 20000))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    candidates, setup, diffs = {}, {}, {}
    not_installed: list[str] = []
    unsupported: list[str] = []

    def wanted(name):
        return not args.rows or name in args.rows or name in ("torch eager", "onnxruntime (plain export)")

    def add(name, fn, started=None):
        with torch.no_grad():
            out = fn()
        out = out.logits if hasattr(out, "logits") else out
        setup[name] = None if started is None else time.perf_counter() - started
        diffs[name] = float((torch.as_tensor(out) - reference).abs().max())
        candidates[name] = fn
        print(f"  ready: {name}", file=sys.stderr)

    def eager():
        with torch.no_grad():
            return model(input_ids=ids)
    add("torch eager", eager)
    if not args.skip_torch_compile and wanted("torch.compile"):
        compiled = torch.compile(model)

        def run_compiled():
            with torch.no_grad():
                return compiled(input_ids=ids)
        add("torch.compile", run_compiled, time.perf_counter())

    tmp = tempfile.TemporaryDirectory()
    start = time.perf_counter()
    program = torch.onnx.export(model, (ids,), dynamo=True, input_names=["input_ids"], verbose=False)
    path = os.path.join(tmp.name, "plain.onnx")
    program.save(path, external_data=True)
    runner = OrtRunner(path, [graphopt.TensorSpec("input_ids", tuple(ids.shape), "int64")], [], args.threads)
    add("onnxruntime (plain export)", lambda: torch.from_numpy(runner.run([ids])[0]), start)

    int8_compute = [ConstantFolding(), WeightQuantization(bits=8, group_size=None, accuracy_level=4),
                    DeadCodeElimination()]
    for label, preset in (("none", "none"), ("default", "default"), ("fuse", "fuse"),
                          ("int8 compute", int8_compute), ("int4", "int4")):
        if not (wanted(f"graphopt onnxruntime ({label})") or preset == "default"):
            continue
        start = time.perf_counter()
        cm = graphopt.compile(model, (ids,), passes=preset, backend="onnxruntime",
                              backend_options={"threads": args.threads}, progress=False)
        if wanted(f"graphopt onnxruntime ({label})"):
            add(f"graphopt onnxruntime ({label})", lambda cm=cm: cm(ids), start)
        if preset == "default":
            macs = graph_cost(cm.graph_module).macs     # the exact presets leave the MACs as they are
            cm_default = cm
    if importlib.util.find_spec("openvino") is None:
        for name in OPENVINO_ROWS:
            print(f"  {name}: not installed", file=sys.stderr)
            not_installed.append(name)
    else:
        import openvino as ov
        onnx_path = os.path.join(cm_default.save(os.path.join(tmp.name, "graphopt-ort")), "model.onnx")
        core = ov.Core()
        # OpenVINO capped to AVX2 still sees the host's bf16 and picks it by default, then fails:
        # on an AVX2 CPU its default is f32
        for name, hint in (("openvino f32 (graphopt's model.onnx)", "f32"),
                           ("openvino default hint (graphopt's model.onnx)", "f32" if avx2 else None)):
            if not wanted(name):
                continue
            start = time.perf_counter()
            config = {"INFERENCE_NUM_THREADS": args.threads}
            if hint:
                config["INFERENCE_PRECISION_HINT"] = hint
            peer = core.compile_model(onnx_path, "CPU", config)
            add(name, lambda peer=peer: torch.from_numpy(peer(ids.numpy())[0]), start)
        for passes, precision in (("default", "f32"), ("default", "default"), ("int4", "default")):
            label = precision if passes == "default" else f"{passes}, {precision}"
            if not wanted(f"graphopt openvino ({label})"):
                continue
            start = time.perf_counter()
            cm = graphopt.compile(model, (ids,), passes=passes, backend="openvino", progress=False,
                                  backend_options={"threads": args.threads,
                                                   "precision": "f32" if avx2 else precision})
            add(f"graphopt openvino ({label})", lambda cm=cm: cm(ids), start)
    # (label, preset, options, the precision its kernels need); int8 learns its activations'
    # smoothing and outlier channels from 4 windows of calibration.txt (and the example inputs)
    calibration = token_windows(bundle.tokenizer, read_text("calibration.txt"), args.seq_len, 4 * args.seq_len)
    tvm_rows = [("default", "default", {}, None), ("fuse", "fuse", {}, None),
                ("bf16", "default", {"precision": "bf16"}, "bf16"), ("int8", "default", {"precision": "int8"}, "int8"),
                ("bf16, int8 lm_head", "default", {"precision": "bf16", "precision_overrides": {"lm_head": "int8"}},
                 "bf16"),
                ("int4", "int4", {}, "bf16")]
    for label, preset, options, needs in () if args.skip_tvm else tvm_rows:
        if not wanted(f"graphopt tvm ({label})"):
            continue
        if needs and kernel_for(needs, features) is None:
            unsupported.append(f"graphopt tvm ({label})")
            continue
        start = time.perf_counter()
        cm = graphopt.compile(model, (ids,), passes=preset, backend="tvm", progress=False,
                              calibration=calibration if "int8" in label else None,
                              backend_options={"threads": args.threads, **tvm_options, **options})
        add(f"graphopt tvm ({label})", lambda cm=cm: cm(ids), start)

    if wanted("fp32 linear layers alone (torch)"):
        candidates["fp32 linear layers alone (torch)"] = linear_layers_alone(model, ids.numel())
    medians = interleaved_medians(candidates, args.repeats)
    if wanted("fp32 floor (MACs at peak GEMM rate)"):
        medians["fp32 floor (MACs at peak GEMM rate)"] = 2 * macs / peak_gemm_flops()
    eager_ms = medians["torch eager"] * 1e3
    plain_ms = medians["onnxruntime (plain export)"] * 1e3
    rows = [{"name": name, "median_ms": s * 1e3, "speedup_vs_eager": eager_ms / (s * 1e3),
             "speedup_vs_ort_plain": plain_ms / (s * 1e3), "setup_s": setup.get(name),
             "max_abs_diff": diffs.get(name)}
            for name, s in medians.items()]
    if args.quality:
        windows = token_windows(bundle.tokenizer, read_text("evaluation.txt"), args.seq_len, args.quality_tokens)
        quality = {"torch eager": windows_quality(candidates["torch eager"], windows, ids)}
        reference = quality["torch eager"].pop("log_probs")
        quality.update({name: windows_quality(fn, windows, ids, reference) for name, fn in candidates.items()
                        if name not in quality and name != "fp32 linear layers alone (torch)"})
        for row in rows:
            if row["name"] in quality:
                found = quality[row["name"]]
                row.update(perplexity=found["perplexity"], kl=found["kl"], top1_agreement=found["top1_agreement"],
                           perplexity_change=found["perplexity"] / quality["torch eager"]["perplexity"] - 1)
    rows += [{"name": name, "median_ms": None, "speedup_vs_eager": None, "speedup_vs_ort_plain": None,
              "setup_s": None, "max_abs_diff": None, "note": "not installed"} for name in not_installed]
    rows += [{"name": name, "median_ms": None, "speedup_vs_eager": None, "speedup_vs_ort_plain": None,
              "setup_s": None, "max_abs_diff": None, "note": "not supported on this CPU"} for name in unsupported]
    flags = cpu_flags() or frozenset()
    host_features = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    print(f"\nSmolLM2-135M prefill, {args.seq_len} tokens, {args.threads} threads, "
          f"median of {args.repeats} interleaved rounds; CPU features: {' '.join(host_features) or 'unknown'}")
    if avx2:
        print("run as an AVX2-only CPU (--isa avx2): TVM targets x86-64-v3, OpenVINO and torch capped to AVX2 "
              "(OpenVINO's default hint = f32); ONNX Runtime rows use the host's instructions (MLAS has no cap)")
    columns = ["name", "median_ms", "speedup_vs_eager", "speedup_vs_ort_plain", "setup_s", "max_abs_diff"]
    quality_columns = ["perplexity", "perplexity_change", "kl", "top1_agreement"] if args.quality else []
    print_table(rows, columns + quality_columns + ["note"])
    write_json(rows, args.json)
    tmp.cleanup()


if __name__ == "__main__":
    main()
