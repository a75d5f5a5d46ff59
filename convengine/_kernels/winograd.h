/* The transforms of Winograd's F(2x2, 3x3) (conv_winograd.pxi), as plain loops over a run of tiles that gcc
 * vectorizes (every pointer restrict; each loop reads and writes contiguous runs).
 *
 * The tiles of one tile row sit side by side: tile tx reads input columns 2tx .. 2tx + 3 (before padding), so with
 * a row's even columns e[m] = x[2m] and odd ones o[m] = x[2m + 1] split apart, its four columns are e[tx], o[tx],
 * e[tx + 1], o[tx + 1]: contiguous in tx. Each transform below is then one pass over tx with unit strides.
 *
 *   input:  V = B^T d B,  B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]   (d: the tile's 4x4 input)
 *   output: Y = A^T M A,  A^T = [1 1 1 0; 0 1 -1 -1]                     (M: the 16 products' sums)
 * Each is additions only, in a fixed order: the same bits whoever runs them.
 */
#ifndef CE_WINOGRAD_H
#define CE_WINOGRAD_H

#include <stddef.h>
#include "simd.h"

#define CE_WINO_DEFS(SUF, T, VT, IT, ZIPLO, ZIPHI)                                                                                   \
/* e[m] = x[2m - pl], o[m] = x[2m + 1 - pl] for m0 <= m < m1 (x a row of W values; zero outside it) */          \
static inline void ce_wino_split_##SUF(const T* restrict x, ptrdiff_t W, ptrdiff_t pl, ptrdiff_t m0,            \
                                       ptrdiff_t m1, T* restrict e, T* restrict o)                              \
{                                                                                                              \
    ptrdiff_t lo = (pl + 1) / 2, hi = (W + pl) / 2, m;                                                         \
    if (lo < m0) lo = m0;                                                                                      \
    if (hi > m1) hi = m1;                                                                                      \
    if (hi < lo) hi = lo;                                                                                      \
    for (m = m0; m < lo && m < m1; m++) {                                                                      \
        ptrdiff_t c = 2 * m - pl;                                                                              \
        e[m] = c >= 0 && c < W ? x[c] : 0;                                                                     \
        o[m] = c + 1 >= 0 && c + 1 < W ? x[c + 1] : 0;                                                         \
    }                                                                                                          \
    for (m = lo; m < hi; m++) {                                                                                \
        e[m] = x[2 * m - pl];                                                                                  \
        o[m] = x[2 * m + 1 - pl];                                                                              \
    }                                                                                                          \
    for (m = hi > lo ? hi : lo; m < m1; m++) {                                                                 \
        ptrdiff_t c = 2 * m - pl;                                                                              \
        e[m] = c >= 0 && c < W ? x[c] : 0;                                                                     \
        o[m] = c + 1 >= 0 && c + 1 < W ? x[c + 1] : 0;                                                         \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* The row half of B^T d B over n values: t0 = d0 - d2, t1 = d1 + d2, t2 = d2 - d1, t3 = d1 - d3 */              \
static inline void ce_wino_rows_##SUF(const T* restrict d0, const T* restrict d1, const T* restrict d2,         \
                                      const T* restrict d3, ptrdiff_t n, T* restrict t0, T* restrict t1,        \
                                      T* restrict t2, T* restrict t3)                                           \
{                                                                                                              \
    for (ptrdiff_t m = 0; m < n; m++) {                                                                        \
        t0[m] = d0[m] - d2[m];                                                                                 \
        t1[m] = d1[m] + d2[m];                                                                                 \
        t2[m] = d2[m] - d1[m];                                                                                 \
        t3[m] = d1[m] - d3[m];                                                                                 \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* The column half for n tiles of one transformed row (even values e, odd o): v0..v3 its four entries */       \
static inline void ce_wino_cols_##SUF(const T* restrict e, const T* restrict o, ptrdiff_t n, T* restrict v0,    \
                                      T* restrict v1, T* restrict v2, T* restrict v3)                           \
{                                                                                                              \
    for (ptrdiff_t q = 0; q < n; q++) {                                                                        \
        T e0 = e[q], e1 = e[q + 1], o0 = o[q], o1 = o[q + 1];                                                  \
        v0[q] = e0 - e1;                                                                                       \
        v1[q] = o0 + e1;                                                                                       \
        v2[q] = e1 - o0;                                                                                       \
        v3[q] = o0 - o1;                                                                                       \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* A^T M A for n tiles (a whole number of vectors) of one output channel, M[s] = m[s * bs + q], with the        \
 * forward's epilogue (bias; relu as 0 where v <= 0, NaN kept; then * sc + sh): y00, y01 the tiles' top row,  \
 * y10, y11 their bottom row */                                                                                \
static inline void ce_wino_out_##SUF(const T* restrict m, ptrdiff_t bs, ptrdiff_t n, T bias, int relu,         \
                                     int affine, T sc, T sh, T* restrict y00, T* restrict y01,                  \
                                     T* restrict y10, T* restrict y11)                                          \
{                                                                                                              \
    const ptrdiff_t VL = CE_VBYTES / sizeof(T);                                                               \
    for (ptrdiff_t q = 0; q < n; q += VL) {                                                                    \
        VT c0[4], c1[4], v[4];                                                                                 \
        for (int a = 0; a < 4; a++) {                                                                          \
            const T* r = m + 4 * a * bs + q;                                                                   \
            VT r0 = *(const VT*)r, r1 = *(const VT*)(r + bs), r2 = *(const VT*)(r + 2 * bs),                   \
               r3 = *(const VT*)(r + 3 * bs);                                                                  \
            c0[a] = r0 + r1 + r2;                                                                              \
            c1[a] = r1 - r2 - r3;                                                                              \
        }                                                                                                      \
        v[0] = c0[0] + c0[1] + c0[2];                                                                          \
        v[1] = c1[0] + c1[1] + c1[2];                                                                          \
        v[2] = c0[1] - c0[2] - c0[3];                                                                          \
        v[3] = c1[1] - c1[2] - c1[3];                                                                          \
        for (int a = 0; a < 4; a++) {                                                                          \
            v[a] += bias;                                                                                      \
            if (relu) v[a] = (VT)((IT)v[a] & ~(IT)(v[a] <= 0));                                                \
            if (affine) v[a] = v[a] * sc + sh;                                                                 \
        }                                                                                                      \
        *(VT*)(y00 + q) = v[0];                                                                                \
        *(VT*)(y01 + q) = v[1];                                                                                \
        *(VT*)(y10 + q) = v[2];                                                                                \
        *(VT*)(y11 + q) = v[3];                                                                                \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* dst[2q] = a[q], dst[2q + 1] = b[q] for q < n: a tile row's two output columns back in place */              \
static inline void ce_wino_merge_##SUF(const T* restrict a, const T* restrict b, ptrdiff_t n, T* restrict dst)  \
{                                                                                                              \
    const ptrdiff_t VL = CE_VBYTES / sizeof(T);                                                               \
    const IT lo = ZIPLO, hi = ZIPHI;                                                                           \
    ptrdiff_t q = 0;                                                                                           \
    for (; q + VL <= n; q += VL) {                                                                             \
        VT va = *(const VT*)(a + q), vb = *(const VT*)(b + q);                                                 \
        *(VT*)(dst + 2 * q) = __builtin_shuffle(va, vb, lo);                                                   \
        *(VT*)(dst + 2 * q + VL) = __builtin_shuffle(va, vb, hi);                                              \
    }                                                                                                          \
    for (; q < n; q++) {                                                                                       \
        dst[2 * q] = a[q];                                                                                     \
        dst[2 * q + 1] = b[q];                                                                                 \
    }                                                                                                          \
}

/* lane masks interleaving two vectors (low halves, high halves) */
#if CE_VBYTES == 64
#define CE_ZIP_F_LO {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23}
#define CE_ZIP_F_HI {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31}
#define CE_ZIP_D_LO {0, 8, 1, 9, 2, 10, 3, 11}
#define CE_ZIP_D_HI {4, 12, 5, 13, 6, 14, 7, 15}
#elif CE_VBYTES == 32
#define CE_ZIP_F_LO {0, 8, 1, 9, 2, 10, 3, 11}
#define CE_ZIP_F_HI {4, 12, 5, 13, 6, 14, 7, 15}
#define CE_ZIP_D_LO {0, 4, 1, 5}
#define CE_ZIP_D_HI {2, 6, 3, 7}
#else
#define CE_ZIP_F_LO {0, 4, 1, 5}
#define CE_ZIP_F_HI {2, 6, 3, 7}
#define CE_ZIP_D_LO {0, 2}
#define CE_ZIP_D_HI {1, 3}
#endif

typedef long long ce_vl __attribute__((vector_size(CE_VBYTES)));

CE_WINO_DEFS(f, float, ce_vf, ce_vi, CE_ZIP_F_LO, CE_ZIP_F_HI)
CE_WINO_DEFS(d, double, ce_vd, ce_vl, CE_ZIP_D_LO, CE_ZIP_D_HI)

#endif
