# What conv2d's directions share: the geometry struct, the implicit im2col, weight packing, and the zero-padded
# input rows that the direct and pixel paths read (conv_plan.pxi says how the paths are chosen).


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


cdef inline Py_ssize_t packed_weights_len(const ConvGeom* p) noexcept nogil:
    """Elements of pack_weights' result."""
    return p.G * round_up(p.K // p.G, CE_MR) * (p.C // p.G) * p.KH * p.KW


cdef void pack_weights_into(const floating* w, const ConvGeom* p, Py_ssize_t KC, floating* out) noexcept nogil:
    """Pack W[g] (Kg x Kd, all groups) into MR-row panels, in k-blocks of KC: block (g, k0) at g*Mpad*Kd + k0*Mpad."""
    cdef Py_ssize_t Kg = p.K // p.G
    cdef Py_ssize_t Kd = (p.C // p.G) * p.KH * p.KW
    cdef Py_ssize_t Mpad = round_up(Kg, CE_MR)
    cdef Py_ssize_t g, k0, kc
    for g in range(p.G):
        k0 = 0
        while k0 < Kd:
            kc = min(KC, Kd - k0)
            pack_a_strided(w + g * Kg * Kd + k0, Kd, 1, Kg, kc, out + g * Mpad * Kd + k0 * Mpad)
            k0 += kc


cdef int pack_weights(const floating* w, const ConvGeom* p, Py_ssize_t KC, floating** out) noexcept nogil:
    """pack_weights_into a new buffer (out[0], the caller frees it); -1 when it cannot be allocated."""
    out[0] = <floating*>malloc(packed_weights_len(p) * sizeof(floating))
    if out[0] == NULL:
        return -1
    pack_weights_into(w, p, KC, out[0])
    return 0


cdef inline Py_ssize_t padded_width(const ConvGeom* p) noexcept nogil:
    """Width of the zero-padded rows the direct path reads: every tap of every output column lies inside."""
    return (p.OW - 1) + (p.KW - 1) * p.dw + 1


cdef inline Py_ssize_t direct_rows(const ConvGeom* p, Py_ssize_t NC) noexcept nogil:
    """Output rows per block of the direct path: about NC columns of padded width, balanced over OH."""
    return balanced_block(p.OH, max(1, min(p.OH, NC // padded_width(p))))


cdef inline (Py_ssize_t, Py_ssize_t) inside_columns(Py_ssize_t off, Py_ssize_t step, Py_ssize_t W,
                                                   Py_ssize_t n) noexcept nogil:
    """(lo, hi): the columns t < n whose input column t*step + off lies in [0, W) are lo <= t < hi."""
    cdef Py_ssize_t lo = min(n, 0 if off >= 0 else (-off + step - 1) // step)
    return lo, max(lo, min(n, 0 if off >= W else (W - off + step - 1) // step))


cdef inline void copy_plane_rows(const float* xc, const ConvGeom* p, Py_ssize_t ih0, Py_ssize_t nrows, float* dst,
                                 Py_ssize_t ld, Py_ssize_t n, Py_ssize_t shift) noexcept nogil:
    """dst[ri*ld + t] = xc[(ih0 + ri)*W + t - shift] where that lies in the image (xc: one input plane), zero for
    the other t < n and for rows outside: a run of rows in one ce_copy_rows."""
    copy_plane_rows_step(xc, p, ih0, nrows, 1, dst, ld, n, -shift, 1)


cdef inline void copy_plane_rows_step(const float* xc, const ConvGeom* p, Py_ssize_t ih0, Py_ssize_t nrows,
                                      Py_ssize_t row_step, float* dst, Py_ssize_t ld, Py_ssize_t n, Py_ssize_t off,
                                      Py_ssize_t col_step) noexcept nogil:
    """copy_plane_rows reading every row_step-th input row and col_step-th column (1 or 2): dst[ri*ld + t] =
    xc[(ih0 + ri*row_step)*W + t*col_step + off] where that lies in the image (inside_columns), zero elsewhere."""
    # rows ri < r0 lie above the image, rows ri >= r1 below it
    cdef Py_ssize_t r0 = min(nrows, 0 if ih0 >= 0 else (-ih0 + row_step - 1) // row_step)
    cdef Py_ssize_t r1 = max(r0, min(nrows, 0 if ih0 >= p.H else (p.H - ih0 + row_step - 1) // row_step))
    cdef Py_ssize_t lo, hi
    cdef const float* src
    lo, hi = inside_columns(off, col_step, p.W, n)
    ce_copy_rows(dst, ld, dst, 0, r0, n, 0, 0)
    if r1 > r0:
        src = xc + (ih0 + r0 * row_step) * p.W + off
        if col_step == 1:
            ce_copy_rows(dst + r0 * ld, ld, src, row_step * p.W, r1 - r0, n, lo, hi)
        else:
            ce_copy_rows_s2(dst + r0 * ld, ld, src, row_step * p.W, r1 - r0, n, lo, hi)
    ce_copy_rows(dst + r1 * ld, ld, dst, 0, nrows - r1, n, 0, 0)


cdef inline void prefetch_plane_rows(const floating* xc, const ConvGeom* p, Py_ssize_t ih0,
                                     Py_ssize_t nrows) noexcept nogil:
    """Prefetch into L1 rows ih0 <= ih < ih0 + nrows of input plane xc, those inside the image: the next channel's
    rows, while this one's are copied (the copies' first loads of each row otherwise waited on L2: perf put 17% of
    a stride-2 forward on one masked load of ce_copy_rows_s2). prefetch_block_rows brings a whole unit into L2, more
    than L1 holds; this is the short distance. AMD EPYC Zen 5, batch 64, GFLOP/s without / with, interleaved in one
    process, 1 thread: forward 64x32x32x32 -> 64 3x3 s2 141 / 170, 64x64x32x32 -> 128 s2 171 / 193, 32x64x56x56 ->
    64 178 / 192, 64x128x8x8 -> 128 176 / 188, 64x64x32x32 -> 64 184 / 195, 64x32x16x16 -> 64 192 / 200; backward
    (both gradients) 163-190 / 178-195, the stride-2 shapes even (145-172 / 149-170); 2 threads: forward 327 / 361
    at 56x56, 306 / 333 at 64x32x32 s2, 351 / 365 at 128x8x8, backward 345 / 370 at 56x56, the others within 3%."""
    cdef Py_ssize_t lo = max(0, ih0), hi = min(p.H, ih0 + nrows), off
    cdef Py_ssize_t line = 64 // sizeof(floating)
    off = lo * p.W
    while off < hi * p.W:
        ce_prefetch(xc + off)
        off = off + line


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
        if floating is float:
            if c + 1 < Cg:
                prefetch_plane_rows(x + (b * p.C + g * Cg + c + 1) * p.H * p.W, p, oh0 - p.pt, nrows_in)
            copy_plane_rows(x + (b * p.C + g * Cg + c) * p.H * p.W, p, oh0 - p.pt, nrows_in, xblk + c * rows_in * Wp,
                            Wp, Wp, p.pl)
        else:
            for ri in range(nrows_in):
                dst = xblk + (c * rows_in + ri) * Wp
                ih = oh0 + ri - p.pt
                if ih < 0 or ih >= p.H:
                    memset(dst, 0, Wp * sizeof(floating))
                else:
                    memset(dst, 0, p.pl * sizeof(floating))
                    memcpy(dst + p.pl, x + ((b * p.C + g * Cg + c) * p.H + ih) * p.W, iw_n * sizeof(floating))
                    memset(dst + p.pl + iw_n, 0, (Wp - p.pl - iw_n) * sizeof(floating))


cdef void fill_shifted_rows(const float* x, const ConvGeom* p, Py_ssize_t b, Py_ssize_t g, Py_ssize_t oh0,
                            Py_ssize_t nrows_in, Py_ssize_t rows_in, float* xblk) noexcept nogil:
    """xblk[(((c*KW + kw)*A + a)*rows_in + ri)*OW + ow] = x[b, g*Cg + c, (oh0 + ri)*sh + a - pt, ow*sw - pl +
    kw*dw], zero outside the image (A = rows_phases: 1 at stride 1): for each kw (and row phase a) the input rows
    shifted by that tap's column, OW wide, so that tap (c, kh, kw) of output pixels q, q+1, ... of a row block is
    one run, across rows. ri < nrows_in of rows_in rows are filled.
    Tried and dropped: the three copies of a 3x3 stride-2 kernel in one pass over each row (taps 0 and 2 read the
    same even columns one output apart, tap 1 the odd ones: three masked loads, two permutes and an align per 16
    outputs, not six loads and three permutes), writing three rows at once. AMD EPYC Zen 4, batch 64, 1 thread,
    processes alternating, ms old / one pass: 64x32x32x32 -> 64 s2 7.09-7.50 / 7.51-7.85, 64x64x32x32 -> 128 s2
    24.8-25.4 / 25.1-26.1. The copies' time is their rows' first loads (perf), which one pass does not save."""
    cdef Py_ssize_t Cg = p.C // p.G
    cdef Py_ssize_t A = rows_phases(p)
    cdef Py_ssize_t c, kw, a
    cdef const float* xc
    for c in range(Cg):
        xc = x + (b * p.C + g * Cg + c) * p.H * p.W
        if c + 1 < Cg:
            prefetch_plane_rows(xc + p.H * p.W, p, oh0 * p.sh - p.pt, (nrows_in - 1) * p.sh + A)
        for kw in range(p.KW):
            # output column ow reads input column ow*sw + kw*dw - pl (use_direct_rows takes strides 1 and 2 only)
            for a in range(A):
                copy_plane_rows_step(xc, p, oh0 * p.sh + a - p.pt, nrows_in, p.sh,
                                     xblk + ((c * p.KW + kw) * A + a) * rows_in * p.OW, p.OW, p.OW,
                                     kw * p.dw - p.pl, p.sw)


cdef inline void tap_rows(const ConvGeom* p, const floating* xblk, Py_ssize_t rows_in,
                          const floating** table) noexcept nogil:
    """table[r] = start of tap r = (c, kh, kw) in a padded row block: xblk + (c*rows_in + kh*dh)*Wp + kw*dw."""
    cdef Py_ssize_t Wp = padded_width(p)
    cdef Py_ssize_t r = 0, c, kh, kw
    # nested loops, not r // (KH*KW) etc.: four 64-bit divisions per tap were 5-10% of a batch-1 3x3 conv
    for c in range(p.C // p.G):
        for kh in range(p.KH):
            for kw in range(p.KW):
                table[r] = xblk + (c * rows_in + kh * p.dh) * Wp + kw * p.dw
                r = r + 1


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


cdef inline (Py_ssize_t, Py_ssize_t) inside_taps(Py_ssize_t o, Py_ssize_t s, Py_ssize_t pad, Py_ssize_t d,
                                                 Py_ssize_t KS, Py_ssize_t N) noexcept nogil:
    """(lo, hi): the taps k < KS of output row (or column) o that read inside the image, o*s - pad + k*d in
    [0, N); lo == hi where none does."""
    cdef Py_ssize_t i0 = o * s - pad
    cdef Py_ssize_t lo = 0, hi = KS
    if i0 < 0:
        lo = min(KS, (d - 1 - i0) // d)
    if i0 + (KS - 1) * d >= N:
        hi = (N - 1 - i0) // d + 1 if i0 <= N - 1 else 0
    return lo, max(lo, hi)


cdef inline Py_ssize_t window_width(const ConvGeom* p) noexcept nogil:
    """Columns of zero-padded input that the windows of all OW output columns span, for any stride."""
    return (p.OW - 1) * p.sw + (p.KW - 1) * p.dw + 1


cdef inline Py_ssize_t window_rows(const ConvGeom* p, Py_ssize_t nrows) noexcept nogil:
    """Input rows that the windows of nrows consecutive output rows span."""
    return (nrows - 1) * p.sh + (p.KH - 1) * p.dh + 1


cdef inline Py_ssize_t pixel_rows(const ConvGeom* p, Py_ssize_t pixels) noexcept nogil:
    """Output rows per unit of the pixel path: whole images when they are small, else about `pixels` pixels' worth
    of rows (balanced over OH; PIXELS_PER_TASK forward, GRAD_WEIGHT_PIXELS in grad_weight)."""
    return balanced_block(p.OH, max(1, min(p.OH, pixels // p.OW)))


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
        if floating is float:
            if c + 1 < Cg:
                prefetch_plane_rows(x + (b * p.C + g * Cg + c + 1) * p.H * p.W, p, ih0, nrows)
            copy_plane_rows(x + (b * p.C + g * Cg + c) * p.H * p.W, p, ih0, nrows, xblk + c * ld_c, Wpad, Wpad,
                            p.pl)
        else:
            for ri in range(nrows):
                dst = xblk + c * ld_c + ri * Wpad
                ih = ih0 + ri
                if ih < 0 or ih >= p.H:
                    memset(dst, 0, Wpad * sizeof(floating))
                else:
                    memset(dst, 0, lo * sizeof(floating))
                    memcpy(dst + lo, x + ((b * p.C + g * Cg + c) * p.H + ih) * p.W, n * sizeof(floating))
                    memset(dst + lo + n, 0, (Wpad - lo - n) * sizeof(floating))


cdef inline Py_ssize_t pow2_floor(Py_ssize_t n) noexcept nogil:
    """The largest power of two <= n (1 for n < 1): chunk counts that 2, 4, 8 or 16 threads share evenly (7
    chunks on 2 threads left one idle an eighth of the time)."""
    cdef Py_ssize_t m = 1
    while 2 * m <= n:
        m *= 2
    return m


cdef inline void fill_geom(ConvGeom* p, tuple shape_x, Py_ssize_t K, Py_ssize_t KH, Py_ssize_t KW, tuple params):
    p.B, p.C, p.H, p.W = shape_x
    p.K = K
    p.KH = KH
    p.KW = KW
    p.sh, p.sw, p.pt, p.pl, p.dh, p.dw, p.G, p.OH, p.OW = params


cdef void prefetch_block_rows(const floating* x, const ConvGeom* p,
                              (Py_ssize_t, Py_ssize_t, Py_ssize_t) unit) noexcept nogil:
    """Prefetch into L2 the input rows that a unit (rows_unit: group g's output rows r0 <= r < r1 of the batch,
    row b*OH + oh) will copy: the next unit's, while this one computes (its copy otherwise stalls on memory).
    AMD EPYC Zen 4, batch 64, alternating old/new, ms: the row-vector direct forward at 1 thread, 64x32x32x32 ->
    64 3x3 s2 7.11-7.25 -> 6.73-7.09, 64x64x32x32 -> 64 3x3 46.7-47.1 -> 46.4-46.6 (a frozen VGG-style net at 2
    threads, its slices already in cache, unchanged); grad_weight's pixel path, 64x32x32x32 -> 64 3x3 s2, 1
    thread 6.89-6.98 -> 6.83-6.86, 2 threads 3.53-3.56 -> 3.48."""
    cdef Py_ssize_t Cg = p.C // p.G
    cdef Py_ssize_t g = unit[0], r0 = unit[1], r1 = unit[2]
    cdef Py_ssize_t b = r0 // p.OH, lo, hi, c, off, n
    cdef const floating* src
    cdef Py_ssize_t line = 64 // sizeof(floating)
    while b * p.OH < r1:
        lo = max(0, (max(r0, b * p.OH) - b * p.OH) * p.sh - p.pt)
        hi = min(p.H, (min(r1 - b * p.OH, p.OH) - 1) * p.sh - p.pt + (p.KH - 1) * p.dh + 1)
        if hi > lo:
            n = (hi - lo) * p.W
            for c in range(Cg):
                src = x + ((b * p.C + g * Cg + c) * p.H + lo) * p.W
                off = 0
                while off < n:
                    ce_prefetch_l2(src + off)
                    off = off + line
        b = b + 1
