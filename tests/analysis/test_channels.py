import pytest
import torch
from torch import nn

import graphopt
from graphopt.analysis.channels import ChannelAnalysis, input_channel_rms
from graphopt.frontend.torch_export import capture

from ..conftest import small_inputs


def _analyse(name):
    bundle = graphopt.models.load(name)
    inputs = small_inputs(bundle)
    gm = capture(bundle.model, inputs).graph_module
    return gm, ChannelAnalysis(gm), inputs


def _path(item):
    from graphopt.ir.graph import module_path
    return module_path(item.node)


def _segment_with_producer(analysis, path):
    return next(s for s in analysis.segments if path in [_path(p) for p in s.producers])


def test_resnet_residual_stage_is_one_segment_through_adds():
    gm, a, _ = _analyse("resnet")
    stage = _segment_with_producer(a, "stem.0")
    assert sorted(_path(p) for p in stage.producers) == ["blocks.0.conv2", "blocks.1.conv2", "stem.0"]
    assert sorted(_path(c) for c in stage.consumers) == \
        ["blocks.0.conv1", "blocks.1.conv1", "blocks.2.conv1", "blocks.2.shortcut.0"]
    assert len(stage.channels) == 16                     # the adds tie the producers' channels
    last = _segment_with_producer(a, "blocks.5.conv2")
    assert sorted(_path(p) for p in last.producers) == ["blocks.4.conv2", "blocks.4.shortcut.0", "blocks.5.conv2"]
    assert "head" in [_path(c) for c in last.consumers]
    inner = _segment_with_producer(a, "blocks.0.conv1")
    assert [_path(c) for c in inner.consumers] == ["blocks.0.conv2"]
    # batch-norm statistics and affine parameters follow their channels
    assert len(a.params) == 4 * 15                       # 15 batch norms x (weight, bias, mean, var)
    assert stage.channels[0] not in a.needed


def test_densenet_block_is_one_segment_through_concatenation():
    gm, a, _ = _analyse("densenet")
    block = _segment_with_producer(a, "stem")
    assert sorted(_path(p) for p in block.producers) == \
        ["features.0.conv", "features.1.conv", "features.2.conv", "features.3.conv", "stem"]
    assert sorted(_path(c) for c in block.consumers) == \
        ["features.0.conv", "features.1.conv", "features.2.conv", "features.3.conv", "features.6"]
    assert len(block.channels) == 24 + 4 * 12
    # each producer's channels move only together: one block per producer
    blocks = {tuple(b) for b in a.blocks()}
    for p in block.producers:
        assert tuple(a.canonical(p.channels)) in blocks
    widths = sorted(len(c.channels) for c in block.consumers)
    assert widths == [24, 36, 48, 60, 72]                # every layer reads a longer concatenation


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_transformer_residual_stream_is_needed_not_frozen_and_heads_are_frozen(name):
    gm, a, _ = _analyse(name)
    stream = max(a.segments, key=lambda s: len(s.consumers))
    assert len(stream.producers) >= 1 + 2 * 3            # embedding(s) + attention and FFN outputs per layer
    assert all(c in a.needed for c in stream.channels)   # norms reduce over the hidden channels
    assert not any(c in a.frozen for c in stream.channels)
    reasons = " ".join(a.explain(stream))
    assert "needed" in reasons and ("mean" in reasons or "layer_norm" in reasons)
    ffns = [s for s in a.segments if len(s.consumers) == 1 and s.channels and s.channels[0] not in a.needed]
    assert len(ffns) == 3                                # one FFN intermediate per layer, prunable
    heads = [s for s in a.segments if not s.consumers and any(c in a.frozen for c in s.channels)]
    assert heads, "attention projections feed a head split and must be frozen"
    assert any("split or merged" in r or "read by" in r for s in heads for r in a.explain(s))


def test_graph_output_channels_are_frozen_with_a_reason():
    gm, a, _ = _analyse("resnet")
    head = _segment_with_producer(a, "head")
    assert all(c in a.frozen for c in head.channels)
    assert a.explain(head) == ["10 channels frozen: reaches a graph output"]


def test_unknown_op_freezes_the_channels_it_reads():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 4)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.cumsum(h, -1)), self.b(h)

    gm = capture(Odd(), (torch.randn(2, 8),)).graph_module
    a = ChannelAnalysis(gm)
    seg = _segment_with_producer(a, "a")
    assert all(c in a.frozen for c in seg.channels)
    assert "cumsum" in a.explain(seg)[0]


def test_input_channel_rms_matches_a_direct_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    batches = [(torch.randn(4, 6),), (torch.randn(4, 6),)]
    gm = capture(model, batches[0]).graph_module
    a = ChannelAnalysis(gm)
    rms = input_channel_rms(gm, a, batches)
    consumer = a.consumers[0]
    with torch.no_grad():
        h = torch.cat([torch.relu(model[0](x)) for (x,) in batches])
    torch.testing.assert_close(rms[consumer.input], h.pow(2).mean(0).sqrt(), rtol=1e-6, atol=1e-7)
