"""The TVM backend's bf16 precision: weight matmuls with bf16 operands and fp32 sums in
graphopt's C kernels (AMX-BF16, AVX512-BF16), exact against the same roundings done in
float64; the fp32 fallback and which kernel a CPU gets."""
import json

import pytest
import torch

import graphopt
from graphopt.backends.tvm.bf16 import BF16_KERNELS, bf16_kernel_for
from graphopt.backends.tvm.runner import cpu_flags
from graphopt.errors import BackendError

from ..conftest import assert_close_to_scale, run_artifact_without_torch

pytest.importorskip("tvm")

HOST_KERNELS = [name for name, (needs, _) in BF16_KERNELS.items() if set(needs) <= (cpu_flags() or set())]


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


def bf16_reference(m: TiedTiny, ids: torch.Tensor) -> torch.Tensor:
    """The bf16 plan in float64: operands of k % 32 == 0 matmuls (and the tied embedding
    rows, read from the bf16 panels) rounded to bf16 (nearest even), everything else exact."""
    def r(t):
        return t.detach().to(torch.bfloat16).double()
    h = r(m.embed.weight)[ids]
    u = torch.relu(r(h) @ r(m.up.weight).T + m.up.bias.double())
    d = r(u) @ r(m.down.weight).T
    h = h + d @ m.back.weight.double().T + m.back.bias.double()
    return (r(h) @ r(m.embed.weight).T).float()


def test_kernel_choice_follows_the_cpu_features():
    assert bf16_kernel_for({"avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"}) == "amx_bf16"
    assert bf16_kernel_for({"avx512bw", "avx512_bf16"}) == "avx512_bf16"
    assert bf16_kernel_for({"avx2", "fma"}) is None
    assert bf16_kernel_for({"avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"}, "avx512_bf16") == "avx512_bf16"
    with pytest.raises(BackendError, match="'amx_bf16' needs CPU features amx_tile, amx_bf16"):
        bf16_kernel_for({"avx512bw", "avx512_bf16"}, "amx_bf16")
    with pytest.raises(BackendError, match="unknown bf16 kernel 'vnni'"):
        bf16_kernel_for({"avx512bw"}, "vnni")


@pytest.mark.skipif(not HOST_KERNELS, reason="this CPU has neither AMX-BF16 nor AVX512-BF16")
@pytest.mark.parametrize("kernel", HOST_KERNELS)
def test_bf16_matmuls_equal_the_rounded_float64_plan(kernel, tmp_path, capsys):
    m = TiedTiny().eval()
    ids = torch.randint(0, 100, (1, 37))          # a 32-row block and a 5-row tail
    cm = graphopt.compile(m, (ids,), backend="tvm", dynamic_dims={0: {1: "seq"}}, progress=False,
                          backend_options={"precision": "bf16", "bf16_kernel": kernel})
    assert "1 of 4 weight matmuls stay fp32" in capsys.readouterr().err
    for length in (1, 16, 37, 70):
        other = torch.randint(0, 100, (1, length), generator=torch.Generator().manual_seed(length))
        assert_close_to_scale(cm(other), bf16_reference(m, other), 2e-6)
    # and it is not fp32: the rounding moves the result well beyond fp32's error
    assert (cm(ids) - m(ids)).abs().max() > 1e-3
    path = cm.save(str(tmp_path / "tiny-bf16"))
    backend = json.load(open(f"{path}/manifest.json"))["backend_options"]
    assert backend["precision"] == backend["precision_computed"] == "bf16"
    assert backend["bf16_kernel"] == kernel and (backend["bf16_weights"], backend["fp32_weights"]) == (3, 1)
    assert_close_to_scale(torch.from_numpy(run_artifact_without_torch(path, (ids,))), cm(ids), 1e-7)


def test_a_target_without_bf16_says_it_computes_in_fp32(tmp_path, capsys):
    m = TiedTiny().eval()
    ids = torch.randint(0, 100, (1, 8))
    cm = graphopt.compile(m, (ids,), backend="tvm", progress=False,
                          backend_options={"precision": "bf16", "target": "x86-64-v3"})
    assert "bf16 is not supported on this target" in capsys.readouterr().err
    assert_close_to_scale(cm(ids), m(ids), 1e-5)
    backend = json.load(open(f"{cm.save(str(tmp_path / 'fallback'))}/manifest.json"))["backend_options"]
    assert backend["precision"] == "bf16" and backend["precision_computed"] == "f32"
    assert backend["bf16_kernel"] is None


def test_unknown_precision_and_misplaced_kernel_option_are_one_line():
    with pytest.raises(BackendError, match="unknown TVM precision 'int8'"):
        graphopt.backends.get_backend("tvm", precision="int8")
    with pytest.raises(BackendError, match="bf16_kernel is an option of precision='bf16'"):
        graphopt.backends.get_backend("tvm", bf16_kernel="amx_bf16")


@pytest.mark.skipif(not HOST_KERNELS, reason="this CPU has neither AMX-BF16 nor AVX512-BF16")
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
