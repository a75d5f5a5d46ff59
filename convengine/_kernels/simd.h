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
#elif defined(__AVX__)
#define CE_VBYTES 32
#define CE_MR 6
#define CE_NV 2
#define CE_NV_ALT 1
#else
#define CE_VBYTES 16
#define CE_MR 6
#define CE_NV 2
#define CE_NV_ALT 1
#endif

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

#endif
