"""`graphopt generate | inspect | bench`: use a saved artifact. These need only numpy and
onnxruntime (and tokenizers to generate), never torch."""
from __future__ import annotations

import json
import os
import sys

from .common import median_ms


def cmd_generate(args) -> None:
    from ..artifact import load
    lm = load(args.artifact, threads=args.threads)
    pieces = lm.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or None,
                         chat=args.chat, stream=True)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(lm.generation_stats.line(), file=sys.stderr)


def cmd_inspect(args) -> None:
    from ..artifact import read_manifest, verify_files
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

    from ..artifact import load
    rt = load(args.artifact, threads=args.threads)
    rng = np.random.default_rng(0)
    feed = []
    for spec in rt.inputs:
        shape = [d if isinstance(d, int) else args.dynamic_size for d in spec.shape]
        if spec.dtype.startswith("int"):
            feed.append(rng.integers(0, 100, size=shape).astype(spec.dtype))
        else:
            feed.append(rng.standard_normal(shape).astype(spec.dtype))
    ms = median_ms(lambda: rt(*feed), args.repeats)
    print(f"{args.artifact}: median {ms:.2f} ms over {args.repeats} runs "
          f"(inputs {', '.join(f'{s.name}{list(a.shape)}' for s, a in zip(rt.inputs, feed))})")


def add_parsers(sub) -> None:
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

