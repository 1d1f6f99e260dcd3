/* bf16 dense kernels for the TVM backend: Y[m, n] = X[m, k] @ W^T with X float32, W stored in
 * bfloat16 panels [n / 16, k / 2, 16, 2] (a panel's 16 columns, two k steps per 32-bit pair:
 * the layout both vdpbf16ps and AMX's tdpbf16ps read), Y float32, accumulation in float32.
 *
 * TVM calls graphopt_dense_bf16 once per task from a parallel loop: a task is every row of X
 * times a share of the panels, so each weight byte is read from memory once per call (the
 * weights, not X, are what does not fit in cache). Each task rounds X to bfloat16 (nearest
 * even) into a per-thread buffer.
 * Built by graphopt at lowering time with the host's instruction set: GRAPHOPT_AMX selects
 * AMX-BF16 tiles, otherwise AVX512-BF16's vdpbf16ps is used. */
#include "common.h"

static uint16_t round_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((bits >> 16) | 0x40u);       /* quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* rows x k floats (contiguous) -> this thread's bf16 buffer */
static const uint16_t *rows_to_bf16(const float *x, int64_t count) {
    uint16_t *x_bf16 = thread_scratch((size_t)count * 2);
    int64_t i = 0;
    for (; i + 32 <= count; i += 32) {
        __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
        _mm512_storeu_si512((void *)(x_bf16 + i), (__m512i)pair);
    }
    for (; i < count; i++)
        x_bf16[i] = round_to_bf16(x[i]);
    return x_bf16;
}

#ifdef GRAPHOPT_AMX
/* NR row tiles (1-2) x NP panels (1-2), the whole k: constants after inlining. */
static inline __attribute__((always_inline)) void amx_block(const int NR, const int NP, const uint16_t *x,
        const uint16_t *w, float *y, int64_t k, int64_t n) {
    const int64_t pairs = k / 2, x_stride = k * 2;
    _tile_zero(0);
    if (NP > 1) _tile_zero(1);
    if (NR > 1) _tile_zero(2);
    if (NR > 1 && NP > 1) _tile_zero(3);
    for (int64_t c = 0; c < k / 32; c++) {
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
        for (int64_t p = panel0; p < panel0 + panels; p += 2) {
            const uint16_t *wp = w + p * pairs * 32;
            int two_panels = p + 1 < panel0 + panels;
            for (int64_t r = row0; r < row_end; r += 32) {
                const uint16_t *xr = x + r * k;
                float *yr = y + r * n + p * 16;
                if (rows > 16) {
                    if (two_panels) amx_block(2, 2, xr, wp, yr, k, n); else amx_block(2, 1, xr, wp, yr, k, n);
                } else {
                    if (two_panels) amx_block(1, 2, xr, wp, yr, k, n); else amx_block(1, 1, xr, wp, yr, k, n);
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

/* Task `task` of `tasks`: all m rows x the task's share of the n / 16 panels (in pairs of 4,
 * whole groups of the kernels' widest block). */
int32_t graphopt_dense_bf16(const float *x, const uint16_t *w, float *y, int64_t m, int64_t k, int64_t n,
                            int64_t task, int64_t tasks) {
    int64_t panel0, panel_end;
    if (m <= 0 || !task_panels(n, task, tasks, &panel0, &panel_end))
        return 0;
    dense_panels(rows_to_bf16(x, m * k), w, y, m, k, n, panel0, panel_end - panel0);
    return 0;
}
