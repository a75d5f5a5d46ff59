# conv2d grad_input: the forward of the transposed geometry (flipped weights) where that is a direct or pixel
# conv, else W^T . dY and col2im; and the def entry.


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


cdef bint phase_geometry(const ConvGeom* p, Py_ssize_t a, Py_ssize_t b, ConvGeom* q, Py_ssize_t* kh0,
                         Py_ssize_t* kw0) noexcept nogil:
    """For stride 2 (dilation 1), the pixels (2i + a, 2j + b) of grad_input are a stride-1 forward conv of dY with
    the taps kh = kh0 + 2u, kw = kw0 + 2v of the flipped, transposed kernel: dx[2i + a] = sum over u of
    dY[i + (a + pt) // 2 - u] w[kh0 + 2u] (rows; columns alike). Fill q with that conv's geometry (its padding
    may differ above and below: OH is the phase's rows); False where it would need negative padding. A phase
    without taps (a 1-row kernel's odd rows) has q.KH or q.KW zero."""
    kh0[0] = (a + p.pt) % 2
    kw0[0] = (b + p.pl) % 2
    q.B = p.B
    q.C = p.K
    q.H = p.OH
    q.W = p.OW
    q.K = p.C
    q.KH = (p.KH - kh0[0] + 1) // 2
    q.KW = (p.KW - kw0[0] + 1) // 2
    q.sh = 1
    q.sw = 1
    q.pt = q.KH - 1 - (a + p.pt) // 2
    q.pl = q.KW - 1 - (b + p.pl) // 2
    q.dh = 1
    q.dw = 1
    q.G = p.G
    q.OH = (p.H - a + 1) // 2
    q.OW = (p.W - b + 1) // 2
    return q.KH == 0 or q.KW == 0 or (q.pt >= 0 and q.pl >= 0)


cdef void pack_phase_weights(const float* w, const ConvGeom* p, const ConvGeom* q, Py_ssize_t kh0, Py_ssize_t kw0,
                             Py_ssize_t KC, float* out) noexcept nogil:
    """The taps of one phase (phase_geometry) packed as pack_weights_into packs a forward's weights, from w itself:
    row c of group g is input channel g*Cg + c, column (k, u, v) is w[g*Kg + k, c, kh0 + 2*(KHq-1-u), kw0 +
    2*(KWq-1-v)] (the flipped, transposed kernel's taps of that phase); panel rows past Cg are zero."""
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Kd = Kg * q.KH * q.KW
    cdef Py_ssize_t Mpad = round_up(Cg, CE_MR)
    cdef Py_ssize_t g, k0, kc, ip, t, i, c, r, k, u, v
    cdef float* panel
    for g in range(p.G):
        k0 = 0
        while k0 < Kd:
            kc = min(KC, Kd - k0)
            for ip in range(Mpad // CE_MR):
                panel = out + g * Mpad * Kd + k0 * Mpad + ip * CE_MR * kc
                for t in range(kc):
                    r = k0 + t
                    k = r // (q.KH * q.KW)
                    u = (r - k * q.KH * q.KW) // q.KW
                    v = r - (k * q.KH + u) * q.KW
                    for i in range(CE_MR):
                        c = ip * CE_MR + i
                        panel[t * CE_MR + i] = 0 if c >= Cg else w[
                            (((g * Kg + k) * Cg + c) * p.KH + kh0 + 2 * (q.KH - 1 - u)) * p.KW
                            + kw0 + 2 * (q.KW - 1 - v)]
            k0 = k0 + kc


cdef int conv2d_grad_input_phases(const float* dy, const float* w, float* dx, const ConvGeom* p,
                                  int n_threads) noexcept nogil:
    """grad_input of a stride-2 conv as four stride-1 forward convs of dY (phase_geometry), one per parity of
    (ih, iw), each on its own taps of the flipped, transposed kernel, by the row-vector micro-kernel (no dcol
    matrix, no col2im scatter), where phase rows fill most of their vectors (phase_rows_in_place; shorter rows go
    by conv2d_grad_input_phase_convs). One OpenMP region; a task takes a few images (PhasePlan): it copies their dY
    once into zero-bordered planes that every phase's taps read in place, runs the four phases into a buffer
    that stays in L2, and interleaves it into dx. Tile vector j is VL pixels of one phase row (a row's last vector
    only its pixels stored). Each element is the micro-kernel's sum over the phase's taps in k blocks of
    balanced_block(taps, ROWS_KMAX), whichever task and tile compute it: the same bits on any thread count.

    col2im's GEMM reduced over only K products per dcol element and then scattered 9 of them per pixel (64x32x32x32
    -> 64 3x3 s2: 53% of the matmul rate at 2 threads, Zen 4); four forward calls per few images, each its own
    OpenMP region and each copying dY's rows again, then a pass of its own to interleave: 71-83% (AMD EPYC Zen 4,
    2 threads)."""
    cdef fpstate fp, fps
    cdef ConvGeom q[4]
    cdef Py_ssize_t kh0[4]
    cdef Py_ssize_t kw0[4]
    cdef Py_ssize_t KC[4]
    cdef PhasePlan pp = phase_plan(p, n_threads)
    cdef Py_ssize_t VL = vlen(<float>0)
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Mpad = round_up(Cg, CE_MR)
    cdef Py_ssize_t HW = p.H * p.W, plane = pp.Hp * pp.Wp, image = p.K * pp.Hp * pp.Wp
    cdef Py_ssize_t ntasks = (p.B + pp.nimg - 1) // pp.nimg
    cdef Py_ssize_t ph, task, b0, nimg, img, k, oh, g, u, v, r, i, j0, nvec, nfull, jp, ip, k0, kc, Kd, Pq
    cdef float* apack
    cdef float* buf
    cdef float* tmp
    cdef float* yph
    cdef Py_ssize_t* boffs
    cdef Py_ssize_t* coffs
    cdef Py_ssize_t* lanes
    cdef const float** brow
    cdef int failed = 0
    for ph in range(4):
        phase_geometry(p, ph // 2, ph % 2, &q[ph], &kh0[ph], &kw0[ph])
        KC[ph] = balanced_block(Kg * q[ph].KH * q[ph].KW, ROWS_KMAX)
    apack = <float*>malloc(pp.packed * sizeof(float))
    if apack == NULL:
        return -1
    for ph in range(4):
        if q[ph].KH > 0 and q[ph].KW > 0:
            pack_phase_weights(w, p, &q[ph], kh0[ph], kw0[ph], KC[ph], apack + pp.packoff[ph])
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        buf = <float*>malloc(pp.per_thread * sizeof(float))
        boffs = <Py_ssize_t*>malloc(3 * pp.maxvec * sizeof(Py_ssize_t))
        brow = <const float**>malloc(pp.maxtaps * sizeof(float*))
        if buf != NULL:
            # the borders and the slack past the last copy stay zero; tasks write only the dY inside
            memset(buf, 0, (pp.nimg * image + VL) * sizeof(float))
        for task in prange(ntasks, schedule='static'):
            if buf == NULL or boffs == NULL or brow == NULL:
                flag_failure(&failed)
                continue
            coffs = boffs + pp.maxvec
            lanes = boffs + 2 * pp.maxvec
            tmp = buf + pp.nimg * image + VL
            b0 = task * pp.nimg
            nimg = min(pp.nimg, p.B - b0)
            for img in range(nimg):
                for k in range(p.K):
                    for oh in range(p.OH):
                        memcpy(buf + img * image + k * plane + (pp.top + oh) * pp.Wp + pp.left,
                               dy + ((b0 + img) * p.K + k) * p.OH * p.OW + oh * p.OW, p.OW * sizeof(float))
            # tmp: the four phases of the task's images one after the other, phase ph (nimg, C, OHq, OWq)
            yph = tmp
            for ph in range(4):
                Pq = q[ph].OH * q[ph].OW
                if q[ph].KH == 0 or q[ph].KW == 0:
                    memset(yph, 0, nimg * p.C * Pq * sizeof(float))
                    yph = yph + nimg * p.C * Pq
                    continue
                nvec = 0
                for img in range(nimg):
                    for i in range(q[ph].OH):
                        j0 = 0
                        while j0 < q[ph].OW:
                            boffs[nvec] = img * image + i * pp.Wp + j0
                            coffs[nvec] = img * p.C * Pq + i * q[ph].OW + j0
                            lanes[nvec] = min(VL, q[ph].OW - j0)
                            nvec = nvec + 1
                            j0 = j0 + VL
                nfull = nvec // CE_NV
                Kd = Kg * q[ph].KH * q[ph].KW
                for g in range(p.G):
                    r = 0
                    for k in range(Kg):
                        for u in range(q[ph].KH):
                            for v in range(q[ph].KW):
                                brow[r] = (buf + (g * Kg + k) * plane + (pp.top - q[ph].pt + u) * pp.Wp
                                           + pp.left - q[ph].pl + v)
                                r = r + 1
                    k0 = 0
                    while k0 < Kd:
                        kc = min(KC[ph], Kd - k0)
                        for jp in range(nfull):
                            for ip in range(Mpad // CE_MR):
                                ukernel_rows_f(kc, apack + pp.packoff[ph] + g * Mpad * Kd + k0 * Mpad + ip * CE_MR * kc,
                                               brow + k0, boffs + jp * CE_NV, yph + (g * Cg + ip * CE_MR) * Pq,
                                               coffs + jp * CE_NV, lanes + jp * CE_NV, Pq,
                                               min(CE_MR, Cg - ip * CE_MR), k0 > 0, NULL, 0, <wide_tile*>NULL)
                        for j0 in range(nfull * CE_NV, nvec):
                            for ip in range(Mpad // CE_MR):
                                ukernel_rows_f(kc, apack + pp.packoff[ph] + g * Mpad * Kd + k0 * Mpad + ip * CE_MR * kc,
                                               brow + k0, boffs + j0, yph + (g * Cg + ip * CE_MR) * Pq,
                                               coffs + j0, lanes + j0, Pq,
                                               min(CE_MR, Cg - ip * CE_MR), k0 > 0, NULL, 0, <single_tile*>NULL)
                        k0 = k0 + kc
                yph = yph + nimg * p.C * Pq
            # dx row 2i + a = phases (a, 0) and (a, 1) of row i, interleaved
            for r in range(nimg * p.C * p.H):
                interleave_row(tmp, q, nimg, r, p, dx + b0 * p.C * HW + r * p.W)
        free(buf)
        free(boffs)
        free(brow)
        fp_leave(fp)
    fp_resume(fps)
    free(apack)
    return -failed


cdef int conv2d_grad_input_phase_convs(const float* dy, const float* w, float* dx, const ConvGeom* p,
                                  int n_threads) noexcept nogil:
    """conv2d_grad_input_phases where phase rows are short (phase_rows_in_place False): the four phases as
    forward calls of their own, a few images at a time (phase_images), by the forward's paths, whose shifted
    row copies let a vector run on across rows; their outputs then interleaved into dx. 64x32x14x14 -> 64 3x3 s2
    (7-pixel phase rows), AMD EPYC Zen 4, 1 thread: 1.80 ms this way, 2.73 with a vector per phase row."""
    cdef ConvGeom q[4]
    cdef Py_ssize_t kh0[4]
    cdef Py_ssize_t kw0[4]
    cdef float* wf[4]
    cdef float* tmp
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t HW = p.H * p.W
    cdef Py_ssize_t nb = phase_images(p, n_threads)
    cdef Py_ssize_t ph, g, c, k, u, v, b0, nimg, off, r, rows
    cdef Epilogue none
    cdef int rc = 0
    none.bias = none.scale = none.shift = NULL
    none.relu = False
    for ph in range(4):
        wf[ph] = NULL
    tmp = <float*>malloc(nb * p.C * HW * sizeof(float))
    for ph in range(4):
        phase_geometry(p, ph // 2, ph % 2, &q[ph], &kh0[ph], &kw0[ph])
        if q[ph].KH > 0 and q[ph].KW > 0:
            wf[ph] = <float*>malloc(p.C * Kg * q[ph].KH * q[ph].KW * sizeof(float))
            if wf[ph] == NULL:
                rc = -1
                continue
            # wf[g*Cg + c, k, u, v] = w[g*Kg + k, c, kh0 + 2*(KHq-1-u), kw0 + 2*(KWq-1-v)]
            for g in range(p.G):
                for c in range(Cg):
                    for k in range(Kg):
                        for u in range(q[ph].KH):
                            for v in range(q[ph].KW):
                                wf[ph][(((g * Cg + c) * Kg + k) * q[ph].KH + u) * q[ph].KW + v] = w[
                                    (((g * Kg + k) * Cg + c) * p.KH + kh0[ph] + 2 * (q[ph].KH - 1 - u)) * p.KW
                                    + kw0[ph] + 2 * (q[ph].KW - 1 - v)]
    if tmp == NULL:
        rc = -1
    b0 = 0
    while rc == 0 and b0 < p.B:
        nimg = min(nb, p.B - b0)
        # tmp holds the four phases of images b0.. one after the other: phase ph at off(ph), (nimg, C, Ha, Wb)
        off = 0
        for ph in range(4):
            q[ph].B = nimg
            if q[ph].KH > 0 and q[ph].KW > 0:
                rc = rc | conv2d_forward_core(dy + b0 * p.K * p.OH * p.OW, wf[ph], &none, tmp + off, &q[ph],
                                              n_threads)
            else:
                memset(tmp + off, 0, nimg * p.C * q[ph].OH * q[ph].OW * sizeof(float))
            off = off + nimg * p.C * q[ph].OH * q[ph].OW
        # dx row 2i + a = phases (a, 0) and (a, 1) of row i, interleaved
        rows = nimg * p.C * p.H
        for r in prange(rows, num_threads=n_threads, schedule="static"):
            interleave_row(tmp, q, nimg, r, p, dx + b0 * p.C * HW + r * p.W)
        b0 = b0 + nimg
    for ph in range(4):
        free(wf[ph])
    free(tmp)
    return rc


cdef inline void interleave_row(const float* tmp, const ConvGeom* q, Py_ssize_t nimg, Py_ssize_t r,
                                const ConvGeom* p, float* dst) noexcept nogil:
    """Row r (= (image, channel) * H + ih) of the dx block from the phase outputs in tmp (conv2d_grad_input_phases'
    layout): dst[2j + b] = phase (ih % 2, b)'s row ih // 2 at column j."""
    cdef Py_ssize_t plane = r // p.H
    cdef Py_ssize_t ih = r - plane * p.H
    cdef Py_ssize_t a = ih % 2
    cdef Py_ssize_t i = ih // 2
    cdef Py_ssize_t off0 = 0, ph, j
    cdef const float* s0
    cdef const float* s1
    for ph in range(2 * a):
        off0 = off0 + nimg * p.C * q[ph].OH * q[ph].OW
    s0 = tmp + off0 + (plane * q[2 * a].OH + i) * q[2 * a].OW
    s1 = tmp + off0 + nimg * p.C * q[2 * a].OH * q[2 * a].OW + (plane * q[2 * a + 1].OH + i) * q[2 * a + 1].OW
    for j in range(q[2 * a + 1].OW):
        dst[2 * j] = s0[j]
        dst[2 * j + 1] = s1[j]
    if q[2 * a].OW > q[2 * a + 1].OW:
        dst[2 * q[2 * a + 1].OW] = s0[q[2 * a + 1].OW]


# grad_input with dY's channels in the vector lanes, for the shapes col2im took whose input channels are few (an
# early layer: LeNet-5's 6 -> 16 5x5) and whose output channels fill whole vectors: stride 1, dilation 1, one
# group, float32. dx[c, ih, iw] = sum over kh, kw of the lanes of W[:, c, kh, kw] * dY[:, ih + pt - kh,
# iw + pl - kw] (k in the lanes). A task takes one image: it copies dY channels-last into zero-bordered rows T (so
# every tap reads whole vectors, no edge tests) and packs nothing else; each tile is CE_GI_CB input channels x
# CE_GI_NP pixels of a row, accumulated over (kh, kw, k vector) in that order, then each accumulator's lanes are
# added in ce_vf_hsum_np's fixed order. Col2im's GEMM had K = 16 products per dcol element and then a scatter-add of
# 25 columns per pixel (26 GFLOP/s on LeNet-5's layer, Zen 4, 1 thread).

cdef void dy_channels_last(const float* dy, Py_ssize_t K, Py_ssize_t OH, Py_ssize_t OW, float* dst,
                           Py_ssize_t ld) noexcept nogil:
    """One image's dY (K planes of OH x OW) channels-last: dst[oh * ld + ow * K + k] = dy[(k * OH + oh) * OW + ow]
    (the lanes kernels of grad_input and grad_weight)."""
    cdef Py_ssize_t k, oh, ow
    cdef const float* src
    cdef float* row
    for k in range(K):
        src = dy + k * OH * OW
        for oh in range(OH):
            row = dst + oh * ld + k
            for ow in range(OW):
                row[ow * K] = src[oh * OW + ow]


cdef void grad_input_lanes_row(const float* trow, Py_ssize_t tstride, const float* wt, const ConvGeom* p,
                               float* dx, Py_ssize_t nc) noexcept nogil:
    """One row of dx for CE_GI_CB channels (nc of them real, planes H*W apart from dx): trow is the T row of
    output row ih + pt + KH - 1 (taps kh read tstride * kh before it), wt the channels' packed weights."""
    cdef vfloat acc[CE_GI_CB][CE_GI_NP]
    cdef vfloat wv[CE_GI_CB]
    cdef vfloat tv
    cdef float sums[CE_GI_NP]
    cdef Py_ssize_t VL = vlen(<float>0)
    cdef Py_ssize_t K = p.K, KHW = p.KH * p.KW
    cdef Py_ssize_t iw0 = 0, kh, kw, kv, i, j, nvalid
    cdef const float* tp
    cdef const float* wp
    cdef float* dst
    while iw0 < p.W:
        for i in range(CE_GI_CB):
            for j in range(CE_GI_NP):
                acc[i][j] = ce_vf_zero()
        for kh in range(p.KH):
            for kw in range(p.KW):
                # pixel iw0 + j reads T column iw0 + j + pl + KW - 1 - kw
                tp = trow - kh * tstride + (iw0 + p.pl + p.KW - 1 - kw) * K
                wp = wt + (kh * p.KW + kw) * K
                for kv in range(K // VL):
                    for i in range(CE_GI_CB):
                        wv[i] = ce_vf_load_reg(wp + i * KHW * K + kv * VL)
                    for j in range(CE_GI_NP):
                        tv = ce_vf_load_reg(tp + j * K + kv * VL)
                        for i in range(CE_GI_CB):
                            acc[i][j] += wv[i] * tv
        nvalid = min(CE_GI_NP, p.W - iw0)
        for i in range(CE_GI_CB):
            if i < nc:
                dst = dx + i * p.H * p.W + iw0
                if nvalid == CE_GI_NP:
                    ce_vf_hsum_np(&acc[i][0], dst)
                else:
                    ce_vf_hsum_np(&acc[i][0], sums)
                    for j in range(nvalid):
                        dst[j] = sums[j]
        iw0 = iw0 + CE_GI_NP


cdef int conv2d_grad_input_lanes(const float* dy, const float* w, float* dx, const ConvGeom* p,
                                 int n_threads) noexcept nogil:
    """dx = conv2d's input gradient (overwritten) by the lane-reduction kernel (see above). -1 on allocation
    failure."""
    cdef fpstate fp, fps
    cdef Py_ssize_t VL = vlen(<float>0)
    cdef Py_ssize_t K = p.K, KHW = p.KH * p.KW
    cdef Py_ssize_t Cp = round_up(p.C, CE_GI_CB)
    cdef Py_ssize_t TC = grad_input_lanes_cols(p)
    cdef Py_ssize_t b, c, k, t, ih, cb
    cdef float* wt
    cdef float* tbuf
    cdef int failed = 0
    # weights channels-last: wt[((c * KH + kh) * KW + kw) * K + k] = w[k, c, kh, kw], zero for c >= C
    wt = <float*>malloc(Cp * KHW * K * sizeof(float))
    if wt == NULL:
        return -1
    for c in range(Cp):
        for t in range(KHW):
            for k in range(K):
                wt[(c * KHW + t) * K + k] = w[(k * p.C + c) * KHW + t] if c < p.C else 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        tbuf = <float*>malloc(grad_input_lanes_floats(p) * sizeof(float))
        for b in prange(p.B, schedule='static'):
            if tbuf == NULL:
                flag_failure(&failed)
                continue
            # T[oh + KH - 1, ow + KW - 1, k] = dY[b, k, oh, ow], zero elsewhere
            memset(tbuf, 0, grad_input_lanes_floats(p) * sizeof(float))
            dy_channels_last(dy + b * K * p.OH * p.OW, K, p.OH, p.OW, tbuf + ((p.KH - 1) * TC + p.KW - 1) * K,
                             TC * K)
            for cb in range(Cp // CE_GI_CB):
                for ih in range(p.H):
                    grad_input_lanes_row(tbuf + (ih + p.pt + p.KH - 1) * TC * K, TC * K,
                                         wt + cb * CE_GI_CB * KHW * K, p,
                                         dx + ((b * p.C + cb * CE_GI_CB) * p.H + ih) * p.W,
                                         min(CE_GI_CB, p.C - cb * CE_GI_CB))
        free(tbuf)
        fp_leave(fp)
    fp_resume(fps)
    free(wt)
    return -failed


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
    if floating is float:
        if use_grad_input_phases(p):
            if phase_rows_in_place(p):
                return conv2d_grad_input_phases(dy, w, dx, p, n_threads)
            return conv2d_grad_input_phase_convs(dy, w, dx, p, n_threads)
        if use_grad_input_lanes(p, <float>0):
            return conv2d_grad_input_lanes(dy, w, dx, p, n_threads)
    return conv2d_grad_input_col2im(dy, w, dx, p, n_threads)


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
    cdef Py_ssize_t NC = block_columns(<floating>0)
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
