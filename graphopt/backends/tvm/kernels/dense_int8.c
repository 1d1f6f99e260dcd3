/* int8 dense kernels for the TVM backend:
 *   Y[m, n] = (Xq @ Wq^T)[m, n] * x_scale[m] * w_scale[n] + X[m, C] @ Wo[C, n]
 *
 * Wq: int8 weights of W * s (s per input channel, 0 at the outlier channels C), symmetric per
 * output column (w_scale), stored in panels [n / 16, k / 4, 64] (a panel's 16 columns x 4
 * consecutive k per 32-bit group: the layout AMX's tdpbssd and AVX512-VNNI's vpdpbusd read);
 * w_sums[n] = sum over k of Wq. Xq: each row of X / s (x_smoothing = 1 / s, 0 at C) quantized
 * when the matmul runs (dynamic, symmetric per row: x_scale = max |x / s| / 127, nearest even).
 * Products and sums are exact int32; the scales apply once per output. The `outliers` channels C
 * (outlier_channels) are multiplied in fp32 by their weights Wo, panels [n / 16, outliers, 16].
 *
 * Tasks as in dense_bf16.c: every row x a share of the panels. Three instruction sets, one
 * result: GRAPHOPT_AMX selects AMX-INT8 tiles (signed x signed); GRAPHOPT_AVX2 widens both
 * operands to int16 and multiplies pairs with vpmaddwd (no VNNI: AVX2's byte product vpmaddubsw
 * saturates at 8 bits each); otherwise vpdpbusd, which multiplies unsigned by signed bytes: X is
 * shifted by +128 and 128 * w_sums subtracted from the sums. */
#include "common.h"
#include "vector.h"

#ifdef GRAPHOPT_AVX2
typedef int16_t quantized_t;
#else
typedef uint8_t quantized_t;
#endif
typedef quantized_t vquantized __attribute__((vector_size(LANES * sizeof(quantized_t))));

#if defined(GRAPHOPT_AMX) || defined(GRAPHOPT_AVX2)
#define ACTIVATION_OFFSET 0
#else
#define ACTIVATION_OFFSET 128
#endif

/* The activations as the panels meet them: each row's quantized values, its scale, and its
 * values at the outlier channels. */
struct quantized_rows {
    const quantized_t *q;       /* [m, k], + ACTIVATION_OFFSET */
    const float *scale;         /* [m] */
    const float *outliers;      /* [m, count] */
    const float *outlier_weights;   /* [n / 16, count, 16] */
    int64_t count;
};

/* x rounded to the nearest integer, ties to even (|x| < 2^22) */
static inline vfloat round_even(vfloat x) { return (x + 12582912.0f) - 12582912.0f; }

/* m rows of k floats (x k) times x_smoothing -> this thread's buffer: m * k quantized values, m
 * float scales, then the rows' m * outliers values at outlier_channels. */
static struct quantized_rows quantize_rows(const float *x, const float *x_smoothing, const int32_t *outlier_channels,
                                           int64_t outliers, int64_t m, int64_t k) {
    const size_t bytes = ((size_t)(m * k) * sizeof(quantized_t) + 63) / 64 * 64;
    quantized_t *q = thread_scratch(0, bytes + (size_t)(m + m * outliers) * sizeof(float));
    float *scales = (float *)((char *)q + bytes), *kept = scales + m;
    for (int64_t r = 0; r < m; r++) {
        const float *row = x + r * k;
        vfloat peak = splat(0.0f);
        int64_t i = 0;
        for (; i + LANES <= k; i += LANES) {
            vfloat magnitude = (vfloat)((vint)(load(row + i) * load(x_smoothing + i)) & 0x7fffffff);
            peak = vselect(magnitude > peak, magnitude, peak);
        }
        float amax = hmax(peak);
        for (; i < k; i++)
            amax = fabsf(row[i] * x_smoothing[i]) > amax ? fabsf(row[i] * x_smoothing[i]) : amax;
        const float inverse = amax > 0 ? 127.0f / amax : 0.0f;
        scales[r] = amax / 127.0f;
        quantized_t *out = q + r * k;
        for (i = 0; i + LANES <= k; i += LANES) {
            vint rounded = __builtin_convertvector(round_even(load(row + i) * load(x_smoothing + i) * inverse), vint);
            vquantized values = __builtin_convertvector(rounded + ACTIVATION_OFFSET, vquantized);
            memcpy(out + i, &values, sizeof values);
        }
        for (; i < k; i++)
            out[i] = (quantized_t)((int8_t)lrintf(row[i] * x_smoothing[i] * inverse) + ACTIVATION_OFFSET);
        for (int64_t j = 0; j < outliers; j++)
            kept[r * outliers + j] = row[outlier_channels[j]];
    }
    return (struct quantized_rows){q, scales, kept, NULL, outliers};
}

#ifdef GRAPHOPT_AVX2
/* y[0, 8) = sums * x_scale * w_scale + the outlier channels' products, over columns [8 half,
 * 8 half + 8) of panel `panel` for row `row` */
static inline void scale_out(__m256i sums, const struct quantized_rows *x, int64_t row, int64_t panel, int half,
                             const float *w_scale, float *y) {
    __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(x->scale[row]));
    scaled = _mm256_mul_ps(scaled, _mm256_loadu_ps(w_scale));
    const float *kept = x->outliers + row * x->count, *wo = x->outlier_weights + panel * x->count * 16 + half * 8;
    for (int64_t j = 0; j < x->count; j++)
        scaled = _mm256_fmadd_ps(_mm256_set1_ps(kept[j]), _mm256_loadu_ps(wo + j * 16), scaled);
    _mm256_storeu_ps(y, scaled);
}

/* NR rows (1-4) from row r x 8 columns (half `half` of panel p, whose weights start at w) of
 * int32 accumulators over the whole k. A panel row's 16 bytes (4 columns x 4 k) widen to int16;
 * vpmaddwd meets them with the row's 4 values and leaves two sums per column, added at the end.
 * Named accumulators of a GCC vector type, not an array of __m256i: GCC keeps those in registers
 * and adds in place (measured: docs/measurements/decisions.md). */
typedef int32_t v8si __attribute__((vector_size(32)));
#define ACCUMULATE(i)                                                                         \
    if (NR > i) {                                                                             \
        int64_t four;                                                                         \
        memcpy(&four, xr + i * k + 4 * kq, sizeof four);                                      \
        const __m256i xv = _mm256_set1_epi64x(four);                                          \
        low##i += (v8si)_mm256_madd_epi16(xv, w0);                                            \
        high##i += (v8si)_mm256_madd_epi16(xv, w1);                                           \
    }
#define STORE(i)                                                                              \
    if (NR > i)                                                                               \
        scale_out(_mm256_permute4x64_epi64(_mm256_hadd_epi32((__m256i)low##i, (__m256i)high##i), 0xD8), \
                  x, r + i, p, half, w_scale + half * 8, y + (r + i) * n + half * 8);

static inline __attribute__((always_inline)) void dot_block(const int NR, const struct quantized_rows *x,
        int64_t r, int64_t p, int half, const int8_t *w, const float *w_scale, float *y, int64_t k, int64_t n) {
    const int64_t quads = k / 4;
    const int16_t *xr = x->q + r * k;
    const int8_t *wh = w + half * 32;
    v8si low0 = {0}, low1 = low0, low2 = low0, low3 = low0;
    v8si high0 = low0, high1 = low0, high2 = low0, high3 = low0;
    for (int64_t kq = 0; kq < quads; kq++) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wh + kq * 64)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wh + kq * 64 + 16)));
        ACCUMULATE(0) ACCUMULATE(1) ACCUMULATE(2) ACCUMULATE(3)
    }
    /* [c0 c0' c1 c1' ...]: each column's two sums added; 64-bit lanes back in column order */
    STORE(0) STORE(1) STORE(2) STORE(3)
}

static void dense_panels(const struct quantized_rows *x, const int8_t *w, const float *w_scale,
                         const int32_t *w_sums, float *y, int64_t m, int64_t k, int64_t n,
                         int64_t panel0, int64_t panels) {
    const int64_t quads = k / 4;
    (void)w_sums;
    for (int64_t p = panel0; p < panel0 + panels; p++) {
        const int8_t *wp = w + p * quads * 64;
        const float *sw = w_scale + p * 16;
        float *yp = y + p * 16;
        for (int half = 0; half < 2; half++)
            for (int64_t r = 0; r < m; r += 4) {
                switch (m - r < 4 ? (int)(m - r) : 4) {
                    case 4: dot_block(4, x, r, p, half, wp, sw, yp, k, n); break;
                    case 3: dot_block(3, x, r, p, half, wp, sw, yp, k, n); break;
                    case 2: dot_block(2, x, r, p, half, wp, sw, yp, k, n); break;
                    default: dot_block(1, x, r, p, half, wp, sw, yp, k, n); break;
                }
            }
    }
}
#else
/* y[0, 16) = (sums - offset * w_sums) * x_scale * w_scale + the outlier channels' products, over
 * one panel's 16 columns (`panel`) for row `row` */
static inline void scale_out(__m512i sums, const struct quantized_rows *x, int64_t row, int64_t panel,
                             const float *w_scale, const int32_t *w_sums, float *y) {
    if (ACTIVATION_OFFSET)
        sums = _mm512_sub_epi32(sums, _mm512_slli_epi32(_mm512_loadu_si512((const void *)w_sums), 7));
    __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(x->scale[row]));
    scaled = _mm512_mul_ps(scaled, _mm512_loadu_ps(w_scale));
    const float *kept = x->outliers + row * x->count, *wo = x->outlier_weights + panel * x->count * 16;
    for (int64_t j = 0; j < x->count; j++)
        scaled = _mm512_fmadd_ps(_mm512_set1_ps(kept[j]), _mm512_loadu_ps(wo + j * 16), scaled);
    _mm512_storeu_ps(y, scaled);
}

#ifdef GRAPHOPT_AMX
/* NR row tiles (1-2) x NP panels (1-2) from panel p over the whole k, then the scales for `rows`
 * rows from row r. */
static inline __attribute__((always_inline)) void amx_block(const int NR, const int NP, const struct quantized_rows *x,
        int64_t r, int64_t p, const int8_t *w, const float *w_scale, float *y, int64_t rows, int64_t k, int64_t n) {
    const int64_t quads = k / 4;
    const uint8_t *xr = x->q + r * k;
    int32_t sums[32][32];
    _tile_zero(0);
    if (NP > 1) _tile_zero(1);
    if (NR > 1) _tile_zero(2);
    if (NR > 1 && NP > 1) _tile_zero(3);
    for (int64_t c = 0; c < k / 64; c++) {
        _tile_loadd(4, xr + c * 64, k);
        _tile_loadd(6, w + c * 16 * 64, 64);
        if (NP > 1) _tile_loadd(7, w + (quads + c * 16) * 64, 64);
        if (NR > 1) _tile_loadd(5, xr + 16 * k + c * 64, k);
        _tile_dpbssd(0, 4, 6);
        if (NP > 1) _tile_dpbssd(1, 4, 7);
        if (NR > 1) _tile_dpbssd(2, 5, 6);
        if (NR > 1 && NP > 1) _tile_dpbssd(3, 5, 7);
    }
    _tile_stored(0, &sums[0][0], 128);
    if (NP > 1) _tile_stored(1, &sums[0][16], 128);
    if (NR > 1) _tile_stored(2, &sums[16][0], 128);
    if (NR > 1 && NP > 1) _tile_stored(3, &sums[16][16], 128);
    for (int64_t i = 0; i < rows; i++)
        for (int j = 0; j < NP; j++)
            scale_out(_mm512_loadu_si512((const void *)&sums[i][j * 16]), x, r + i, p + j, w_scale + j * 16, 0,
                      y + (r + i) * n + j * 16);
}

static void dense_panels(const struct quantized_rows *x, const int8_t *w, const float *w_scale,
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
            const float *sw = w_scale + p * 16;
            float *yp = y + p * 16;
            int two_panels = p + 1 < panel0 + panels;
            for (int64_t r = row0; r < row_end; r += 32) {
                if (rows > 16) {
                    if (two_panels) amx_block(2, 2, x, r, p, wp, sw, yp, rows, k, n);
                    else amx_block(2, 1, x, r, p, wp, sw, yp, rows, k, n);
                } else {
                    if (two_panels) amx_block(1, 2, x, r, p, wp, sw, yp, rows, k, n);
                    else amx_block(1, 1, x, r, p, wp, sw, yp, rows, k, n);
                }
            }
        }
    }
    _tile_release();
}
#else
/* NR rows (1-4) from row r x NP panels (1-4) from panel p of int32 accumulators in registers
 * over the whole k. */
static inline __attribute__((always_inline)) void dot_block(const int NR, const int NP, const struct quantized_rows *x,
        int64_t r, int64_t p, const int8_t *w, const float *w_scale, const int32_t *w_sums, float *y,
        int64_t k, int64_t n) {
    const int64_t quads = k / 4;
    const uint8_t *xr = x->q + r * k;
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
            memcpy(&quad, xr + i * k + 4 * kq, sizeof quad);
            __m512i xv = _mm512_set1_epi32(quad);
            for (int j = 0; j < NP; j++)
                acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv, panel[j]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < NP; j++)
            scale_out(acc[i][j], x, r + i, p + j, w_scale + j * 16, w_sums + j * 16, y + (r + i) * n + j * 16);
}

#define DOT_ROWS(NP)                                                                \
    switch (nr) {                                                                   \
        case 4: dot_block(4, NP, x, r, p, wp, sw, ws, yp, k, n); break;            \
        case 3: dot_block(3, NP, x, r, p, wp, sw, ws, yp, k, n); break;            \
        case 2: dot_block(2, NP, x, r, p, wp, sw, ws, yp, k, n); break;            \
        default: dot_block(1, NP, x, r, p, wp, sw, ws, yp, k, n); break;           \
    }

static void dense_panels(const struct quantized_rows *x, const int8_t *w, const float *w_scale,
                         const int32_t *w_sums, float *y, int64_t m, int64_t k, int64_t n,
                         int64_t panel0, int64_t panels) {
    const int64_t quads = k / 4;
    for (int64_t p = panel0; p < panel0 + panels; p += 4) {
        int np = panel0 + panels - p < 4 ? (int)(panel0 + panels - p) : 4;
        const int8_t *wp = w + p * quads * 64;
        const float *sw = w_scale + p * 16;
        const int32_t *ws = w_sums + p * 16;
        float *yp = y + p * 16;
        for (int64_t r = 0; r < m; r += 4) {
            int nr = m - r < 4 ? (int)(m - r) : 4;
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

#endif
/* x_smoothing [k]; outlier_channels [outliers] and outlier_weights [n / 16, outliers, 16] are
 * read only when outliers > 0. */
int32_t graphopt_dense_int8(const float *x, const int8_t *w, const float *w_scale, const int32_t *w_sums,
                            const float *x_smoothing, const int32_t *outlier_channels, const float *outlier_weights,
                            float *y, int64_t m, int64_t k, int64_t n, int64_t outliers, int64_t task, int64_t tasks) {
    int64_t panel0, panel_end;
    if (m <= 0 || !task_panels(n, task, tasks, &panel0, &panel_end))
        return 0;
    struct quantized_rows rows = quantize_rows(x, x_smoothing, outlier_channels, outliers, m, k);
    rows.outlier_weights = outlier_weights;
    dense_panels(&rows, w, w_scale, w_sums, y, m, k, n, panel0, panel_end - panel0);
    return 0;
}
