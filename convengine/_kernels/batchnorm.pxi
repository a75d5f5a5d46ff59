# Batch normalisation over NCHW (statistics per channel, over the images and pixels), forward with batch or given
# statistics and backward for batch statistics.
#
# Small CNNs have small planes (a 4x4 plane is one vector), so the loops run along a whole image instead: the C*P
# values of image b (P = H*W) form a vector x[b, :], and per-channel quantities are expanded to such vectors.
#   sums     acc[j] = sum over b, in order, of f(x[b, j]); then per channel, sum over its P positions in order
#   mapping  y[b, j] = (x[b, j] - mean[j]) * k[j] + s[j]
# Sums split over slices of j, mappings over (image, slice): the order of every sum is fixed, whatever the thread
# count. Statistics are two-pass (the mean, then the mean of squared deviations), as in the reference.
#
# Planes of at least BN_PLANE values go plane by plane instead: each pass streams the planes in memory order with
# the channel's constants as scalars, and each sum is taken per plane (16 interleaved lanes, then the lanes
# pairwise: batchnorm.h) into an array of B x C partial sums, then per channel over the images in order: fixed
# whatever the thread count.
#
# Batch norm followed by ReLU runs fused (oneDNN's fuse_norm_relu): the forward applies max(., 0) as it stores,
# and the backward reads the gradient through the ReLU (0 where its output is <= 0, as relu_backward), its sign
# recomputed from x and the forward's coefficients inside the same sums and mapping, so neither the ReLU's input
# nor its gradient is ever written out. The values are those of the two layers one after the other, bit for bit.

from libc.math cimport sqrt

cdef Py_ssize_t BN_SLICE = 4096

# Values per plane from which batch norm runs plane by plane (above). The position-vector way streams four expanded
# per-position vectors beside the data and sums each position over the images into an array bigger than L1
# (Zen 4, 1 thread, 64x64x16x16: forward 0.47 ms and backward through the ReLU 0.88 ms that way, a copy of the
# same array 0.09). One task per channel over its B planes was tried and was 2-3x slower in the backward: planes
# of a channel lie C*P values apart, a power of two, and the re-read planes of three arrays evicted each other.
# Below a vector the per-plane loops are all tail, and the position way keeps its long vectorised rows.
cdef Py_ssize_t BN_PLANE = 16


cdef inline floating inv_std_of(floating var, floating eps) noexcept nogil:
    return 1 / <floating>sqrt(var + eps)


cdef inline floating through_relu(floating g, floating y) noexcept nogil:
    """The gradient g of a ReLU's output y passed back to its input (relu_backward's rule)."""
    return 0 if y <= 0 else g


cdef void sum_over_images(const floating* x, const floating* g, const floating* center, const floating* y,
                          Py_ssize_t B, Py_ssize_t L, Py_ssize_t j0, Py_ssize_t j1, int what,
                          floating* acc, floating* acc2) noexcept nogil:
    """acc[j] = sum over b of x[b, j] (what 0), (x[b, j] - center[j])^2 (what 1) or g[b, j] * (x[b, j] - center[j])
    (what 2), for j0 <= j < j1; images are L apart. With y (not NULL), the gradient (x of what 0, g of what 2) is
    first passed through the ReLU whose output is y. What 3: both the sum of g (into acc) and what 2's (into acc2)
    in one pass over the images, each sum in the same order as alone."""
    cdef Py_ssize_t b, j
    cdef const floating* xb
    cdef const floating* gb
    cdef const floating* yb
    cdef floating d, gv
    for j in range(j0, j1):
        acc[j] = 0
    if what == 3:
        for j in range(j0, j1):
            acc2[j] = 0
    for b in range(B):
        xb = x + b * L
        yb = y + b * L if y != NULL else NULL
        if what == 0 and y == NULL:
            for j in range(j0, j1):
                acc[j] += xb[j]
        elif what == 0:
            for j in range(j0, j1):
                acc[j] += through_relu(xb[j], yb[j])
        elif what == 1:
            for j in range(j0, j1):
                d = xb[j] - center[j]
                acc[j] += d * d
        elif what == 3 and y == NULL:
            gb = g + b * L
            for j in range(j0, j1):
                gv = gb[j]
                acc[j] += gv
                acc2[j] += gv * (xb[j] - center[j])
        elif what == 3:
            gb = g + b * L
            for j in range(j0, j1):
                gv = through_relu(gb[j], yb[j])
                acc[j] += gv
                acc2[j] += gv * (xb[j] - center[j])
        elif y == NULL:
            gb = g + b * L
            for j in range(j0, j1):
                acc[j] += gb[j] * (xb[j] - center[j])
        else:
            gb = g + b * L
            for j in range(j0, j1):
                acc[j] += through_relu(gb[j], yb[j]) * (xb[j] - center[j])


cdef void sum_images(const floating* x, const floating* g, const floating* center, const floating* y, Py_ssize_t B,
                     Py_ssize_t C, Py_ssize_t P, int what, floating* acc, floating* per_channel,
                     int n_threads, floating* acc2, floating* per_channel2) noexcept nogil:
    """per_channel[c] = sum of sum_over_images' acc over channel c's P positions, in order (and per_channel2 of
    acc2, what 3)."""
    cdef fpstate fp, fps
    cdef Py_ssize_t L = C * P
    cdef Py_ssize_t nsl = (L + BN_SLICE - 1) // BN_SLICE
    cdef Py_ssize_t t, c, i
    cdef floating s
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        for t in prange(nsl, schedule='static'):
            sum_over_images(x, g, center, y, B, L, t * BN_SLICE, min(L, (t + 1) * BN_SLICE), what, acc, acc2)
        fp_leave(fp)
    fp_resume(fps)
    for c in range(C):
        s = 0
        for i in range(P):
            s = s + acc[c * P + i]
        per_channel[c] = s
    if what == 3:
        for c in range(C):
            s = 0
            for i in range(P):
                s = s + acc2[c * P + i]
            per_channel2[c] = s


cdef void expand(const floating* per_channel, Py_ssize_t C, Py_ssize_t P, floating* vec) noexcept nogil:
    """vec[c*P + i] = per_channel[c]."""
    cdef Py_ssize_t c, i
    for c in range(C):
        for i in range(P):
            vec[c * P + i] = per_channel[c]


cdef void map_slice(const floating* x, const floating* g, floating* out, const floating* center,
                    const floating* k, const floating* s, const floating* kg, Py_ssize_t n, int relu,
                    const floating* y) noexcept nogil:
    """out = (x - center) * k + s, plus g * kg when g is not NULL, over n values; with relu (forward only),
    max(out, 0) as relu gives it; with y (backward only), g is first passed through the ReLU whose output is y."""
    cdef Py_ssize_t j
    cdef floating v
    if g == NULL and not relu:
        for j in range(n):
            out[j] = (x[j] - center[j]) * k[j] + s[j]
    elif g == NULL:
        for j in range(n):
            v = (x[j] - center[j]) * k[j] + s[j]
            out[j] = 0 if v <= 0 else v
    elif y == NULL:
        for j in range(n):
            out[j] = (x[j] - center[j]) * k[j] + s[j] + g[j] * kg[j]
    else:
        for j in range(n):
            out[j] = (x[j] - center[j]) * k[j] + s[j] + through_relu(g[j], y[j]) * kg[j]


cdef void map_images(const floating* x, const floating* g, floating* out, const floating* vecs, Py_ssize_t B,
                     Py_ssize_t L, int relu, const floating* y, int n_threads) noexcept nogil:
    """map_slice over every image, with the per-position vectors center, k, s, kg at vecs + 0, L, 2L, 3L."""
    cdef fpstate fp, fps
    cdef Py_ssize_t nsl = (L + BN_SLICE - 1) // BN_SLICE
    cdef Py_ssize_t t, b, j0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        for t in prange(B * nsl, schedule='static'):
            b = t // nsl
            j0 = (t - b * nsl) * BN_SLICE
            map_slice(x + b * L + j0, g + b * L + j0 if g != NULL else NULL, out + b * L + j0, vecs + j0, vecs + L + j0,
                      vecs + 2 * L + j0, vecs + 3 * L + j0, min(L, j0 + BN_SLICE) - j0, relu,
                      y + b * L + j0 if y != NULL else NULL)
        fp_leave(fp)
    fp_resume(fps)


cdef extern from "batchnorm.h":
    float plane_sum_f "ce_bn_sum_f"(const float* x, Py_ssize_t n) nogil
    double plane_sum_d "ce_bn_sum_d"(const double* x, Py_ssize_t n) nogil
    void sum_m2_f "ce_bn_sum_m2_f"(const float* x, Py_ssize_t n, float* sum, float* m2) nogil
    void sum_m2_d "ce_bn_sum_m2_d"(const double* x, Py_ssize_t n, double* sum, double* m2) nogil
    void gradient_sums_f "ce_bn_gradient_sums_f"(const float* g, const float* x, float mu, Py_ssize_t n, int relu,
                                                 float k, float s, float* sum_g, float* sum_h) nogil
    void gradient_sums_d "ce_bn_gradient_sums_d"(const double* g, const double* x, double mu, Py_ssize_t n,
                                                 int relu, double k, double s, double* sum_g, double* sum_h) nogil
    void backward_map_f "ce_bn_backward_map_f"(const float* g, const float* x, float* out, float mu, float a,
                                               float c, float k, Py_ssize_t n, int relu, float s) nogil
    void backward_map_d "ce_bn_backward_map_d"(const double* g, const double* x, double* out, double mu, double a,
                                               double c, double k, Py_ssize_t n, int relu, double s) nogil


cdef inline floating plane_sum(const floating* x, Py_ssize_t P) noexcept nogil:
    """Sum over a plane, in batchnorm.h's 16-lane order."""
    if floating is float:
        return plane_sum_f(x, P)
    else:
        return plane_sum_d(x, P)


cdef inline void plane_sum_m2(const floating* x, Py_ssize_t P, floating* sum, floating* m2) noexcept nogil:
    """A plane's sum and the sum of its squared deviations from its own mean (batchnorm.h's order)."""
    if floating is float:
        sum_m2_f(x, P, sum, m2)
    else:
        sum_m2_d(x, P, sum, m2)


cdef inline void plane_gradient_sums(const floating* g, const floating* x, floating mu, Py_ssize_t P, int relu,
                                     floating k, floating s, floating* sum_g, floating* sum_h) noexcept nogil:
    """Sums over a plane of g and of g * (x - mu), each in batchnorm.h's 16-lane order; with relu, g passed
    through the ReLU whose output is (x - mu) * k + s (forward_planes' expression, so the same sign)."""
    if floating is float:
        gradient_sums_f(g, x, mu, P, relu, k, s, sum_g, sum_h)
    else:
        gradient_sums_d(g, x, mu, P, relu, k, s, sum_g, sum_h)


cdef inline void plane_backward_map(const floating* g, const floating* x, floating* out, floating mu, floating a,
                                    floating c, floating k, Py_ssize_t P, int relu, floating s) noexcept nogil:
    """out = (x - mu) * a + c + g * k over a plane (k = weight * inv_std), g passed through the ReLU as
    plane_gradient_sums does."""
    if floating is float:
        backward_map_f(g, x, out, mu, a, c, k, P, relu, s)
    else:
        backward_map_d(g, x, out, mu, a, c, k, P, relu, s)


cdef inline void gate_plane(const floating* g, const floating* y, floating* out, Py_ssize_t P) noexcept nogil:
    """out = g passed back through the ReLU whose output is y (through_relu), over P values."""
    cdef Py_ssize_t i
    for i in range(P):
        out[i] = through_relu(g[i], y[i])


cdef void per_channel_totals(const floating* partial, Py_ssize_t B, Py_ssize_t C, floating* total) noexcept nogil:
    """total[c] = sum over b, in order, of partial[b * C + c]."""
    cdef Py_ssize_t b, c
    for c in range(C):
        total[c] = 0
    for b in range(B):
        for c in range(C):
            total[c] += partial[b * C + c]


cdef void forward_planes(const floating* x, floating* out, Py_ssize_t B, Py_ssize_t C, Py_ssize_t P,
                         floating* mean, floating* var, bint training, const floating* weight, const floating* bias,
                         floating eps, int relu, floating* partial, floating* coef, int n_threads) noexcept nogil:
    """batch_norm2d_forward plane by plane: with training the statistics (partial: 2*B*C scratch), then the
    mapping with coef (C scratch) = weight * inv_std. One pass gives each plane's sum and the squared deviations
    from its own mean (plane_sum_m2: the plane re-read from L1); the mean is the planes' sums over the images in
    order, the variance the planes' deviations moved to that mean, sum over b of m2 + P * (sum / P - mean)^2
    (Chan, Golub & LeVeque), in order: one pass over x, not two, for the two-pass formula's accuracy."""
    cdef fpstate fp, fps
    cdef Py_ssize_t q, c
    if training:
        plane_statistics(x, B, C, P, mean, var, partial, n_threads)
    for c in range(C):
        coef[c] = weight[c] * inv_std_of(var[c], eps)
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        for q in prange(B * C, schedule='static'):
            c = q % C
            map_plane(x + q * P, out + q * P, P, mean[c], coef[c], bias[c], relu)
        fp_leave(fp)
    fp_resume(fps)


cdef inline void map_plane(const floating* src, floating* dst, Py_ssize_t P, floating mu, floating k, floating s,
                           int relu) noexcept nogil:
    """dst = (src - mu) * k + s over a plane, then max(., 0) as relu gives it (0 where the value is <= 0)."""
    cdef Py_ssize_t i
    cdef floating v
    if relu:
        for i in range(P):
            v = (src[i] - mu) * k + s
            dst[i] = 0 if v <= 0 else v
    else:
        for i in range(P):
            dst[i] = (src[i] - mu) * k + s


cdef void plane_statistics(const floating* x, Py_ssize_t B, Py_ssize_t C, Py_ssize_t P, floating* mean,
                           floating* var, floating* partial, int n_threads) noexcept nogil:
    """forward_planes' batch statistics (partial: 2*B*C scratch)."""
    cdef fpstate fp, fps
    cdef Py_ssize_t q, b, c
    cdef floating m = B * P
    cdef floating d
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        for q in prange(B * C, schedule='static'):
            plane_sum_m2(x + q * P, P, &partial[q], &partial[B * C + q])
        fp_leave(fp)
    fp_resume(fps)
    per_channel_totals(partial, B, C, mean)
    for c in range(C):
        mean[c] = mean[c] / m
        var[c] = 0
    for b in range(B):
        for c in range(C):
            d = partial[b * C + c] / P - mean[c]
            var[c] = var[c] + partial[B * C + b * C + c] + P * d * d
    for c in range(C):
        var[c] = var[c] / m


cdef void backward_planes(const floating* g, const floating* x, const floating* y, const floating* beta,
                          floating* gx, Py_ssize_t B, Py_ssize_t C, Py_ssize_t P, const floating* mean,
                          const floating* var, const floating* weight, floating eps, floating* grad_weight,
                          floating* grad_bias, floating* partial, floating* coef, floating* gated,
                          int n_threads) noexcept nogil:
    """batch_norm2d_backward plane by plane (partial: 2*B*C scratch, coef: 4*C). With beta (the forward's bias)
    the gradient passes through the fused ReLU whose sign is recomputed from x (batchnorm.h's gate: the forward's
    expression, so the same sign) inside both passes; with y instead (the fused ReLU's output) each plane of g is
    first gated into this thread's P values of `gated` (gate_plane). Either way the same expressions read the gated
    gradient, so the fused layers give the bits of the two in a row."""
    cdef fpstate fp, fps
    cdef Py_ssize_t q, c
    cdef const floating* gb
    cdef floating* mine
    cdef int relu = beta != NULL
    relu_coefficients(var, weight, eps, beta, C, coef)
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        mine = gated + threadid() * P if gated != NULL else NULL
        for q in prange(B * C, schedule='static'):
            gb = g + q * P
            if y != NULL and not relu:
                gate_plane(gb, y + q * P, mine, P)
                gb = mine
            plane_gradient_sums(gb, x + q * P, mean[q % C], P, relu, coef[2 * C + q % C], coef[3 * C + q % C],
                                &partial[q], &partial[B * C + q])
        fp_leave(fp)
    fp_resume(fps)
    mapping_coefficients(partial, B, C, P, var, weight, eps, grad_weight, grad_bias, coef)
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        mine = gated + threadid() * P if gated != NULL else NULL
        for q in prange(B * C, schedule='static'):
            c = q % C
            gb = g + q * P
            if y != NULL and not relu:
                gate_plane(gb, y + q * P, mine, P)
                gb = mine
            plane_backward_map(gb, x + q * P, gx + q * P, mean[c], coef[c], coef[C + c], coef[2 * C + c], P, relu,
                               coef[3 * C + c])
        fp_leave(fp)
    fp_resume(fps)


cdef void relu_coefficients(const floating* var, const floating* weight, floating eps, const floating* beta,
                            Py_ssize_t C, floating* coef) noexcept nogil:
    """coef[2C + c] = forward_planes' coefficient weight * inv_std, coef[3C + c] = its bias (0 without beta): the
    fused ReLU's output (x - mean) * coef[2C + c] + coef[3C + c], whose sign the backward passes recompute."""
    cdef Py_ssize_t c
    for c in range(C):
        coef[2 * C + c] = weight[c] * inv_std_of(var[c], eps)
        coef[3 * C + c] = beta[c] if beta != NULL else 0


cdef void mapping_coefficients(const floating* partial, Py_ssize_t B, Py_ssize_t C, Py_ssize_t P,
                               const floating* var, const floating* weight, floating eps, floating* grad_weight,
                               floating* grad_bias, floating* coef) noexcept nogil:
    """From the per-plane sums of g (partial) and of g * (x - mean) (partial + B*C): grad_bias, grad_weight, and
    the second pass's grad_x = (x - mean) * coef[c] + coef[C + c] + g * coef[2C + c]."""
    cdef Py_ssize_t c
    cdef floating m = B * P
    cdef floating inv, k
    per_channel_totals(partial, B, C, grad_bias)
    per_channel_totals(partial + B * C, B, C, coef)          # sum of g * (x - mean)
    for c in range(C):
        inv = inv_std_of(var[c], eps)
        k = weight[c] * inv
        grad_weight[c] = coef[c] * inv
        coef[c] = -k * inv * inv * coef[c] / m
        coef[C + c] = -k * grad_bias[c] / m
        coef[2 * C + c] = k


cdef Py_ssize_t backward_planes_pooled(const floating* dy, const long long* idx, Py_ssize_t OH, Py_ssize_t OW,
                                       const floating* x, const floating* beta, floating* gx, Py_ssize_t B,
                                       Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, const floating* mean,
                                       const floating* var, const floating* weight, floating eps,
                                       floating* grad_weight, floating* grad_bias, floating* partial, floating* coef,
                                       Py_ssize_t* bad, int n_threads) noexcept nogil:
    """backward_planes with beta, its gradient planes those of the 2x2 stride-2 pooling's (dy, idx: OH x OW per
    plane of H x W), made straight in gx by max_pool_plane_backward_2x2 (a map of the windows), summed while in
    cache, and mapped in place in the second pass (each value read before it is written): no array of its own for
    the pooling's gradient. The scatter that made them before (a memset, then an add a window) was 60% of the
    first pass (Zen 5, perf); a buffer per thread made again in the second pass was slower (Zen 4, and Zen 5 with
    the map). Returns the number of out-of-range indices (skipped, as max_pool2d_backward does: bad, B*C scratch,
    counts them per plane), then the caller raises."""
    cdef fpstate fp, fps
    cdef Py_ssize_t q, c, total = 0, P = H * W, OHW = OH * OW
    relu_coefficients(var, weight, eps, beta, C, coef)
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        for q in prange(B * C, schedule='static'):
            c = q % C
            bad[q] = max_pool_plane_backward_2x2(dy + q * OHW, idx + q * OHW, OH, OW, W, gx + q * P, NULL)
            plane_gradient_sums(gx + q * P, x + q * P, mean[c], P, True, coef[2 * C + c], coef[3 * C + c],
                                &partial[q], &partial[B * C + q])
        fp_leave(fp)
    fp_resume(fps)
    for q in range(B * C):
        total += bad[q]
    if total:
        return total
    mapping_coefficients(partial, B, C, P, var, weight, eps, grad_weight, grad_bias, coef)
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        for q in prange(B * C, schedule='static'):
            c = q % C
            plane_backward_map(gx + q * P, x + q * P, gx + q * P, mean[c], coef[c], coef[C + c], coef[2 * C + c], P,
                               True, coef[3 * C + c])
        fp_leave(fp)
    fp_resume(fps)
    return 0


cdef int batch_norm2d_forward_core(const floating* x, floating* out, Py_ssize_t B, Py_ssize_t C, Py_ssize_t P,
                                   const floating* weight, const floating* bias, floating* mean, floating* var,
                                   bint training, floating eps, int relu, int n_threads) noexcept nogil:
    """batch_norm2d_forward on raw pointers (also a frozen plan's step); -1 when scratch could not be allocated."""
    cdef Py_ssize_t L = C * P
    cdef Py_ssize_t c
    cdef floating m = B * P
    cdef floating* vecs
    cdef floating* coef
    if C == 0 or B * P == 0:
        return 0
    if P >= BN_PLANE:
        vecs = <floating*>malloc(2 * B * C * sizeof(floating))   # the per-plane partial sums
        coef = <floating*>malloc(C * sizeof(floating))
    else:
        vecs = <floating*>malloc(4 * L * sizeof(floating))       # the expanded per-position vectors
        coef = <floating*>malloc(2 * C * sizeof(floating))
    if vecs == NULL or coef == NULL:
        free(vecs)
        free(coef)
        return -1
    if P >= BN_PLANE:
        forward_planes(x, out, B, C, P, mean, var, training, weight, bias, eps, relu, vecs, coef, n_threads)
        free(vecs)
        free(coef)
        return 0
    if training:
        sum_images(x, NULL, NULL, NULL, B, C, P, 0, vecs + L, coef, n_threads, NULL, NULL)
        for c in range(C):
            mean[c] = coef[c] / m
        expand(mean, C, P, vecs)
        sum_images(x, NULL, vecs, NULL, B, C, P, 1, vecs + L, coef, n_threads, NULL, NULL)
        for c in range(C):
            var[c] = coef[c] / m
    for c in range(C):
        coef[c] = weight[c] * inv_std_of(var[c], eps)
    expand(mean, C, P, vecs)
    expand(coef, C, P, vecs + L)
    expand(bias, C, P, vecs + 2 * L)
    map_images(x, NULL, out, vecs, B, L, relu, NULL, n_threads)
    free(vecs)
    free(coef)
    return 0


def batch_norm2d_forward(const floating[:, :, :, ::1] x,   # IN  (B, C, H, W)
                         const floating[::1] weight,       # IN  (C,)
                         const floating[::1] bias,         # IN  (C,)
                         floating[::1] mean,               # IN (training: OUT) (C,)
                         floating[::1] var,                # IN (training: OUT) (C,), biased
                         bint training, floating eps,
                         floating[:, :, :, ::1] out,       # OUT (B, C, H, W)
                         int n_threads,
                         bint relu=False):                 # then max(., 0): batch norm and ReLU fused
    """out = (x - mean) * (weight / sqrt(var + eps)) + bias per channel (then max(out, 0) with relu); with training,
    mean and var are first computed from x (var biased) and written."""
    cdef fpstate fp
    cdef Py_ssize_t B = x.shape[0], C = x.shape[1], P = x.shape[2] * x.shape[3]
    cdef int rc
    if C == 0 or B * P == 0:
        return
    with nogil:
        fp = fp_enter_call()
        rc = batch_norm2d_forward_core(&x[0, 0, 0, 0], &out[0, 0, 0, 0], B, C, P, &weight[0], &bias[0], &mean[0],
                                       &var[0], training, eps, relu, n_threads)
        fp_leave_call(fp)
    if rc:
        raise MemoryError("batch_norm2d: could not allocate scratch")


def batch_norm2d_relu_max_pool2x2(const floating[:, :, :, ::1] x,     # IN  (B, C, H, W), H even, H * W >= BN_PLANE
                                  const floating[::1] weight,         # IN  (C,)
                                  const floating[::1] bias,           # IN  (C,)
                                  floating[::1] mean,                 # OUT (C,)
                                  floating[::1] var,                  # OUT (C,), biased
                                  floating eps,
                                  floating[:, :, :, ::1] out,         # OUT (B, C, H / 2, W / 2)
                                  long long[:, :, :, ::1] indices,    # OUT (B, C, H / 2, W / 2)
                                  int n_threads):
    """Training batch norm (the batch's statistics into mean and var), ReLU and 2x2 stride-2 max pooling in one
    pass over x: each plane of relu(batch_norm(x)) goes into a buffer of this thread (forward_planes' mapping,
    map_plane) and is pooled from there by max_pool2d's own 2x2 rows (max_pool_2x2_rows): out and indices are
    max_pool2d's of batch_norm2d_forward's relu output, bit for bit, and that full-size output is never written."""
    cdef fpstate fp, fps, fpc
    cdef Py_ssize_t B = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3], P = H * W
    cdef Py_ssize_t OH = H // 2, OW = W // 2, OHW = OH * OW
    cdef Py_ssize_t q, c
    cdef floating* partial
    cdef floating* coef
    cdef floating* plane
    cdef int failed = 0
    if H % 2 or W < 2 or P < BN_PLANE or B == 0:
        raise ValueError("batch_norm2d_relu_max_pool2x2: needs an even height, width >= 2 and planes of >= "
                         f"{BN_PLANE} values, got x of shape {tuple(x.shape)[:4]}")
    if (out.shape[0] != B or out.shape[1] != C or out.shape[2] != OH or out.shape[3] != OW
            or indices.shape[0] != B or indices.shape[1] != C or indices.shape[2] != OH or indices.shape[3] != OW):
        raise ValueError("batch_norm2d_relu_max_pool2x2: out and indices must be (B, C, H / 2, W / 2)")
    if weight.shape[0] != C or bias.shape[0] != C or mean.shape[0] != C or var.shape[0] != C:
        raise ValueError("batch_norm2d_relu_max_pool2x2: weight, bias, mean and var must hold one value per channel")
    partial = <floating*>malloc(2 * B * C * sizeof(floating))
    coef = <floating*>malloc(C * sizeof(floating))
    if partial == NULL or coef == NULL:
        free(partial)
        free(coef)
        raise MemoryError("batch_norm2d_relu_max_pool2x2: could not allocate scratch")
    with nogil:
        fpc = fp_enter_call()
        plane_statistics(&x[0, 0, 0, 0], B, C, P, &mean[0], &var[0], partial, n_threads)
        for c in range(C):
            coef[c] = weight[c] * inv_std_of(var[c], eps)
        fps = fp_suspend()
        with parallel(num_threads=n_threads):
            fp = fp_enter()
            plane = <floating*>malloc(P * sizeof(floating))
            for q in prange(B * C, schedule='static'):
                if plane == NULL:
                    flag_failure(&failed)
                    continue
                c = q % C
                map_plane(&x[0, 0, 0, 0] + q * P, plane, P, mean[c], coef[c], bias[c], True)
                max_pool_2x2_rows(plane, &out[0, 0, 0, 0] + q * OHW, &indices[0, 0, 0, 0] + q * OHW, 0, OH, OH, OW,
                                  W)
            free(plane)
            fp_leave(fp)
        fp_resume(fps)
        fp_leave_call(fpc)
    free(partial)
    free(coef)
    if failed:
        raise MemoryError("batch_norm2d_relu_max_pool2x2: could not allocate a plane buffer")


def batch_norm2d_relu_max_pool2x2_backward(const floating[:, :, :, ::1] grad_out,  # IN  (B, C, H / 2, W / 2)
                                           const long long[:, :, :, ::1] indices,  # IN  its forward's indices
                                           const floating[:, :, :, ::1] x,         # IN  (B, C, H, W)
                                           const floating[::1] weight,             # IN  (C,)
                                           const floating[::1] bias,               # IN  (C,) the forward's
                                           const floating[::1] mean,               # IN  (C,) batch mean
                                           const floating[::1] var,                # IN  (C,) batch variance
                                           floating eps,
                                           floating[:, :, :, ::1] grad_x,          # OUT (B, C, H, W)
                                           floating[::1] grad_weight,              # OUT (C,)
                                           floating[::1] grad_bias,                # OUT (C,)
                                           int n_threads):
    """Gradients of batch_norm2d_relu_max_pool2x2: max_pool2d_backward of grad_out by the indices, then
    batch_norm2d_backward through the ReLU (relu_bias: its sign from x), in one (backward_planes_pooled): each
    plane's pooling gradient made in grad_x (max_pool_plane_backward_2x2) and summed at once, then mapped in place.
    The bits of the two calls in a row. Returns the number of out-of-range indices (counted as the scatter skips
    them, as max_pool2d_backward does; then grad_x is not mapped: the caller raises)."""
    cdef fpstate fpc
    cdef Py_ssize_t B = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3], P = H * W
    cdef Py_ssize_t bad
    cdef Py_ssize_t* bad_per_plane
    cdef floating* partial
    cdef floating* coef
    if (P < BN_PLANE or B == 0 or grad_out.shape[0] != B or grad_out.shape[1] != C or 2 * grad_out.shape[2] != H
            or 2 * grad_out.shape[3] > W or tuple(indices.shape) != tuple(grad_out.shape)
            or tuple(grad_x.shape) != tuple(x.shape)):
        raise ValueError("batch_norm2d_relu_max_pool2x2_backward: needs grad_out and indices of (B, C, H / 2, W / 2) "
                         f"for x of (B, C, H, W) with H even and H * W >= {BN_PLANE}, and grad_x of x's shape")
    if (weight.shape[0] != C or bias.shape[0] != C or mean.shape[0] != C or var.shape[0] != C
            or grad_weight.shape[0] != C or grad_bias.shape[0] != C):
        raise ValueError("batch_norm2d_relu_max_pool2x2_backward: per-channel arrays must hold C values")
    partial = <floating*>malloc(2 * B * C * sizeof(floating))
    coef = <floating*>malloc(4 * C * sizeof(floating))
    bad_per_plane = <Py_ssize_t*>malloc(B * C * sizeof(Py_ssize_t))
    if partial == NULL or coef == NULL or bad_per_plane == NULL:
        free(partial)
        free(coef)
        free(bad_per_plane)
        raise MemoryError("batch_norm2d_relu_max_pool2x2_backward: could not allocate scratch")
    with nogil:
        fpc = fp_enter_call()
        bad = backward_planes_pooled(&grad_out[0, 0, 0, 0], &indices[0, 0, 0, 0], grad_out.shape[2],
                                     grad_out.shape[3], &x[0, 0, 0, 0], &bias[0], &grad_x[0, 0, 0, 0], B, C, H, W,
                                     &mean[0], &var[0], &weight[0], eps, &grad_weight[0], &grad_bias[0], partial,
                                     coef, bad_per_plane, n_threads)
        fp_leave_call(fpc)
    free(partial)
    free(coef)
    free(bad_per_plane)
    return bad


def batch_norm2d_backward(const floating[:, :, :, ::1] grad_out,  # IN  (B, C, H, W)
                          const floating[:, :, :, ::1] x,         # IN  (B, C, H, W)
                          const floating[::1] weight,             # IN  (C,)
                          const floating[::1] mean,               # IN  (C,) batch mean
                          const floating[::1] var,                # IN  (C,) batch variance, biased
                          floating eps,
                          floating[:, :, :, ::1] grad_x,          # OUT (B, C, H, W)
                          floating[::1] grad_weight,              # OUT (C,)
                          floating[::1] grad_bias,                # OUT (C,)
                          int n_threads,
                          relu_out=None,                          # IN  (B, C, H, W) or None
                          relu_bias=None):                        # IN  (C,) or None: the forward's bias
    """Gradients of the training-mode forward, whose mean and variance depend on x; with relu_out, of the fused
    forward (relu=True) whose output that was: grad_out is first passed through that ReLU (0 where relu_out <= 0).
    With relu_bias too (the forward's bias, weight the same as its weight), planes of 16 values and more take that
    ReLU's sign from x, recomputed as the forward computed it, and do not read relu_out, which may then be None
    (batch_norm2d_relu_max_pool2x2 never wrote it). Without relu_out:
    grad_x = k * (g - mean(g) - xhat * mean(g * xhat)), k = weight * inv_std, xhat = (x - mean) * inv_std,
    computed as (x - mean) * a + s + g * k with a = -k * inv_std^2 * sum(g * (x - mean)) / m, s = -k * sum(g) / m."""
    cdef fpstate fp, fps
    cdef Py_ssize_t B = x.shape[0], C = x.shape[1], P = x.shape[2] * x.shape[3]
    cdef Py_ssize_t L = C * P
    cdef Py_ssize_t c
    cdef floating m = B * P
    cdef floating inv, k
    cdef floating* vecs
    cdef floating* coef
    cdef const floating[:, :, :, ::1] y_v
    cdef const floating[::1] beta_v
    cdef const floating* y = NULL
    cdef const floating* beta = NULL
    if relu_out is not None:
        y_v = relu_out
        if y_v.shape[0] != B or y_v.shape[1] != C or y_v.shape[2] * y_v.shape[3] != P:
            raise ValueError("batch_norm2d_backward: relu_out must have x's shape")
        if B * P > 0:
            y = &y_v[0, 0, 0, 0]
    if relu_bias is not None:
        beta_v = relu_bias
        if beta_v.shape[0] != C:
            raise ValueError("batch_norm2d_backward: relu_bias must hold one value per channel")
        if C > 0 and P >= BN_PLANE:
            beta = &beta_v[0]
        elif relu_out is None and B * C * P > 0:
            raise ValueError(f"batch_norm2d_backward: relu_bias without relu_out needs planes of >= {BN_PLANE} "
                             "values")
    if C == 0:
        return
    if P >= BN_PLANE and B > 0:
        vecs = <floating*>malloc((2 * B * C + (max(1, n_threads) * P if y != NULL and beta == NULL else 0))
                                 * sizeof(floating))
        coef = <floating*>malloc(4 * C * sizeof(floating))
        if vecs == NULL or coef == NULL:
            free(vecs)
            free(coef)
            raise MemoryError("batch_norm2d_backward: could not allocate scratch")
        with nogil:
            fp = fp_enter_call()
            backward_planes(&grad_out[0, 0, 0, 0], &x[0, 0, 0, 0], y, beta, &grad_x[0, 0, 0, 0], B, C, P, &mean[0],
                            &var[0], &weight[0], eps, &grad_weight[0], &grad_bias[0], vecs, coef,
                            vecs + 2 * B * C if y != NULL and beta == NULL else NULL, n_threads)
            fp_leave_call(fp)
        free(vecs)
        free(coef)
        return
    vecs = <floating*>malloc(4 * L * sizeof(floating))
    coef = <floating*>malloc(4 * C * sizeof(floating))
    if vecs == NULL or coef == NULL:
        free(vecs)
        free(coef)
        raise MemoryError("batch_norm2d_backward: could not allocate scratch")
    with nogil:
        fp = fp_enter_call()
        expand(&mean[0], C, P, vecs)
        # the sums of g and of g * (x - mean) in one pass (vecs + 2L is free until the mapping's vectors)
        sum_images(&x[0, 0, 0, 0], &grad_out[0, 0, 0, 0], vecs, y, B, C, P, 3, vecs + L, &grad_bias[0], n_threads,
                   vecs + 2 * L, coef)
        for c in range(C):
            inv = inv_std_of(var[c], eps)
            k = weight[c] * inv
            grad_weight[c] = coef[c] * inv
            coef[C + c] = -k * inv * inv * coef[c] / m
            coef[2 * C + c] = -k * grad_bias[c] / m
            coef[3 * C + c] = k
        expand(coef + C, C, P, vecs + L)
        expand(coef + 2 * C, C, P, vecs + 2 * L)
        expand(coef + 3 * C, C, P, vecs + 3 * L)
        map_images(&x[0, 0, 0, 0], &grad_out[0, 0, 0, 0], &grad_x[0, 0, 0, 0], vecs, B, L, 0, y, n_threads)
        fp_leave_call(fp)
    free(vecs)
    free(coef)
