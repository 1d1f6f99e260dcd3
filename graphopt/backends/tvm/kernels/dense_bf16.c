/* bf16 dense kernels for the TVM backend: Y[m, n] = X[m, k] @ W^T with X float32, W stored in
 * bfloat16 panels [n / 16, k / 2, 16, 2] (a panel's 16 columns, two k steps per 32-bit pair:
 * the layout both vdpbf16ps and AMX's tdpbf16ps read), Y float32, accumulation in float32.
 * graphopt_dense_nbits does the same for 4- and 8-bit block-quantized weights: each group of
 * four panels is dequantized to bf16 panels in a per-thread buffer, then multiplied.
 *
 * TVM calls graphopt_dense_bf16 once per task from a parallel loop: a task is every row of X
 * times a share of the panels, so each weight byte is read from memory once per call (the
 * weights, not X, are what does not fit in cache). Each task rounds X to bfloat16 (nearest
 * even) into a per-thread buffer.
 * Built by graphopt at lowering time with the host's instruction set: GRAPHOPT_AMX selects
 * AMX-BF16 tiles, otherwise AVX512-BF16's vdpbf16ps is used. */
#include "common.h"

#define FEW_ROWS 4          /* up to this many rows of X, quantized weights are used without converting them */

static uint16_t round_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((bits >> 16) | 0x40u);       /* quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static void floats_to_bf16(const float *x, uint16_t *out, int64_t count) {
    int64_t i = 0;
    for (; i + 32 <= count; i += 32) {
        __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
        _mm512_storeu_si512((void *)(out + i), (__m512i)pair);
    }
    for (; i < count; i++)
        out[i] = round_to_bf16(x[i]);
}

/* m rows of k floats -> this thread's bf16 buffer, rows of `stride` >= k (zeros after k) */
static const uint16_t *rows_to_bf16(const float *x, int64_t m, int64_t k, int64_t stride) {
    uint16_t *x_bf16 = thread_scratch(0, (size_t)(m * stride) * 2);
    if (stride == k) {
        floats_to_bf16(x, x_bf16, m * k);
        return x_bf16;
    }
    for (int64_t r = 0; r < m; r++) {
        floats_to_bf16(x + r * k, x_bf16 + r * stride, k);
        memset(x_bf16 + r * stride + k, 0, (size_t)(stride - k) * 2);
    }
    return x_bf16;
}

#ifdef GRAPHOPT_AMX
/* NR row tiles (1-2) x NP panels (1-2), the whole k: constants after inlining. */
static inline __attribute__((always_inline)) void amx_block(const int NR, const int NP, const uint16_t *x,
        const uint16_t *w, float *y, int64_t k, int64_t n, const char *prefetch, int64_t prefetch_lines) {
    const int64_t pairs = k / 2, x_stride = k * 2;
    _tile_zero(0);
    if (NP > 1) _tile_zero(1);
    if (NR > 1) _tile_zero(2);
    if (NR > 1 && NP > 1) _tile_zero(3);
    for (int64_t c = 0; c < k / 32; c++) {
        for (int64_t line = c * prefetch_lines; line < (c + 1) * prefetch_lines; line++)
            _mm_prefetch(prefetch + line * 64, _MM_HINT_T0);
        _tile_loadd(4, x + c * 32, x_stride);
        _tile_loadd(6, w + c * 16 * 32, 64);
        if (NP > 1) _tile_loadd(7, w + (pairs + c * 16) * 32, 64);
        if (NR > 1) _tile_loadd(5, x + 16 * k + c * 32, x_stride);
        _tile_dpbf16ps(0, 4, 6);
        if (NP > 1) _tile_dpbf16ps(1, 4, 7);
        if (NR > 1) _tile_dpbf16ps(2, 5, 6);
        if (NR > 1 && NP > 1) _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, y, n * 4);
    if (NP > 1) _tile_stored(1, y + 16, n * 4);
    if (NR > 1) _tile_stored(2, y + 16 * n, n * 4);
    if (NR > 1 && NP > 1) _tile_stored(3, y + 16 * n + 16, n * 4);
}

/* Rows [0, m) x panels [panel0, panel0 + panels): panel pairs outside, 32-row blocks inside,
 * so a pair's weights stay in cache while every row block uses them. */
static void dense_panels(const uint16_t *x, const uint16_t *w, float *y, int64_t m, int64_t k, int64_t n,
                         int64_t panel0, int64_t panels) {
    const int64_t pairs = k / 2, tail = m % 32, full = m - tail;
    for (int pass = 0; pass < 2; pass++) {          /* full 32-row blocks, then the tail's tile shape */
        int64_t row0 = pass ? full : 0, row_end = pass ? m : full;
        if (row0 >= row_end)
            continue;
        int64_t rows = pass ? tail : 32;
        configure_tiles(rows < 16 ? (int)rows : 16, rows > 16 ? (int)(rows - 16) : 0);
        const int64_t blocks = (row_end - row0 + 31) / 32;
        for (int64_t p = panel0; p < panel0 + panels; p += 2) {
            const uint16_t *wp = w + p * pairs * 32;
            int two_panels = p + 1 < panel0 + panels;
            /* the next pair's weights, prefetched while this pair computes, spread over its row
             * blocks (measured: docs/measurements/decisions.md) */
            const int64_t next_lines = p + 2 < panel0 + panels ? 2 * pairs : 0;
            const int64_t per_step = (next_lines / blocks + k / 32 - 1) / (k / 32);
            const char *next = (const char *)(w + (p + 2) * pairs * 32);
            for (int64_t r = row0, b = 0; r < row_end; r += 32, b++) {
                const uint16_t *xr = x + r * k;
                float *yr = y + r * n + p * 16;
                const char *fetch = next + b * per_step * (k / 32) * 64;
                int64_t lines = b * per_step * (k / 32) < next_lines ? per_step : 0;
                if (rows > 16) {
                    if (two_panels) amx_block(2, 2, xr, wp, yr, k, n, fetch, lines);
                    else amx_block(2, 1, xr, wp, yr, k, n, fetch, lines);
                } else {
                    if (two_panels) amx_block(1, 2, xr, wp, yr, k, n, fetch, lines);
                    else amx_block(1, 1, xr, wp, yr, k, n, fetch, lines);
                }
            }
        }
    }
    _tile_release();
}
#else
/* NR rows (1-4) x NP panels (1-4) of accumulators in registers over the whole k. */
static inline __attribute__((always_inline)) void dot_block(const int NR, const int NP, const uint16_t *x,
        const uint16_t *w, float *y, int64_t k, int64_t n) {
    const int64_t pairs = k / 2;
    __m512 acc[4][4];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < NP; j++)
            acc[i][j] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < pairs; kk++) {
        __m512bh panel[4];
        for (int j = 0; j < NP; j++)
            panel[j] = (__m512bh)_mm512_loadu_si512((const void *)(w + (j * pairs + kk) * 32));
        for (int i = 0; i < NR; i++) {
            int32_t pair;
            memcpy(&pair, x + i * k + 2 * kk, sizeof pair);
            __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            for (int j = 0; j < NP; j++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, panel[j]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < NP; j++)
            _mm512_storeu_ps(y + i * n + j * 16, acc[i][j]);
}

#define DOT_ROWS(NP)                                                           \
    switch (nr) {                                                              \
        case 4: dot_block(4, NP, xr, wp, yr, k, n); break;                     \
        case 3: dot_block(3, NP, xr, wp, yr, k, n); break;                     \
        case 2: dot_block(2, NP, xr, wp, yr, k, n); break;                     \
        default: dot_block(1, NP, xr, wp, yr, k, n); break;                    \
    }

static void dense_panels(const uint16_t *x, const uint16_t *w, float *y, int64_t m, int64_t k, int64_t n,
                         int64_t panel0, int64_t panels) {
    const int64_t pairs = k / 2;
    for (int64_t p = panel0; p < panel0 + panels; p += 4) {
        int np = panel0 + panels - p < 4 ? (int)(panel0 + panels - p) : 4;
        const uint16_t *wp = w + p * pairs * 32;
        for (int64_t r = 0; r < m; r += 4) {
            int nr = m - r < 4 ? (int)(m - r) : 4;
            const uint16_t *xr = x + r * k;
            float *yr = y + r * n + p * 16;
            switch (np) {
                case 4: DOT_ROWS(4); break;
                case 3: DOT_ROWS(3); break;
                case 2: DOT_ROWS(2); break;
                default: DOT_ROWS(1); break;
            }
        }
    }
}
#endif

/* Task `task` of `tasks`: all m rows x the task's share of the n / 16 panels (task_panels). */
int32_t graphopt_dense_bf16(const float *x, const uint16_t *w, float *y, int64_t m, int64_t k, int64_t n,
                            int64_t task, int64_t tasks) {
    int64_t panel0, panel_end;
    if (m <= 0 || !task_panels(n, task, tasks, &panel0, &panel_end))
        return 0;
    dense_panels(rows_to_bf16(x, m, k, k), w, y, m, k, n, panel0, panel_end - panel0);
    return 0;
}

/* Panel p of block-quantized weights -> bf16 panel [k32 / 2, 32]: w = (code - zero) * scale,
 * or code * scale + minimum with `minimums` (the offset grid, in the scales' type).
 * codes: [n / 16, k_blocks / 2, 16 * bits / 4] (a row: 16 columns' (even k, odd k) codes: one
 * byte of two nibbles at 4 bits, two bytes at 8); scales, zeros, minimums: [n / 16, blocks, 16]. */
static void dequantize_panel(const uint8_t *codes, const void *scales, const uint8_t *zeros, const void *minimums,
                             uint16_t *out, int64_t p, int64_t k_blocks, int64_t k32, int bits, int64_t block,
                             int64_t blocks, int scales_f16) {
    const int64_t rows = k_blocks / 2, row_bytes = 16 * bits / 4;
    const __m512 default_zero = _mm512_set1_ps((float)(1 << (bits - 1)));
    for (int64_t kk = 0; kk < k32 / 2; kk++) {
        uint16_t *row = out + kk * 32;
        if (kk >= rows) {
            memset(row, 0, 64);
            continue;
        }
        const int64_t b = p * blocks + 2 * kk / block;
        const __m512 scale = scales_f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales + b))
                                        : _mm512_loadu_ps((const float *)scales + b * 16);
        const __m512 zero = zeros ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)zeros + b)))
                                  : default_zero;
        const uint8_t *source = codes + (p * rows + kk) * row_bytes;
        __m512i pairs, even, odd;
        if (bits == 4) {
            pairs = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)source));
            even = _mm512_and_si512(pairs, _mm512_set1_epi32(15));
            odd = _mm512_srli_epi32(pairs, 4);
        } else {
            pairs = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)source));
            even = _mm512_and_si512(pairs, _mm512_set1_epi32(255));
            odd = _mm512_srli_epi32(pairs, 8);
        }
        __m512 low, high;
        if (minimums) {
            const __m512 minimum = scales_f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)minimums + b))
                                              : _mm512_loadu_ps((const float *)minimums + b * 16);
            low = _mm512_fmadd_ps(_mm512_cvtepi32_ps(even), scale, minimum);
            high = _mm512_fmadd_ps(_mm512_cvtepi32_ps(odd), scale, minimum);
        } else {
            low = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(even), zero), scale);
            high = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(odd), zero), scale);
        }
        __m512i low16 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(low));
        __m512i high16 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(high));
        _mm512_storeu_si512((void *)row, _mm512_or_si512(low16, _mm512_slli_epi32(high16, 16)));
    }
}

/* 16 columns' float scales or minimums of block b (table [n / 16, blocks, 16], entry p * blocks + b) */
static inline __m512 column_floats(const void *table, int64_t at, int f16) {
    return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)table + at))
               : _mm512_loadu_ps((const float *)table + at * 16);
}

/* NR rows (1-4) of x times NP panels from p, the codes read in place: per block, the dot
 * product of codes and x, times the scale, plus sum(x) times the minimum (or minus sum(x) * zero
 * * scale). 4-bit codes: each byte becomes two bf16 values 128 + code (exponent bits OR'd in,
 * no conversion) and vdpbf16ps multiplies them with x rounded to bf16 (`xw`: pairs of bf16 per
 * 32 bits), fp32 sums; 128 * the block's sum of rounded x (`xsum16`) is taken off again, and the
 * minimum or zero point term uses that sum too: the result is W @ bf16(x) (the rounding of x
 * meets the weights centred, as in the bf16 panels). 8-bit codes: converted to float32 and
 * multiplied with x (`x`) in fp32. `xsum`: the block sums of the x multiplied. */
static inline __attribute__((always_inline)) void nbits_rows(const int NR, const int NP, const int bits,
        const float *x, const uint32_t *xw, const float *xsum, const float *xsum16, const uint8_t *codes,
        const void *scales, const void *table, float *y, int64_t n, int64_t p, int64_t k_blocks, int64_t block,
        int64_t blocks, int64_t flags) {
    const int64_t rows = k_blocks / 2, row_bytes = 16 * bits / 4;
    const int f16 = flags & 1;
    __m512 acc[4][4];
    for (int r = 0; r < NR; r++)
        for (int j = 0; j < NP; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m512 even_sum[4][4], odd_sum[4][4];
        for (int r = 0; r < NR; r++)
            for (int j = 0; j < NP; j++) even_sum[r][j] = odd_sum[r][j] = _mm512_setzero_ps();
        for (int64_t kk = b * block / 2; kk < (b + 1) * block / 2; kk++) {
            for (int j = 0; j < NP; j++) {
                const uint8_t *source = codes + ((p + j) * rows + kk) * row_bytes;
                if (bits == 4) {
                    const __m512i pairs = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)source));
                    const __m512i low = _mm512_ternarylogic_epi32(pairs, _mm512_set1_epi32(0x0F),
                                                                  _mm512_set1_epi32(0x43004300), 0xEA);
                    const __m512i both = _mm512_ternarylogic_epi32(_mm512_slli_epi32(pairs, 12),
                                                                   _mm512_set1_epi32(0xF0000), low, 0xEA);
                    for (int r = 0; r < NR; r++)
                        even_sum[r][j] = _mm512_dpbf16_ps(even_sum[r][j], (__m512bh)both,
                                                          (__m512bh)_mm512_set1_epi32((int)xw[r * rows + kk]));
                } else {
                    const __m512i pairs = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)source));
                    const __m512 low = _mm512_cvtepi32_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(255)));
                    const __m512 high = _mm512_cvtepi32_ps(_mm512_srli_epi32(pairs, 8));
                    for (int r = 0; r < NR; r++) {
                        even_sum[r][j] = _mm512_fmadd_ps(low, _mm512_set1_ps(x[r * k_blocks + 2 * kk]),
                                                         even_sum[r][j]);
                        odd_sum[r][j] = _mm512_fmadd_ps(high, _mm512_set1_ps(x[r * k_blocks + 2 * kk + 1]),
                                                        odd_sum[r][j]);
                    }
                }
            }
        }
        for (int j = 0; j < NP; j++) {
            const int64_t at = (p + j) * blocks + b;
            const __m512 scale = column_floats(scales, at, f16);
            __m512 offset;                  /* per column: what sum(x) of the block is multiplied by */
            if (flags & 4)
                offset = column_floats(table, at, f16);
            else if (flags & 2)
                offset = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i *)table + at))), _mm512_sub_ps(_mm512_setzero_ps(), scale));
            else
                offset = _mm512_mul_ps(_mm512_set1_ps((float)-(1 << (bits - 1))), scale);
            for (int r = 0; r < NR; r++) {
                __m512 dot = _mm512_add_ps(even_sum[r][j], odd_sum[r][j]);
                if (bits == 4)
                    dot = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), _mm512_set1_ps(xsum16[r * blocks + b]), dot);
                acc[r][j] = _mm512_fmadd_ps(dot, scale, acc[r][j]);
                acc[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[r * blocks + b]), offset, acc[r][j]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int j = 0; j < NP; j++) _mm512_storeu_ps(y + r * n + (p + j) * 16, acc[r][j]);
}

#define NBITS_ROWS(NR, NP) (bits == 4                                                                         \
    ? nbits_rows(NR, NP, 4, 0, xw + r * rows, xsum16 + r * blocks, xsum16 + r * blocks, codes, scales, table,\
                 y + r * n, n, p, k_blocks, block, blocks, flags)                                            \
    : nbits_rows(NR, NP, 8, xp + r * k_blocks, 0, xsum + r * blocks, 0, codes, scales, table, y + r * n, n,  \
                 p, k_blocks, block, blocks, flags))

/* Y rows [0, m) for panels [panel0, panel_end) without converting the weights to panels: rows of
 * x four at a time (sharing each code load), panels four (two) at a time. */
static void dense_nbits_few_rows(const float *x, const uint8_t *codes, const void *scales, const void *table,
                                 float *y, int64_t m, int64_t k, int64_t n, int64_t bits, int64_t block,
                                 int64_t blocks, int64_t flags, int64_t panel0, int64_t panel_end) {
    const int64_t k_blocks = blocks * block, rows = k_blocks / 2;
    float *xp = thread_scratch(0, (size_t)(m * k_blocks) * 4), *xsum = thread_scratch(2, (size_t)(2 * m * blocks) * 4);
    float *xsum16 = xsum + m * blocks;
    uint32_t *xw = thread_scratch(1, (size_t)(m * rows) * 4);
    for (int64_t r = 0; r < m; r++) {
        float *row = xp + r * k_blocks;
        memcpy(row, x + r * k, (size_t)k * 4);
        memset(row + k, 0, (size_t)(k_blocks - k) * 4);
        floats_to_bf16(row, (uint16_t *)(xw + r * rows), k_blocks);
        const uint16_t *rounded = (const uint16_t *)(xw + r * rows);
        for (int64_t b = 0; b < blocks; b++) {
            float sum = 0, sum16 = 0;
            for (int64_t i = b * block; i < (b + 1) * block; i++) {
                uint32_t bits16 = (uint32_t)rounded[i] << 16;
                float value;
                memcpy(&value, &bits16, 4);
                sum += row[i];
                sum16 += value;
            }
            xsum[r * blocks + b] = sum;
            xsum16[r * blocks + b] = sum16;
        }
    }
    for (int64_t r = 0; r < m; r += 4) {
        const int64_t nr = m - r < 4 ? m - r : 4;
        int64_t p = panel0;
        if (nr <= 2) {
            for (; p + 4 <= panel_end; p += 4) {
                if (nr == 1) NBITS_ROWS(1, 4); else NBITS_ROWS(2, 4);
            }
        } else {
            for (; p + 2 <= panel_end; p += 2) {
                if (nr == 3) NBITS_ROWS(3, 2); else NBITS_ROWS(4, 2);
            }
        }
        for (; p < panel_end; p++) {
            switch (nr) {
                case 1: NBITS_ROWS(1, 1); break;
                case 2: NBITS_ROWS(2, 1); break;
                case 3: NBITS_ROWS(3, 1); break;
                default: NBITS_ROWS(4, 1); break;
            }
        }
    }
}

/* Y[m, n] = X[m, k] @ W^T for block-quantized W (bits 4 or 8, `blocks` blocks of `block` per
 * column, k_blocks = blocks * block >= k); flags: 1 = float16 scales (and minimums), 2 = `table`
 * holds uint8 zero points (else 2 ** (bits - 1)), 4 = it holds minimums (w = code * scale +
 * minimum). Task split as graphopt_dense_bf16. */
int32_t graphopt_dense_nbits(const float *x, const uint8_t *codes, const void *scales, const void *table,
                             float *y, int64_t m, int64_t k, int64_t n, int64_t bits, int64_t block, int64_t blocks,
                             int64_t flags, int64_t task, int64_t tasks) {
    int64_t panel0, panel_end;
    if (m <= 0 || !task_panels(n, task, tasks, &panel0, &panel_end))
        return 0;
    if (m <= FEW_ROWS) {
        dense_nbits_few_rows(x, codes, scales, table, y, m, k, n, bits, block, blocks, flags, panel0, panel_end);
        return 0;
    }
    const int64_t k32 = (k + 31) / 32 * 32, k_blocks = blocks * block;
    const uint16_t *xb = rows_to_bf16(x, m, k, k32);
    uint16_t *panels = thread_scratch(1, (size_t)(4 * k32 / 2 * 32) * 2);
    for (int64_t p = panel0; p < panel_end; p += 4) {
        const int64_t count = panel_end - p < 4 ? panel_end - p : 4;
        for (int64_t j = 0; j < count; j++)
            dequantize_panel(codes, scales, flags & 2 ? (const uint8_t *)table : 0, flags & 4 ? table : 0,
                             panels + j * (k32 / 2) * 32, p + j, k_blocks, k32, (int)bits, block, blocks,
                             (int)(flags & 1));
        dense_panels(xb, panels, y + p * 16, m, k32, n, 0, count);
    }
    return 0;
}
