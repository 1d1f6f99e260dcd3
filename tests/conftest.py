"""Shared fixtures and numeric helpers. Verification runs after every pass in every test."""
from __future__ import annotations

import logging

import pytest
import torch

import graphopt

logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def assert_close_to_scale(actual, expected, rel: float = 1e-4) -> float:
    """max |actual - expected| <= rel * max |expected|; returns the relative error."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max()) / max(scale, 1e-30)
    assert err <= rel, f"relative error {err:.3g} > {rel}"
    return err


def eager_outputs(model, inputs):
    """The model's tensor outputs, flattened in the order capture uses."""
    from graphopt.ir.capture import flat_tensors
    with torch.no_grad():
        return flat_tensors(model(*inputs))


def small_inputs(bundle):
    if not bundle.is_sequence_model:
        return bundle.example_inputs()
    return bundle.example_inputs(seq_len=16)


@pytest.fixture(scope="session")
def llama():
    return graphopt.models.load("llama")
