"""The TVM backend's reduced precisions: weight matmuls in graphopt's C kernels, bf16 operands
with fp32 sums (AMX-BF16, AVX512-BF16) and int8 weights and dynamic int8 activations with
int32 sums (AMX-INT8, AVX512-VNNI, AVX2), each exact against the same roundings done in float64;
the fp32 fallback and which kernel a CPU gets."""
import json

import pytest
import torch

import graphopt
from graphopt.backends.tvm.dense_kernels import KERNELS, kernel_for
from graphopt.backends.tvm.int8_plan import int8_plans
from graphopt.backends.tvm.runner import cpu_flags
from graphopt.errors import BackendError

from ..conftest import assert_close_to_scale, run_artifact_without_torch

pytest.importorskip("tvm")

HOST_KERNELS = [(precision, name) for name, (precision, needs, _, _) in KERNELS.items()
                if set(needs) <= (cpu_flags() or set())]


class TiedTiny(torch.nn.Module):
    """Embedding tied to the head; an odd panel count (40 -> 48 columns); k = 40 stays fp32."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(100, 64)
        self.up = torch.nn.Linear(64, 96)
        self.down = torch.nn.Linear(96, 40, bias=False)
        self.back = torch.nn.Linear(40, 64)
        self.head = torch.nn.Linear(64, 100, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.back(self.down(torch.relu(self.up(h))))
        return self.head(h)


def bf16_reference(m: TiedTiny, ids: torch.Tensor, plans=None) -> torch.Tensor:
    """The bf16 plan in float64: operands of k % 32 == 0 matmuls (and the tied embedding
    rows, read from the bf16 panels) rounded to bf16 (nearest even), everything else exact."""
    h = _bf16(m.embed.weight)[ids]
    u = torch.relu(_bf16(h) @ _bf16(m.up.weight).T + m.up.bias.double())
    d = _bf16(u) @ _bf16(m.down.weight).T
    h = h + d @ m.back.weight.double().T + m.back.bias.double()
    return (_bf16(h) @ _bf16(m.embed.weight).T).float()


def _int8_weights(w, plan):
    """w's rows times the plan's smoothing s, rounded symmetric per output row, in float64."""
    s = torch.from_numpy(plan.smoothing).double()
    smoothed = w.detach().double() * s
    scale = smoothed.abs().amax(1, keepdim=True) / 127
    return torch.round(smoothed / scale) * scale


def _int8_matmul(x, w, plan):
    """x @ w^T as the int8 kernels compute it, in float64: x / s rounded per token, times the
    rounded smoothed weights, plus the outlier channels' products in full precision."""
    s, outliers = torch.from_numpy(plan.smoothing).double(), list(plan.outliers)
    smoothed = torch.where(s > 0, x / s, torch.zeros_like(x))
    scale = smoothed.abs().amax(-1, keepdim=True) / 127
    return (torch.round(smoothed / scale) * scale) @ _int8_weights(w, plan).T \
        + x[..., outliers] @ w.detach().double()[:, outliers].T


def _bf16(t):
    return t.detach().to(torch.bfloat16).double()


def int8_reference(m: TiedTiny, ids: torch.Tensor, plans: dict) -> torch.Tensor:
    """The int8 plan in float64: k % 64 == 0 matmuls (up, the tied head, and the embedding
    rows read from its panels) with the weights' rows times their plan's smoothing s (0 at the
    outlier channels) symmetric per output row and the activations over s per token, rounded to
    nearest even, plus the outlier channels' products in full precision; everything else exact."""
    up, head = plans["model.up.weight"], plans["model.head.weight"]
    s = torch.from_numpy(head.smoothing).double()
    table = torch.where(s > 0, _int8_weights(m.embed.weight, head) / s, m.embed.weight.detach().double())
    h = table[ids]
    u = torch.relu(_int8_matmul(h, m.up.weight, up) + m.up.bias.double())
    h = h + u @ m.down.weight.double().T @ m.back.weight.double().T + m.back.bias.double()
    return _int8_matmul(h, m.embed.weight, head).float()


def mixed_reference(m: TiedTiny, ids: torch.Tensor, plans: dict) -> torch.Tensor:
    """bf16 with `up` overridden to int8: the bf16 plan, but up's product as int8_reference's."""
    h = _bf16(m.embed.weight)[ids]
    u = torch.relu(_int8_matmul(h, m.up.weight, plans["model.up.weight"]) + m.up.bias.double())
    h = h + (_bf16(u) @ _bf16(m.down.weight).T) @ m.back.weight.double().T + m.back.bias.double()
    return (_bf16(h) @ _bf16(m.embed.weight).T).float()


REFERENCES = {"bf16": (bf16_reference, "1 of 4 weight matmuls stay fp32", (3, 1)),
              "int8": (int8_reference, "2 of 4 weight matmuls stay fp32", (2, 2))}


def test_kernel_choice_follows_the_cpu_features():
    assert kernel_for("bf16", {"avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"}) == "amx_bf16"
    assert kernel_for("bf16", {"avx512bw", "avx512_bf16"}) == "avx512_bf16"
    assert kernel_for("bf16", {"avx2", "fma"}) is None
    assert kernel_for("bf16", {"avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"}, "avx512_bf16") == "avx512_bf16"
    with pytest.raises(BackendError, match="'amx_bf16' needs CPU features amx_tile, amx_bf16"):
        kernel_for("bf16", {"avx512bw", "avx512_bf16"}, "amx_bf16")
    with pytest.raises(BackendError, match="unknown bf16 kernel 'amx_int8'"):
        kernel_for("bf16", {"avx512bw"}, "amx_int8")
    assert kernel_for("int8", {"avx512bw", "avx512_vnni", "amx_tile", "amx_int8"}) == "amx_int8"
    assert kernel_for("int8", {"avx512bw", "avx512_vnni"}) == "avx512_vnni"
    assert kernel_for("int8", {"avx2", "fma"}) == "avx2_int8"
    assert kernel_for("int8", {"sse4_2"}) is None


@pytest.mark.skipif(not HOST_KERNELS, reason="this CPU has no AMX, AVX512-BF16, AVX512-VNNI or AVX2")
@pytest.mark.parametrize("precision,kernel", HOST_KERNELS)
def test_reduced_precision_matmuls_equal_the_rounded_float64_plan(precision, kernel, tmp_path, capsys):
    m = TiedTiny().eval()
    with torch.no_grad():
        m.embed.weight[:, 5] *= 30                # an outlier channel of the embeddings (and the head's input)
    ids = torch.randint(0, 100, (1, 37))          # a 32-row block and a 5-row tail
    cm = graphopt.compile(m, (ids,), backend="tvm", dynamic_dims={0: {1: "seq"}}, progress=False,
                          backend_options={"precision": precision, "kernel": kernel})
    reference, fp32_said, counts = REFERENCES[precision]
    assert fp32_said in capsys.readouterr().err
    plans = int8_plans(cm.captured.graph_module, [(ids,)])
    if precision == "int8":
        assert plans["model.up.weight"].outliers == plans["model.head.weight"].outliers == (5,)
        assert "2 outlier channels in fp32, learnt from 1 batch(es)" in cm.records[-1].notes[0]
    for length in (1, 16, 37, 70):
        other = torch.randint(0, 100, (1, length), generator=torch.Generator().manual_seed(length))
        assert_close_to_scale(cm(other), reference(m, other, plans), 2e-6)
    # and it is not fp32: the rounding moves the result well beyond fp32's error
    assert (cm(ids) - m(ids)).abs().max() > 1e-3
    path = cm.save(str(tmp_path / "tiny-bf16"))
    backend = json.load(open(f"{path}/manifest.json"))["backend_options"]
    assert backend["precision"] == backend["precision_computed"] == precision
    assert backend["kernel"] == kernel and (backend["reduced_weights"], backend["fp32_weights"]) == counts
    assert_close_to_scale(torch.from_numpy(run_artifact_without_torch(path, (ids,))), cm(ids), 1e-7)


@pytest.mark.parametrize("precision,target", [("bf16", "x86-64-v3"), ("int8", "x86-64-v2")])
def test_a_target_without_the_kernels_says_it_computes_in_fp32(precision, target, tmp_path, capsys):
    m = TiedTiny().eval()
    ids = torch.randint(0, 100, (1, 8))
    cm = graphopt.compile(m, (ids,), backend="tvm", progress=False,
                          backend_options={"precision": precision, "target": target})
    assert f"{precision} is not supported on this target" in capsys.readouterr().err
    assert_close_to_scale(cm(ids), m(ids), 1e-5)
    backend = json.load(open(f"{cm.save(str(tmp_path / 'fallback'))}/manifest.json"))["backend_options"]
    assert backend["precision"] == precision and backend["precision_computed"] == "f32"
    assert backend["kernel"] is None


def test_unknown_precision_and_misplaced_kernel_option_are_one_line():
    with pytest.raises(BackendError, match="unknown TVM precision 'fp8'"):
        graphopt.backends.get_backend("tvm", precision="fp8")
    with pytest.raises(BackendError, match="unknown bf16 kernel 'amx_int8'"):      # f32: a bf16 kernel or none
        graphopt.backends.get_backend("tvm", kernel="amx_int8")


@pytest.mark.skipif(not any(p == "bf16" for p, _ in HOST_KERNELS), reason="this CPU has no bf16 kernel")
def test_the_bf16_cost_is_a_pass_log_entry_with_its_quality(tmp_path):
    m = TiedTiny().eval()
    batches = [torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    cm = graphopt.compile(m, (batches[0],), backend="tvm", calibration=batches, progress=False,
                          backend_options={"precision": "bf16"})
    record = cm.records[-1]
    assert record.name == "lower:tvm" and "weight matmuls in bf16" in record.notes[0]
    assert 1e-3 < record.max_output_diff < 0.5
    assert 0 < record.quality["js"] < 1e-3 and record.quality["top1_agreement"] > 0.9
    passes = json.load(open(f"{cm.save(str(tmp_path / 'q'))}/manifest.json"))["passes"]
    assert passes[-1]["name"] == "lower:tvm" and passes[-1]["quality"] == record.quality


@pytest.mark.skipif({"bf16", "int8"} - {p for p, _ in HOST_KERNELS}, reason="this CPU lacks a bf16 or int8 kernel")
def test_precision_overrides_mix_kernels_in_one_library(tmp_path, capsys):
    m = TiedTiny().eval()
    ids = torch.randint(0, 100, (1, 37))
    cm = graphopt.compile(m, (ids,), backend="tvm", dynamic_dims={0: {1: "seq"}}, progress=False,
                          backend_options={"precision": "bf16", "precision_overrides": {r"\bup\b": "int8"}})
    assert "1 of 4 weight matmuls stay fp32" in capsys.readouterr().err       # back: k = 40
    plans = int8_plans(cm.captured.graph_module, [(ids,)])
    for length in (1, 16, 37, 70):
        other = torch.randint(0, 100, (1, length), generator=torch.Generator().manual_seed(length))
        assert_close_to_scale(cm(other), mixed_reference(m, other, plans), 2e-6)
    note = cm.records[-1].notes[0]
    assert f"weights matching '\\bup\\b' in int8, {kernel_for('int8', cpu_flags())} kernel" in note
    assert "weight matmuls: 2 bf16, 1 f32, 1 int8" in note
    path = cm.save(str(tmp_path / "mixed"))
    backend = json.load(open(f"{path}/manifest.json"))["backend_options"]
    assert backend["precision_overrides"] == {r"\bup\b": "int8"}
    assert backend["weights_by_precision"] == {"bf16": 2, "f32": 1, "int8": 1}
    assert backend["override_kernels"] == {"int8": kernel_for("int8", cpu_flags())}
    assert backend["kernel"] == kernel_for("bf16", cpu_flags())
    assert_close_to_scale(torch.from_numpy(run_artifact_without_torch(path, (ids,))), cm(ids), 1e-7)


def test_precision_overrides_are_checked_and_fall_back_with_a_notice(capsys):
    with pytest.raises(BackendError, match=r"precision_overrides\['lm_head'\] = 'int4'; use one of f32, bf16, int8"):
        graphopt.backends.get_backend("tvm", precision_overrides={"lm_head": "int4"})
    with pytest.raises(BackendError, match="pattern '\\(' is not a regular expression"):
        graphopt.backends.get_backend("tvm", precision_overrides={"(": "int8"})
    m = TiedTiny().eval()
    ids = torch.randint(0, 100, (1, 8))
    with pytest.raises(BackendError, match="pattern 'lm_head' matches no weight matmul .their weights: "
                                           "model.back.weight, model.down.weight, model.head.weight, ...."):
        graphopt.compile(m, (ids,), backend="tvm", progress=False,
                         backend_options={"precision_overrides": {"lm_head": "f32"}})
    cm = graphopt.compile(m, (ids,), backend="tvm", progress=False,
                          backend_options={"target": "x86-64-v2", "precision_overrides": {"up": "int8"}})
    assert "int8 is not supported on this target" in capsys.readouterr().err
    assert_close_to_scale(cm(ids), m(ids), 1e-5)
    assert "weights matching 'up' in fp32 (no int8 kernel on this target)" in cm.records[-1].notes[0]
