# Depthwise conv2d (groups == in_channels == out_channels): one KH x KW filter per plane. As a GEMM it would be
# a 1-row matrix in an MR-row tile; here each (image, channel) plane is one task that slides its filter over a
# zero-padded copy of the plane (stride 2: over its four parity phases), vectorised along output rows with the
# sums of all taps held in registers (depthwise.h). grad_input at stride 1 is the forward of the transposed
# geometry; grad_weight sums a channel over all images in a fixed order (16 interleaved lanes per tap), so
# results do not depend on the thread count. Small float32 3x3 planes (8 or 16 wide) take whole-plane register
# kernels in all three directions (dw_small_kernel).

cdef extern from "depthwise.h":
    void ce_dw_sweep_f(const float* src, Py_ssize_t n, const Py_ssize_t* off, const float* w, Py_ssize_t taps,
                       float bias, bint relu, bint affine, float sc, float sh, float* out) nogil
    void ce_dw_sweep_d(const double* src, Py_ssize_t n, const Py_ssize_t* off, const double* w, Py_ssize_t taps,
                       double bias, bint relu, bint affine, double sc, double sh, double* out) nogil
    void ce_dw_split_row_f(const float* x, Py_ssize_t W, Py_ssize_t pl, Py_ssize_t nq, float* even,
                           float* odd) nogil
    void ce_dw_split_row_d(const double* x, Py_ssize_t W, Py_ssize_t pl, Py_ssize_t nq, double* even,
                           double* odd) nogil
    void ce_dw_merge_row_f(const float* even, const float* odd, Py_ssize_t nq, Py_ssize_t pl, Py_ssize_t W,
                           float* out) nogil
    void ce_dw_merge_row_d(const double* even, const double* odd, Py_ssize_t nq, Py_ssize_t pl, Py_ssize_t W,
                           double* out) nogil
    enum: CE_DW_SPLIT
    void ce_dw_copy_rows_f(const float* src, Py_ssize_t ss, float* dst, Py_ssize_t ds, Py_ssize_t rows,
                           Py_ssize_t n) nogil
    void ce_dw_copy_rows_d(const double* src, Py_ssize_t ss, double* dst, Py_ssize_t ds, Py_ssize_t rows,
                           Py_ssize_t n) nogil
    void ce_dw_tapdot9_f(const float* g, const float* src, Py_ssize_t n, const Py_ssize_t* off, float* lanes) nogil
    void ce_dw_tapdot1_f(const float* g, const float* src, Py_ssize_t n, const Py_ssize_t* off, float* lanes) nogil
    void ce_dw_tapdot9_d(const double* g, const double* src, Py_ssize_t n, const Py_ssize_t* off,
                         double* lanes) nogil
    void ce_dw_tapdot1_d(const double* g, const double* src, Py_ssize_t n, const Py_ssize_t* off,
                         double* lanes) nogil
    enum: CE_DW_SMALL
    void ce_dw3x3p1s1_w16_f(const float* x, Py_ssize_t H, const float* w, float bias, bint relu, bint affine,
                            float scale, float shift, float* y) nogil
    void ce_dw3x3p1s1_w8_f(const float* x, Py_ssize_t H, const float* w, float bias, bint relu, bint affine,
                           float scale, float shift, float* y) nogil
    void ce_dw3x3p1s2_w16_f(const float* x, Py_ssize_t H, Py_ssize_t OH, const float* w, float bias, bint relu,
                            bint affine, float scale, float shift, float* y) nogil
    void ce_dw3x3p1s1_w16_gw_f(const float* x, const float* g, Py_ssize_t B, Py_ssize_t bs, Py_ssize_t gs,
                               Py_ssize_t H, float* dw, float* db) nogil
    void ce_dw3x3p1s1_w8_gw_f(const float* x, const float* g, Py_ssize_t B, Py_ssize_t bs, Py_ssize_t gs,
                              Py_ssize_t H, float* dw, float* db) nogil
    void ce_dw3x3p1s2_w16_gw_f(const float* x, const float* g, Py_ssize_t B, Py_ssize_t bs, Py_ssize_t gs,
                               Py_ssize_t H, Py_ssize_t OH, float* dw, float* db) nogil
    void ce_dw3x3p1s2_w16_gi_f(const float* g, Py_ssize_t H, Py_ssize_t OH, const float* w, float* dx) nogil


cdef void tap_dots(const floating* g, const floating* src, Py_ssize_t n, const Py_ssize_t* off, Py_ssize_t taps,
                   floating* lanes) noexcept nogil:
    """lanes[16*k + j] += the sum over t < n, t % 16 == j of g[t] * src[off[k] + t] for every tap k, in increasing
    t (a tail shorter than 16 into the first lanes), nine taps per sweep (depthwise.h). The caller zeroes the
    lanes, sweeps a channel's planes image by image into them, and adds the lanes in order (lanes_total): a
    fixed order that vectorises."""
    cdef Py_ssize_t k
    k = 0
    while k < taps:
        if floating is float:
            if taps - k >= 9:
                ce_dw_tapdot9_f(g, src, n, off + k, lanes + 16 * k)
            else:
                ce_dw_tapdot1_f(g, src, n, off + k, lanes + 16 * k)
        else:
            if taps - k >= 9:
                ce_dw_tapdot9_d(g, src, n, off + k, lanes + 16 * k)
            else:
                ce_dw_tapdot1_d(g, src, n, off + k, lanes + 16 * k)
        k = k + (9 if taps - k >= 9 else 1)


cdef void lanes_total(const floating* lanes, Py_ssize_t taps, floating* dw) noexcept nogil:
    """dw[k] += the 16 lanes of tap k, added in order."""
    cdef Py_ssize_t k, j
    cdef floating acc
    for k in range(taps):
        acc = 0
        for j in range(16):
            acc += lanes[16 * k + j]
        dw[k] += acc


cdef inline void dw_sweep(const floating* src, Py_ssize_t n, const Py_ssize_t* off, const floating* w,
                          Py_ssize_t taps, floating bias, const Epilogue* e, Py_ssize_t k, floating* out) noexcept nogil:
    """out[t] = the epilogue of channel k applied to bias + sum over taps i of w[i] * src[off[i] + t], t < n (the
    sums held in registers over all taps: depthwise.h)."""
    cdef bint affine = e.scale != NULL
    cdef floating sc = (<const floating*>e.scale)[k] if affine else 1
    cdef floating sh = (<const floating*>e.shift)[k] if affine else 0
    if floating is float:
        ce_dw_sweep_f(src, n, off, w, taps, bias, e.relu, affine, sc, sh, out)
    else:
        ce_dw_sweep_d(src, n, off, w, taps, bias, e.relu, affine, sc, sh, out)


cdef inline bint is_depthwise(const ConvGeom* p) noexcept nogil:
    """Depthwise, with a padded plane of sane size (else the GEMM path, whose buffers do not grow with dilation)."""
    return (p.G == p.C and p.G == p.K and p.G > 1
            and dw_padded_h(p) <= MAX_DIRECT_SCRATCH // dw_padded_w(p))


cdef enum:
    DW_GENERAL = 0      # padded copy, register sweep along padded rows, crop (stride 2: four parity phases)
    DW_3X3S1_W8 = 1     # whole-plane register kernels (depthwise.h)
    DW_3X3S1_W16 = 2
    DW_3X3S2_W16 = 3


cdef inline int dw_small_kernel(const ConvGeom* p, floating dummy) noexcept nogil:
    """The forward's kernel for a plane of this geometry: the whole-plane register kernels of depthwise.h where
    they apply (float32, AVX-512 builds; 3x3, top and left padding 1, dilation 1; width 8 or 16 at stride 1 with
    the output as large as the input, width 16 -> 8 at stride 2), else the general sweep.
    Measured on AMD EPYC (Zen 4), 1 thread, conv2d forward with bias, general sweep -> whole-plane kernel, in
    one process, medians: batch 64 (64,32,16,16) s1 0.317 -> 0.094 ms (30 -> 100 GFLOP/s), (64,64,16,16) s2
    0.673 -> 0.098 ms (7 -> 48), (64,128,8,8) s1 0.520 -> 0.159 ms (18 -> 59), the depthwise layers of the
    separable benchmark net; batch 1 of the same 2.1x, 3.4x, 2.4x. Their stride-1 grad_input (the same kernels
    on the transposed geometry) gains as much. Bitwise the same results as the sweep, so no threshold: every
    such plane takes them.
    grad_weight takes the same geometries (a channel's planes over all images in registers, bias gradient from
    the same loads), and grad_input the stride-2 one; same machine, old -> new, one process, interleaved medians:
    grad_weight (with grad_bias) 16x16 s1 0.545 -> 0.099 ms, 16x16 s2 1.063 -> 0.107, 8x8 s1 0.875 -> 0.160;
    grad_input 16x16 s2 0.849 -> 0.133. grad_weight's summation order is its own (depthwise.h), fixed for the
    geometry; grad_input keeps the phased path's bits."""
    if floating is float:
        if CE_DW_SMALL and p.KH == 3 and p.KW == 3 and p.dh == 1 and p.dw == 1 and p.pt == 1 and p.pl == 1:
            if p.sh == 1 and p.sw == 1 and p.OH == p.H and p.OW == p.W and p.W == 8:
                return DW_3X3S1_W8
            if p.sh == 1 and p.sw == 1 and p.OH == p.H and p.OW == p.W and p.W == 16:
                return DW_3X3S1_W16
            if p.sh == 2 and p.sw == 2 and p.W == 16 and p.OW == 8:
                return DW_3X3S2_W16
    return DW_GENERAL


cdef str dw_path_name(const ConvGeom* p, floating dummy):
    """The forward's depthwise kernel as conv2d_paths reports it: 'depthwise' (the general sweep) or the
    whole-plane kernel, e.g. 'depthwise 3x3s1 w8'."""
    return {DW_GENERAL: "depthwise", DW_3X3S1_W8: "depthwise 3x3s1 w8", DW_3X3S1_W16: "depthwise 3x3s1 w16",
            DW_3X3S2_W16: "depthwise 3x3s2 w16"}[dw_small_kernel(p, dummy)]


cdef inline void dw_small_plane(int kernel, const floating* x, const floating* w, const Epilogue* e,
                                Py_ssize_t c, floating* y, const ConvGeom* p) noexcept nogil:
    """Plane c's output y, epilogue included, by the whole-plane kernel chosen by dw_small_kernel (float32)."""
    cdef const floating* bias = <const floating*>e.bias
    cdef bint affine = e.scale != NULL
    cdef floating b = bias[c] if bias != NULL else 0
    cdef floating sc = (<const floating*>e.scale)[c] if affine else 1
    cdef floating sh = (<const floating*>e.shift)[c] if affine else 0
    if floating is float:
        if kernel == DW_3X3S1_W8:
            ce_dw3x3p1s1_w8_f(x, p.H, w, b, e.relu, affine, sc, sh, y)
        elif kernel == DW_3X3S1_W16:
            ce_dw3x3p1s1_w16_f(x, p.H, w, b, e.relu, affine, sc, sh, y)
        else:
            ce_dw3x3p1s2_w16_f(x, p.H, p.OH, w, b, e.relu, affine, sc, sh, y)


cdef inline void dw_small_grad_weight(int kernel, const floating* dy, const floating* x, floating* dw,
                                      floating* db, const ConvGeom* p) noexcept nogil:
    """dw[0:9] = a channel's weight gradient over all B images by the whole-plane kernel chosen by dw_small_kernel
    (float32; dy, x: the channel's plane in image 0; its own fixed summation order: depthwise.h), and db[0] (db
    non-NULL) its bias gradient, grad_bias's bits, from the same loads of dY."""
    cdef Py_ssize_t bs = p.C * p.H * p.W, gs = p.C * p.OH * p.OW
    if floating is float:
        if kernel == DW_3X3S1_W8:
            ce_dw3x3p1s1_w8_gw_f(x, dy, p.B, bs, gs, p.H, dw, db)
        elif kernel == DW_3X3S1_W16:
            ce_dw3x3p1s1_w16_gw_f(x, dy, p.B, bs, gs, p.H, dw, db)
        else:
            ce_dw3x3p1s2_w16_gw_f(x, dy, p.B, bs, gs, p.H, p.OH, dw, db)


cdef inline Py_ssize_t dw_padded_h(const ConvGeom* p) noexcept nogil:
    """Rows of the padded plane: every tap of every output row lies inside."""
    return max(p.pt + p.H, (p.OH - 1) * p.sh + (p.KH - 1) * p.dh + 1)


cdef inline Py_ssize_t dw_padded_w(const ConvGeom* p) noexcept nogil:
    return max(p.pl + p.W, (p.OW - 1) * p.sw + (p.KW - 1) * p.dw + 1)


cdef inline void copy_rows(const floating* src, Py_ssize_t src_stride, floating* dst, Py_ssize_t dst_stride,
                           Py_ssize_t rows, Py_ssize_t n) noexcept nogil:
    """dst row r = src row r (n values each), rows short enough that a libc call per row would cost as much as
    the row's sweep (depthwise.h)."""
    if floating is float:
        ce_dw_copy_rows_f(src, src_stride, dst, dst_stride, rows, n)
    else:
        ce_dw_copy_rows_d(src, src_stride, dst, dst_stride, rows, n)


cdef void pad_plane(const floating* x, const ConvGeom* p, floating* out, bint clear=True) noexcept nogil:
    """out (Hp x Wp) = the H x W plane x at offset (pt, pl), zeros elsewhere (clear=False: the border is already
    zero, as in a buffer that only ever holds padded planes of this geometry)."""
    cdef Py_ssize_t Hp = dw_padded_h(p), Wp = dw_padded_w(p)
    if clear:
        memset(out, 0, Hp * Wp * sizeof(floating))
    copy_rows(x, p.W, out + p.pt * Wp + p.pl, Wp, p.H, p.W)


cdef inline Py_ssize_t dw_slack(const ConvGeom* p) noexcept nogil:
    """Elements past the padded plane that stride-1 taps may read when whole rows of width Wp are swept."""
    return (p.KW - 1) * p.dw + 1


cdef void depthwise_plane_forward(const floating* xpad, const floating* w, floating bias, floating* y,
                                  floating* ypad, const ConvGeom* p, const Py_ssize_t* off, const Epilogue* e,
                                  Py_ssize_t c) noexcept nogil:
    """Plane c's output y from its zero-padded copy xpad, with the epilogue (finish_in_place after it where the
    stride is neither 1 nor 2)."""
    cdef Py_ssize_t Wp = dw_padded_w(p)
    cdef Py_ssize_t oh, ow, kh, kw
    cdef floating wv
    cdef floating* yrow
    cdef const floating* src
    if p.sh == 1 and p.sw == 1:
        # stride 1: every tap swept over all OH rows of padded width at once (off: the taps' offsets; one long
        # vector loop instead of short rows with scalar tails), then the OW valid columns cropped
        dw_sweep(xpad, round_up(p.OH * Wp, vlen(<floating>0)), off, w, p.KH * p.KW, bias, e, c, ypad)
        copy_rows(ypad, Wp, y, p.OW, p.OH, p.OW)
        return
    for oh in range(p.OH):
        yrow = y + oh * p.OW
        for ow in range(p.OW):
            yrow[ow] = bias
        for kh in range(p.KH):
            for kw in range(p.KW):
                wv = w[kh * p.KW + kw]
                src = xpad + (oh * p.sh + kh * p.dh) * Wp + kw * p.dw
                if p.sw == 1:
                    for ow in range(p.OW):
                        yrow[ow] += wv * src[ow]
                else:
                    for ow in range(p.OW):
                        yrow[ow] += wv * src[ow * p.sw]


cdef void dw_tap_offsets(const ConvGeom* p, Py_ssize_t* off) noexcept nogil:
    """off[kh*KW + kw] = where tap (kh, kw) starts reading in the forward's swept buffer: the padded plane at
    stride 1, the tap's parity phase (phase_split) at stride 2; unused otherwise."""
    cdef Py_ssize_t Wp = dw_padded_w(p), Hq = dw_phase_h(p), Wq = dw_phase_w(p), kh, kw
    for kh in range(p.KH):
        for kw in range(p.KW):
            if dw_phased(p):
                off[kh * p.KW + kw] = ((kh % 2) * 2 + kw % 2) * Hq * Wq + (kh // 2) * Wq + kw // 2
            else:
                off[kh * p.KW + kw] = kh * p.dh * Wp + kw * p.dw


cdef inline bint dw_phased(const ConvGeom* p) noexcept nogil:
    """Stride 2 both ways, no dilation: the plane is split into its four (row, column) parity phases, so that every
    tap reads a contiguous run (the strided loop ran at 2 GFLOP/s on 16x16 -> 8x8 planes)."""
    return p.sh == 2 and p.sw == 2 and p.dh == 1 and p.dw == 1


cdef inline Py_ssize_t dw_phase_h(const ConvGeom* p) noexcept nogil:
    return (dw_padded_h(p) + 1) // 2


cdef inline Py_ssize_t dw_phase_w(const ConvGeom* p) noexcept nogil:
    return (dw_padded_w(p) + 1) // 2


cdef inline Py_ssize_t dw_phased_len(const ConvGeom* p) noexcept nogil:
    """Elements of the four phases, plus the slack that whole-row sweeps of the last taps may read."""
    return 4 * dw_phase_h(p) * dw_phase_w(p) + dw_phase_w(p) + p.KW


cdef void depthwise_plane_forward_phased(const floating* x, const floating* w, floating bias, floating* y,
                                         floating* xq, floating* ypad, const ConvGeom* p, const Py_ssize_t* off,
                                         const Epilogue* e, Py_ssize_t c) noexcept nogil:
    """A stride-2 plane (see dw_phased): xq[(a*2 + b)*Hq*Wq + r*Wq + j] = padded x[2r + a, 2j + b], then for each
    tap (kh, kw) reads all OH rows of width Wq of phase (kh % 2, kw % 2) at offset (kh // 2, kw // 2) (off: see
    dw_tap_offsets), swept as the stride-1 path does; the sums start from the bias and add the taps in (kh, kw)
    order, as the strided loop did, so the results are the same."""
    cdef Py_ssize_t Wq = dw_phase_w(p)
    cdef Py_ssize_t oh
    phase_split(x, p, xq)
    dw_sweep(xq, round_up(p.OH * Wq, vlen(<floating>0)), off, w, p.KH * p.KW, bias, e, c, ypad)
    copy_rows(ypad, Wq, y, p.OW, p.OH, p.OW)


cdef void phase_split(const floating* x, const ConvGeom* p, floating* xq) noexcept nogil:
    """xq[(a*2 + b)*Hq*Wq + r*Wq + j] = the zero-padded plane at (2r + a, 2j + b), zeros in the slack after."""
    cdef Py_ssize_t Hq = dw_phase_h(p), Wq = dw_phase_w(p)
    cdef Py_ssize_t a, b, r, j, j0, j1, ih
    cdef floating* dst
    cdef const floating* src
    memset(xq, 0, dw_phased_len(p) * sizeof(floating))
    if CE_DW_SPLIT:
        # each input row split into its two column phases by vector permutes (depthwise.h); the rows of padding
        # stay zero
        for ih in range(p.H):
            a = (ih + p.pt) % 2
            r = (ih + p.pt) // 2
            dst = xq + (a * 2) * Hq * Wq + r * Wq
            if floating is float:
                ce_dw_split_row_f(x + ih * p.W, p.W, p.pl, Wq, dst, dst + Hq * Wq)
            else:
                ce_dw_split_row_d(x + ih * p.W, p.W, p.pl, Wq, dst, dst + Hq * Wq)
        return
    for a in range(2):
        for r in range(Hq):
            ih = 2 * r + a - p.pt
            if ih < 0 or ih >= p.H:
                continue
            for b in range(2):
                # columns j < Wq whose input column 2j + b - pl lies inside the image: [j0, j1) (a bound of its own
                # here, (W - 1 + pl - b) // 2 + 1, divided toward zero as C does, read past the plane for the odd
                # phase of a 1-pixel row without padding)
                j0, j1 = inside_columns(b - p.pl, 2, p.W, Wq)
                dst = xq + (a * 2 + b) * Hq * Wq + r * Wq
                src = x + ih * p.W + b - p.pl
                for j in range(j0, j1):
                    dst[j] = src[2 * j]


cdef void phased_rows(const floating* g, const ConvGeom* p, floating* gq) noexcept nogil:
    """gq (OH x Wq) = the plane's OH x OW output rows, zero columns after each."""
    cdef Py_ssize_t Wq = dw_phase_w(p), oh
    for oh in range(p.OH):
        memcpy(gq + oh * Wq, g + oh * p.OW, p.OW * sizeof(floating))
        memset(gq + oh * Wq + p.OW, 0, (Wq - p.OW) * sizeof(floating))


cdef void depthwise_plane_grad_input_phased(const floating* dy, const floating* w, floating* dxq, floating* dyq,
                                            floating* dx, const ConvGeom* p) noexcept nogil:
    """grad_input of a stride-2 plane (dw_phased): each tap adds w * dY, laid out at width Wq, to its phase of the
    padded input gradient in one sweep; then the phases are put back in place and cropped."""
    cdef Py_ssize_t Hq = dw_phase_h(p), Wq = dw_phase_w(p)
    cdef Py_ssize_t n = p.OH * Wq
    cdef Py_ssize_t kh, kw, t, ih, iw, r, b
    cdef floating wv
    cdef floating* dst
    cdef const floating* row
    memset(dxq, 0, dw_phased_len(p) * sizeof(floating))
    phased_rows(dy, p, dyq)
    for kh in range(p.KH):
        for kw in range(p.KW):
            wv = w[kh * p.KW + kw]
            dst = dxq + ((kh % 2) * 2 + kw % 2) * Hq * Wq + (kh // 2) * Wq + kw // 2
            for t in range(n):
                dst[t] += wv * dyq[t]
    for ih in range(p.H):
        r = ih + p.pt
        row = dxq + (((r % 2) * 2) * Hq + r // 2) * Wq
        if CE_DW_SPLIT:
            # the row's two column phases interleaved back by vector permutes (depthwise.h)
            if floating is float:
                ce_dw_merge_row_f(row, row + Hq * Wq, Wq, p.pl, p.W, dx + ih * p.W)
            else:
                ce_dw_merge_row_d(row, row + Hq * Wq, Wq, p.pl, p.W, dx + ih * p.W)
            continue
        for b in range(2):
            # the columns iw of parity b in the padded plane: (iw + pl) % 2 == b
            row = dxq + (((r % 2) * 2 + b) * Hq + r // 2) * Wq
            for iw in range((b + p.pl) % 2, p.W, 2):
                dx[ih * p.W + iw] = row[(iw + p.pl) // 2]


cdef inline void finish_in_place(floating* y, Py_ssize_t n, const Epilogue* e, Py_ssize_t k) noexcept nogil:
    """The epilogue's steps after the bias (which the plane's sums start from) over y[:n], channel k."""
    cdef floating sc, sh, v
    cdef Py_ssize_t t
    if e.relu:
        for t in range(n):
            v = y[t]
            y[t] = 0 if v <= 0 else v
    if e.scale != NULL:
        sc = (<const floating*>e.scale)[k]
        sh = (<const floating*>e.shift)[k]
        for t in range(n):
            y[t] = y[t] * sc + sh


cdef int depthwise_forward(const floating* x, const floating* w, const Epilogue* e, floating* y,
                           const ConvGeom* p, int n_threads) noexcept nogil:
    cdef fpstate fp, fps
    cdef Py_ssize_t HW = p.H * p.W, OHW = p.OH * p.OW, KHW = p.KH * p.KW
    cdef Py_ssize_t plen = dw_padded_h(p) * dw_padded_w(p)
    cdef Py_ssize_t task, c
    cdef const floating* bias = <const floating*>e.bias
    cdef floating* xpad
    cdef floating* ypad
    cdef Py_ssize_t* off
    cdef bint swept = (p.sh == 1 and p.sw == 1) or dw_phased(p)     # the epilogue is applied in the sweep
    cdef int failed = 0
    cdef int small = dw_small_kernel(p, <floating>0)
    if small != DW_GENERAL:
        # whole planes in registers, straight from x into y: no scratch
        fps = fp_suspend()
        with parallel(num_threads=n_threads):
            fp = fp_enter()
            for task in prange(p.B * p.C, schedule='static'):
                c = task % p.C
                dw_small_plane(small, x + task * HW, w + c * KHW, e, c, y + task * OHW, p)
            fp_leave(fp)
        fp_resume(fps)
        return 0
    off = <Py_ssize_t*>malloc(KHW * sizeof(Py_ssize_t))
    if off == NULL:
        return -1
    dw_tap_offsets(p, off)
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        # the sweeps run in whole vectors (a scalar tail of 8 outputs x 9 taps cost as much as 64 outputs in
        # vectors): the rounded-up outputs, never stored, read up to a vector past the plane, zeroed slack
        if dw_phased(p):
            xpad = <floating*>calloc(dw_phased_len(p) + vlen(<floating>0), sizeof(floating))
            ypad = <floating*>malloc((p.OH * dw_phase_w(p) + vlen(<floating>0)) * sizeof(floating))
        else:
            xpad = <floating*>calloc(plen + dw_slack(p) + vlen(<floating>0), sizeof(floating))
            ypad = <floating*>malloc((p.OH * dw_padded_w(p) + vlen(<floating>0)) * sizeof(floating))
        for task in prange(p.B * p.C, schedule='static'):
            if xpad == NULL or ypad == NULL:
                flag_failure(&failed)
                continue
            c = task % p.C
            if dw_phased(p):
                depthwise_plane_forward_phased(x + task * HW, w + c * KHW, bias[c] if bias != NULL else 0,
                                               y + task * OHW, xpad, ypad, p, off, e, c)
            else:
                pad_plane(x + task * HW, p, xpad, False)     # xpad: calloc'd, its border stays zero
                depthwise_plane_forward(xpad, w + c * KHW, bias[c] if bias != NULL else 0, y + task * OHW, ypad,
                                        p, off, e, c)
            if not swept and (e.relu or e.scale != NULL):
                finish_in_place(y + task * OHW, OHW, e, c)
        free(xpad)
        free(ypad)
        fp_leave(fp)
    fp_resume(fps)
    free(off)
    return -failed


cdef void depthwise_plane_grad_input(const floating* dy, const floating* w, floating* dxpad, floating* dyw,
                                     floating* dx, const ConvGeom* p) noexcept nogil:
    """dx = the plane's input gradient: each tap scatters w * dY into a padded buffer, then the crop."""
    cdef Py_ssize_t Hp = dw_padded_h(p), Wp = dw_padded_w(p)
    cdef Py_ssize_t oh, ow, kh, kw, ih, t, n
    cdef floating wv
    cdef floating* dst
    cdef const floating* src
    memset(dxpad, 0, (Hp * Wp + dw_slack(p)) * sizeof(floating))
    if p.sh == 1 and p.sw == 1:
        # stride 1: dY laid out at padded width with zero columns, then one long loop per tap
        n = p.OH * Wp
        for oh in range(p.OH):
            memcpy(dyw + oh * Wp, dy + oh * p.OW, p.OW * sizeof(floating))
            memset(dyw + oh * Wp + p.OW, 0, (Wp - p.OW) * sizeof(floating))
        for kh in range(p.KH):
            for kw in range(p.KW):
                wv = w[kh * p.KW + kw]
                dst = dxpad + kh * p.dh * Wp + kw * p.dw
                for t in range(n):
                    dst[t] += wv * dyw[t]
        for ih in range(p.H):
            memcpy(dx + ih * p.W, dxpad + (ih + p.pt) * Wp + p.pl, p.W * sizeof(floating))
        return
    for oh in range(p.OH):
        src = dy + oh * p.OW
        for kh in range(p.KH):
            for kw in range(p.KW):
                wv = w[kh * p.KW + kw]
                dst = dxpad + (oh * p.sh + kh * p.dh) * Wp + kw * p.dw
                if p.sw == 1:
                    for ow in range(p.OW):
                        dst[ow] += wv * src[ow]
                else:
                    for ow in range(p.OW):
                        dst[ow * p.sw] += wv * src[ow]
    for ih in range(p.H):
        memcpy(dx + ih * p.W, dxpad + (ih + p.pt) * Wp + p.pl, p.W * sizeof(floating))


cdef int depthwise_grad_input(const floating* dy, const floating* w, floating* dx, const ConvGeom* p,
                              int n_threads) noexcept nogil:
    """dx = the input gradient. At stride 1, where the padding is within the kernel's reach, the forward of the
    transposed geometry with each channel's taps reversed (conv2d_grad_input_direct, whose forward is this file's
    register sweeps); otherwise plane by plane, each tap scattering w * dY into a padded buffer."""
    cdef fpstate fp, fps
    cdef ConvGeom q
    if transposed_geometry(p, &q) and is_depthwise(&q):
        return conv2d_grad_input_direct(dy, w, dx, &q, n_threads)
    cdef Py_ssize_t HW = p.H * p.W, OHW = p.OH * p.OW, KHW = p.KH * p.KW
    cdef Py_ssize_t plen = dw_padded_h(p) * dw_padded_w(p)
    cdef Py_ssize_t task
    if floating is float:
        if dw_small_kernel(p, <floating>0) == DW_3X3S2_W16:
            # whole planes in registers, straight from dY into dx, the phased path's bits (depthwise.h)
            fps = fp_suspend()
            with parallel(num_threads=n_threads):
                fp = fp_enter()
                for task in prange(p.B * p.C, schedule='static'):
                    ce_dw3x3p1s2_w16_gi_f(dy + task * OHW, p.H, p.OH, w + (task % p.C) * KHW, dx + task * HW)
                fp_leave(fp)
            fp_resume(fps)
            return 0
    cdef floating* buf
    cdef floating* dyw
    cdef int failed = 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        buf = <floating*>malloc(max(plen + dw_slack(p), dw_phased_len(p)) * sizeof(floating))
        dyw = <floating*>malloc(p.OH * dw_padded_w(p) * sizeof(floating))
        for task in prange(p.B * p.C, schedule='static'):
            if buf == NULL or dyw == NULL:
                flag_failure(&failed)
                continue
            if dw_phased(p):
                depthwise_plane_grad_input_phased(dy + task * OHW, w + (task % p.C) * KHW, buf, dyw,
                                                  dx + task * HW, p)
            else:
                depthwise_plane_grad_input(dy + task * OHW, w + (task % p.C) * KHW, buf, dyw, dx + task * HW, p)
        free(buf)
        free(dyw)
        fp_leave(fp)
    fp_resume(fps)
    return -failed


cdef void plane_grad_weight(const floating* g, const floating* xpad, floating* dw, const ConvGeom* p) noexcept nogil:
    """dw[kh, kw] += sum over the output pixels of one plane of dY * the tap's input (xpad: the padded plane), per
    tap in 16 interleaved lanes along output rows, then the lanes in order."""
    cdef Py_ssize_t Wp = dw_padded_w(p)
    cdef Py_ssize_t kh, kw, oh, ow, j, n16
    cdef floating lanes[16]
    cdef floating acc
    cdef const floating* src
    n16 = p.OW // 16 * 16
    for kh in range(p.KH):
        for kw in range(p.KW):
            for j in range(16):
                lanes[j] = 0
            for oh in range(p.OH):
                src = xpad + (oh * p.sh + kh * p.dh) * Wp + kw * p.dw
                if p.sw == 1:
                    for ow in range(0, n16, 16):
                        for j in range(16):
                            lanes[j] += g[oh * p.OW + ow + j] * src[ow + j]
                else:
                    for ow in range(0, n16, 16):
                        for j in range(16):
                            lanes[j] += g[oh * p.OW + ow + j] * src[(ow + j) * p.sw]
                for ow in range(n16, p.OW):
                    lanes[ow - n16] += g[oh * p.OW + ow] * src[ow * p.sw]
            acc = 0
            for j in range(16):
                acc += lanes[j]
            dw[kh * p.KW + kw] += acc


cdef void depthwise_channel_grad_weight(const floating* dy, const floating* x, Py_ssize_t c, floating* xpad,
                                        floating* dyw, floating* dw, const ConvGeom* p, const Py_ssize_t* off,
                                        floating* lanes) noexcept nogil:
    """dw[kh, kw] = sum over images and output pixels of dY * the tap's input, for channel c, image by image.
    Stride 1 with a finite plane (the usual case): dY laid out at padded width with zero columns, each tap one
    long dot product with the padded plane, into 16 lanes per tap that run over all the images and are added up
    once at the end (stride 2: the same with the plane's phases). Otherwise, and for a plane holding inf or NaN
    (whose products with those zero columns would not be zero), plane_grad_weight adds into dw directly."""
    cdef Py_ssize_t Wp = dw_padded_w(p)
    cdef Py_ssize_t n = p.OH * Wp
    cdef Py_ssize_t b, kh, kw, oh
    cdef const floating* g
    cdef const floating* xb
    for kh in range(p.KH * p.KW):
        dw[kh] = 0
    for kh in range(16 * p.KH * p.KW):
        lanes[kh] = 0
    for b in range(p.B):
        xb = x + (b * p.C + c) * p.H * p.W
        g = dy + (b * p.C + c) * p.OH * p.OW
        if dw_phased(p) and all_finite(xb, p.H * p.W):
            # stride 2: each tap one long dot product of dY (at width Wq, zero columns) with its phase
            phase_split(xb, p, xpad)
            phased_rows(g, p, dyw)
            tap_dots(dyw, xpad, p.OH * dw_phase_w(p), off, p.KH * p.KW, lanes)
            continue
        pad_plane(xb, p, xpad)
        if p.sh != 1 or p.sw != 1 or not all_finite(xb, p.H * p.W):
            plane_grad_weight(g, xpad, dw, p)
            continue
        for oh in range(p.OH):
            memcpy(dyw + oh * Wp, g + oh * p.OW, p.OW * sizeof(floating))
            memset(dyw + oh * Wp + p.OW, 0, (Wp - p.OW) * sizeof(floating))
        tap_dots(dyw, xpad, n, off, p.KH * p.KW, lanes)
    lanes_total(lanes, p.KH * p.KW, dw)


cdef int depthwise_grad_weight(const floating* dy, const floating* x, floating* dw, floating* db,
                               const ConvGeom* p, int n_threads) noexcept nogil:
    cdef fpstate fp, fps
    cdef Py_ssize_t plen = dw_padded_h(p) * dw_padded_w(p)
    cdef Py_ssize_t c
    cdef floating* xpad
    cdef floating* dyw
    cdef floating* lanes
    cdef Py_ssize_t* off
    cdef int failed = 0
    cdef int small = dw_small_kernel(p, <floating>0)
    if small != DW_GENERAL:
        # a channel's planes in registers, its sum in one fixed order whatever the threads (depthwise.h)
        fps = fp_suspend()
        with parallel(num_threads=n_threads):
            fp = fp_enter()
            for c in prange(p.C, schedule='static'):
                dw_small_grad_weight(small, dy + c * p.OH * p.OW, x + c * p.H * p.W, dw + c * 9,
                                     db + c if db != NULL else NULL, p)
            fp_leave(fp)
        fp_resume(fps)
        return 0
    off = <Py_ssize_t*>malloc(p.KH * p.KW * sizeof(Py_ssize_t))
    if off == NULL:
        return -1
    dw_tap_offsets(p, off)
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        xpad = <floating*>calloc(max(plen + dw_slack(p), dw_phased_len(p)), sizeof(floating))
        dyw = <floating*>malloc(p.OH * dw_padded_w(p) * sizeof(floating))
        lanes = <floating*>malloc(16 * p.KH * p.KW * sizeof(floating))
        for c in prange(p.C, schedule='static'):
            if xpad == NULL or dyw == NULL or lanes == NULL:
                flag_failure(&failed)
                continue
            depthwise_channel_grad_weight(dy, x, c, xpad, dyw, dw + c * p.KH * p.KW, p, off, lanes)
        free(xpad)
        free(dyw)
        free(lanes)
        fp_leave(fp)
    fp_resume(fps)
    free(off)
    if failed == 0 and db != NULL:
        grad_bias(dy, p, db, n_threads)
    return -failed
