import pytest

from graphopt.backends.tvm.dense_kernels import kernel_for
from graphopt.backends.tvm.runner import cpu_flags

from ..conftest import load_example

pytest.importorskip("openvino")


def test_reduced_precision_example_reports_each_variant_and_its_cost(capsys):
    results = load_example("reduced_precision.py").main(["--seq-len", "16", "--calls", "1"])
    assert set(results) == {"tvm f32", "tvm bf16", "tvm int8", "tvm bf16, lm_head int8", "openvino default"}
    assert results["tvm f32"]["record"] is None
    out = capsys.readouterr()
    for precision in ("bf16", "int8"):
        record = results[f"tvm {precision}"]["record"]
        if kernel_for(precision, cpu_flags()) is None:
            assert record is None and f"{precision} is not supported on this target" in out.err
        else:
            assert f"weight matmuls in {precision}" in record.notes[0]
            assert 0 < record.max_output_diff and 0 <= record.quality["js"] < 1e-2
    if kernel_for("int8", cpu_flags()) is not None:
        assert "weights matching 'lm_head' in int8" in results["tvm bf16, lm_head int8"]["record"].notes[0]
    assert "JS" in out.out
