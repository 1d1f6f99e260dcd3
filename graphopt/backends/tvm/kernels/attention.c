/* Scaled dot-product attention for the TVM backend, float32 throughout:
 *   out[b, h] = softmax(q[b, h] @ k[b, g]^T * scale + mask) @ v[b, g],   g = h / (heads / kv_heads)
 * q [batch, heads, lq, d], k [batch, kv_heads, lk, d], v [batch, kv_heads, lk, dv], out [batch,
 * heads, lq, dv], all contiguous; d and dv multiples of 16. The mask (optional) is bool (true =
 * attend) or float (added), read through element strides per (batch, head, row, column), 0 where
 * it broadcasts; `causal` keeps key j <= query row i (torch's is_causal: top-left aligned).
 * A row with no key left gives zeros, as torch does. With rotary tables cos/sin [*, l, d], q and k
 * arrive unrotated and are rotated (rotate-half convention) as they are read.
 *
 * Keys past a row's last attended one are never multiplied (a causal prefill does half the
 * products). TVM calls the function once per task from a parallel loop; a task takes a
 * contiguous share of the (batch, head, 16-row block) units, heads outermost, so the threads
 * get the same mix of short and long rows and consecutive units reuse one transposed K.
 * Written with GCC vector extensions: compiled with the host's flags it is AVX-512 or AVX2. */
#include "attention_tiles.h"

#define ROW_BLOCK 16

/* Number of keys row i attends at most (one past its last attended key). */
static int64_t row_end(const struct attention *a, const char *mask_bh, int64_t i) {
    int64_t end = a->causal ? (i + 1 < a->lk ? i + 1 : a->lk) : a->lk;
    if (a->mask_kind == 1) {
        const uint8_t *row = (const uint8_t *)mask_bh + i * a->mask_stride[2];
        if (a->mask_stride[3] == 0)
            return row[0] ? end : 0;
        if (a->mask_stride[3] == 1) {
            uint64_t word;          /* eight masked-out keys at a time (a causal mask's tail) */
            while (end >= 8 && (memcpy(&word, row + end - 8, 8), word == 0))
                end -= 8;
        }
        while (end > 0 && !row[(end - 1) * a->mask_stride[3]])
            end--;
    }
    return end;
}

/* K of (b, g) keys [0, keys) transposed into kt [d][stride] (stride = keys rounded up to 16, zeros
 * after), rotated first when the tables are given (`rotated`: a row's scratch). */
static void transpose_keys(const struct attention *a, int64_t b, const float *k, float *kt, int64_t keys,
                           int64_t stride, float *rotated) {
    const int64_t d = a->d;
    if (a->cos) {
        const float *cos = a->cos + b * a->rotary_batch_stride, *sin = a->sin + b * a->rotary_batch_stride;
        for (int64_t j = 0; j < keys; j++) {
            rotate(k + j * d, cos + j * d, sin + j * d, rotated, d);
            for (int64_t c = 0; c < d; c++)
                kt[c * stride + j] = rotated[c];
        }
    } else {
        for (int64_t c = 0; c < d; c++)
            for (int64_t j = 0; j < keys; j++)
                kt[c * stride + j] = k[j * d + c];
    }
    for (int64_t c = 0; c < d; c++)
        for (int64_t j = keys; j < stride; j++)
            kt[c * stride + j] = 0;
}

static void attend_block(const struct attention *a, int64_t b, int64_t h, int64_t r0, float *kt,
                         int64_t *kt_owner) {
    const int64_t group = a->heads / a->kv_heads, g = h / group;
    const int64_t rows = a->lq - r0 < ROW_BLOCK ? a->lq - r0 : ROW_BLOCK;
    const char *mask_bh = a->mask ? (const char *)a->mask + (b * a->mask_stride[0] + h * a->mask_stride[1]) *
                                        (a->mask_kind == 1 ? 1 : 4) : 0;
    const int64_t element = a->mask_kind == 1 ? 1 : 4;
    int64_t ends[ROW_BLOCK], width = 0;
    for (int64_t i = 0; i < rows; i++) {
        ends[i] = row_end(a, mask_bh, r0 + i);
        width = ends[i] > width ? ends[i] : width;
    }
    float *out = a->out + ((b * a->heads + h) * a->lq + r0) * a->dv;
    if (width == 0) {
        memset(out, 0, (size_t)(rows * a->dv) * 4);
        return;
    }
    const int64_t stride = (a->lk + LANES - 1) / LANES * LANES;
    width = (width + LANES - 1) / LANES * LANES;
    const int64_t owner = b * a->kv_heads + g;
    float *rotated = thread_scratch(2, (size_t)(ROW_BLOCK * a->d) * 4);
    if (*kt_owner != owner) {          /* every key at once: the next row blocks read more of them */
        transpose_keys(a, b, a->k + owner * a->lk * a->d, kt, a->lk, stride, rotated);
        *kt_owner = owner;
    }
    const float *q = a->q + ((b * a->heads + h) * a->lq + r0) * a->d;
    if (a->cos) {
        const int64_t at = b * a->rotary_batch_stride + r0 * a->d;
        for (int64_t i = 0; i < rows; i++)
            rotate(q + i * a->d, a->cos + at + i * a->d, a->sin + at + i * a->d, rotated + i * a->d, a->d);
        q = rotated;
    }
    float *scores = thread_scratch(1, (size_t)(ROW_BLOCK * stride) * 4);
    row_scores(q, kt, scores, rows, width, stride, stride, a->d);
    float inverse[ROW_BLOCK];
    for (int64_t i = 0; i < rows; i++) {
        const char *mask_row = mask_bh ? mask_bh + (r0 + i) * a->mask_stride[2] * element : 0;
        const float sum = row_softmax(a, scores + i * stride, mask_row, ends[i], width);
        inverse[i] = sum > 0 ? 1.0f / sum : 0.0f;
    }
    const int64_t keys = width < a->lk ? width : a->lk;
    weighted_values(scores, a->v + owner * a->lk * a->dv, out, inverse, rows, keys, stride, a->dv);
}

/* mask_kind: 0 none, 1 bool (uint8), 2 float32; mask strides in elements. With `rotary`, cos/sin
 * are rotary tables [batch or 1, lq, d] applied to q and k first (lq == lk), batch stride 0 when shared. */
int32_t graphopt_attention(const float *q, const float *k, const float *v, const void *mask, float *out,
                           int64_t batch, int64_t heads, int64_t kv_heads, int64_t lq, int64_t lk, int64_t d,
                           int64_t dv, int64_t mask_kind, int64_t mask_stride_b, int64_t mask_stride_h,
                           int64_t mask_stride_r, int64_t mask_stride_c, int64_t causal, float scale,
                           const float *cos, const float *sin, int64_t rotary, int64_t rotary_batch_stride,
                           int64_t task, int64_t tasks) {
    const struct attention a = {q, k, v, mask_kind ? mask : 0, out, batch, heads, kv_heads, lq, lk, d, dv,
                                mask_kind, causal, {mask_stride_b, mask_stride_h, mask_stride_r, mask_stride_c},
                                scale, rotary ? cos : 0, rotary ? sin : 0, rotary_batch_stride};
    const int64_t blocks = (lq + ROW_BLOCK - 1) / ROW_BLOCK, units = batch * heads * blocks;
    const int64_t first = units * task / tasks, end = units * (task + 1) / tasks;
    if (first >= end || lk <= 0)
        return 0;
    const int64_t stride = (lk + LANES - 1) / LANES * LANES;
    float *kt = thread_scratch(0, (size_t)(d * stride) * 4);
    int64_t kt_owner = -1;
    for (int64_t unit = first; unit < end; unit++) {
        const int64_t bh = unit / blocks;
        attend_block(&a, bh / heads, bh % heads, unit % blocks * ROW_BLOCK, kt, &kt_owner);
    }
    return 0;
}
