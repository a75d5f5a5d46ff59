/* grad_weight of 1x1 convolutions (conv_grad_weight.pxi): a dot-product ("NT") micro-kernel, in vector types as
 * the GEMM micro-kernel is (simd.h).
 *
 * dW[k, c] = sum over pixels q of dY[k, q] * X[c, q]: both operands run along the pixels, so neither needs the
 * transposing pack that a GEMM over packed panels would (which cost as much as it saved). A tile of CE_PW_TILE rows
 * of dY and as many of X (4 x 4 on AVX-512, 3 x 3 otherwise) keeps its vector accumulators in registers over all
 * the images of a chunk, lane l summing the pixels q = l (mod VL) of each image in increasing q (ce_pw_lanes_add);
 * the lanes are then reduced once (ce_pw_lanes_sum), in a fixed order.
 */
#ifndef CE_POINTWISE_H
#define CE_POINTWISE_H

#include <stddef.h>
#include "simd.h"

/* Channels of each operand per tile: a 4 x 4 tile's 16 accumulators and 8 loaded vectors need AVX-512's 32
 * registers; with 16 (AVX2, SSE) they spilled, and a 3 x 3 tile (9 + 6) fits: AMD Zen 4, AVX2 build, 1 thread,
 * 64x64x32x32 -> 64 1x1, 17.4 -> 9.9 ms (the AVX-512 build's 4 x 4: 7.9). Each accumulator sums its own (k, c)
 * in the same order whatever the tile: the bits do not depend on it. */
#if defined(__AVX512F__)
#define CE_PW_TILE 4
#else
#define CE_PW_TILE 3
#endif

#define CE_PW_DOTS(ADD, SUM, T, VT)                                                                           \
/* acc[(i*TILE + j)*VL + l] = sum over images m < nimg and pixels q < n, q % VL == l, in that order, of           \
 * a[i][m*sa + q] * b[j][m*sb + q] (a tail past whole vectors into the first lanes): the accumulators stay in     \
 * registers over all the images */                                                                            \
static inline void ADD(const T* const* a, const T* const* b, ptrdiff_t sa, ptrdiff_t sb, ptrdiff_t nimg,         \
                       ptrdiff_t n, T* acc)                                                                    \
{                                                                                                              \
    enum { VL = CE_VBYTES / sizeof(T) };                                                                       \
    VT s[CE_PW_TILE][CE_PW_TILE], av[CE_PW_TILE], bv[CE_PW_TILE];                                              \
    T ta[CE_PW_TILE][VL], tb[CE_PW_TILE][VL];                                                                  \
    const T* ra[CE_PW_TILE];                                                                                   \
    const T* rb[CE_PW_TILE];                                                                                   \
    ptrdiff_t q, m, nv = n / VL * VL;                                                                          \
    int i, j, l;                                                                                               \
    for (i = 0; i < CE_PW_TILE; i++)                                                                           \
        for (j = 0; j < CE_PW_TILE; j++) s[i][j] = (VT){0};                                                    \
    for (m = 0; m < nimg; m++) {                                                                               \
        for (i = 0; i < CE_PW_TILE; i++) { ra[i] = a[i] + m * sa; rb[i] = b[i] + m * sb; }                     \
        for (q = 0; q < nv; q += VL) {                                                                         \
            for (i = 0; i < CE_PW_TILE; i++) av[i] = *(const VT*)(ra[i] + q);                                  \
            for (j = 0; j < CE_PW_TILE; j++) bv[j] = *(const VT*)(rb[j] + q);                                  \
            for (i = 0; i < CE_PW_TILE; i++)                                                                   \
                for (j = 0; j < CE_PW_TILE; j++) s[i][j] += av[i] * bv[j];                                     \
        }                                                                                                      \
        if (nv < n) {                                                                                          \
            for (i = 0; i < CE_PW_TILE; i++)                                                                   \
                for (l = 0; l < VL; l++) {                                                                     \
                    ta[i][l] = nv + l < n ? ra[i][nv + l] : 0;                                                 \
                    tb[i][l] = nv + l < n ? rb[i][nv + l] : 0;                                                 \
                }                                                                                              \
            for (i = 0; i < CE_PW_TILE; i++)                                                                   \
                for (j = 0; j < CE_PW_TILE; j++) s[i][j] += *(const VT*)ta[i] * *(const VT*)tb[j];             \
        }                                                                                                      \
    }                                                                                                          \
    for (i = 0; i < CE_PW_TILE; i++)                                                                           \
        for (j = 0; j < CE_PW_TILE; j++) *(VT*)(acc + (i * CE_PW_TILE + j) * VL) = s[i][j];                    \
}                                                                                                              \
/* the VL lanes of each of the 16 accumulators added as a tree (halves, in order): out[i*4 + j] */               \
static inline void SUM(const T* acc, T* out)                                                                   \
{                                                                                                              \
    enum { VL = CE_VBYTES / sizeof(T) };                                                                       \
    T t[VL];                                                                                                   \
    int k, l, half;                                                                                            \
    for (k = 0; k < CE_PW_TILE * CE_PW_TILE; k++) {                                                            \
        for (l = 0; l < VL; l++) t[l] = acc[k * VL + l];                                                       \
        for (half = VL / 2; half > 0; half /= 2)                                                               \
            for (l = 0; l < half; l++) t[l] = t[l] + t[l + half];                                              \
        out[k] = t[0];                                                                                         \
    }                                                                                                          \
}

CE_PW_DOTS(ce_pw_lanes_add_f, ce_pw_lanes_sum_f, float, ce_vf)
CE_PW_DOTS(ce_pw_lanes_add_d, ce_pw_lanes_sum_d, double, ce_vd)

#endif
