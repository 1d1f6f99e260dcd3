"""Compile a KV-cache decode step, generate text with it, and add input-adaptive FFN skipping.

    python examples/decode_step.py                       # SmolLM2-135M, prompt from evaluation.txt
    python examples/decode_step.py --model llama --new-tokens 8

Prints the generated text (or ids) from the compiled step next to Hugging Face's `generate`,
then the per-token latency of the plain step and of the step whose FFNs run under an ONNX `If`
(skipped when the previous FFN left the residual stream's cosine above `--threshold`).
"""
from __future__ import annotations

import argparse
import time

import torch

import graphopt
from graphopt.corpus import read_text
from graphopt.frontend.decode import DecodeStep, generate_greedy, past_dims, prefill_cache
from graphopt.passes import ConstantFolding, DeadCodeElimination
from graphopt.passes.adaptive_ffn_skipping import AdaptiveFFNSkipping


def _per_token_ms(step, prompt, model, new_tokens):
    generate_greedy(step, prompt, model, 2)        # warm up
    started = time.perf_counter()
    tokens = generate_greedy(step, prompt, model, new_tokens)
    return tokens, (time.perf_counter() - started) / new_tokens * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.99)
    args = ap.parse_args(argv)

    bundle = graphopt.models.load(args.model)
    model = bundle.model
    if bundle.tokenizer is not None:
        (prompt,) = bundle.example_inputs(seq_len=args.prompt_tokens, text=read_text("evaluation.txt", 4000))
    else:
        (prompt,) = bundle.example_inputs(seq_len=args.prompt_tokens)
    inputs = (prompt[:, -1:], *prefill_cache(model, prompt[:, :-1]))
    layers = model.config.num_hidden_layers
    plain = graphopt.compile(DecodeStep(model), inputs, dynamic_dims=past_dims(model), progress=False)
    region = (layers // 4, layers - layers // 4)
    adaptive = graphopt.compile(DecodeStep(model), inputs, dynamic_dims=past_dims(model), progress=False,
                                passes=[ConstantFolding(), AdaptiveFFNSkipping(threshold=args.threshold, region=region),
                                        DeadCodeElimination()])

    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)[:, prompt.shape[1]:]
    results = {}
    for name, step in (("plain step", plain), (f"adaptive step (cos > {args.threshold})", adaptive)):
        tokens, ms = _per_token_ms(step, prompt, model, args.new_tokens)
        same = float((tokens == expected).float().mean())
        results[name] = (tokens, ms, same)
        shown = bundle.tokenizer.decode(tokens[0]) if bundle.tokenizer is not None else tokens[0].tolist()
        print(f"{name:32s} {ms:7.2f} ms/token  same tokens as HF generate: {same:.0%}  {shown!r}")
    changes = next(r.changes for r in adaptive.records if r.name == "adaptive_ffn_skipping")
    print(f"adaptive step: {len(changes)} FFNs under an If, e.g. {changes[0]}")
    return results


if __name__ == "__main__":
    main()
