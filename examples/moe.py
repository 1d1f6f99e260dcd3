"""A mixture-of-experts model end to end: prune the least-routed experts, quantize every
expert, compile for ONNX Runtime (and TVM), then generate tokens from the artifact.

    python examples/moe.py                                  # Mixtral config (random weights), keep 3 of 4 experts
    python examples/moe.py --model qwen3_moe --keep 0.5 --tvm

Prints the routing share of every expert the pruning measured, the quality cost each lossy
pass recorded on the calibration batches, the largest difference between the artifact and
the same graph run in torch, and greedy tokens from a generation artifact compiled with the
same passes.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

import graphopt
from graphopt.passes import ExpertPruning, preset


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral", choices=["mixtral", "qwen3_moe", "deepseek_v3"])
    ap.add_argument("--keep", type=float, default=0.75, help="share of each layer's experts kept")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--tvm", action="store_true", help="also compile the pruned fp32 graph for TVM")
    args = ap.parse_args(argv)

    bundle = graphopt.models.load(args.model)
    calibration = [bundle.example_inputs(seq_len=args.seq_len, seed=s) for s in range(1, 5)]
    inputs = calibration[0]
    pruning = ExpertPruning(keep=args.keep)
    passes = [pruning, *preset("int4")]                  # prune first: quantization works on what is left
    cm = graphopt.compile(bundle.model, inputs, passes=passes, calibration=calibration, progress=False)
    print(cm.summary())
    for layer, counts in pruning.routing_counts.items():
        total = max(sum(counts), 1)
        shares = " ".join(f"{e}:{100 * c / total:.0f}%" for e, c in enumerate(counts))
        print(f"{layer}: routings per expert {shares}; kept {pruning.kept.get(layer, 'all')}")
    with torch.no_grad():
        difference = float((torch.as_tensor(cm(*inputs)) - cm.captured(*inputs)[0]).abs().max())
    print(f"artifact vs the quantized graph in torch: max |diff| {difference:.2e} (int8 activations in MatMulNBits)")
    with tempfile.TemporaryDirectory() as tmp:
        print("artifact:", cm.save(f"{tmp}/{args.model}-moe"))
    if args.tvm:
        tvm = graphopt.compile(bundle.model, inputs, passes=[ExpertPruning(keep=args.keep), *preset("default")],
                               backend="tvm", calibration=calibration, progress=False)
        print(f"tvm (dense experts): logits {tuple(torch.as_tensor(tvm(*inputs)).shape)}")

    model = bundle.model
    model.generation_config.eos_token_id = None                   # random weights: run to max_new_tokens
    generation = graphopt.compile(model, task="text-generation", passes=[ExpertPruning(keep=args.keep),
                                                                         *preset("int4")],
                                  calibration=[c[0] for c in calibration], progress=False)
    from graphopt.generation import generator_for
    generator = generator_for("(memory)", {"task": generation.task, "backend": "onnxruntime"},
                              generation.executable.runner, generation.extra_files)
    prompt = inputs[0][0, :8].tolist()
    tokens = [step[0] for step in generator.generate_tokens([prompt], 12)]
    print(f"greedy tokens after {prompt}: {tokens} ({generator.stats.line()})")
    return {"kept": dict(pruning.kept), "tokens": tokens, "difference": difference}


if __name__ == "__main__":
    main()
