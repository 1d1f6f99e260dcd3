"""Compiled models shared by the report tests (compiling is the slow part)."""
from __future__ import annotations

import pytest
import torch

import graphopt


@pytest.fixture(scope="session")
def resnet_compiled():
    bundle = graphopt.models.load("resnet")
    return graphopt.compile(bundle.model, bundle.example_inputs(size=32), progress=False)


@pytest.fixture(scope="session")
def llama_compiled():
    bundle = graphopt.models.load("llama")
    return graphopt.compile(bundle.model, bundle.example_inputs(seq_len=16), progress=False)


@pytest.fixture(scope="session")
def resnet_report(resnet_compiled):
    from graphopt.report.sources import report_compiled
    return report_compiled(resnet_compiled, title="resnet", runs=3, simulate=["prune:0.5"], apply=True,
                           progress=False)


class RunningMax(torch.nn.Module):
    """torch.cummax has no ONNX translation: compiling this fails in the onnxruntime backend."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.proj(x)
        return torch.cummax(y, dim=-1)[0]


@pytest.fixture(scope="session")
def failure_report():
    from graphopt.report.sources import report_failure
    return report_failure(RunningMax().eval(), (torch.randn(2, 8),), title="running max")
