import torch

import graphopt

from ..conftest import load_example


def _load_example():
    return load_example("custom_pass.py")


def test_custom_batch_norm_folding_pass_removes_every_batch_norm():
    example = _load_example()
    bundle = graphopt.models.load("resnet")
    inputs = bundle.example_inputs(batch=2)
    cm = graphopt.compile(bundle.model, inputs, passes=[example.FoldBatchNorm()], backend="torch", progress=False)
    ops = {n.target for n in cm.graph_module.graph.nodes}
    assert torch.ops.aten._native_batch_norm_legit_no_training.default not in ops
    assert cm.records[0].changes == ["folded 15 batch norms into convolutions"]
    with torch.no_grad():
        torch.testing.assert_close(cm(*inputs), bundle.model(*inputs), rtol=1e-5, atol=1e-5)


def test_example_main_runs(capsys):
    _load_example().main()
    assert "batch norms left: 0" in capsys.readouterr().out
