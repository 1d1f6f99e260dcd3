import pytest
import torch

import graphopt
from graphopt.analysis.calibration import calibrate
from graphopt.analysis.importance import lim_scores, linear_layers, zscore_scores
from graphopt.frontend.torch_export import capture

from ..conftest import small_inputs


def _captured(name):
    bundle = graphopt.models.load(name)
    inputs = small_inputs(bundle)
    return capture(bundle.model, inputs).graph_module, bundle, inputs


@pytest.mark.parametrize(
    "name,layers,linears", [("llama", 3, 3 * 7 + 1), ("gpt2", 3, 3 * 4 + 1), ("qwen2", 3, 3 * 7 + 1)]
)
def test_calibration_finds_every_linear_and_both_residual_adds_per_block(name, layers, linears):
    gm, bundle, inputs = _captured(name)
    batches = [bundle.example_inputs(seq_len=16, seed=s) for s in range(3)]
    stats = calibrate(gm, batches, progress=False, hessians=True)
    assert len(stats.linears) == linears and stats.batches == 3
    assert len(stats.residuals) == 2 * layers          # attention and FFN writers of each block
    for s in stats.linears.values():
        assert s.tokens == 3 * 16 and s.input_absmax.shape == (s.in_features,)
        assert s.output_absmax.shape == (s.out_features,)
        assert s.hessian.shape == (s.in_features, s.in_features)
    for r in stats.residuals.values():
        assert -1.0 <= r.cosine <= 1.0 and r.tokens == 3 * 16


def test_statistics_are_exact_on_a_known_linear():
    lin = torch.nn.Linear(4, 3, bias=False)
    x = torch.tensor([[[1.0, -2.0, 0.5, 0.0], [3.0, 1.0, -4.0, 2.0]]])
    gm = capture(lin, (x,)).graph_module
    s = next(iter(calibrate(gm, [(x,)], progress=False, hessians=True).linears.values()))
    assert torch.equal(s.input_absmax, torch.tensor([3.0, 2.0, 4.0, 2.0]))
    assert torch.allclose(s.input_mean_sq, (x[0] ** 2).mean(0))
    assert torch.allclose(s.hessian, x[0].t() @ x[0])
    y = lin(x)[0].detach()
    assert torch.allclose(s.output_absmax, y.abs().amax(0))
    assert s.peak == pytest.approx(float(y.abs().max()))


def test_importance_scores_cover_every_linear():
    gm, bundle, inputs = _captured("llama")
    names = set(linear_layers(gm))
    z = zscore_scores(gm)
    lim = lim_scores(gm, [inputs], progress=False)
    assert set(z) == names and set(lim) == names
    assert all(0.0 <= v <= 1.0 for v in z.values())
    block_layers = [n for n in names if ".layers." in n]
    assert all(-1.0 <= lim[n] <= 1.0 for n in block_layers)
    # every linear of one sublayer shares that sublayer's score
    assert lim[[n for n in names if n.endswith("layers.0.mlp.gate_proj")][0]] == \
        lim[[n for n in names if n.endswith("layers.0.mlp.down_proj")][0]]
