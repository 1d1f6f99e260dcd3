"""Compile a language model for text generation, save it, load it torch-free and stream text.

    python examples/generate.py                                  # SmolLM2-135M, int4, a chat reply
    python examples/generate.py --passes default --prompt "The capital of France is" --no-chat
    python examples/generate.py --cache-dtype float16            # a half-size KV cache
    python examples/generate.py --backend tvm                    # graphopt's kernels for this CPU (fastest)

The artifact holds one graph for prompt and decode steps (its KV cache updated in place),
the tokenizer and the chat template; see docs/generation.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import graphopt


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passes", default="int4", help="a preset: default (fp32), int4, ...")
    ap.add_argument("--prompt", default="What is a compiler? Answer in two sentences.")
    ap.add_argument("--no-chat", action="store_true", help="continue the prompt instead of replying to it")
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--cache-dtype", default="float32", choices=["float32", "float16"], help="the KV cache's type")
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tvm"],
                    help="tvm: float32 cache only; int4 needs AVX512-BF16 or AMX")
    ap.add_argument("--out", default=None, help="artifact directory (default: a temporary one)")
    args = ap.parse_args(argv)

    bundle = graphopt.models.load("smollm2")
    cm = graphopt.compile(bundle.model, task="text-generation", tokenizer=bundle.tokenizer, passes=args.passes,
                          cache_dtype=args.cache_dtype, backend=args.backend)
    out = args.out or os.path.join(tempfile.mkdtemp(), "smollm2-gen")
    cm.save(out)

    lm = graphopt.load(out)                        # needs numpy, onnxruntime (or tvm) and tokenizers only
    pieces = []
    for piece in lm.generate(args.prompt, chat=not args.no_chat, max_new_tokens=args.max_new_tokens, stream=True):
        sys.stdout.write(piece)
        sys.stdout.flush()
        pieces.append(piece)
    print(f"\n[{lm.generation_stats.line()}]")
    return "".join(pieces)


if __name__ == "__main__":
    main()
