"""CPU schedules for the TVM backend: what makes TVM's untuned CPU code fast enough to use.

TVM's Relax CPU pipeline lowers every op to a plain loop nest (one thread, no vectors), ~70x
slower than torch on SmolLM2. This module gives it:

- `packed_dense`: a matmul with a constant weight, written against a weight packed into
  [N / lanes, K, lanes] panels, tiled into register blocks of `rows` x `lanes` accumulators
  (FMA per k step), vectorized over the panel lanes and parallel over (panel, row tile).
  Measured alone on 128x576 @ 576x1536 (2 threads, AVX-512): 399 GFLOP/s with the weights in
  cache (torch/MKL: 385), ~300 with them cold from memory as inside a model.
- `LoopNest`: the rule for every other kernel. Injective producers are inlined (padding is
  not: its if_then_else would turn vector loads into gathers). A reduction whose innermost
  spatial loop walks rows of the output and of an input (convolution, batched matmul) gets a
  register tile: an [8, 16] output block accumulates across the whole reduction, the tile's
  rows taken from a spatial loop that input does not depend on (output channels, matrix
  rows). Other blocks: leading spatial loops parallel, the innermost one vectorized.

The dlight CPU rules from TVM (GEMV for decode-sized matmuls when its tiles divide the loops,
Reduction for softmax and norms) run before `LoopNest`.
"""
from __future__ import annotations

from tvm import s_tir, te, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr
from tvm.s_tir.dlight.base import ScheduleRule

VECTOR_LANES = 16          # fp32 lanes of an AVX-512 register
OPAQUE_PATTERN = 8         # relax OpPatternKind.kOpaque


def dense_lanes(n: int, widest: int = 32) -> int | None:
    """Panel width for an output of `n` columns (at most `widest`: two vector registers of the
    target, `panel_lanes`), or None when `n` is not a multiple of 16."""
    for lanes in (32, 16):
        if lanes <= widest and n % lanes == 0:
            return lanes
    return None


def panel_lanes(features) -> int:
    """The widest fp32 dense panel for CPU `features`: two registers' lanes, 32 with AVX-512 and
    16 with AVX2 (a 6-row tile of 32 lanes needs 24 AVX2 registers of the 16 there are: measured
    2.6x slower, docs/measurements/decisions.md)."""
    return 32 if "avx512f" in set(features or ()) else 16


def packed_dense(m, k: int, n: int, lanes: int, rows: int = 6, dtype: str = "float32") -> tirx.PrimFunc:
    """Y[m, n] = sum_k X[m, k] * W[n // lanes, k, n % lanes], scheduled for the CPU.

    `m` may be an int or a tirx.Var (dynamic sequence length)."""
    if isinstance(m, int) and m < rows:
        rows = m
    x = te.placeholder((m, k), dtype, name="X")
    w = te.placeholder((n // lanes, k, lanes), dtype, name="W")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r] * w[j // lanes, r, j % lanes], axis=r), name="Y")
    sch = s_tir.Schedule(te.create_prim_func([x, w, y]))
    block = sch.get_sblock("Y")
    # Register block: the [rows, lanes] accumulator tile lives in a local buffer; the
    # write-back block owns the parallel loop and the FMA block is computed inside it.
    write_back = sch.cache_write(block, 0, "global")
    i, j = sch.get_loops(write_back)
    i_outer, i_inner = sch.split(i, [None, rows])
    j_outer, j_inner = sch.split(j, [None, lanes])
    sch.reorder(j_outer, i_outer, i_inner, j_inner)
    if isinstance(m, int):
        tile = sch.fuse(j_outer, i_outer)
        sch.parallel(tile)
    else:   # a fused loop over a symbolic extent has non-affine bindings: parallel over panels only
        tile = i_outer
        sch.parallel(j_outer)
    sch.vectorize(j_inner)
    sch.compute_at(block, tile)
    inner = sch.get_loops(block)[len(sch.get_loops(write_back)) - 2:]   # below the tile loop
    *bi, bj, bk = inner           # compute_at drops the row loop when a tile has one row
    sch.reorder(bk, *bi, bj)
    sch.vectorize(bj)
    if bi:
        sch.unroll(bi[0])
    sch.decompose_reduction(block, bk)
    sch.vectorize(sch.get_loops(sch.get_sblock("Y_init"))[-1])
    # Opaque to FuseOps: fused with an epilogue it would become a new, unscheduled function.
    return (sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE_PATTERN)
            .without_attr("global_symbol"))


def _var_names(expr) -> set[str]:
    return {var.name for var in collect_vars_used_in_prim_expr(expr)}


def _innermost_index_uses(region, var_name: str) -> bool:
    return bool(region.region) and var_name in _var_names(region.region[-1].min)


class LoopNest(ScheduleRule):
    """Register-tiled, parallel and vectorized loop nests for the kernels the other rules leave."""

    def is_target_available(self, target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = _inline_injective(sch, infos)
        for info in infos:
            kinds = _loop_kinds(sch, info.block_rv)
            if kinds is None:
                continue
            vectorize = not _touches_bool(sch.get(info.block_rv))
            attempt = sch.copy()
            try:
                if not vectorize or not _register_tile(attempt, info.block_rv, kinds):
                    _parallel_vectorize(attempt, info.block_rv, kinds, vectorize)
                sch = attempt
            except (s_tir.ScheduleError, RuntimeError):   # TVM InternalError is a RuntimeError
                continue    # this block keeps TVM's plain loops; still correct
        return sch


def _loop_kinds(sch: s_tir.Schedule, block) -> list[str] | None:
    """"S"/"R" per loop of a block whose loops map one-to-one to its iter vars, else None."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    kinds = ["S" if v.iter_type == tirx.IterVar.DataPar else
             "R" if v.iter_type == tirx.IterVar.CommReduce else "O" for v in stmt.iter_vars]
    if not loops or "O" in kinds or len(kinds) != len(loops) or "S" not in kinds:
        return None
    return kinds


def _touches_bool(stmt) -> bool:
    """Vectorized, a bool buffer (i8 in memory) meets bool values (i1) in one LLVM `and`, which
    fails LLVM's verifier (DeepSeek-V3's attention mask); such blocks are parallel, not vectorized."""
    return any("bool" in str(region.source.dtype) for region in (*stmt.reads, *stmt.writes))


def _inline_injective(sch: s_tir.Schedule, infos) -> list:
    """Inline elementwise/reshape producers into their consumers, except padding (an
    if_then_else inlined into a convolution's inner loop turns vector loads into gathers)."""
    remaining = []
    for info in infos[:-1]:
        stmt = sch.get(info.block_rv)
        if info.is_injective() and stmt.reads and "if_then_else" not in str(stmt.body):
            try:
                sch.compute_inline(info.block_rv)
                continue
            except s_tir.ScheduleError:
                pass
        remaining.append(info)
    return remaining + infos[-1:]


def _row_walk(stmt, kinds: list[str]):
    """The innermost spatial iter var's name, and the read regions it walks contiguously,
    when it also walks the output contiguously."""
    last = stmt.iter_vars[len(kinds) - 1 - kinds[::-1].index("S")].var.name
    if not all(_innermost_index_uses(w, last) for w in stmt.writes):
        return last, []
    return last, [r for r in stmt.reads if _innermost_index_uses(r, last)]


def _register_tile(sch: s_tir.Schedule, block, kinds: list[str]) -> bool:
    """Reductions whose innermost spatial loop walks rows (convolution, batched matmul):
    accumulate a [tile, lanes] output block in registers across the whole reduction, where
    `tile` runs over a spatial loop the row-walking input does not depend on (output channels
    of a convolution, rows of a matmul), so each vector load feeds `tile` FMAs."""
    stmt = sch.get(block)
    if "R" not in kinds:
        return False
    last, walked = _row_walk(stmt, kinds)
    if not walked:
        return False
    spatial_vars = [v.var.name for v, k in zip(stmt.iter_vars, kinds) if k == "S" and _extent_of(v) != 1]
    used = set().union(*(_var_names(dim.min) for r in walked for dim in r.region))
    loops = sch.get_loops(block)
    extents = [_extent(sch, loop) for loop in loops]
    spatial_extents = [e for e, k in zip(extents, kinds) if k == "S" and e != 1]
    lanes = next((n for n in (VECTOR_LANES, 8) if spatial_extents[-1] and spatial_extents[-1] % n == 0), None)
    if lanes is None:
        return False
    reuse = next((i for i in range(len(spatial_vars) - 2, -1, -1)
                  if spatial_vars[i] not in used and spatial_extents[i] and spatial_extents[i] % 4 == 0), None)
    write_back = sch.cache_write(block, 0, "global")
    wb_loops = [loop for loop in sch.get_loops(write_back) if _extent(sch, loop) != 1]
    if len(wb_loops) != len(spatial_vars):
        return False
    vector_outer, vector_inner = sch.split(wb_loops[-1], [None, lanes])
    outer, tile = list(wb_loops[:-1]), []
    if reuse is not None:
        rows = 8 if spatial_extents[reuse] % 8 == 0 else 4
        reuse_outer, reuse_inner = sch.split(wb_loops[reuse], [None, rows])
        outer[reuse] = reuse_outer
        tile = [reuse_inner]
    outer.append(vector_outer)
    sch.reorder(*outer, *tile, vector_inner)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(fused)
    sch.vectorize(vector_inner)
    sch.compute_at(block, fused)
    inner = _loops_below(sch, block, fused)
    spatial_inner = inner[:len(tile) + 1]
    reduce_inner = inner[len(tile) + 1:]
    sch.reorder(*reduce_inner, *spatial_inner)
    sch.vectorize(spatial_inner[-1])
    if tile:
        sch.unroll(spatial_inner[0])
    sch.decompose_reduction(block, reduce_inner[0])
    return True


def _parallel_vectorize(sch: s_tir.Schedule, block, kinds: list[str], vectorize: bool = True) -> None:
    """Parallel outer spatial loops; the innermost spatial loop vectorized (moved inside the
    reductions when it walks rows, so a dot product per element becomes vector FMAs)."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
    reduce = [loop for loop, kind in zip(loops, kinds) if kind == "R"]
    walks_rows = bool(_row_walk(stmt, kinds)[1])
    vector_loop = spatial[-1] if (not reduce or walks_rows) else None
    outer = spatial[:-1] if vector_loop is not None else spatial
    sch.reorder(*outer, *reduce, *([vector_loop] if vector_loop is not None else []))
    extent = _extent(sch, vector_loop) if vector_loop is not None else None
    lanes = next((n for n in (VECTOR_LANES, 8) if extent and extent % n == 0), None) if vectorize else None
    if lanes:
        vector_outer, vector_inner = sch.split(vector_loop, [None, lanes])
        sch.vectorize(vector_inner)
        if not reduce:
            outer = outer + [vector_outer]
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _loops_below(sch: s_tir.Schedule, block, loop) -> list:
    loops = sch.get_loops(block)
    target = sch.get(loop)
    position = next(i for i, candidate in enumerate(loops) if sch.get(candidate).same_as(target))
    return loops[position + 1:]


def _extent_of(iter_var) -> int | None:
    extent = iter_var.dom.extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


class EvenGEMV(dlight.cpu.GEMV):
    """TVM's CPU GEMV rule, declined when its tiles do not divide the loops. Its tiles
    (128 x 64) leave a predicate inside the vectorized loop otherwise, and LLVM then ran for
    more than 10 minutes on one kernel (MobileNetV2's last 1x1 convolution: 80 -> 1280
    channels on a 1x1 map). It also fails an assert on some gemv-like blocks with no
    reduction loop left after normalising (MobileViT): declined too. LoopNest schedules both."""

    def apply(self, func, target, tunable):
        try:
            sch = super().apply(func, target, tunable)
        except AssertionError:
            return None
        if sch is None or "T.where(" in sch.mod.script():
            return None
        return sch


def default_rules() -> list[ScheduleRule]:
    return [EvenGEMV(), dlight.cpu.Reduction(), LoopNest()]
