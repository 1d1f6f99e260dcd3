"""A backend package's names, read from its `lower` module on first use, so importing the
package (or its torch-free `runner`) does not import torch."""
from __future__ import annotations

import importlib
import importlib.util


def lower_attribute(package: str, name: str):
    """`package.name`: a submodule if there is one, else `package.lower.name`."""
    if name.startswith("__"):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    if importlib.util.find_spec(f"{package}.{name}") is not None:
        return importlib.import_module(f"{package}.{name}")
    lower = importlib.import_module(f"{package}.lower")
    try:
        return getattr(lower, name)
    except AttributeError:
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
