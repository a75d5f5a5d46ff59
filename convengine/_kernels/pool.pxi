# max_pool2d and avg_pool2d, forward and backward. Work splits over (image, channel) planes; a backward scatter
# stays inside its plane, so every gradient element is summed in one fixed order whatever the thread count.
#
# Windows follow PyTorch: start = o*stride - pad, clipped to the image; with ceil_mode the last window may hang
# over the bottom/right edge. max: ties go to the first maximum in window order, a NaN wins over any number and
# a later NaN over an earlier one (PyTorch's `val > max || isnan(val)`). avg: divisor is the window clipped to the
# padded input (count_include_pad) or the number of real pixels.

from libc.math cimport INFINITY

cdef extern from "pool.h":
    enum: CE_POOL_SHORT
    enum: CE_POOL_EXPAND
    void ce_max_pool_2x2_short_f(const float* x, float* y, long long* idx, Py_ssize_t r0, Py_ssize_t r1,
                                 Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t W) nogil
    void ce_max_pool_2x2_short_d(const double* x, double* y, long long* idx, Py_ssize_t r0, Py_ssize_t r1,
                                 Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t W) nogil
    Py_ssize_t ce_pool2x2_expand_f(const float* dy, const long long* idx, Py_ssize_t OH, Py_ssize_t OW,
                                   Py_ssize_t W, const float* keep, float* dst) nogil
    Py_ssize_t ce_pool2x2_expand_d(const double* dy, const long long* idx, Py_ssize_t OH, Py_ssize_t OW,
                                   Py_ssize_t W, const double* keep, double* dst) nogil


cdef struct PoolGeom:
    Py_ssize_t planes, H, W, KH, KW, sh, sw, ph, pw, OH, OW


cdef inline void fill_pool_geom(PoolGeom* g, Py_ssize_t planes, Py_ssize_t H, Py_ssize_t W, tuple params):
    g.planes = planes
    g.H = H
    g.W = W
    g.KH, g.KW, g.sh, g.sw, g.ph, g.pw, g.OH, g.OW = params


cdef extern from *:
    """
    /* A conditional expression gcc keeps as a select (a vector blend once the loop is vectorised); Cython writes
       `a if c else b` as an if statement, which stayed a mispredicted branch. */
    #define CE_PICK(c, a, b) ((c) ? (a) : (b))
    /* a when x == y, else b, by integer masking: as a conditional expression on a float comparison gcc emitted
       jumps (for the unordered case), mispredicted on every other window of real data. */
    static inline long long ce_pick_eq_f(float x, float y, long long a, long long b) {
        long long take = -(long long)(x == y);
        return b ^ ((a ^ b) & take);
    }
    static inline long long ce_pick_eq_d(double x, double y, long long a, long long b) {
        long long take = -(long long)(x == y);
        return b ^ ((a ^ b) & take);
    }
    /* a > b ? a : b as one instruction: x86's maxss/maxsd has exactly these semantics (b when either is NaN, b
       on equal values), which gcc will not emit for the C expression while NaNs are honoured. */
    #if defined(__SSE2__)
    #include <emmintrin.h>
    static inline float ce_gtmax_f(float a, float b) { return _mm_cvtss_f32(_mm_max_ss(_mm_set_ss(a), _mm_set_ss(b))); }
    static inline double ce_gtmax_d(double a, double b) { return _mm_cvtsd_f64(_mm_max_sd(_mm_set_sd(a), _mm_set_sd(b))); }
    #else
    static inline float ce_gtmax_f(float a, float b) { return a > b ? a : b; }
    static inline double ce_gtmax_d(double a, double b) { return a > b ? a : b; }
    #endif
    """
    float pick_f "CE_PICK"(bint c, float a, float b) nogil
    double pick_d "CE_PICK"(bint c, double a, double b) nogil
    long long pick_i "CE_PICK"(bint c, long long a, long long b) nogil
    long long pick_eq_f "ce_pick_eq_f"(float x, float y, long long a, long long b) nogil
    long long pick_eq_d "ce_pick_eq_d"(double x, double y, long long a, long long b) nogil
    float gtmax_f "ce_gtmax_f"(float a, float b) nogil
    double gtmax_d "ce_gtmax_d"(double a, double b) nogil


cdef inline floating gtmax(floating a, floating b) noexcept nogil:
    """a > b ? a : b without a branch."""
    if floating is float:
        return gtmax_f(a, b)
    else:
        return gtmax_d(a, b)


cdef inline long long pick_eq(floating x, floating y, long long a, long long b) noexcept nogil:
    """a when x == y, else b, without a branch."""
    if floating is float:
        return pick_eq_f(x, y, a, b)
    else:
        return pick_eq_d(x, y, a, b)


cdef inline floating pick(bint c, floating a, floating b) noexcept nogil:
    if floating is float:
        return pick_f(c, a, b)
    else:
        return pick_d(c, a, b)


cdef void max_pool_plane(const floating* x, floating* y, long long* idx, const PoolGeom* g) noexcept nogil:
    # The window's maximum by branch-free max instructions, then its first position in window order by integer
    # selects: "is this the new max" is a coin toss on real data, and as branches it made pooling 5x slower. A
    # window holding a NaN (rare) takes the exact rule: a NaN wins, a later NaN over an earlier one.
    cdef Py_ssize_t oh, ow, ih, iw, h0, h1, w0, w1, best
    cdef floating m, v
    cdef bint nan, take
    for oh in range(g.OH):
        h0 = oh * g.sh - g.ph
        h1 = min(h0 + g.KH, g.H)
        h0 = max(h0, 0)
        for ow in range(g.OW):
            w0 = ow * g.sw - g.pw
            w1 = min(w0 + g.KW, g.W)
            w0 = max(w0, 0)
            m = -INFINITY
            nan = False
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    v = x[ih * g.W + iw]
                    m = gtmax(v, m)
                    nan = nan | (v != v)
            best = h0 * g.W + w0
            if not nan:
                # first position holding m, scanning backwards so the earliest match is the last written
                for ih in range(h1 - 1, h0 - 1, -1):
                    for iw in range(w1 - 1, w0 - 1, -1):
                        best = pick_eq(x[ih * g.W + iw], m, ih * g.W + iw, best)
            else:
                m = -INFINITY
                for ih in range(h0, h1):
                    for iw in range(w0, w1):
                        v = x[ih * g.W + iw]
                        take = (v > m) | (v != v)
                        m = pick(take, v, m)
                        best = pick_i(take, ih * g.W + iw, best)
            y[oh * g.OW + ow] = m
            if idx != NULL:
                idx[oh * g.OW + ow] = best


cdef void max_pool_rows_2x2_short(const floating* x, floating* y, long long* idx, Py_ssize_t r0, Py_ssize_t r1,
                                  Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t W) noexcept nogil:
    """max_pool_rows_2x2 for rows shorter than a vector, where the vectorised loop's set-up costs more than the
    row: scalar max instructions, integer-masked selects for the index, and the exact rule only for a window
    holding a NaN (a well-predicted branch). The AVX-512 build puts several such rows in a vector instead
    (pool.h)."""
    cdef Py_ssize_t r, ow, base
    cdef const floating* t
    cdef const floating* u
    cdef floating a, b, c, d, m
    cdef long long best
    cdef bint take
    for r in range(r0, r1):
        t = x + 2 * r * W
        u = t + W
        base = 2 * (r % OH) * W
        for ow in range(OW):
            a = t[2 * ow]
            b = t[2 * ow + 1]
            c = u[2 * ow]
            d = u[2 * ow + 1]
            m = gtmax(d, gtmax(c, gtmax(b, a)))
            if (a != a) | (b != b) | (c != c) | (d != d):
                take = (b > a) | (b != b)
                m = pick(take, b, a)
                best = pick_i(take, 1, 0)
                take = (c > m) | (c != c)
                m = pick(take, c, m)
                best = pick_i(take, W, best)
                take = (d > m) | (d != d)
                m = pick(take, d, m)
                best = pick_i(take, W + 1, best)
            else:
                best = pick_eq(c, m, W, W + 1)
                best = pick_eq(b, m, 1, best)
                best = pick_eq(a, m, 0, best)
                # the value where the index points: of a -0.0 and a 0.0 tied for the maximum, m may hold either
                # (gcc 12 swaps the operands of the maxss in gtmax, and maxss returns its second on equal values),
                # and the rule wants the first in window order (-0.0 from [-0.0, 0.0, 0.0, -0.0] came out 0.0)
                m = t[2 * ow + best]
            y[r * OW + ow] = m
            if idx != NULL:
                idx[r * OW + ow] = base + 2 * ow + best


cdef void max_pool_rows_2x2(const floating* x, floating* y, long long* idx, Py_ssize_t r0, Py_ssize_t r1,
                            Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t W) noexcept nogil:
    """2x2 stride-2 unpadded windows that lie inside the image, when the planes' rows pair up exactly (H even):
    the batch is then one tall image of B*C*OH output rows, done here from row r0 to r1 (a 4x4 plane alone is
    two rows of two windows: per-plane set-up cost more than the pooling). Index of a window of output row r:
    within its plane, whose output rows are OH to a plane. Each window by selects in window order (the rule of
    the header), which gcc vectorises along the row."""
    cdef Py_ssize_t r, ow, base
    cdef const floating* t
    cdef const floating* u
    cdef floating* yr
    cdef long long* ir
    cdef floating a, b, c, d, m
    cdef long long best
    cdef bint take
    for r in range(r0, r1):
        t = x + 2 * r * W
        u = t + W
        yr = y + r * OW
        base = 2 * (r % OH) * W
        ir = idx + r * OW if idx != NULL else NULL
        for ow in range(OW):
            a = t[2 * ow]
            b = t[2 * ow + 1]
            c = u[2 * ow]
            d = u[2 * ow + 1]
            m = a
            best = 0
            take = (b > m) | (b != b)
            m = pick(take, b, m)
            best = pick_i(take, 1, best)
            take = (c > m) | (c != c)
            m = pick(take, c, m)
            best = pick_i(take, W, best)
            take = (d > m) | (d != d)
            m = pick(take, d, m)
            best = pick_i(take, W + 1, best)
            yr[ow] = m
            if ir != NULL:
                ir[ow] = base + 2 * ow + best


cdef inline void max_pool_2x2_rows(const floating* xbase, floating* ybase, long long* idx, Py_ssize_t r0,
                                   Py_ssize_t r1, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t W) noexcept nogil:
    """Output rows r0..r1 of 2x2 stride-2 windows over planes of 2*OH rows taken as one tall image
    (max_pool_rows_2x2's conditions), by the version that suits the row's width."""
    if OW >= vlen(<floating>0):
        max_pool_rows_2x2(xbase, ybase, idx, r0, r1, OH, OW, W)
    elif CE_POOL_SHORT:
        # several rows per vector (pool.h): 8-window rows 7x to 11x faster than the scalar loop
        if floating is float:
            ce_max_pool_2x2_short_f(xbase, ybase, idx, r0, r1, OH, OW, W)
        else:
            ce_max_pool_2x2_short_d(xbase, ybase, idx, r0, r1, OH, OW, W)
    else:
        max_pool_rows_2x2_short(xbase, ybase, idx, r0, r1, OH, OW, W)


cdef inline Py_ssize_t pool_row_width(const PoolGeom* g) noexcept nogil:
    """Width of the -inf padded input row that every window of an output row reads."""
    return (g.OW - 1) * g.sw + g.KW


cdef inline void max_tap(const floating* src, Py_ssize_t sw, Py_ssize_t base, Py_ssize_t OW,
                         const floating* m_in, const long long* best_in, floating* m, long long* best) noexcept nogil:
    """One tap over a row of windows: window ow takes src[ow*sw] (at flat index base + ow*sw) when it is greater
    than m_in[ow] or NaN; results to m, best. Inlined with sw a constant (1, 2), gcc vectorises the strided loads.
    In and out are separate arrays: updating in place, gcc made masked stores, which the next tap's loads cannot
    forward from (4x slower than scalar code)."""
    cdef Py_ssize_t ow
    cdef floating v
    cdef bint take
    for ow in range(OW):
        v = src[ow * sw]
        # greater, or NaN (a NaN maximum then yields only to a later NaN)
        take = (v > m_in[ow]) | (v != v)
        m[ow] = pick(take, v, m_in[ow])
        best[ow] = pick_i(take, base + ow * sw, best_in[ow])


cdef void max_pool_plane_rows(const floating* x, floating* y, long long* idx, const PoolGeom* g,
                              floating* row, floating* m, long long* best) noexcept nogil:
    """Max pooling of one plane, an output row at a time and vectorised along it: for each tap in window order,
    every window of the row takes the tap's value when it is greater than its maximum so far or NaN (the rule
    of the header). Input rows are copied with -inf in the padding, which never wins; a window's index starts
    at its first pixel inside the image, which is where a window of all -inf points.
    row: pool_row_width values; m, best: 2*OW values each (scratch, used in turns)."""
    # the geometry in locals: with -fno-strict-aliasing gcc must assume the stores to m and best may change *g,
    # and would neither hoist g.sw nor vectorise the loops
    cdef Py_ssize_t Wr = pool_row_width(g)
    cdef Py_ssize_t W = g.W, H = g.H, OW = g.OW, OH = g.OH, KH = g.KH, KW = g.KW
    cdef Py_ssize_t sh = g.sh, sw = g.sw, ph = g.ph, pw = g.pw
    cdef Py_ssize_t oh, ow, ih, kw, h0, h1, n, base, cur
    # image columns copied into the row: [pw, pw + n)
    n = min(W, Wr - pw)
    for ow in range(pw):
        row[ow] = -INFINITY
    for ow in range(pw + n, Wr):
        row[ow] = -INFINITY
    for oh in range(OH):
        h0 = oh * sh - ph
        h1 = min(h0 + KH, H)
        h0 = max(h0, 0)
        for ow in range(OW):
            m[ow] = -INFINITY
            best[ow] = h0 * W + max(ow * sw - pw, 0)
        cur = 0
        for ih in range(h0, h1):
            memcpy(row + pw, x + ih * W, n * sizeof(floating))
            for kw in range(KW):
                base = ih * W + kw - pw
                if sw == 2:
                    max_tap(row + kw, 2, base, OW, m + cur, best + cur, m + OW - cur, best + OW - cur)
                elif sw == 1:
                    max_tap(row + kw, 1, base, OW, m + cur, best + cur, m + OW - cur, best + OW - cur)
                else:
                    max_tap(row + kw, sw, base, OW, m + cur, best + cur, m + OW - cur, best + OW - cur)
                cur = OW - cur
        memcpy(y + oh * OW, m + cur, OW * sizeof(floating))
        if idx != NULL:
            memcpy(idx + oh * OW, best + cur, OW * sizeof(long long))


def max_pool2d_forward(const floating[:, :, :, ::1] x,   # IN  (B, C, H, W)
                       floating[:, :, :, ::1] out,       # OUT (B, C, OH, OW)
                       indices,                          # OUT int64 (B, C, OH, OW) or None
                       tuple params, int n_threads):
    """params = (KH, KW, sh, sw, ph, pw, OH, OW)."""
    cdef PoolGeom g
    cdef long long[:, :, :, ::1] idx_v
    cdef long long* idx = NULL
    cdef int rc
    fill_pool_geom(&g, x.shape[0] * x.shape[1], x.shape[2], x.shape[3], params)
    if g.planes == 0:
        return
    if indices is not None:
        idx_v = indices
        idx = &idx_v[0, 0, 0, 0]
    with nogil:
        rc = max_pool2d_forward_core(&x[0, 0, 0, 0], &out[0, 0, 0, 0], idx, &g, n_threads)
    if rc:
        raise MemoryError("max_pool2d: could not allocate row buffers")


cdef int max_pool2d_forward_core(const floating* xbase, floating* ybase, long long* idx, const PoolGeom* gp,
                                 int n_threads) noexcept nogil:
    """max_pool2d_forward on raw pointers (also a frozen plan's step); idx NULL for no indices; -1 when a row
    buffer could not be allocated."""
    cdef fpstate fp, fps
    cdef PoolGeom g = gp[0]
    cdef Py_ssize_t pl, HW, OHW
    cdef bint fast, rows
    if g.planes == 0:
        return 0
    HW = g.H * g.W
    OHW = g.OH * g.OW
    # 2x2/2 windows inside planes with an even number of rows: the batch as one tall image, in blocks of rows
    fast = (g.KH == 2 and g.KW == 2 and g.sh == 2 and g.sw == 2 and g.ph == 0 and g.pw == 0
            and 2 * g.OH == g.H and 2 * g.OW <= g.W)
    # the row-vectorised version needs rows of some length to pay for its loop set-up (measured: 3x3/2 windows on
    # 56x56 images 2.5x faster than per window; 2x2/2 windows on 32x32 images 3x slower than the fast path). The
    # fast path's vectorised rows need a whole vector of outputs: 14-window rows (LeNet-5's 28x28 planes) on
    # AVX-512 went through its scalar tail, with indices 0.37 ms against 0.27 in the short-row version (batch 64)
    rows = not fast and g.OW >= 8
    cdef Py_ssize_t nrows_out = g.planes * g.OH
    cdef Py_ssize_t rblk = max(1, 4096 // g.OW)
    cdef floating* row
    cdef floating* m
    cdef long long* best
    cdef int failed = 0
    if fast:
        fps = fp_suspend()
        with parallel(num_threads=n_threads):
            fp = fp_enter()
            for pl in prange((nrows_out + rblk - 1) // rblk, schedule='static'):
                max_pool_2x2_rows(xbase, ybase, idx, pl * rblk, min(nrows_out, (pl + 1) * rblk), g.OH, g.OW, g.W)
            fp_leave(fp)
        fp_resume(fps)
        return 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        row = <floating*>malloc(pool_row_width(&g) * sizeof(floating))
        m = <floating*>malloc(2 * g.OW * sizeof(floating))
        best = <long long*>malloc(2 * g.OW * sizeof(long long))
        for pl in prange(g.planes, schedule='static'):
            if row == NULL or m == NULL or best == NULL:
                flag_failure(&failed)
                continue
            if rows:
                max_pool_plane_rows(xbase + pl * HW, ybase + pl * OHW, idx + pl * OHW if idx != NULL else NULL, &g,
                                    row, m, best)
            else:
                max_pool_plane(xbase + pl * HW, ybase + pl * OHW,
                               idx + pl * OHW if idx != NULL else NULL, &g)
        free(row)
        free(m)
        free(best)
        fp_leave(fp)
    fp_resume(fps)
    return -1 if failed else 0


cdef Py_ssize_t max_pool_plane_backward(const floating* dy, const long long* idx, Py_ssize_t OHW, floating* dx,
                                        Py_ssize_t HW, const floating* relu_out) noexcept nogil:
    """dx (HW) = zeros plus each dy[j] added at idx[j], in order j; returns how many idx were out of range (those
    are skipped, never written). Unless relu_out is NULL (the plane of the ReLU output that was pooled), nothing
    is added where relu_out <= 0: relu_backward's zeros, without its pass."""
    cdef Py_ssize_t j, bad = 0
    cdef long long k
    memset(dx, 0, HW * sizeof(floating))
    for j in range(OHW):
        k = idx[j]
        if k < 0 or k >= HW:
            bad += 1
        elif relu_out == NULL or not relu_out[k] <= 0:
            dx[k] += dy[j]
    return bad


cdef inline Py_ssize_t max_pool_plane_backward_2x2(const floating* dy, const long long* idx, Py_ssize_t OH,
                                                   Py_ssize_t OW, Py_ssize_t W, floating* dx,
                                                   const floating* relu_out) noexcept nogil:
    """max_pool_plane_backward over a plane of 2*OH rows of W columns, 2*OW <= W, for indices of 2x2 stride-2
    windows without padding: the same values, by pool.h's map of each window (ce_pool2x2_expand), or by the
    scatter for a plane whose indices are not each in their own window (another pooling's). Returns the
    out-of-range count as it does. Planes of OW not a multiple of 8 are scattered (pool.h)."""
    cdef Py_ssize_t misses = 1
    if CE_POOL_EXPAND and OW % 8 == 0:
        if floating is float:
            misses = ce_pool2x2_expand_f(dy, idx, OH, OW, W, relu_out, dx)
        else:
            misses = ce_pool2x2_expand_d(dy, idx, OH, OW, W, relu_out, dx)
    if misses == 0:
        return 0
    return max_pool_plane_backward(dy, idx, OH * OW, dx, 2 * OH * W, relu_out)


def max_pool2d_backward(const floating[::1] grad_out,   # IN  (planes * OH * OW)
                        const long long[::1] indices,   # IN  same size
                        floating[::1] grad_x,           # OUT (planes * H * W), overwritten
                        Py_ssize_t planes, Py_ssize_t HW, int n_threads,
                        const floating[::1] relu_out=None,  # IN (planes * H * W) or None
                        Py_ssize_t OW=0, Py_ssize_t W=0):
    """Scatter-add grad_out to the argmax positions, plane by plane. Returns the number of out-of-range indices
    (then the caller raises). relu_out: the pooled input when it is a ReLU's output; the gradient then also goes
    through that ReLU (nothing lands where relu_out <= 0), the values of relu_backward after this, bit for bit.
    OW and W (the output's and the input's widths, 0: unknown): where the planes are 2*OH rows of W, 2*OW <= W,
    the planes are made by max_pool_plane_backward_2x2 (a 2x2 stride-2 pooling's indices: the same values)."""
    cdef fpstate fp, fps
    cdef Py_ssize_t OHW = grad_out.shape[0] // planes if planes > 0 else 0
    cdef Py_ssize_t OH = OHW // OW if OW > 0 else 0
    cdef bint windows = OH > 0 and OH * OW == OHW and 2 * OW <= W and 2 * OH * W == HW
    cdef Py_ssize_t pl
    cdef Py_ssize_t bad = 0
    cdef Py_ssize_t* bad_per_plane
    cdef const floating* keep = NULL
    if relu_out is not None:
        if relu_out.shape[0] != grad_x.shape[0]:
            raise ValueError("max_pool2d_backward: relu_out must have the input's size")
        if relu_out.shape[0] > 0:
            keep = &relu_out[0]
    if planes == 0 or HW == 0:
        return grad_out.shape[0] if HW == 0 else 0
    bad_per_plane = <Py_ssize_t*>malloc(planes * sizeof(Py_ssize_t))
    if bad_per_plane == NULL:
        raise MemoryError()
    fps = fp_suspend()
    with nogil, parallel(num_threads=n_threads):
        fp = fp_enter()
        for pl in prange(planes, schedule='static'):
            if windows:
                bad_per_plane[pl] = max_pool_plane_backward_2x2(&grad_out[0] + pl * OHW, &indices[0] + pl * OHW, OH,
                                                                OW, W, &grad_x[0] + pl * HW,
                                                                keep + pl * HW if keep != NULL else NULL)
            else:
                bad_per_plane[pl] = max_pool_plane_backward(&grad_out[0] + pl * OHW if OHW > 0 else NULL,
                                                            &indices[0] + pl * OHW if OHW > 0 else NULL, OHW,
                                                            &grad_x[0] + pl * HW, HW,
                                                            keep + pl * HW if keep != NULL else NULL)
        fp_leave(fp)
    fp_resume(fps)
    for pl in range(planes):
        bad += bad_per_plane[pl]
    free(bad_per_plane)
    return bad


cdef inline Py_ssize_t avg_divisor(Py_ssize_t oh, Py_ssize_t ow, const PoolGeom* g, bint count_include_pad,
                                 Py_ssize_t* h0, Py_ssize_t* h1, Py_ssize_t* w0, Py_ssize_t* w1) noexcept nogil:
    """Clip the window of output (oh, ow) into [h0, h1) x [w0, w1) and return its divisor (0: empty window)."""
    cdef Py_ssize_t hs = oh * g.sh - g.ph
    cdef Py_ssize_t ws = ow * g.sw - g.pw
    cdef Py_ssize_t he = min(hs + g.KH, g.H + g.ph)
    cdef Py_ssize_t we = min(ws + g.KW, g.W + g.pw)
    cdef Py_ssize_t pool_size = (he - hs) * (we - ws)
    h0[0] = max(hs, 0)
    w0[0] = max(ws, 0)
    h1[0] = min(he, g.H)
    w1[0] = min(we, g.W)
    if h0[0] >= h1[0] or w0[0] >= w1[0]:
        return 0
    if count_include_pad:
        return pool_size
    return (h1[0] - h0[0]) * (w1[0] - w0[0])


cdef void avg_pool_plane(const floating* x, floating* y, const PoolGeom* g,
                         bint count_include_pad) noexcept nogil:
    cdef Py_ssize_t oh, ow, ih, iw, h0, h1, w0, w1, div, i0
    cdef floating s
    if g.KH == 2 and g.KW == 2 and g.sh == 2 and g.sw == 2 and g.ph == 0 and g.pw == 0 \
            and 2 * g.OH <= g.H and 2 * g.OW <= g.W:
        # every window is whole: same sums in the same order as below, without the clipping per output
        for oh in range(g.OH):
            for ow in range(g.OW):
                i0 = 2 * oh * g.W + 2 * ow
                y[oh * g.OW + ow] = (((x[i0] + x[i0 + 1]) + x[i0 + g.W]) + x[i0 + g.W + 1]) / <floating>4
        return
    for oh in range(g.OH):
        for ow in range(g.OW):
            div = avg_divisor(oh, ow, g, count_include_pad, &h0, &h1, &w0, &w1)
            s = 0
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    s += x[ih * g.W + iw]
            y[oh * g.OW + ow] = s / <floating>div if div != 0 else 0


cdef void avg_pool_plane_backward(const floating* dy, floating* dx, const PoolGeom* g,
                                  bint count_include_pad) noexcept nogil:
    cdef Py_ssize_t oh, ow, ih, iw, h0, h1, w0, w1, div
    cdef Py_ssize_t W = g.W, OW = g.OW
    cdef floating gv
    cdef floating* r0
    cdef floating* r1
    cdef const floating* src
    if g.KH == 2 and g.KW == 2 and g.sh == 2 and g.sw == 2 and g.ph == 0 and g.pw == 0 \
            and 2 * g.OH == g.H and 2 * g.OW == g.W:
        # every window whole and every pixel in exactly one: each output's share written to its 4 pixels
        # (the per-window loop below spent its time on divisors and clipping, 3x slower)
        for oh in range(g.OH):
            r0 = dx + 2 * oh * W
            r1 = r0 + W
            src = dy + oh * OW
            for ow in range(OW):
                gv = src[ow] / <floating>4
                r0[2 * ow] = gv
                r0[2 * ow + 1] = gv
                r1[2 * ow] = gv
                r1[2 * ow + 1] = gv
        return
    memset(dx, 0, g.H * g.W * sizeof(floating))
    for oh in range(g.OH):
        for ow in range(g.OW):
            div = avg_divisor(oh, ow, g, count_include_pad, &h0, &h1, &w0, &w1)
            if div == 0:
                continue
            gv = dy[oh * g.OW + ow] / <floating>div
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    dx[ih * g.W + iw] += gv


def avg_pool2d_forward(const floating[:, :, :, ::1] x,   # IN  (B, C, H, W)
                       floating[:, :, :, ::1] out,       # OUT (B, C, OH, OW)
                       tuple params, bint count_include_pad, int n_threads):
    cdef PoolGeom g
    fill_pool_geom(&g, x.shape[0] * x.shape[1], x.shape[2], x.shape[3], params)
    if g.planes == 0:
        return
    with nogil:
        avg_pool2d_forward_core(&x[0, 0, 0, 0], &out[0, 0, 0, 0], &g, count_include_pad, n_threads)


cdef void avg_pool2d_forward_core(const floating* xbase, floating* ybase, const PoolGeom* g, bint count_include_pad,
                                  int n_threads) noexcept nogil:
    """avg_pool2d_forward on raw pointers (also a frozen plan's step)."""
    cdef fpstate fp, fps
    cdef Py_ssize_t pl
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        for pl in prange(g.planes, schedule='static'):
            avg_pool_plane(xbase + pl * g.H * g.W, ybase + pl * g.OH * g.OW, g, count_include_pad)
        fp_leave(fp)
    fp_resume(fps)


def avg_pool2d_backward(const floating[:, :, :, ::1] grad_out,  # IN  (B, C, OH, OW)
                        floating[:, :, :, ::1] grad_x,          # OUT (B, C, H, W), overwritten
                        tuple params, bint count_include_pad, int n_threads):
    cdef fpstate fp, fps
    cdef PoolGeom g
    cdef Py_ssize_t pl
    cdef const floating* gbase
    cdef floating* dxbase
    fill_pool_geom(&g, grad_x.shape[0] * grad_x.shape[1], grad_x.shape[2], grad_x.shape[3], params)
    if g.planes == 0:
        return
    gbase = &grad_out[0, 0, 0, 0]
    dxbase = &grad_x[0, 0, 0, 0]
    fps = fp_suspend()
    with nogil, parallel(num_threads=n_threads):
        fp = fp_enter()
        for pl in prange(g.planes, schedule='static'):
            avg_pool_plane_backward(gbase + pl * g.OH * g.OW, dxbase + pl * g.H * g.W, &g, count_include_pad)
        fp_leave(fp)
    fp_resume(fps)


# Global average pooling: each plane's mean, its sum in batch norm's fixed order (plane_sum: 16 lanes added
# pairwise in registers; channel_sum's lanes one by one were a serial chain of adds per 8x8 plane) divided by the
# count; its gradient, each plane filled with its value divided by the count. One plane is one task, so any thread
# count gives the same bits.

def global_avg_pool2d_forward(const floating[:, :, :, ::1] x,   # IN  (B, C, H, W), H*W > 0
                              floating[:, ::1] out,             # OUT (B, C)
                              int n_threads):
    cdef Py_ssize_t planes = x.shape[0] * x.shape[1], HW = x.shape[2] * x.shape[3]
    if planes == 0 or HW == 0:
        return
    with nogil:
        global_avg_pool2d_core(&x[0, 0, 0, 0], &out[0, 0], planes, HW, n_threads)


cdef void global_avg_pool2d_core(const floating* xbase, floating* ybase, Py_ssize_t planes, Py_ssize_t HW,
                                 int n_threads) noexcept nogil:
    """global_avg_pool2d_forward on raw pointers (also a frozen plan's step)."""
    cdef fpstate fp, fps
    cdef Py_ssize_t pl
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        for pl in prange(planes, schedule='static'):
            ybase[pl] = plane_sum(xbase + pl * HW, HW) / HW
        fp_leave(fp)
    fp_resume(fps)


def global_avg_pool2d_backward(const floating[:, ::1] grad_out,  # IN  (B, C)
                               floating[:, :, :, ::1] grad_x,    # OUT (B, C, H, W), H*W > 0
                               int n_threads):
    """grad_x[b, c] = grad_out[b, c] / (H*W) over the plane."""
    cdef fpstate fp, fps
    cdef Py_ssize_t planes = grad_x.shape[0] * grad_x.shape[1], HW = grad_x.shape[2] * grad_x.shape[3]
    cdef Py_ssize_t pl, i
    cdef floating v
    cdef floating* dst
    if grad_out.shape[0] != grad_x.shape[0] or grad_out.shape[1] != grad_x.shape[1]:
        raise ValueError("global_avg_pool2d_backward: grad_out must be (B, C) of grad_x's (B, C, H, W)")
    if planes == 0 or HW == 0:
        return
    with nogil:
        fps = fp_suspend()
        with parallel(num_threads=n_threads):
            fp = fp_enter()
            for pl in prange(planes, schedule='static'):
                v = grad_out[pl // grad_x.shape[1], pl % grad_x.shape[1]] / HW
                dst = &grad_x[0, 0, 0, 0] + pl * HW
                for i in range(HW):
                    dst[i] = v
            fp_leave(fp)
        fp_resume(fps)
