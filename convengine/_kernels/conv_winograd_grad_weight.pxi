# Winograd F(2x2, 3x3) for the weight gradient of a 3x3, stride-1 convolution: opt-in, float32, for training
# (Conv2d.winograd). The forward's 2x2 output tile is Y = A^T [ sum over c of U[c] * V[c] ] A with U = G g G^T
# (conv_winograd.pxi), linear in U; so the gradient of filter g (output channel k, input channel c) is
#
#     G^T dU G,   dU = sum over the batch's tiles of (A dY A^T) * V[c]   (elementwise, 4x4)
#
# with dY the tile's 2x2 output gradient of channel k (zero past the output's edge) and V[c] the forward's input
# transform: 16 reductions over the tiles of K x C products each, 16 x K x C multiply-adds per tile where the direct
# sum has 36 (9 taps x 4 pixels). In exact arithmetic it is the gradient of the conv; in float32 it rounds like the
# forward Winograd does (tests/test_winograd.py), and a non-finite input or output gradient reaches every weight
# its tile's products touch.
#
# The batch's tiles (numbered as the forward's) are cut into chunks of about WINOGRAD_GW_TILES; a chunk's V (C rows)
# and A dY A^T (K rows) are written tile-contiguous per channel, 16 entries apart, and reduced by ce_wino_gw_block:
# CE_WGW_KB x CE_WGW_CB channel pairs of vector accumulators over the chunk's tiles, then their lanes, added into
# the chunk's slice's sums. Slices (a fixed split of the chunks, a function of the shape only) each sum their
# chunks in order and are added in slice order: the same bits on any thread count.

cdef extern from "winograd.h":
    void wino_gout_f "ce_wino_gout_f"(const float* e, const float* o, Py_ssize_t ld, Py_ssize_t n, float* dst,
                                      Py_ssize_t ss) nogil
    void wino_gw_block "ce_wino_gw_block"(const float* m, Py_ssize_t lm, const float* v, Py_ssize_t lv,
                                          Py_ssize_t n, float* du, Py_ssize_t ldu) nogil
    enum:
        CE_WGW_KB
        CE_WGW_CB


# Tiles per chunk: the accumulators' lanes are summed once per chunk (22 shuffles and adds per 8 on AVX-512, against
# 32 multiply-adds each at 512 tiles), and a chunk's transforms (16 x (C + K) x 512 floats: 6 MiB at 64 -> 128
# channels) are read back from the L3 cache, one entry (a quarter to a half of the L2 cache) at a time.
cdef Py_ssize_t WINOGRAD_GW_TILES = 512
# The slices' partial sums (16 x K x C floats each) stay under this many bytes in all.
cdef Py_ssize_t WINOGRAD_GW_PARTIAL_BYTES = 32 << 20


cdef inline Py_ssize_t winograd_gout_plane(const ConvGeom* p) noexcept nogil:
    """Length of one of winograd_grad_output's four planes: an image's tiles, whole vectors, a vector of slack
    (ce_wino_gout_f reads up to VL - 1 values past the tiles it stores)."""
    return round_up(((p.OH + 1) // 2) * ((p.OW + 1) // 2), VLF) + VLF


cdef void winograd_grad_output(const float* dy, const ConvGeom* p, Py_ssize_t TW, Py_ssize_t T, Py_ssize_t t0,
                               Py_ssize_t nt, Py_ssize_t J, Py_ssize_t mstride, float* m,
                               float* rows) noexcept nogil:
    """A dY A^T of tiles t0 .. t0 + nt - 1 (numbered as winograd_input's) of the output gradient dy (B x K x OH x
    OW): entry s of tile t0 + j in channel k at m[s * mstride + k * J + j], columns nt .. J - 1 zero. rows: scratch
    of 4 * winograd_gout_plane + VL values (zeroed).

    Per image and channel, dY is split into its four 2x2 phases (even or odd rows and columns), each a plane of
    the image's tiles in their order (plane (a, b) holds dY[2 ty + a, 2 tx + b] of tile ty * TW + tx, zero past
    the output's edge): a tile's four values then lie at one offset in the four planes, and ce_wino_gout_f
    transforms a whole run of tiles, all its tile rows, VL at a time. (Split by tile row, an 8x8 plane's runs were
    4 tiles of a 16-lane vector: the transform took a fifth of the 64 -> 128 channel call, AMD Zen 4.)"""
    cdef ConvGeom q = p[0]
    cdef Py_ssize_t PL = winograd_gout_plane(p)
    cdef Py_ssize_t k, t, tb, b, ty0, ty1, ph, s, off
    cdef const float* dk
    q.H = p.OH
    q.W = p.OW
    t = t0
    while t < t0 + nt:
        b, tb, ty0, ty1 = tile_run(t, t0 + nt, T, TW)
        off = t - b * T - ty0 * TW
        for k in range(p.K):
            dk = dy + (b * p.K + k) * p.OH * p.OW
            # planes (even row, even col), (odd, even), (even, odd), (odd, odd) at rows + (0, 1, 2, 3) * PL: the
            # even-column planes one PL apart, as ce_wino_gout_f's (e, e + ld) reads them, and the odd ones
            for ph in range(4):
                copy_plane_rows_step(dk, &q, 2 * ty0 + ph % 2, ty1 - ty0, 2, rows + ph * PL, TW, TW, ph // 2, 2)
            wino_gout_f(rows + off, rows + 2 * PL + off, PL, tb - t, m + k * J + t - t0, mstride)
        t = tb
    if nt < J:
        for s in range(16):
            for k in range(p.K):
                memset(m + s * mstride + k * J + nt, 0, (J - nt) * sizeof(float))


cdef inline void winograd_filter_gradient(const float* du, Py_ssize_t ds, float* dg) noexcept nogil:
    """dg (3x3) = G^T dU G of the 4x4 dU (entry s at du[s * ds]), in float64, rounded once."""
    cdef double u[4][4]
    cdef double t[4][3]
    cdef Py_ssize_t i, b
    for i in range(16):
        u[i // 4][i % 4] = du[i * ds]
    for i in range(4):
        t[i][0] = u[i][0] + (u[i][1] + u[i][2]) * 0.5
        t[i][1] = (u[i][1] - u[i][2]) * 0.5
        t[i][2] = (u[i][1] + u[i][2]) * 0.5 + u[i][3]
    for b in range(3):
        dg[b] = <float>(t[0][b] + (t[1][b] + t[2][b]) * 0.5)
        dg[3 + b] = <float>((t[1][b] - t[2][b]) * 0.5)
        dg[6 + b] = <float>((t[1][b] + t[2][b]) * 0.5 + t[3][b])


cdef int conv2d_grad_weight_winograd_core(const float* dy, const float* x, float* dw, float* db,
                                          const ConvGeom* p, int n_threads) noexcept nogil:
    """dw (K x C x 3 x 3) and db (K,) or NULL of a conv PATH_WINOGRAD computes (winograd_fits), overwritten (see
    the top of this file). Returns -1 on allocation failure."""
    cdef fpstate fp, fps
    cdef Py_ssize_t VL = VLF
    cdef Py_ssize_t TH = (p.OH + 1) // 2, TW = (p.OW + 1) // 2
    cdef Py_ssize_t T = TH * TW
    cdef Py_ssize_t J = round_up(balanced_block(p.B * T, WINOGRAD_GW_TILES), VL)
    cdef Py_ssize_t nchunks = (p.B * T + J - 1) // J
    cdef Py_ssize_t Kp = round_up(p.K, CE_WGW_KB), Cp = round_up(p.C, CE_WGW_CB)
    cdef Py_ssize_t usize = 16 * Kp * Cp
    cdef Py_ssize_t nslices = min(nchunks, 16)
    cdef Py_ssize_t per, sl, ch, ch0, ch1, t0, nt, n, s, kb, cb, k, c, e
    cdef Py_ssize_t vstride = Cp * J + J, mstride = Kp * J + J
    cdef float* partial
    cdef float* vbuf
    cdef float* mbuf
    cdef float* rows
    cdef float* du
    cdef int failed = 0
    while nslices > 1 and nslices * usize * <Py_ssize_t>sizeof(float) > WINOGRAD_GW_PARTIAL_BYTES:
        nslices = nslices // 2
    per = (nchunks + nslices - 1) // nslices
    partial = <float*>calloc(nslices * usize, sizeof(float))
    if partial == NULL:
        return -1
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        vbuf = <float*>malloc(16 * vstride * sizeof(float))
        mbuf = <float*>malloc(16 * mstride * sizeof(float))
        # rows past C and K are zero: the register blocks run over whole blocks of channels (zeroing all of both
        # buffers, calloc, took 6% of a 64 -> 128 channel call at 8x8)
        if vbuf != NULL and mbuf != NULL:
            for e in range(16):
                memset(vbuf + e * vstride + p.C * J, 0, (Cp - p.C) * J * sizeof(float))
                memset(mbuf + e * mstride + p.K * J, 0, (Kp - p.K) * J * sizeof(float))
        rows = <float*>calloc(max(winograd_rows_len(p, TW), 4 * winograd_gout_plane(p) + VL), sizeof(float))
        for sl in prange(nslices, schedule='static'):
            if vbuf == NULL or mbuf == NULL or rows == NULL:
                flag_failure(&failed)
                continue
            du = partial + sl * usize
            ch0 = sl * per
            ch1 = min(nchunks, ch0 + per)
            for ch in range(ch0, ch1):
                t0 = ch * J
                nt = min(J, p.B * T - t0)
                n = round_up(nt, VL)
                winograd_input(x, p, TW, T, t0, nt, J, 1, vstride, vbuf, rows)
                winograd_grad_output(dy, p, TW, T, t0, nt, J, mstride, mbuf, rows)
                for s in range(16):
                    for cb in range(Cp // CE_WGW_CB):
                        for kb in range(Kp // CE_WGW_KB):
                            wino_gw_block(mbuf + s * mstride + kb * CE_WGW_KB * J, J,
                                          vbuf + s * vstride + cb * CE_WGW_CB * J, J, n,
                                          du + (s * Kp + kb * CE_WGW_KB) * Cp + cb * CE_WGW_CB, Cp)
        free(vbuf)
        free(mbuf)
        free(rows)
        fp_leave(fp)
    if not failed:
        with parallel(num_threads=n_threads):
            fp = fp_enter()
            for k in prange(p.K, schedule='static'):
                # the slices in order into the first, then each filter's transform
                for sl in range(1, nslices):
                    for s in range(16):
                        for c in range(p.C):
                            partial[(s * Kp + k) * Cp + c] += partial[sl * usize + (s * Kp + k) * Cp + c]
                for c in range(p.C):
                    winograd_filter_gradient(partial + k * Cp + c, Kp * Cp, dw + (k * p.C + c) * 9)
            fp_leave(fp)
    fp_resume(fps)
    free(partial)
    if not failed and db != NULL:
        grad_bias(dy, p, db, n_threads)
    return -failed


def conv2d_grad_weight_winograd(const float[:, :, :, ::1] grad_out,   # IN  (B, K, OH, OW)
                                const float[:, :, :, ::1] x,          # IN  (B, C, H, W)
                                float[:, :, :, ::1] grad_w,           # OUT (K, C, 3, 3)
                                float[::1] grad_b,                    # OUT (K,), or None: not computed
                                tuple params, int n_threads):
    """conv2d_grad_weight by Winograd F(2x2, 3x3) (opt-in; see winograd_takes for the convs it takes, float32
    only): the weight gradient of the forward's Winograd sum, the bias gradient as conv2d_grad_weight's."""
    cdef fpstate fp
    cdef ConvGeom p
    cdef int rc
    cdef float* db = NULL
    fill_geom(&p, (x.shape[0], x.shape[1], x.shape[2], x.shape[3]), grad_w.shape[0], grad_w.shape[2],
              grad_w.shape[3], params)
    if not winograd_fits(&p) or grad_out.shape[0] != p.B or grad_out.shape[1] != p.K \
            or grad_out.shape[2] != p.OH or grad_out.shape[3] != p.OW or grad_w.shape[1] != p.C:
        raise ValueError("conv2d_grad_weight_winograd: a 3x3 conv of stride 1, dilation 1 and one group, with "
                         "matching shapes")
    if grad_b is not None:
        if grad_b.shape[0] != p.K:
            raise ValueError("conv2d_grad_weight_winograd: grad_b must hold one value per output channel")
        db = &grad_b[0]
    if p.B == 0:
        grad_w[...] = 0
        if grad_b is not None:
            grad_b[...] = 0
        return
    with nogil:
        fp = fp_enter_call()
        rc = conv2d_grad_weight_winograd_core(&grad_out[0, 0, 0, 0], &x[0, 0, 0, 0], &grad_w[0, 0, 0, 0], db, &p,
                                              n_threads)
        fp_leave_call(fp)
    if rc:
        raise MemoryError("conv2d_backward: could not allocate Winograd buffers")


# Where training that opted in takes the Winograd weight gradient: its transforms (16 x (C + K) values per tile,
# written and read back) cost what the products save unless the channels are many, a batch of few tiles leaves
# threads without a chunk, and the input transform of narrow planes runs a tile row (4 tiles at 8x8) per vector.
# Batch 64 unless said, AMD EPYC Zen 4, Winograd / direct time (fastest of repeated calls), 1 | 2 threads:
# taken: 32 -> 64 at 16x16 0.83-0.87 | 0.88-0.91 (batch 16: 0.78 | 0.82), 64 -> 64 at 16x16 0.75 | 0.79, 64 -> 128
# at 8x8 (1,024 tiles) 0.77 | 0.91, 128 -> 128 at 8x8 0.84 | 0.92, 64 -> 64 at 32x32 (batch 8) 0.68 | 0.69;
# left direct: 64 -> 32 and 32 -> 64 at 8x8 1.02-1.06 | 1.04-1.09, 32 -> 32 at 8x8 1.17 | 1.18, 32 -> 32 at 16x16
# 1.02 | 0.99, 64 -> 64 at 8x8 at batch 32 (512 tiles: one chunk) 2.2 | 4.4, 128 -> 128 at 4x4 1.10 | 2.26.
# A function of the shape only: the bits never depend on the thread count.
# On Intel it gains on none of these shapes once the direct kernels' weight gradient caught up (the pixel path), so
# there it is off (winograd_grad_weight_on, set when the kernels load: on for family 0x19 AMD, Zen 4). Intel Xeon
# (family 6 model 167, AVX-512), batch 64, median ms direct / Winograd, same process, 2 threads: 32 -> 64 at 16x16
# 2.30 / 9.54, 64 -> 128 at 8x8 2.45 / 2.89, 64 -> 64 at 32x32 18.9 / 41.0, 64 -> 128 at 16x16 9.50 / 11.9, 128 -> 128
# at 16x16 18.3 / 20.6 (1 thread: 4.24 / 7.93, 4.35 / 5.32, 31.6 / 40.9, 17.4 / 19.3, 35.3 / 34.5). Training steps
# with model.winograd, Winograd weight gradient on / off, 2 threads: CIFAR-shaped 26.2 / 21.4 ms (default kernels
# 22.4), VGG-style 155.4 / 131.5 (153.1).
# Nor on AMD's Zen 5 (family 0x1A), whose AVX-512 units are whole where Zen 4 ran each instruction as two 256-bit
# halves: there the direct kernels' weight gradient runs at 70-80% of the FMA peak and Winograd's transforms cost more
# than the products save on every shape. AMD EPYC Zen 5, batch 64, GFLOP/s (direct-conv count) Winograd / direct,
# interleaved in one process, 2 threads: 32 -> 64 at 16x16 86 / 305, 64 -> 128 at 8x8 227 / 274, 64 -> 64 at 32x32 160 /
# 321, 64 -> 128 at 16x16 251 / 298, 128 -> 128 at 16x16 271 / 309 (1 thread: 77 / 166, 164 / 179, 178 / 188, 149 /
# 169). Training steps with model.winograd, its weight gradient on / off, median ms, 1 thread: CIFAR-shaped 29.9 / 26.4,
# VGG-style 181 / 173; 2 threads: 23.1 / 21.4, 141 / 122 (a shared host, so slower than benchmarks/RESULTS-amd-zen5.md; the
# ratios are what count).
cdef bint winograd_grad_weight_on = True
cdef Py_ssize_t WINOGRAD_GW_MIN_TILES = 1024
cdef Py_ssize_t WINOGRAD_GW_MIN_PRODUCT = 4096      # input x output channels; half of it where tile rows hold 8+
cdef Py_ssize_t WINOGRAD_GW_WIDE_ROW = 8            # tiles per tile row from which half the product will do


def set_winograd_grad_weight(flag=None):
    """Whether training that opted in to Winograd may take the weight gradient by Winograd at all (where
    winograd_grad_weight_takes' thresholds hold; by default on AMD Zen 4 only). With a flag, set it for every later
    call (tests), None: leave it; returns the setting before."""
    return bool(switch_setting(&winograd_grad_weight_on, flag))


def set_winograd_grad_weight_min(Py_ssize_t tiles, Py_ssize_t channel_product):
    """Test hook: WINOGRAD_GW_MIN_TILES, WINOGRAD_GW_MIN_PRODUCT = tiles, channel_product; returns the values it
    replaces."""
    global WINOGRAD_GW_MIN_TILES, WINOGRAD_GW_MIN_PRODUCT
    old = (WINOGRAD_GW_MIN_TILES, WINOGRAD_GW_MIN_PRODUCT)
    WINOGRAD_GW_MIN_TILES = tiles
    WINOGRAD_GW_MIN_PRODUCT = channel_product
    return old


def winograd_grad_weight_takes(tuple x_shape, tuple w_shape, tuple params, Py_ssize_t itemsize):
    """Whether training that opted in computes this conv's weight gradient by Winograd F(2x2, 3x3): where it is on
    (set_winograd_grad_weight), a conv whose forward it takes (winograd_takes), WINOGRAD_GW_MIN_PRODUCT or more
    input x output channels (half as many where its tile rows hold WINOGRAD_GW_WIDE_ROW or more tiles) and
    WINOGRAD_GW_MIN_TILES or more 2x2 output tiles in the batch."""
    cdef ConvGeom p
    cdef Py_ssize_t TW
    fill_geom(&p, x_shape, w_shape[0], w_shape[2], w_shape[3], params)
    TW = (p.OW + 1) // 2
    return (winograd_grad_weight_on and winograd_takes_geom(&p, itemsize)
            and 2 * p.C * p.K >= WINOGRAD_GW_MIN_PRODUCT * (1 if TW >= WINOGRAD_GW_WIDE_ROW else 2)
            and p.B * ((p.OH + 1) // 2) * TW >= WINOGRAD_GW_MIN_TILES)
