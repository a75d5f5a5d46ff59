# Winograd F(2x2, 3x3): the forward of a 3x3, stride-1 convolution in 4/9 of the multiplications. Each
# 2x2 block of outputs (a tile) is A^T [ sum over c of U[c] * V[c] ] A, where V = B^T d B is the transform of the
# tile's 4x4 input d in channel c and U = G g G^T that of the 3x3 filter g (winograd.h has B, A; G is below).
# The 16 elementwise products summed over channels are 16 GEMMs (K x C times C x tiles), run by the engine's
# micro-kernel: 16 x C multiply-adds per output channel and tile instead of 36 x C, 2.25x fewer.
#
# float32 only, and opt-in only (Sequential.freeze(winograd=True) packs the weights for PATH_WINOGRAD; the default
# paths never take it; a float64 user wants the accuracy Winograd trades away): the transforms round differently
# from the direct sum (in tests/test_winograd.py about as close to the exact result), and an infinite input reaches
# every output of its tile (inf - inf = NaN in the ones whose sum has it with a zero weight), where the direct conv
# keeps it to the outputs whose window holds it.
#
# A task is a run of the batch's tiles (consecutive in row-major tile order, image after image; WINOGRAD_TILE_BYTES
# of transformed input at most): its V is written once, panel by panel in the micro-kernel's B layout, then for
# each NR-tile panel and MR-channel block the 16 products go into a 16 x MR x NR buffer that stays in L1 and is
# transformed to outputs at once, with the epilogue. Each output is one task's, its sum over channels in one order
# whatever the blocking or the register tile's width: the same bits on any thread count, for any slice of the
# output channels and any batch size.

cdef extern from "winograd.h":
    void wino_in_f "ce_wino_in_f"(const float* e, const float* o, Py_ssize_t ld, Py_ssize_t n, float* dst,
                                  Py_ssize_t ss) nogil
    void wino_out_f "ce_wino_out_f"(const float* m, Py_ssize_t bs, Py_ssize_t n, float bias, bint relu,
                                    bint affine, float sc, float sh, float* y00, float* y01, float* y10,
                                    float* y11) nogil
    void wino_merge_f "ce_wino_merge_f"(const float* a, const float* b, Py_ssize_t n, float* dst) nogil


# The transformed input of one task at most (16 x channels x tiles values): about half of a Zen 4 core's 1 MiB L2,
# so that it stays there while the micro-kernel reads it once per block of MR output channels.
cdef Py_ssize_t WINOGRAD_TILE_BYTES = 1 << 19


# float32 lanes of a vector
cdef Py_ssize_t VLF = CE_VBYTES // 4


cdef inline bint winograd_fits(const ConvGeom* p) noexcept nogil:
    """The geometries PATH_WINOGRAD computes (float32 only): 3x3, stride 1, dilation 1, one group, any padding."""
    return (p.KH == 3 and p.KW == 3 and p.sh == 1 and p.sw == 1 and p.dh == 1 and p.dw == 1 and p.G == 1
            and p.OH > 0 and p.OW > 0)


cdef inline Py_ssize_t winograd_weights_len(const ConvGeom* p) noexcept nogil:
    return 16 * round_up(p.K, CE_MR) * p.C


cdef void pack_winograd_weights(const float* w, const ConvGeom* p, float* out) noexcept nogil:
    """U = G g G^T of each filter g (computed in float64, rounded once), G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2;
    0 0 1]; stored for the micro-kernel as 16 A operands (one per entry s of U), each in MR-row panels of depth C:
    out[((s * mpanels + k // MR) * C + c) * MR + k % MR], rows past K zero. Computed MR filters at a time, the
    MR rows of a panel in the innermost loops (vectorised), each of the 16 operands written front to back (a
    training step packs its weights every step: 64 -> 128 channels took 0.27 ms filter by filter; Zen 4)."""
    cdef Py_ssize_t mpanels = round_up(p.K, CE_MR) // CE_MR
    cdef Py_ssize_t k, kb, kr, c, i, j, s
    cdef double g[9][CE_MR]
    cdef double gg[12][CE_MR]
    cdef double u[16][CE_MR]
    cdef float* dst
    for kb in range(mpanels):
        for c in range(p.C):
            for i in range(9):
                for kr in range(CE_MR):
                    k = kb * CE_MR + kr
                    g[i][kr] = w[(k * p.C + c) * 9 + i] if k < p.K else 0
            for j in range(3):
                for kr in range(CE_MR):
                    gg[j][kr] = g[j][kr]
                    gg[3 + j][kr] = (g[j][kr] + g[3 + j][kr] + g[6 + j][kr]) * 0.5
                    gg[6 + j][kr] = (g[j][kr] - g[3 + j][kr] + g[6 + j][kr]) * 0.5
                    gg[9 + j][kr] = g[6 + j][kr]
            for i in range(4):
                for kr in range(CE_MR):
                    u[4 * i][kr] = gg[3 * i][kr]
                    u[4 * i + 1][kr] = (gg[3 * i][kr] + gg[3 * i + 1][kr] + gg[3 * i + 2][kr]) * 0.5
                    u[4 * i + 2][kr] = (gg[3 * i][kr] - gg[3 * i + 1][kr] + gg[3 * i + 2][kr]) * 0.5
                    u[4 * i + 3][kr] = gg[3 * i + 2][kr]
            for s in range(16):
                dst = out + ((s * mpanels + kb) * p.C + c) * CE_MR
                for kr in range(CE_MR):
                    dst[kr] = <float>u[s][kr]


cdef inline Py_ssize_t winograd_task_tiles(const ConvGeom* p, Py_ssize_t tiles) noexcept nogil:
    """Tiles per task: the batch's tiles in the fewest equal runs whose transform fits WINOGRAD_TILE_BYTES, a whole
    number of vectors each (at least one). A run may span images (an 8x8 output is 16 tiles)."""
    cdef Py_ssize_t most = max(VLF, WINOGRAD_TILE_BYTES // (16 * p.C * <Py_ssize_t>sizeof(float)) // VLF * VLF)
    return round_up(balanced_block(tiles, most), VLF)


cdef inline Py_ssize_t winograd_v_stride(const ConvGeom* p, Py_ssize_t NR, Py_ssize_t npanels) noexcept nogil:
    """Distance between the 16 entries' blocks of V: NR values more than a block holds, so that the 16 blocks do
    not start at one offset modulo 4 KiB (a block of 64 channels x 4 panels of 32 floats is 32 KiB: the input
    transform's 16 store streams then fell in one L1 set, and it took 7.6 of 32 ms; AMD Zen 4)."""
    return npanels * p.C * NR + NR


cdef inline Py_ssize_t winograd_row_len(Py_ssize_t TW) noexcept nogil:
    """Length of a split input row: the TW + 1 even (or odd) columns a tile row reads, in whole vectors."""
    return round_up(TW + 1, VLF)


cdef inline Py_ssize_t winograd_rows_len(const ConvGeom* p, Py_ssize_t TW) noexcept nogil:
    """winograd_input's scratch: the input rows of one image's run of tile rows (2 * TH + 2 <= OH + 3) split into
    even and odd columns, two planes of them, and slack for the shifted loads of the last row."""
    return 2 * (p.OH + 4) * winograd_row_len(TW) + 2 * VLF


cdef inline (Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t) tile_run(Py_ssize_t t, Py_ssize_t end, Py_ssize_t T,
                                                                   Py_ssize_t TW) noexcept nogil:
    """(b, tb, ty0, ty1): the run of tiles t .. tb - 1 (numbered as winograd_input's) that stays in image b and
    before `end`, on its tile rows ty0 .. ty1 - 1."""
    cdef Py_ssize_t b = t // T
    cdef Py_ssize_t tb = min(end, (b + 1) * T)
    return b, tb, (t - b * T) // TW, (tb - 1 - b * T) // TW + 1


cdef inline (Py_ssize_t, Py_ssize_t) tile_row_span(Py_ssize_t t, Py_ssize_t tb, Py_ssize_t b, Py_ssize_t T,
                                                   Py_ssize_t TW, Py_ssize_t ty, Py_ssize_t ty0,
                                                   Py_ssize_t ty1) noexcept nogil:
    """(txa, txb): the columns of tile row ty that the run tile_run gave (t, tb, b, ty0, ty1) covers."""
    return (t - b * T - ty0 * TW if ty == ty0 else 0), (tb - b * T - ty * TW if ty == ty1 - 1 else TW)


cdef void winograd_input(const float* x, const ConvGeom* p, Py_ssize_t TW, Py_ssize_t T, Py_ssize_t t0,
                         Py_ssize_t nt, Py_ssize_t NR, Py_ssize_t npanels, Py_ssize_t sstride, float* v,
                         float* rows) noexcept nogil:
    """V of tiles t0 .. t0 + nt - 1 of the batch x (B x C x H x W; tile t is tile t % T of image t // T, its T tiles
    row-major, TW to a row): entry s of tile t0 + j in channel c at v[s * sstride + (j // NR * C + c) * NR + j % NR]
    (the forward's sstride: winograd_v_stride; the weight gradient's one panel of NR = all its tiles), columns
    nt .. npanels * NR - 1 zero. rows: winograd_rows_len values (zeroed: the shifted loads of a tile row's last
    vector may reach past what is copied).

    Per image and channel, the input rows the tiles read are split into even and odd columns at once
    (copy_plane_rows_step: one two-source permute per vector, rows and columns outside the image zero), then each
    tile row's tiles are transformed VL at a time in registers (ce_wino_in). Transforming each tile row's four rows in separate passes
    of a few elements took 7.4 of a 32 ms conv (64 -> 64 channels, 32x32, batch 64, AMD Zen 4)."""
    cdef Py_ssize_t ld = winograd_row_len(TW)
    cdef Py_ssize_t c, t, tb, b, ty, ty0, ty1, nrow, txa, txb, j, q, n, run, s, ih0
    cdef float* ev = rows
    cdef float* od
    cdef float* dst
    cdef const float* xc
    t = t0
    while t < t0 + nt:
        # the run of image b's tiles in this task: tile rows ty0 .. ty1 - 1, input rows ih0 .. ih0 + nrow - 1
        b, tb, ty0, ty1 = tile_run(t, t0 + nt, T, TW)
        nrow = 2 * (ty1 - ty0) + 2
        od = rows + nrow * ld
        ih0 = 2 * ty0 - p.pt
        for c in range(p.C):
            xc = x + (b * p.C + c) * p.H * p.W
            # even columns 2m - pl and odd ones 2m + 1 - pl of each row (zero outside the image; the tiles read
            # m <= TW of the ld written)
            copy_plane_rows_step(xc, p, ih0, nrow, 1, ev, ld, ld, -p.pl, 2)
            copy_plane_rows_step(xc, p, ih0, nrow, 1, od, ld, ld, 1 - p.pl, 2)
            for ty in range(ty0, ty1):
                txa, txb = tile_row_span(t, tb, b, T, TW, ty, ty0, ty1)
                j = b * T + ty * TW + txa - t0
                n = txb - txa
                q = 0
                while q < n:
                    # runs that stay within one NR-column panel
                    run = min(n - q, NR - (j + q) % NR)
                    dst = v + ((j + q) // NR * p.C + c) * NR + (j + q) % NR
                    wino_in_f(ev + 2 * (ty - ty0) * ld + txa + q, od + 2 * (ty - ty0) * ld + txa + q, ld, run,
                              dst, sstride)
                    q = q + run
        t = tb
    # the last panel's columns past the task's tiles
    if nt < npanels * NR:
        for s in range(16):
            for c in range(p.C):
                memset(v + s * sstride + ((npanels - 1) * p.C + c) * NR + nt - (npanels - 1) * NR, 0,
                       (npanels * NR - nt) * sizeof(float))


cdef void winograd_output(const float* m, Py_ssize_t NR, Py_ssize_t nk, Py_ssize_t k0, Py_ssize_t t0,
                          Py_ssize_t ncols, Py_ssize_t TW, Py_ssize_t T, const ConvGeom* p, const Epilogue* e,
                          float* y, float* obuf) noexcept nogil:
    """Outputs of channels k0 .. k0 + nk - 1 for tiles t0 .. t0 + ncols - 1 (numbered as in winograd_input) of the
    batch's output y (B x K x OH x OW) from the 16 MR x NR product blocks m (block s at m + s * MR * NR, channel
    k0 + i in row i, tile t0 + jj in column jj), with the epilogue. obuf: scratch of 4 * NR values."""
    cdef Py_ssize_t i, k, jj, t, ty, tx, n, full, oh, ow, b
    cdef float bval, sc, sh
    cdef float* yrow
    for i in range(nk):
        k = k0 + i
        bval = (<const float*>e.bias)[k] if e.bias != NULL else 0
        sc = (<const float*>e.scale)[k] if e.scale != NULL else 1
        sh = (<const float*>e.shift)[k] if e.scale != NULL else 0
        wino_out_f(m + i * NR, CE_MR * NR, round_up(ncols, VLF), bval, e.relu, e.scale != NULL, sc, sh, obuf,
                   obuf + NR, obuf + 2 * NR, obuf + 3 * NR)
        jj = 0
        while jj < ncols:
            t = t0 + jj
            b = t // T
            ty = (t - b * T) // TW
            tx = t - b * T - ty * TW
            n = min(ncols - jj, TW - tx)
            oh = 2 * ty
            ow = 2 * tx
            # a last tile of an odd-width row has one column
            full = n if 2 * (tx + n) <= p.OW else n - 1
            yrow = y + ((b * p.K + k) * p.OH + oh) * p.OW + ow
            wino_merge_f(obuf + jj, obuf + NR + jj, full, yrow)
            if full < n:
                yrow[2 * full] = obuf[jj + full]
            if oh + 1 < p.OH:
                yrow = yrow + p.OW
                wino_merge_f(obuf + 2 * NR + jj, obuf + 3 * NR + jj, full, yrow)
                if full < n:
                    yrow[2 * full] = obuf[2 * NR + jj + full]
            jj = jj + n


cdef inline void winograd_ukernel(Py_ssize_t kc, const float** arow, const float** brow, Py_ssize_t boff,
                                  float* c, Py_ssize_t ldc, int nv) noexcept nogil:
    """The 16 products' micro-kernel, nv vectors wide: one (ukernel_rows_f's single tile) for a task of one vector
    of tiles, whose panel the narrow tile would leave half empty (an 8x8 output is 16 tiles at batch 1: 1.17x the
    direct kernel's time for 64 -> 128 channels, AMD Zen 4). Each width sums in the same order: the same bits."""
    cdef Py_ssize_t coff = 0
    if nv == 1:
        ukernel_rows_f(kc, arow[0], brow, &boff, c, &coff, NULL, ldc, CE_MR, False, NULL, 0, <single_tile*>NULL)
        return
    if nv == CE_NV:
        ukernel_f(kc, arow, CE_MR, brow, boff, c, ldc, False, <wide_tile*>NULL)
    else:
        ukernel_f(kc, arow, CE_MR, brow, boff, c, ldc, False, <narrow_tile*>NULL)


cdef int conv2d_forward_winograd(const float* x, const float* upack, const Epilogue* e, float* y,
                                 const ConvGeom* p, int n_threads) noexcept nogil:
    """y = epilogue(conv2d(x, w)) by F(2x2, 3x3), upack = pack_winograd_weights(w) (see the top of this file).
    Returns -1 on allocation failure."""
    cdef fpstate fp, fps
    cdef Py_ssize_t TH = (p.OH + 1) // 2, TW = (p.OW + 1) // 2
    cdef Py_ssize_t T = TH * TW
    cdef Py_ssize_t J = winograd_task_tiles(p, p.B * T)
    cdef int nv = 1 if J <= VLF else pick_nv(J // VLF)
    cdef Py_ssize_t NR = nv * VLF
    cdef Py_ssize_t npanels_max = (J + NR - 1) // NR
    cdef Py_ssize_t ntasks = (p.B * T + J - 1) // J
    cdef Py_ssize_t mpanels = round_up(p.K, CE_MR) // CE_MR
    cdef Py_ssize_t task, t0, nt, npanels, jp, ip, s, ncols, sstride
    cdef float* vbuf
    cdef float* mbuf
    cdef float* rows
    cdef const float** brow
    cdef const float** arow
    cdef int failed = 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        vbuf = <float*>malloc(16 * winograd_v_stride(p, NR, npanels_max) * sizeof(float))
        mbuf = <float*>malloc((16 * CE_MR + 4) * NR * sizeof(float))
        rows = <float*>calloc(winograd_rows_len(p, TW), sizeof(float))
        brow = <const float**>malloc(p.C * sizeof(float*))
        arow = <const float**>malloc(CE_MR * sizeof(float*))
        for task in prange(ntasks, schedule='static'):
            if vbuf == NULL or mbuf == NULL or rows == NULL or brow == NULL or arow == NULL:
                flag_failure(&failed)
                continue
            t0 = task * J
            nt = min(J, p.B * T - t0)
            npanels = (nt + NR - 1) // NR
            sstride = winograd_v_stride(p, NR, npanels)
            winograd_input(x, p, TW, T, t0, nt, NR, npanels, sstride, vbuf, rows)
            row_table(brow, vbuf, p.C, NR)
            for jp in range(npanels):
                ncols = min(NR, nt - jp * NR)
                for ip in range(mpanels):
                    for s in range(16):
                        packed_a_table(arow, upack + (s * mpanels + ip) * p.C * CE_MR, 1, p.C)
                        winograd_ukernel(p.C, arow, brow, s * sstride + jp * p.C * NR, mbuf + s * CE_MR * NR,
                                         NR, nv)
                    winograd_output(mbuf, NR, min(CE_MR, p.K - ip * CE_MR), ip * CE_MR, t0 + jp * NR, ncols, TW, T,
                                    p, e, y, mbuf + 16 * CE_MR * NR)
        free(vbuf)
        free(mbuf)
        free(rows)
        free(brow)
        free(arow)
        fp_leave(fp)
    fp_resume(fps)
    return -failed


# conv2d_pack's path for Winograd's weights, and the default choice (Python code cannot see the enum)
WINOGRAD_PATH = PATH_WINOGRAD
AUTO_PATH = PATH_AUTO


# Input channels from which frozen plans that opted in take PATH_WINOGRAD. Batch 64, 1 thread, AMD EPYC Zen 4,
# conv + ReLU, Winograd / direct time: 16 -> 16 at 32x32 0.95, 16 -> 32 0.90; 32 -> 32 at 32x32 0.69-0.74,
# 32 -> 64 at 16x16 0.73, 64 -> 64 at 32x32 0.62, 64 -> 128 at 8x8 0.68, 128 -> 128 at 16x16 0.55-0.57 (at 8x8
# 0.60); batch 1, 32 -> 64 at 16x16 0.77. Below it the transforms cost about what the products save.
cdef Py_ssize_t WINOGRAD_MIN_CHANNELS = 32
# And output channels: each tile's transform is read once per MR of them, so a few do not pay for it. Batch 64, 1
# thread, Zen 4, Winograd / direct time: 64 -> 3, 4, 8 at 32x32 0.96, 0.97, 0.92, 64 -> 12 0.80, 64 -> 16 0.78;
# 128 -> 8 at 16x16 1.20, 128 -> 16 0.84; 32 -> 8 at 32x32 1.02, 32 -> 16 0.86; 64 -> 16 at 8x8 1.06, 128 -> 16
# 1.01. An input gradient by Winograd (training) has the conv's input channels as its output: 32 -> 3 at 32x32
# took 1.36x the direct kernel's time.
cdef Py_ssize_t WINOGRAD_MIN_OUT_CHANNELS = 16


def set_winograd_min_channels(Py_ssize_t n_in, Py_ssize_t n_out=1):
    """Test hook: WINOGRAD_MIN_CHANNELS = n_in, WINOGRAD_MIN_OUT_CHANNELS = n_out (so that drawn models of a few
    channels reach Winograd); returns the values it replaces, (n_in, n_out)."""
    global WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_OUT_CHANNELS
    cdef Py_ssize_t old_in = WINOGRAD_MIN_CHANNELS, old_out = WINOGRAD_MIN_OUT_CHANNELS
    WINOGRAD_MIN_CHANNELS = max(1, n_in)
    WINOGRAD_MIN_OUT_CHANNELS = max(1, n_out)
    return old_in, old_out


cdef inline bint winograd_takes_geom(const ConvGeom* p, Py_ssize_t itemsize) noexcept nogil:
    """winograd_takes of a filled geometry."""
    return (itemsize == 4 and winograd_fits(p) and p.C >= WINOGRAD_MIN_CHANNELS
            and p.K >= WINOGRAD_MIN_OUT_CHANNELS)


def winograd_takes(tuple x_shape, tuple w_shape, tuple params, Py_ssize_t itemsize):
    """Whether a plan that opted in runs this conv by Winograd F(2x2, 3x3): float32 (itemsize 4), a geometry
    PATH_WINOGRAD computes, WINOGRAD_MIN_CHANNELS input channels or more and WINOGRAD_MIN_OUT_CHANNELS output
    channels or more (params as for conv2d_forward)."""
    cdef ConvGeom p
    fill_geom(&p, x_shape, w_shape[0], w_shape[2], w_shape[3], params)
    return winograd_takes_geom(&p, itemsize)

