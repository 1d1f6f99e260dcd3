"""The IR: capture into torch.fx, graph helpers, pattern matching, verification, ONNX import."""
