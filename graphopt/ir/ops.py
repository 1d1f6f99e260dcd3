"""One table of ATen op groups. Every pass and analysis names its op sets from here, by
composing these groups, so "a view" or "a matmul" means one thing across the package.

    from graphopt.ir import ops
    if node.target in ops.VIEWS: ...
"""
from __future__ import annotations

import torch

aten = torch.ops.aten

# --- shape and layout -------------------------------------------------------------------
VIEWS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})   # shape = args[1]
EXPANDS = frozenset({aten.expand.default})                                                # shape = args[1]
TRANSPOSES = frozenset({aten.transpose.int, aten.permute.default})
MATRIX_TRANSPOSES = frozenset({aten.t.default})
UNSQUEEZES = frozenset({aten.unsqueeze.default})
SQUEEZES = frozenset({aten.squeeze.dim})
COPIES = frozenset({aten.clone.default, aten.contiguous.default, aten.alias.default})      # same values, same layout
DETACHES = frozenset({aten.detach.default})
CASTS = frozenset({aten._to_copy.default, aten.to.dtype})
# Ops that read a tensor's metadata only: its values and channel order do not matter.
METADATA = frozenset({aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_numel.default})
# Ops whose result depends on an input's shape only, never its values.
SHAPE_ONLY = frozenset({aten.new_ones.default, aten.new_zeros.default, aten.new_full.default,
                        aten.ones_like.default, aten.zeros_like.default, aten.full_like.default})

# --- matrix products and convolutions ----------------------------------------------------
# Candidates for a linear layer: x @ W with W a constant matrix (see ir.linear).
LINEARS = frozenset({aten.linear.default, aten.matmul.default, aten.mm.default, aten.addmm.default})
BATCHED_MATMULS = frozenset({aten.bmm.default, aten.baddbmm.default})
MATMULS = LINEARS | {aten.bmm.default}
CONVOLUTIONS = frozenset({aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default})

# --- elementwise ---------------------------------------------------------------------------
ACTIVATIONS = frozenset({
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default,
    aten.tanh.default, aten.hardtanh.default, aten.hardswish.default, aten.hardsigmoid.default,
    aten.leaky_relu.default, aten.elu.default,
})
UNARY_MATH = frozenset({aten.neg.default, aten.abs.default, aten.exp.default, aten.sqrt.default, aten.rsqrt.default,
                        aten.pow.Tensor_Scalar, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default})
BINARY = frozenset({aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default,
                    aten.minimum.default, aten.add.Scalar, aten.mul.Scalar, aten.sub.Scalar, aten.div.Scalar})
DROPOUTS = frozenset({aten.dropout.default})

# --- reductions and normalizations -------------------------------------------------------
REDUCTIONS = frozenset({aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
                        aten.var.correction, aten.var.dim})
SOFTMAXES = frozenset({aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int})
# Norm op -> positions of its per-channel tensor arguments.
BATCH_NORMS = {aten._native_batch_norm_legit_no_training.default: (1, 2, 3, 4),
               aten.batch_norm.default: (1, 2, 3, 4),
               aten.native_batch_norm.default: (1, 2, 3, 4)}
LAYER_NORMS = {aten.layer_norm.default: (2, 3), aten.native_layer_norm.default: (2, 3)}

# --- pooling --------------------------------------------------------------------------------
POOLS_2D = frozenset({aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
                      aten.max_pool2d_with_indices.default, aten.adaptive_max_pool2d.default})
WINDOW_POOLS = frozenset({aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
                          aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default,
                          aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default})

# --- attention --------------------------------------------------------------------------------
ATTENTIONS = frozenset({aten.scaled_dot_product_attention.default,
                        aten._scaled_dot_product_flash_attention_for_cpu.default})

# --- compositions several passes share -----------------------------------------------------
# Output has the input's layout channel by channel (no mixing across channels).
CHANNELWISE = ACTIVATIONS | UNARY_MATH | COPIES | DROPOUTS | CASTS | DETACHES
# Ops that move or re-view a tensor without computing anything.
LAYOUT = VIEWS | EXPANDS | TRANSPOSES | UNSQUEEZES | COPIES
