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
    from torch.utils import _pytree as pytree
    with torch.no_grad():
        out = model(*inputs)
    return [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]


def small_inputs(bundle):
    if bundle.tokenizer is None and bundle.name in ("resnet", "densenet"):
        return bundle.example_inputs()
    return bundle.example_inputs(seq_len=16)


@pytest.fixture(scope="session")
def llama():
    return graphopt.models.load("llama")
