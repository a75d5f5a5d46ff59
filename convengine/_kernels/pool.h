/* Max pooling's 2x2 stride-2 windows on output rows shorter than a vector (pool.pxi, max_pool2d_forward's fast
 * path: the batch as one tall image of output rows, r0 <= r < r1; output row r reads input rows 2r and 2r + 1,
 * columns 0 .. 2*OW - 1 of rows W apart, and writes y[r*OW + ow]).
 *
 * Consecutive output rows lie end to end in y, so one vector of outputs holds k = NL / OW whole rows. Their
 * input columns are gathered by masked loads, one per row and vector (masked-off lanes read nothing and cannot
 * fault: a row's 2*OW columns exactly, never the odd last column of an odd W, never a row past r1), into a pair of
 * vectors of the top rows and a pair of the bottom rows; two-source permutes split each pair into its even and
 * odd columns, the window's a, b (top) and c, d (bottom); then each window takes b, c, d in that order when
 * greater than its maximum so far or NaN, as max_pool_rows_2x2 does, so the values, indices and ties are the same
 * bits. The scalar loop it replaces (max_pool_rows_2x2_short) spent about 13 cycles a window: 16x16 planes
 * pooled to 8x8, 64 channels, batch 64, 1 thread, 0.86 -> 0.075 ms, with indices 0.92 -> 0.125 ms (Zen 4); it was
 * slower at every width from 1 to 15, float and double. Other ISAs keep the scalar loop (CE_POOL_SHORT 0).
 */
#ifndef CE_POOL_H
#define CE_POOL_H

#include <stddef.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define CE_POOL_SHORT 1

/* lanes [lo, hi) of a mask of nl lanes, clipped to [0, nl) */
static inline unsigned ce_pool_lanes(ptrdiff_t lo, ptrdiff_t hi, int nl)
{
    if (lo < 0) lo = 0;
    if (hi > nl) hi = nl;
    if (hi <= lo) return 0;
    return ((1u << (hi - lo)) - 1u) << lo;
}

/* Indices of a vector of windows: base (int64, the in-plane index of its first output row's row 0) + col (the
 * lane's window's top-left pixel relative to it) + the chosen tap's offset (b: 1, c: W, d: W + 1). For float the
 * 16 lanes are summed in int32 (col and the offsets are less than 34 * W, and W < 32 here) and widened at the end:
 * splitting the masks for two int64 halves went through general registers, and made the indices cost as much as
 * the values. */
static inline void ce_pool_idx_f(long long* out, __mmask16 keep, __mmask16 tb, __mmask16 tc, __mmask16 td,
                                 __m512i col, __m512i wv, const __m512i* base)
{
    __m512i v = _mm512_maskz_mov_epi32(tb, _mm512_set1_epi32(1));
    v = _mm512_mask_mov_epi32(v, tc, wv);
    v = _mm512_mask_mov_epi32(v, td, _mm512_add_epi32(wv, _mm512_set1_epi32(1)));
    v = _mm512_add_epi32(v, col);
    _mm512_mask_storeu_epi64(out, (__mmask8)keep, _mm512_add_epi64(base[0], _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v))));
    _mm512_mask_storeu_epi64(out + 8, (__mmask8)(keep >> 8),
                             _mm512_add_epi64(base[1], _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}
static inline void ce_pool_idx_d(long long* out, __mmask8 keep, __mmask8 tb, __mmask8 tc, __mmask8 td, __m512i col,
                                 __m512i wv, const __m512i* base)
{
    __m512i v = _mm512_maskz_mov_epi64(tb, _mm512_set1_epi64(1));
    v = _mm512_mask_mov_epi64(v, tc, wv);
    v = _mm512_mask_mov_epi64(v, td, _mm512_add_epi64(wv, _mm512_set1_epi64(1)));
    _mm512_mask_storeu_epi64(out, keep, _mm512_add_epi64(_mm512_add_epi64(v, col), base[0]));
}

/* Row widths below a vector, for a switch over them (each case one copy of the kernel with OW a constant). */
#define CE_POOL_OW_BELOW_8(CASE, BODY) CASE(1, BODY) CASE(2, BODY) CASE(3, BODY) CASE(4, BODY) CASE(5, BODY)   \
                                       CASE(6, BODY) CASE(7, BODY)
#define CE_POOL_OW_BELOW_16(CASE, BODY) CE_POOL_OW_BELOW_8(CASE, BODY) CASE(8, BODY) CASE(9, BODY)             \
                                        CASE(10, BODY) CASE(11, BODY) CASE(12, BODY) CASE(13, BODY)             \
                                        CASE(14, BODY) CASE(15, BODY)
#define CE_POOL_OW_CASE(N, BODY)                                                                               \
    case N:                                                                                                    \
        if (idx) BODY(x, y, idx, r0, r1, OH, N, W, 1); else BODY(x, y, idx, r0, r1, OH, N, W, 0);              \
        return;

/* One template, instantiated for float (16 lanes) and double (8 lanes) below. The body is inlined for every row
 * width below a vector and with and without indices: with OW a constant the loops over a vector's rows unroll
 * with constant masks and offsets (with OW a variable gcc unrolled them to the largest count and spilled their
 * offsets: 64x64x16x16, 1 thread, values 85 -> 61 us, with indices 137 -> 96 us). */
#define CE_POOL_2X2_SHORT(NAME, T, VEC, NL, MASK, ZERO, MLOAD, STOREM, PERM, CMP, BLEND, EVEN, ODD, IDX, SET1I,    \
                          OW_CASES)                                                                            \
/* the k rows (kk <= k) of output from row r = (p - x) / 2W on, q0 = r % OH */                                 \
static inline __attribute__((always_inline)) void NAME##_group(const T* p, T* yr, long long* ir, ptrdiff_t q0,  \
                                                               ptrdiff_t kk, ptrdiff_t OH, const ptrdiff_t OW,  \
                                                               ptrdiff_t W, __m512i col, const int with_idx)    \
{                                                                                                              \
    enum { NH = NL / 8 };                        /* vectors of 8 int64 indices per vector of outputs */        \
    const ptrdiff_t S = 2 * OW;                  /* input columns of an output row */                          \
    const ptrdiff_t j0 = (NL + S - 1) / S;       /* rows j < j0 reach the first vector of a pair */            \
    const ptrdiff_t j1 = NL / S;                 /* rows j >= j1 the second */                                 \
    const ptrdiff_t step = 2 * W - S;            /* lane S*j reads row 2(r + j) at p + j*step + S*j */         \
    const T* s;                                                                                                \
    VEC t0 = ZERO, t1 = ZERO, u0 = ZERO, u1 = ZERO, a, b, c, d, m;                                             \
    MASK tb, tc, td, keep;                                                                                     \
    __m512i base[NH];                                                                                          \
    ptrdiff_t j, t;                                                                                            \
    int h;                                                                                                     \
    /* the top rows into t0:t1, the bottom rows into u0:u1, row j at lanes S*j .. S*j + S - 1 */                \
    for (j = 0, s = p; j < j0 && j < kk; j++, s += step) {                                                     \
        MASK mj = (MASK)ce_pool_lanes(S * j, S * j + S, NL);                                                   \
        t0 = MLOAD(t0, mj, s);                                                                                 \
        u0 = MLOAD(u0, mj, s + W);                                                                             \
    }                                                                                                          \
    for (j = j1, s = p + j1 * step + NL; j < kk; j++, s += step) {                                             \
        MASK mj = (MASK)ce_pool_lanes(S * j - NL, S * j + S - NL, NL);                                         \
        t1 = MLOAD(t1, mj, s);                                                                                 \
        u1 = MLOAD(u1, mj, s + W);                                                                             \
    }                                                                                                          \
    a = PERM(t0, EVEN, t1);                                                                                    \
    b = PERM(t0, ODD, t1);                                                                                     \
    c = PERM(u0, EVEN, u1);                                                                                    \
    d = PERM(u0, ODD, u1);                                                                                     \
    /* greater, or NaN: a NaN maximum then yields only to a later NaN */                                       \
    m = a;                                                                                                     \
    tb = CMP(b, m, _CMP_GT_OQ) | CMP(b, b, _CMP_UNORD_Q);                                                      \
    m = BLEND(tb, m, b);                                                                                       \
    tc = CMP(c, m, _CMP_GT_OQ) | CMP(c, c, _CMP_UNORD_Q);                                                      \
    m = BLEND(tc, m, c);                                                                                       \
    td = CMP(d, m, _CMP_GT_OQ) | CMP(d, d, _CMP_UNORD_Q);                                                      \
    m = BLEND(td, m, d);                                                                                       \
    keep = (MASK)ce_pool_lanes(0, kk * OW, NL);                                                                \
    STOREM(yr, keep, m);                                                                                       \
    if (with_idx) {                                                                                            \
        for (h = 0; h < NH; h++) {                                                                             \
            base[h] = _mm512_set1_epi64(2 * W * q0);                                                           \
            /* rows past the end of their plane count again from 0 in the next */                              \
            for (t = OH - q0; t < kk; t += OH)                                                                 \
                base[h] = _mm512_mask_sub_epi64(base[h], (__mmask8)ce_pool_lanes(t * OW - 8 * h, NL, 8),       \
                                                base[h], _mm512_set1_epi64(2 * OH * W));                       \
        }                                                                                                      \
        IDX(ir, keep, tb, tc, td, col, SET1I(W), base);                                                        \
    }                                                                                                          \
}                                                                                                              \
static inline __attribute__((always_inline)) void NAME##_body(const T* x, T* y, long long* idx, ptrdiff_t r0,   \
                                                              ptrdiff_t r1, ptrdiff_t OH, const ptrdiff_t OW,   \
                                                              ptrdiff_t W, const int with_idx)                   \
{                                                                                                              \
    const ptrdiff_t k = NL / OW;                 /* output rows per vector */                                  \
    const ptrdiff_t kstep = k % OH;                                                                            \
    ptrdiff_t r = r0, l, q0 = r0 % OH;                                                                         \
    __m512i col;                                                                                               \
    if (NL == 16) {                                                                                            \
        int c32[16];                                                                                           \
        for (l = 0; l < NL; l++) c32[l] = (int)(2 * W * (l / OW) + 2 * (l % OW));                              \
        col = _mm512_loadu_si512(c32);                                                                         \
    } else {                                                                                                   \
        long long c64[8];                                                                                      \
        for (l = 0; l < 8; l++) c64[l] = 2 * W * (l / OW) + 2 * (l % OW);                                      \
        col = _mm512_loadu_si512(c64);                                                                         \
    }                                                                                                          \
    for (; r + k <= r1; r += k) {                                                                              \
        NAME##_group(x + 2 * r * W, y + r * OW, with_idx ? idx + r * OW : idx, q0, k, OH, OW, W, col, with_idx);\
        q0 += kstep;                                                                                           \
        if (q0 >= OH) q0 -= OH;                                                                                \
    }                                                                                                          \
    if (r < r1)                                                                                                \
        NAME##_group(x + 2 * r * W, y + r * OW, with_idx ? idx + r * OW : idx, q0, r1 - r, OH, OW, W, col,     \
                     with_idx);                                                                                \
}                                                                                                              \
/* OW < NL; rows r0 <= r < r1 of the tall image; idx NULL: values only */                                      \
static inline void NAME(const T* x, T* y, long long* idx, ptrdiff_t r0, ptrdiff_t r1, ptrdiff_t OH, ptrdiff_t OW,\
                        ptrdiff_t W)                                                                           \
{                                                                                                              \
    switch (OW) {                                                                                              \
    OW_CASES(CE_POOL_OW_CASE, NAME##_body)                                                                     \
    }                                                                                                          \
}

CE_POOL_2X2_SHORT(ce_max_pool_2x2_short_f, float, __m512, 16, __mmask16, _mm512_setzero_ps(),
                  _mm512_mask_loadu_ps, _mm512_mask_storeu_ps, _mm512_permutex2var_ps, _mm512_cmp_ps_mask,
                  _mm512_mask_blend_ps,
                  _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                  _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31),
                  ce_pool_idx_f, _mm512_set1_epi32, CE_POOL_OW_BELOW_16)
CE_POOL_2X2_SHORT(ce_max_pool_2x2_short_d, double, __m512d, 8, __mmask8, _mm512_setzero_pd(),
                  _mm512_mask_loadu_pd, _mm512_mask_storeu_pd, _mm512_permutex2var_pd, _mm512_cmp_pd_mask,
                  _mm512_mask_blend_pd, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14),
                  _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), ce_pool_idx_d, _mm512_set1_epi64, CE_POOL_OW_BELOW_8)
#else
/* Other ISAs take the scalar loop in pool.pxi (CE_POOL_SHORT 0); these are never called. */
#define CE_POOL_SHORT 0
static inline void ce_max_pool_2x2_short_f(const float* x, float* y, long long* idx, ptrdiff_t r0, ptrdiff_t r1,
                                           ptrdiff_t OH, ptrdiff_t OW, ptrdiff_t W) {}
static inline void ce_max_pool_2x2_short_d(const double* x, double* y, long long* idx, ptrdiff_t r0, ptrdiff_t r1,
                                           ptrdiff_t OH, ptrdiff_t OW, ptrdiff_t W) {}
#endif

/* max_pool2d_backward's scatter for 2x2 stride-2 windows without padding, as a map: output row oh's windows
 * expanded into the input rows 2oh and 2oh + 1 that they cover. Window j (top-left at base + 2j) puts 0 + dy[j]
 * (the scatter's add to a zero, so the same bits, -0 included) at the one of its four pixels that idx[j] names
 * (offset 0, 1, W or W + 1), zeros at the others; columns from 2*OW up to W are zero; unless keep is NULL (the
 * plane of the ReLU output that was pooled), zero too where keep <= 0. OW is a multiple of 8. Returns how many
 * windows' idx named none of their pixels (out of range or elsewhere in the plane): the caller then scatters that
 * plane instead (max_pool_plane_backward), which also counts the out-of-range ones; a miss in the first output
 * row returns at once (another pooling's indices, 3x3 windows say, miss there).
 * Eight windows a step, in gcc's vector types (lowered to the ISA's vectors): the offsets in int64, four compares,
 * the masked values interleaved into the two rows' 16 columns. The scalar scatter it replaces (a memset of the
 * plane, then a load, two bound checks and a dependent add a window) was 60% of the fused batch norm + ReLU + max
 * pool backward's first pass (Zen 5, perf). A scalar loop for the windows past a multiple of 8 made 28x28 planes
 * 5x slower than the scatter (Zen 5): the caller scatters such planes (CE_POOL_EXPAND 0 where the compiler lacks
 * __builtin_shufflevector: always). */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector) && __has_builtin(__builtin_convertvector)
#define CE_POOL_EXPAND 1
#endif
#endif

#ifdef CE_POOL_EXPAND
typedef long long ce_pool_vl8 __attribute__((vector_size(64)));

#define CE_POOL_EXPAND_FN(SUFFIX, T, VT8, VI8, VT16, VI16)                                                    \
static inline ptrdiff_t ce_pool2x2_expand_##SUFFIX(const T* dy, const long long* idx, ptrdiff_t OH,           \
                                                   ptrdiff_t OW, ptrdiff_t W, const T* keep, T* dst)          \
{                                                                                                              \
    const ce_pool_vl8 pair = {0, 2, 4, 6, 8, 10, 12, 14};                                                      \
    VI8 none = {0};                                                                                            \
    ptrdiff_t oh, j, c, misses = 0;                                                                            \
    for (oh = 0; oh < OH; oh++, dy += OW, idx += OW) {                                                         \
        T* top = dst + 2 * oh * W;                                                                             \
        T* bot = top + W;                                                                                      \
        long long base = 2 * oh * W;                                                                           \
        for (j = 0; j < OW; j += 8) {                                                                          \
            ce_pool_vl8 o;                                                                                     \
            VT8 d, z = {0};                                                                                    \
            VI8 di;                                                                                            \
            memcpy(&o, idx + j, sizeof o);                                                                     \
            memcpy(&d, dy + j, sizeof d);                                                                      \
            o -= base + 2 * j + pair;                                                                          \
            d = z + d;                                                                                         \
            memcpy(&di, &d, sizeof di);                                                                        \
            VI8 m0 = __builtin_convertvector(o == 0, VI8), m1 = __builtin_convertvector(o == 1, VI8);          \
            VI8 m2 = __builtin_convertvector(o == (long long)W, VI8);                                          \
            VI8 m3 = __builtin_convertvector(o == (long long)W + 1, VI8);                                      \
            VI16 t = __builtin_shufflevector(di & m0, di & m1, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15); \
            VI16 b = __builtin_shufflevector(di & m2, di & m3, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15); \
            if (keep) {                                                                                        \
                VT16 kt, kb;                                                                                   \
                memcpy(&kt, keep + 2 * oh * W + 2 * j, sizeof kt);                                             \
                memcpy(&kb, keep + (2 * oh + 1) * W + 2 * j, sizeof kb);                                       \
                t &= ~(kt <= 0);                                                                               \
                b &= ~(kb <= 0);                                                                               \
            }                                                                                                  \
            memcpy(top + 2 * j, &t, sizeof t);                                                                 \
            memcpy(bot + 2 * j, &b, sizeof b);                                                                 \
            none -= ~(m0 | m1 | m2 | m3);                                                                      \
        }                                                                                                      \
        for (c = 2 * OW; c < W; c++)                                                                           \
            top[c] = bot[c] = 0;                                                                               \
        if (oh == 0 || oh == OH - 1) {                                                                         \
            for (j = 0; j < 8; j++) {                                                                          \
                misses += none[j];                                                                             \
                none[j] = 0;                                                                                   \
            }                                                                                                  \
            if (misses) return misses;                                                                         \
        }                                                                                                      \
    }                                                                                                          \
    return misses;                                                                                             \
}

typedef float ce_pool_vf8 __attribute__((vector_size(32)));
typedef int ce_pool_vi8 __attribute__((vector_size(32)));
typedef float ce_pool_vf16 __attribute__((vector_size(64)));
typedef int ce_pool_vi16 __attribute__((vector_size(64)));
typedef double ce_pool_vd8 __attribute__((vector_size(64)));
typedef double ce_pool_vd16 __attribute__((vector_size(128)));
typedef long long ce_pool_vl16 __attribute__((vector_size(128)));
CE_POOL_EXPAND_FN(f, float, ce_pool_vf8, ce_pool_vi8, ce_pool_vf16, ce_pool_vi16)
CE_POOL_EXPAND_FN(d, double, ce_pool_vd8, ce_pool_vl8, ce_pool_vd16, ce_pool_vl16)
#else
#define CE_POOL_EXPAND 0
static inline ptrdiff_t ce_pool2x2_expand_f(const float* dy, const long long* idx, ptrdiff_t OH, ptrdiff_t OW,
                                            ptrdiff_t W, const float* keep, float* dst) { return 1; }
static inline ptrdiff_t ce_pool2x2_expand_d(const double* dy, const long long* idx, ptrdiff_t OH, ptrdiff_t OW,
                                            ptrdiff_t W, const double* keep, double* dst) { return 1; }
#endif

#endif
