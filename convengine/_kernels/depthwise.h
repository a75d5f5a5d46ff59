/* The depthwise kernels' inner sweep (depthwise.pxi), in vector types as the GEMM micro-kernel is (simd.h).
 *
 * out[t] = epilogue(bias + sum over taps k = 0..T-1, in that order, of w[k] * src[off[k] + t]) for t < n.
 * A block of CE_DW_VECS vectors keeps its sums in registers over all the taps and is stored once, with the
 * epilogue (relu, then * scale + shift) applied in registers. The sweep it replaces added each tap into the
 * whole output in memory (a load, an FMA and a store per tap and vector: 9 passes over a 3x3 plane's output);
 * the sums are the same, in the same order, so the bits are too.
 */
#ifndef CE_DEPTHWISE_H
#define CE_DEPTHWISE_H

#include <stddef.h>
#include "simd.h"

#define CE_DW_VECS 4

#define CE_DW_SWEEP(NAME, T, VT)                                                                              \
static inline void NAME(const T* src, ptrdiff_t n, const ptrdiff_t* off, const T* w, ptrdiff_t taps, T bias,   \
                        int relu, int affine, T sc, T sh, T* out)                                             \
{                                                                                                              \
    const ptrdiff_t VL = CE_VBYTES / sizeof(T);                                                               \
    const VT zero = {0};                                                                                       \
    ptrdiff_t t = 0, k;                                                                                        \
    int j;                                                                                                     \
    for (; t + CE_DW_VECS * VL <= n; t += CE_DW_VECS * VL) {                                                   \
        VT acc[CE_DW_VECS];                                                                                    \
        for (j = 0; j < CE_DW_VECS; j++) acc[j] = zero + bias;                                                 \
        for (k = 0; k < taps; k++) {                                                                           \
            const T* s = src + off[k] + t;                                                                     \
            VT wv = zero + w[k];                                                                               \
            for (j = 0; j < CE_DW_VECS; j++) acc[j] += wv * *(const VT*)(s + j * VL);                          \
        }                                                                                                      \
        for (j = 0; j < CE_DW_VECS; j++) {                                                                     \
            if (relu) acc[j] = (VT)((__typeof__(acc[j] <= 0))acc[j] & ~(acc[j] <= 0));                         \
            if (affine) acc[j] = acc[j] * sc + sh;                                                             \
            *(VT*)(out + t + j * VL) = acc[j];                                                                 \
        }                                                                                                      \
    }                                                                                                          \
    for (; t + VL <= n; t += VL) {                                                                             \
        VT a = zero + bias;                                                                                    \
        for (k = 0; k < taps; k++) a += (zero + w[k]) * *(const VT*)(src + off[k] + t);                        \
        if (relu) a = (VT)((__typeof__(a <= 0))a & ~(a <= 0));                                                 \
        if (affine) a = a * sc + sh;                                                                           \
        *(VT*)(out + t) = a;                                                                                   \
    }                                                                                                          \
    for (; t < n; t++) {                                                                                       \
        T a = bias;                                                                                            \
        for (k = 0; k < taps; k++) a += w[k] * src[off[k] + t];                                                \
        if (relu) a = a <= 0 ? 0 : a;                                                                          \
        if (affine) a = a * sc + sh;                                                                           \
        out[t] = a;                                                                                            \
    }                                                                                                          \
}

CE_DW_SWEEP(ce_dw_sweep_f, float, ce_vf)
CE_DW_SWEEP(ce_dw_sweep_d, double, ce_vd)

/* dst row r = src row r, n values each, for rows r < rows (strides ss, ds): a plane copied into its padded buffer,
 * or a swept output cropped out of it. The rows are short (8-32 values), and gcc turned the plain loop into a
 * libc memcpy call per row, which cost about as much as the 3x3 sweep of the row: on AVX-512 each row is whole
 * vectors with a masked tail; elsewhere the loop is kept a loop. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define CE_DW_COPY_ROWS(NAME, T, NL, MASK, LOADZ, STOREM)                                                     \
static inline void NAME(const T* src, ptrdiff_t ss, T* dst, ptrdiff_t ds, ptrdiff_t rows, ptrdiff_t n)        \
{                                                                                                              \
    ptrdiff_t r, j;                                                                                            \
    for (r = 0; r < rows; r++)                                                                                 \
        for (j = 0; j < n; j += NL) {                                                                          \
            MASK m = (MASK)(n - j >= NL ? (MASK)~0 : (MASK)((1u << (n - j)) - 1u));                           \
            STOREM(dst + r * ds + j, m, LOADZ(m, src + r * ss + j));                                           \
        }                                                                                                      \
}
CE_DW_COPY_ROWS(ce_dw_copy_rows_f, float, 16, __mmask16, _mm512_maskz_loadu_ps, _mm512_mask_storeu_ps)
CE_DW_COPY_ROWS(ce_dw_copy_rows_d, double, 8, __mmask8, _mm512_maskz_loadu_pd, _mm512_mask_storeu_pd)
#else
#define CE_DW_COPY_ROWS(NAME, T)                                                                              \
__attribute__((optimize("no-tree-loop-distribute-patterns")))                                                  \
static inline void NAME(const T* src, ptrdiff_t ss, T* dst, ptrdiff_t ds, ptrdiff_t rows, ptrdiff_t n)        \
{                                                                                                              \
    ptrdiff_t r, j;                                                                                            \
    for (r = 0; r < rows; r++)                                                                                 \
        for (j = 0; j < n; j++) dst[r * ds + j] = src[r * ss + j];                                             \
}
CE_DW_COPY_ROWS(ce_dw_copy_rows_f, float)
CE_DW_COPY_ROWS(ce_dw_copy_rows_d, double)
#endif

/* grad_weight's per-tap dot products of one plane, several taps per sweep:
 * lanes[k*16 + j] += g[t] * src[off[k] + t] summed over t < n16 (n rounded down to 16) with t % 16 == j, in
 * increasing t; then the tail t >= n16 into lanes[k*16 + t - n16]. This is the 16-lane order that the
 * one-tap-per-sweep dot products had, so the bits are the same; but NK taps share each load of g and keep their
 * lanes in registers (CE_DW_TAPDOT(.., 9): a 3x3 kernel in one sweep instead of nine). */
#define CE_DW_TAPDOT(NAME, T, VT, NK)                                                                         \
static inline void NAME(const T* g, const T* src, ptrdiff_t n, const ptrdiff_t* off, T* lanes)                 \
{                                                                                                              \
    enum { VL = CE_VBYTES / sizeof(T), NV = 16 / (CE_VBYTES / sizeof(T)) };                                    \
    VT acc[NK][NV];                                                                                            \
    VT gv[NV];                                                                                                 \
    ptrdiff_t n16 = n / 16 * 16, t;                                                                            \
    int k, v;                                                                                                  \
    for (k = 0; k < NK; k++)                                                                                   \
        for (v = 0; v < NV; v++) acc[k][v] = *(const VT*)(lanes + k * 16 + v * VL);                           \
    for (t = 0; t < n16; t += 16) {                                                                            \
        for (v = 0; v < NV; v++) gv[v] = *(const VT*)(g + t + v * VL);                                        \
        for (k = 0; k < NK; k++)                                                                               \
            for (v = 0; v < NV; v++) acc[k][v] += gv[v] * *(const VT*)(src + off[k] + t + v * VL);            \
    }                                                                                                          \
    for (k = 0; k < NK; k++)                                                                                   \
        for (v = 0; v < NV; v++) *(VT*)(lanes + k * 16 + v * VL) = acc[k][v];                                 \
    for (k = 0; k < NK; k++)                                                                                   \
        for (t = n16; t < n; t++) lanes[k * 16 + t - n16] += g[t] * src[off[k] + t];                          \
}

CE_DW_TAPDOT(ce_dw_tapdot9_f, float, ce_vf, 9)
CE_DW_TAPDOT(ce_dw_tapdot1_f, float, ce_vf, 1)
CE_DW_TAPDOT(ce_dw_tapdot9_d, double, ce_vd, 9)
CE_DW_TAPDOT(ce_dw_tapdot1_d, double, ce_vd, 1)

/* Stride-2 depthwise: one input row into its two column phases, even[j] = prow[2j] and odd[j] = prow[2j + 1] for
 * j < nq, where prow is the row zero-padded by pl columns on the left (zeros past its W values). On AVX-512:
 * masked loads straight from the row (the masked-off lanes are the padding, read nothing and cannot fault), two-
 * source permutes, masked stores of exactly nq values (the rows of a phase lie end to end). The strided scalar
 * copy it replaces took three quarters of a stride-2 layer's time: 64x64x16x16 at batch 64, 1 thread, 1.01 ->
 * 0.62 ms (Zen 4); a version through a zero-padded row buffer (memset + memcpy per row) was slower than the
 * scalar copy. Other ISAs keep the scalar copy (CE_DW_SPLIT 0). */
#if defined(__AVX512F__)
#include <immintrin.h>
#define CE_DW_SPLIT 1
/* lanes l < n of a mask of nl lanes with lo <= base + l < hi */
static inline unsigned ce_dw_lanes(ptrdiff_t base, ptrdiff_t lo, ptrdiff_t hi, int nl)
{
    ptrdiff_t first = lo - base, last = hi - base;
    unsigned all = nl == 16 ? 0xFFFFu : 0xFFu;
    if (first < 0) first = 0;
    if (last > nl) last = nl;
    if (last <= first) return 0;
    return (all >> (nl - (last - first))) << first;
}
/* One template per routine, instantiated for float (16 lanes) and double (8 lanes) below. */
#define CE_DW_SPLIT_ROW(NAME, T, VEC, NL, MASK, LOADZ, STOREM, PERM, EVEN, ODD)                                \
static inline void NAME(const T* x, ptrdiff_t W, ptrdiff_t pl, ptrdiff_t nq, T* even, T* odd)                   \
{                                                                                                              \
    const __m512i ie = EVEN, io = ODD;                                                                         \
    ptrdiff_t j, k;                                                                                            \
    for (j = 0; j < nq; j += NL) {                                                                             \
        k = 2 * j - pl;                          /* the input column of padded column 2j */                    \
        /* masked-off lanes read nothing (and cannot fault): the zero padding of both sides */                 \
        VEC v0 = LOADZ((MASK)ce_dw_lanes(k, 0, W, NL), x + k);                                                 \
        VEC v1 = LOADZ((MASK)ce_dw_lanes(k + NL, 0, W, NL), x + k + NL);                                       \
        MASK m = (MASK)ce_dw_lanes(j, 0, nq, NL);                                                              \
        STOREM(even + j, m, PERM(v0, ie, v1));                                                                 \
        STOREM(odd + j, m, PERM(v0, io, v1));                                                                  \
    }                                                                                                          \
}

/* The inverse, for the stride-2 grad_input: out[iw] = prow[iw + pl] for iw < W, where prow[2j] = even[j] and
 * prow[2j + 1] = odd[j] (j < nq): two-source permutes interleave a vector of each, masked stores keep the row's
 * W columns (the padding columns are never written). */
#define CE_DW_MERGE_ROW(NAME, T, VEC, NL, MASK, LOADZ, STOREM, PERM, LO, HI)                                    \
static inline void NAME(const T* even, const T* odd, ptrdiff_t nq, ptrdiff_t pl, ptrdiff_t W, T* out)           \
{                                                                                                              \
    const __m512i lo = LO, hi = HI;                                                                            \
    ptrdiff_t j, k;                                                                                            \
    for (j = 0; j < nq; j += NL) {                                                                             \
        MASK m = (MASK)ce_dw_lanes(j, 0, nq, NL);                                                              \
        VEC e = LOADZ(m, even + j), o = LOADZ(m, odd + j);                                                     \
        k = 2 * j - pl;                          /* the output column of padded column 2j */                   \
        STOREM(out + k, (MASK)ce_dw_lanes(k, 0, W, NL), PERM(e, lo, o));                                       \
        STOREM(out + k + NL, (MASK)ce_dw_lanes(k + NL, 0, W, NL), PERM(e, hi, o));                             \
    }                                                                                                          \
}

CE_DW_SPLIT_ROW(ce_dw_split_row_f, float, __m512, 16, __mmask16, _mm512_maskz_loadu_ps, _mm512_mask_storeu_ps,
                _mm512_permutex2var_ps,
                _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31))
CE_DW_SPLIT_ROW(ce_dw_split_row_d, double, __m512d, 8, __mmask8, _mm512_maskz_loadu_pd, _mm512_mask_storeu_pd,
                _mm512_permutex2var_pd, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14),
                _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15))
CE_DW_MERGE_ROW(ce_dw_merge_row_f, float, __m512, 16, __mmask16, _mm512_maskz_loadu_ps, _mm512_mask_storeu_ps,
                _mm512_permutex2var_ps,
                _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
                _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31))
CE_DW_MERGE_ROW(ce_dw_merge_row_d, double, __m512d, 8, __mmask8, _mm512_maskz_loadu_pd, _mm512_mask_storeu_pd,
                _mm512_permutex2var_pd, _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11),
                _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15))
#else
/* Other ISAs take the scalar copies in depthwise.pxi (CE_DW_SPLIT 0); these are never called. */
#define CE_DW_SPLIT 0
static inline void ce_dw_split_row_f(const float* x, ptrdiff_t W, ptrdiff_t pl, ptrdiff_t nq, float* e, float* o) {}
static inline void ce_dw_split_row_d(const double* x, ptrdiff_t W, ptrdiff_t pl, ptrdiff_t nq, double* e, double* o) {}
static inline void ce_dw_merge_row_f(const float* e, const float* o, ptrdiff_t nq, ptrdiff_t pl, ptrdiff_t W, float* y) {}
static inline void ce_dw_merge_row_d(const double* e, const double* o, ptrdiff_t nq, ptrdiff_t pl, ptrdiff_t W, double* y) {}
#endif

#endif
