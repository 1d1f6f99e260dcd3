/* The pieces of graphopt's float32 attention kernels (attention.c, kv_attention.c): rotary
 * embedding, score tiles of query rows against transposed keys, the softmax of a row and the
 * probability-weighted sum of values. GCC vector extensions (vector.h). */
#ifndef GRAPHOPT_KERNELS_ATTENTION_TILES_H
#define GRAPHOPT_KERNELS_ATTENTION_TILES_H
#include "common.h"
#include "vector.h"

/* Registers per row of a 4-row score or value tile: 16 accumulators of AVX-512's 32 registers,
 * 8 of AVX2's 16 (more spill). */
#ifdef __AVX512F__
#define TILE_VECTORS 4
#else
#define TILE_VECTORS 2
#endif

struct attention {
    const float *q, *k, *v;
    const void *mask;
    float *out;
    int64_t batch, heads, kv_heads, lq, lk, d, dv, mask_kind, causal;
    int64_t mask_stride[4];
    float scale;
    const float *cos, *sin;      /* rotary tables [*, lq, d] (NULL: q and k arrive rotated) */
    int64_t rotary_batch_stride;
};

/* out[c] = x[c] cos[c] + rotate_half(x)[c] sin[c], rotate_half(x) = (-x[d/2:], x[:d/2]) */
static void rotate(const float *x, const float *cos, const float *sin, float *out, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t c = 0; c < half; c++)
        out[c] = x[c] * cos[c] - x[c + half] * sin[c];
    for (int64_t c = half; c < d; c++)
        out[c] = x[c] * cos[c] + x[c - half] * sin[c];
}

/* scores[0, NR)[j, j + NK * NATIVE_LANES) = q rows . kt columns: NR x NK registers accumulated over d */
static inline __attribute__((always_inline)) void score_tile(const int NR, const int NK, const float *q,
        const float *kt, float *scores, int64_t j, int64_t kt_stride, int64_t s_stride, int64_t d) {
    vnative acc[4][4];
    for (int i = 0; i < NR; i++)
        for (int c = 0; c < NK; c++) acc[i][c] = native_splat(0);
    for (int64_t c = 0; c < d; c++) {
        vnative keys[4];
        for (int n = 0; n < NK; n++) keys[n] = native_load(kt + c * kt_stride + j + n * NATIVE_LANES);
        for (int i = 0; i < NR; i++) {
            const vnative qv = native_splat(q[i * d + c]);
            for (int n = 0; n < NK; n++) acc[i][n] += qv * keys[n];
        }
    }
    for (int i = 0; i < NR; i++)
        for (int n = 0; n < NK; n++) native_store(scores + i * s_stride + j + n * NATIVE_LANES, acc[i][n]);
}

#define SCORE_TILE(NR)                                                                                   \
    for (int64_t j = 0; j < width; j += TILE_VECTORS * NATIVE_LANES) {                                   \
        const float *qr = q + r * d;                                                                     \
        float *sr = scores + r * s_stride;                                                               \
        const int64_t left = (width - j) / NATIVE_LANES;                                                 \
        switch (left < TILE_VECTORS ? left : TILE_VECTORS) {                                             \
            case 1: score_tile(NR, 1, qr, kt, sr, j, kt_stride, s_stride, d); break;                     \
            case 2: score_tile(NR, 2, qr, kt, sr, j, kt_stride, s_stride, d); break;                     \
            case 3: score_tile(NR, 3, qr, kt, sr, j, kt_stride, s_stride, d); break;                     \
            default: score_tile(NR, 4, qr, kt, sr, j, kt_stride, s_stride, d); break;                    \
        }                                                                                                \
    }

/* scores[r][0, width) = q rows [0, rows) . kt columns (width a multiple of 16); kt rows (one per
 * element of d) `kt_stride` floats apart, score rows `s_stride` */
static void row_scores(const float *q, const float *kt, float *scores, int64_t rows, int64_t width,
                       int64_t kt_stride, int64_t s_stride, int64_t d) {
    for (int64_t r = 0; r < rows; r += 4) {
        switch (rows - r < 4 ? rows - r : 4) {
            case 1: SCORE_TILE(1); break;
            case 2: SCORE_TILE(2); break;
            case 3: SCORE_TILE(3); break;
            default: SCORE_TILE(4); break;
        }
    }
}

/* One row's scores -> unnormalized probabilities in place; returns their sum (0: no key attended). */
static float row_softmax(const struct attention *a, float *s, const char *mask_row, int64_t end, int64_t width) {
    if (end == 0) {
        memset(s, 0, (size_t)width * 4);
        return 0;
    }
    const float neg_inf = -INFINITY;
    const int64_t column = a->mask_stride[3];
    const vint lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    vfloat peak = splat(neg_inf);
    for (int64_t j = 0; j < width; j += LANES) {
        vfloat x = load(s + j) * a->scale;
        const int whole = j + LANES <= a->lk && column == 1;   /* else lanes past the mask's row: one at a time */
        if (a->mask_kind == 1 && whole) {
            vbyte bytes;
            memcpy(&bytes, (const uint8_t *)mask_row + j, sizeof bytes);
            x = vselect(__builtin_convertvector(bytes, vint) != 0, x, splat(neg_inf));
        } else if (a->mask_kind == 2 && whole) {
            x += load((const float *)mask_row + j);
        } else if (a->mask_kind) {
            for (int i = 0; i < LANES && j + i < end; i++) {
                if (a->mask_kind == 1 && !((const uint8_t *)mask_row)[(j + i) * column]) x[i] = neg_inf;
                else if (a->mask_kind == 2) x[i] += ((const float *)mask_row)[(j + i) * column];
            }
        }
        x = vselect(lane + (int32_t)j < (int32_t)end, x, splat(neg_inf));
        store(s + j, x);
        peak = vselect(x > peak, x, peak);
    }
    const float top = hmax(peak);
    if (top == neg_inf) {
        memset(s, 0, (size_t)width * 4);
        return 0;
    }
    vfloat total = splat(0);
    for (int64_t j = 0; j < width; j += LANES) {
        vfloat p = vexp(load(s + j) - top);
        store(s + j, p);
        total += p;
    }
    return hsum(total);
}

/* out[0, NR)[col, col + NV * NATIVE_LANES) = p rows @ v columns, times the rows' inverse sums */
static inline __attribute__((always_inline)) void value_tile(const int NR, const int NV, const float *p,
        const float *v, float *out, const float *inverse, int64_t keys, int64_t stride, int64_t dv, int64_t col) {
    vnative acc[4][4];
    for (int i = 0; i < NR; i++)
        for (int c = 0; c < NV; c++) acc[i][c] = native_splat(0);
    for (int64_t j = 0; j < keys; j++) {
        vnative values[4];
        for (int c = 0; c < NV; c++) values[c] = native_load(v + j * dv + col + c * NATIVE_LANES);
        for (int i = 0; i < NR; i++) {
            const vnative pv = native_splat(p[i * stride + j]);
            for (int c = 0; c < NV; c++) acc[i][c] += pv * values[c];
        }
    }
    for (int i = 0; i < NR; i++)
        for (int c = 0; c < NV; c++) native_store(out + i * dv + col + c * NATIVE_LANES, acc[i][c] * inverse[i]);
}

#define VALUE_TILE(NR)                                                                                       \
    for (int64_t col = 0; col < dv; col += TILE_VECTORS * NATIVE_LANES) {                                    \
        const float *pr = p + r * stride;                                                                    \
        float *o = out + r * dv;                                                                             \
        const int64_t left = (dv - col) / NATIVE_LANES;                                                      \
        switch (left < TILE_VECTORS ? left : TILE_VECTORS) {                                                 \
            case 1: value_tile(NR, 1, pr, v, o, inverse + r, keys, stride, dv, col); break;                  \
            case 2: value_tile(NR, 2, pr, v, o, inverse + r, keys, stride, dv, col); break;                  \
            case 3: value_tile(NR, 3, pr, v, o, inverse + r, keys, stride, dv, col); break;                  \
            default: value_tile(NR, 4, pr, v, o, inverse + r, keys, stride, dv, col); break;                 \
        }                                                                                                    \
    }

/* out rows [0, rows) = p rows @ v[0, keys) / sums (dv a multiple of 16) */
static void weighted_values(const float *p, const float *v, float *out, const float *inverse, int64_t rows,
                            int64_t keys, int64_t stride, int64_t dv) {
    for (int64_t r = 0; r < rows; r += 4) {
        switch (rows - r < 4 ? rows - r : 4) {
            case 1: VALUE_TILE(1); break;
            case 2: VALUE_TILE(2); break;
            case 3: VALUE_TILE(3); break;
            default: VALUE_TILE(4); break;
        }
    }
}

#endif
