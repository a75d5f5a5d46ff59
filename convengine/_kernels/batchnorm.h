/* Per-plane sums of batch norm's plane-by-plane passes (batchnorm.pxi), in 16-lane vector types that gcc lowers to
 * whatever the ISA has (one zmm of floats on AVX-512, two ymm on AVX2, four xmm on SSE2).
 *
 * Lane l sums the values q = l (mod 16) of the plane in increasing q, a tail past whole vectors into the first
 * lanes, then the lanes are added in order 0..15: conv_grad_weight.pxi's channel_sum order. Written in Cython the
 * same loops, with two accumulators, became scalar adds and stack spills (3x slower than the vector form).
 */
#ifndef CE_BATCHNORM_H
#define CE_BATCHNORM_H

#include <stddef.h>
#include <string.h>

typedef float ce_bn_vf __attribute__((vector_size(64)));
typedef double ce_bn_vd __attribute__((vector_size(128)));

#define CE_BN_SUMS(SQDEV, GRAD, T, VT)                                                                        \
/* sum over the plane x[0..n) of (x - mu)^2 */                                                                 \
static inline T SQDEV(const T* x, T mu, ptrdiff_t n)                                                           \
{                                                                                                              \
    VT s = {0}, v;                                                                                             \
    T lanes[16], d, acc = 0;                                                                                   \
    ptrdiff_t q, n16 = n / 16 * 16;                                                                            \
    int l;                                                                                                     \
    for (q = 0; q < n16; q += 16) {                                                                            \
        memcpy(&v, x + q, sizeof v);                                                                           \
        v -= mu;                                                                                               \
        s += v * v;                                                                                            \
    }                                                                                                          \
    memcpy(lanes, &s, sizeof s);                                                                               \
    for (q = n16; q < n; q++) {                                                                                \
        d = x[q] - mu;                                                                                         \
        lanes[q - n16] += d * d;                                                                               \
    }                                                                                                          \
    for (l = 0; l < 16; l++) acc += lanes[l];                                                                  \
    return acc;                                                                                                \
}                                                                                                              \
/* sums over the plane of g and of g * (x - mu), into sum_g[0] and sum_h[0] */                                  \
static inline void GRAD(const T* g, const T* x, T mu, ptrdiff_t n, T* sum_g, T* sum_h)                        \
{                                                                                                              \
    VT sg = {0}, sh = {0}, gv, xv;                                                                             \
    T lg[16], lh[16], a = 0, b = 0;                                                                            \
    ptrdiff_t q, n16 = n / 16 * 16;                                                                            \
    int l;                                                                                                     \
    for (q = 0; q < n16; q += 16) {                                                                            \
        memcpy(&gv, g + q, sizeof gv);                                                                         \
        memcpy(&xv, x + q, sizeof xv);                                                                         \
        sg += gv;                                                                                              \
        sh += gv * (xv - mu);                                                                                  \
    }                                                                                                          \
    memcpy(lg, &sg, sizeof sg);                                                                                \
    memcpy(lh, &sh, sizeof sh);                                                                                \
    for (q = n16; q < n; q++) {                                                                                \
        lg[q - n16] += g[q];                                                                                   \
        lh[q - n16] += g[q] * (x[q] - mu);                                                                     \
    }                                                                                                          \
    for (l = 0; l < 16; l++) {                                                                                 \
        a += lg[l];                                                                                            \
        b += lh[l];                                                                                            \
    }                                                                                                          \
    sum_g[0] = a;                                                                                              \
    sum_h[0] = b;                                                                                              \
}

CE_BN_SUMS(ce_bn_square_deviations_f, ce_bn_gradient_sums_f, float, ce_bn_vf)
CE_BN_SUMS(ce_bn_square_deviations_d, ce_bn_gradient_sums_d, double, ce_bn_vd)

#endif
