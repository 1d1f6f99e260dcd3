"""Quantize a model's weights to int4 (or int8 / W8A8), save the artifact, and measure what it costs.

    python examples/quantize.py                      # SmolLM2-135M, int4 g64 + weighted clipping + super weights
    python examples/quantize.py --model llama --scheme gptq --calibration-tokens 256

Prints the super weights found, the artifact size against fp32, and (for models with a
tokenizer) perplexity on ../shared/corpus/evaluation.txt before and after.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

import graphopt
from graphopt.analysis.quality import perplexity, token_windows
from graphopt.corpus import read_text
from graphopt.passes import (
    ActivationQuantization,
    ConstantFolding,
    DeadCodeElimination,
    MixedPrecisionQuantization,
    WeightQuantization,
)

SCHEMES = {
    "int8": lambda: [WeightQuantization(bits=8, group_size=None)],
    "int4": lambda: [WeightQuantization(bits=4, group_size=64, clip="mse", restore_super_weights=True)],
    "gptq": lambda: [WeightQuantization(bits=4, group_size=64, method="gptq", restore_super_weights=True)],
    "mixed": lambda: [MixedPrecisionQuantization(importance="lim", clip="mse", restore_super_weights=True)],
    "w8a8": lambda: [ActivationQuantization(), WeightQuantization(bits=8, group_size=None)],
}


def calibration_batches(bundle, seq_len, tokens):
    if bundle.tokenizer is None:    # random-weight test models: random token ids
        return [bundle.example_inputs(seq_len=seq_len, seed=s) for s in range(max(1, tokens // seq_len))]
    return [(w,) for w in token_windows(bundle.tokenizer, read_text("calibration.txt"), seq_len, tokens)]


def artifact_bytes(cm, directory):
    path = cm.save(directory)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--scheme", choices=sorted(SCHEMES), default="int4")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calibration-tokens", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    args = ap.parse_args(argv)

    bundle = graphopt.models.load(args.model)
    inputs = bundle.example_inputs(seq_len=args.seq_len) if bundle.is_sequence_model else bundle.example_inputs()
    calibration = calibration_batches(bundle, args.seq_len, args.calibration_tokens)
    passes = [ConstantFolding(), *SCHEMES[args.scheme](), DeadCodeElimination()]
    fp32 = graphopt.compile(bundle.model, inputs, passes="default")
    quantized = graphopt.compile(bundle.model, inputs, passes=passes, calibration=calibration)
    for record in quantized.records:
        if "quantization" in record.name:
            print(f"{record.name}: {record.changes[0] if record.changes else 'no change'}")
            for note in record.notes[:6]:
                print(f"  {note}")
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {label: artifact_bytes(cm, os.path.join(tmp, label)) for label, cm in
                 (("fp32", fp32), (args.scheme, quantized))}
    print(f"artifact: fp32 {sizes['fp32'] / 1e6:.1f} MB -> {args.scheme} {sizes[args.scheme] / 1e6:.1f} MB "
          f"({100 * sizes[args.scheme] / sizes['fp32']:.1f}%)")
    if bundle.tokenizer is not None:
        windows = token_windows(bundle.tokenizer, read_text("evaluation.txt"), args.seq_len, args.eval_tokens)
        before, after = perplexity(fp32, windows).perplexity, perplexity(quantized, windows).perplexity
        print(f"perplexity on {len(windows)} x {args.seq_len} tokens: fp32 {before:.3f} -> {args.scheme} "
              f"{after:.3f} ({100 * (after / before - 1):+.1f}%)")
    else:
        with torch.no_grad():
            ref = bundle.model(*inputs)
        ref = ref.logits if hasattr(ref, "logits") else ref
        out = quantized(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        print(f"max |logit change| {float((out - ref).abs().max()):.3g} (logit scale {float(ref.abs().max()):.3g})")
    return sizes


if __name__ == "__main__":
    main()
