/* Register tile and vector types of the GEMM micro-kernel, chosen by the ISA the module is compiled for.
 *
 * GCC/Clang vector extensions (not intrinsics) keep the micro-kernel written in Cython yet put the MR x NV
 * accumulators in vector registers: plain scalar loops over `acc[MR][NR]` were vectorised unreliably by gcc 12
 * (from 5 to 250 GFLOP/s depending on MR, NR and dtype). MR x NV accumulators + NV loads + 1 broadcast must fit the
 * register file: 32 zmm on AVX-512, 16 ymm/xmm otherwise. CE_NV_ALT is a narrower tile for GEMMs whose column
 * count the wide one would pad badly (64 output channels on a 48-wide tile).
 */
#ifndef CE_SIMD_H
#define CE_SIMD_H

#if defined(__AVX512F__)
#define CE_VBYTES 64
#define CE_MR 8
#define CE_NV 3
#define CE_NV_ALT 2
#define CE_GI_NP 8
#define CE_GW_T 24
#elif defined(__AVX__)
#define CE_VBYTES 32
#define CE_MR 6
#define CE_NV 2
#define CE_NV_ALT 1
#define CE_GI_NP 4
#define CE_GW_T 12
#else
#define CE_VBYTES 16
#define CE_MR 6
#define CE_NV 2
#define CE_NV_ALT 1
#define CE_GI_NP 4
#define CE_GW_T 12
#endif
/* CE_GI_NP: output pixels per tile of the lane-reduction grad_input (conv_grad_input.pxi), 3 channels each: 3 x 8
   accumulators + 3 weight vectors + 1 dY vector of AVX-512's 32 registers, 3 x 4 + 4 of 16 otherwise. */
#define CE_GI_CB 3
/* CE_GW_T: taps per tile of the lane grad_weight (conv_grad_weight.pxi): one accumulator each, + the dY vector. */
/* CE_SGW_MR: output channels per tile of the first layers' grad_weight (conv_smallc.pxi), 3 taps each: 8 x 3
   accumulators + 3 input vectors + 1 dY vector of AVX-512's 32 registers; 4 x 3 + 4 of AVX2's 16 (CE_MR = 6 made
   18 accumulators, which spilled: AMD Zen 4, 1 thread, batch 64/128, ms: 3x30x30 -> 32 3x3 4.5 -> 3.0, 1x28x28
   -> 32 5x5 7.8 -> 5.9). SSE keeps 6: 4 there was faster on two of four shapes and slower on two. */
#if defined(__AVX512F__)
#define CE_SGW_MR 8
#elif defined(__AVX__)
#define CE_SGW_MR 4
#else
#define CE_SGW_MR 6
#endif

/* A prefetch into L2 (prefetcht1): rows a block will copy, fetched while the block before computes. */
#define ce_prefetch_l2(p) __builtin_prefetch((const void*)(p), 0, 2)

typedef float ce_vf __attribute__((vector_size(CE_VBYTES), aligned(4)));
typedef double ce_vd __attribute__((vector_size(CE_VBYTES), aligned(8)));

static inline ce_vf ce_vf_zero(void) { ce_vf z = {0}; return z; }

/* A vector load kept in a register: gcc folds a loaded vector that several FMAs use into each of them as a memory
   operand, a load per FMA (smallc_gw_rows: 27 loads per 24 FMAs, load-bound on Zen 4); the empty asm hides the
   value's origin so it is loaded once. */
static inline ce_vf ce_vf_load_reg(const float* p) { ce_vf v = *(const ce_vf*)p; __asm__("" : "+v"(v)); return v; }

/* relu on a vector, as the scalar `0 if v <= 0 else v`: NaN stays NaN (its compare is false), -0 becomes +0. */
typedef int ce_vi __attribute__((vector_size(CE_VBYTES)));
static inline ce_vf ce_vf_relu(ce_vf v) { return (ce_vf)((ce_vi)v & ~(ce_vi)(v <= 0)); }
static inline ce_vd ce_vd_zero(void) { ce_vd z = {0}; return z; }

/* The sums of the lanes of each of CE_GI_NP vectors, into out[0..CE_GI_NP), each in one fixed order. On AVX-512 the
   eight vectors are reduced together, transposing as they are added (pairs within 128-bit blocks, then blocks):
   22 shuffles and adds for the eight, where one vector's own halving took ~8 and a trip through memory (perf: the
   lane sums took as long as the FMAs of LeNet-5's grad_input). */
#if defined(__AVX512F__)
#include <immintrin.h>
#if CE_GI_NP != 8
#error "ce_vf_hsum_np reduces eight vectors on AVX-512"
#endif
static inline void ce_vf_hsum_np(const ce_vf* v, float* out) {
#define CE_PAIR_SUM(a, b) _mm512_add_ps(_mm512_unpacklo_ps((__m512)(a), (__m512)(b)), \
                                       _mm512_unpackhi_ps((__m512)(a), (__m512)(b)))
    __m512 u01 = CE_PAIR_SUM(v[0], v[1]), u23 = CE_PAIR_SUM(v[2], v[3]);
    __m512 u45 = CE_PAIR_SUM(v[4], v[5]), u67 = CE_PAIR_SUM(v[6], v[7]);
#undef CE_PAIR_SUM
    /* per 128-bit block: [u01: v0 v1 v0 v1] -> [v0 v1 v2 v3] of that block's four lanes */
    __m512 w03 = _mm512_add_ps(_mm512_shuffle_ps(u01, u23, 0x44), _mm512_shuffle_ps(u01, u23, 0xEE));
    __m512 w47 = _mm512_add_ps(_mm512_shuffle_ps(u45, u67, 0x44), _mm512_shuffle_ps(u45, u67, 0xEE));
    /* blocks: [w03 b0 + b1, w03 b2 + b3, w47 b0 + b1, w47 b2 + b3] */
    __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(w03, w47, 0x88), _mm512_shuffle_f32x4(w03, w47, 0xDD));
    /* [x b0 + b1 (v0..v3), x b2 + b3 (v4..v7)] in the low 256 bits */
    __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(x, x, 0x08), _mm512_shuffle_f32x4(x, x, 0x0D));
    _mm256_storeu_ps(out, _mm512_castps512_ps256(y));
}
#else
static inline void ce_vf_hsum_np(const ce_vf* v, float* out) {
    float a[CE_VBYTES / sizeof(float)];
    int w, i, j;
    for (j = 0; j < CE_GI_NP; j++) {
        __builtin_memcpy(a, &v[j], sizeof v[j]);
        for (w = CE_VBYTES / sizeof(float) / 2; w >= 1; w /= 2)
            for (i = 0; i < w; i++)
                a[i] += a[i + w];
        out[j] = a[0];
    }
}
#endif

/* Rows of a conv's zero-padded input copy: for r < nrows, dst[r*ld_dst + i] = src[r*ld_src + i] for lo <= i < hi
   and 0 for the other i < n (0 <= lo <= hi <= n). src is read only inside [lo, hi) of each row (masked lanes of a
   vector load do not fault); ld_src is not read where hi == lo (zero rows: pass src = dst). The masks are made
   once per vector column, each row then a masked load and store. Per-row memset + memcpy + memset (or gcc's own
   calls for plain copy loops) took 4-9% of a 3x3 conv's forward on 8- to 32-float rows (Zen 4, 64x64x8x8 -> 128,
   64x32x16x16 -> 64), most of it the calls' fixed cost. */
#if defined(__AVX512F__)
/* The mask of a vector's first n lanes (0 <= n <= VL). */
static inline __mmask16 ce_mask_first(long n) { return (__mmask16)((1u << n) - 1u); }
/* The mask of lanes lo <= i < hi of a vector, either bound clamped to [0, 16]. */
static inline __mmask16 ce_mask_range(long lo, long hi) {
    lo = lo < 0 ? 0 : (lo > 16 ? 16 : lo);
    hi = hi < 0 ? 0 : (hi > 16 ? 16 : hi);
    return (__mmask16)(ce_mask_first(hi) & ~ce_mask_first(lo));
}
static inline void ce_copy_rows(float* dst, long ld_dst, const float* src, long ld_src, long nrows, long n,
                                long lo, long hi) {
    long o, r;
    for (o = 0; o < n; o += 16) {
        __mmask16 live = ce_mask_range(lo - o, hi - o);
        __mmask16 keep = ce_mask_first(n - o > 16 ? 16 : n - o);
        if (live == 0) {
            for (r = 0; r < nrows; r++)
                _mm512_mask_storeu_ps(dst + r * ld_dst + o, keep, _mm512_setzero_ps());
        } else {
            for (r = 0; r < nrows; r++)
                _mm512_mask_storeu_ps(dst + r * ld_dst + o, keep, _mm512_maskz_loadu_ps(live, src + r * ld_src + o));
        }
    }
}
#elif defined(__AVX2__)
#include <immintrin.h>
/* The mask of a vector's first n lanes (0 <= n <= VL). */
static inline __m256i ce_mask_first(long n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline void ce_copy_rows(float* dst, long ld_dst, const float* src, long ld_src, long nrows, long n,
                                long lo, long hi) {
    long o, a, b, r;
    for (o = 0; o < n; o += 8) {
        a = lo - o < 0 ? 0 : (lo - o > 8 ? 8 : lo - o);
        b = hi - o < 0 ? 0 : (hi - o > 8 ? 8 : hi - o);
        /* lanes a <= i < b are read, the first n - o written */
        __m256i live = _mm256_andnot_si256(ce_mask_first(a), ce_mask_first(b));
        __m256i keep = ce_mask_first(n - o > 8 ? 8 : n - o);
        for (r = 0; r < nrows; r++)
            _mm256_maskstore_ps(dst + r * ld_dst + o, keep,
                                a < b ? _mm256_maskload_ps(src + r * ld_src + o, live) : _mm256_setzero_ps());
    }
}
#else
/* ce_copy_rows reading every step-th column (ce_copy_rows_s2's fallback too) */
static inline void ce_copy_rows_step(float* dst, long ld_dst, const float* src, long ld_src, long nrows, long n,
                                     long lo, long hi, long step) {
    long i, r;
    for (r = 0; r < nrows; r++) {
        for (i = 0; i < lo; i++) dst[r * ld_dst + i] = 0;
        for (i = lo; i < hi; i++) dst[r * ld_dst + i] = src[r * ld_src + step * i];
        for (i = hi; i < n; i++) dst[r * ld_dst + i] = 0;
    }
}
static inline void ce_copy_rows(float* dst, long ld_dst, const float* src, long ld_src, long nrows, long n,
                                long lo, long hi) {
    ce_copy_rows_step(dst, ld_dst, src, ld_src, nrows, n, lo, hi, 1);
}
#endif

/* ce_copy_rows reading every other column: dst[r*ld_dst + i] = src[r*ld_src + 2*i] for lo <= i < hi, 0 for the
   other i < n; src is read only at 2*lo .. 2*hi - 2 of each row. The stride-2 row-vector conv's input copies (a
   scalar loop took a quarter of a 64x32x32x32 -> 64 stride-2 3x3 forward, Zen 4): two masked loads and one
   two-source permute per vector. */
#if defined(__AVX512F__)
/* bit i of m (i < 8) to bit 2i */
static inline __mmask16 ce_mask_spread(unsigned m) {
    m = (m | (m << 4)) & 0x0F0Fu;
    m = (m | (m << 2)) & 0x3333u;
    return (__mmask16)((m | (m << 1)) & 0x5555u);
}
static inline void ce_copy_rows_s2(float* dst, long ld_dst, const float* src, long ld_src, long nrows, long n,
                                   long lo, long hi) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    long o, r;
    for (o = 0; o < n; o += 16) {
        unsigned live = ce_mask_range(lo - o, hi - o);
        __mmask16 keep = ce_mask_first(n - o > 16 ? 16 : n - o);
        __mmask16 ml = ce_mask_spread(live & 0xFFu), mh = ce_mask_spread(live >> 8);
        for (r = 0; r < nrows; r++) {
            const float* s = src + r * ld_src + 2 * o;
            __m512 v = _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(ml, s), even, _mm512_maskz_loadu_ps(mh, s + 16));
            _mm512_mask_storeu_ps(dst + r * ld_dst + o, keep, v);
        }
    }
}
#elif defined(__AVX2__)
static inline void ce_copy_rows_s2(float* dst, long ld_dst, const float* src, long ld_src, long nrows, long n,
                                   long lo, long hi) {
    /* load lanes j of the two source vectors where 2*o + j lies in [2*lo, 2*hi - 1) */
    long o, r, l0, l1;
    for (o = 0; o < n; o += 8) {
        l0 = 2 * lo - 2 * o;
        l1 = 2 * hi - 1 - 2 * o;
        __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i ml = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(l0 < -1 ? -1 : l0 > 16 ? 16 : l0)),
                                                            lanes),
                                         _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(l1 < 0 ? 0 : l1 > 17 ? 17 : l1)),
                                                            lanes));
        __m256i lanes8 = _mm256_add_epi32(lanes, _mm256_set1_epi32(8));
        __m256i mh = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(l0 < -1 ? -1 : l0 > 16 ? 16 : l0)),
                                                            lanes8),
                                         _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(l1 < 0 ? 0 : l1 > 17 ? 17 : l1)),
                                                            lanes8));
        __m256i keep = ce_mask_first(n - o > 8 ? 8 : n - o);
        for (r = 0; r < nrows; r++) {
            const float* s = src + r * ld_src + 2 * o;
            __m256 x0 = _mm256_maskload_ps(s, ml), x1 = _mm256_maskload_ps(s + 8, mh);
            /* [x0 0 2 | x1 0 2 | x0 4 6 | x1 4 6] -> 64-bit pairs in order 0 2 1 3 */
            __m256 v = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(x0, x1, 0x88)),
                                                              0xD8));
            _mm256_maskstore_ps(dst + r * ld_dst + o, keep, v);
        }
    }
}
#else
static inline void ce_copy_rows_s2(float* dst, long ld_dst, const float* src, long ld_src, long nrows, long n,
                                   long lo, long hi) {
    ce_copy_rows_step(dst, ld_dst, src, ld_src, nrows, n, lo, hi, 2);
}
#endif

/* A channels-last copy: dst[t*ld_dst + c] = src[c*ld_src + t] for c < nch, t < n (grad_weight's pixel path copies
   each input row of all channels so). On AVX-512 by 16 x 16 blocks transposed in registers (unpacks, then 128-bit
   lane shuffles), partial blocks under masks: a scalar store per element, each to another pixel's line, took 7-9%
   of a stride-1 3x3 grad_weight and 19% of a stride-2 one (Zen 4). */
#if defined(__AVX512F__)
static inline void ce_transpose16(__m512 r[16]) {
    __m512 t[16];
    int i, j;
    for (i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (i = 0; i < 4; i++) {
        __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (i = 0; i < 2; i++)
        for (j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
            t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
        }
    for (j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}
static inline void ce_transpose_rows(float* dst, long ld_dst, const float* src, long ld_src, long nch, long n) {
    __m512 r[16];
    long c0, t0, i, mc, mt;
    for (c0 = 0; c0 < nch; c0 += 16) {
        mc = nch - c0 > 16 ? 16 : nch - c0;
        for (t0 = 0; t0 < n; t0 += 16) {
            mt = n - t0 > 16 ? 16 : n - t0;
            for (i = 0; i < 16; i++)
                r[i] = i < mc ? _mm512_maskz_loadu_ps(ce_mask_first(mt), src + (c0 + i) * ld_src + t0)
                              : _mm512_setzero_ps();
            ce_transpose16(r);
            for (i = 0; i < mt; i++)
                _mm512_mask_storeu_ps(dst + (t0 + i) * ld_dst + c0, ce_mask_first(mc), r[i]);
        }
    }
}
#else
static inline void ce_transpose_rows(float* dst, long ld_dst, const float* src, long ld_src, long nch, long n) {
    long c, t;
    for (c = 0; c < nch; c++)
        for (t = 0; t < n; t++)
            dst[t * ld_dst + c] = src[c * ld_src + t];
}
#endif

/* The first n < VL floats at p in a vector, the other lanes zero; nothing past p[n - 1] is read. And its twin
   that stores the first n lanes of v at p, nothing past p[n - 1] written. */
#if defined(__AVX512F__)
static inline ce_vf ce_vf_load_first(const float* p, long n) {
    return (ce_vf)_mm512_maskz_loadu_ps(ce_mask_first(n), p);
}
static inline void ce_vf_store_first(float* p, ce_vf v, long n) {
    _mm512_mask_storeu_ps(p, ce_mask_first(n), (__m512)v);
}
#elif defined(__AVX2__)
static inline ce_vf ce_vf_load_first(const float* p, long n) {
    return (ce_vf)_mm256_maskload_ps(p, ce_mask_first(n));
}
static inline void ce_vf_store_first(float* p, ce_vf v, long n) {
    _mm256_maskstore_ps(p, ce_mask_first(n), (__m256)v);
}
#else
static inline ce_vf ce_vf_load_first(const float* p, long n) {
    ce_vf v = {0};
    long i;
    for (i = 0; i < n; i++) v[i] = p[i];
    return v;
}
static inline void ce_vf_store_first(float* p, ce_vf v, long n) {
    long i;
    for (i = 0; i < n; i++) p[i] = v[i];
}
#endif

/* The build's float32 multiply-add peak on one core: CE_FMA_CHAINS independent chains of a = a * b + c over whole
   vectors, iters rounds of each, from distinct starting values (equal ones let gcc merge the chains into one,
   latency-bound). Two FMA units of 4-cycle latency need 8 chains in flight; 12 leave room and fit 16 registers.
   Returns the lanes' sum, so that the work is kept. (The builds without FMA, baseline, run a multiply and an add.) */
#define CE_FMA_CHAINS 12
static inline float ce_fma_chains(long iters, float start) {
    ce_vf a[CE_FMA_CHAINS];
    ce_vf b = ce_vf_zero() + 0.999f, c = ce_vf_zero() + 1e-3f, s = ce_vf_zero();
    long it;
    int i;
    float total = 0.0f;
    for (i = 0; i < CE_FMA_CHAINS; i++)
        a[i] = ce_vf_zero() + (start + (float)i);
    for (it = 0; it < iters; it++)
        for (i = 0; i < CE_FMA_CHAINS; i++)
            a[i] = a[i] * b + c;
    for (i = 0; i < CE_FMA_CHAINS; i++)
        s += a[i];
    for (i = 0; i < (int)(CE_VBYTES / sizeof(float)); i++)
        total += s[i];
    return total;
}

#endif
