/* The transforms of Winograd's F(2x2, 3x3) (conv_winograd.pxi), float32, in the micro-kernel's vector types
 * (simd.h), VL tiles at a time in registers.
 *
 * The tiles of one tile row sit side by side: tile q reads input columns 2q .. 2q + 3 (of the padded row), so with
 * a row's even columns e[m] = x[2m] and odd ones o[m] = x[2m + 1] split apart, its four columns are e[q], o[q],
 * e[q + 1], o[q + 1]: contiguous in q, and a vector of VL tiles needs no shuffle.
 *
 *   input:  V = B^T d B,  B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]   (d: the tile's 4x4 input)
 *   output: Y = A^T M A,  A^T = [1 1 1 0; 0 1 -1 -1]                     (M: the 16 products' sums)
 * Each is additions only, in a fixed order: the same bits whoever runs them.
 */
#ifndef CE_WINOGRAD_H
#define CE_WINOGRAD_H

#include <stddef.h>
#include "simd.h"

#define CE_WINO_VL (CE_VBYTES / 4)

/* B^T d B of n tiles side by side (one tile row), from the four input rows' even columns e + r * ld and odd ones
 * o + r * ld: entry 4a + b of tile q to dst[(4a + b) * ss + q]. The rows' half (t0 = d0 - d2, t1 = d1 + d2,
 * t2 = d2 - d1, t3 = d1 - d3), then the columns' (v0 = t(c0) - t(c2), v1 = t(c1) + t(c2), v2 = t(c2) - t(c1),
 * v3 = t(c1) - t(c3)). The rows are read up to index n + VL - 1 (the caller's slack); only n tiles are stored. */
static inline void ce_wino_in_f(const float* restrict e, const float* restrict o, ptrdiff_t ld, ptrdiff_t n,
                                float* restrict dst, ptrdiff_t ss)
{
    for (ptrdiff_t q = 0; q < n; q += CE_WINO_VL) {
        ce_vf e0[4], e1[4], o0[4], o1[4], v[16];
        for (int r = 0; r < 4; r++) {
            e0[r] = *(const ce_vf*)(e + r * ld + q);
            e1[r] = *(const ce_vf*)(e + r * ld + q + 1);
            o0[r] = *(const ce_vf*)(o + r * ld + q);
            o1[r] = *(const ce_vf*)(o + r * ld + q + 1);
        }
        for (int a = 0; a < 4; a++) {
            /* the row combination of entry row a: rows (i, j) with sign sg, t = row i + sg * row j */
            static const int ri[4] = {0, 1, 2, 1}, rj[4] = {2, 2, 1, 3};
            ce_vf te0, te1, to0, to1;
            if (a == 1) {
                te0 = e0[1] + e0[2]; te1 = e1[1] + e1[2]; to0 = o0[1] + o0[2]; to1 = o1[1] + o1[2];
            } else {
                te0 = e0[ri[a]] - e0[rj[a]]; te1 = e1[ri[a]] - e1[rj[a]];
                to0 = o0[ri[a]] - o0[rj[a]]; to1 = o1[ri[a]] - o1[rj[a]];
            }
            v[4 * a] = te0 - te1;
            v[4 * a + 1] = to0 + te1;
            v[4 * a + 2] = te1 - to0;
            v[4 * a + 3] = to0 - to1;
        }
        if (q + CE_WINO_VL <= n) {
            for (int s = 0; s < 16; s++) *(ce_vf*)(dst + s * ss + q) = v[s];
        } else {
            for (int s = 0; s < 16; s++) ce_vf_store_first(dst + s * ss + q, v[s], n - q);
        }
    }
}

/* A^T M A for n tiles (a whole number of vectors) of one output channel, M[s] = m[s * bs + q], with the forward's
 * epilogue (bias; relu as 0 where v <= 0, NaN kept; then * sc + sh): y00, y01 the tiles' top row, y10, y11 their
 * bottom row. */
static inline void ce_wino_out_f(const float* restrict m, ptrdiff_t bs, ptrdiff_t n, float bias, int relu,
                                 int affine, float sc, float sh, float* restrict y00, float* restrict y01,
                                 float* restrict y10, float* restrict y11)
{
    for (ptrdiff_t q = 0; q < n; q += CE_WINO_VL) {
        ce_vf c0[4], c1[4], v[4];
        for (int a = 0; a < 4; a++) {
            const float* r = m + 4 * a * bs + q;
            ce_vf r0 = *(const ce_vf*)r, r1 = *(const ce_vf*)(r + bs), r2 = *(const ce_vf*)(r + 2 * bs),
                  r3 = *(const ce_vf*)(r + 3 * bs);
            c0[a] = r0 + r1 + r2;
            c1[a] = r1 - r2 - r3;
        }
        v[0] = c0[0] + c0[1] + c0[2];
        v[1] = c1[0] + c1[1] + c1[2];
        v[2] = c0[1] - c0[2] - c0[3];
        v[3] = c1[1] - c1[2] - c1[3];
        for (int a = 0; a < 4; a++) {
            v[a] += bias;
            if (relu) v[a] = ce_vf_relu(v[a]);
            if (affine) v[a] = v[a] * sc + sh;
        }
        *(ce_vf*)(y00 + q) = v[0];
        *(ce_vf*)(y01 + q) = v[1];
        *(ce_vf*)(y10 + q) = v[2];
        *(ce_vf*)(y11 + q) = v[3];
    }
}

/* lane masks interleaving two vectors: their low halves, their high halves */
#if CE_VBYTES == 64
#define CE_ZIP_LO {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23}
#define CE_ZIP_HI {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31}
#elif CE_VBYTES == 32
#define CE_ZIP_LO {0, 8, 1, 9, 2, 10, 3, 11}
#define CE_ZIP_HI {4, 12, 5, 13, 6, 14, 7, 15}
#else
#define CE_ZIP_LO {0, 4, 1, 5}
#define CE_ZIP_HI {2, 6, 3, 7}
#endif

/* dst[2q] = a[q], dst[2q + 1] = b[q] for q < n: a tile row's two output columns back in place */
static inline void ce_wino_merge_f(const float* restrict a, const float* restrict b, ptrdiff_t n,
                                   float* restrict dst)
{
    const ce_vi lo = CE_ZIP_LO, hi = CE_ZIP_HI;
    ptrdiff_t q = 0;
    for (; q + CE_WINO_VL <= n; q += CE_WINO_VL) {
        ce_vf va = *(const ce_vf*)(a + q), vb = *(const ce_vf*)(b + q);
        *(ce_vf*)(dst + 2 * q) = __builtin_shuffle(va, vb, lo);
        *(ce_vf*)(dst + 2 * q + CE_WINO_VL) = __builtin_shuffle(va, vb, hi);
    }
    for (; q < n; q++) {
        dst[2 * q] = a[q];
        dst[2 * q + 1] = b[q];
    }
}

/* The weight gradient's two kernels (conv_winograd_grad_weight.pxi). */

/* A g A^T of n tiles side by side (a run of one output channel's gradient g, the adjoint of the forward's output
 * transform): tile q's row r (r = 0, 1) has its even column at e[r * ld + q] and its odd one at o[r * ld + q]
 * (the caller's phase planes: winograd_grad_output): entry 4a + b of tile q to dst[(4a + b) * ss + q],
 * A = [1 0; 1 1; 1 -1; 0 -1] (A^T above). The rows' half (t0 = g0, t1 = g0 + g1, t2 = g0 - g1, t3 = -g1), then the
 * columns' the same way. The rows are read up to index n + VL - 1 (the caller's slack); only n tiles are stored. */
static inline void ce_wino_gout_f(const float* restrict e, const float* restrict o, ptrdiff_t ld, ptrdiff_t n,
                                  float* restrict dst, ptrdiff_t ss)
{
    for (ptrdiff_t q = 0; q < n; q += CE_WINO_VL) {
        ce_vf a = *(const ce_vf*)(e + q), b = *(const ce_vf*)(o + q);
        ce_vf c = *(const ce_vf*)(e + ld + q), d = *(const ce_vf*)(o + ld + q);
        ce_vf r0[4] = {a, a + c, a - c, -c}, r1[4] = {b, b + d, b - d, -d}, v[16];
        for (int i = 0; i < 4; i++) {
            v[4 * i] = r0[i];
            v[4 * i + 1] = r0[i] + r1[i];
            v[4 * i + 2] = r0[i] - r1[i];
            v[4 * i + 3] = -r1[i];
        }
        if (q + CE_WINO_VL <= n) {
            for (int s = 0; s < 16; s++) *(ce_vf*)(dst + s * ss + q) = v[s];
        } else {
            for (int s = 0; s < 16; s++) ce_vf_store_first(dst + s * ss + q, v[s], n - q);
        }
    }
}

/* The register block of ce_wino_gw_block: CE_WGW_KB output channels x CE_WGW_CB input channels of vector
 * accumulators (24 of AVX-512's 32 registers, 12 of AVX2's and SSE's 16), a multiple of CE_GI_NP. */
#define CE_WGW_KB (CE_MR / 2)
#define CE_WGW_CB (2 * CE_NV)

/* du[i * ldu + j] += the sum over q < n (a whole number of vectors) of m[i * lm + q] * v[j * lv + q], for
 * i < CE_WGW_KB and j < CE_WGW_CB: lane by lane over q in order, then each accumulator's lanes (ce_vf_hsum_np). */
static inline void ce_wino_gw_block(const float* restrict m, ptrdiff_t lm, const float* restrict v, ptrdiff_t lv,
                                    ptrdiff_t n, float* restrict du, ptrdiff_t ldu)
{
    ce_vf acc[CE_WGW_KB * CE_WGW_CB];
    float sums[CE_WGW_KB * CE_WGW_CB];
    for (int a = 0; a < CE_WGW_KB * CE_WGW_CB; a++) acc[a] = ce_vf_zero();
    for (ptrdiff_t q = 0; q < n; q += CE_WINO_VL) {
        ce_vf mv[CE_WGW_KB];
        for (int i = 0; i < CE_WGW_KB; i++) mv[i] = *(const ce_vf*)(m + i * lm + q);
        for (int j = 0; j < CE_WGW_CB; j++) {
            ce_vf vv = *(const ce_vf*)(v + j * lv + q);
            for (int i = 0; i < CE_WGW_KB; i++) acc[i * CE_WGW_CB + j] += mv[i] * vv;
        }
    }
    for (int a = 0; a < CE_WGW_KB * CE_WGW_CB; a += CE_GI_NP) ce_vf_hsum_np(acc + a, sums + a);
    for (int i = 0; i < CE_WGW_KB; i++)
        for (int j = 0; j < CE_WGW_CB; j++) du[i * ldu + j] += sums[i * CE_WGW_CB + j];
}

#endif
