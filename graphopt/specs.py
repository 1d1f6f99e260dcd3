"""Input/output tensor specifications. Torch-free: the artifact runtime uses this too."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .errors import InputSpecError


def dtype_name(value: Any) -> str:
    """'float32', 'int64', ... for a torch tensor, a numpy array or a dtype of either."""
    dtype = getattr(value, "dtype", value)
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one model input or output. A str dim is dynamic.
    `index_range` (low, high): the values an index input may take, low <= v < high (token
    ids of an embedding table)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    index_range: tuple[int, int] | None = None

    def to_json(self) -> dict:
        out = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        return out | ({"index_range": list(self.index_range)} if self.index_range else {})

    @classmethod
    def from_json(cls, data: dict) -> "TensorSpec":
        bounds = data.get("index_range")
        index_range = (int(bounds[0]), int(bounds[1])) if bounds else None
        return cls(str(data["name"]), tuple(data["shape"]), str(data["dtype"]), index_range)

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

    def check(self, value: Any) -> None:
        """Raise InputSpecError (one line) if `value` does not fit this spec."""
        shape = getattr(value, "shape", None)
        if shape is None:
            raise InputSpecError(
                f"input '{self.name}': expected a tensor {self.describe()}, got {type(value).__name__}")
        shape = tuple(int(d) for d in shape)
        got = dtype_name(value)
        if got != self.dtype:
            raise InputSpecError(
                f"input '{self.name}': expected dtype {self.dtype}, got {got} (shape {list(shape)})")
        if len(shape) != len(self.shape) or any(
                isinstance(want, int) and want != have for want, have in zip(self.shape, shape)):
            raise InputSpecError(
                f"input '{self.name}': expected shape {list(self.shape)}, got {list(shape)}"
                " (str dims are dynamic; recompile with other example inputs or dynamic dims)")
        if self.index_range and all(shape):
            low, high = self.index_range
            smallest, largest = int(value.min()), int(value.max())
            if smallest < low or largest >= high:
                bad = smallest if smallest < low else largest
                raise InputSpecError(f"input '{self.name}': value {bad} is out of range; valid values are "
                                     f"{low}..{high - 1} (the embedding table has {high} rows)")


def check_inputs(specs: Sequence[TensorSpec], values: Sequence[Any]) -> None:
    """Check a call's positional inputs against the captured specs."""
    if len(values) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise InputSpecError(f"expected {len(specs)} inputs ({names}), got {len(values)}")
    for spec, value in zip(specs, values):
        spec.check(value)
