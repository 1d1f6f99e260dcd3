import torch

from graphopt.analysis.super_weights import ablate, find_super_weights
from graphopt.frontend.torch_export import capture

from ..passes.test_weight_quantization import _PlantedSuperWeight


def test_planted_super_weight_is_found_with_its_coordinates_and_ablation_restores_it():
    x = torch.randn(1, 8, 64) * 0.1
    x[0, 2, 5] = 4.0
    model = _PlantedSuperWeight()
    gm = capture(model, (x,)).graph_module
    report = find_super_weights(gm, (x,))
    assert [(sw.row, sw.col, sw.token) for sw in report.super_weights] == [(11, 37, 2)]
    sw = report.super_weights[0]
    assert sw.weight == 3.0 and sw.weight_zscore > 10 and report.super_activation_channels == [11]
    before = gm(x)[0].detach()
    with ablate(gm, sw):
        ablated = gm(x)[0].detach()
    assert float((ablated - before)[0, 2, 11].abs()) > 100
    assert torch.equal(gm(x)[0].detach(), before)            # restored on exit


def test_no_false_positives_on_a_plain_random_block():
    torch.manual_seed(1)
    model = _PlantedSuperWeight()
    with torch.no_grad():
        model.up.weight.normal_(0, 0.1)
        model.down.weight.normal_(0, 0.1)
    x = torch.randn(1, 8, 64)
    assert find_super_weights(capture(model, (x,)).graph_module, (x,)).super_weights == []
