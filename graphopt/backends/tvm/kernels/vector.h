/* float32 vectors for graphopt's C kernels, written with GCC vector extensions: 16 lanes, one
 * AVX-512 register or two AVX2 ones, whichever the flags the kernel is built with give. */
#ifndef GRAPHOPT_KERNELS_VECTOR_H
#define GRAPHOPT_KERNELS_VECTOR_H
#include <stdint.h>
#include <string.h>

#define LANES 16
typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef int32_t vint __attribute__((vector_size(LANES * 4)));
typedef uint8_t vbyte __attribute__((vector_size(LANES)));

static inline vfloat splat(float value) { return (vfloat){0} + value; }

/* One register's float32 lanes, for loops that keep many accumulators: GCC moves a vfloat
 * wider than the registers through memory when it lives in an array. */
#ifdef __AVX512F__
#define NATIVE_LANES 16
#else
#define NATIVE_LANES 8
#endif
typedef float vnative __attribute__((vector_size(NATIVE_LANES * 4)));

static inline vnative native_splat(float value) { return (vnative){0} + value; }

static inline vnative native_load(const float *p) {
    vnative v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void native_store(float *p, vnative v) { memcpy(p, &v, sizeof v); }

static inline vfloat load(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vfloat v) { memcpy(p, &v, sizeof v); }

/* lanes of a where `mask` is set, else of b */
static inline vfloat vselect(vint mask, vfloat a, vfloat b) { return (vfloat)(((vint)a & mask) | ((vint)b & ~mask)); }

/* e^x, float32 (Cephes' expf polynomial: within 2 ulp); 0 below -87.3 (so -inf gives 0). */
static inline vfloat vexp(vfloat x) {
    const vint underflow = x < -87.33654f;
    x = vselect(x > 88.72283f, splat(88.72283f), x);
    x = vselect(underflow, splat(-87.33654f), x);
    vfloat t = x * 1.44269504088896341f + 0.5f;
    vint n = __builtin_convertvector(t, vint);
    n += (vint)(__builtin_convertvector(n, vfloat) > t);       /* truncation -> floor */
    vfloat nf = __builtin_convertvector(n, vfloat);
    vfloat r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vfloat p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vint bits = (n + 127) << 23;
    vfloat scale;
    memcpy(&scale, &bits, sizeof scale);
    vfloat result = p * scale;
    return (vfloat)((vint)result & ~underflow);
}

/* lanes of v with lanes [half, 2 half) moved down: one step of a tree reduction */
static inline vfloat upper_half(vfloat v, int half) {
    vint index = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return __builtin_shuffle(v, (index + half) & (LANES - 1));
}

static inline float hmax(vfloat v) {
    for (int half = LANES / 2; half > 0; half /= 2) {
        vfloat other = upper_half(v, half);
        v = vselect(other > v, other, v);
    }
    return v[0];
}

static inline float hsum(vfloat v) {
    for (int half = LANES / 2; half > 0; half /= 2)
        v += upper_half(v, half);
    return v[0];
}
#endif
