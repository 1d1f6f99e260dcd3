"""TVM's graph rewrites before import (graphopt IR, in place, semantics unchanged): where its
importer or codegen fails, where it would embed weights in the library, and the offset grid
folded into one quantized op. Each function's docstring says what broke without it."""
from __future__ import annotations

import torch
import torch.fx as fx

from ...ir import ops
from ...ir.graph import add_constant, constant_value, eliminate_dead_code, views_reading
from ...ir.moe import densify_experts


def prepare_graph(gm: fx.GraphModule, float32_kernels: bool = False) -> fx.GraphModule:
    """Rewrite the IR (in place, semantics unchanged) where TVM's importer or codegen fails,
    or where it would embed weights in the library; with `float32_kernels` (the target has
    them), attention and RMSNorm that they take become graphopt.attention / graphopt.rms_norm."""
    changed = densify_experts(gm)          # first: its per-expert weights become parameters below
    _register_tensor_attributes(gm)
    changed = _cast_bool_sums(gm) or changed
    changed = _nonnegative_indices(gm) or changed
    changed = _explicit_pool_strides(gm) or changed
    changed = _sorted_topk(gm) or changed
    changed = _static_slices_of_dynamic_dims(gm) or changed
    changed = _fold_block_offsets(gm) or changed
    changed = _squares_as_products(gm) or changed
    if float32_kernels:
        changed = grouped_attention(gm) or changed
        changed = fused_rms_norms(gm) or changed
        changed = _residual_adds_into_norms(gm) or changed
    if changed:
        gm.recompile()
    return gm


def _call(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _block_offsets_of(gm: fx.GraphModule, product: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(x, minimums attribute) if `product` is weight_quantization's offset term for the
    matmul_nbits `product` is added to: matmul(sum(unflatten(x)), t(float(minimums) + 2**(bits-1) * scales))."""
    aten = torch.ops.aten
    if not _call(product, aten.matmul.default) or len(product.users) != 1:
        return None
    sums, offsets = product.args
    if not (_call(sums, aten.sum.dim_IntList) and _call(sums.args[0], aten.unflatten.int)
            and _call(offsets, aten.t.default) and _call(offsets.args[0], aten.add.Tensor)):
        return None
    mins, scaled = offsets.args[0].args
    if not (_call(mins, aten._to_copy.default) and mins.args[0].op == "get_attr" and _call(scaled, aten.mul.Tensor)):
        return None
    return sums.args[0].args[0], mins.args[0]


def _fold_block_offsets(gm: fx.GraphModule) -> bool:
    """matmul_nbits(x, codes, scales) + blocksum(x) @ (minimums + 2**(bits-1) * scales)^T (the
    "offset" grid as ONNX Runtime takes it) -> matmul_nbits_minimum(x, codes, scales, minimums):
    the kernel dequantizes code * scale + minimum in one step, and the float32 offset table the
    lifted transform would store (twice the float16 minimums' bytes) is not made."""
    from ...ir.quantized import MATMUL_NBITS, MATMUL_NBITS_MINIMUM
    changed = False
    for node in list(gm.graph.find_nodes(op="call_function", target=MATMUL_NBITS)):
        x, packed, scales, zero_points, bits, block_size, k = node.args[:7]
        adds = [u for u in node.users if _call(u, torch.ops.aten.add.Tensor) and u.args[0] is node]
        found = _block_offsets_of(gm, adds[0].args[1]) if len(adds) == 1 and len(node.users) == 1 else None
        if found is None or found[0] is not x or constant_value(gm, zero_points).numel():
            continue
        minimums = found[1]
        source = scales.args[0] if _call(scales, torch.ops.aten._to_copy.default) else scales
        if constant_value(gm, source) is None or constant_value(gm, minimums).dtype != constant_value(gm, source).dtype:
            continue
        with gm.graph.inserting_before(adds[0]):
            folded = gm.graph.call_function(MATMUL_NBITS_MINIMUM, (x, packed, source, minimums, bits, block_size, k))
        folded.meta.update({key: adds[0].meta[key] for key in ("val", "nn_module_stack", "stack_trace")
                            if key in adds[0].meta})
        adds[0].replace_all_uses_with(folded)
        changed = True
    if changed:
        eliminate_dead_code(gm)
    return changed


def _squares_as_products(gm: fx.GraphModule) -> bool:
    """x ** 2 (RMSNorm's mean of squares) -> x * x: Relax's power is not fused with its
    consumers, so the square was its own kernel and buffer before the mean (SmolLM2's prefill:
    61 calls, ~0.5 ms); a product fuses into the reduction."""
    changed = False
    for node in list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.pow.Tensor_Scalar)):
        if node.args[1] == 2 and isinstance(node.args[0], fx.Node):
            with gm.graph.inserting_before(node):
                square = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node.args[0], node.args[0]))
            square.meta.update(node.meta)
            node.replace_all_uses_with(square)
            gm.graph.erase_node(node)
            changed = True
    return changed


def _single_user(node: fx.Node, target, other=None) -> fx.Node | None:
    """The one user of `node` if it calls `target` (with `other` as its other operand, if given)."""
    if len(node.users) != 1:
        return None
    [user] = node.users
    if not _call(user, target):
        return None
    if other is not None and set(user.args[:2]) != {node, other}:
        return None
    return user


def fused_rms_norms(gm: fx.GraphModule) -> bool:
    """weight * (x * rsqrt(mean(x * x, -1, keepdim) + eps)) (Hugging Face's RMSNorm, x ** 2 or
    x * x) -> graphopt.rms_norm(x, weight, eps), where the kernel takes the shapes."""
    from ...ir.rms_norm import RMS_NORM
    from .float32_kernels import rms_norm_kernel_takes
    aten, changed = torch.ops.aten, False
    for mean in list(gm.graph.find_nodes(op="call_function", target=aten.mean.dim)):
        square = mean.args[0]
        keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        if not keepdim or list(mean.args[1]) not in ([-1], [square.meta["val"].dim() - 1]) or len(square.users) != 1:
            continue
        if _call(square, aten.mul.Tensor) and square.args[0] is square.args[1]:
            x = square.args[0]
        elif _call(square, aten.pow.Tensor_Scalar) and square.args[1] == 2:
            x = square.args[0]
        else:
            continue
        shifted = _single_user(mean, aten.add.Tensor)
        if shifted is None or shifted.args[0] is not mean or not isinstance(shifted.args[1], (int, float)):
            continue
        inverse = _single_user(shifted, aten.rsqrt.default)
        normalized = _single_user(inverse, aten.mul.Tensor, other=x) if inverse is not None else None
        checks = [u for u in normalized.users if _call(u, aten._assert_tensor_metadata.default)] if normalized else []
        if normalized is None or len(normalized.users) != len(checks) + 1:
            continue
        [scaled] = [u for u in normalized.users if u not in checks]
        weight = None
        if _call(scaled, aten.mul.Tensor):
            weight = next((a for a in scaled.args[:2] if a is not normalized), None)
        weight_val = weight.meta.get("val", constant_value(gm, weight)) if isinstance(weight, fx.Node) else None
        if not rms_norm_kernel_takes(x.meta.get("val"), weight_val) or scaled.meta["val"].shape != x.meta["val"].shape:
            continue
        with gm.graph.inserting_before(scaled):
            fused = gm.graph.call_function(RMS_NORM, (x, weight, float(shifted.args[1])))
        fused.meta.update(scaled.meta)
        scaled.replace_all_uses_with(fused)
        for check in checks:         # a dtype check of the intermediate (float32, as the fused output)
            gm.graph.erase_node(check)
        changed = True
    if changed:
        eliminate_dead_code(gm)
    return changed


def _residual_adds_into_norms(gm: fx.GraphModule) -> bool:
    """rms_norm(a + b) with a, b of the norm's shape -> residual_rms_norm(a, b): the residual
    stream's add is written by the norm's kernel (one pass instead of two)."""
    import operator

    from ...ir.rms_norm import RESIDUAL_RMS_NORM, RMS_NORM
    changed = False
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for norm in list(gm.graph.find_nodes(op="call_function", target=RMS_NORM)):
        total = norm.args[0]
        if not _call(total, torch.ops.aten.add.Tensor) or len(total.args) != 2 or total.kwargs:
            continue
        checks = [u for u in total.users if _call(u, torch.ops.aten._assert_tensor_metadata.default)]
        if any(order.get(user, len(order)) < order[norm] for user in total.users if user not in checks):
            continue                  # the sum is read before the norm: it cannot come from the norm's call
        shape = total.meta["val"].shape
        if not all(isinstance(a, fx.Node) and a.meta.get("val") is not None and a.meta["val"].shape == shape
                   and a.meta["val"].dtype == torch.float32 for a in total.args):
            continue
        with gm.graph.inserting_before(norm):
            fused = gm.graph.call_function(RESIDUAL_RMS_NORM, (*total.args, *norm.args[1:]))
            new_total = gm.graph.call_function(operator.getitem, (fused, 0))
            normalized = gm.graph.call_function(operator.getitem, (fused, 1))
        for check in checks:          # dtype checks of the sum (float32, as the fused output's)
            gm.graph.erase_node(check)
        fused.meta.update(norm.meta)
        fused.meta["val"] = (total.meta["val"], norm.meta["val"])
        new_total.meta.update(total.meta)
        normalized.meta.update(norm.meta)
        total.replace_all_uses_with(new_total)
        norm.replace_all_uses_with(normalized)
        gm.graph.erase_node(norm)
        changed = True
    if changed:
        eliminate_dead_code(gm)
    return changed


def _rotary_parts(node) -> tuple | None:
    """(x, cos, sin) if `node` is x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[..., h:],
    x[..., :h]) (Hugging Face's apply_rotary_pos_emb), else None."""
    aten = torch.ops.aten
    if not _call(node, aten.add.Tensor) or len(node.args) != 2:
        return None
    for direct, turned in (node.args, node.args[::-1]):
        if not (_call(direct, aten.mul.Tensor) and _call(turned, aten.mul.Tensor)):
            continue
        for cat, sin in (turned.args, turned.args[::-1]):
            if not _call(cat, aten.cat.default) or len(cat.args[0]) != 2:
                continue
            negated, first = cat.args[0]
            if not (_call(negated, aten.neg.default) and _call(negated.args[0], aten.slice.Tensor)
                    and _call(first, aten.slice.Tensor)):
                continue
            second, x = negated.args[0], first.args[0]
            depth = x.meta["val"].shape[-1] if isinstance(x, fx.Node) and "val" in x.meta else None
            if second.args[0] is not x or not isinstance(depth, int) or depth % 2:
                continue
            if any(len(n.args) > 4 and n.args[4] != 1 for n in (first, second)):
                continue
            ends = [(list(n.args[1:4]) + [None] * 3)[:3] for n in (first, second)]
            last = x.meta["val"].dim() - 1
            if ends[0][0] not in (-1, last) or ends[1][0] not in (-1, last) or ends[0][1:] != [0, depth // 2] \
                    or ends[1][1] != depth // 2 or ends[1][2] not in (depth, None) and ends[1][2] < depth:
                continue
            cos = next((a for a in direct.args if a is not x), None) if x in direct.args else None
            if isinstance(cos, fx.Node) and isinstance(sin, fx.Node):
                return x, cos, sin
    return None


def _feeds_only(node: fx.Node, consumer: fx.Node) -> bool:
    """Whether every use of `node` leads to `consumer` through layout-only ops (repeat_kv's
    unsqueeze / expand / clone / view) or dtype checks."""
    aten = torch.ops.aten
    passing = {aten.unsqueeze.default, aten.expand.default, aten.clone.default, aten.view.default,
               aten._unsafe_view.default, aten.reshape.default}
    frontier = list(node.users)
    while frontier:
        user = frontier.pop()
        if user is consumer or _call(user, aten._assert_tensor_metadata.default):
            continue
        if user.op != "call_function" or user.target not in passing:
            return False
        frontier.extend(user.users)
    return True


def _rotary_tables_fit(table, query, key) -> bool:
    """cos/sin the kernel reads: float32 [B or 1, 1, L, D] with L the query's and key's length."""
    if table is None or table.dtype != torch.float32 or table.dim() != 4:
        return False
    length, depth = query.shape[2], query.shape[3]
    return (table.shape[1] == 1 and str(table.shape[2]) == str(length) == str(key.shape[2])
            and table.shape[3] == depth and str(table.shape[0]) in ("1", str(query.shape[0])))


def _repeated_heads_source(node) -> fx.Node | None:
    """x if `node` is Hugging Face's repeat_kv of x: view(clone(expand(unsqueeze(x, 2),
    [b, h, n, l, d])), [b, h * n, l, d]) (the clone optional, view / _unsafe_view / reshape)."""
    aten = torch.ops.aten
    if not any(_call(node, op) for op in (aten.view.default, aten._unsafe_view.default, aten.reshape.default)):
        return None
    expanded = node.args[0]
    if _call(expanded, aten.clone.default):
        expanded = expanded.args[0]
    if not _call(expanded, aten.expand.default) or not _call(expanded.args[0], aten.unsqueeze.default):
        return None
    source, dim = expanded.args[0].args
    source_val, out_val = source.meta.get("val"), node.meta.get("val")
    if dim != 2 or source_val is None or out_val is None or source_val.dim() != 4:
        return None
    b, h, length, d = source_val.shape
    if list(expanded.meta["val"].shape) != [b, h, expanded.meta["val"].shape[2], length, d] or \
            list(out_val.shape) != [b, h * expanded.meta["val"].shape[2], length, d]:
        return None
    return source


def grouped_attention(gm: fx.GraphModule) -> bool:
    """scaled_dot_product_attention -> graphopt.attention where TVM's attention kernel takes it,
    with repeat_kv's expanded keys and values replaced by their source (grouped heads read in
    place). torch.export's decompositions would otherwise split it into matmuls, a masked
    softmax and the copies (SmolLM2's prefill: ~14 ms of ~62 on TVM)."""
    from ...ir.attention import ATTENTION
    from .float32_kernels import kernel_takes
    changed = False
    for node in list(gm.graph.find_nodes(op="call_function",
                                         target=torch.ops.aten.scaled_dot_product_attention.default)):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        values = dict(zip(names, node.args), **node.kwargs)
        mask, causal = values.get("attn_mask"), bool(values.get("is_causal", False))
        if values.get("dropout_p", 0.0) != 0.0 or (mask is not None and causal):
            continue
        query, key, value = values["query"], values["key"], values["value"]
        if not values.get("enable_gqa", False):
            key = _repeated_heads_source(key) or key
            value = _repeated_heads_source(value) or value
        vals = [getattr(n, "meta", {}).get("val") for n in (query, key, value)]
        mask_val = mask.meta.get("val") if isinstance(mask, fx.Node) else None
        if (mask is not None and mask_val is None) or not kernel_takes(*vals, mask_val):
            continue
        scale = values.get("scale")
        scale = float(vals[0].shape[-1]) ** -0.5 if scale is None else float(scale)
        tables: tuple = ()
        rotated_query, rotated_key = _rotary_parts(query), _rotary_parts(key)
        if (rotated_query and rotated_key and rotated_query[1:] == rotated_key[1:]
                and _feeds_only(query, node) and _feeds_only(key, node)
                and _rotary_tables_fit(rotated_query[1].meta.get("val"), vals[0], vals[1])):
            query, key, tables = rotated_query[0], rotated_key[0], rotated_query[1:]
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(ATTENTION, (query, key, value, mask, causal, scale, *tables))
        fused.meta.update(node.meta)
        fused.meta["val"] = node.meta["val"].contiguous()
        node.replace_all_uses_with(fused)
        for view in views_reading(fused):     # captured against the CPU kernel's (b, l, h, d) layout
            view.target = torch.ops.aten.reshape.default
        gm.graph.erase_node(node)
        changed = True
    if changed:
        eliminate_dead_code(gm)
    return changed


def _cast_bool_sums(gm: fx.GraphModule) -> bool:
    """cumsum/sum over a bool tensor (Hugging Face's packed-sequence mask) reached LLVM as an
    add on i1 and failed in CodeGenLLVM::CreateAdd: cast to the result's dtype first."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.cumsum.default,
                                                             torch.ops.aten.sum.dim_IntList):
            continue
        source, out = node.args[0], node.meta.get("val")
        source_val = getattr(source, "meta", {}).get("val")
        if source_val is None or out is None or source_val.dtype != torch.bool:
            continue
        with gm.graph.inserting_before(node):
            cast = gm.graph.call_function(torch.ops.aten._to_copy.default, (source,), {"dtype": out.dtype})
            cast.meta["val"] = source_val.to(out.dtype)
        node.replace_input_with(source, cast)
        changed = True
    return changed



def _explicit_pool_strides(gm: fx.GraphModule) -> bool:
    """max_pool2d(x, 2, ceil_mode=True) is captured with stride [] (meaning: the kernel size),
    which TVM's importer rejects ("The input strides length is expected to be 2")."""
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ops.WINDOW_POOLS and len(node.args) > 2 and not node.args[2]:
            node.update_arg(2, list(node.args[1]))
            changed = True
    return changed


def _sorted_topk(gm: fx.GraphModule) -> bool:
    """topk(..., sorted=False) (DeepSeek-V3's router) leaves the order unspecified and TVM's
    importer takes sorted output only ("Currently supports only sorted output"): ask for it."""
    changed = False
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.topk.default):
        if len(node.args) > 4 and not node.args[4]:
            node.update_arg(4, True)
            changed = True
        elif node.kwargs.get("sorted") is False:
            node.update_kwarg("sorted", True)
            changed = True
    return changed


def _nonnegative_indices(gm: fx.GraphModule) -> bool:
    """x[..., [-2], :] (Falcon's multi-query key) indexes with a negative integer, which torch
    wraps and TVM's take reads out of bounds: wrong outputs that change from call to call.
    Constant index tensors are wrapped here; computed ones get where(i < 0, i + size, i)."""
    aten, changed = torch.ops.aten, False
    for node in list(gm.graph.nodes):     # (index_select rejects negative indices in torch)
        if node.op != "call_function" or node.target is not aten.index.Tensor:
            continue
        index_vals = [getattr(index, "meta", {}).get("val") for index in node.args[1] if index is not None]
        if getattr(node.args[0], "meta", {}).get("val") is None or any(
                v is None or v.dtype == torch.bool for v in index_vals):
            continue                      # a bool mask spans several dims: positions would shift
        replacements = {}
        for dim, index in enumerate(node.args[1]):
            wrapped = None if index is None else _wrapped_index(gm, node, index, dim)
            if wrapped is not None:
                replacements[index] = wrapped
        for old, new in replacements.items():
            node.replace_input_with(old, new)
            changed = True
    return changed


def _wrapped_index(gm: fx.GraphModule, user: fx.Node, index: fx.Node, dim: int) -> fx.Node | None:
    """A node holding `index` with negative entries wrapped by the size of `user`'s source
    along `dim`, or None if there is nothing to wrap."""
    source = user.args[0]
    size = source.meta["val"].shape[dim]
    index_val = index.meta["val"]
    value = constant_value(gm, index)
    if value is not None:
        if not bool((value < 0).any()):
            return None
        name = add_constant(gm, f"{index.target}_wrapped", torch.where(value < 0, value + size, value))
        with gm.graph.inserting_before(user):
            wrapped = gm.graph.get_attr(name)
        wrapped.meta = dict(index.meta)
        return wrapped
    aten = torch.ops.aten
    with gm.graph.inserting_before(user):
        if not isinstance(size, int):
            size = gm.graph.call_function(aten.sym_size.int, (source, dim))
            size.meta["val"] = source.meta["val"].shape[dim]
        negative = gm.graph.call_function(aten.lt.Scalar, (index, 0))
        shifted = gm.graph.call_function(aten.add.Tensor, (index, size))
        wrapped = gm.graph.call_function(aten.where.self, (negative, shifted, index))
    negative.meta["val"] = index_val < 0
    shifted.meta["val"] = index_val.clone()           # same shape and dtype as the index
    wrapped.meta = dict(index.meta)
    return wrapped


def _static_slices_of_dynamic_dims(gm: fx.GraphModule) -> bool:
    """x[:, :1] of a dynamic length: torch knows the result has 1 element (the length is >= 2),
    TVM infers min(1, seq) and loses the shape downstream (in Hugging Face's mask code, at a
    cumsum it cannot lower). Such slices become index_select with constant indices."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.slice.Tensor:
            continue
        source, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        start = node.args[2] if len(node.args) > 2 else 0
        step = node.args[4] if len(node.args) > 4 else 1
        source_val, out = getattr(source, "meta", {}).get("val"), node.meta.get("val")
        if source_val is None or out is None or not isinstance(start, int) or start < 0 or not isinstance(step, int):
            continue
        dim = dim % source_val.dim()
        if isinstance(source_val.shape[dim], int) or not isinstance(out.shape[dim], int):
            continue
        size = out.shape[dim]
        with gm.graph.inserting_before(node):
            index = gm.graph.call_function(torch.ops.aten.arange.start_step, (start, start + size * step, step),
                                           {"dtype": torch.int64})
            index.meta["val"] = torch.arange(start, start + size * step, step)
            select = gm.graph.call_function(torch.ops.aten.index_select.default, (source, dim, index))
            select.meta = dict(node.meta)
        node.replace_all_uses_with(select)
        gm.graph.erase_node(node)
        changed = True
    return changed


def positive_slice_dims(gm: fx.GraphModule) -> None:
    """TVM legalizes a slice with a negative axis over a dynamic shape into an out-of-range
    axis (topi dynamic_strided_slice_with_axes: "axis < src_tensor_dim (-1 vs. 2)")."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.slice.Tensor and len(node.args) > 1:
            dim, source_val = node.args[1], getattr(node.args[0], "meta", {}).get("val")
            if isinstance(dim, int) and dim < 0 and source_val is not None:
                node.update_arg(1, dim % source_val.dim())
    gm.recompile()


def _register_tensor_attributes(gm: fx.GraphModule, min_elements: int = 4096) -> None:
    """Passes that make new weights (fused q/k/v, pruned matrices) store them as plain tensor
    attributes or buffers, and block quantization stores its codes (uint8) as buffers; TVM's
    importer binds those as constants (embedded in the library, invisible to weight packing and
    to the lifted reordering of quantized codes). Large ones become parameters (no grad)."""
    for node in gm.graph.find_nodes(op="get_attr"):
        owner_path, _, attr = node.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        value = getattr(owner, attr, None)
        if (isinstance(value, torch.Tensor) and attr not in owner._parameters and value.dtype != torch.bool
                and value.numel() >= min_elements):
            if attr in owner._buffers:
                del owner._buffers[attr]
                owner._non_persistent_buffers_set.discard(attr)   # or torch.export misses it
            else:
                delattr(owner, attr)
            owner.register_parameter(attr, torch.nn.Parameter(value, requires_grad=False))
