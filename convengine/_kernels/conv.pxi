# conv2d forward, grad_input, grad_weight and grad_bias on the packed GEMM of gemm.pxi.
#
# Per group g, with r = (c, kh, kw) over the Kd = Cg*KH*KW patch rows and q = (b, oh, ow) over the B*OH*OW output
# pixels, the implicit im2col matrix is col[r, q] = x[b, g*Cg + c, oh*sh - pt + kh*dh, ow*sw - pl + kw*dw] (zero
# outside the image). It is never stored: `im2col_row` writes pieces of it straight into packed GEMM panels.
#   forward     y[g]   (Kg x Q)  = W[g] (Kg x Kd) . col (Kd x Q)      split over column blocks of Q
#   grad_input  dcol   (Kd x P)  = W[g]^T . dY[b, g] (Kg x P), then col2im into dx[b, g]   split over (b, g)
#   grad_weight dW[g]^T (Kd x Kg) = sum over fixed chunks of Q of col . dY^T, chunks summed in order
# Each split gives every output element to one task that reduces in a fixed order: results are bitwise the same
# for any thread count.
#
# Three ways to run these GEMMs, chosen per shape and direction (forward_path, grad_weight_path):
#   direct   stride 1: B rows read straight from zero-padded input rows at each tap's offset (no im2col)
#   pixels   output pixels as the GEMM's rows, output channels (grad_weight: input channels) as its columns,
#            tap by tap from zero-padded input rows: nothing wasted, for small and strided images
#   im2col   the implicit im2col above, packed per block: any shape, e.g. 1 or 3 input channels

cdef struct ConvGeom:
    Py_ssize_t B, C, H, W, K, KH, KW, sh, sw, pt, pl, dh, dw, G, OH, OW

# Most elements of per-thread padded input the direct paths may ask for; larger goes the im2col / GEMM way.
cdef Py_ssize_t MAX_DIRECT_SCRATCH = 1 << 24


cdef inline void im2col_row(const floating* x, const ConvGeom* p, Py_ssize_t g, Py_ssize_t r, Py_ssize_t q0,
                            Py_ssize_t n, floating* dst, Py_ssize_t stride) noexcept nogil:
    """dst[t*stride] = col[r, q0 + t] for t < n (the pixels q may run across output rows and images)."""
    cdef Py_ssize_t KHW = p.KH * p.KW
    cdef Py_ssize_t Cg = p.C // p.G
    cdef Py_ssize_t P = p.OH * p.OW
    cdef Py_ssize_t c = r // KHW
    cdef Py_ssize_t kh = (r - c * KHW) // p.KW
    cdef Py_ssize_t kw = r - c * KHW - kh * p.KW
    cdef Py_ssize_t b = q0 // P
    cdef Py_ssize_t rem = q0 - b * P
    cdef Py_ssize_t oh = rem // p.OW
    cdef Py_ssize_t ow = rem - oh * p.OW
    cdef Py_ssize_t t = 0, seg, ih, iw0, lo, hi, u
    cdef const floating* src
    while t < n:
        seg = min(n - t, p.OW - ow)
        ih = oh * p.sh - p.pt + kh * p.dh
        if ih < 0 or ih >= p.H:
            for u in range(seg):
                dst[(t + u) * stride] = 0
        else:
            src = x + ((b * p.C + g * Cg + c) * p.H + ih) * p.W
            iw0 = ow * p.sw - p.pl + kw * p.dw
            # ow + u is inside the image for lo <= u < hi
            if p.sw == 1:
                lo = 0 if iw0 >= 0 else -iw0
                hi = p.W - iw0
            else:
                lo = 0 if iw0 >= 0 else (-iw0 + p.sw - 1) // p.sw
                hi = 0 if iw0 >= p.W else (p.W - iw0 + p.sw - 1) // p.sw
            lo = min(lo, seg)
            hi = max(lo, min(hi, seg))
            for u in range(lo):
                dst[(t + u) * stride] = 0
            if p.sw == 1 and stride == 1:
                memcpy(dst + t + lo, src + iw0 + lo, (hi - lo) * sizeof(floating))
            else:
                for u in range(lo, hi):
                    dst[(t + u) * stride] = src[iw0 + u * p.sw]
            for u in range(hi, seg):
                dst[(t + u) * stride] = 0
        t += seg
        ow = 0
        oh += 1
        if oh == p.OH:
            oh = 0
            b += 1


cdef void im2col_block(const floating* x, const ConvGeom* p, Py_ssize_t g, Py_ssize_t r0, Py_ssize_t nrows,
                       Py_ssize_t q0, Py_ssize_t n, Py_ssize_t npad, floating* out, Py_ssize_t ldo) noexcept nogil:
    """out[rr, t] = col[r0 + rr, q0 + t] row-major (row stride ldo), columns n <= t < npad zero."""
    cdef Py_ssize_t rr, t
    for rr in range(nrows):
        im2col_row(x, p, g, r0 + rr, q0, n, out + rr * ldo, 1)
        for t in range(n, npad):
            out[rr * ldo + t] = 0


cdef void pack_b_grad_out_t(const floating* dy, const ConvGeom* p, Py_ssize_t g, Py_ssize_t q0, Py_ssize_t kc,
                            Py_ssize_t NR, floating* out) noexcept nogil:
    """Pack dY[g]^T[q0:q0+kc, 0:Kg] (q = (b, oh, ow), columns are the group's output channels) as a B block of
    NR-column panels."""
    cdef Py_ssize_t Kg = p.K // p.G
    cdef Py_ssize_t P = p.OH * p.OW
    cdef Py_ssize_t jp, j, k, t, seg, b, pix, u
    cdef const floating* src
    for jp in range((Kg + NR - 1) // NR):
        for j in range(NR):
            k = jp * NR + j
            if k >= Kg:
                for t in range(kc):
                    out[t * NR + j] = 0
                continue
            t = 0
            b = q0 // P
            pix = q0 - b * P
            while t < kc:
                seg = min(kc - t, P - pix)
                src = dy + (b * p.K + g * Kg + k) * P + pix
                for u in range(seg):
                    out[(t + u) * NR + j] = src[u]
                t += seg
                pix = 0
                b += 1
        out += kc * NR


cdef void col2im_add(const floating* dcol, Py_ssize_t ldd, const ConvGeom* p, Py_ssize_t Kd, Py_ssize_t p0,
                     Py_ssize_t nc, floating* dxg) noexcept nogil:
    """dxg[c, ih, iw] += dcol[r, j] for the output pixels p0 <= pix < p0+nc of one image (dxg: its Cg planes)."""
    cdef Py_ssize_t KHW = p.KH * p.KW
    cdef Py_ssize_t r, c, kh, kw, j, seg, oh, ow, ih, iw0, lo, hi, u
    cdef const floating* src
    cdef floating* dst
    for r in range(Kd):
        c = r // KHW
        kh = (r - c * KHW) // p.KW
        kw = r - c * KHW - kh * p.KW
        oh = p0 // p.OW
        ow = p0 - oh * p.OW
        j = 0
        while j < nc:
            seg = min(nc - j, p.OW - ow)
            ih = oh * p.sh - p.pt + kh * p.dh
            if 0 <= ih < p.H:
                iw0 = ow * p.sw - p.pl + kw * p.dw
                lo = 0 if iw0 >= 0 else (-iw0 + p.sw - 1) // p.sw
                hi = 0 if iw0 >= p.W else (p.W - iw0 + p.sw - 1) // p.sw
                lo = min(lo, seg)
                hi = max(lo, min(hi, seg))
                src = dcol + r * ldd + j
                dst = dxg + (c * p.H + ih) * p.W + iw0
                if p.sw == 1:
                    for u in range(lo, hi):
                        dst[u] += src[u]
                else:
                    for u in range(lo, hi):
                        dst[u * p.sw] += src[u]
            j += seg
            ow = 0
            oh += 1


cdef inline Py_ssize_t phase_width(const ConvGeom* p) noexcept nogil:
    """Columns of one phase row in col2im_add_phased's layout: ceil(W / sw)."""
    return (p.W + p.sw - 1) // p.sw


cdef inline (Py_ssize_t, Py_ssize_t, Py_ssize_t) phased_span(const ConvGeom* p, Py_ssize_t iw0, Py_ssize_t seg,
                                                            Py_ssize_t Wph) noexcept nogil:
    """For seg output columns whose tap lands on image columns iw0, iw0 + sw, ...: (lo, hi, off), the columns
    lo <= u < hi inside the image, and where column lo sits in its phase-split row (see col2im_add_phased)."""
    cdef Py_ssize_t lo = 0 if iw0 >= 0 else (-iw0 + p.sw - 1) // p.sw
    cdef Py_ssize_t hi = 0 if iw0 >= p.W else (p.W - iw0 + p.sw - 1) // p.sw
    cdef Py_ssize_t first
    lo = min(lo, seg)
    hi = max(lo, min(hi, seg))
    first = iw0 + lo * p.sw
    return lo, hi, (first % p.sw) * Wph + first // p.sw if hi > lo else 0


cdef void col2im_add_phased(const floating* dcol, Py_ssize_t ldd, const ConvGeom* p, Py_ssize_t Kd, Py_ssize_t p0,
                            Py_ssize_t nc, floating* buf) noexcept nogil:
    """col2im_add for a column stride sw > 1, into the image's planes with each row split by column phase:
    column iw of row (c, ih) at buf[((c*H + ih)*sw + iw % sw)*Wph + iw // sw]. A kernel row's writes, sw columns
    apart in the image, are then contiguous and vectorise (strided, they were scalar and cost more than the GEMM
    that made dcol). unphase() puts the columns back in order."""
    cdef Py_ssize_t KHW = p.KH * p.KW
    cdef Py_ssize_t Wph = phase_width(p)
    cdef Py_ssize_t r, c, kh, kw, j, seg, oh, ow, ih, iw0, lo, hi, u, first, off
    cdef Py_ssize_t lo_row, hi_row, off_row
    cdef const floating* src
    cdef floating* dst
    for r in range(Kd):
        c = r // KHW
        kh = (r - c * KHW) // p.KW
        kw = r - c * KHW - kh * p.KW
        # the columns of a whole output row (a segment from ow = 0), worked out once per kernel row: per segment,
        # the divisions cost more than the 16 adds
        lo_row, hi_row, off_row = phased_span(p, -p.pl + kw * p.dw, p.OW, Wph)
        oh = p0 // p.OW
        ow = p0 - oh * p.OW
        j = 0
        while j < nc:
            seg = min(nc - j, p.OW - ow)
            ih = oh * p.sh - p.pt + kh * p.dh
            if 0 <= ih < p.H:
                if ow == 0:
                    lo = min(lo_row, seg)
                    hi = max(lo, min(hi_row, seg))
                    off = off_row
                else:
                    lo, hi, off = phased_span(p, ow * p.sw - p.pl + kw * p.dw, seg, Wph)
                if hi > lo:
                    src = dcol + r * ldd + j + lo
                    dst = buf + (c * p.H + ih) * p.sw * Wph + off
                    for u in range(hi - lo):
                        dst[u] += src[u]
            j += seg
            ow = 0
            oh += 1


cdef void unphase(const floating* buf, const ConvGeom* p, Py_ssize_t Cg, floating* dxg) noexcept nogil:
    """dxg[c, ih, iw] = buf[((c*H + ih)*sw + iw % sw)*Wph + iw // sw] for the Cg planes of one image."""
    cdef Py_ssize_t W = p.W, sw = p.sw
    cdef Py_ssize_t Wph = phase_width(p)
    cdef Py_ssize_t row, q, t, n
    cdef const floating* src
    cdef floating* dst
    for row in range(Cg * p.H):
        for q in range(sw):
            src = buf + (row * sw + q) * Wph
            dst = dxg + row * W + q
            n = (W - q + sw - 1) // sw
            if sw == 2:
                for t in range(n):
                    dst[2 * t] = src[t]
            else:
                for t in range(n):
                    dst[t * sw] = src[t]


cdef int pack_weights(const floating* w, const ConvGeom* p, Py_ssize_t KC, floating** out) noexcept nogil:
    """Pack W[g] (Kg x Kd, all groups) into MR-row panels, in k-blocks of KC: block (g, k0) at g*Mpad*Kd + k0*Mpad."""
    cdef Py_ssize_t Kg = p.K // p.G
    cdef Py_ssize_t Kd = (p.C // p.G) * p.KH * p.KW
    cdef Py_ssize_t Mpad = round_up(Kg, CE_MR)
    cdef Py_ssize_t g, k0, kc
    out[0] = <floating*>malloc(p.G * Mpad * Kd * sizeof(floating))
    if out[0] == NULL:
        return -1
    for g in range(p.G):
        k0 = 0
        while k0 < Kd:
            kc = min(KC, Kd - k0)
            pack_a_strided(w + g * Kg * Kd + k0, Kd, 1, Kg, kc, out[0] + g * Mpad * Kd + k0 * Mpad)
            k0 += kc
    return 0


cdef struct Epilogue:
    # What the forward applies to each value v of output channel k as it stores the GEMM's result, while that is
    # still in cache, in order: v + bias[k]; then with relu, 0 where v <= 0 (NaN stays NaN, as in relu); then
    # v * scale[k] + shift[k] (an inference-time batch norm that could not be folded into the weights). Pointers
    # are to the call's dtype, NULL where absent (scale and shift go together). One descriptor read by every
    # forward path, not a kernel per pattern.
    const void* bias
    const void* scale
    const void* shift
    bint relu


cdef inline void store_span(const floating* src, Py_ssize_t stride, floating* dst, Py_ssize_t n, const Epilogue* e,
                            Py_ssize_t k) noexcept nogil:
    """dst[t] = the epilogue of channel k applied to src[t * stride], t < n."""
    cdef const floating* bias = <const floating*>e.bias
    cdef floating bval = bias[k] if bias != NULL else 0
    cdef floating sc = (<const floating*>e.scale)[k] if e.scale != NULL else 1
    cdef floating sh = (<const floating*>e.shift)[k] if e.scale != NULL else 0
    cdef floating v
    cdef Py_ssize_t t
    if e.scale == NULL and not e.relu:
        for t in range(n):
            dst[t] = src[t * stride] + bval
    elif e.scale == NULL:
        for t in range(n):
            v = src[t * stride] + bval
            dst[t] = 0 if v <= 0 else v
    elif not e.relu:
        for t in range(n):
            dst[t] = (src[t * stride] + bval) * sc + sh
    else:
        for t in range(n):
            v = src[t * stride] + bval
            v = 0 if v <= 0 else v
            dst[t] = v * sc + sh


cdef inline void store_rows(const floating* cbuf, Py_ssize_t ldc, Py_ssize_t rows, Py_ssize_t n, const Epilogue* e,
                            Py_ssize_t k0, floating* y, Py_ssize_t ldy) noexcept nogil:
    """Row i < rows of y (stride ldy) = the epilogue of channel k0 + i applied to row i of cbuf (stride ldc)."""
    cdef Py_ssize_t i
    for i in range(rows):
        store_span(cbuf + i * ldc, 1, y + i * ldy, n, e, k0 + i)


cdef inline Py_ssize_t padded_width(const ConvGeom* p) noexcept nogil:
    """Width of the zero-padded rows the direct path reads: every tap of every output column lies inside."""
    return (p.OW - 1) + (p.KW - 1) * p.dw + 1


cdef inline Py_ssize_t direct_rows(const ConvGeom* p, Py_ssize_t NC) noexcept nogil:
    """Output rows per block of the direct path: about NC columns of padded width, balanced over OH."""
    return balanced_block(p.OH, max(1, min(p.OH, NC // padded_width(p))))


cdef bint use_direct(const ConvGeom* p, Py_ssize_t NR, Py_ssize_t NC) noexcept nogil:
    """Whether the direct path (stride 1: operand rows read straight from a zero-padded copy of a few input rows)
    beats implicit im2col. It computes padded_width - OW wasted columns per output row and pads a block to whole
    NR panels; im2col wastes nothing but copies Kd values per output pixel, measured at about a third of the GEMM
    time. So direct while at least ~75% of its columns are useful."""
    cdef Py_ssize_t R
    if p.sh != 1 or p.sw != 1:
        return False
    R = direct_rows(p, NC)
    # per-thread padded rows stay small (a huge dilation over a tiny image would ask for gigabytes: im2col's
    # buffers do not grow with it)
    if (p.C // p.G) * (R + (p.KH - 1) * p.dh) > MAX_DIRECT_SCRATCH // padded_width(p):
        return False
    return 4 * R * p.OW >= 3 * round_up(R * padded_width(p), NR)


cdef void fill_padded_rows(const floating* x, const ConvGeom* p, Py_ssize_t b, Py_ssize_t g, Py_ssize_t oh0,
                           Py_ssize_t nrows_in, Py_ssize_t rows_in, floating* xblk) noexcept nogil:
    """xblk[c, ri, :] = row oh0 + ri - pt of input channel g*Cg + c, zero-padded to padded_width (zero rows
    above/below the image). Channel blocks are rows_in rows apart; nrows_in <= rows_in of them are filled."""
    cdef Py_ssize_t Cg = p.C // p.G
    cdef Py_ssize_t Wp = padded_width(p)
    cdef Py_ssize_t iw_n = max(0, min(p.W, Wp - p.pl))
    cdef Py_ssize_t c, ri, ih
    cdef floating* dst
    for c in range(Cg):
        for ri in range(nrows_in):
            dst = xblk + (c * rows_in + ri) * Wp
            ih = oh0 + ri - p.pt
            if ih < 0 or ih >= p.H:
                memset(dst, 0, Wp * sizeof(floating))
            else:
                memset(dst, 0, p.pl * sizeof(floating))
                memcpy(dst + p.pl, x + ((b * p.C + g * Cg + c) * p.H + ih) * p.W, iw_n * sizeof(floating))
                memset(dst + p.pl + iw_n, 0, (Wp - p.pl - iw_n) * sizeof(floating))


cdef inline void tap_rows(const ConvGeom* p, const floating* xblk, Py_ssize_t rows_in,
                          const floating** table) noexcept nogil:
    """table[r] = start of tap r = (c, kh, kw) in a padded row block: xblk + (c*rows_in + kh*dh)*Wp + kw*dw."""
    cdef Py_ssize_t Kd = (p.C // p.G) * p.KH * p.KW
    cdef Py_ssize_t Wp = padded_width(p)
    cdef Py_ssize_t r, c, kh, kw
    for r in range(Kd):
        c = r // (p.KH * p.KW)
        kh = (r // p.KW) % p.KH
        kw = r % p.KW
        table[r] = xblk + (c * rows_in + kh * p.dh) * Wp + kw * p.dw


cdef int conv2d_forward_direct(const floating* x, const floating* apack, Py_ssize_t KC, const Epilogue* e,
                               floating* y, const ConvGeom* p, int n_threads) noexcept nogil:
    """Stride-1 forward without im2col. A task (image, group, block of R output rows) copies the R + (KH-1)*dh
    input rows it needs into a zero-padded buffer of width Wp; B row r = (c, kh, kw) is that buffer at the tap's
    offset, and output pixel (oh, ow) of the block is column (oh - oh0)*Wp + ow (columns ow >= OW are computed
    and dropped)."""
    cdef fpstate fp, fps
    cdef int nv = CE_NV
    cdef Py_ssize_t NR = tile_n(<floating>0)
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Kd = Cg * p.KH * p.KW
    cdef Py_ssize_t Mpad = round_up(Kg, CE_MR)
    cdef Py_ssize_t Wp = padded_width(p)
    cdef Py_ssize_t R = direct_rows(p, 8 * NR)
    cdef Py_ssize_t rows_in = R + (p.KH - 1) * p.dh
    cdef Py_ssize_t nrb = (p.OH + R - 1) // R
    cdef Py_ssize_t ncmax = round_up(R * Wp, NR)
    # panels read up to ncmax columns from a tap's start: slack after the last channel keeps them in bounds
    cdef Py_ssize_t xlen = Cg * rows_in * Wp + ncmax + (p.KW - 1) * p.dw
    cdef Py_ssize_t task, b, g, rb, oh0, nrows, ncpad, k0, kc, ri
    cdef floating* xblk
    cdef floating* cbuf
    cdef const floating** brow
    cdef const floating** arow
    cdef int failed = 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        xblk = <floating*>calloc(xlen, sizeof(floating))
        cbuf = <floating*>malloc(Mpad * ncmax * sizeof(floating))
        brow = <const floating**>malloc(Kd * sizeof(floating*))
        arow = <const floating**>malloc(Mpad * sizeof(floating*))
        for task in prange(p.B * p.G * nrb, schedule='static'):
            if xblk == NULL or cbuf == NULL or brow == NULL or arow == NULL:
                flag_failure(&failed)
                continue
            b = task // (p.G * nrb)
            g = (task // nrb) % p.G
            rb = task % nrb
            oh0 = rb * R
            nrows = min(R, p.OH - oh0)
            ncpad = round_up(nrows * Wp, NR)
            fill_padded_rows(x, p, b, g, oh0, nrows + (p.KH - 1) * p.dh, rows_in, xblk)
            tap_rows(p, xblk, rows_in, brow)
            k0 = 0
            while k0 < Kd:
                kc = min(KC, Kd - k0)
                packed_a_table(arow, apack + g * Mpad * Kd + k0 * Mpad, Mpad // CE_MR, kc)
                macro_kernel(Mpad // CE_MR, ncpad // NR, kc, arow, CE_MR, brow + k0, NR, cbuf, ncmax, k0 > 0, nv)
                k0 = k0 + kc
            for ri in range(nrows):
                store_rows(cbuf + ri * Wp, ncmax, Kg, p.OW, e, g * Kg,
                           y + ((b * p.K + g * Kg) * p.OH + oh0 + ri) * p.OW, p.OH * p.OW)
        free(xblk)
        free(cbuf)
        free(brow)
        free(arow)
        fp_leave(fp)
    fp_resume(fps)
    return -failed


cdef int conv2d_forward_im2col(const floating* x, const floating* apack, Py_ssize_t KC, const Epilogue* e,
                               floating* y, const ConvGeom* p, int n_threads) noexcept nogil:
    """Forward for any stride: column blocks of the Q = B*OH*OW pixels (across images), im2col rows built into a
    row-major B block."""
    cdef fpstate fp, fps
    cdef int nv = CE_NV
    cdef Py_ssize_t NR = tile_n(<floating>0)
    cdef Py_ssize_t NC = 8 * NR
    # row stride of the B block: one vector past NC so that its rows do not all map to the same L1 sets
    cdef Py_ssize_t LDB = NC + vlen(<floating>0)
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Kd = Cg * p.KH * p.KW
    cdef Py_ssize_t P = p.OH * p.OW
    cdef Py_ssize_t Q = p.B * P
    cdef Py_ssize_t Mpad = round_up(Kg, CE_MR)
    cdef Py_ssize_t nblocks = (Q + NC - 1) // NC
    cdef Py_ssize_t g, k0, kc, task, nb, q0, nc, ncpad, j, seg, b, pix
    cdef floating* bblk
    cdef floating* cbuf
    cdef const floating** brow
    cdef const floating** arow
    cdef int failed = 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        bblk = <floating*>malloc(KC * LDB * sizeof(floating))
        cbuf = <floating*>malloc(Mpad * NC * sizeof(floating))
        brow = <const floating**>malloc(KC * sizeof(floating*))
        arow = <const floating**>malloc(Mpad * sizeof(floating*))
        for task in prange(p.G * nblocks, schedule='static'):
            if bblk == NULL or cbuf == NULL or brow == NULL or arow == NULL:
                flag_failure(&failed)
                continue
            row_table(brow, bblk, KC, LDB)
            g = task // nblocks
            nb = task - g * nblocks
            q0 = nb * NC
            nc = min(NC, Q - q0)
            ncpad = round_up(nc, NR)
            k0 = 0
            while k0 < Kd:
                kc = min(KC, Kd - k0)
                im2col_block(x, p, g, k0, kc, q0, nc, ncpad, bblk, LDB)
                packed_a_table(arow, apack + g * Mpad * Kd + k0 * Mpad, Mpad // CE_MR, kc)
                macro_kernel(Mpad // CE_MR, ncpad // NR, kc, arow, CE_MR, brow, NR, cbuf, NC, k0 > 0, nv)
                k0 = k0 + kc
            # the block's columns, image by image, to y[b, g*Kg + i, pix]
            j = 0
            while j < nc:
                b = (q0 + j) // P
                pix = q0 + j - b * P
                seg = min(nc - j, P - pix)
                store_rows(cbuf + j, NC, Kg, seg, e, g * Kg, y + (b * p.K + g * Kg) * P + pix, P)
                j = j + seg
        free(bblk)
        free(cbuf)
        free(brow)
        free(arow)
        fp_leave(fp)
    fp_resume(fps)
    return -failed


# Forward strategies, in the order conv2d_forward_core tries them; `force_conv_path` pins one for the tests (a
# path that cannot take the shape falls back to the automatic choice).
cdef enum:
    PATH_AUTO = 0
    PATH_DIRECT = 1
    PATH_IM2COL = 2
    PATH_PIXELS = 3
    PATH_SMALLC = 4       # conv_smallc.pxi: forward of 1-4 channel float32 inputs

cdef int forced_path = PATH_AUTO

# Output pixels per task of the pixel path: enough 8-pixel panels that packing and the store are paid for, few
# enough that a batch of small images still makes several tasks.
cdef Py_ssize_t PIXELS_PER_TASK = 256


def force_conv_path(str name):
    """Pin conv2d's forward strategy ('direct', 'im2col', 'pixels', 'smallc') for every later call, or restore the
    automatic choice ('auto'). For tests and benchmarks: each path must give the same answers."""
    global forced_path
    paths = {"auto": PATH_AUTO, "direct": PATH_DIRECT, "im2col": PATH_IM2COL, "pixels": PATH_PIXELS,
             "smallc": PATH_SMALLC}
    if name not in paths:
        raise ValueError(f"unknown conv path {name!r}; expected one of {sorted(paths)}")
    forced_path = paths[name]


cdef inline Py_ssize_t window_width(const ConvGeom* p) noexcept nogil:
    """Columns of zero-padded input that the windows of all OW output columns span, for any stride."""
    return (p.OW - 1) * p.sw + (p.KW - 1) * p.dw + 1


cdef inline Py_ssize_t window_rows(const ConvGeom* p, Py_ssize_t nrows) noexcept nogil:
    """Input rows that the windows of nrows consecutive output rows span."""
    return (nrows - 1) * p.sh + (p.KH - 1) * p.dh + 1


cdef inline Py_ssize_t pixel_rows(const ConvGeom* p) noexcept nogil:
    """Output rows per unit of the pixel path: whole images when they are small, else about PIXELS_PER_TASK
    pixels' worth of rows (balanced over OH)."""
    return balanced_block(p.OH, max(1, min(p.OH, PIXELS_PER_TASK // p.OW)))


cdef bint use_pixels(const ConvGeom* p, floating dummy) noexcept nogil:
    """Whether the pixel path can take the shape well: the output channels fill most of their NR-wide panels,
    each tap reduces over enough input channels to amortise the tile's load and store, and the padded rows of
    one unit stay small."""
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t VL = vlen(<floating>0)
    cdef Py_ssize_t NR = pick_nv((Kg + VL - 1) // VL) * VL
    if Cg < 8 or 4 * Kg < 3 * round_up(Kg, NR):
        return False
    return Cg * window_rows(p, pixel_rows(p)) <= MAX_DIRECT_SCRATCH // window_width(p)


cdef void fill_window_rows(const floating* x, const ConvGeom* p, Py_ssize_t b, Py_ssize_t g, Py_ssize_t ih0,
                           Py_ssize_t nrows, Py_ssize_t ld_c, floating* xblk) noexcept nogil:
    """xblk[c*ld_c + ri*Wpad + t] = x[b, g*Cg + c, ih0 + ri, t - pl] for c < Cg, ri < nrows, t < Wpad =
    window_width: input rows zero-padded to the columns every window reads, zero outside the image."""
    cdef Py_ssize_t Cg = p.C // p.G
    cdef Py_ssize_t Wpad = window_width(p)
    cdef Py_ssize_t lo = min(p.pl, Wpad)
    cdef Py_ssize_t n = max(0, min(p.W, Wpad - p.pl))
    cdef Py_ssize_t c, ri, ih
    cdef floating* dst
    for c in range(Cg):
        for ri in range(nrows):
            dst = xblk + c * ld_c + ri * Wpad
            ih = ih0 + ri
            if ih < 0 or ih >= p.H:
                memset(dst, 0, Wpad * sizeof(floating))
            else:
                memset(dst, 0, lo * sizeof(floating))
                memcpy(dst + lo, x + ((b * p.C + g * Cg + c) * p.H + ih) * p.W, n * sizeof(floating))
                memset(dst + lo + n, 0, (Wpad - lo - n) * sizeof(floating))


cdef int conv2d_forward_pixels(const floating* x, const floating* w, const Epilogue* e, floating* y,
                               const ConvGeom* p, int n_threads) noexcept nogil:
    """Forward with output pixels as the GEMM's rows and output channels as its columns, for any stride:
    y^T (pixels x Kg) = sum over taps t = (kh, kw) of X_t (pixels x Cg) . W_t (Cg x Kg).

    A task takes a few units (image, block of output rows), copies the input rows they read into zero-padded
    rows, and points row i of A at pixel i's window origin plus the tap's offset; column c of A is then input
    channel c, a fixed stride away. Nothing is wasted (im2col copies KH*KW values per pixel; the direct path
    computes dropped columns), which matters for small images: a 4x4 image has 16 pixels and 8 dropped columns
    per tap row in the direct path."""
    cdef fpstate fp, fps
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t T = p.KH * p.KW
    cdef Py_ssize_t VL = vlen(<floating>0)
    cdef int nv = pick_nv((Kg + VL - 1) // VL)
    cdef Py_ssize_t NR = nv * VL
    cdef Py_ssize_t npan = (Kg + NR - 1) // NR
    cdef Py_ssize_t Npad = npan * NR
    cdef Py_ssize_t Wpad = window_width(p)
    cdef Py_ssize_t R = pixel_rows(p)
    cdef Py_ssize_t nrb = (p.OH + R - 1) // R
    cdef Py_ssize_t rows_in = window_rows(p, R)
    cdef Py_ssize_t ld_c = rows_in * Wpad
    cdef Py_ssize_t unit_len = Cg * ld_c
    cdef Py_ssize_t upt = max(1, PIXELS_PER_TASK // (R * p.OW))
    cdef Py_ssize_t nunits = p.B * nrb
    cdef Py_ssize_t ntasks = (nunits + upt - 1) // upt
    cdef Py_ssize_t maxpix = round_up(upt * R * p.OW, CE_MR)
    cdef Py_ssize_t task, g, u, u0, u1, b, oh0, nrows, npix, ro, ow, ip, t, i, k, q, n
    cdef floating* bpack
    cdef floating* xblk
    cdef floating* cbuf
    cdef floating* blk
    cdef const floating** pix
    cdef const floating** arow
    cdef const floating** brow
    cdef Py_ssize_t* tapoff
    cdef int failed = 0
    # B: bpack[((g*T + t)*npan + jp)*Cg*NR + c*NR + j] = w[g*Kg + jp*NR + j, c, kh, kw], zero past Kg
    bpack = <floating*>malloc(p.G * T * Npad * Cg * sizeof(floating))
    tapoff = <Py_ssize_t*>malloc(T * sizeof(Py_ssize_t))
    if bpack == NULL or tapoff == NULL:
        free(bpack)
        free(tapoff)
        return -1
    for t in range(T):
        tapoff[t] = (t // p.KW) * p.dh * Wpad + (t % p.KW) * p.dw
    for g in range(p.G):
        for t in range(T):
            pack_b_strided(w + g * Kg * Cg * T + t, T, Cg * T, Cg, Kg, NR, bpack + (g * T + t) * Npad * Cg)
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        xblk = <floating*>malloc(upt * unit_len * sizeof(floating))
        cbuf = <floating*>malloc(maxpix * Npad * sizeof(floating))
        pix = <const floating**>malloc(maxpix * sizeof(floating*))
        arow = <const floating**>malloc(CE_MR * sizeof(floating*))
        brow = <const floating**>malloc(T * Cg * sizeof(floating*))
        for task in prange(p.G * ntasks, schedule='static'):
            if xblk == NULL or cbuf == NULL or pix == NULL or arow == NULL or brow == NULL:
                flag_failure(&failed)
                continue
            g = task // ntasks
            u0 = (task - g * ntasks) * upt
            u1 = min(nunits, u0 + upt)
            for t in range(T):
                row_table(brow + t * Cg, bpack + (g * T + t) * Npad * Cg, Cg, NR)
            npix = 0
            for u in range(u0, u1):
                b = u // nrb
                oh0 = (u - b * nrb) * R
                nrows = min(R, p.OH - oh0)
                blk = xblk + (u - u0) * unit_len
                fill_window_rows(x, p, b, g, oh0 * p.sh - p.pt, window_rows(p, nrows), ld_c, blk)
                for ro in range(nrows):
                    for ow in range(p.OW):
                        pix[npix] = blk + ro * p.sh * Wpad + ow * p.sw
                        npix = npix + 1
            # a partial last panel repeats pixel 0 (computed, never stored)
            for i in range(npix, round_up(npix, CE_MR)):
                pix[i] = pix[0]
            for ip in range((npix + CE_MR - 1) // CE_MR):
                for t in range(T):
                    for i in range(CE_MR):
                        arow[i] = pix[ip * CE_MR + i] + tapoff[t]
                    macro_kernel(1, npan, Cg, arow, ld_c, brow + t * Cg, Cg * NR, cbuf + ip * CE_MR * Npad, Npad,
                                 t > 0, nv)
            # y[b, g*Kg + k, oh0 + ro, ow] = epilogue of cbuf[q, k], unit by unit
            q = 0
            for u in range(u0, u1):
                b = u // nrb
                oh0 = (u - b * nrb) * R
                n = min(R, p.OH - oh0) * p.OW
                for k in range(Kg):
                    store_span(cbuf + q * Npad + k, Npad, y + ((b * p.K + g * Kg + k) * p.OH + oh0) * p.OW, n, e,
                               g * Kg + k)
                q = q + n
        free(xblk)
        free(cbuf)
        free(pix)
        free(arow)
        free(brow)
        fp_leave(fp)
    fp_resume(fps)
    free(bpack)
    free(tapoff)
    return -failed


cdef int forward_path(const ConvGeom* p, floating dummy) noexcept nogil:
    """The forward strategy for a (non-depthwise) shape: the direct path where its dropped columns are few,
    else the pixel path where it fits, else implicit im2col. A forced path is taken where it can be."""
    cdef Py_ssize_t NR = tile_n(<floating>0)
    cdef bint direct = use_direct(p, NR, 8 * NR)
    if forced_path == PATH_DIRECT and direct:
        return PATH_DIRECT
    if forced_path == PATH_IM2COL:
        return PATH_IM2COL
    if forced_path == PATH_PIXELS and use_pixels(p, dummy):
        return PATH_PIXELS
    if direct:
        return PATH_DIRECT
    if use_pixels(p, dummy):
        return PATH_PIXELS
    return PATH_IM2COL


cdef int conv2d_forward_core(const floating* x, const floating* w, const Epilogue* e, floating* y,
                             const ConvGeom* p, int n_threads) noexcept nogil:
    """y = epilogue(conv2d(x, w)), all C-contiguous NCHW / KCRS. Returns -1 on allocation failure."""
    cdef Py_ssize_t NR = tile_n(<floating>0)
    cdef Py_ssize_t Kd = (p.C // p.G) * p.KH * p.KW
    cdef Py_ssize_t KC = balanced_block(Kd, block_k(<floating>0))
    cdef floating* apack = NULL
    cdef int rc
    cdef int path
    if is_depthwise(p):
        return depthwise_forward(x, w, e, y, p, n_threads)
    if floating is float:
        if use_smallc(p, <float>0):
            return conv2d_forward_smallc(x, w, e, y, p, n_threads)
    path = forward_path(p, <floating>0)
    if path == PATH_PIXELS:
        return conv2d_forward_pixels(x, w, e, y, p, n_threads)
    if pack_weights(w, p, KC, &apack):
        return -1
    if path == PATH_DIRECT:
        rc = conv2d_forward_direct(x, apack, KC, e, y, p, n_threads)
    else:
        rc = conv2d_forward_im2col(x, apack, KC, e, y, p, n_threads)
    free(apack)
    return rc


cdef bint transposed_geometry(const ConvGeom* p, ConvGeom* q) noexcept nogil:
    """For stride 1, grad_input is a forward conv of dY with the kernel flipped and in/out channels swapped, padded
    by (K-1)*d - pad. Fill q with that geometry; False where it does not apply (stride > 1, or padding beyond the
    kernel's reach)."""
    if p.sh != 1 or p.sw != 1 or p.pt > (p.KH - 1) * p.dh or p.pl > (p.KW - 1) * p.dw:
        return False
    q.B = p.B
    q.C = p.K
    q.H = p.OH
    q.W = p.OW
    q.K = p.C
    q.KH = p.KH
    q.KW = p.KW
    q.sh = 1
    q.sw = 1
    q.pt = (p.KH - 1) * p.dh - p.pt
    q.pl = (p.KW - 1) * p.dw - p.pl
    q.dh = p.dh
    q.dw = p.dw
    q.G = p.G
    q.OH = p.H
    q.OW = p.W
    return True


cdef int conv2d_grad_input_direct(const floating* dy, const floating* w, floating* dx, const ConvGeom* q,
                                  int n_threads) noexcept nogil:
    """grad_input as the forward conv of geometry q (see transposed_geometry), on flipped, transposed weights:
    wf[g*Cg + c, k, kh, kw] = w[g*Kg + k, c, KH-1-kh, KW-1-kw]. No col2im scatter."""
    cdef Py_ssize_t Kg = q.C // q.G, Cg = q.K // q.G
    cdef Py_ssize_t KHW = q.KH * q.KW
    cdef Py_ssize_t g, c, k, t
    cdef floating* wf = <floating*>malloc(q.K * Kg * KHW * sizeof(floating))
    cdef int rc
    cdef Epilogue none
    if wf == NULL:
        return -1
    for g in range(q.G):
        for c in range(Cg):
            for k in range(Kg):
                for t in range(KHW):
                    wf[((g * Cg + c) * Kg + k) * KHW + KHW - 1 - t] = w[((g * Kg + k) * Cg + c) * KHW + t]
    none.bias = none.scale = none.shift = NULL
    none.relu = False
    rc = conv2d_forward_core(dy, wf, &none, dx, q, n_threads)
    free(wf)
    return rc


cdef bint grad_input_as_conv(const ConvGeom* q, floating dummy) noexcept nogil:
    """Whether grad_input goes as the forward conv of the transposed geometry q: by its direct path when the
    tile's MR rows (q's output channels) are mostly used, or by its pixel path."""
    cdef int path = forward_path(q, dummy)
    if path == PATH_DIRECT:
        return 4 * (q.K // q.G) >= 3 * round_up(q.K // q.G, CE_MR)
    return path == PATH_PIXELS


cdef int conv2d_grad_input_core(const floating* dy, const floating* w, floating* dx, const ConvGeom* p,
                                int n_threads) noexcept nogil:
    """dx = conv2d's input gradient (overwritten)."""
    cdef ConvGeom q
    cdef Py_ssize_t Cg = p.C // p.G
    if is_depthwise(p):
        return depthwise_grad_input(dy, w, dx, p, n_threads)
    # as a transposed conv when that conv has a path better than im2col; its output channels are the Cg input
    # channels: with few (an RGB or grey input layer) they would fill a fraction of the MR-row tile (direct path)
    # or of the NR-wide panel (pixel path), and W^T dY + col2im wastes nothing
    if transposed_geometry(p, &q) and grad_input_as_conv(&q, <floating>0):
        return conv2d_grad_input_direct(dy, w, dx, &q, n_threads)
    return conv2d_grad_input_col2im(dy, w, dx, p, n_threads)


cdef inline bint col2im_phased(const ConvGeom* p, floating dummy) noexcept nogil:
    """Whether grad_input's col2im scatters through phase-split planes (see col2im_add_phased): column stride > 1
    and the planes of a task's images within MAX_DIRECT_SCRATCH elements."""
    cdef Py_ssize_t per_task = max(1, min(p.B, 8 * tile_n(<floating>0) // (p.OH * p.OW)))
    return p.sw > 1 and (p.C // p.G) * p.H * p.sw * phase_width(p) <= MAX_DIRECT_SCRATCH // per_task


cdef int conv2d_grad_input_col2im(const floating* dy, const floating* w, floating* dx, const ConvGeom* p,
                                  int n_threads) noexcept nogil:
    """dx = conv2d's input gradient (overwritten): dcol = W[g]^T dY[g] then col2im. Split over (group, run of
    whole images): each task owns its images' dx planes and adds into them in one fixed order. Small images are
    taken several to a task so that a block still has about NC columns (one 4x4 image alone would fill a third
    of a 48-wide tile)."""
    cdef fpstate fp, fps
    cdef int nv = CE_NV
    cdef Py_ssize_t NR = tile_n(<floating>0)
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Kd = Cg * p.KH * p.KW
    cdef Py_ssize_t KC = balanced_block(Kg, block_k(<floating>0))
    cdef Py_ssize_t P = p.OH * p.OW
    cdef Py_ssize_t Mpad = round_up(Kd, CE_MR)
    cdef Py_ssize_t NC = 8 * NR
    cdef Py_ssize_t LDB = NC + vlen(<floating>0)
    cdef Py_ssize_t per_task = max(1, min(p.B, NC // P))
    cdef Py_ssize_t runs = (p.B + per_task - 1) // per_task
    # column stride > 1: scatter into phase-split planes (col2im_add_phased), one per image of the task, while
    # they stay of sane size (else straight into dx, strided)
    cdef Py_ssize_t plane_len = Cg * p.H * p.sw * phase_width(p)
    cdef bint phased = col2im_phased(p, <floating>0)
    cdef floating* pbuf
    cdef Py_ssize_t g, b, b0, b1, k0, kc, task, q, q1, nc, ncpad, i, j, seg, pix
    cdef floating* apack
    cdef floating* bblk
    cdef floating* cbuf
    cdef const floating** brow
    cdef const floating** arow
    cdef int failed = 0
    apack = <floating*>malloc(p.G * Mpad * Kg * sizeof(floating))
    if apack == NULL:
        return -1
    # A = W[g]^T: a[r, k] = w[(g*Kg + k)*Kd + r]
    for g in range(p.G):
        k0 = 0
        while k0 < Kg:
            kc = min(KC, Kg - k0)
            pack_a_strided(w + (g * Kg + k0) * Kd, 1, Kd, Kd, kc, apack + g * Mpad * Kg + k0 * Mpad)
            k0 += kc
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        bblk = <floating*>malloc(KC * LDB * sizeof(floating))
        cbuf = <floating*>malloc(Mpad * NC * sizeof(floating))
        brow = <const floating**>malloc(KC * sizeof(floating*))
        arow = <const floating**>malloc(Mpad * sizeof(floating*))
        pbuf = <floating*>malloc(per_task * plane_len * sizeof(floating)) if phased else NULL
        for task in prange(runs * p.G, schedule='static'):
            if bblk == NULL or cbuf == NULL or brow == NULL or arow == NULL or (phased and pbuf == NULL):
                flag_failure(&failed)
                continue
            row_table(brow, bblk, KC, LDB)
            g = task % p.G
            b0 = (task // p.G) * per_task
            b1 = min(p.B, b0 + per_task)
            if phased:
                memset(pbuf, 0, (b1 - b0) * plane_len * sizeof(floating))
            else:
                for b in range(b0, b1):
                    memset(dx + (b * p.C + g * Cg) * p.H * p.W, 0, Cg * p.H * p.W * sizeof(floating))
            # the pixels q = (b, oh, ow) of images b0..b1, NC at a time
            q = b0 * P
            q1 = b1 * P
            while q < q1:
                nc = min(NC, q1 - q)
                ncpad = round_up(nc, NR)
                k0 = 0
                while k0 < Kg:
                    kc = min(KC, Kg - k0)
                    for i in range(kc):
                        j = 0
                        while j < nc:
                            b = (q + j) // P
                            pix = q + j - b * P
                            seg = min(nc - j, P - pix)
                            memcpy(bblk + i * LDB + j, dy + (b * p.K + g * Kg + k0 + i) * P + pix,
                                   seg * sizeof(floating))
                            j = j + seg
                        for j in range(nc, ncpad):
                            bblk[i * LDB + j] = 0
                    packed_a_table(arow, apack + g * Mpad * Kg + k0 * Mpad, Mpad // CE_MR, kc)
                    macro_kernel(Mpad // CE_MR, ncpad // NR, kc, arow, CE_MR, brow, NR, cbuf, NC, k0 > 0, nv)
                    k0 = k0 + kc
                j = 0
                while j < nc:
                    b = (q + j) // P
                    pix = q + j - b * P
                    seg = min(nc - j, P - pix)
                    if phased:
                        col2im_add_phased(cbuf + j, NC, p, Kd, pix, seg, pbuf + (b - b0) * plane_len)
                    else:
                        col2im_add(cbuf + j, NC, p, Kd, pix, seg, dx + (b * p.C + g * Cg) * p.H * p.W)
                    j = j + seg
                q = q + nc
            if phased:
                for b in range(b0, b1):
                    unphase(pbuf + (b - b0) * plane_len, p, Cg, dx + (b * p.C + g * Cg) * p.H * p.W)
        free(bblk)
        free(cbuf)
        free(brow)
        free(arow)
        free(pbuf)
        fp_leave(fp)
    fp_resume(fps)
    free(apack)
    return -failed


cdef inline Py_ssize_t pow2_floor(Py_ssize_t n) noexcept nogil:
    """The largest power of two <= n (1 for n < 1): chunk counts that 2, 4, 8 or 16 threads share evenly (7
    chunks on 2 threads left one idle an eighth of the time)."""
    cdef Py_ssize_t m = 1
    while 2 * m <= n:
        m *= 2
    return m


cdef inline Py_ssize_t grad_weight_chunks(Py_ssize_t units, Py_ssize_t unit_pixels) noexcept nogil:
    """How many fixed slices of the pixels grad_weight reduces separately (then sums in order): about 2048+
    pixels each, at most 16, a power of two. A function of the shape only, never of the thread count."""
    return pow2_floor(min(16, min(units, units * unit_pixels // 2048)))


cdef bint all_finite(const floating* x, Py_ssize_t n) noexcept nogil:
    """No inf or NaN in x: no value has an all-ones exponent. Integer tests vectorise; a float sum would be a
    serial dependency chain (4 ms on a 4M-element input)."""
    cdef Py_ssize_t i
    cdef const uint32_t* u
    cdef const uint64_t* v
    cdef uint32_t bad32 = 0
    cdef uint64_t bad64 = 0
    if floating is float:
        u = <const uint32_t*>x
        for i in range(n):
            bad32 |= (u[i] & 0x7f800000u) == 0x7f800000u
        return bad32 == 0
    else:
        v = <const uint64_t*>x
        for i in range(n):
            bad64 |= (v[i] & 0x7ff0000000000000u) == 0x7ff0000000000000u
        return bad64 == 0


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
    cdef Py_ssize_t task, g, i0, i1, i, k, r, ch
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
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        for task in prange(p.K, schedule='static'):
            g = task // Kg
            k = task - g * Kg
            src = partial + g * nchunks * n + k
            for r in range(Kd):
                dw[task * Kd + r] = src[r * Kg]
        fp_leave(fp)
    fp_resume(fps)


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


cdef inline Py_ssize_t channel_panel(const ConvGeom* p, floating dummy) noexcept nogil:
    """NR of grad_weight's pixel path, whose GEMM columns are the group's input channels."""
    cdef Py_ssize_t VL = vlen(<floating>0)
    return pick_nv((p.C // p.G + VL - 1) // VL) * VL


cdef bint use_pixels_grad_weight(const ConvGeom* p, floating dummy) noexcept nogil:
    """Whether grad_weight's pixel path fits: the input channels fill most of their NR-wide panels, the output
    channels most of the MR-row tile, and one unit's padded rows stay small."""
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Cgpad = round_up(Cg, channel_panel(p, dummy))
    if 4 * Cg < 3 * Cgpad or 4 * Kg < 3 * round_up(Kg, CE_MR):
        return False
    return window_rows(p, pixel_rows(p)) * pixel_stride(Cgpad, dummy) <= MAX_DIRECT_SCRATCH // window_width(p)


cdef inline Py_ssize_t pixel_chunks(const ConvGeom* p) noexcept nogil:
    """Fixed slices of the units that grad_weight's pixel path reduces separately: about PIXELS_PER_TASK pixels
    or more each, at most 16 and a power of two, and at most 2^20 partial-sum elements in all; a function of the
    shape only."""
    cdef Py_ssize_t R = pixel_rows(p)
    cdef Py_ssize_t units = p.B * ((p.OH + R - 1) // R)
    cdef Py_ssize_t per_chunk = (p.C // p.G) * p.KH * p.KW * p.K
    return pow2_floor(min(min(16, (1 << 20) // per_chunk), min(units, units * R * p.OW // PIXELS_PER_TASK)))


# grad_weight's pixel path reduces over at most this many bytes of scattered B rows per block
cdef Py_ssize_t KMAX_BYTES = 32768


cdef inline Py_ssize_t pixel_stride(Py_ssize_t Cgpad, floating dummy) noexcept nogil:
    """Distance between pixels in grad_weight's channels-last rows: Cgpad, plus a vector when that is a multiple
    of 256 bytes (with 128 channels, 512 bytes, a B panel's rows fell into 8 of the 64 L1 sets and evicted
    each other)."""
    if (Cgpad * sizeof(floating)) % 256 == 0:
        return Cgpad + vlen(<floating>0)
    return Cgpad


cdef void fill_window_rows_hwc(const floating* x, const ConvGeom* p, Py_ssize_t b, Py_ssize_t g, Py_ssize_t ih0,
                               Py_ssize_t nrows, Py_ssize_t Cgpad, floating* xblk) noexcept nogil:
    """fill_window_rows with channels last: xblk[(ri*Wpad + t)*Cgpad + c] = x[b, g*Cg + c, ih0 + ri, t - pl],
    zero outside the image and for channels c >= Cg (Cgpad: the pixel stride)."""
    cdef Py_ssize_t Cg = p.C // p.G
    cdef Py_ssize_t Wpad = window_width(p)
    cdef Py_ssize_t lo = min(p.pl, Wpad)
    cdef Py_ssize_t n = max(0, min(p.W, Wpad - p.pl))
    cdef Py_ssize_t c, ri, ih, iw
    cdef const floating* src
    cdef floating* dst
    memset(xblk, 0, nrows * Wpad * Cgpad * sizeof(floating))
    for ri in range(nrows):
        ih = ih0 + ri
        if ih < 0 or ih >= p.H:
            continue
        for c in range(Cg):
            src = x + ((b * p.C + g * Cg + c) * p.H + ih) * p.W
            dst = xblk + (ri * Wpad + lo) * Cgpad + c
            for iw in range(n):
                dst[iw * Cgpad] = src[iw]


cdef int conv2d_grad_weight_pixels(const floating* dy, const floating* x, floating* partial, Py_ssize_t nchunks,
                                   const ConvGeom* p, int n_threads) noexcept nogil:
    """grad_weight tap by tap, reducing over output pixels: dW_t (Kg x Cg) = dY (Kg x pixels) . X_t (pixels x Cg).

    A is dY, copied per block of units into rows of contiguous pixels. B row q is pixel q's window origin in a
    channels-last, zero-padded copy of the input rows plus the tap's offset: the Cg channels there are one NR-wide
    row. Nothing is wasted and nothing is copied KH*KW times (the im2col path does both on small images). Units
    (image, block of output rows) go to nchunks fixed chunks."""
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
    cdef Py_ssize_t R = pixel_rows(p)
    cdef Py_ssize_t nrb = (p.OH + R - 1) // R
    cdef Py_ssize_t unit_len = window_rows(p, R) * Wpad * ldp
    cdef Py_ssize_t upt = max(1, PIXELS_PER_TASK // (R * p.OW))
    cdef Py_ssize_t maxpix = upt * R * p.OW
    cdef Py_ssize_t units = p.B * nrb
    cdef Py_ssize_t per_chunk = (units + nchunks - 1) // nchunks
    cdef Py_ssize_t kmax = max(16, KMAX_BYTES // (Cgpad * sizeof(floating)))
    cdef Py_ssize_t task, g, ch, u, u0, u1, ue, b, oh0, nrows, npix, ro, ow, t, i, k, c, k0, kc
    cdef bint started
    cdef floating* xblk
    cdef floating* ablk
    cdef floating* cbuf
    cdef floating* blk
    cdef const floating** pix
    cdef const floating** arow
    cdef const floating** brow
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
        xblk = <floating*>malloc(upt * unit_len * sizeof(floating))
        # rows Kg..Mpad of A stay zero from calloc
        ablk = <floating*>calloc(Mpad * maxpix, sizeof(floating))
        cbuf = <floating*>malloc(T * Mpad * Cgpad * sizeof(floating))
        pix = <const floating**>malloc(maxpix * sizeof(floating*))
        brow = <const floating**>malloc(maxpix * sizeof(floating*))
        arow = <const floating**>malloc(Mpad * sizeof(floating*))
        for task in prange(p.G * nchunks, schedule='static'):
            if xblk == NULL or ablk == NULL or cbuf == NULL or pix == NULL or brow == NULL or arow == NULL:
                flag_failure(&failed)
                continue
            g = task // nchunks
            ch = task - g * nchunks
            started = False
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
                    for k in range(Kg):
                        memcpy(ablk + k * maxpix + npix, dy + (b * p.K + g * Kg + k) * P + oh0 * p.OW,
                               nrows * p.OW * sizeof(floating))
                    for ro in range(nrows):
                        for ow in range(p.OW):
                            pix[npix] = blk + (ro * p.sh * Wpad + ow * p.sw) * ldp
                            npix = npix + 1
                for t in range(T):
                    for i in range(npix):
                        brow[i] = pix[i] + tapoff[t]
                    # B's rows are scattered over the padded block: kmax of them at a time stay in L1
                    k0 = 0
                    while k0 < npix:
                        kc = min(kmax, npix - k0)
                        row_table(arow, ablk + k0, Mpad, maxpix)
                        macro_kernel(Mpad // CE_MR, Cgpad // NR, kc, arow, 1, brow + k0, NR,
                                     cbuf + t * Mpad * Cgpad, Cgpad, started or k0 > 0, nv)
                        k0 = k0 + kc
                started = True
                u0 = u1
            # partial[task][r = c*T + t][k]
            for c in range(Cg):
                for t in range(T):
                    for k in range(Kg):
                        partial[(task * Kd + c * T + t) * Kg + k] = (cbuf[(t * Mpad + k) * Cgpad + c]
                                                                      if started else 0)
        free(xblk)
        free(ablk)
        free(cbuf)
        free(pix)
        free(brow)
        free(arow)
        fp_leave(fp)
    fp_resume(fps)
    free(tapoff)
    return -failed


cdef int grad_weight_path(const ConvGeom* p, floating dummy) noexcept nogil:
    """grad_weight's strategy: the pixel path where it fits (it wastes nothing and measured as fast as or faster
    than the others on every benchmark shape), else as forward_path chooses. The direct path needs finite inputs
    too, checked by the caller."""
    cdef bint direct = use_direct(p, tile_n(<floating>0), 2 * block_k(<floating>0))
    if forced_path == PATH_DIRECT and direct:
        return PATH_DIRECT
    if forced_path == PATH_IM2COL:
        return PATH_IM2COL
    if forced_path == PATH_PIXELS and use_pixels_grad_weight(p, dummy):
        return PATH_PIXELS
    if use_pixels_grad_weight(p, dummy):
        return PATH_PIXELS
    if direct:
        return PATH_DIRECT
    return PATH_IM2COL


cdef int conv2d_grad_weight_core(const floating* dy, const floating* x, floating* dw, floating* db,
                                 const ConvGeom* p, int n_threads) noexcept nogil:
    """dw (K, Cg, KH, KW) and db (K,) or NULL, overwritten."""
    cdef Py_ssize_t NR = tile_n(<floating>0)
    cdef Py_ssize_t Kg = p.K // p.G
    cdef Py_ssize_t Kd = (p.C // p.G) * p.KH * p.KW
    cdef Py_ssize_t R, nchunks
    cdef floating* partial
    cdef int path, rc
    if is_depthwise(p):
        return depthwise_grad_weight(dy, x, dw, db, p, n_threads)
    path = grad_weight_path(p, <floating>0)
    if path == PATH_DIRECT and not all_finite(x, p.B * p.C * p.H * p.W):
        path = PATH_IM2COL
    if path == PATH_DIRECT:
        R = direct_rows(p, 2 * block_k(<floating>0))
        nchunks = grad_weight_chunks(p.B * ((p.OH + R - 1) // R), R * p.OW)
    elif path == PATH_PIXELS:
        nchunks = pixel_chunks(p)
    else:
        nchunks = grad_weight_chunks(p.B * p.OH * p.OW, 1)
    partial = <floating*>malloc(p.G * nchunks * Kd * Kg * sizeof(floating))
    if partial == NULL:
        return -1
    if path == PATH_DIRECT:
        rc = conv2d_grad_weight_direct(dy, x, partial, nchunks, p, n_threads)
    elif path == PATH_PIXELS:
        rc = conv2d_grad_weight_pixels(dy, x, partial, nchunks, p, n_threads)
    else:
        rc = conv2d_grad_weight_im2col(dy, x, partial, nchunks, p, n_threads)
    if rc == 0:
        sum_partials(partial, nchunks, p, dw, n_threads)
        if db != NULL:
            grad_bias(dy, p, db, n_threads)
    free(partial)
    return rc


cdef inline void fill_geom(ConvGeom* p, tuple shape_x, Py_ssize_t K, Py_ssize_t KH, Py_ssize_t KW, tuple params):
    p.B, p.C, p.H, p.W = shape_x
    p.K = K
    p.KH = KH
    p.KW = KW
    p.sh, p.sw, p.pt, p.pl, p.dh, p.dw, p.G, p.OH, p.OW = params


def conv2d_forward(const floating[:, :, :, ::1] x,        # IN  (B, C, H, W)
                   const floating[:, :, :, ::1] weight,   # IN  (K, C/G, KH, KW)
                   bias,                                  # IN  (K,) or None
                   floating[:, :, :, ::1] out,            # OUT (B, K, OH, OW)
                   tuple params, int n_threads,
                   bint relu=False,                       # epilogue: max(., 0) after the bias
                   scale=None, shift=None):               # IN  (K,) each or None: then * scale + shift
    """params = (sh, sw, pad_top, pad_left, dh, dw, groups, OH, OW); shapes already validated. The epilogue (see
    Epilogue) is applied as each output tile is stored."""
    cdef fpstate fp, fps
    cdef ConvGeom p
    cdef Epilogue e
    cdef const floating[::1] bias_v
    cdef const floating[::1] scale_v
    cdef const floating[::1] shift_v
    cdef int rc
    fill_geom(&p, (x.shape[0], x.shape[1], x.shape[2], x.shape[3]), weight.shape[0], weight.shape[2], weight.shape[3], params)
    e.bias = e.scale = e.shift = NULL
    e.relu = relu
    if bias is not None:
        bias_v = bias
        e.bias = &bias_v[0]
    if (scale is None) != (shift is None):
        raise ValueError("conv2d epilogue: scale and shift go together")
    if scale is not None:
        scale_v = scale
        shift_v = shift
        if scale_v.shape[0] != p.K or shift_v.shape[0] != p.K:
            raise ValueError(f"conv2d epilogue: scale and shift need {p.K} values")
        e.scale = &scale_v[0]
        e.shift = &shift_v[0]
    if p.B == 0:
        return
    with nogil:
        fp = fp_enter_call()
        rc = conv2d_forward_core(&x[0, 0, 0, 0], &weight[0, 0, 0, 0], &e, &out[0, 0, 0, 0], &p, n_threads)
        fp_leave_call(fp)
    if rc:
        raise MemoryError("conv2d: could not allocate packing buffers")


def conv2d_grad_input(const floating[:, :, :, ::1] grad_out,   # IN  (B, K, OH, OW)
                      const floating[:, :, :, ::1] weight,     # IN  (K, C/G, KH, KW)
                      floating[:, :, :, ::1] grad_x,           # OUT (B, C, H, W)
                      tuple params, int n_threads):
    cdef fpstate fp, fps
    cdef ConvGeom p
    cdef int rc
    fill_geom(&p, (grad_x.shape[0], grad_x.shape[1], grad_x.shape[2], grad_x.shape[3]), weight.shape[0], weight.shape[2], weight.shape[3], params)
    if p.B == 0:
        return
    with nogil:
        fp = fp_enter_call()
        rc = conv2d_grad_input_core(&grad_out[0, 0, 0, 0], &weight[0, 0, 0, 0], &grad_x[0, 0, 0, 0], &p, n_threads)
        fp_leave_call(fp)
    if rc:
        raise MemoryError("conv2d_backward: could not allocate packing buffers")


def conv2d_grad_weight(const floating[:, :, :, ::1] grad_out,  # IN  (B, K, OH, OW)
                       const floating[:, :, :, ::1] x,         # IN  (B, C, H, W)
                       floating[:, :, :, ::1] grad_w,          # OUT (K, C/G, KH, KW)
                       floating[::1] grad_b,                   # OUT (K,)
                       tuple params, int n_threads):
    cdef fpstate fp, fps
    cdef ConvGeom p
    cdef int rc
    fill_geom(&p, (x.shape[0], x.shape[1], x.shape[2], x.shape[3]), grad_w.shape[0], grad_w.shape[2], grad_w.shape[3], params)
    if p.B == 0:
        grad_w[...] = 0
        grad_b[...] = 0
        return
    with nogil:
        fp = fp_enter_call()
        rc = conv2d_grad_weight_core(&grad_out[0, 0, 0, 0], &x[0, 0, 0, 0], &grad_w[0, 0, 0, 0], &grad_b[0], &p,
                                     n_threads)
        fp_leave_call(fp)
    if rc:
        raise MemoryError("conv2d_backward: could not allocate packing buffers")


cdef Py_ssize_t forward_scratch(const ConvGeom* q, floating dummy, Py_ssize_t T) noexcept nogil:
    """Bytes conv2d_forward_core allocates for geometry q with T threads, path by path."""
    cdef Py_ssize_t isz = sizeof(floating), ptr = sizeof(void*)
    cdef Py_ssize_t NR = tile_n(<floating>0), NC = 8 * NR, LD = NC + vlen(<floating>0)
    cdef Py_ssize_t Cg = q.C // q.G, Kg = q.K // q.G, Kd = Cg * q.KH * q.KW, taps = q.KH * q.KW
    cdef Py_ssize_t KC = balanced_block(Kd, block_k(<floating>0))
    cdef Py_ssize_t Mpad = round_up(Kg, CE_MR)
    cdef Py_ssize_t Wp, R, rows_in, ncmax, upt, maxpix, Npad, VL = vlen(<floating>0)
    cdef int path = forward_path(q, dummy)
    if use_smallc(q, dummy):
        return smallc_scratch(q, T)
    if path == PATH_PIXELS:
        Npad = round_up(Kg, pick_nv((Kg + VL - 1) // VL) * VL)
        R = pixel_rows(q)
        upt = max(1, PIXELS_PER_TASK // (R * q.OW))
        maxpix = round_up(upt * R * q.OW, CE_MR)
        return ((q.G * taps * Npad * Cg + T * (upt * Cg * window_rows(q, R) * window_width(q) + maxpix * Npad)) * isz
                + taps * sizeof(Py_ssize_t) + T * (maxpix + CE_MR + taps * Cg) * ptr)
    if path == PATH_DIRECT:
        Wp = padded_width(q)
        R = direct_rows(q, NC)
        rows_in = R + (q.KH - 1) * q.dh
        ncmax = round_up(R * Wp, NR)
        return (q.G * Mpad * Kd + T * (Cg * rows_in * Wp + ncmax + (q.KW - 1) * q.dw + Mpad * ncmax)) * isz + T * (
            Kd + Mpad) * ptr
    return (q.G * Mpad * Kd + T * (KC * LD + Mpad * NC)) * isz + T * (KC + Mpad) * ptr


cdef dict scratch_bytes(const ConvGeom* p, floating dummy, Py_ssize_t T):
    """Bytes each conv2d direction allocates per call with T threads, following the same path choices as the
    kernels (packed weights, per-thread panels and padded rows, grad_weight's per-chunk partial sums). Never the
    im2col matrix of the batch: everything per thread is bounded by the blocking constants and one block of
    padded input rows."""
    cdef Py_ssize_t isz = sizeof(floating), ptr = sizeof(void*)
    cdef Py_ssize_t NR = tile_n(<floating>0), NC = 8 * NR, LD = NC + vlen(<floating>0)
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G, Kd = Cg * p.KH * p.KW, taps = p.KH * p.KW
    cdef Py_ssize_t KCmax = block_k(<floating>0), KC, Mpad, R, rows_in, ncmax, Wp, nchunks, Npad, nv, upt, maxpix
    cdef ConvGeom q
    cdef int path
    cdef dict out = {}
    if is_depthwise(p):
        out["forward"] = out["grad_input"] = out["grad_weight"] = T * (
            dw_padded_h(p) * dw_padded_w(p) + dw_slack(p) + p.OH * dw_padded_w(p)) * isz
        return out
    out["forward"] = forward_scratch(p, dummy, T)
    if transposed_geometry(p, &q) and grad_input_as_conv(&q, dummy):
        # the flipped weights, then the forward of the transposed geometry
        out["grad_input"] = p.K * Kd * isz + forward_scratch(&q, dummy, T)
    else:
        Mpad = round_up(Kd, CE_MR)
        KC = balanced_block(Kg, KCmax)
        out["grad_input"] = (p.G * Mpad * Kg + T * (KC * LD + Mpad * NC)) * isz + T * (KC + Mpad) * ptr
        if col2im_phased(p, dummy):
            out["grad_input"] += T * max(1, min(p.B, NC // (p.OH * p.OW))) * Cg * p.H * p.sw * phase_width(p) * isz
    Mpad = round_up(Kd, CE_MR)
    path = grad_weight_path(p, dummy)
    if path == PATH_PIXELS:
        NR = channel_panel(p, dummy)
        Npad = round_up(Cg, NR)
        Mpad = round_up(Kg, CE_MR)
        R = pixel_rows(p)
        upt = max(1, PIXELS_PER_TASK // (R * p.OW))
        maxpix = upt * R * p.OW
        nchunks = pixel_chunks(p)
        out["grad_weight"] = (p.G * nchunks * Kd * Kg + T * (
            upt * window_rows(p, R) * window_width(p) * pixel_stride(Npad, dummy) + Mpad * maxpix
            + taps * Mpad * Npad)) * isz + (
            taps * sizeof(Py_ssize_t) + T * (2 * maxpix + Mpad) * ptr)
    elif path == PATH_DIRECT:
        nv = pick_nv((Kg + vlen(<floating>0) - 1) // vlen(<floating>0))
        Npad = round_up(Kg, nv * vlen(<floating>0))
        Wp = padded_width(p)
        R = direct_rows(p, 2 * KCmax)
        rows_in = R + (p.KH - 1) * p.dh
        ncmax = R * Wp
        nchunks = grad_weight_chunks(p.B * ((p.OH + R - 1) // R), R * p.OW)
        out["grad_weight"] = (p.G * nchunks * Kd * Kg + T * (
            Cg * rows_in * Wp + ncmax + (p.KW - 1) * p.dw + ncmax * Npad + Mpad * Npad + ncmax)) * isz
        out["grad_weight"] += T * (Kd + Mpad + ncmax) * ptr
    else:
        nv = pick_nv((Kg + vlen(<floating>0) - 1) // vlen(<floating>0))
        Npad = round_up(Kg, nv * vlen(<floating>0))
        nchunks = grad_weight_chunks(p.B * p.OH * p.OW, 1)
        out["grad_weight"] = (p.G * nchunks * Kd * Kg + T * (
            Mpad * (KCmax + vlen(<floating>0)) + KCmax * Npad + Mpad * Npad)) * isz + T * (Mpad + KCmax) * ptr
    return out


def conv2d_scratch_bytes(tuple x_shape, tuple w_shape, tuple params, Py_ssize_t itemsize, Py_ssize_t n_threads):
    """Extra bytes per call of each conv2d direction (see scratch_bytes); params as for conv2d_forward."""
    cdef ConvGeom p
    fill_geom(&p, x_shape, w_shape[0], w_shape[2], w_shape[3], params)
    if itemsize == 4:
        return scratch_bytes(&p, <float>0, n_threads)
    return scratch_bytes(&p, <double>0, n_threads)


cdef dict path_names(const ConvGeom* p, floating dummy):
    """The strategy each conv2d direction takes for this geometry (grad_weight's direct path: for finite x)."""
    cdef ConvGeom q
    names = {PATH_DIRECT: "direct", PATH_IM2COL: "im2col", PATH_PIXELS: "pixels"}
    if is_depthwise(p):
        return {"forward": "depthwise", "grad_input": "depthwise", "grad_weight": "depthwise"}
    if transposed_geometry(p, &q) and grad_input_as_conv(&q, dummy):
        grad_input = "transposed " + ("smallc" if use_smallc(&q, dummy) else names[forward_path(&q, dummy)])
    else:
        grad_input = "col2im"
    return {"forward": "smallc" if use_smallc(p, dummy) else names[forward_path(p, dummy)], "grad_input": grad_input,
            "grad_weight": names[grad_weight_path(p, dummy)]}


def conv2d_paths(tuple x_shape, tuple w_shape, tuple params, Py_ssize_t itemsize):
    """{'forward', 'grad_input', 'grad_weight'}: the strategy of each direction (params as for
    conv2d_forward), under the current force_conv_path."""
    cdef ConvGeom p
    fill_geom(&p, x_shape, w_shape[0], w_shape[2], w_shape[3], params)
    if itemsize == 4:
        return path_names(&p, <float>0)
    return path_names(&p, <double>0)
