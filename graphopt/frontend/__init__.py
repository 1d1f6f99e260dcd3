"""Capture: a model comes in and leaves as graphopt's IR (an ATen-level torch.fx graph).

torch_export (a PyTorch module through torch.export), onnx (an .onnx file as a torch module that
torch.export then captures), decode (KV-cache decode steps of a causal LM) and generation (the
text-generation graph: prompt and decode with an in-place cache).
"""
