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

/* The first n lanes of v stored at p (nothing past p[n - 1] written): simd.h's for float, lane by lane for double
 * (the float64 path is not tuned). */
static inline void ce_vd_store_first(double* p, ce_vd v, long n) {
    for (long i = 0; i < n; i++) p[i] = v[i];
}

/* B^T d B of n tiles side by side (one tile row), from the four input rows' even columns e + r * ld and odd ones
 * o + r * ld (tile q reads e[q], o[q], e[q + 1], o[q + 1] of each row): entry 4a + b of tile q to
 * dst[(4a + b) * ss + q]. The rows' half (t0 = d0 - d2, t1 = d1 + d2, t2 = d2 - d1, t3 = d1 - d3) and the columns'
 * (v0 = t(c0) - t(c2), v1 = t(c1) + t(c2), v2 = t(c2) - t(c1), v3 = t(c1) - t(c3)) in registers, VL tiles at a
 * time: one pass, 16 vector stores per VL tiles (the rows read up to index n + VL - 1: the caller's slack). */
#define CE_WINO_IN(SUF, T, VT, STORE_FIRST)                                                                    \
static inline void ce_wino_in_##SUF(const T* restrict e, const T* restrict o, ptrdiff_t ld, ptrdiff_t n,       \
                                    T* restrict dst, ptrdiff_t ss)                                              \
{                                                                                                              \
    const ptrdiff_t VL = CE_VBYTES / sizeof(T);                                                               \
    for (ptrdiff_t q = 0; q < n; q += VL) {                                                                    \
        VT e0[4], e1[4], o0[4], o1[4], v[16];                                                                  \
        for (int r = 0; r < 4; r++) {                                                                          \
            e0[r] = *(const VT*)(e + r * ld + q);                                                              \
            e1[r] = *(const VT*)(e + r * ld + q + 1);                                                          \
            o0[r] = *(const VT*)(o + r * ld + q);                                                              \
            o1[r] = *(const VT*)(o + r * ld + q + 1);                                                          \
        }                                                                                                      \
        for (int a = 0; a < 4; a++) {                                                                          \
            VT te0, te1, to0, to1;                                                                             \
            if (a == 0) { te0 = e0[0] - e0[2]; te1 = e1[0] - e1[2]; to0 = o0[0] - o0[2]; to1 = o1[0] - o1[2]; } \
            else if (a == 1) { te0 = e0[1] + e0[2]; te1 = e1[1] + e1[2]; to0 = o0[1] + o0[2]; to1 = o1[1] + o1[2]; } \
            else if (a == 2) { te0 = e0[2] - e0[1]; te1 = e1[2] - e1[1]; to0 = o0[2] - o0[1]; to1 = o1[2] - o1[1]; } \
            else { te0 = e0[1] - e0[3]; te1 = e1[1] - e1[3]; to0 = o0[1] - o0[3]; to1 = o1[1] - o1[3]; }     \
            v[4 * a] = te0 - te1;                                                                              \
            v[4 * a + 1] = to0 + te1;                                                                          \
            v[4 * a + 2] = te1 - to0;                                                                          \
            v[4 * a + 3] = to0 - to1;                                                                          \
        }                                                                                                      \
        if (q + VL <= n) {                                                                                     \
            for (int s = 0; s < 16; s++) *(VT*)(dst + s * ss + q) = v[s];                                      \
        } else {                                                                                               \
            for (int s = 0; s < 16; s++) STORE_FIRST(dst + s * ss + q, v[s], n - q);                           \
        }                                                                                                      \
    }                                                                                                          \
}

CE_WINO_IN(f, float, ce_vf, ce_vf_store_first)
CE_WINO_IN(d, double, ce_vd, ce_vd_store_first)

CE_WINO_DEFS(f, float, ce_vf, ce_vi, CE_ZIP_F_LO, CE_ZIP_F_HI)
CE_WINO_DEFS(d, double, ce_vd, ce_vl, CE_ZIP_D_LO, CE_ZIP_D_HI)

#endif
