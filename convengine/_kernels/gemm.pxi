# Packed, register-blocked GEMM (BLIS style): the micro-kernel, the macro-kernel over packed panels, and a
# strided GEMM for dense layers. Convolution builds on the same pieces with its own packers (conv.pxi).
#
# Packed layouts (zero-padded to whole tiles, so the micro-kernel never sees a partial tile):
#   A block (m x k):  panels of MR rows;    panel ip holds a[ip*MR + i, p] at  [ip*MR*kc + p*MR + i]
#   B block (k x n):  panels of NR columns; panel jp holds b[p, jp*NR + j] at [jp*NR*kc + p*NR + j]

from libc.string cimport memset, memcpy
from libc.stdint cimport uint32_t, uint64_t
from cython.parallel cimport prange, parallel
from cython cimport floating
import time

cdef extern from "simd.h":
    enum: CE_MR
    enum: CE_NV
    enum: CE_NV_ALT
    enum: CE_VBYTES
    ctypedef float vfloat "ce_vf"
    ctypedef double vdouble "ce_vd"
    vfloat ce_vf_zero() nogil
    vfloat ce_vf_load_first(const float* p, long n) nogil
    void ce_vf_store_first(float* p, vfloat v, long n) nogil
    vfloat ce_vf_load_reg(const float* p) nogil
    void ce_vf_hsum_np(const vfloat* v, float* out) nogil
    enum: CE_GI_NP
    enum: CE_SGW_MR
    enum: CE_GI_CB
    enum: CE_GW_T
    vfloat ce_vf_relu(vfloat v) nogil
    vdouble ce_vd_zero() nogil
    void ce_copy_rows(float* dst, long ld_dst, const float* src, long ld_src, long nrows, long n, long lo,
                      long hi) nogil
    void ce_prefetch "__builtin_prefetch"(const void* p) nogil
    void ce_prefetch_l2(const void* p) nogil
    void ce_transpose_rows(float* dst, long ld_dst, const float* src, long ld_src, long nch, long n) nogil
    void ce_copy_rows_s2(float* dst, long ld_dst, const float* src, long ld_src, long nrows, long n, long lo,
                         long hi) nogil
    float ce_fma_chains(long iters, float start) nogil
    enum: CE_FMA_CHAINS

# Tags selecting the micro-kernel's width at compile time (see ukernel_f).
cdef struct wide_tile:
    char unused
cdef struct narrow_tile:
    char unused
ctypedef fused tile_width:
    wide_tile
    narrow_tile

cdef extern from *:
    """
    #ifndef CE_BUILD_CFLAGS
    #define CE_BUILD_CFLAGS ""
    #endif
    """
    const char* CE_BUILD_CFLAGS

CFLAGS = CE_BUILD_CFLAGS.decode()


cdef inline Py_ssize_t vlen(floating dummy) noexcept nogil:
    return CE_VBYTES // sizeof(floating)


cdef inline Py_ssize_t tile_n(floating dummy) noexcept nogil:
    """NR of the widest register tile: CE_NV vectors."""
    return CE_NV * (CE_VBYTES // sizeof(floating))


cdef inline int pick_nv(Py_ssize_t n) noexcept nogil:
    """Vectors per tile row for a GEMM whose columns fill n vectors: the wide tile unless the narrow one pads n
    to fewer (64 float32 columns: 2 x 32 instead of 2 x 48 on AVX-512, a third less wasted work)."""
    cdef Py_ssize_t wide = (n + CE_NV - 1) // CE_NV * CE_NV
    cdef Py_ssize_t narrow = (n + CE_NV_ALT - 1) // CE_NV_ALT * CE_NV_ALT
    return CE_NV_ALT if narrow < wide else CE_NV


cdef inline Py_ssize_t block_k(floating dummy) noexcept nogil:
    """KC: depth of a packed block; a kc x NR micro-panel of B then stays in L1 (32 KiB of it)."""
    return 256 if floating is float else 128


cdef inline Py_ssize_t balanced_block(Py_ssize_t n, Py_ssize_t max_block) noexcept nogil:
    """The block size <= max_block that cuts n into the fewest, most equal blocks (288 -> 144 + 144, not
    256 + 32: a short last block pays the tile load/store for little work)."""
    cdef Py_ssize_t nblocks = (n + max_block - 1) // max_block
    return (n + nblocks - 1) // nblocks if nblocks > 0 else max_block


cdef inline Py_ssize_t round_up(Py_ssize_t n, Py_ssize_t m) noexcept nogil:
    return (n + m - 1) // m * m


def tile_info():
    """The register tile (MR, NR) per dtype of this build."""
    return {"MR": CE_MR, "NR_float32": CE_NV * CE_VBYTES // 4, "NR_float64": CE_NV * CE_VBYTES // 8,
            "NR_narrow_float32": CE_NV_ALT * CE_VBYTES // 4,
            "vector_bytes": CE_VBYTES}


def fma_peak_gflops(int n_threads, long iters=1000000):
    """The build's float32 multiply-add peak on n_threads threads, GFLOP/s (a multiply-add counts 2): each thread
    of the team runs ce_fma_chains (independent chains of whole-vector multiply-adds in registers, no memory) for
    iters rounds, timed over the whole team. What the micro-kernels' rates are measured against: a library's
    matmul can be far below it (numpy's and PyTorch's float32 matmul read 121-224 and 187-200 GFLOP/s on two AMD
    Zen 5 cores whose peak here read 474-490). One call; take the best of several, as other work on the machine only
    lowers it."""
    cdef int t
    cdef float[64] sink
    if n_threads < 1 or iters < 1:
        raise ValueError(f"fma_peak_gflops: n_threads and iters must be >= 1, got {n_threads} and {iters}")
    if n_threads > 64:
        raise ValueError(f"fma_peak_gflops: at most 64 threads, got {n_threads}")
    start = time.perf_counter()
    with nogil:
        for t in prange(n_threads, schedule='static', chunksize=1, num_threads=n_threads):
            sink[t] = ce_fma_chains(iters, <float>t)
    seconds = time.perf_counter() - start
    if not all(sink[t] == sink[t] for t in range(n_threads)):      # kept; NaN would mean the chains went wrong
        raise FloatingPointError("fma_peak_gflops: the chains did not stay finite")
    return n_threads * iters * CE_FMA_CHAINS * 2.0 * (CE_VBYTES // 4) / seconds / 1e9


cdef void ukernel_f(Py_ssize_t kc, const float** arow, Py_ssize_t a_cs, const float** brow, Py_ssize_t boff,
                    float* c, Py_ssize_t ldc, bint accumulate, tile_width* width) noexcept nogil:
    """c[MR, nv*VL] (+)= a[MR, kc] b[kc, nv*VL], the accumulators held in vector registers.

    Row i of A is arow[i][0], arow[i][a_cs], ... (packed panels: arow[i] = panel + i, a_cs = MR; row-major or
    rows of the input itself: a_cs = 1). Row p of B is the nv*VL values at brow[p] + boff. Reaching rows through
    tables lets an operand be a packed panel, a row-major block, or rows of a zero-padded input at the offsets of
    the kernel taps: the direct convolution that needs no im2col. In cache this runs at the machine's FMA peak
    (measured 258 GFLOP/s on one Zen 5 core, within 2% of a plain packed kernel). The tile width is a fused
    type, so each width is its own C function with nv a constant that gcc unrolls to registers (an int argument,
    even inlined, left the accumulators on the stack at a quarter of the speed).
    """
    cdef vfloat acc[CE_MR][CE_NV]
    cdef vfloat bv[CE_NV]
    cdef const float* ap[CE_MR]
    cdef Py_ssize_t i, j, p
    cdef Py_ssize_t VL = CE_VBYTES // sizeof(float)
    cdef int nv
    if tile_width is wide_tile:
        nv = CE_NV
    else:
        nv = CE_NV_ALT
    for i in range(CE_MR):
        ap[i] = arow[i]
        for j in range(nv):
            acc[i][j] = ce_vf_zero()
    for p in range(kc):
        for j in range(nv):
            bv[j] = (<const vfloat*>(brow[p] + boff + j * VL))[0]
        for i in range(CE_MR):
            for j in range(nv):
                acc[i][j] += ap[i][p * a_cs] * bv[j]
    if accumulate:
        for i in range(CE_MR):
            for j in range(nv):
                (<vfloat*>(c + i * ldc + j * VL))[0] += acc[i][j]
    else:
        for i in range(CE_MR):
            for j in range(nv):
                (<vfloat*>(c + i * ldc + j * VL))[0] = acc[i][j]


cdef void ukernel_d(Py_ssize_t kc, const double** arow, Py_ssize_t a_cs, const double** brow, Py_ssize_t boff,
                    double* c, Py_ssize_t ldc, bint accumulate, tile_width* width) noexcept nogil:
    """The float64 twin of ukernel_f (a vector type is one concrete type per function)."""
    cdef vdouble acc[CE_MR][CE_NV]
    cdef vdouble bv[CE_NV]
    cdef const double* ap[CE_MR]
    cdef Py_ssize_t i, j, p
    cdef Py_ssize_t VL = CE_VBYTES // sizeof(double)
    cdef int nv
    if tile_width is wide_tile:
        nv = CE_NV
    else:
        nv = CE_NV_ALT
    for i in range(CE_MR):
        ap[i] = arow[i]
        for j in range(nv):
            acc[i][j] = ce_vd_zero()
    for p in range(kc):
        for j in range(nv):
            bv[j] = (<const vdouble*>(brow[p] + boff + j * VL))[0]
        for i in range(CE_MR):
            for j in range(nv):
                acc[i][j] += ap[i][p * a_cs] * bv[j]
    if accumulate:
        for i in range(CE_MR):
            for j in range(nv):
                (<vdouble*>(c + i * ldc + j * VL))[0] += acc[i][j]
    else:
        for i in range(CE_MR):
            for j in range(nv):
                (<vdouble*>(c + i * ldc + j * VL))[0] = acc[i][j]


cdef void gemv_row_f(Py_ssize_t kc, const float* a, const float* b, Py_ssize_t ldb, Py_ssize_t n, float* c,
                     bint accumulate, float* tail) noexcept nogil:
    """c[j] (+)= sum over p < kc of a[p] * b[p*ldb + j], j < n: one row of A times a row-major B, read in place.
    Each sum starts from zero and adds the products in increasing p, as the micro-kernel does for each element,
    so a row comes out with the same bits as through the packed GEMM; but no MR-row tile is filled with copies of
    one row (batch 1: 8x the work). tail: unused (gemv_row_d's scratch)."""
    cdef vfloat acc[4]
    cdef Py_ssize_t VL = CE_VBYTES // sizeof(float)
    cdef Py_ssize_t j = 0, p, v
    while j + 4 * VL <= n:
        for v in range(4):
            acc[v] = ce_vf_zero()
        for p in range(kc):
            for v in range(4):
                acc[v] += a[p] * (<const vfloat*>(b + p * ldb + j + v * VL))[0]
        for v in range(4):
            if accumulate:
                (<vfloat*>(c + j + v * VL))[0] += acc[v]
            else:
                (<vfloat*>(c + j + v * VL))[0] = acc[v]
        j += 4 * VL
    while j + VL <= n:
        acc[0] = ce_vf_zero()
        for p in range(kc):
            acc[0] += a[p] * (<const vfloat*>(b + p * ldb + j))[0]
        if accumulate:
            (<vfloat*>(c + j))[0] += acc[0]
        else:
            (<vfloat*>(c + j))[0] = acc[0]
        j += VL
    if j < n:
        # the last columns as one vector whose other lanes are zero (scalar sums did not round as the vector
        # lanes); the loads masked, not a zero-padded copy of those columns (which took half of a 400 -> 120
        # linear at batch 1)
        acc[0] = ce_vf_zero()
        for p in range(kc):
            acc[0] += a[p] * ce_vf_load_first(b + p * ldb + j, n - j)
        for v in range(n - j):
            if accumulate:
                c[j + v] += (<float*>&acc[0])[v]
            else:
                c[j + v] = (<float*>&acc[0])[v]


cdef void gemv_row_d(Py_ssize_t kc, const double* a, const double* b, Py_ssize_t ldb, Py_ssize_t n, double* c,
                     bint accumulate, double* tail) noexcept nogil:
    """The float64 twin of gemv_row_f."""
    cdef vdouble acc[4]
    cdef Py_ssize_t VL = CE_VBYTES // sizeof(double)
    cdef Py_ssize_t j = 0, p, v
    while j + 4 * VL <= n:
        for v in range(4):
            acc[v] = ce_vd_zero()
        for p in range(kc):
            for v in range(4):
                acc[v] += a[p] * (<const vdouble*>(b + p * ldb + j + v * VL))[0]
        for v in range(4):
            if accumulate:
                (<vdouble*>(c + j + v * VL))[0] += acc[v]
            else:
                (<vdouble*>(c + j + v * VL))[0] = acc[v]
        j += 4 * VL
    while j + VL <= n:
        acc[0] = ce_vd_zero()
        for p in range(kc):
            acc[0] += a[p] * (<const vdouble*>(b + p * ldb + j))[0]
        if accumulate:
            (<vdouble*>(c + j))[0] += acc[0]
        else:
            (<vdouble*>(c + j))[0] = acc[0]
        j += VL
    if j < n:
        # the last columns as one vector over a zero-padded copy (scalar sums did not round as the vector lanes)
        for p in range(kc):
            for v in range(VL):
                tail[p * VL + v] = b[p * ldb + j + v] if j + v < n else 0
        acc[0] = ce_vd_zero()
        for p in range(kc):
            acc[0] += a[p] * (<const vdouble*>(tail + p * VL))[0]
        (<vdouble*>(tail + kc * VL))[0] = acc[0]
        for v in range(n - j):
            if accumulate:
                c[j + v] += tail[kc * VL + v]
            else:
                c[j + v] = tail[kc * VL + v]


cdef inline void macro_kernel(Py_ssize_t mpanels, Py_ssize_t npanels, Py_ssize_t kc,
                              const floating** arow, Py_ssize_t a_cs, const floating** brow, Py_ssize_t b_panel,
                              floating* c, Py_ssize_t ldc, bint accumulate, int nv) noexcept nogil:
    """C block (mpanels*MR x npanels*NR, row stride ldc, NR = nv*VL) (+)= A block x B block.

    arow[0 : mpanels*MR] are the rows of A (see ukernel_f); column panel jp of B sits at offset jp*b_panel from
    the row pointers brow[0:kc]. B micro-panel outer, A panels inner: the kc x NR B panel stays in L1 while A
    streams from L2.
    """
    macro_kernel_at(mpanels, npanels, kc, arow, a_cs, brow, 0, b_panel, c, ldc, accumulate, nv)


cdef void macro_kernel_at(Py_ssize_t mpanels, Py_ssize_t npanels, Py_ssize_t kc,
                          const floating** arow, Py_ssize_t a_cs, const floating** brow, Py_ssize_t boff,
                          Py_ssize_t b_panel, floating* c, Py_ssize_t ldc, bint accumulate, int nv) noexcept nogil:
    """macro_kernel with B's rows at brow[p] + boff: one table of pixel origins serves every kernel tap, boff
    the tap's offset (grad_weight's pixel path rebuilt a table per tap and step before)."""
    cdef Py_ssize_t ip, jp
    cdef Py_ssize_t NR = nv * (CE_VBYTES // sizeof(floating))
    for jp in range(npanels):
        for ip in range(mpanels):
            if floating is float:
                if nv == CE_NV:
                    ukernel_f(kc, arow + ip * CE_MR, a_cs, brow, boff + jp * b_panel, c + ip * CE_MR * ldc + jp * NR,
                              ldc, accumulate, <wide_tile*>NULL)
                else:
                    ukernel_f(kc, arow + ip * CE_MR, a_cs, brow, boff + jp * b_panel, c + ip * CE_MR * ldc + jp * NR,
                              ldc, accumulate, <narrow_tile*>NULL)
            else:
                if nv == CE_NV:
                    ukernel_d(kc, arow + ip * CE_MR, a_cs, brow, boff + jp * b_panel, c + ip * CE_MR * ldc + jp * NR,
                              ldc, accumulate, <wide_tile*>NULL)
                else:
                    ukernel_d(kc, arow + ip * CE_MR, a_cs, brow, boff + jp * b_panel, c + ip * CE_MR * ldc + jp * NR,
                              ldc, accumulate, <narrow_tile*>NULL)


cdef inline void row_table(const floating** table, const floating* base, Py_ssize_t n,
                           Py_ssize_t stride) noexcept nogil:
    """table[p] = base + p*stride: row pointers of a row-major block, or (stride NR) of a packed B panel."""
    cdef Py_ssize_t p
    for p in range(n):
        table[p] = base + p * stride


cdef inline void packed_a_table(const floating** table, const floating* apack, Py_ssize_t mpanels,
                                Py_ssize_t kc) noexcept nogil:
    """Row pointers of an A block packed in MR-row panels of depth kc (use with a_cs = MR)."""
    cdef Py_ssize_t ip, i
    for ip in range(mpanels):
        for i in range(CE_MR):
            table[ip * CE_MR + i] = apack + ip * CE_MR * kc + i


cdef void pack_a_strided(const floating* a, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t m, Py_ssize_t kc,
                         floating* out) noexcept nogil:
    """Pack a[i, p] = a[i*rs + p*cs] (i < m, p < kc) into MR-row panels, rows past m zero."""
    cdef Py_ssize_t ip, i, p, row
    for ip in range((m + CE_MR - 1) // CE_MR):
        for p in range(kc):
            for i in range(CE_MR):
                row = ip * CE_MR + i
                out[i] = a[row * rs + p * cs] if row < m else 0
            out += CE_MR


cdef void pack_b_strided(const floating* b, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t kc, Py_ssize_t n,
                         Py_ssize_t NR, floating* out) noexcept nogil:
    """Pack b[p, j] = b[p*rs + j*cs] (p < kc, j < n) into NR-column panels, columns past n zero."""
    cdef Py_ssize_t jp, j, p, col
    for jp in range((n + NR - 1) // NR):
        for p in range(kc):
            for j in range(NR):
                col = jp * NR + j
                out[j] = b[p * rs + col * cs] if col < n else 0
            out += NR


cdef void strided_blocks(Py_ssize_t M, Py_ssize_t N, Py_ssize_t NR, int n_threads, Py_ssize_t* MC,
                         Py_ssize_t* NC) noexcept nogil:
    """gemm_strided's block of C (MC x NC, at most the given sizes) for several threads: the panels of each
    dimension shared evenly by its blocks, and, while the blocks are fewer than the threads, the dimension with
    more panels cut into one more block (at 1 thread the largest blocks stay). With 12 x 8 panels a dense layer's
    weight gradient (120 x 400) made blocks of 96 and 24 rows and 384 and 16 columns, and at 2 threads one thread
    had four fifths of the work (slower than 1 thread); a 64 x 120 forward was one block, one thread. Blocks never
    change a sum (each element reduces over all of K in one order)."""
    cdef Py_ssize_t mp = (M + CE_MR - 1) // CE_MR, np_ = (N + NR - 1) // NR
    cdef Py_ssize_t mb = (mp + MC[0] // CE_MR - 1) // (MC[0] // CE_MR)
    cdef Py_ssize_t nb = (np_ + NC[0] // NR - 1) // (NC[0] // NR)
    if n_threads <= 1:
        return
    while mb * nb < n_threads and (mb < mp or nb < np_):
        if (np_ + nb - 1) // nb > (mp + mb - 1) // mb and nb < np_:
            nb = nb + 1
        elif mb < mp:
            mb = mb + 1
        else:
            nb = nb + 1
    MC[0] = (mp + mb - 1) // mb * CE_MR
    NC[0] = (np_ + nb - 1) // nb * NR


cdef int gemm_strided(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                       const floating* a, Py_ssize_t a_rs, Py_ssize_t a_cs,   # IN  (M x K)
                       const floating* b, Py_ssize_t b_rs, Py_ssize_t b_cs,   # IN  (K x N)
                       floating* c, Py_ssize_t ldc,                           # OUT (M x N), overwritten
                       int n_threads) noexcept nogil:
    """C = A B for strided A, B; returns -1 if scratch could not be allocated, else 0.

    Work splits over (row block, column block) tiles of C and each tile reduces over all of K in the same order,
    so the result does not depend on the thread count."""
    cdef fpstate fp, fps
    cdef int nv = pick_nv((N + vlen(<floating>0) - 1) // vlen(<floating>0))
    cdef Py_ssize_t NR = nv * vlen(<floating>0)
    cdef Py_ssize_t KC = block_k(<floating>0)
    cdef Py_ssize_t MC = 12 * CE_MR
    cdef Py_ssize_t NC = 8 * NR
    cdef Py_ssize_t mblocks, nblocks
    cdef Py_ssize_t task, mb, nb, m0, n0, mc, nc, k0, kc, i, j, mpanels, npanels, nfull
    # one panel of rows, both operands contiguous along K and N: no packing (see the loop)
    cdef bint unpacked = M <= CE_MR and a_cs == 1 and b_cs == 1
    cdef floating* apack
    cdef floating* bpack
    cdef floating* cbuf
    cdef const floating** brow
    cdef const floating** arow
    cdef int failed = 0
    if M <= 0 or N <= 0:
        return 0
    strided_blocks(M, N, NR, n_threads, &MC, &NC)
    mblocks = (M + MC - 1) // MC
    nblocks = (N + NC - 1) // NC
    if K <= 0:
        for i in range(M):
            for j in range(N):
                c[i * ldc + j] = 0
        return 0
    if floating is float:
        if unpacked and (n_threads <= 1 or mblocks * nblocks == 1):
            # one task (batch 1 inference): no team, no scratch; the rows as the loop below computes them
            fp = fp_enter()
            k0 = 0
            while k0 < K:
                kc = min(KC, K - k0)
                for i in range(M):
                    gemv_row_f(kc, a + i * a_rs + k0, b + k0 * b_rs, b_rs, N, c + i * ldc, k0 > 0, NULL)
                k0 = k0 + kc
            fp_leave(fp)
            return 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        apack = <floating*>malloc(MC * KC * sizeof(floating))
        bpack = <floating*>malloc(NC * KC * sizeof(floating))
        cbuf = <floating*>malloc(MC * NC * sizeof(floating))
        brow = <const floating**>malloc(KC * sizeof(floating*))
        arow = <const floating**>malloc(MC * sizeof(floating*))
        for task in prange(mblocks * nblocks, schedule='static'):
            if apack == NULL or bpack == NULL or cbuf == NULL or brow == NULL or arow == NULL:
                flag_failure(&failed)
                continue
            mb = task // nblocks
            nb = task - mb * nblocks
            m0 = mb * MC
            n0 = nb * NC
            mc = min(MC, M - m0)
            nc = min(NC, N - n0)
            mpanels = (mc + CE_MR - 1) // CE_MR
            npanels = (nc + NR - 1) // NR
            k0 = 0
            while k0 < K:
                kc = min(KC, K - k0)
                if unpacked:
                    # a few rows (batch 1 inference): each row of C straight from A's row and B's rows where they
                    # are, into C (gemv_row: the same sums in the same order as the packed path, the same bits)
                    for i in range(mc):
                        if floating is float:
                            gemv_row_f(kc, a + (m0 + i) * a_rs + k0, b + k0 * b_rs + n0, b_rs, nc,
                                       c + (m0 + i) * ldc + n0, k0 > 0, bpack)
                        else:
                            gemv_row_d(kc, a + (m0 + i) * a_rs + k0, b + k0 * b_rs + n0, b_rs, nc,
                                       c + (m0 + i) * ldc + n0, k0 > 0, bpack)
                else:
                    pack_a_strided(a + m0 * a_rs + k0 * a_cs, a_rs, a_cs, mc, kc, apack)
                    pack_b_strided(b + k0 * b_rs + n0 * b_cs, b_rs, b_cs, kc, nc, NR, bpack)
                    row_table(brow, bpack, kc, NR)
                    packed_a_table(arow, apack, mpanels, kc)
                    macro_kernel(mpanels, npanels, kc, arow, CE_MR, brow, NR * kc, cbuf, NC, k0 > 0, nv)
                k0 = k0 + kc
            if not unpacked:
                for i in range(mc):
                    for j in range(nc):
                        c[(m0 + i) * ldc + n0 + j] = cbuf[i * NC + j]
        free(apack)
        free(bpack)
        free(cbuf)
        free(brow)
        free(arow)
        fp_leave(fp)
    fp_resume(fps)
    return -failed


def matmul(const floating[:, :] a, const floating[:, :] b, floating[:, ::1] out, int n_threads):
    """out = a @ b for 2-D arrays of any strides (a: M x K, b: K x N, out: M x N C-contiguous)."""
    cdef fpstate fp, fps
    cdef Py_ssize_t isz = sizeof(floating)
    cdef int rc
    with nogil:
        fp = fp_enter_call()
        rc = gemm_strided(a.shape[0], b.shape[1], a.shape[1],
                     &a[0, 0] if a.shape[0] > 0 and a.shape[1] > 0 else NULL,
                     a.strides[0] // isz, a.strides[1] // isz,
                     &b[0, 0] if b.shape[0] > 0 and b.shape[1] > 0 else NULL,
                     b.strides[0] // isz, b.strides[1] // isz,
                     &out[0, 0] if out.shape[0] > 0 and out.shape[1] > 0 else NULL, out.shape[1], n_threads)
        fp_leave_call(fp)
    if rc:
        raise MemoryError("matmul: could not allocate packing buffers")
