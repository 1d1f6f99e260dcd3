/* int8 dense kernels for the TVM backend: Y[m, n] = (Xq @ Wq^T)[m, n] * x_scale[m] * w_scale[n].
 *
 * Wq: int8 weights, symmetric per output column (w_scale), stored in panels [n / 16, k / 4, 64]
 * (a panel's 16 columns x 4 consecutive k per 32-bit group: the layout AMX's tdpbssd and
 * AVX512-VNNI's vpdpbusd read); w_sums[n] = sum over k of Wq. Xq: each row of X quantized when
 * the matmul runs (dynamic, symmetric per row: x_scale = max |x| / 127, nearest even).
 * Products and sums are exact int32; the scales apply once per output.
 *
 * Tasks as in dense_bf16.c: every row x a share of the panels. GRAPHOPT_AMX selects AMX-INT8
 * tiles (signed x signed); otherwise vpdpbusd, which multiplies unsigned by signed bytes: X is
 * shifted by +128 and 128 * w_sums subtracted from the sums. */
#include "common.h"

#ifdef GRAPHOPT_AMX
#define ACTIVATION_OFFSET 0
#else
#define ACTIVATION_OFFSET 128
#endif

/* m rows of k floats -> this thread's buffer: m * k quantized bytes, then m float scales. */
static const uint8_t *quantize_rows(const float *x, int64_t m, int64_t k, const float **scales_out) {
    const size_t bytes = ((size_t)(m * k) + 63) / 64 * 64;
    uint8_t *q = thread_scratch(0, bytes + (size_t)m * sizeof(float));
    float *scales = (float *)(q + bytes);
    for (int64_t r = 0; r < m; r++) {
        const float *row = x + r * k;
        __m512 peak = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= k; i += 16)
            peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_loadu_ps(row + i)));
        float amax = _mm512_reduce_max_ps(peak);
        for (; i < k; i++)
            amax = fabsf(row[i]) > amax ? fabsf(row[i]) : amax;
        const float inverse = amax > 0 ? 127.0f / amax : 0.0f;
        scales[r] = amax / 127.0f;
        const __m512 scale = _mm512_set1_ps(inverse);
        const __m128i offset = _mm_set1_epi8((char)ACTIVATION_OFFSET);
        uint8_t *out = q + r * k;
        for (i = 0; i + 16 <= k; i += 16) {
            __m512i rounded = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + i), scale));
            _mm_storeu_si128((__m128i *)(out + i), _mm_add_epi8(_mm512_cvtsepi32_epi8(rounded), offset));
        }
        for (; i < k; i++)
            out[i] = (uint8_t)((int8_t)lrintf(row[i] * inverse) + ACTIVATION_OFFSET);
    }
    *scales_out = scales;
    return q;
}

/* y[0, 16) = (sums - offset * w_sums) * x_scale * w_scale over one panel's 16 columns */
static inline void scale_out(__m512i sums, float x_scale, const float *w_scale, const int32_t *w_sums, float *y) {
    if (ACTIVATION_OFFSET)
        sums = _mm512_sub_epi32(sums, _mm512_slli_epi32(_mm512_loadu_si512((const void *)w_sums), 7));
    __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(x_scale));
    _mm512_storeu_ps(y, _mm512_mul_ps(scaled, _mm512_loadu_ps(w_scale)));
}

#ifdef GRAPHOPT_AMX
/* NR row tiles (1-2) x NP panels (1-2) over the whole k, then the scales for `rows` rows. */
static inline __attribute__((always_inline)) void amx_block(const int NR, const int NP, const uint8_t *x,
        const int8_t *w, const float *x_scale, const float *w_scale, float *y, int64_t rows, int64_t k, int64_t n) {
    const int64_t quads = k / 4;
    int32_t sums[32][32];
    _tile_zero(0);
    if (NP > 1) _tile_zero(1);
    if (NR > 1) _tile_zero(2);
    if (NR > 1 && NP > 1) _tile_zero(3);
    for (int64_t c = 0; c < k / 64; c++) {
        _tile_loadd(4, x + c * 64, k);
        _tile_loadd(6, w + c * 16 * 64, 64);
        if (NP > 1) _tile_loadd(7, w + (quads + c * 16) * 64, 64);
        if (NR > 1) _tile_loadd(5, x + 16 * k + c * 64, k);
        _tile_dpbssd(0, 4, 6);
        if (NP > 1) _tile_dpbssd(1, 4, 7);
        if (NR > 1) _tile_dpbssd(2, 5, 6);
        if (NR > 1 && NP > 1) _tile_dpbssd(3, 5, 7);
    }
    _tile_stored(0, &sums[0][0], 128);
    if (NP > 1) _tile_stored(1, &sums[0][16], 128);
    if (NR > 1) _tile_stored(2, &sums[16][0], 128);
    if (NR > 1 && NP > 1) _tile_stored(3, &sums[16][16], 128);
    for (int64_t r = 0; r < rows; r++)
        for (int j = 0; j < NP; j++)
            scale_out(_mm512_loadu_si512((const void *)&sums[r][j * 16]), x_scale[r], w_scale + j * 16, 0,
                      y + r * n + j * 16);
}

static void dense_panels(const uint8_t *x, const float *x_scale, const int8_t *w, const float *w_scale,
                         const int32_t *w_sums, float *y, int64_t m, int64_t k, int64_t n,
                         int64_t panel0, int64_t panels) {
    const int64_t quads = k / 4, tail = m % 32, full = m - tail;
    (void)w_sums;
    for (int pass = 0; pass < 2; pass++) {          /* full 32-row blocks, then the tail's tile shape */
        int64_t row0 = pass ? full : 0, row_end = pass ? m : full;
        if (row0 >= row_end)
            continue;
        int64_t rows = pass ? tail : 32;
        configure_tiles(rows < 16 ? (int)rows : 16, rows > 16 ? (int)(rows - 16) : 0);
        for (int64_t p = panel0; p < panel0 + panels; p += 2) {
            const int8_t *wp = w + p * quads * 64;
            int two_panels = p + 1 < panel0 + panels;
            for (int64_t r = row0; r < row_end; r += 32) {
                const uint8_t *xr = x + r * k;
                float *yr = y + r * n + p * 16;
                const float *sx = x_scale + r, *sw = w_scale + p * 16;
                if (rows > 16) {
                    if (two_panels) amx_block(2, 2, xr, wp, sx, sw, yr, rows, k, n);
                    else amx_block(2, 1, xr, wp, sx, sw, yr, rows, k, n);
                } else {
                    if (two_panels) amx_block(1, 2, xr, wp, sx, sw, yr, rows, k, n);
                    else amx_block(1, 1, xr, wp, sx, sw, yr, rows, k, n);
                }
            }
        }
    }
    _tile_release();
}
#else
/* NR rows (1-4) x NP panels (1-4) of int32 accumulators in registers over the whole k. */
static inline __attribute__((always_inline)) void dot_block(const int NR, const int NP, const uint8_t *x,
        const int8_t *w, const float *x_scale, const float *w_scale, const int32_t *w_sums, float *y,
        int64_t k, int64_t n) {
    const int64_t quads = k / 4;
    __m512i acc[4][4];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < NP; j++)
            acc[i][j] = _mm512_setzero_si512();
    for (int64_t kq = 0; kq < quads; kq++) {
        __m512i panel[4];
        for (int j = 0; j < NP; j++)
            panel[j] = _mm512_loadu_si512((const void *)(w + (j * quads + kq) * 64));
        for (int i = 0; i < NR; i++) {
            int32_t quad;
            memcpy(&quad, x + i * k + 4 * kq, sizeof quad);
            __m512i xv = _mm512_set1_epi32(quad);
            for (int j = 0; j < NP; j++)
                acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv, panel[j]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < NP; j++)
            scale_out(acc[i][j], x_scale[i], w_scale + j * 16, w_sums + j * 16, y + i * n + j * 16);
}

#define DOT_ROWS(NP)                                                                \
    switch (nr) {                                                                   \
        case 4: dot_block(4, NP, xr, wp, sx, sw, ws, yr, k, n); break;             \
        case 3: dot_block(3, NP, xr, wp, sx, sw, ws, yr, k, n); break;             \
        case 2: dot_block(2, NP, xr, wp, sx, sw, ws, yr, k, n); break;             \
        default: dot_block(1, NP, xr, wp, sx, sw, ws, yr, k, n); break;            \
    }

static void dense_panels(const uint8_t *x, const float *x_scale, const int8_t *w, const float *w_scale,
                         const int32_t *w_sums, float *y, int64_t m, int64_t k, int64_t n,
                         int64_t panel0, int64_t panels) {
    const int64_t quads = k / 4;
    for (int64_t p = panel0; p < panel0 + panels; p += 4) {
        int np = panel0 + panels - p < 4 ? (int)(panel0 + panels - p) : 4;
        const int8_t *wp = w + p * quads * 64;
        const float *sw = w_scale + p * 16;
        const int32_t *ws = w_sums + p * 16;
        for (int64_t r = 0; r < m; r += 4) {
            int nr = m - r < 4 ? (int)(m - r) : 4;
            const uint8_t *xr = x + r * k;
            const float *sx = x_scale + r;
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

int32_t graphopt_dense_int8(const float *x, const int8_t *w, const float *w_scale, const int32_t *w_sums, float *y,
                            int64_t m, int64_t k, int64_t n, int64_t task, int64_t tasks) {
    int64_t panel0, panel_end;
    if (m <= 0 || !task_panels(n, task, tasks, &panel0, &panel_end))
        return 0;
    const float *x_scale;
    const uint8_t *q = quantize_rows(x, m, k, &x_scale);
    dense_panels(q, x_scale, w, w_scale, w_sums, y, m, k, n, panel0, panel_end - panel0);
    return 0;
}
