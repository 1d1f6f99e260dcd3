"""How a text-generation artifact's graph is called, per backend: the KV cache buffers of one
generate call, and one step (prompt or decode) that writes this step's keys and values into
them in place and returns the logits.

- `OrtSteps` (onnxruntime): one buffer per layer and kind bound as both the past input and the
  present output (I/O binding); GroupQueryAttention writes into it.
- `TvmSteps` (tvm): the same buffers passed to the Relax VM every step; the library's
  kv_attention is an in-place call, so its present outputs are these buffers. The key buffer
  is laid out [batch, kv_heads, head_dim, capacity] inside (graphopt.backends.tvm.kv_attention)
  and its capacity is rounded up to a multiple of 16 (the kernel's key tiles).
"""
from __future__ import annotations

import numpy as np

INPUTS = ("input_ids", "position_ids", "seqlens_k", "total_length", "logit_positions")
KEY_TILE = 16


def step_feeds(ids, positions, seqlens, total, keep) -> dict[str, np.ndarray]:
    """The graph's non-cache inputs, contiguous and of the graph's types."""
    return {"input_ids": np.ascontiguousarray(ids, dtype=np.int64),
            "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
            "seqlens_k": np.ascontiguousarray(seqlens, dtype=np.int32),
            "total_length": np.array(total, dtype=np.int32),
            "logit_positions": np.ascontiguousarray(keep, dtype=np.int64)}


class _Steps:
    """What both runners keep: the cache geometry (`cache_shape(batch, capacity)`) and buffers."""

    def __init__(self, layers: int, cache_shape, cache_dtype, vocab_size: int):
        self.layers, self.cache_shape, self.cache_dtype, self.vocab_size = layers, cache_shape, cache_dtype, vocab_size
        self.buffers: list = []


class OrtSteps(_Steps):
    def __init__(self, session, *geometry):
        import onnxruntime as ort
        super().__init__(*geometry)
        self.ort, self.session = ort, session

    def bind(self, batch: int, capacity: int) -> None:
        """Fresh zeroed cache buffers for `batch` rows of `capacity` positions."""
        self.io = io = self.session.io_binding()
        self.buffers = []
        for layer in range(self.layers):
            for kind in ("key", "value"):
                value = self.ort.OrtValue.ortvalue_from_numpy(
                    np.zeros(self.cache_shape(batch, capacity), dtype=self.cache_dtype))
                io.bind_ortvalue_input(f"past_{kind}.{layer}", value)
                io.bind_ortvalue_output(f"present_{kind}.{layer}", value)
                self.buffers.append(value)
        self.logits = np.empty((batch, 1, self.vocab_size), dtype=np.float32)
        io.bind_ortvalue_output("logits", self.ort.OrtValue.ortvalue_from_numpy(self.logits))

    def run(self, ids, positions, seqlens, total, keep) -> np.ndarray:
        """One step with one logit position per row: logits [B, 1, V] (valid until the next step)."""
        self.feeds = feeds = step_feeds(ids, positions, seqlens, total, keep)  # must outlive the run
        for name, value in feeds.items():
            self.io.bind_cpu_input(name, value)
        self.session.run_with_iobinding(self.io)
        return self.logits

    def all_logits(self, ids, positions, seqlens, total, keep) -> np.ndarray:
        """One prompt call on an empty cache that fits it: logits [B, K, V] at `keep`."""
        feeds = step_feeds(ids, positions, seqlens, total, keep)
        cache = np.zeros(self.cache_shape(ids.shape[0], ids.shape[1]), dtype=self.cache_dtype)
        for layer in range(self.layers):
            feeds[f"past_key.{layer}"] = feeds[f"past_value.{layer}"] = cache
        return self.session.run(["logits"], feeds)[0]


class TvmSteps(_Steps):
    def __init__(self, runner, *geometry):
        super().__init__(*geometry)
        self.runner = runner

    def bind(self, batch: int, capacity: int) -> None:
        capacity = -(-capacity // KEY_TILE) * KEY_TILE
        shape = self.cache_shape(batch, capacity)
        self.buffers = [self.runner.tensor(np.zeros(shape, dtype=self.cache_dtype)) for _ in range(2 * self.layers)]

    def run(self, ids, positions, seqlens, total, keep) -> np.ndarray:
        feeds = step_feeds(ids, positions, seqlens, total, keep)
        out = self.runner.call([self.runner.tensor(feeds[name]) for name in INPUTS] + self.buffers)
        return np.from_dlpack(out[0])

    def all_logits(self, ids, positions, seqlens, total, keep) -> np.ndarray:
        self.bind(ids.shape[0], ids.shape[1])
        try:
            return self.run(ids, positions, seqlens, total, keep)
        finally:
            self.buffers = []


def steps_for(runner, layers: int, cache_shape, cache_dtype, vocab_size: int):
    """The step runner of an artifact's runner (onnxruntime or tvm), or None for other backends."""
    if getattr(runner, "session", None) is not None:
        return OrtSteps(runner.session, layers, cache_shape, cache_dtype, vocab_size)
    if getattr(runner, "vm", None) is not None:
        return TvmSteps(runner, layers, cache_shape, cache_dtype, vocab_size)
    return None
