"""Remove attention/FFN sublayers with FinerCut, fuse the FFNs left consecutive, save the
artifact, and measure what it cost.

    python examples/layer_skip.py                          # SmolLM2-135M: 6 sublayers, FinerCut greedy
    python examples/layer_skip.py --model llama --seq-len 16 --remove 2 --method bi

Prints the sublayers removed, the FFN groups fused, the quality cost each pass recorded on
the calibration batches, and (for models with a tokenizer) perplexity on
../shared/corpus/evaluation.txt before and after.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

import graphopt
from graphopt.analysis.quality import perplexity, token_windows
from graphopt.corpus import read_text
from graphopt.passes import ConstantFolding, DeadCodeElimination
from graphopt.passes.ffn_fusion import FFNFusion
from graphopt.passes.layer_skipping import LayerSkipping


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="finercut", choices=["tail", "bi", "finercut", "finercut-oneshot"])
    ap.add_argument("--remove", type=int, default=6, help="sublayers to remove")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calibration-windows", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    args = ap.parse_args(argv)

    bundle = graphopt.models.load(args.model)
    if bundle.tokenizer is None:      # random-weight test models: random token ids
        calibration = [bundle.example_inputs(seq_len=args.seq_len, seed=s)
                       for s in range(1, 1 + args.calibration_windows)]
    else:
        calibration = [(w,) for w in token_windows(bundle.tokenizer, read_text("calibration.txt"), args.seq_len,
                                                   args.seq_len * args.calibration_windows)]
    inputs = calibration[0]
    skipping = LayerSkipping(method=args.method, sublayers=args.remove)
    fusion = FFNFusion()
    cm = graphopt.compile(bundle.model, inputs, passes=[ConstantFolding(), skipping, fusion, DeadCodeElimination()],
                          calibration=calibration)
    print(cm.summary())
    print("removed: " + ", ".join(n for step in skipping.steps for n in step.names))
    print("fused:   " + ("; ".join(" + ".join(g) for g in fusion.groups) or "nothing (no FFN run within budget)"))
    with tempfile.TemporaryDirectory() as tmp:
        print(f"artifact: {cm.save(tmp)} ({cm.stats['parameter_bytes_optimized'] / 1e6:.1f} MB of weights, "
              f"from {cm.stats['parameter_bytes_captured'] / 1e6:.1f} MB)")
    result = {"removed": [n for step in skipping.steps for n in step.names], "groups": fusion.groups}
    if bundle.tokenizer is not None:
        windows = token_windows(bundle.tokenizer, read_text("evaluation.txt"), args.seq_len, args.eval_tokens)
        before = perplexity(bundle.model, windows).perplexity
        after = perplexity(cm, windows).perplexity
        print(f"perplexity on {len(windows)} x {args.seq_len} tokens of evaluation.txt: {before:.3f} -> {after:.3f} "
              f"({100 * (after / before - 1):+.1f}%)")
        result.update(before=before, after=after)
    with torch.no_grad():
        out = cm(*inputs)
    result["output_shape"] = tuple((out[0] if isinstance(out, tuple) else out).shape)
    return result


if __name__ == "__main__":
    main()
