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

/* Whole-plane register kernels: float32 depthwise 3x3, padding 1 (top and left), dilation 1, on planes 8 or 16
 * wide, any height. Each keeps the plane's rows in zmm registers and builds every tap's operand by in-register
 * shifts with zeros shifted in at the borders, so there is no padded copy, no phase split, no junk columns and no
 * crop (the general path's per-plane overhead: an 8x8 plane took ~250 cycles there, of which the 36 FMAs are a
 * seventh). The sums are exactly the general sweep's: bias, then fma(w[k], tap k's input, sum) for k = kh*3 + kw
 * in order, the taps that fall on padding included (as 0 * w[k], as the sweep reads them from the padded copy);
 * then the epilogue in its order (relu as `0 if v <= 0 else v`, then fma(v, scale, shift)). So results are
 * bitwise those of ce_dw_sweep_f, and fused, frozen and plain calls stay bitwise equal to each other.
 * The same shapes XNNPACK covers with its f32-dwconv2d-chw 3x3p1 / 3x3s2p1 kernels (rows shifted in registers,
 * edge lanes masked); written here for the engine's NCHW planes and epilogue.
 *
 *   ce_dw3x3p1s1_w16_f: W = 16, stride 1, OH = H. One row per vector; columns j-1 and j+1 by valignd with a zero
 *                       vector; three input rows (each with its two shifts) roll down the plane.
 *   ce_dw3x3p1s1_w8_f:  W = 8, stride 1, OH = H. Two rows per vector (the last one half zero when H is odd); the
 *                       rows above / below a vector by valignd across adjacent vectors, columns by valignd within
 *                       the 8-lane halves with the edge lanes zeroed by a mask.
 *   ce_dw3x3p1s2_w16_f: W = 16, stride 2, OW = 8, any OH (rows past the plane read as zero). Two output rows per
 *                       vector; each tap row's two input rows give their even, odd and odd-shifted-by-one columns
 *                       to one vector by vpermt2ps.
 * Tried and not kept (Zen 4, batch 64, 1 thread): 8-wide planes with rows q and q + H/2 in one vector (2 loads
 * and 2 valignd per vector instead of 1 load and 5 shuffles: 0.159 -> 0.181 ms for 64x128x8x8) or with every
 * tap's operand read by a masked unaligned load (no shuffles: 0.179 ms); stride 2 with rows q and q + OH/2 (4
 * vpermt2ps and 2 valignd per vector instead of 9 vpermt2ps: no faster, 0.10 ms either way; 64x64x16x16 at
 * batch 64 then streams about 50 GB/s of input and output).
 */
#if defined(__AVX512F__)
#define CE_DW_SMALL 1

static inline __m512 ce_dw_small_finish(__m512 a, int relu, int affine, __m512 sc, __m512 sh)
{
    /* NLE_UQ: true for v > 0 and for NaN, so NaN stays NaN and -0 becomes +0, as in the sweep */
    if (relu) a = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NLE_UQ), a);
    if (affine) a = _mm512_fmadd_ps(a, sc, sh);
    return a;
}

/* valignd on floats: lanes imm.. of the 32-lane hi:lo, masked to zero where k is clear */
#define CE_DW_ALIGN(K, HI, LO, IMM) _mm512_castsi512_ps(_mm512_maskz_alignr_epi32((__mmask16)(K),               \
        _mm512_castps_si512(HI), _mm512_castps_si512(LO), (IMM)))

/* Width-8 planes, two rows per vector (ce_dw3x3p1s1_w8_f and its grad_weight): CE_DW8_ROW loads vector I of the
 * plane (rows 2I, 2I+1; zeros past the plane or at I == NV) into M, with its columns j-1 and j+1 within each row
 * into L and R; CE_DW8_SHIFT(H*, L*) puts the last row of L* and the first of H* into O*: with H* a vector and
 * L* zeros, the rows above it (row -1 is padding); with H* the next vector and L* a vector, the rows below it. */
#define CE_DW8_ROW(X, I, NV, H, Z, M, L, R)                                                                    \
    do {                                                                                                       \
        M = (I) < (NV) ? _mm512_maskz_loadu_ps((__mmask16)(2 * (I) + 1 < (H) ? 0xFFFF : 0x00FF), (X) + (I) * 16) \
                       : (Z);                                                                                  \
        L = CE_DW_ALIGN(0xFEFE, M, Z, 15);                                                                     \
        R = CE_DW_ALIGN(0x7F7F, Z, M, 1);                                                                      \
    } while (0)
#define CE_DW8_SHIFT(HL, HM, HR, LL, LM, LR, OL, OM, OR)                                                       \
    do {                                                                                                       \
        OL = CE_DW_ALIGN(0xFFFF, HL, LL, 8);                                                                   \
        OM = CE_DW_ALIGN(0xFFFF, HM, LM, 8);                                                                   \
        OR = CE_DW_ALIGN(0xFFFF, HR, LR, 8);                                                                   \
    } while (0)

/* b + the nine taps' products, added as fma(w[k], tap k, sum) in increasing k: every forward kernel's order. */
static inline __m512 ce_dw_sum9(const __m512* wk, __m512 b, __m512 t0, __m512 t1, __m512 t2, __m512 t3,
                                __m512 t4, __m512 t5, __m512 t6, __m512 t7, __m512 t8)
{
    __m512 acc = _mm512_fmadd_ps(wk[0], t0, b);
    acc = _mm512_fmadd_ps(wk[1], t1, acc);
    acc = _mm512_fmadd_ps(wk[2], t2, acc);
    acc = _mm512_fmadd_ps(wk[3], t3, acc);
    acc = _mm512_fmadd_ps(wk[4], t4, acc);
    acc = _mm512_fmadd_ps(wk[5], t5, acc);
    acc = _mm512_fmadd_ps(wk[6], t6, acc);
    acc = _mm512_fmadd_ps(wk[7], t7, acc);
    return _mm512_fmadd_ps(wk[8], t8, acc);
}

static inline void ce_dw3x3p1s1_w16_f(const float* x, ptrdiff_t H, const float* w, float bias, int relu,
                                      int affine, float scale, float shift, float* y)
{
    const __m512 z = _mm512_setzero_ps(), b = _mm512_set1_ps(bias);
    const __m512 sc = _mm512_set1_ps(scale), sh = _mm512_set1_ps(shift);
    __m512 wk[9];
    __m512 aL = z, aM = z, aR = z, cL, cM, cR, dL, dM, dR, acc;
    ptrdiff_t r;
    int k;
    for (k = 0; k < 9; k++) wk[k] = _mm512_set1_ps(w[k]);
    cM = _mm512_loadu_ps(x);
    cL = CE_DW_ALIGN(0xFFFF, cM, z, 15);            /* column j - 1, 0 at j = 0 */
    cR = CE_DW_ALIGN(0xFFFF, z, cM, 1);             /* column j + 1, 0 at j = 15 */
    for (r = 0; r < H; r++) {
        dM = r + 1 < H ? _mm512_loadu_ps(x + (r + 1) * 16) : z;
        dL = CE_DW_ALIGN(0xFFFF, dM, z, 15);
        dR = CE_DW_ALIGN(0xFFFF, z, dM, 1);
        acc = ce_dw_sum9(wk, b, aL, aM, aR, cL, cM, cR, dL, dM, dR);
        _mm512_storeu_ps(y + r * 16, ce_dw_small_finish(acc, relu, affine, sc, sh));
        aL = cL; aM = cM; aR = cR;
        cL = dL; cM = dM; cR = dR;
    }
}

static inline void ce_dw3x3p1s1_w8_f(const float* x, ptrdiff_t H, const float* w, float bias, int relu,
                                     int affine, float scale, float shift, float* y)
{
    const __m512 z = _mm512_setzero_ps(), b = _mm512_set1_ps(bias);
    const __m512 sc = _mm512_set1_ps(scale), sh = _mm512_set1_ps(shift);
    const ptrdiff_t nv = (H + 1) / 2;
    __m512 wk[9];
    /* c*: vector i (rows 2i, 2i+1), n*: vector i+1, u*: rows 2i-1, 2i (above), d*: rows 2i+1, 2i+2 (below);
     * L / M / R: columns j-1, j, j+1 within each row (8-lane half) */
    __m512 cL, cM, cR, nL, nM, nR, uL, uM, uR, dL, dM, dR, acc;
    __mmask16 m;
    ptrdiff_t i;
    int k;
    for (k = 0; k < 9; k++) wk[k] = _mm512_set1_ps(w[k]);
    CE_DW8_ROW(x, 0, nv, H, z, cM, cL, cR);
    CE_DW8_SHIFT(cL, cM, cR, z, z, z, uL, uM, uR);          /* row -1 is padding */
    for (i = 0; i < nv; i++) {
        CE_DW8_ROW(x, i + 1, nv, H, z, nM, nL, nR);
        CE_DW8_SHIFT(nL, nM, nR, cL, cM, cR, dL, dM, dR);
        acc = ce_dw_sum9(wk, b, uL, uM, uR, cL, cM, cR, dL, dM, dR);
        m = (__mmask16)(2 * i + 1 < H ? 0xFFFF : 0x00FF);
        _mm512_mask_storeu_ps(y + i * 16, m, ce_dw_small_finish(acc, relu, affine, sc, sh));
        uL = dL; uM = dM; uR = dR;
        cL = nL; cM = nM; cR = nR;
    }
}

/* input row r of a 16-wide plane of H rows, zeros outside */
static inline __m512 ce_dw_row16(const float* x, ptrdiff_t H, ptrdiff_t r)
{
    return r >= 0 && r < H ? _mm512_loadu_ps(x + r * 16) : _mm512_setzero_ps();
}

/* Stride 2, 16 -> 8 wide: output rows 2Q and 2Q+1 read input rows 4Q-1 .. 4Q+1 and 4Q+1 .. 4Q+3 (R0..R4), and
 * CE_DW_S2_TAPS lists the nine taps' operands of that row pair, k = kh*3 + kw in order (IL, IE, IO: the left,
 * even and odd column permutes). */
#define CE_DW_S2_ROWS(X, H, Q, R0, R1, R2, R3, R4)                                                             \
    do {                                                                                                       \
        R0 = ce_dw_row16(X, H, 4 * (Q) - 1);                                                                   \
        R1 = ce_dw_row16(X, H, 4 * (Q));                                                                       \
        R2 = ce_dw_row16(X, H, 4 * (Q) + 1);                                                                   \
        R3 = ce_dw_row16(X, H, 4 * (Q) + 2);                                                                   \
        R4 = ce_dw_row16(X, H, 4 * (Q) + 3);                                                                   \
    } while (0)
#define CE_DW_S2_TAPS(R0, R1, R2, R3, R4, IL, IE, IO)                                                          \
    _mm512_maskz_permutex2var_ps(0xFEFE, R0, IL, R2), _mm512_permutex2var_ps(R0, IE, R2),                      \
    _mm512_permutex2var_ps(R0, IO, R2),                                                                        \
    _mm512_maskz_permutex2var_ps(0xFEFE, R1, IL, R3), _mm512_permutex2var_ps(R1, IE, R3),                      \
    _mm512_permutex2var_ps(R1, IO, R3),                                                                        \
    _mm512_maskz_permutex2var_ps(0xFEFE, R2, IL, R4), _mm512_permutex2var_ps(R2, IE, R4),                      \
    _mm512_permutex2var_ps(R2, IO, R4)

static inline void ce_dw3x3p1s2_w16_f(const float* x, ptrdiff_t H, ptrdiff_t OH, const float* w, float bias,
                                      int relu, int affine, float scale, float shift, float* y)
{
    const __m512 b = _mm512_set1_ps(bias);
    const __m512 sc = _mm512_set1_ps(scale), sh = _mm512_set1_ps(shift);
    /* lanes 0-7 from the first row, 8-15 from the second: columns 2j (even), 2j+1 (odd), 2j-1 (left; lanes 0 and
     * 8 are the padding column -1, zeroed by the mask) */
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i il = _mm512_setr_epi32(0, 1, 3, 5, 7, 9, 11, 13, 0, 17, 19, 21, 23, 25, 27, 29);
    __m512 wk[9];
    __m512 r0, r1, r2, r3, r4, acc;
    ptrdiff_t q;
    int k;
    for (k = 0; k < 9; k++) wk[k] = _mm512_set1_ps(w[k]);
    for (q = 0; q < (OH + 1) / 2; q++) {
        CE_DW_S2_ROWS(x, H, q, r0, r1, r2, r3, r4);
        acc = ce_dw_sum9(wk, b, CE_DW_S2_TAPS(r0, r1, r2, r3, r4, il, ie, io));
        _mm512_mask_storeu_ps(y + q * 16, (__mmask16)(2 * q + 1 < OH ? 0xFFFF : 0x00FF),
                              ce_dw_small_finish(acc, relu, affine, sc, sh));
    }
}

/* Whole-plane grad_weight of the same three geometries: dw[k] = sum over the B images (planes bs apart, dY planes
 * gs apart) and the output pixels of dY * tap k's input, tap k's operand built by exactly the forward kernel's
 * shifts and permutes (zeros at the padding, no padded copy, no junk columns). Summation order (fixed: it depends
 * on the geometry only, never on threads or on how channels are split among them): tap k keeps a 16-lane vector
 * sum, lane j holding the output pixels at lane j of the forward kernel's vectors (w16: column j of each row;
 * w8 and s2 16->8: row 2i + j/8, column j%8 of each row pair i), added as fma(dY, input, sum) image by image,
 * vector by vector in order from zero; then dw[k] = ((0 + lane 0) + lane 1) + ... + lane 15. Lanes of output
 * rows past the plane (an odd last row pair) are masked off, so no product but the pixels' own is ever formed
 * (a 0 * inf there would make NaN). The general path's order (16 lanes along rows of the zero-padded width)
 * differs, so its bits differ from these by rounding. The bias gradient (db non-NULL) comes from the same loads,
 * db[0] = the same 16 lanes of plain sums of dY, then the lanes in order: channel_sum's order exactly (lane j
 * holds the plane's flat positions t % 16 == j; an odd last row pair is its 8-value tail), so its bits are
 * grad_bias's. */
static inline float ce_dw_lanes_total(__m512 v)
{
    float l[16], s = 0;
    int j;
    _mm512_storeu_ps(l, v);
    for (j = 0; j < 16; j++) s += l[j];
    return s;
}

/* dw[k] and (db non-NULL) db[0] from the lane sums */
#define CE_DW_GW_TOTAL(DW, DB)                                                                                 \
    do {                                                                                                       \
        (DW)[0] = ce_dw_lanes_total(a0); (DW)[1] = ce_dw_lanes_total(a1); (DW)[2] = ce_dw_lanes_total(a2);    \
        (DW)[3] = ce_dw_lanes_total(a3); (DW)[4] = ce_dw_lanes_total(a4); (DW)[5] = ce_dw_lanes_total(a5);    \
        (DW)[6] = ce_dw_lanes_total(a6); (DW)[7] = ce_dw_lanes_total(a7); (DW)[8] = ce_dw_lanes_total(a8);    \
        if (DB) (DB)[0] = ce_dw_lanes_total(ab);                                                               \
    } while (0)

/* a<k> += gv * operand k in the lanes of m, for the nine taps in order, and ab += gv (the bias). The sums are
 * named registers, not an array: gcc stored an array's nine vectors to the stack on every iteration. */
#define CE_DW_GW9(M, G, O0, O1, O2, O3, O4, O5, O6, O7, O8)                                                  \
    do {                                                                                                       \
        a0 = _mm512_mask3_fmadd_ps(G, O0, a0, M); a1 = _mm512_mask3_fmadd_ps(G, O1, a1, M);                  \
        a2 = _mm512_mask3_fmadd_ps(G, O2, a2, M); a3 = _mm512_mask3_fmadd_ps(G, O3, a3, M);                  \
        a4 = _mm512_mask3_fmadd_ps(G, O4, a4, M); a5 = _mm512_mask3_fmadd_ps(G, O5, a5, M);                  \
        a6 = _mm512_mask3_fmadd_ps(G, O6, a6, M); a7 = _mm512_mask3_fmadd_ps(G, O7, a7, M);                  \
        a8 = _mm512_mask3_fmadd_ps(G, O8, a8, M); ab = _mm512_mask_add_ps(ab, M, ab, G);                     \
    } while (0)
#define CE_DW_GW9_OF(...) CE_DW_GW9(__VA_ARGS__)          /* the nine operands from one macro (CE_DW_S2_TAPS) */

static inline void ce_dw3x3p1s1_w16_gw_f(const float* x, const float* g, ptrdiff_t B, ptrdiff_t bs,
                                         ptrdiff_t gs, ptrdiff_t H, float* dw, float* db)
{
    const __m512 z = _mm512_setzero_ps();
    __m512 a0 = z, a1 = z, a2 = z, a3 = z, a4 = z, a5 = z, a6 = z, a7 = z, a8 = z, ab = z;
    __m512 aL, aM, aR, cL, cM, cR, dL, dM, dR, gv;
    ptrdiff_t b, r;
    for (b = 0; b < B; b++) {
        const float* xb = x + b * bs;
        const float* gb = g + b * gs;
        aL = aM = aR = z;
        cM = _mm512_loadu_ps(xb);
        cL = CE_DW_ALIGN(0xFFFF, cM, z, 15);
        cR = CE_DW_ALIGN(0xFFFF, z, cM, 1);
        for (r = 0; r < H; r++) {
            dM = r + 1 < H ? _mm512_loadu_ps(xb + (r + 1) * 16) : z;
            dL = CE_DW_ALIGN(0xFFFF, dM, z, 15);
            dR = CE_DW_ALIGN(0xFFFF, z, dM, 1);
            gv = _mm512_loadu_ps(gb + r * 16);
            CE_DW_GW9(0xFFFF, gv, aL, aM, aR, cL, cM, cR, dL, dM, dR);
            aL = cL; aM = cM; aR = cR;
            cL = dL; cM = dM; cR = dR;
        }
    }
    CE_DW_GW_TOTAL(dw, db);
}

static inline void ce_dw3x3p1s1_w8_gw_f(const float* x, const float* g, ptrdiff_t B, ptrdiff_t bs,
                                        ptrdiff_t gs, ptrdiff_t H, float* dw, float* db)
{
    const __m512 z = _mm512_setzero_ps();
    const ptrdiff_t nv = (H + 1) / 2;
    __m512 a0 = z, a1 = z, a2 = z, a3 = z, a4 = z, a5 = z, a6 = z, a7 = z, a8 = z, ab = z;
    __m512 cL, cM, cR, nL, nM, nR, uL, uM, uR, dL, dM, dR, gv;
    __mmask16 m;
    ptrdiff_t b, i;
    for (b = 0; b < B; b++) {
        const float* xb = x + b * bs;
        const float* gb = g + b * gs;
        CE_DW8_ROW(xb, 0, nv, H, z, cM, cL, cR);
        CE_DW8_SHIFT(cL, cM, cR, z, z, z, uL, uM, uR);
        for (i = 0; i < nv; i++) {
            CE_DW8_ROW(xb, i + 1, nv, H, z, nM, nL, nR);
            CE_DW8_SHIFT(nL, nM, nR, cL, cM, cR, dL, dM, dR);
            m = (__mmask16)(2 * i + 1 < H ? 0xFFFF : 0x00FF);
            gv = _mm512_maskz_loadu_ps(m, gb + i * 16);
            CE_DW_GW9(m, gv, uL, uM, uR, cL, cM, cR, dL, dM, dR);
            uL = dL; uM = dM; uR = dR;
            cL = nL; cM = nM; cR = nR;
        }
    }
    CE_DW_GW_TOTAL(dw, db);
}

static inline void ce_dw3x3p1s2_w16_gw_f(const float* x, const float* g, ptrdiff_t B, ptrdiff_t bs,
                                         ptrdiff_t gs, ptrdiff_t H, ptrdiff_t OH, float* dw, float* db)
{
    const __m512 z = _mm512_setzero_ps();
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i il = _mm512_setr_epi32(0, 1, 3, 5, 7, 9, 11, 13, 0, 17, 19, 21, 23, 25, 27, 29);
    __m512 a0 = z, a1 = z, a2 = z, a3 = z, a4 = z, a5 = z, a6 = z, a7 = z, a8 = z, ab = z;
    __m512 r0, r1, r2, r3, r4, gv;
    __mmask16 m;
    ptrdiff_t b, q;
    for (b = 0; b < B; b++) {
        const float* xb = x + b * bs;
        const float* gb = g + b * gs;
        for (q = 0; q < (OH + 1) / 2; q++) {
            CE_DW_S2_ROWS(xb, H, q, r0, r1, r2, r3, r4);
            m = (__mmask16)(2 * q + 1 < OH ? 0xFFFF : 0x00FF);
            gv = _mm512_maskz_loadu_ps(m, gb + q * 16);
            CE_DW_GW9_OF(m, gv, CE_DW_S2_TAPS(r0, r1, r2, r3, r4, il, ie, io));
        }
    }
    CE_DW_GW_TOTAL(dw, db);
}

/* Whole-plane grad_input of the stride-2 geometry (16 wide -> 8, any H and OH): dx[ih, iw] = the sum over the
 * taps (kh, kw), in increasing k = kh*3 + kw, of w[k] * dY[oh, ow] with 2*oh + kh - 1 = ih and 2*ow + kw - 1 = iw,
 * oh < OH, added as fma(w[k], dY, sum) from zero: even rows take kh = 1 (dY row ih/2), odd rows kh = 0 (row
 * (ih+1)/2) and then kh = 2 (row (ih-1)/2), a row past dY adding nothing; within a row even columns take kw = 1,
 * odd ones kw = 0 (dY column (iw+1)/2, the zero column 8 at iw = 15) and then kw = 2 (column (iw-1)/2), each by
 * a masked FMA onto a dY row spread over 16 lanes by one vpermps (D: lane l = dY[l/2], S: lane l = dY[(l+1)/2]).
 * The phased general path adds the same products in the same order per element (each tap one pass over the
 * phases, from zero, dY's zero column 8 included), so the bits are the same; it spent most of its time on the
 * phase buffers' memset, layout and merge, not on the 72 FMAs of a plane. */
static inline void ce_dw3x3p1s2_w16_gi_f(const float* g, ptrdiff_t H, ptrdiff_t OH, const float* w, float* dx)
{
    const __m512 z = _mm512_setzero_ps();
    const __m512i iD = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i iS = _mm512_setr_epi32(0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8);
    const __mmask16 EV = 0x5555, OD = 0xAAAA;
    __m512 wk[9];
    __m512 v, D, S, acc;
    ptrdiff_t ih, j;
    int k;
    for (k = 0; k < 9; k++) wk[k] = _mm512_set1_ps(w[k]);
    for (ih = 0; ih < H; ih++) {
        acc = z;
        j = ih / 2;
        if (ih % 2 == 0) {
            if (j < OH) {
                v = _mm512_maskz_loadu_ps(0x00FF, g + j * 8);    /* lanes 8-15 zero: dY column 8 */
                D = _mm512_permutexvar_ps(iD, v);
                S = _mm512_permutexvar_ps(iS, v);
                acc = _mm512_mask3_fmadd_ps(wk[3], S, acc, OD);
                acc = _mm512_mask3_fmadd_ps(wk[4], D, acc, EV);
                acc = _mm512_mask3_fmadd_ps(wk[5], D, acc, OD);
            }
        } else {
            if (j + 1 < OH) {
                v = _mm512_maskz_loadu_ps(0x00FF, g + (j + 1) * 8);
                D = _mm512_permutexvar_ps(iD, v);
                S = _mm512_permutexvar_ps(iS, v);
                acc = _mm512_mask3_fmadd_ps(wk[0], S, acc, OD);
                acc = _mm512_mask3_fmadd_ps(wk[1], D, acc, EV);
                acc = _mm512_mask3_fmadd_ps(wk[2], D, acc, OD);
            }
            if (j < OH) {
                v = _mm512_maskz_loadu_ps(0x00FF, g + j * 8);
                D = _mm512_permutexvar_ps(iD, v);
                S = _mm512_permutexvar_ps(iS, v);
                acc = _mm512_mask3_fmadd_ps(wk[6], S, acc, OD);
                acc = _mm512_mask3_fmadd_ps(wk[7], D, acc, EV);
                acc = _mm512_mask3_fmadd_ps(wk[8], D, acc, OD);
            }
        }
        _mm512_storeu_ps(dx + ih * 16, acc);
    }
}
#else
/* Other ISAs take the general sweep (CE_DW_SMALL 0); these are never called. */
#define CE_DW_SMALL 0
static inline void ce_dw3x3p1s1_w16_f(const float* x, ptrdiff_t H, const float* w, float bias, int relu,
                                      int affine, float scale, float shift, float* y) {}
static inline void ce_dw3x3p1s1_w8_f(const float* x, ptrdiff_t H, const float* w, float bias, int relu,
                                     int affine, float scale, float shift, float* y) {}
static inline void ce_dw3x3p1s2_w16_f(const float* x, ptrdiff_t H, ptrdiff_t OH, const float* w, float bias,
                                      int relu, int affine, float scale, float shift, float* y) {}
static inline void ce_dw3x3p1s1_w16_gw_f(const float* x, const float* g, ptrdiff_t B, ptrdiff_t bs,
                                         ptrdiff_t gs, ptrdiff_t H, float* dw, float* db) {}
static inline void ce_dw3x3p1s1_w8_gw_f(const float* x, const float* g, ptrdiff_t B, ptrdiff_t bs,
                                        ptrdiff_t gs, ptrdiff_t H, float* dw, float* db) {}
static inline void ce_dw3x3p1s2_w16_gw_f(const float* x, const float* g, ptrdiff_t B, ptrdiff_t bs,
                                         ptrdiff_t gs, ptrdiff_t H, ptrdiff_t OH, float* dw, float* db) {}
static inline void ce_dw3x3p1s2_w16_gi_f(const float* g, ptrdiff_t H, ptrdiff_t OH, const float* w, float* dx) {}
#endif

#endif
