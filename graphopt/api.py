"""compile() and CompiledModel: capture -> passes -> backend, with a pass log."""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .analysis.cost import graph_cost
from .backends import get_backend
from .backends.base import Executable
from .errors import GraphoptError
from .executors import get_executor
from .frontend.checkpoint import capture_checkpoint, is_checkpoint
from .frontend.torch_export import CapturedModel, capture
from .ir.graph import op_histogram, parameter_bytes
from .ir.lazy import materialize
from .passes import Pass, PassContext, PassManager, PassRecord, VerifyInstrument, preset
from .passes.instruments import Instrument, QualityInstrument
from .specs import check_inputs


class CompiledModel:
    """A compiled model: call it like the original (positional tensors), save it as an artifact."""

    def __init__(self, captured: CapturedModel, executable: Executable, records: list[PassRecord],
                 stats: dict[str, Any]):
        self.captured = captured
        self.executable = executable
        self.records = records
        self.stats = stats
        self.task: dict[str, Any] | None = None        # the manifest's task section (text generation)
        self.extra_files: dict[str, bytes] = {}         # written beside the backend's files
        self._generator = None

    @property
    def backend(self) -> str:
        return self.executable.backend

    @property
    def inputs(self):
        return self.captured.inputs

    @property
    def outputs(self):
        return self.captured.outputs

    @property
    def graph_module(self):
        return self.captured.graph_module

    def __call__(self, *args: torch.Tensor):
        check_inputs(self.captured.inputs, args)
        outs = self.executable.run(args)
        return outs[0] if len(outs) == 1 else outs

    def generate(self, prompt, **options):
        """Text generation in process, as graphopt.load(path).generate (task="text-generation")."""
        if self._generator is None:
            from .generation import generator_for
            self._generator = generator_for("(in memory)", {"task": self.task, "backend": self.backend},
                                            getattr(self.executable, "runner", None), self.extra_files)
        return self._generator.generate(prompt, **options)

    def report(self, path: str | None = None, *, simulate=(), apply: bool = False, json_path: str | None = None,
               **options):
        """Profile this model and write an HTML report to `path` (graphopt.report); returns the
        Report. `simulate` lists changes to predict ('int4:PATTERN', 'drop:NAME', 'prune:0.3',
        'heads:0.25'); `apply=True` also compiles and measures each."""
        from .report.sources import report_compiled
        report = report_compiled(self, simulate=simulate, apply=apply, **options)
        if path:
            report.write_html(path)
        if json_path:
            report.write_json(json_path)
        return report

    def save(self, directory: str) -> str:
        from .artifact import save
        return save(self, directory)

    def summary(self) -> str:
        lines = [f"backend: {self.backend}", "passes:"]
        for r in self.records:
            lines.append(f"  {r.name:24s} {'changed' if r.modified else 'no change':9s} "
                         f"{r.nodes_before:5d} -> {r.nodes_after:5d} nodes  {r.seconds:6.2f}s  "
                         + "; ".join(r.changes[:3]) + (" ..." if len(r.changes) > 3 else ""))
            if r.quality:
                q = r.quality
                line = (f"  {'':24s} quality on {q['rows']} calibration rows: JS {q['js']:.2e}, "
                        f"top-1 agreement {q['top1_agreement']:.3f}")
                if "perplexity_after" in q:
                    line += f", perplexity {q['perplexity_before']:.3f} -> {q['perplexity_after']:.3f}"
                lines.append(line)
        return "\n".join(lines)


def _resolve_passes(passes: str | Sequence[Pass] | None) -> list[Pass]:
    if passes is None:
        return []
    if isinstance(passes, str):
        return preset(passes)
    return list(passes)


def _precision_record(captured: CapturedModel, executable: Executable, calibration, index: int) -> PassRecord:
    """The backend's reduced precision as a pass-log entry: its largest output change on the
    example inputs and, with calibration batches, its quality cost against the fp32 graph
    (QualityInstrument's measures)."""
    from .analysis.quality import divergence_of_logits
    from .passes.instruments import first_output

    nodes, weight_bytes = len(captured.graph_module.graph.nodes), parameter_bytes(captured.graph_module)
    record = PassRecord(name=f"lower:{executable.backend}", index=index, iteration=0, modified=True,
                        nodes_before=nodes, nodes_after=nodes, bytes_before=weight_bytes, bytes_after=weight_bytes,
                        notes=[f"computes {executable.reduced_precision}"])
    with torch.no_grad():
        want = first_output(captured.graph_module(*captured.example_inputs))
    record.max_output_diff = float((first_output(executable.run(captured.example_inputs)) - want).abs().max())
    batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in (calibration or [])][:4]
    if batches:
        with torch.no_grad():
            before = [first_output(captured.graph_module(*b)) for b in batches]
        try:
            after = [first_output(executable.run(b)) for b in batches]
        except GraphoptError as exc:
            record.notes.append(f"quality not measured: {exc}")
            return record
        record.quality = divergence_of_logits(before, after, [b[0] for b in batches])
    return record


def compile(model: torch.nn.Module | str, example_inputs: Any = None, passes: str | Sequence[Pass] | None = "default",
            backend: str = "onnxruntime", *, dynamic_dims: Mapping[int, Mapping[int, str]] | None = None,
            verify: bool = True, instruments: Sequence[Instrument] = (), backend_options: Mapping | None = None,
            calibration: Sequence[Any] | None = None, progress: bool = True, task: str | None = None,
            tokenizer: Any = None, cache_dtype: str | None = None, executor: Any = None) -> CompiledModel:
    """Capture `model`, run `passes` (a preset name or a list of Pass instances), lower to `backend`.

    `task="text-generation"` compiles a Hugging Face causal LM for generation instead of one
    forward pass (graphopt.text_generation): no example inputs (the graph's are made from the
    config), `tokenizer` (a fast Hugging Face tokenizer) travels in the artifact, `calibration`
    is token id windows [batch, tokens], `cache_dtype` ("float32", the default, or "float16":
    half the cache's bytes, attention computed from float16 values) sets the KV cache's type,
    and the result has .generate(prompt, ...).

    `verify=True` runs the graph before and after each pass on `example_inputs` and fails
    with the pass's name if outputs move beyond its declared tolerance. `calibration` is a
    list of input tuples (like example_inputs) for passes that learn from data (GPTQ,
    activation-weighted clipping, layer skipping); with it, every lossy pass's quality cost
    on the first batches is recorded in its pass record (`quality`) and the manifest.

    `executor` is where the searches of lossy passes (layer skipping, head ablation) evaluate
    their candidates: None or "local" (this process), "ray" (the running Ray cluster, or one
    started on this machine), a Ray address, or a graphopt.executors.Executor
    (get_executor("ray", workers=2)). The choices do not depend on it (docs/scale.md).
    """
    if task is not None:
        from .text_generation import TASKS, compile_text_generation
        if task not in TASKS:
            raise GraphoptError(f"unknown task '{task}'; available: {', '.join(TASKS)}")
        if example_inputs is not None or dynamic_dims is not None:
            raise GraphoptError(f"task '{task}' makes its own example inputs and dynamic dims; pass neither")
        return compile_text_generation(model, tokenizer, passes, backend, calibration, cache_dtype=cache_dtype,
                                       verify=verify, instruments=instruments, backend_options=backend_options,
                                       progress=progress, executor=executor)
    if tokenizer is not None or cache_dtype is not None:
        raise GraphoptError("tokenizer= and cache_dtype= are for task='text-generation'")
    if example_inputs is None:
        raise GraphoptError("compile() needs example_inputs (or task='text-generation' for a causal LM)")
    backend_impl = get_backend(backend, **dict(backend_options or {}))
    executor_impl = get_executor(executor)
    pass_list = _resolve_passes(passes)
    stages = tqdm(total=3, desc="capture", unit="stage", disable=not progress, leave=False)
    t0 = time.perf_counter()
    if is_checkpoint(model):
        captured = capture_checkpoint(model, example_inputs, dynamic_dims)
    else:
        captured = capture(model, example_inputs, dynamic_dims)
    nodes_captured, bytes_captured = len(captured.graph_module.graph.nodes), parameter_bytes(captured.graph_module)
    macs_captured = graph_cost(captured.graph_module).macs
    stages.update()
    stages.set_description(f"passes ({len(pass_list)})")
    t1 = time.perf_counter()
    all_instruments = ([VerifyInstrument(captured.example_inputs)] if verify else []) + list(instruments)
    if calibration and not any(isinstance(i, QualityInstrument) for i in all_instruments):
        all_instruments.append(QualityInstrument())
    result = PassManager(pass_list, all_instruments, progress=progress).run(
        captured.graph_module, PassContext(captured.example_inputs,
                                        calibration=[tuple(b) if isinstance(b, (tuple, list)) else (b,)
                                                     for b in calibration] if calibration else None,
                                        executor=executor_impl))
    captured.graph_module = result.graph_module
    stages.update()
    stages.set_description(f"lower ({backend})")
    t2 = time.perf_counter()
    streamed = materialize(captured.graph_module)       # what is still on disk (streamed compile)
    batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calibration] if calibration else None
    executable = backend_impl.compile(captured, progress=progress, calibration=batches)
    if executable.reduced_precision:
        result.records.append(_precision_record(captured, executable, calibration, len(result.records)))
    stages.update()
    stages.close()
    t3 = time.perf_counter()
    stats = {
        "source": captured.source,
        "nodes_captured": nodes_captured, "nodes_optimized": len(result.graph_module.graph.nodes),
        "parameter_bytes_captured": bytes_captured, "parameter_bytes_optimized": parameter_bytes(result.graph_module),
        "macs_captured": macs_captured, "macs_optimized": graph_cost(result.graph_module).macs,
        "ops_optimized": op_histogram(result.graph_module),
        "seconds": {"capture": t1 - t0, "passes": t2 - t1, "lower": t3 - t2},
        "verified": verify,
    }
    if streamed or is_checkpoint(model):
        stats["weights_streamed"] = True
    return CompiledModel(captured, executable, result.records, stats)
