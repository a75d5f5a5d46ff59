# conv2d forward for first layers: 1-4 input channels (RGB or grey images), float32, groups 1, dilation 1.
#
# Such a layer has only C*KH*KW = 9..100 products per output value, too few for the GEMM paths: their packing,
# per-task tables and the store from the C block cost as much as the arithmetic (55 GFLOP/s on a 3-channel 3x3
# layer, half the rate of the 32-channel layers). Here the image is read directly, ONNX Runtime's NCHW-input
# approach: a task copies the input rows it needs once, zero-padded and, for stride 2, split into even and odd
# columns so that every tap reads a contiguous run; then each register tile holds MR output channels x NV vectors
# of output pixels along a row, accumulates over the C*KH*KW taps (one vector load per pixel vector, one broadcast
# weight per channel), and applies the epilogue (bias, ReLU, scale and shift) before its only store.
#
# Each output value is one sum over its taps in (c, kh, kw) order whatever the tiling, so results do not depend on
# the thread count or on how tasks split the rows.

# The tile widths of the first-layer kernel: the GEMM's two, and one vector (a 16-pixel row of a stride-2 layer
# on AVX-512, which the narrow tile padded to 32).
cdef struct single_tile:
    char unused
ctypedef fused smallc_width:
    wide_tile
    narrow_tile
    single_tile


cdef inline int smallc_nv(Py_ssize_t OW, Py_ssize_t VL) noexcept nogil:
    """Vectors per tile along an output row: the widest of CE_NV, CE_NV_ALT and 1 that pads OW least."""
    cdef int best = CE_NV, nv, i
    cdef Py_ssize_t padded, least = (OW + CE_NV * VL - 1) // (CE_NV * VL) * CE_NV * VL
    for i in range(2):
        nv = CE_NV_ALT if i == 0 else 1
        padded = (OW + nv * VL - 1) // (nv * VL) * nv * VL
        if padded < least:
            best = nv
            least = padded
    return best


cdef inline Py_ssize_t smallc_row_width(const ConvGeom* p, Py_ssize_t VL, int nv) noexcept nogil:
    """Columns per phase of a task's padded input rows: every tile of nv*VL outputs reads whole vectors inside."""
    cdef Py_ssize_t tiles = (p.OW + nv * VL - 1) // (nv * VL)
    return tiles * nv * VL + (p.KW - 1) // p.sw + 1


cdef void smallc_tiles(const float* xq, Py_ssize_t xstep, Py_ssize_t nrows, const Py_ssize_t* tapoff,
                       Py_ssize_t taps, const float* wk, const ConvGeom* p, const Epilogue* e, Py_ssize_t k0,
                       Py_ssize_t nk, float* y, smallc_width* width) noexcept nogil:
    """y[i*OH*OW + r*OW + ow] for channels k0 + i < k0 + nk (at most MR), nrows output rows r and every column of a
    row, in tiles of MR channels x nv vectors: tap t of row r, tile column ow0 reads xq + r*xstep + ow0 + tapoff[t];
    wk holds the MR weights of each tap, zero past nk. One call per task and channel block: a call per tile (27
    taps of a 3-channel 3x3 layer) spent a quarter of its time entering and leaving (Zen 4, perf)."""
    cdef vfloat acc[CE_MR][CE_NV]
    cdef vfloat xv[CE_NV]
    cdef vfloat v
    cdef float bval, sc, sh
    cdef float tail[CE_MR * 64]   # the tile's MR x CE_NV vectors of floats (at most 3 x 16 each)
    cdef const float* src
    cdef const float* wt
    cdef const float* xr
    cdef float* yr
    cdef Py_ssize_t VL = CE_VBYTES // sizeof(float)
    cdef Py_ssize_t i, j, t, r, ow0, nvalid, P = p.OH * p.OW
    cdef const float* bias = <const float*>e.bias
    cdef const float* scale = <const float*>e.scale
    cdef const float* shift = <const float*>e.shift
    cdef int nv
    if smallc_width is wide_tile:
        nv = CE_NV
    elif smallc_width is narrow_tile:
        nv = CE_NV_ALT
    else:
        nv = 1
    for r in range(nrows):
        xr = xq + r * xstep
        yr = y + r * p.OW
        ow0 = 0
        while ow0 < p.OW:
            nvalid = min(nv * VL, p.OW - ow0)
            for i in range(CE_MR):
                for j in range(nv):
                    acc[i][j] = ce_vf_zero()
            wt = wk
            for t in range(taps):
                src = xr + ow0 + tapoff[t]
                for j in range(nv):
                    xv[j] = (<const vfloat*>(src + j * VL))[0]
                for i in range(CE_MR):
                    for j in range(nv):
                        acc[i][j] += wt[i] * xv[j]
                wt = wt + CE_MR
            if nvalid < nv * VL:        # the last tile of a row: through the scalar epilogue, valid pixels only
                for i in range(CE_MR):
                    for j in range(nv):
                        (<vfloat*>(tail + (i * CE_NV + j) * VL))[0] = acc[i][j]
                for i in range(nk):
                    store_span(<const float*>(tail + i * CE_NV * VL), 1, yr + i * P + ow0, nvalid, e, k0 + i)
            else:                       # whole tiles: the epilogue in registers, then the only store
                for i in range(CE_MR):
                    if i < nk:
                        bval = bias[k0 + i] if bias != NULL else 0
                        sc = scale[k0 + i] if scale != NULL else 1
                        sh = shift[k0 + i] if scale != NULL else 0
                        for j in range(nv):
                            v = acc[i][j] + bval
                            if e.relu:
                                v = ce_vf_relu(v)
                            if scale != NULL:
                                v = v * sc + sh
                            (<vfloat*>(yr + i * P + ow0 + j * VL))[0] = v
            ow0 = ow0 + nv * VL


cdef inline Py_ssize_t smallc_rows(const ConvGeom* p, int n_threads) noexcept nogil:
    """Output rows per task: about 8 tasks per thread over the batch, so that batch 1 splits over the rows."""
    cdef Py_ssize_t want = 8 * max(1, n_threads)
    return max(1, min(p.OH, (p.B * p.OH) // want))


cdef int conv2d_forward_smallc(const float* x, const float* w, const Epilogue* e, float* y, const ConvGeom* p,
                               int n_threads) noexcept nogil:
    """The first-layer forward (see the top of this file), float32. Returns -1 on allocation failure."""
    cdef fpstate fp, fps
    cdef Py_ssize_t VL = vlen(<float>0)
    cdef int nv = smallc_nv(p.OW, VL)
    cdef Py_ssize_t Wq = smallc_row_width(p, VL, nv)
    cdef Py_ssize_t taps = p.C * p.KH * p.KW
    cdef Py_ssize_t kblocks = (p.K + CE_MR - 1) // CE_MR
    cdef Py_ssize_t R = smallc_rows(p, n_threads)
    cdef Py_ssize_t nrb = (p.OH + R - 1) // R
    cdef Py_ssize_t rows_in = (R - 1) * p.sh + p.KH
    cdef Py_ssize_t plane = rows_in * p.sw * Wq
    cdef Py_ssize_t task, b, rb, oh0, nrows, c, ph, kb, i, t
    cdef float* wpk
    cdef Py_ssize_t* tapoff
    cdef Py_ssize_t kh, kw
    cdef float* xq
    cdef float* dst
    cdef int failed = 0
    wpk = <float*>malloc(kblocks * taps * CE_MR * sizeof(float))
    tapoff = <Py_ssize_t*>malloc(taps * sizeof(Py_ssize_t))
    if wpk == NULL or tapoff == NULL:
        free(wpk)
        free(tapoff)
        return -1
    # tap (c, kh, kw) of output column ow reads padded column ow*sw + kw: phase kw % sw, column ow + kw // sw
    for c in range(p.C):
        for kh in range(p.KH):
            for kw in range(p.KW):
                tapoff[(c * p.KH + kh) * p.KW + kw] = c * plane + (kh * p.sw + kw % p.sw) * Wq + kw // p.sw
    for kb in range(kblocks):
        for t in range(taps):
            for i in range(CE_MR):
                wpk[(kb * taps + t) * CE_MR + i] = w[(kb * CE_MR + i) * taps + t] if kb * CE_MR + i < p.K else 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        xq = <float*>malloc(p.C * plane * sizeof(float))
        for task in prange(p.B * nrb, schedule='static'):
            if xq == NULL:
                flag_failure(&failed)
                continue
            b = task // nrb
            rb = task - b * nrb
            oh0 = rb * R
            nrows = min(R, p.OH - oh0)
            # the task's input rows, zero-padded, each split into sw phases of Wq columns: phase ph of row r at
            # xq + c*plane + (r*sw + ph)*Wq, by vector copies (an element loop was 3.7% of a batch-64 separable
            # net in perf; Zen 4, 1 thread, batch 64 with ReLU and global pool after, us: 3x32x32 -> 32 3x3 s2
            # 471 -> 369, s1 1507 -> 1397, 3x32x32 -> 64 2928 -> 2831)
            for c in range(p.C):
                for ph in range(p.sw):
                    copy_plane_rows_step(x + (b * p.C + c) * p.H * p.W, p, oh0 * p.sh - p.pt,
                                         (nrows - 1) * p.sh + p.KH, 1, xq + c * plane + ph * Wq, p.sw * Wq, Wq,
                                         ph - p.pl, p.sw)
            for kb in range(kblocks):
                dst = y + (b * p.K + kb * CE_MR) * p.OH * p.OW + oh0 * p.OW
                if nv == CE_NV:
                    smallc_tiles(xq, p.sh * p.sw * Wq, nrows, tapoff, taps, wpk + kb * taps * CE_MR, p, e,
                                 kb * CE_MR, min(CE_MR, p.K - kb * CE_MR), dst, <wide_tile*>NULL)
                elif nv == CE_NV_ALT:
                    smallc_tiles(xq, p.sh * p.sw * Wq, nrows, tapoff, taps, wpk + kb * taps * CE_MR, p, e,
                                 kb * CE_MR, min(CE_MR, p.K - kb * CE_MR), dst, <narrow_tile*>NULL)
                else:
                    smallc_tiles(xq, p.sh * p.sw * Wq, nrows, tapoff, taps, wpk + kb * taps * CE_MR, p, e,
                                 kb * CE_MR, min(CE_MR, p.K - kb * CE_MR), dst, <single_tile*>NULL)
        free(xq)
        fp_leave(fp)
    fp_resume(fps)
    free(wpk)
    free(tapoff)
    return -failed


cdef Py_ssize_t smallc_scratch(const ConvGeom* p, Py_ssize_t T) noexcept nogil:
    """Bytes conv2d_forward_smallc allocates with T threads (float32)."""
    cdef Py_ssize_t VL = vlen(<float>0)
    cdef int nv = smallc_nv(p.OW, VL)
    cdef Py_ssize_t R = smallc_rows(p, T)
    cdef Py_ssize_t rows_in = (R - 1) * p.sh + p.KH
    return (((p.K + CE_MR - 1) // CE_MR * p.C * p.KH * p.KW * CE_MR
             + T * p.C * rows_in * p.sw * smallc_row_width(p, VL, nv)) * sizeof(float)
            + p.C * p.KH * p.KW * sizeof(Py_ssize_t))


# grad_weight of the same first layers (stride 1 or 2): dW[k, c, kh, kw] = sum over images and output pixels of
# dY[b, k, oh, ow] * x[b, c, oh*s + kh - pt, ow*s + kw - pl]. The GEMM paths ran it at 8-17 GFLOP/s (a 6- or
# 32-channel output, 27-75 taps: every tile is mostly padding), and a strided stem at 31 by im2col. Here a task
# takes a fixed slice of the images (grad_weight_chunks: a function of the shape only), copies each image's
# zero-padded rows, at stride 2 split into even and odd columns (so that tap kw reads phase kw % 2 from column
# kw // 2 on, whole vectors), and its dY rows (padded to whole vectors with zeros; read in place where they are
# whole vectors already and K is whole MR-tiles: smallc_gw_in_place), and keeps MR output channels x
# up to 3 taps of vector accumulators per (c, kh) across all its images; the lanes are added in a fixed order at
# the end into the slice's partial sums, which sum_partials adds in slice order. So results do not depend on the
# thread count.

cdef inline Py_ssize_t smallc_gw_width(const ConvGeom* p) noexcept nogil:
    """Output columns rounded up to whole vectors: the dY rows and the x windows a row reads."""
    cdef Py_ssize_t VL = vlen(<float>0)
    return (p.OW + VL - 1) // VL * VL


cdef inline Py_ssize_t smallc_gw_xwidth(const ConvGeom* p) noexcept nogil:
    """Columns of an image's padded rows per column phase: the widest window a tap reads, whole vectors."""
    return smallc_gw_width(p) + (p.KW - 1) // p.sw


cdef inline Py_ssize_t smallc_gw_xheight(const ConvGeom* p) noexcept nogil:
    """Rows of an image's padded rows: those the output rows' taps reach."""
    return (p.OH - 1) * p.sh + p.KH


cdef inline bint smallc_gw_in_place(const ConvGeom* p) noexcept nogil:
    """Whether dY is read where it lies: its rows whole vectors, its channels whole MR-tiles. (The copy, a stream
    from memory that no arithmetic overlapped, took a quarter of the call: Zen 4, 1 thread, batch 64, 3x32x32 ->
    64 3x3 55 -> 73 GFLOP/s, 2 threads 104 -> 124.)"""
    return smallc_gw_width(p) == p.OW and p.K % CE_SGW_MR == 0


cdef inline Py_ssize_t smallc_gw_floats(const ConvGeom* p) noexcept nogil:
    """Floats of one task's scratch: padded x rows (sw column phases), padded dY rows (K rounded up to MR) unless
    dY is read in place, the accumulators."""
    cdef Py_ssize_t VL = vlen(<float>0)
    cdef Py_ssize_t Kpad = round_up(p.K, CE_SGW_MR)
    return (p.C * p.sw * smallc_gw_xheight(p) * smallc_gw_xwidth(p)
            + (0 if smallc_gw_in_place(p) else Kpad * p.OH * smallc_gw_width(p)) + Kpad * p.C * p.KH * p.KW * VL)


# Tags of smallc_gw_rows's tap count, so that each count compiles to its own loop (a run-time count kept a compare
# and branch per FMA group in the inner loop: perf, Zen 4).
cdef struct one_tap:
    char unused
cdef struct two_taps:
    char unused
cdef struct three_taps:
    char unused
ctypedef fused gw_taps:
    one_tap
    two_taps
    three_taps


cdef void smallc_gw_rows(const float* dyp, Py_ssize_t dstride, const float* x0, const float* x1,
                         const float* x2, Py_ssize_t xstride, Py_ssize_t nrows, Py_ssize_t nvec, float* vacc,
                         Py_ssize_t tap_stride, gw_taps* ntaps) noexcept nogil:
    """vacc[(t * MR + i) * VL ...] += sum over rows and vectors of dY(channel i) * tap t's x, for t < ntap (1, 2
    or 3, from the tag) and the MR channels whose dY planes start dstride apart at dyp. Row r of channel i is
    dyp + i * dstride + r * nvec * VL; row r of tap t's x is (x0, x1, x2)[t] + r * xstride (the taps' pointers
    as arguments: an array of them in the caller would be shared by its OpenMP threads). tap_stride: floats
    between taps in vacc."""
    cdef const float* xt[3]
    cdef vfloat acc[CE_SGW_MR][3]
    cdef vfloat dv
    cdef vfloat xv[3]
    cdef Py_ssize_t VL = CE_VBYTES // sizeof(float)
    cdef Py_ssize_t i, t, r, v
    cdef int ntap
    xt[0] = x0
    xt[1] = x1
    xt[2] = x2
    if gw_taps is one_tap:
        ntap = 1
    elif gw_taps is two_taps:
        ntap = 2
    else:
        ntap = 3
    for i in range(CE_SGW_MR):
        for t in range(ntap):
            acc[i][t] = (<const vfloat*>(vacc + t * tap_stride + i * VL))[0]
    for r in range(nrows):
        for v in range(nvec):
            for t in range(ntap):
                xv[t] = (<const vfloat*>(xt[t] + r * xstride + v * VL))[0]
            for i in range(CE_SGW_MR):      # one dY vector at a time: 3 x MR accumulators + 3 x + 1 dY registers
                dv = ce_vf_load_reg(dyp + i * dstride + (r * nvec + v) * VL)
                for t in range(ntap):
                    acc[i][t] += dv * xv[t]
    for i in range(CE_SGW_MR):
        for t in range(ntap):
            (<vfloat*>(vacc + t * tap_stride + i * VL))[0] = acc[i][t]


cdef int conv2d_grad_weight_smallc(const float* dy, const float* x, float* partial, Py_ssize_t nchunks,
                                   const ConvGeom* p, int n_threads) noexcept nogil:
    """partial[ch][r, k] (r = (c, kh, kw)) for each of the nchunks slices of the images; -1 on allocation
    failure."""
    cdef fpstate fp, fps
    cdef Py_ssize_t VL = vlen(<float>0)
    cdef Py_ssize_t OWp = smallc_gw_width(p), Wx = smallc_gw_xwidth(p)
    cdef Py_ssize_t Hx = smallc_gw_xheight(p)
    cdef Py_ssize_t sw = p.sw
    cdef Py_ssize_t Kpad = round_up(p.K, CE_SGW_MR)
    cdef Py_ssize_t taps = p.KH * p.KW
    cdef Py_ssize_t Kd = p.C * taps
    cdef Py_ssize_t per = (p.B + nchunks - 1) // nchunks
    cdef Py_ssize_t chunk, b, b0, b1, c, kh, kw, kb, i, r, lane, ph
    cdef const float* x0
    cdef const float* x1
    cdef const float* x2
    cdef float* buf
    cdef float* xp
    cdef float* dyp
    cdef float* vacc
    cdef float* slot
    cdef float* dst_acc
    cdef const float* src_dy
    cdef const float* dyb
    cdef bint in_place = smallc_gw_in_place(p)
    cdef float s
    cdef int failed = 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        buf = <float*>malloc(smallc_gw_floats(p) * sizeof(float))
        for chunk in prange(nchunks, schedule='static'):
            if buf == NULL:
                flag_failure(&failed)
                continue
            xp = buf
            dyp = xp + p.C * sw * Hx * Wx
            vacc = dyp + (0 if in_place else Kpad * p.OH * OWp)
            memset(vacc, 0, Kpad * Kd * VL * sizeof(float))
            if not in_place:
                memset(dyp, 0, Kpad * p.OH * OWp * sizeof(float))       # the channels past K stay zero
            b0 = chunk * per
            b1 = min(p.B, b0 + per)
            for b in range(b0, b1):
                # the image's rows at offset (pt, pl) in zero rows of width Wx, per column phase: phase ph's
                # column j is input column j * sw + ph - pl; dY rows padded to OWp
                for c in range(p.C):
                    for ph in range(sw):
                        copy_plane_rows_step(x + (b * p.C + c) * p.H * p.W, p, -p.pt, Hx, 1,
                                             xp + (c * sw + ph) * Hx * Wx, Wx, Wx, ph - p.pl, sw)
                if in_place:
                    dyb = dy + b * p.K * p.OH * p.OW
                else:
                    dyb = dyp
                    for i in range(p.K):
                        ce_copy_rows(dyp + i * p.OH * OWp, OWp, dy + (b * p.K + i) * p.OH * p.OW, p.OW, p.OH, OWp,
                                     0, p.OW)
                for kb in range(Kpad // CE_SGW_MR):
                    for c in range(p.C):
                        for kh in range(p.KH):
                            kw = 0
                            while kw < p.KW:
                                dst_acc = vacc + ((kb * Kd + (c * p.KH + kh) * p.KW + kw) * CE_SGW_MR) * VL
                                # tap kw + t: phase (kw + t) % sw of row kh, from column (kw + t) // sw
                                x0 = xp + ((c * sw + kw % sw) * Hx + kh) * Wx + kw // sw
                                x1 = xp + ((c * sw + (kw + 1) % sw) * Hx + kh) * Wx + (kw + 1) // sw
                                x2 = xp + ((c * sw + (kw + 2) % sw) * Hx + kh) * Wx + (kw + 2) // sw
                                src_dy = dyb + kb * CE_SGW_MR * p.OH * OWp
                                if p.KW - kw >= 3:
                                    smallc_gw_rows(src_dy, p.OH * OWp, x0, x1, x2, p.sh * Wx, p.OH, OWp // VL,
                                                   dst_acc, CE_SGW_MR * VL, <three_taps*>NULL)
                                elif p.KW - kw == 2:
                                    smallc_gw_rows(src_dy, p.OH * OWp, x0, x1, x2, p.sh * Wx, p.OH, OWp // VL,
                                                   dst_acc, CE_SGW_MR * VL, <two_taps*>NULL)
                                else:
                                    smallc_gw_rows(src_dy, p.OH * OWp, x0, x1, x2, p.sh * Wx, p.OH, OWp // VL,
                                                   dst_acc, CE_SGW_MR * VL, <one_tap*>NULL)
                                kw = kw + 3
            # lanes added in a fixed order into the slice's partial sums [r, k]
            slot = partial + chunk * Kd * p.K
            for kb in range(Kpad // CE_SGW_MR):
                for r in range(Kd):
                    for i in range(CE_SGW_MR):
                        if kb * CE_SGW_MR + i < p.K:
                            s = 0
                            for lane in range(VL):
                                s = s + vacc[((kb * Kd + r) * CE_SGW_MR + i) * VL + lane]
                            slot[r * p.K + kb * CE_SGW_MR + i] = s
        free(buf)
        fp_leave(fp)
    fp_resume(fps)
    return -failed
