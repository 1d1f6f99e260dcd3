/* Causal attention over a preallocated KV cache (graphopt.kv_attention), float32, for the TVM
 * backend's text-generation graphs. Two entry points, called one after the other (each from a
 * parallel loop over tasks):
 *   graphopt_kv_write:  this call's keys (rotated) and values into the cache, in place;
 *   graphopt_kv_attend: each query row (rotated) against its row's cache positions 0 .. its own.
 * q [batch, seq, heads * d], k and v [batch, seq, kv_heads * d], out like q. The key cache is
 * stored transposed, [batch, kv_heads, d, capacity] (one row of `capacity` floats per element of
 * d: what the score tiles read, so no transpose per call), the value cache [batch, kv_heads,
 * capacity, d]. seqlens_k[b] is row b's length minus one after this call, *total_length the
 * longest; a call is a prompt when seq == *total_length (every row starts at position 0), else
 * row b's tokens go to positions seqlens_k[b] + 1 - seq onwards. Rotary tables cos/sin
 * [positions, d / 2], rotate-half convention, read at min(position, positions - 1). Positions
 * outside the cache are not written (the runtime sizes the cache; the graph's reference,
 * graphopt.ir.kv_attention, raises). d a multiple of 16. */
#include "attention_tiles.h"

#define ROW_BLOCK 16

struct kv_call {
    const int32_t *seqlens_k, *total_length;
    const float *cos, *sin;
    int64_t batch, seq, heads, kv_heads, capacity, d, positions;
};

static int64_t row_start(const struct kv_call *c, int64_t b) {
    return c->seq == (int64_t)*c->total_length ? 0 : (int64_t)c->seqlens_k[b] + 1 - c->seq;
}

/* out = x rotated at `position` (cos/sin NULL: a copy) */
static void rotate_at(const struct kv_call *c, const float *x, int64_t position, float *out) {
    const int64_t half = c->d / 2;
    if (!c->cos) {
        memcpy(out, x, (size_t)c->d * 4);
        return;
    }
    const int64_t row = (position < c->positions ? position : c->positions - 1) * half;
    const float *cos = c->cos + row, *sin = c->sin + row;
    for (int64_t i = 0; i < half; i++) {
        out[i] = x[i] * cos[i] - x[i + half] * sin[i];
        out[i + half] = x[i + half] * cos[i] + x[i] * sin[i];
    }
}

int32_t graphopt_kv_write(const float *k, const float *v, float *key_cache, float *value_cache,
                          const int32_t *seqlens_k, const int32_t *total_length, const float *cos, const float *sin,
                          int64_t batch, int64_t seq, int64_t kv_heads, int64_t capacity, int64_t d,
                          int64_t rotary, int64_t positions, int64_t task, int64_t tasks) {
    const struct kv_call c = {seqlens_k, total_length, rotary ? cos : 0, rotary ? sin : 0, batch, seq, 0, kv_heads,
                              capacity, d, positions};
    const int64_t units = batch * kv_heads, first = units * task / tasks, end = units * (task + 1) / tasks;
    float *rotated = thread_scratch(2, (size_t)d * 4);
    for (int64_t unit = first; unit < end; unit++) {
        const int64_t b = unit / kv_heads, start = row_start(&c, b);
        float *keys = key_cache + unit * d * capacity, *values = value_cache + unit * capacity * d;
        for (int64_t s = 0; s < seq; s++) {
            const int64_t at = start + s, token = ((b * seq + s) * kv_heads + unit % kv_heads) * d;
            if (at < 0 || at >= capacity)
                continue;
            rotate_at(&c, k + token, at, rotated);
            for (int64_t i = 0; i < d; i++)
                keys[i * capacity + at] = rotated[i];
            memcpy(values + at * d, v + token, (size_t)d * 4);
        }
    }
    return 0;
}

/* Query rows [r0, r0 + rows) of (b, h). */
static void attend_rows(const struct kv_call *c, const float *q, const float *key_cache, const float *value_cache,
                        float *out, float scale, int64_t b, int64_t h, int64_t r0) {
    const int64_t d = c->d, capacity = c->capacity, g = h / (c->heads / c->kv_heads);
    const int64_t rows = c->seq - r0 < ROW_BLOCK ? c->seq - r0 : ROW_BLOCK, start = row_start(c, b);
    const int64_t stride = (capacity + LANES - 1) / LANES * LANES;
    float *rotated = thread_scratch(2, (size_t)(ROW_BLOCK * d) * 4);
    int64_t ends[ROW_BLOCK], width = 0;
    for (int64_t i = 0; i < rows; i++) {
        const int64_t at = start + r0 + i;
        ends[i] = at + 1 < 0 ? 0 : at + 1 > capacity ? capacity : at + 1;
        width = ends[i] > width ? ends[i] : width;
        rotate_at(c, q + ((b * c->seq + r0 + i) * c->heads + h) * d, at, rotated + i * d);
    }
    float *result = thread_scratch(3, (size_t)(ROW_BLOCK * d) * 4);
    if (width == 0) {
        memset(result, 0, (size_t)(rows * d) * 4);
    } else {
        const float *keys = key_cache + (b * c->kv_heads + g) * d * capacity;
        const float *values = value_cache + (b * c->kv_heads + g) * capacity * d;
        float *scores = thread_scratch(1, (size_t)(ROW_BLOCK * stride) * 4);
        const int64_t whole = (width + LANES - 1) / LANES * LANES, full = whole < capacity / LANES * LANES
                              ? whole : capacity / LANES * LANES;
        row_scores(rotated, keys, scores, rows, full, capacity, stride, d);
        for (int64_t i = 0; i < rows; i++)          /* the last keys of a cache not a multiple of 16 */
            for (int64_t j = full; j < ends[i]; j++) {
                float sum = 0;
                for (int64_t e = 0; e < d; e++)
                    sum += rotated[i * d + e] * keys[e * capacity + j];
                scores[i * stride + j] = sum;
            }
        const struct attention a = {.lk = capacity, .scale = scale};
        float inverse[ROW_BLOCK];
        for (int64_t i = 0; i < rows; i++) {
            const float sum = row_softmax(&a, scores + i * stride, 0, ends[i], whole);
            inverse[i] = sum > 0 ? 1.0f / sum : 0.0f;
        }
        weighted_values(scores, values, result, inverse, rows, whole < capacity ? whole : capacity, stride, d);
    }
    for (int64_t i = 0; i < rows; i++)
        memcpy(out + ((b * c->seq + r0 + i) * c->heads + h) * d, result + i * d, (size_t)d * 4);
}

int32_t graphopt_kv_attend(const float *q, const float *key_cache, const float *value_cache,
                           const int32_t *seqlens_k, const int32_t *total_length, const float *cos, const float *sin,
                           float *out, int64_t batch, int64_t seq, int64_t heads, int64_t kv_heads, int64_t capacity,
                           int64_t d, float scale, int64_t rotary, int64_t positions, int64_t task, int64_t tasks) {
    const struct kv_call c = {seqlens_k, total_length, rotary ? cos : 0, rotary ? sin : 0, batch, seq, heads,
                              kv_heads, capacity, d, positions};
    const int64_t blocks = (seq + ROW_BLOCK - 1) / ROW_BLOCK, units = batch * heads * blocks;
    const int64_t first = units * task / tasks, end = units * (task + 1) / tasks;
    for (int64_t unit = first; unit < end; unit++) {
        const int64_t bh = unit / blocks;
        attend_rows(&c, q, key_cache, value_cache, out, scale, bh / heads, bh % heads, unit % blocks * ROW_BLOCK);
    }
    return 0;
}
