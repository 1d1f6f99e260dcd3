/* RMSNorm for the TVM backend, float32: y[r] = weight * (x[r] * rsqrt(mean(x[r]^2) + eps)) for
 * each of `rows` rows of `width` (a multiple of 16) contiguous floats, in torch's order of
 * operations (the sum of squares in 16 partial sums). TVM calls it once per task from a
 * parallel loop; a task takes a contiguous share of the rows. */
#include <math.h>
#include "vector.h"

int32_t graphopt_rms_norm(const float *x, const float *weight, float *y, int64_t rows, int64_t width, float eps,
                          int64_t task, int64_t tasks) {
    const int64_t first = rows * task / tasks, end = rows * (task + 1) / tasks;
    for (int64_t r = first; r < end; r++) {
        const float *row = x + r * width;
        vfloat squares = splat(0);
        for (int64_t c = 0; c < width; c += LANES) {
            const vfloat v = load(row + c);
            squares += v * v;
        }
        const float mean = hsum(squares) / (float)width;
        const float inverse = 1.0f / sqrtf(mean + eps);
        for (int64_t c = 0; c < width; c += LANES)
            store(y + r * width + c, load(weight + c) * (load(row + c) * inverse));
    }
    return 0;
}

/* The residual stream's add fused in: sum[r] = a[r] + b[r] (written out), y[r] = RMSNorm(sum[r]). */
int32_t graphopt_residual_rms_norm(const float *a, const float *b, const float *weight, float *sum, float *y,
                                   int64_t rows, int64_t width, float eps, int64_t task, int64_t tasks) {
    const int64_t first = rows * task / tasks, end = rows * (task + 1) / tasks;
    for (int64_t r = first; r < end; r++) {
        float *row = sum + r * width;
        vfloat squares = splat(0);
        for (int64_t c = 0; c < width; c += LANES) {
            const vfloat v = load(a + r * width + c) + load(b + r * width + c);
            store(row + c, v);
            squares += v * v;
        }
        const float inverse = 1.0f / sqrtf(hsum(squares) / (float)width + eps);
        for (int64_t c = 0; c < width; c += LANES)
            store(y + r * width + c, load(weight + c) * (load(row + c) * inverse));
    }
    return 0;
}
