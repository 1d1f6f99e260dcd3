"""The IR: graph helpers, the op-group table (ops), the linear-layer pattern (linear), pattern
matching, traversal, quantized weights and graphopt's own ops. Capture into it: graphopt.frontend."""
