/* Per-plane passes of batch norm's plane-by-plane way (batchnorm.pxi), in 16-lane vector types that gcc lowers to
 * whatever the ISA has (one zmm of floats on AVX-512, two ymm on AVX2, four xmm on SSE2).
 *
 * Each sum runs in 16 lanes: lane l sums the values q = l (mod 16) of the plane in increasing q, a tail past whole
 * vectors into the first lanes; then the lanes are added pairwise, l + 8 into l, then l + 4, l + 2 and l + 1
 * (ce_bn_total_*). The order is fixed whatever the thread count. Lanes added one by one (0..15) were a serial
 * chain of 15 scalar adds per sum: half of the backward's first pass on 8x8 planes (Zen 4, perf); the pairs are
 * four levels.
 *
 * With a fused ReLU (oneDNN's fuse_norm_relu), the backward's gradient passes through the ReLU whose output is
 * v = (x - mu) * k + s, recomputed here by the forward's expression: 0 where v <= 0, g elsewhere (NaN included).
 * The sums and the mapping read the gated gradient as the unfused layers would read relu_backward's output, with
 * the same expressions, so the same bits (test_fusion).
 * Written in Cython the same loops became scalar adds and stack spills (3x slower than the vector form).
 */
#ifndef CE_BATCHNORM_H
#define CE_BATCHNORM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef float ce_bn_vf __attribute__((vector_size(64)));
typedef int32_t ce_bn_vfi __attribute__((vector_size(64)));
typedef double ce_bn_vd __attribute__((vector_size(128)));
typedef int64_t ce_bn_vdi __attribute__((vector_size(128)));

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define CE_BN_HALVES 1
#endif
#endif

#ifdef CE_BN_HALVES
#define CE_BN_TOTAL(T, s)                                                                                     \
    __typeof__(__builtin_shufflevector(s, s, 0, 1, 2, 3, 4, 5, 6, 7)) a =                                      \
        __builtin_shufflevector(s, s, 0, 1, 2, 3, 4, 5, 6, 7)                                                  \
        + __builtin_shufflevector(s, s, 8, 9, 10, 11, 12, 13, 14, 15);                                         \
    __typeof__(__builtin_shufflevector(a, a, 0, 1, 2, 3)) c =                                                  \
        __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);                 \
    __typeof__(__builtin_shufflevector(c, c, 0, 1)) e =                                                        \
        __builtin_shufflevector(c, c, 0, 1) + __builtin_shufflevector(c, c, 2, 3);                             \
    return e[0] + e[1];
#else
#define CE_BN_TOTAL(T, s)                                                                                     \
    T l[16];                                                                                                   \
    int w, i;                                                                                                  \
    memcpy(l, &s, sizeof l);                                                                                   \
    for (w = 8; w >= 1; w /= 2)                                                                                \
        for (i = 0; i < w; i++) l[i] += l[i + w];                                                              \
    return l[0];
#endif

#define CE_BN_PASSES(SUFFIX, T, VT, VI)                                                                       \
/* the 16 lanes' total, pairwise: l + 8 into l, then l + 4, l + 2, l + 1; in registers where the compiler can     \
 * name a vector's halves (memcpy of a half kept the loop's accumulator on the stack) */                          \
static inline T ce_bn_total_##SUFFIX(const VT* sp)                                                             \
{                                                                                                              \
    VT s = *sp;                                                                                                \
    CE_BN_TOTAL(T, s)                                                                                          \
}                                                                                                              \
/* s += lanes[0..16) (a plane's tail, zeros past it) */                                                       \
static inline void ce_bn_add_tail_##SUFFIX(VT* s, const T* lanes)                                             \
{                                                                                                              \
    VT v;                                                                                                      \
    memcpy(&v, lanes, sizeof v);                                                                               \
    *s += v;                                                                                                   \
}                                                                                                              \
/* g where (x - mu) * k + s > 0 or NaN, else 0: the gradient through the fused ReLU */                         \
static inline void ce_bn_gate_##SUFFIX(VT* g, const VT* x, T mu, T k, T s)                                    \
{                                                                                                              \
    VT v = (*x - mu) * k + s;                                                                                  \
    VI off = v <= 0, gi;                                                                                       \
    memcpy(&gi, g, sizeof gi);                                                                                 \
    gi &= ~off;                                                                                                \
    memcpy(g, &gi, sizeof gi);                                                                                 \
}                                                                                                              \
static inline T ce_bn_gate1_##SUFFIX(T g, T x, T mu, T k, T s)                                                \
{                                                                                                              \
    T v = (x - mu) * k + s;                                                                                    \
    return v <= 0 ? 0 : g;                                                                                     \
}                                                                                                              \
/* sum over the plane x[0..n) */                                                                               \
static inline T ce_bn_sum_##SUFFIX(const T* x, ptrdiff_t n)                                                   \
{                                                                                                              \
    VT s = {0}, v;                                                                                             \
    T tail[16] = {0};                                                                                          \
    ptrdiff_t q, n16 = n / 16 * 16;                                                                            \
    for (q = 0; q < n16; q += 16) {                                                                            \
        memcpy(&v, x + q, sizeof v);                                                                           \
        s += v;                                                                                                \
    }                                                                                                          \
    if (n16 < n) {                                                                                             \
        for (q = n16; q < n; q++) tail[q - n16] = x[q];                                                        \
        ce_bn_add_tail_##SUFFIX(&s, tail);                                                                      \
    }                                                                                                          \
    return ce_bn_total_##SUFFIX(&s);                                                                            \
}                                                                                                              \
/* sum over the plane x[0..n) of (x - mu)^2 */                                                                 \
static inline T ce_bn_square_deviations_##SUFFIX(const T* x, T mu, ptrdiff_t n)                               \
{                                                                                                              \
    VT s = {0}, v;                                                                                             \
    T tail[16] = {0}, d;                                                                                       \
    ptrdiff_t q, n16 = n / 16 * 16;                                                                            \
    for (q = 0; q < n16; q += 16) {                                                                            \
        memcpy(&v, x + q, sizeof v);                                                                           \
        v -= mu;                                                                                               \
        s += v * v;                                                                                            \
    }                                                                                                          \
    if (n16 < n) {                                                                                             \
        for (q = n16; q < n; q++) {                                                                            \
            d = x[q] - mu;                                                                                     \
            tail[q - n16] = d * d;                                                                             \
        }                                                                                                      \
        ce_bn_add_tail_##SUFFIX(&s, tail);                                                                      \
    }                                                                                                          \
    return ce_bn_total_##SUFFIX(&s);                                                                            \
}                                                                                                              \
/* the plane's sum into sum[0] and the sum of its squared deviations from its own mean sum / n into m2[0]: the \
 * plane is read twice while in L1 */                                                                         \
static inline void ce_bn_sum_m2_##SUFFIX(const T* x, ptrdiff_t n, T* sum, T* m2)                               \
{                                                                                                              \
    T s = ce_bn_sum_##SUFFIX(x, n);                                                                           \
    sum[0] = s;                                                                                                \
    m2[0] = ce_bn_square_deviations_##SUFFIX(x, s / n, n);                                                     \
}                                                                                                              \
/* sums over the plane of g and of g * (x - mu), into sum_g[0] and sum_h[0]; with relu, g first passes through \
 * the ReLU whose output is (x - mu) * k + s (ce_bn_gate) */                                                   \
static inline void ce_bn_gradient_sums_##SUFFIX(const T* g, const T* x, T mu, ptrdiff_t n, int relu, T k, T s, \
                                               T* sum_g, T* sum_h)                                             \
{                                                                                                              \
    VT sg = {0}, sh = {0}, gv, xv;                                                                             \
    T tg[16] = {0}, th[16] = {0}, gq;                                                                          \
    ptrdiff_t q, n16 = n / 16 * 16;                                                                            \
    for (q = 0; q < n16; q += 16) {                                                                            \
        memcpy(&gv, g + q, sizeof gv);                                                                         \
        memcpy(&xv, x + q, sizeof xv);                                                                         \
        if (relu) ce_bn_gate_##SUFFIX(&gv, &xv, mu, k, s);                                                  \
        sg += gv;                                                                                              \
        sh += gv * (xv - mu);                                                                                  \
    }                                                                                                          \
    if (n16 < n) {                                                                                             \
        for (q = n16; q < n; q++) {                                                                            \
            gq = relu ? ce_bn_gate1_##SUFFIX(g[q], x[q], mu, k, s) : g[q];                                    \
            tg[q - n16] = gq;                                                                                  \
            th[q - n16] = gq * (x[q] - mu);                                                                    \
        }                                                                                                      \
        ce_bn_add_tail_##SUFFIX(&sg, tg);                                                                       \
        ce_bn_add_tail_##SUFFIX(&sh, th);                                                                       \
    }                                                                                                          \
    sum_g[0] = ce_bn_total_##SUFFIX(&sg);                                                                       \
    sum_h[0] = ce_bn_total_##SUFFIX(&sh);                                                                       \
}                                                                                                              \
/* out = (x - mu) * a + c + g * k over the plane; with relu, g first passes through the ReLU whose output is    \
 * (x - mu) * k + s (k: the forward's weight * inv_std, which is also the gradient's coefficient) */           \
static inline void ce_bn_backward_map_##SUFFIX(const T* g, const T* x, T* out, T mu, T a, T c, T k,           \
                                              ptrdiff_t n, int relu, T s)                                      \
{                                                                                                              \
    VT gv, xv, ov;                                                                                             \
    T gq;                                                                                                      \
    ptrdiff_t q, n16 = n / 16 * 16;                                                                            \
    for (q = 0; q < n16; q += 16) {                                                                            \
        memcpy(&gv, g + q, sizeof gv);                                                                         \
        memcpy(&xv, x + q, sizeof xv);                                                                         \
        if (relu) ce_bn_gate_##SUFFIX(&gv, &xv, mu, k, s);                                                  \
        ov = (xv - mu) * a + c + gv * k;                                                                       \
        memcpy(out + q, &ov, sizeof ov);                                                                       \
    }                                                                                                          \
    for (q = n16; q < n; q++) {                                                                                \
        gq = relu ? ce_bn_gate1_##SUFFIX(g[q], x[q], mu, k, s) : g[q];                                        \
        out[q] = (x[q] - mu) * a + c + gq * k;                                                                 \
    }                                                                                                          \
}

CE_BN_PASSES(f, float, ce_bn_vf, ce_bn_vfi)
CE_BN_PASSES(d, double, ce_bn_vd, ce_bn_vdi)

#endif
