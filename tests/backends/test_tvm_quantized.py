"""Block-quantized weights on the TVM backend: matmul_nbits and embedding_nbits keep their 4- or
8-bit codes in the artifact and run in graphopt's bf16 kernels, exactly the quantized graph
with its dequantized weights and its activations rounded to bf16 (up to four rows: the codes
read in place, the weights exact)."""
import json
import os

import pytest
import torch

import graphopt
from graphopt.backends.tvm.dense_kernels import KERNELS
from graphopt.backends.tvm.runner import cpu_flags
from graphopt.ir.graph import constant_value, parameter_bytes
from graphopt.ir.quantized import MATMUL_NBITS, MATMUL_NBITS_MINIMUM, dequantize, unpack_codes
from graphopt.passes import ConstantFolding, DeadCodeElimination
from graphopt.passes.weight_quantization import WeightQuantization

from ..conftest import assert_close_to_scale, run_artifact_without_torch

pytest.importorskip("tvm")
HOST_BF16_KERNELS = [name for name, (precision, needs, _, _) in KERNELS.items()
                     if precision == "bf16" and set(needs) <= (cpu_flags() or set())]
needs_bf16 = pytest.mark.skipif(not HOST_BF16_KERNELS, reason="this CPU has no bf16 kernel")


def quantized_linear(bits: int, grid: str, scale_dtype: str):
    """One Linear(48 -> 40) quantized in blocks of 16 (k 48: the kernel pads it to 64; n 40: to 48)."""
    torch.manual_seed(bits)
    model = torch.nn.Sequential(torch.nn.Linear(48, 40)).eval()
    x = torch.randn(5, 48)
    passes = [ConstantFolding(), WeightQuantization(bits=bits, group_size=16, method="rtn", grid=grid,
                                                    scale_dtype=scale_dtype, embeddings=False, head_bits=None),
              DeadCodeElimination()]
    return model, x, passes


FEW_ROWS = 4      # kernels/dense_bf16.c: up to this many rows read the codes in place


def bf16_plan(cm, model, x: torch.Tensor) -> torch.Tensor:
    """The quantized graph's linear, in float64, as the kernel computes it: more than FEW_ROWS
    rows with the dequantized weight and x rounded to bf16; fewer with the exact weight and x
    rounded to bf16 (4-bit codes) or not (8-bit)."""
    gm = cm.graph_module
    node = next(n for n in gm.graph.nodes if n.target == MATMUL_NBITS)
    def value(arg):        # float16 scales reach matmul_nbits through a cast
        return constant_value(gm, arg) if arg.op == "get_attr" else constant_value(gm, arg.args[0]).float()
    weight = dequantize(*(value(a) for a in node.args[1:4]), *node.args[4:7]).double()
    if x.shape[0] > FEW_ROWS:
        weight = weight.to(torch.bfloat16).double()
    rounded = (x.to(torch.bfloat16) if x.shape[0] > FEW_ROWS or node.args[4] == 4 else x).double() @ weight.T
    return (rounded + model[0].bias.detach().double()).float()


@needs_bf16
@pytest.mark.parametrize("kernel", HOST_BF16_KERNELS)
@pytest.mark.parametrize("bits,grid,scale_dtype", [(4, "minmax", "float32"), (4, "symmetric", "float16"),
                                                   (8, "minmax", "float16"), (8, "symmetric", "float32")])
def test_matmul_nbits_equals_the_bf16_plan(bits, grid, scale_dtype, kernel, tmp_path):
    model, x, passes = quantized_linear(bits, grid, scale_dtype)
    cm = graphopt.compile(model, (x,), passes=passes, backend="tvm", dynamic_dims={0: {0: "rows"}}, progress=False,
                          backend_options={"kernel": kernel})
    for rows in (1, 3, 5, 33):
        other = torch.randn(rows, 48, generator=torch.Generator().manual_seed(rows))
        assert_close_to_scale(cm(other), bf16_plan(cm, model, other), 2e-6)
    path = cm.save(str(tmp_path / "q"))
    backend = json.load(open(f"{path}/manifest.json"))["backend_options"]
    assert backend["nbits_kernel"] == kernel and backend["precision_computed"] == "f32"
    assert_close_to_scale(torch.from_numpy(run_artifact_without_torch(path, (x,))), cm(x), 1e-7)


@needs_bf16
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_the_offset_grid_folds_into_one_dequantization_equal_to_its_plan(scale_dtype, tmp_path):
    model, x, passes = quantized_linear(4, "offset", scale_dtype)
    cm = graphopt.compile(model, (x,), passes=passes, backend="tvm", dynamic_dims={0: {0: "rows"}}, progress=False)
    gm = cm.captured.graph_module
    [node] = gm.graph.find_nodes(op="call_function", target=MATMUL_NBITS_MINIMUM)   # no separate offset product
    packed, scales, minimums = (constant_value(gm, a) for a in node.args[1:4])
    assert scales.dtype == minimums.dtype == getattr(torch, scale_dtype)
    n, blocks = packed.shape[:2]
    codes = unpack_codes(packed, 4).double()
    exact = (codes * scales.double().reshape(n, blocks, 1) + minimums.double().reshape(n, blocks, 1)).reshape(n, -1)
    rounded = exact.float()[:, :48].to(torch.bfloat16).double()          # code * scale + minimum, one rounding
    for rows in (1, 3, 5, 33):          # up to FEW_ROWS rows the codes are read in place: the exact weight
        other = torch.randn(rows, 48, generator=torch.Generator().manual_seed(rows))
        weight = exact[:, :48] if rows <= FEW_ROWS else rounded
        plan = (other.to(torch.bfloat16).double() @ weight.T + model[0].bias.detach().double()).float()
        assert_close_to_scale(cm(other), plan, 2e-6)
    assert_close_to_scale(cm(x), model(x).detach(), 0.1)                         # int4 of the float model


@needs_bf16
@pytest.mark.parametrize("preset", ["int4", "int8"])
def test_quantized_presets_run_on_tvm_close_to_the_quantized_graph(preset, tmp_path):
    bundle = graphopt.models.load("llama")
    inputs = bundle.example_inputs(seq_len=24)
    cm = graphopt.compile(bundle.model, inputs, passes=preset, backend="tvm", progress=False)
    assert "block-quantized weights dequantized to bf16" in cm.records[-1].notes[0]
    assert_close_to_scale(cm(*inputs), cm.captured(*inputs)[0], 1e-2)        # bf16 products
    # the codes are parameters (not constants in model.so), stored once, scales in their own type
    gm = cm.captured.graph_module
    codes = sum({t.data_ptr(): t.numel() for t in gm.state_dict().values()
                 if t.dtype == torch.uint8 and t.numel() >= 4096}.values())
    path = cm.save(str(tmp_path / preset))
    params = os.path.getsize(f"{path}/params.bin")
    assert codes <= params <= 1.1 * parameter_bytes(gm) + 20_000


def test_without_a_bf16_kernel_a_quantized_graph_is_refused_in_one_line():
    model, x, passes = quantized_linear(4, "minmax", "float32")
    with pytest.raises(graphopt.errors.BackendError, match="node '.*' .graphopt.matmul_nbits. needs a bf16 kernel"):
        graphopt.compile(model, (x,), passes=passes, backend="tvm", backend_options={"target": "x86-64-v3"},
                         progress=False)
