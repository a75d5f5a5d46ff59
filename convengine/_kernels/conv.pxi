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

cdef struct ConvGeom:
    Py_ssize_t B, C, H, W, K, KH, KW, sh, sw, pt, pl, dh, dw, G, OH, OW


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
            lo = 0 if iw0 >= 0 else (-iw0 + p.sw - 1) // p.sw
            hi = 0 if iw0 >= p.W else (p.W - iw0 + p.sw - 1) // p.sw
            lo = min(lo, seg)
            hi = max(lo, min(hi, seg))
            for u in range(lo):
                dst[(t + u) * stride] = 0
            if p.sw == 1 and stride == 1:
                for u in range(lo, hi):
                    dst[t + u] = src[iw0 + u]
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


cdef void pack_b_im2col(const floating* x, const ConvGeom* p, Py_ssize_t g, Py_ssize_t r0, Py_ssize_t kc,
                        Py_ssize_t q0, Py_ssize_t nc, floating* out) noexcept nogil:
    """Pack col[r0:r0+kc, q0:q0+nc] as a GEMM B block (NR-column panels, zero past nc)."""
    cdef Py_ssize_t NR = tile_n(<floating>0)
    cdef Py_ssize_t jp, rr, j, ncols
    for jp in range((nc + NR - 1) // NR):
        ncols = min(NR, nc - jp * NR)
        for rr in range(kc):
            im2col_row(x, p, g, r0 + rr, q0 + jp * NR, ncols, out + rr * NR, 1)
            for j in range(ncols, NR):
                out[rr * NR + j] = 0
        out += kc * NR


cdef void pack_a_im2col(const floating* x, const ConvGeom* p, Py_ssize_t g, Py_ssize_t Kd, Py_ssize_t q0,
                        Py_ssize_t kc, floating* out) noexcept nogil:
    """Pack col[0:Kd, q0:q0+kc] as a GEMM A block (MR-row panels, rows past Kd zero)."""
    cdef Py_ssize_t ip, i, r, t
    for ip in range((Kd + CE_MR - 1) // CE_MR):
        for i in range(CE_MR):
            r = ip * CE_MR + i
            if r < Kd:
                im2col_row(x, p, g, r, q0, kc, out + i, CE_MR)
            else:
                for t in range(kc):
                    out[t * CE_MR + i] = 0
        out += kc * CE_MR


cdef void pack_b_grad_out_t(const floating* dy, const ConvGeom* p, Py_ssize_t g, Py_ssize_t q0, Py_ssize_t kc,
                            floating* out) noexcept nogil:
    """Pack dY[g]^T[q0:q0+kc, 0:Kg] (q = (b, oh, ow), columns are the group's output channels) as a B block."""
    cdef Py_ssize_t NR = tile_n(<floating>0)
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


cdef int conv2d_forward_core(const floating* x, const floating* w, const floating* bias, floating* y,
                             const ConvGeom* p, int n_threads) noexcept nogil:
    """y = conv2d(x, w) + bias, all C-contiguous NCHW / KCRS; bias may be NULL. Returns -1 on allocation failure."""
    cdef Py_ssize_t NR = tile_n(<floating>0)
    cdef Py_ssize_t KC = block_k(<floating>0)
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Kd = Cg * p.KH * p.KW
    cdef Py_ssize_t P = p.OH * p.OW
    cdef Py_ssize_t Q = p.B * P
    cdef Py_ssize_t Mpad = round_up(Kg, CE_MR)
    cdef Py_ssize_t NC = 8 * NR
    cdef Py_ssize_t nblocks = (Q + NC - 1) // NC
    cdef Py_ssize_t g, k0, kc, task, nb, q0, nc, i, j, seg, b, pix, u
    cdef floating* apack
    cdef floating* bpack
    cdef floating* cbuf
    cdef floating* dst
    cdef const floating* src
    cdef floating bval
    cdef int failed = 0
    apack = <floating*>malloc(p.G * Mpad * Kd * sizeof(floating))
    if apack == NULL:
        return -1
    for g in range(p.G):
        k0 = 0
        while k0 < Kd:
            kc = min(KC, Kd - k0)
            pack_a_strided(w + g * Kg * Kd + k0, Kd, 1, Kg, kc, apack + g * Mpad * Kd + k0 * Mpad)
            k0 += kc
    with parallel(num_threads=n_threads):
        bpack = <floating*>malloc(KC * NC * sizeof(floating))
        cbuf = <floating*>malloc(Mpad * NC * sizeof(floating))
        for task in prange(p.G * nblocks, schedule='static'):
            if bpack == NULL or cbuf == NULL:
                (&failed)[0] = 1
                continue
            g = task // nblocks
            nb = task - g * nblocks
            q0 = nb * NC
            nc = min(NC, Q - q0)
            k0 = 0
            while k0 < Kd:
                kc = min(KC, Kd - k0)
                pack_b_im2col(x, p, g, k0, kc, q0, nc, bpack)
                macro_kernel(Mpad // CE_MR, (nc + NR - 1) // NR, kc, apack + g * Mpad * Kd + k0 * Mpad, bpack,
                             cbuf, NC, k0 > 0)
                k0 = k0 + kc
            # scatter the Kg x nc block to y[b, g*Kg + i, pix], one output row segment per image
            j = 0
            while j < nc:
                b = (q0 + j) // P
                pix = q0 + j - b * P
                seg = min(nc - j, P - pix)
                for i in range(Kg):
                    dst = y + (b * p.K + g * Kg + i) * P + pix
                    src = cbuf + i * NC + j
                    bval = bias[g * Kg + i] if bias != NULL else 0
                    for u in range(seg):
                        dst[u] = src[u] + bval
                j = j + seg
        free(bpack)
        free(cbuf)
    free(apack)
    return -failed


cdef int conv2d_grad_input_core(const floating* dy, const floating* w, floating* dx, const ConvGeom* p,
                                int n_threads) noexcept nogil:
    """dx = conv2d's input gradient (overwritten). Split over (image, group): each task owns its dx planes."""
    cdef Py_ssize_t NR = tile_n(<floating>0)
    cdef Py_ssize_t KC = block_k(<floating>0)
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Kd = Cg * p.KH * p.KW
    cdef Py_ssize_t P = p.OH * p.OW
    cdef Py_ssize_t Mpad = round_up(Kd, CE_MR)
    cdef Py_ssize_t NC = 8 * NR
    cdef Py_ssize_t g, b, k0, kc, task, p0, nc, i
    cdef floating* apack
    cdef floating* bpack
    cdef floating* cbuf
    cdef floating* dxg
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
    with parallel(num_threads=n_threads):
        bpack = <floating*>malloc(KC * NC * sizeof(floating))
        cbuf = <floating*>malloc(Mpad * NC * sizeof(floating))
        for task in prange(p.B * p.G, schedule='static'):
            if bpack == NULL or cbuf == NULL:
                (&failed)[0] = 1
                continue
            b = task // p.G
            g = task - b * p.G
            dxg = dx + (b * p.C + g * Cg) * p.H * p.W
            for i in range(Cg * p.H * p.W):
                dxg[i] = 0
            p0 = 0
            while p0 < P:
                nc = min(NC, P - p0)
                k0 = 0
                while k0 < Kg:
                    kc = min(KC, Kg - k0)
                    pack_b_strided(dy + (b * p.K + g * Kg + k0) * P + p0, P, 1, kc, nc, bpack)
                    macro_kernel(Mpad // CE_MR, (nc + NR - 1) // NR, kc, apack + g * Mpad * Kg + k0 * Mpad,
                                 bpack, cbuf, NC, k0 > 0)
                    k0 = k0 + kc
                col2im_add(cbuf, NC, p, Kd, p0, nc, dxg)
                p0 = p0 + nc
        free(bpack)
        free(cbuf)
    free(apack)
    return -failed


cdef inline Py_ssize_t grad_weight_chunks(Py_ssize_t Q) noexcept nogil:
    """How many fixed slices of the Q = B*OH*OW pixels grad_weight reduces separately (then sums in order).
    A function of the shape only, never of the thread count."""
    return max(1, min(16, Q // 2048))


cdef int conv2d_grad_weight_core(const floating* dy, const floating* x, floating* dw, floating* db,
                                 const ConvGeom* p, int n_threads) noexcept nogil:
    """dw (K, Cg, KH, KW) and db (K,) or NULL, overwritten."""
    cdef Py_ssize_t NR = tile_n(<floating>0)
    cdef Py_ssize_t KC = block_k(<floating>0)
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Kd = Cg * p.KH * p.KW
    cdef Py_ssize_t P = p.OH * p.OW
    cdef Py_ssize_t Q = p.B * P
    cdef Py_ssize_t Mpad = round_up(Kd, CE_MR)
    cdef Py_ssize_t Npad = round_up(Kg, NR)
    cdef Py_ssize_t nchunks = grad_weight_chunks(Q)
    cdef Py_ssize_t chunk = (Q + nchunks - 1) // nchunks
    cdef Py_ssize_t task, g, ch, q0, q1, k0, kc, i, j, k, r, b
    cdef floating* apack
    cdef floating* bpack
    cdef floating* cbuf
    cdef floating* partial
    cdef floating acc
    cdef const floating* src
    cdef int failed = 0
    partial = <floating*>malloc(p.G * nchunks * Kd * Kg * sizeof(floating))
    if partial == NULL:
        return -1
    with parallel(num_threads=n_threads):
        apack = <floating*>malloc(Mpad * KC * sizeof(floating))
        bpack = <floating*>malloc(KC * Npad * sizeof(floating))
        cbuf = <floating*>malloc(Mpad * Npad * sizeof(floating))
        for task in prange(p.G * nchunks, schedule='static'):
            if apack == NULL or bpack == NULL or cbuf == NULL:
                (&failed)[0] = 1
                continue
            g = task // nchunks
            ch = task - g * nchunks
            q0 = ch * chunk
            q1 = min(Q, q0 + chunk)
            if q1 <= q0:
                for i in range(Kd * Kg):
                    partial[task * Kd * Kg + i] = 0
                continue
            k0 = q0
            while k0 < q1:
                kc = min(KC, q1 - k0)
                pack_a_im2col(x, p, g, Kd, k0, kc, apack)
                pack_b_grad_out_t(dy, p, g, k0, kc, bpack)
                macro_kernel(Mpad // CE_MR, Npad // NR, kc, apack, bpack, cbuf, Npad, k0 > q0)
                k0 = k0 + kc
            for i in range(Kd):
                for j in range(Kg):
                    partial[task * Kd * Kg + i * Kg + j] = cbuf[i * Npad + j]
        free(apack)
        free(bpack)
        free(cbuf)
    if not failed:
        # dw[g*Kg + k, r] = sum over chunks, in chunk order, of partial[g, ch][r, k]
        for task in prange(p.K, schedule='static', num_threads=n_threads):
            g = task // Kg
            k = task - g * Kg
            for r in range(Kd):
                acc = 0
                for ch in range(nchunks):
                    acc = acc + partial[((g * nchunks + ch) * Kd + r) * Kg + k]
                dw[task * Kd + r] = acc
            if db != NULL:
                acc = 0
                for b in range(p.B):
                    src = dy + (b * p.K + task) * P
                    for i in range(P):
                        acc = acc + src[i]
                db[task] = acc
    free(partial)
    return -failed


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
                   tuple params, int n_threads):
    """params = (sh, sw, pad_top, pad_left, dh, dw, groups, OH, OW); shapes already validated."""
    cdef ConvGeom p
    cdef const floating[::1] bias_v
    cdef const floating* bias_ptr = NULL
    cdef int rc
    fill_geom(&p, (x.shape[0], x.shape[1], x.shape[2], x.shape[3]), weight.shape[0], weight.shape[2], weight.shape[3], params)
    if bias is not None:
        bias_v = bias
        bias_ptr = &bias_v[0]
    if p.B == 0:
        return
    with nogil:
        rc = conv2d_forward_core(&x[0, 0, 0, 0], &weight[0, 0, 0, 0], bias_ptr, &out[0, 0, 0, 0], &p, n_threads)
    if rc:
        raise MemoryError("conv2d: could not allocate packing buffers")


def conv2d_grad_input(const floating[:, :, :, ::1] grad_out,   # IN  (B, K, OH, OW)
                      const floating[:, :, :, ::1] weight,     # IN  (K, C/G, KH, KW)
                      floating[:, :, :, ::1] grad_x,           # OUT (B, C, H, W)
                      tuple params, int n_threads):
    cdef ConvGeom p
    cdef int rc
    fill_geom(&p, (grad_x.shape[0], grad_x.shape[1], grad_x.shape[2], grad_x.shape[3]), weight.shape[0], weight.shape[2], weight.shape[3], params)
    if p.B == 0:
        return
    with nogil:
        rc = conv2d_grad_input_core(&grad_out[0, 0, 0, 0], &weight[0, 0, 0, 0], &grad_x[0, 0, 0, 0], &p, n_threads)
    if rc:
        raise MemoryError("conv2d_backward: could not allocate packing buffers")


def conv2d_grad_weight(const floating[:, :, :, ::1] grad_out,  # IN  (B, K, OH, OW)
                       const floating[:, :, :, ::1] x,         # IN  (B, C, H, W)
                       floating[:, :, :, ::1] grad_w,          # OUT (K, C/G, KH, KW)
                       floating[::1] grad_b,                   # OUT (K,)
                       tuple params, int n_threads):
    cdef ConvGeom p
    cdef int rc
    fill_geom(&p, (x.shape[0], x.shape[1], x.shape[2], x.shape[3]), grad_w.shape[0], grad_w.shape[2], grad_w.shape[3], params)
    if p.B == 0:
        grad_w[...] = 0
        grad_b[...] = 0
        return
    with nogil:
        rc = conv2d_grad_weight_core(&grad_out[0, 0, 0, 0], &x[0, 0, 0, 0], &grad_w[0, 0, 0, 0], &grad_b[0], &p,
                                     n_threads)
    if rc:
        raise MemoryError("conv2d_backward: could not allocate packing buffers")
