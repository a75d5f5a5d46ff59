# conv2d grad_weight and grad_bias: per-chunk partial sums on the direct, im2col and pixel paths, summed in a
# fixed order; and the def entry.


cdef void sum_partials(floating* partial, Py_ssize_t nchunks, const ConvGeom* p, floating* dw,
                       int n_threads) noexcept nogil:
    """dw[g*Kg + k, r] = sum over chunks, in chunk order, of partial[g, ch][r, k]. The chunks are added into
    chunk 0 along contiguous runs, then transposed into dw (partial is overwritten)."""
    cdef fpstate fp, fps
    cdef Py_ssize_t Kg = p.K // p.G
    cdef Py_ssize_t Kd = (p.C // p.G) * p.KH * p.KW
    cdef Py_ssize_t n = Kd * Kg
    cdef Py_ssize_t BLK = 4096
    cdef Py_ssize_t nblk = (n + BLK - 1) // BLK
    cdef Py_ssize_t TB = 16
    cdef Py_ssize_t nkb = (Kg + TB - 1) // TB
    cdef Py_ssize_t task, g, i0, i1, i, k, r, ch, k0, kn, r0
    cdef floating* acc
    cdef const floating* src
    if nchunks > 1:
        fps = fp_suspend()
        with parallel(num_threads=n_threads):
            fp = fp_enter()
            for task in prange(p.G * nblk, schedule='static'):
                g = task // nblk
                i0 = (task - g * nblk) * BLK
                i1 = min(n, i0 + BLK)
                acc = partial + g * nchunks * n
                for ch in range(1, nchunks):
                    src = acc + ch * n
                    for i in range(i0, i1):
                        acc[i] = acc[i] + src[i]
            fp_leave(fp)
        fp_resume(fps)
    # the transpose by blocks of TB output channels: a task reads TB consecutive values (a cache line of float32)
    # of each row r, where one column at a time read a line per value (512 -> 512 channels at 4x4, batch 1: 25 ms
    # of the call's 26 went here, the 9.4 MB of partial sums read down their columns)
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        for task in prange(p.G * nkb, schedule='static'):
            g = task // nkb
            k0 = (task - g * nkb) * TB
            kn = min(TB, Kg - k0)
            src = partial + g * nchunks * n + k0
            if floating is float:
                ce_transpose_rows(dw + (g * Kg + k0) * Kd, Kd, src, Kg, Kd, kn)
            else:
                for i in range((Kd + TB - 1) // TB):
                    r0 = i * TB
                    for k in range(kn):
                        for r in range(r0, min(Kd, r0 + TB)):
                            dw[(g * Kg + k0 + k) * Kd + r] = src[r * Kg + k]
        fp_leave(fp)
    fp_resume(fps)


cdef void sum_bias_partials(const floating* dbpart, Py_ssize_t nchunks, const ConvGeom* p,
                            floating* db) noexcept nogil:
    """db[g*Kg + k] = sum over chunks, in chunk order, of dbpart[(g*nchunks + ch)*Kg + k]."""
    cdef Py_ssize_t Kg = p.K // p.G
    cdef Py_ssize_t g, ch, k
    for g in range(p.G):
        for k in range(Kg):
            db[g * Kg + k] = dbpart[g * nchunks * Kg + k]
        for ch in range(1, nchunks):
            for k in range(Kg):
                db[g * Kg + k] += dbpart[(g * nchunks + ch) * Kg + k]


cdef floating channel_sum(const floating* dy, Py_ssize_t B, Py_ssize_t stride, Py_ssize_t P) noexcept nogil:
    """Sum of B planes of P values (stride apart) in 16 interleaved lanes, then the lanes in order: a fixed
    order that vectorises (one running sum is a serial chain of adds)."""
    cdef floating lanes[16]
    cdef floating acc = 0
    cdef Py_ssize_t b, i, j, n16
    cdef const floating* src
    for j in range(16):
        lanes[j] = 0
    n16 = P // 16 * 16
    for b in range(B):
        src = dy + b * stride
        for i in range(0, n16, 16):
            for j in range(16):
                lanes[j] += src[i + j]
        for i in range(n16, P):
            lanes[i - n16] += src[i]
    for j in range(16):
        acc += lanes[j]
    return acc


cdef void grad_bias(const floating* dy, const ConvGeom* p, floating* db, int n_threads) noexcept nogil:
    """db[k] = sum of dY[:, k] over images and pixels, each channel in one fixed order."""
    cdef fpstate fp, fps
    cdef Py_ssize_t k
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        for k in prange(p.K, schedule='static'):
            db[k] = channel_sum(dy + k * p.OH * p.OW, p.B, p.K * p.OH * p.OW, p.OH * p.OW)
        fp_leave(fp)
    fp_resume(fps)


cdef void pack_grad_out_rows_t(const floating* dy, const ConvGeom* p, Py_ssize_t b, Py_ssize_t g, Py_ssize_t oh0,
                               Py_ssize_t nrows, Py_ssize_t Wp, Py_ssize_t NR, Py_ssize_t Npad,
                               floating* out) noexcept nogil:
    """out = dY[b, g, :, oh0:oh0+nrows]^T as NR-column panels of depth nrows*Wp: row t = oh*Wp + ow holds the
    group's Kg output channels at (oh0 + oh, ow), and zeros where ow >= OW or past Kg."""
    cdef Py_ssize_t Kg = p.K // p.G
    cdef Py_ssize_t ncols = nrows * Wp
    cdef Py_ssize_t OHW = p.OH * p.OW
    cdef Py_ssize_t k, oh, ow, jp, t
    cdef floating* dst
    cdef const floating* src
    memset(out, 0, Npad * ncols * sizeof(floating))
    # pixel outer, channel inner: the stores run along a panel row, the loads along Kg image rows at once
    for oh in range(nrows):
        for ow in range(p.OW):
            t = oh * Wp + ow
            src = dy + (b * p.K + g * Kg) * OHW + (oh0 + oh) * p.OW + ow
            for jp in range(Npad // NR):
                dst = out + (jp * ncols + t) * NR
                for k in range(min(NR, Kg - jp * NR)):
                    dst[k] = src[(jp * NR + k) * OHW]


cdef int conv2d_grad_weight_direct(const floating* dy, const floating* x, floating* partial, Py_ssize_t nchunks,
                                   const ConvGeom* p, int n_threads) noexcept nogil:
    """Stride-1 grad_weight without im2col: dW[g]^T (Kd x Kg) = sum over row blocks of taps(xblk) . dY^T, the A
    rows read from the zero-padded input rows as in the forward, the B rows dY^T packed with zeros in the dropped
    columns ow >= OW (so those columns add nothing; the caller sends non-finite inputs, where 0 * inf would not
    be nothing, to the exact im2col path). Units (image, row block) go to nchunks fixed chunks."""
    cdef fpstate fp, fps
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Kd = Cg * p.KH * p.KW
    cdef int nv = pick_nv((Kg + vlen(<floating>0) - 1) // vlen(<floating>0))
    cdef Py_ssize_t NR = nv * vlen(<floating>0)
    cdef Py_ssize_t KC = block_k(<floating>0)
    cdef Py_ssize_t Mpad = round_up(Kd, CE_MR)
    cdef Py_ssize_t Npad = round_up(Kg, NR)
    cdef Py_ssize_t Wp = padded_width(p)
    cdef Py_ssize_t R = direct_rows(p, 2 * KC)
    cdef Py_ssize_t rows_in = R + (p.KH - 1) * p.dh
    cdef Py_ssize_t nrb = (p.OH + R - 1) // R
    cdef Py_ssize_t units = p.B * nrb
    cdef Py_ssize_t per_chunk = (units + nchunks - 1) // nchunks
    cdef Py_ssize_t ncmax = R * Wp
    cdef Py_ssize_t xlen = Cg * rows_in * Wp + ncmax + (p.KW - 1) * p.dw
    cdef Py_ssize_t task, g, ch, u, b, oh0, nrows, ncols, t0, kc, i, j
    cdef bint started
    cdef floating* xblk
    cdef floating* bpack
    cdef floating* cbuf
    cdef floating* zeros
    cdef const floating** taps
    cdef const floating** arow
    cdef const floating** brow
    cdef int failed = 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        xblk = <floating*>calloc(xlen, sizeof(floating))
        bpack = <floating*>malloc(ncmax * Npad * sizeof(floating))
        cbuf = <floating*>malloc(Mpad * Npad * sizeof(floating))
        zeros = <floating*>calloc(ncmax, sizeof(floating))
        taps = <const floating**>malloc(Kd * sizeof(floating*))
        arow = <const floating**>malloc(Mpad * sizeof(floating*))
        brow = <const floating**>malloc(ncmax * sizeof(floating*))
        for task in prange(p.G * nchunks, schedule='static'):
            if (xblk == NULL or bpack == NULL or cbuf == NULL or zeros == NULL or taps == NULL or arow == NULL
                    or brow == NULL):
                flag_failure(&failed)
                continue
            g = task // nchunks
            ch = task - g * nchunks
            started = False
            for u in range(ch * per_chunk, min(units, (ch + 1) * per_chunk)):
                b = u // nrb
                oh0 = (u % nrb) * R
                nrows = min(R, p.OH - oh0)
                ncols = nrows * Wp
                fill_padded_rows(x, p, b, g, oh0, nrows + (p.KH - 1) * p.dh, rows_in, xblk)
                tap_rows(p, xblk, rows_in, taps)
                pack_grad_out_rows_t(dy, p, b, g, oh0, nrows, Wp, NR, Npad, bpack)
                row_table(brow, bpack, ncols, NR)
                t0 = 0
                while t0 < ncols:
                    kc = min(KC, ncols - t0)
                    for i in range(Mpad):
                        arow[i] = taps[i] + t0 if i < Kd else zeros
                    macro_kernel(Mpad // CE_MR, Npad // NR, kc, arow, 1, brow + t0, NR * ncols, cbuf, Npad,
                                 started, nv)
                    started = True
                    t0 = t0 + kc
            for i in range(Kd):
                for j in range(Kg):
                    partial[task * Kd * Kg + i * Kg + j] = cbuf[i * Npad + j] if started else 0
        free(xblk)
        free(bpack)
        free(cbuf)
        free(zeros)
        free(taps)
        free(arow)
        free(brow)
        fp_leave(fp)
    fp_resume(fps)
    return -failed


cdef extern from "pointwise.h":
    enum: CE_PW_TILE
    void ce_pw_lanes_add_f(const float* const* a, const float* const* b, Py_ssize_t sa, Py_ssize_t sb,
                           Py_ssize_t nimg, Py_ssize_t n, float* acc) nogil
    void ce_pw_lanes_sum_f(const float* acc, float* out) nogil
    void ce_pw_lanes_add_d(const double* const* a, const double* const* b, Py_ssize_t sa, Py_ssize_t sb,
                           Py_ssize_t nimg, Py_ssize_t n, double* acc) nogil
    void ce_pw_lanes_sum_d(const double* acc, double* out) nogil


cdef int conv2d_grad_weight_pointwise(const floating* dy, const floating* x, floating* partial, Py_ssize_t nchunks,
                                      const ConvGeom* p, int n_threads) noexcept nogil:
    """grad_weight of a 1x1 kernel at stride 1 without padding (use_pointwise): dW[k, c] = the sum over images and
    pixels of dY[k, q] * X[c, q], rows of both read in place by a dot-product micro-kernel (pointwise.h), CE_PW_TILE
    output x CE_PW_TILE input channels per tile. A task is (group, chunk of images, CE_PW_TILE output channels);
    each tile's lanes run over the chunk's images in order, in registers, and are reduced once into partial[g, ch]
    (Cg x Kg), which sum_partials adds in chunk order: the same sums whatever the thread count. With no image in a
    chunk (fewer images than chunks cannot happen: grad_weight_chunks <= B) the tile is zero. (The pixel path copied
    the input channels-last and ran these shapes at 35-73 GFLOP/s.)"""
    cdef fpstate fp, fps
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G, P = p.H * p.W
    cdef Py_ssize_t VL = vlen(<floating>0)
    cdef Py_ssize_t TL = CE_PW_TILE
    cdef Py_ssize_t ktiles = (Kg + TL - 1) // TL, ctiles = (Cg + TL - 1) // TL
    cdef Py_ssize_t per_chunk = (p.B + nchunks - 1) // nchunks
    cdef Py_ssize_t task, g, ch, kt, ct, b0, nimg, i, j, k, c
    cdef floating* acc
    cdef floating* tile
    cdef const floating** rows
    cdef int failed = 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        acc = <floating*>malloc(TL * TL * VL * sizeof(floating))
        tile = <floating*>malloc(TL * TL * sizeof(floating))
        rows = <const floating**>malloc(2 * TL * sizeof(floating*))
        for task in prange(p.G * nchunks * ktiles, schedule='static'):
            if acc == NULL or tile == NULL or rows == NULL:
                flag_failure(&failed)
                continue
            g = task // (nchunks * ktiles)
            ch = (task // ktiles) % nchunks
            kt = task % ktiles
            b0 = ch * per_chunk
            nimg = max(0, min(p.B, b0 + per_chunk) - b0)
            # rows past the last channel repeat the tile's first (computed, never stored)
            for i in range(TL):
                k = kt * TL + i if kt * TL + i < Kg else kt * TL
                rows[i] = dy + (b0 * p.K + g * Kg + k) * P
            for ct in range(ctiles):
                for j in range(TL):
                    c = ct * TL + j if ct * TL + j < Cg else ct * TL
                    rows[TL + j] = x + (b0 * p.C + g * Cg + c) * P
                if floating is float:
                    ce_pw_lanes_add_f(rows, rows + TL, p.K * P, p.C * P, nimg, P, acc)
                    ce_pw_lanes_sum_f(acc, tile)
                else:
                    ce_pw_lanes_add_d(rows, rows + TL, p.K * P, p.C * P, nimg, P, acc)
                    ce_pw_lanes_sum_d(acc, tile)
                for i in range(TL):
                    for j in range(TL):
                        k = kt * TL + i
                        c = ct * TL + j
                        if k < Kg and c < Cg:
                            partial[(g * nchunks + ch) * Cg * Kg + c * Kg + k] = tile[i * TL + j]
        free(acc)
        free(tile)
        free(rows)
        fp_leave(fp)
    fp_resume(fps)
    return -failed


cdef int conv2d_grad_weight_im2col(const floating* dy, const floating* x, floating* partial, Py_ssize_t nchunks,
                                   const ConvGeom* p, int n_threads) noexcept nogil:
    """grad_weight for any stride: dW[g]^T (Kd x Kg) = sum over fixed chunks of the Q pixels of col . dY^T."""
    cdef fpstate fp, fps
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Kd = Cg * p.KH * p.KW
    cdef int nv = pick_nv((Kg + vlen(<floating>0) - 1) // vlen(<floating>0))
    cdef Py_ssize_t NR = nv * vlen(<floating>0)
    cdef Py_ssize_t KC = block_k(<floating>0)
    cdef Py_ssize_t LDA = KC + vlen(<floating>0)
    cdef Py_ssize_t P = p.OH * p.OW
    cdef Py_ssize_t Q = p.B * P
    cdef Py_ssize_t Mpad = round_up(Kd, CE_MR)
    cdef Py_ssize_t Npad = round_up(Kg, NR)
    cdef Py_ssize_t chunk = (Q + nchunks - 1) // nchunks
    cdef Py_ssize_t task, g, ch, q0, q1, k0, kc, i, j
    cdef floating* ablk
    cdef floating* bpack
    cdef floating* cbuf
    cdef const floating** arow
    cdef const floating** brow
    cdef int failed = 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        # rows past Kd of ablk stay zero from calloc
        ablk = <floating*>calloc(Mpad * LDA, sizeof(floating))
        bpack = <floating*>malloc(KC * Npad * sizeof(floating))
        cbuf = <floating*>malloc(Mpad * Npad * sizeof(floating))
        arow = <const floating**>malloc(Mpad * sizeof(floating*))
        brow = <const floating**>malloc(KC * sizeof(floating*))
        for task in prange(p.G * nchunks, schedule='static'):
            if ablk == NULL or bpack == NULL or cbuf == NULL or arow == NULL or brow == NULL:
                flag_failure(&failed)
                continue
            row_table(arow, ablk, Mpad, LDA)
            row_table(brow, bpack, KC, NR)
            g = task // nchunks
            ch = task - g * nchunks
            q0 = ch * chunk
            q1 = min(Q, q0 + chunk)
            if q1 <= q0:
                memset(partial + task * Kd * Kg, 0, Kd * Kg * sizeof(floating))
                continue
            k0 = q0
            while k0 < q1:
                kc = min(KC, q1 - k0)
                im2col_block(x, p, g, 0, Kd, k0, kc, kc, ablk, LDA)
                pack_b_grad_out_t(dy, p, g, k0, kc, NR, bpack)
                macro_kernel(Mpad // CE_MR, Npad // NR, kc, arow, 1, brow, NR * kc, cbuf, Npad, k0 > q0, nv)
                k0 = k0 + kc
            for i in range(Kd):
                for j in range(Kg):
                    partial[task * Kd * Kg + i * Kg + j] = cbuf[i * Npad + j]
        free(ablk)
        free(bpack)
        free(cbuf)
        free(arow)
        free(brow)
        fp_leave(fp)
    fp_resume(fps)
    return -failed


cdef void fill_window_rows_hwc(const floating* x, const ConvGeom* p, Py_ssize_t b, Py_ssize_t g, Py_ssize_t ih0,
                               Py_ssize_t nrows, Py_ssize_t Cgpad, floating* xblk) noexcept nogil:
    """fill_window_rows with channels last: xblk[(ri*Wpad + t)*Cgpad + c] = x[b, g*Cg + c, ih0 + ri, t - pl],
    zero outside the image and for channels c >= Cg (Cgpad: the pixel stride). xblk must start zeroed (calloc) and
    be written by this alone: the columns outside the image and the channels past Cg of a row are never written,
    so they stay zero; rows outside the image are zeroed here (another unit may have filled them). (A memset of
    the whole block took 2.4% of a strided call, whose 33 x 33 windows are mostly image.)"""
    cdef Py_ssize_t Cg = p.C // p.G
    cdef Py_ssize_t Wpad = window_width(p)
    cdef Py_ssize_t lo = min(p.pl, Wpad)
    cdef Py_ssize_t n = max(0, min(p.W, Wpad - p.pl))
    cdef Py_ssize_t c, ri, ih, iw
    cdef const floating* src
    cdef floating* dst
    for ri in range(nrows):
        ih = ih0 + ri
        if ih < 0 or ih >= p.H:
            memset(xblk + ri * Wpad * Cgpad, 0, Wpad * Cgpad * sizeof(floating))
            continue
        if ri + 2 < nrows and ih + 2 < p.H:
            for c in range(Cg):
                src = x + ((b * p.C + g * Cg + c) * p.H + ih + 2) * p.W
                ce_prefetch(src)
                ce_prefetch(src + n - 1)
        if floating is float:
            ce_transpose_rows(xblk + (ri * Wpad + lo) * Cgpad, Cgpad, x + ((b * p.C + g * Cg) * p.H + ih) * p.W,
                              p.H * p.W, Cg, n)
            continue
        for c in range(Cg):
            src = x + ((b * p.C + g * Cg + c) * p.H + ih) * p.W
            dst = xblk + (ri * Wpad + lo) * Cgpad + c
            for iw in range(n):
                dst[iw * Cgpad] = src[iw]


cdef inline (Py_ssize_t, Py_ssize_t, Py_ssize_t) pixel_units_rows(const ConvGeom* p, Py_ssize_t g, Py_ssize_t u0,
                                                                  Py_ssize_t u1, Py_ssize_t nrb,
                                                                  Py_ssize_t R) noexcept nogil:
    """(g, r0, r1) as prefetch_block_rows takes it: the pixel path's units u0 <= u < u1 (unit u: image u // nrb,
    output rows from (u % nrb) * R) are group g's output rows r0 <= r < r1 of the batch (row b*OH + oh)."""
    cdef Py_ssize_t bl = (u1 - 1) // nrb
    return g, (u0 // nrb) * p.OH + (u0 % nrb) * R, bl * p.OH + min(p.OH, (u1 - 1 - bl * nrb) * R + R)


cdef int conv2d_grad_weight_pixels(const floating* dy, const floating* x, floating* partial, floating* dbpart,
                                   Py_ssize_t nchunks, const ConvGeom* p, int n_threads) noexcept nogil:
    """grad_weight tap by tap, reducing over output pixels: dW_t (Kg x Cg) = dY (Kg x pixels) . X_t (pixels x Cg).

    A is dY: read in place where a step is one unit (its pixels are contiguous in every channel of dY), else
    copied per block of units into rows of contiguous pixels. B row q is pixel q's window origin in a
    channels-last, zero-padded copy of the input rows plus the tap's offset: the Cg channels there are one NR-wide
    row. Nothing is wasted and nothing is copied KH*KW times (the im2col path does both on small images). Units
    (image, block of output rows) go to nchunks fixed chunks. Unless dbpart is NULL, dbpart[task*Kg + k] gets the
    chunk's sum of dY[:, g*Kg + k] (unit by unit, each unit's pixels in channel_sum's order), read while the rows
    are in cache: grad_bias's own pass over dY took 3-4% of the call.
    AMD EPYC Zen 4, batch 64, 1 thread, old / new alternating, ms: 64x32x32x32 -> 64 3x3 s2 p1 7.03-7.30 /
    6.66-6.71 (2 threads 3.72-3.88 / 3.44-3.63), 64x32x16x16 -> 64 3x3 p1 6.04-6.19 / 5.83-6.00, 64x128x8x8 ->
    128 (A copied) 13.0-13.2 / 12.8-13.0, 32x64x56x56 -> 64 77.5-77.8 / 75.5-75.6."""
    cdef fpstate fp, fps
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t T = p.KH * p.KW
    cdef Py_ssize_t Kd = Cg * T
    cdef Py_ssize_t NR = channel_panel(p, <floating>0)
    cdef int nv = NR // vlen(<floating>0)
    cdef Py_ssize_t Cgpad = round_up(Cg, NR)
    cdef Py_ssize_t ldp = pixel_stride(Cgpad, <floating>0)
    cdef Py_ssize_t Mpad = round_up(Kg, CE_MR)
    cdef Py_ssize_t P = p.OH * p.OW
    cdef Py_ssize_t Wpad = window_width(p)
    cdef Py_ssize_t R = pixel_rows(p, GRAD_WEIGHT_PIXELS)
    cdef Py_ssize_t nrb = (p.OH + R - 1) // R
    cdef Py_ssize_t unit_len = window_rows(p, R) * Wpad * ldp
    cdef Py_ssize_t upt = units_per_task(p, R, GRAD_WEIGHT_PIXELS)
    cdef Py_ssize_t maxpix = upt * R * p.OW
    cdef Py_ssize_t units = p.B * nrb
    cdef Py_ssize_t per_chunk = (units + nchunks - 1) // nchunks
    cdef Py_ssize_t mpanels = Mpad // CE_MR
    cdef Py_ssize_t msplit = pixel_msplit(p, nchunks, mpanels, n_threads)
    cdef Py_ssize_t mchunk = (mpanels + msplit - 1) // msplit
    cdef Py_ssize_t task, tc, g, ch, u, u0, u1, ue, b, oh0, nrows, npix, ro, ow, t, i, k, c
    cdef Py_ssize_t ip0, ip1, kbeg, nk, mrows
    cdef bint started
    cdef bint in_place = upt == 1
    cdef const floating* dyunit      # the unit's dY rows, channel g*Kg (its channels P apart)
    cdef floating* xblk
    cdef floating* ablk
    cdef floating* cbuf
    cdef floating* blk
    cdef const floating** pix
    cdef const floating** arow
    cdef Py_ssize_t* tapoff
    cdef int failed = 0
    tapoff = <Py_ssize_t*>malloc(T * sizeof(Py_ssize_t))
    if tapoff == NULL:
        return -1
    for t in range(T):
        tapoff[t] = ((t // p.KW) * p.dh * Wpad + (t % p.KW) * p.dw) * ldp
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        xblk = <floating*>calloc(upt * unit_len, sizeof(floating))
        # rows Kg..Mpad of A stay zero from calloc (in place, they all read one zero row)
        ablk = <floating*>calloc((1 if in_place else Mpad) * maxpix, sizeof(floating))
        cbuf = <floating*>malloc(T * Mpad * Cgpad * sizeof(floating))
        pix = <const floating**>malloc(maxpix * sizeof(floating*))
        arow = <const floating**>malloc(Mpad * sizeof(floating*))
        for task in prange(p.G * nchunks * msplit, schedule='static'):
            if xblk == NULL or ablk == NULL or cbuf == NULL or pix == NULL or arow == NULL:
                flag_failure(&failed)
                continue
            # chunk tc = (group, chunk) of the units; this task's output channels: its block of M panels
            tc = task // msplit
            g = tc // nchunks
            ch = tc - g * nchunks
            ip0 = (task - tc * msplit) * mchunk
            ip1 = min(mpanels, ip0 + mchunk)
            if ip0 >= ip1:
                continue
            kbeg = ip0 * CE_MR
            nk = min(Kg, ip1 * CE_MR) - kbeg
            mrows = (ip1 - ip0) * CE_MR
            started = False
            if dbpart != NULL:
                for k in range(kbeg, kbeg + nk):
                    dbpart[tc * Kg + k] = 0
            u0 = ch * per_chunk
            ue = min(units, u0 + per_chunk)
            while u0 < ue:
                u1 = min(ue, u0 + upt)
                npix = 0
                for u in range(u0, u1):
                    b = u // nrb
                    oh0 = (u - b * nrb) * R
                    nrows = min(R, p.OH - oh0)
                    blk = xblk + (u - u0) * unit_len
                    fill_window_rows_hwc(x, p, b, g, oh0 * p.sh - p.pt, window_rows(p, nrows), ldp, blk)
                    dyunit = dy + (b * p.K + g * Kg + kbeg) * P + oh0 * p.OW
                    for k in range(nk):
                        if not in_place:
                            memcpy(ablk + k * maxpix + npix, dyunit + k * P, nrows * p.OW * sizeof(floating))
                        if dbpart != NULL:
                            dbpart[tc * Kg + kbeg + k] += channel_sum(dyunit + k * P, 1, 0, nrows * p.OW)
                    for ro in range(nrows):
                        for ow in range(p.OW):
                            pix[npix] = blk + (ro * p.sh * Wpad + ow * p.sw) * ldp
                            npix = npix + 1
                if u1 < units:
                    # the next step's input rows into L2 while this one computes. (Zen 4, 1 thread, 64x32x32x32 ->
                    # 64 s2 and 32x256x8x8 -> 256, interleaved: without it 2-4% slower; the same prefetches spread
                    # over the taps, into L1, or two steps ahead, or dY's next rows too, all within 1-3%: the
                    # transposed copy's time does not follow where x lies, small batches in L2 run it as slowly)
                    prefetch_block_rows(x, p, pixel_units_rows(p, g, u1, min(units, u1 + upt), nrb, R))
                if in_place:
                    # dY's rows of the step's one unit, then the zero row for the panel's padding
                    row_table(arow, dyunit, nk, P)
                    for k in range(nk, mrows):
                        arow[k] = ablk
                else:
                    # (rows past nk: zero, or another task's rows, whose sums are never stored)
                    row_table(arow, ablk, mrows, maxpix)
                # the step's pixels are one k block: each C tile is loaded and stored once per tap and step. (Blocks
                # of 32 KB of B rows, 28 pixels deep at 256+ channels, made that traffic the limit: Zen 4, 1 thread,
                # batch 64, GFLOP/s 32 KB blocks / whole steps: 256x8x8 -> 256 86-87 / 101-104, 512x4x4 -> 512
                # 50-52 / 68-71, 128x8x8 -> 128 96-97 / 99-104; 2 threads 160-166 / 206-208, 97-99 / 135-136)
                for t in range(T):
                    macro_kernel_at(ip1 - ip0, Cgpad // NR, npix, arow, 1, pix, tapoff[t], NR,
                                    cbuf + t * Mpad * Cgpad, Cgpad, started, nv)
                started = True
                u0 = u1
            # partial[task][r = c*T + t][k]: per tap a (Kg x Cg) -> (Cg x Kg) transpose, in registers for float32
            # (the strided gather took 2.5% of a strided call)
            if not started:
                for i in range(Kd):
                    memset(partial + (tc * Kd + i) * Kg + kbeg, 0, nk * sizeof(floating))
            elif floating is float:
                for t in range(T):
                    ce_transpose_rows(partial + (tc * Kd + t) * Kg + kbeg, T * Kg, cbuf + t * Mpad * Cgpad, Cgpad,
                                      nk, Cg)
            else:
                for c in range(Cg):
                    for t in range(T):
                        for k in range(nk):
                            partial[(tc * Kd + c * T + t) * Kg + kbeg + k] = cbuf[(t * Mpad + k) * Cgpad + c]
        free(xblk)
        free(ablk)
        free(cbuf)
        free(pix)
        free(arow)
        fp_leave(fp)
    fp_resume(fps)
    free(tapoff)
    return -failed


# grad_weight with dY's channels in the vector lanes (use_grad_weight_lanes: few input channels, K a multiple of the
# vector length): dW[:, r] (K lanes) = sum over images and output pixels q of x_r(q) * dY[:, q], r = (c, kh, kw).
# A task takes a fixed slice of the images (grad_weight_chunks); per image it copies x into zero-bordered planes
# and dY channels-last; a tile is `rows` (c, kh) rows of KW taps each, one vector accumulator per tap kept across
# the image's pixels: per pixel one dY vector and a broadcast of x per tap, read where the row lies (a pointer
# per row, the tap's kw a constant offset), no lanes to add at the end. Each dW element is one sum over the slice's
# images and pixels in order, the slices added in order (sum_partials): independent of the thread count.

# Tags of the tile's kernel width, so that the rows x KW accumulators are compile-time registers.
cdef struct kw2:
    char unused
cdef struct kw3:
    char unused
cdef struct kw4:
    char unused
cdef struct kw5:
    char unused
ctypedef fused gw_kw:
    kw2
    kw3
    kw4
    kw5


cdef void grad_weight_lanes_tile(const float** xr, Py_ssize_t nrows, const float* dycl, const ConvGeom* p,
                                 Py_ssize_t Wx, float* acc_mem, gw_kw* width) noexcept nogil:
    """acc_mem[(j*KW + kw)*K : +VL] += sum over output pixels (oh, ow) of xr[j][oh*Wx + ow + kw] * dycl[(oh*OW +
    ow)*K : +VL], for rows j < nrows (of CE_GW_T // KW; the others compute on xr[0] and are not stored)."""
    cdef vfloat acc[12][5]
    cdef vfloat dv
    cdef const float* r[12]
    cdef Py_ssize_t K = p.K
    cdef Py_ssize_t oh, ow, j, kw, off, q = 0
    cdef int KW, R
    if gw_kw is kw2:
        KW = 2
    elif gw_kw is kw3:
        KW = 3
    elif gw_kw is kw4:
        KW = 4
    else:
        KW = 5
    R = CE_GW_T // KW
    for j in range(R):
        r[j] = xr[j] if j < nrows else xr[0]
        for kw in range(KW):
            acc[j][kw] = (<const vfloat*>(acc_mem + (j * KW + kw) * K))[0] if j < nrows else ce_vf_zero()
    for oh in range(p.OH):
        for ow in range(p.OW):
            dv = ce_vf_load_reg(dycl + q * K)
            off = oh * Wx + ow
            for j in range(R):
                for kw in range(KW):
                    acc[j][kw] += r[j][off + kw] * dv
            q = q + 1
    for j in range(R):
        if j < nrows:
            for kw in range(KW):
                (<vfloat*>(acc_mem + (j * KW + kw) * K))[0] = acc[j][kw]


cdef int conv2d_grad_weight_lanes(const float* dy, const float* x, float* partial, Py_ssize_t nchunks,
                                  const ConvGeom* p, int n_threads) noexcept nogil:
    """partial[ch][r, k] for each of the nchunks slices of the images; -1 on allocation failure."""
    cdef fpstate fp, fps
    cdef Py_ssize_t VL = vlen(<float>0)
    cdef Py_ssize_t K = p.K, P = p.OH * p.OW
    cdef Py_ssize_t Kd = p.C * p.KH * p.KW
    cdef Py_ssize_t Hx = p.OH + p.KH - 1, Wx = p.OW + p.KW - 1
    cdef Py_ssize_t rows = CE_GW_T // p.KW
    cdef Py_ssize_t per = (p.B + nchunks - 1) // nchunks
    cdef Py_ssize_t chunk, b, b0, b1, c, g0, j, kv, n
    cdef float* buf
    cdef float* xp
    cdef float* dycl
    cdef float* accm
    cdef const float** xr          # a thread's row pointers (a C array here would be shared by the threads)
    cdef int failed = 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        buf = <float*>malloc(grad_weight_lanes_floats(p) * sizeof(float))
        xr = <const float**>malloc(12 * sizeof(float*))
        for chunk in prange(nchunks, schedule='static'):
            if buf == NULL or xr == NULL:
                flag_failure(&failed)
                continue
            xp = buf
            dycl = xp + p.C * Hx * Wx
            accm = dycl + P * K
            memset(accm, 0, Kd * K * sizeof(float))
            b0 = chunk * per
            b1 = min(p.B, b0 + per)
            for b in range(b0, b1):
                # x at (pt, pl) in zero planes of Hx x Wx (rows and columns no output pixel reads left out)
                for c in range(p.C):
                    if c + 1 < p.C:
                        prefetch_plane_rows(x + (b * p.C + c + 1) * p.H * p.W, p, 0, p.H)
                    copy_plane_rows(x + (b * p.C + c) * p.H * p.W, p, -p.pt, Hx, xp + c * Hx * Wx, Wx, Wx, p.pl)
                dy_channels_last(dy + b * K * P, K, p.OH, p.OW, dycl, p.OW * K)
                for kv in range(K // VL):
                    g0 = 0
                    while g0 < p.C * p.KH:
                        n = min(rows, p.C * p.KH - g0)
                        for j in range(n):       # row g0 + j is (c, kh) = divmod(g0 + j, KH)
                            xr[j] = xp + ((g0 + j) // p.KH * Hx + (g0 + j) % p.KH) * Wx
                        if p.KW == 2:
                            grad_weight_lanes_tile(xr, n, dycl + kv * VL, p, Wx, accm + g0 * p.KW * K + kv * VL,
                                                   <kw2*>NULL)
                        elif p.KW == 3:
                            grad_weight_lanes_tile(xr, n, dycl + kv * VL, p, Wx, accm + g0 * p.KW * K + kv * VL,
                                                   <kw3*>NULL)
                        elif p.KW == 4:
                            grad_weight_lanes_tile(xr, n, dycl + kv * VL, p, Wx, accm + g0 * p.KW * K + kv * VL,
                                                   <kw4*>NULL)
                        else:
                            grad_weight_lanes_tile(xr, n, dycl + kv * VL, p, Wx, accm + g0 * p.KW * K + kv * VL,
                                                   <kw5*>NULL)
                        g0 = g0 + rows
            memcpy(partial + chunk * Kd * K, accm, Kd * K * sizeof(float))
        free(buf)
        free(xr)
        fp_leave(fp)
    fp_resume(fps)
    return -failed


cdef int conv2d_grad_weight_core(const floating* dy, const floating* x, floating* dw, floating* db,
                                 const ConvGeom* p, int n_threads) noexcept nogil:
    """dw (K, Cg, KH, KW) and db (K,) or NULL, overwritten."""
    cdef Py_ssize_t NR = tile_n(<floating>0)
    cdef Py_ssize_t Kg = p.K // p.G
    cdef Py_ssize_t Kd = (p.C // p.G) * p.KH * p.KW
    cdef Py_ssize_t R, nchunks
    cdef floating* partial
    cdef floating* dbpart = NULL
    cdef Py_ssize_t nbias
    cdef int path, rc
    if is_depthwise(p):
        return depthwise_grad_weight(dy, x, dw, db, p, n_threads)
    path = grad_weight_path(p, <floating>0)
    if (path == PATH_DIRECT or path == PATH_SMALLC) and not all_finite(x, p.B * p.C * p.H * p.W):
        path = PATH_IM2COL
    if path == PATH_SMALLC or path == PATH_LANES:
        nchunks = grad_weight_chunks(p.B, p.OH * p.OW)
    elif path == PATH_DIRECT:
        R = direct_rows(p, grad_weight_columns(<floating>0))
        nchunks = grad_weight_chunks(p.B * ((p.OH + R - 1) // R), R * p.OW)
    elif path == PATH_PIXELS:
        nchunks = pixel_chunks(p)
    elif path == PATH_POINTWISE:
        nchunks = grad_weight_chunks(p.B, p.H * p.W)
    else:
        nchunks = grad_weight_chunks(p.B * p.OH * p.OW, 1)
    # the pixel path sums grad_bias per chunk too: those sums follow the weights'
    nbias = p.G * nchunks * Kg if path == PATH_PIXELS else 0
    partial = <floating*>malloc((p.G * nchunks * Kd * Kg + nbias) * sizeof(floating))
    if partial == NULL:
        return -1
    if nbias > 0 and db != NULL:
        dbpart = partial + p.G * nchunks * Kd * Kg
    if path == PATH_SMALLC:
        if floating is float:
            rc = conv2d_grad_weight_smallc(dy, x, partial, nchunks, p, n_threads)
        else:
            rc = -1           # (use_smallc_grad_weight takes float32 only)
    elif path == PATH_LANES:
        if floating is float:
            rc = conv2d_grad_weight_lanes(dy, x, partial, nchunks, p, n_threads)
        else:
            rc = -1           # (use_grad_weight_lanes takes float32 only)
    elif path == PATH_DIRECT:
        rc = conv2d_grad_weight_direct(dy, x, partial, nchunks, p, n_threads)
    elif path == PATH_PIXELS:
        rc = conv2d_grad_weight_pixels(dy, x, partial, dbpart, nchunks, p, n_threads)
    elif path == PATH_POINTWISE:
        rc = conv2d_grad_weight_pointwise(dy, x, partial, nchunks, p, n_threads)
    else:
        rc = conv2d_grad_weight_im2col(dy, x, partial, nchunks, p, n_threads)
    if rc == 0:
        sum_partials(partial, nchunks, p, dw, n_threads)
        if dbpart != NULL:
            sum_bias_partials(dbpart, nchunks, p, db)
        elif db != NULL:
            grad_bias(dy, p, db, n_threads)
    free(partial)
    return rc


def conv2d_grad_weight(const floating[:, :, :, ::1] grad_out,  # IN  (B, K, OH, OW)
                       const floating[:, :, :, ::1] x,         # IN  (B, C, H, W)
                       floating[:, :, :, ::1] grad_w,          # OUT (K, C/G, KH, KW)
                       floating[::1] grad_b,                   # OUT (K,), or None: not computed
                       tuple params, int n_threads):
    cdef fpstate fp, fps
    cdef ConvGeom p
    cdef int rc
    cdef floating* db = NULL
    fill_geom(&p, (x.shape[0], x.shape[1], x.shape[2], x.shape[3]), grad_w.shape[0], grad_w.shape[2], grad_w.shape[3], params)
    if grad_b is not None:
        if grad_b.shape[0] != grad_w.shape[0]:
            raise ValueError("conv2d_grad_weight: grad_b must hold one value per output channel")
        db = &grad_b[0]
    if p.B == 0:
        grad_w[...] = 0
        if grad_b is not None:
            grad_b[...] = 0
        return
    with nogil:
        fp = fp_enter_call()
        rc = conv2d_grad_weight_core(&grad_out[0, 0, 0, 0], &x[0, 0, 0, 0], &grad_w[0, 0, 0, 0], db, &p,
                                     n_threads)
        fp_leave_call(fp)
    if rc:
        raise MemoryError("conv2d_backward: could not allocate packing buffers")
