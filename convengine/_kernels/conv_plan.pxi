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
# Four ways to run these GEMMs, chosen per shape and direction (forward_path, grad_weight_path):
#   pointwise 1x1 kernels at stride 1, no padding: the input planes read in place as GEMM rows (grad_weight: as
#            the rows of a dot-product kernel, pointwise.h)
#   direct   stride 1: B rows read straight from zero-padded input rows at each tap's offset (no im2col)
#   pixels   output pixels as the GEMM's rows, output channels (grad_weight: input channels) as its columns,
#            tap by tap from zero-padded input rows: nothing wasted, for small and strided images; the forward
#            skips the taps that read only padding (a sixth of an 8x8 plane's under a 3x3 kernel)
#   im2col   the implicit im2col above, packed per block: any shape, e.g. 1 or 3 input channels
#
# Files: conv_common.pxi (geometry, packing, padded rows), this file (the choice of path per shape and
# direction, every threshold with the measurement behind it, the scratch each path allocates),
# conv_epilogue.pxi, conv_forward.pxi, conv_smallc.pxi (first layers), conv_grad_input.pxi,
# conv_grad_weight.pxi; depthwise.pxi for groups == channels.


# ---------------------------------------------------------------------------------------------------------------
# The thresholds that every choice below reads, in one place, each with what it trades off.

# The pixel path skips, panel by panel, the taps that read only padding (conv2d_forward_pixels); the direct kernels
# compute them. For float32 it takes a conv from the row-vector direct kernel where those are an eighth or more of
# the pixel-taps (pixels_skip_padding: 8x8 planes under a 3x3 kernel 16%, 10x10 13%, 12x12 11%, 4x4 31%) and the
# batch has at least PIXEL_SKIP_MIN_PIXELS output pixels: its weights, packed per tap, cost more to pack and are
# shared by fewer panels below that. Zen 4, fastest of 5 x 3-40 calls, GFLOP/s direct -> pixels, 3x3: batch 64, 1
# thread: 128x8x8 -> 128 109 -> 121, 256x8x8 -> 256 110 -> 123, 64x8x8 -> 64 103 -> 114, 32x8x8 -> 32 95 -> 101,
# 128x10x10 -> 128 98 -> 115, 128x6x6 -> 128 81 -> 121, 256x4x4 -> 256 106 -> 130, 64x4x4 -> 64 88 -> 112, 512x4x4
# -> 512 102 -> 105, 512x2x2 -> 512 100 -> 104, 5x5 64x8x8 -> 64 107 -> 137; 2 threads: 128x8x8 -> 128 211 -> 237,
# 256x8x8 -> 256 219 -> 245, 256x4x4 -> 256 202 -> 238; batch 16, 1 thread: 128x8x8 -> 128 109 -> 119, 256x8x8 ->
# 256 109 -> 120, 512x4x4 -> 512 99 -> 95. Left to the direct kernel: 128x12x12 -> 128 109 / 108, 64x16x16 -> 64
# 107 / 101 (2 threads 215 / 194), and batch 1 and 4 (128x8x8 -> 128 at batch 1 100 / 85, 512x4x4 -> 512 at batch
# 4 68 / 46). AVX-512 builds only: the AVX2 build's 6-pixel panels (16 registers) ran no faster than its direct
# kernel (batch 64, 1 thread, same machine: 128x8x8 -> 128 101 / 95, 256x4x4 -> 256 95 / 79, 64x8x8 -> 64 92 / 95).
cdef Py_ssize_t PIXEL_SKIP_MIN_PIXELS = 1024
# On Intel the row-vector direct kernel stays ahead on those shapes: skipping the padding taps does not pay for the
# pixel path's tile reloads there. Intel Xeon (AVX-512 + AMX, family 6 model 167, 2 vCPUs), batch 64, median of 3 x
# 7 calls, GFLOP/s direct / pixels, 1 thread: 128x8x8 -> 128 139 / 120, 256x8x8 -> 256 127 / 116, 64x8x8 -> 64 125
# / 110, 32x8x8 -> 32 109 / 101, 512x4x4 -> 512 131 / 110, 128x10x10 -> 128 123 / 125, 128x6x6 -> 128 104 / 111,
# 256x4x4 -> 256 130 / 128, 64x4x4 -> 64 97 / 98, 512x2x2 -> 512 95 / 95, 5x5 64x8x8 -> 64 139 / 142; 2 threads
# 266 / 229, 259 / 224, 241 / 212, 202 / 186, 249 / 204, 238 / 247, 192 / 190, 243 / 227, 160 / 150, 137 / 137,
# 265 / 264 (the transposed convs of grad_input follow: 128x8x8 113 / 108, 256x8x8 106 / 98). So the pixel path
# goes first only on AMD (pixels_first: set when the kernels load, by convengine._kernels from _cpu.is_amd();
# set_pixels_first for tests). A choice of the machine, never of the thread count: the bits stay the same on any
# number of threads.
cdef bint pixels_first = False


cdef bint switch_setting(bint* setting, flag):
    """What a maker-chosen switch (pixels_first here, winograd_grad_weight_on) held before; set to flag unless flag
    is None. The set_* functions' body."""
    cdef bint before = setting[0]
    if flag is not None:
        setting[0] = bool(flag)
    return before


def set_pixels_first(flag=None):
    """Whether float32 convs on small planes of large batches take the pixel path before the direct kernel
    (AVX-512 builds; by default on AMD only). With a flag, set it for every later call (tests), None: leave it;
    returns the setting before."""
    return bool(switch_setting(&pixels_first, flag))


# Most elements of per-thread padded input the direct paths may ask for; larger goes the im2col / GEMM way (a huge
# dilation over a tiny image would ask for gigabytes: im2col's buffers do not grow with it).
cdef Py_ssize_t MAX_DIRECT_SCRATCH = 1 << 24

# Output pixels per task of the pixel path: enough 8-pixel panels that packing and the store are paid for, few
# enough that a batch of small images still makes several tasks.
cdef Py_ssize_t PIXELS_PER_TASK = 256
# Output pixels per step of grad_weight's pixel path (the k depth of each tap's GEMM; its C tiles are loaded and
# stored once per tap and step). Intel Xeon (AVX-512, 2 MB L2), batch 64, GFLOP/s at 256 / 128 pixels, 2 threads:
# 64x128x8x8 -> 128 3x3 232 / 254-272, 32x256x8x8 -> 256 227 / 238-249, 32x64x56x56 -> 64 238 / 259-268,
# 64x32x32x32 -> 64 s2 212 / 222, 64x32x16x16 -> 64 263 / 265-274; 1 thread 125 / 139-153, 124 / 122-129,
# 120 / 130-153, 104 / 110-120, 131 / 135-143 (64 and 96 were no better, 512 and 1024 worse)
cdef Py_ssize_t GRAD_WEIGHT_PIXELS = 128

# The pixel path reduces over the input channels of each tap: below 8 the tile's load and store are not paid for
# (1-4 channel layers go to conv_smallc.pxi or im2col).
cdef Py_ssize_t PIXEL_MIN_CHANNELS = 8

# Deepest k block of the row-vector direct kernel (weight_block)
cdef Py_ssize_t ROWS_KMAX = 1152

# GEMM column tiles per block of the direct and im2col forward and of col2im's W^T dY: 8 tiles of NR columns keep
# the packed B block in L2 beside the A panel.
cdef Py_ssize_t BLOCK_TILES = 8


cdef inline Py_ssize_t block_columns(floating dummy) noexcept nogil:
    """Columns of the C block that a direct, im2col or col2im task computes at once."""
    return BLOCK_TILES * tile_n(<floating>0)


cdef inline Py_ssize_t grad_weight_columns(floating dummy) noexcept nogil:
    """Output pixels per row block of the direct grad_weight path: two K blocks of the GEMM's depth."""
    return 2 * block_k(<floating>0)


cdef inline bint mostly_used(Py_ssize_t used, Py_ssize_t padded) noexcept nogil:
    """At least three quarters of a padded size does useful work: the rule for tile padding (output channels in
    MR or NR tiles, the direct path's columns past the image edge). im2col wastes nothing but copies Kd values per
    output pixel, measured at about a third of the GEMM time: a path that wastes more than a quarter loses to it."""
    return 4 * used >= 3 * padded


cdef inline Py_ssize_t units_per_task(const ConvGeom* p, Py_ssize_t R, Py_ssize_t pixels) noexcept nogil:
    """Units (image, block of R output rows) per task of the pixel paths: about `pixels` output pixels
    (PIXELS_PER_TASK forward, GRAD_WEIGHT_PIXELS in grad_weight)."""
    return max(1, pixels // (R * p.OW))


# Pixels per plane from which 1x1 grad_weight takes the pointwise (dot-product) path: its tiles (4 x 4 channels on
# AVX-512) read whole planes of both operands in place, which pays on large planes (Zen 4, 1 thread, batch 64,
# GFLOP/s pointwise / pixels: 64x32x32 -> 64 58-65 / 44-57, 64x28x28 -> 64 72-73 / 61, 32x24x24 -> 64 56-59 / 54-55,
# 64x20x20 -> 64 59-60 / 59-62). Since the pixel path's channels-last copy is transposed in registers
# (ce_transpose_rows) it leads below that: 32x16x16 -> 64 77 / 79, 128x16x16 -> 128 55-59 / 72 (at 2 threads 83-112 /
# 138-143); 8x8 planes 58-63 / 69-85.
cdef Py_ssize_t POINTWISE_GRAD_WEIGHT_PIXELS = 400


# Output channels per group up to which the direct path may waste a third of its columns (not a quarter): im2col
# copies Kd values per output pixel whatever the channel count, the GEMM does Kg x Kd multiply-adds, so with few
# output channels the copy weighs more. LeNet-5's 6 -> 16, 5x5 layer on 14x14 (10 of 14 columns useful): direct
# 0.53 ms, im2col 0.75 ms forward; grad_weight 0.95 against 1.14 (Zen 4, 1 thread, batch 64).
cdef Py_ssize_t FEW_OUTPUT_CHANNELS = 16


cdef inline bint direct_columns_used(const ConvGeom* p, Py_ssize_t NR, Py_ssize_t NC,
                                     bint few_channels_pay) noexcept nogil:
    """Whether enough of the direct path's columns are useful: three quarters, or two thirds where the output
    channels are few (FEW_OUTPUT_CHANNELS) and few_channels_pay."""
    cdef Py_ssize_t R = direct_rows(p, NC)
    cdef Py_ssize_t used = R * p.OW, padded = round_up(R * padded_width(p), NR)
    if few_channels_pay and p.K // p.G <= FEW_OUTPUT_CHANNELS:
        return 3 * used >= 2 * padded
    return mostly_used(used, padded)


cdef bint use_direct(const ConvGeom* p, Py_ssize_t NR, Py_ssize_t NC) noexcept nogil:
    """Whether the direct path (stride 1: operand rows read straight from a zero-padded copy of a few input rows)
    beats implicit im2col. It computes padded_width - OW wasted columns per output row and pads a block to whole
    NR panels; im2col wastes nothing but copies Kd values per output pixel, measured at about a third of the GEMM
    time. So direct while at least ~75% of its columns are useful (two thirds with few output channels)."""
    cdef Py_ssize_t R
    if p.sh != 1 or p.sw != 1:
        return False
    R = direct_rows(p, NC)
    if (p.C // p.G) * (R + (p.KH - 1) * p.dh) > MAX_DIRECT_SCRATCH // padded_width(p):
        return False
    return direct_columns_used(p, NR, NC, True)


cdef inline bint rows_shifted(const ConvGeom* p) noexcept nogil:
    """Whether the row-vector direct kernel reads KW column-shifted copies of the input rows (rows of OW, no
    padding columns: a vector may then run on into the next output row) rather than zero-padded rows (whose
    vectors must each lie within one output row: OW a multiple of VL). Always for strides above 1: the copies
    then hold every sw-th column, one set per row phase (rows_phases)."""
    return p.OW % vlen(<float>0) != 0 or p.sh != 1 or p.sw != 1


cdef inline Py_ssize_t rows_phases(const ConvGeom* p) noexcept nogil:
    """Row phases of the shifted copies: tap kh reads input rows oh*sh + kh*dh - pt, that is row oh + (kh*dh)//sh
    of the copy of rows i*sh + (kh*dh)%sh; one phase at stride 1."""
    return min(p.sh, (p.KH - 1) * p.dh + 1)


cdef inline Py_ssize_t rows_reach(const ConvGeom* p) noexcept nogil:
    """Copy rows past a block's output rows that its taps read: (KH-1)*dh at stride 1."""
    return (p.KH - 1) * p.dh // p.sh


cdef inline bint rows_partial(const ConvGeom* p) noexcept nogil:
    """Whether the row-vector direct kernel's output planes end in a partial vector: neither rows nor planes are
    whole vectors (its blocks are then whole images)."""
    cdef Py_ssize_t VL = vlen(<float>0)
    return p.OW % VL != 0 and (p.OH * p.OW) % VL != 0


cdef inline bint use_direct_rows(const ConvGeom* p) noexcept nogil:
    """Whether a float32 stride-1 shape can take the row-vector direct kernel (conv2d_forward_direct_rows): its
    output rows, or else its output planes, are whole vectors, or fill at least 7/8 of the vectors they take
    (10x10 planes: 100 pixels in 7 vectors of 16; a 7x7 plane's 49 in 4 would waste a quarter), and one block's
    input copies stay small. Zen 4, 1 thread, padded-column direct path -> row vectors, batch 1 / 64: LeNet-5's
    6x14x14 -> 16 5x5 (10x10 planes) 10.2 -> 8.8 us / 498 -> 379 us; 16x14x14 -> 32 3x3 25.3 -> 22.1 / 1469 ->
    1267."""
    cdef Py_ssize_t VL = vlen(<float>0)
    cdef Py_ssize_t P = p.OH * p.OW
    if p.sh > 2 or p.sw > 2:
        return False
    if rows_partial(p) and 8 * P < 7 * round_up(P, VL):
        return False
    return (p.C // p.G) * rows_copies(p) * (min(direct_rows_rows(p), p.OH) + rows_reach(p)) <= (
        MAX_DIRECT_SCRATCH // rows_len(p))


cdef inline bint direct_rows_taken(const ConvGeom* p) noexcept nogil:
    """Whether forward_path takes the row-vector direct kernel, unforced, for a float32 shape it can take
    (use_direct_rows): kernels of more than one tap (1x1 kernels keep the pointwise, direct or pixel paths'
    choice)."""
    return p.KH * p.KW > 1 and use_direct_rows(p)


cdef inline Py_ssize_t rows_copies(const ConvGeom* p) noexcept nogil:
    """Copies of each input row the row-vector direct kernel keeps: KW shifted ones per row phase, or one
    zero-padded."""
    return p.KW * rows_phases(p) if rows_shifted(p) else 1


cdef inline Py_ssize_t rows_len(const ConvGeom* p) noexcept nogil:
    """Length of those copies: OW (shifted) or padded_width."""
    return p.OW if rows_shifted(p) else padded_width(p)


cdef inline Py_ssize_t rows_step(const ConvGeom* p) noexcept nogil:
    """The row-vector direct kernel's blocks are multiples of this many output rows: R*OW a multiple of VL (so
    that no vector crosses a block's or an image's end; OH*OW is one where rows are shifted), or whole images
    where planes end in a partial vector."""
    cdef Py_ssize_t VL = vlen(<float>0)
    cdef Py_ssize_t step = 1
    if rows_partial(p):
        return p.OH
    while (step * p.OW) % VL != 0:
        step = step + 1
    return step


cdef inline Py_ssize_t direct_rows_rows(const ConvGeom* p) noexcept nogil:
    """Output rows per block of the row-vector direct kernel at most: about block_columns pixels in whole
    rows_step's (balanced_rows may take fewer)."""
    cdef Py_ssize_t step = rows_step(p)
    return max(step, max(1, block_columns(<float>0) // p.OW) // step * step)


cdef Py_ssize_t busiest_thread_load(Py_ssize_t rows, Py_ssize_t R, Py_ssize_t G, Py_ssize_t mpanels,
                                    int n_threads) noexcept nogil:
    """Output rows x channel panels that the busiest of n_threads computes in conv2d_forward_direct_rows with blocks
    of R rows (the last one shorter): its G * blocks * msplit tasks handed out as OpenMP's static schedule does
    (contiguous runs, the first tasks % n_threads threads one task more)."""
    cdef Py_ssize_t nblk = (rows + R - 1) // R
    cdef Py_ssize_t msplit = min(n_threads, channel_blocks(G * nblk, mpanels, n_threads))
    cdef Py_ssize_t mchunk = (mpanels + msplit - 1) // msplit
    cdef Py_ssize_t ntask = G * nblk * msplit
    cdef Py_ssize_t t, task, u, rb, ip0, load, worst = 0, t0 = 0, cnt
    if msplit == 1:
        # four or more blocks per thread: whole blocks of R rows, the busiest thread's share rounded up
        return (ntask + n_threads - 1) // n_threads * R * mpanels
    for t in range(n_threads):
        cnt = ntask // n_threads + (1 if t < ntask % n_threads else 0)
        load = 0
        for task in range(t0, t0 + cnt):
            u = task // msplit
            rb = u % nblk
            ip0 = (task - u * msplit) * mchunk
            load = load + max(0, min(mpanels, ip0 + mchunk) - ip0) * (min(rows, (rb + 1) * R) - rb * R)
        worst = max(worst, load)
        t0 = t0 + cnt
    return worst


cdef inline Py_ssize_t balanced_rows(const ConvGeom* p, Py_ssize_t R, int n_threads) noexcept nogil:
    """Rows per block of the row-vector direct kernel for n_threads: from R down in whole-vector steps (to R/2, or
    to one step when the batch's rows make fewer than two blocks per thread), the size whose tasks load the
    busiest thread least (busiest_thread_load), the largest such. 64 8x8 images: 11 blocks of 48 rows left one of
    2 threads a block more, 0.965x the pixel path; 16 of 32 share evenly. One 16x16 image: blocks of 12 and 4 rows
    gave one thread three quarters of the work, 8 and 8 share it. Blocks never change a sum: bits stay the same."""
    cdef Py_ssize_t rows = p.B * p.OH
    cdef Py_ssize_t mpanels = round_up(p.K // p.G, CE_MR) // CE_MR
    cdef Py_ssize_t step = rows_step(p), Rt, best = R, cost, best_cost, lowest
    if n_threads <= 1:
        return R
    lowest = step if rows < 2 * n_threads * R else max(step, (R + 1) // 2)
    best_cost = busiest_thread_load(rows, R, p.G, mpanels, n_threads)
    Rt = R - step
    while Rt >= lowest:
        cost = busiest_thread_load(rows, Rt, p.G, mpanels, n_threads)
        if cost < best_cost:
            best = Rt
            best_cost = cost
        Rt = Rt - step
    return best


cdef struct RowsPlan:
    # conv2d_forward_direct_rows' blocking for one call: what the kernel runs and the scratch report counts
    Py_ssize_t R            # output rows per block (balanced_rows)
    Py_ssize_t nblk         # blocks over the batch's B * OH rows
    Py_ssize_t rows_in      # input rows per image a block reads (per row phase)
    Py_ssize_t seglen       # floats of one image's copied rows
    Py_ssize_t nseg         # images a block touches, at most: R // OH + 2
    Py_ssize_t segstride    # each segment followed by VL zeros that a plane's last, partial vector may read
    Py_ssize_t maxvec       # tile vectors of a block, at most
    Py_ssize_t msplit       # tasks per block, split over the output channels' panels
    Py_ssize_t mchunk       # panels per task


cdef inline RowsPlan rows_plan(const ConvGeom* p, int n_threads) noexcept nogil:
    """conv2d_forward_direct_rows' blocking for n_threads (RowsPlan)."""
    cdef RowsPlan r
    cdef Py_ssize_t mpanels = round_up(p.K // p.G, CE_MR) // CE_MR
    r.R = balanced_rows(p, direct_rows_rows(p), n_threads)
    r.nblk = (p.B * p.OH + r.R - 1) // r.R
    r.rows_in = min(r.R, p.OH) + rows_reach(p)
    r.seglen = (p.C // p.G) * rows_copies(p) * r.rows_in * rows_len(p)
    r.nseg = min(p.B, r.R // p.OH + 2)
    r.segstride = r.seglen + vlen(<float>0)
    r.maxvec = r.R * p.OW // vlen(<float>0) + r.nseg
    r.msplit = min(n_threads, channel_blocks(p.G * r.nblk, mpanels, n_threads))
    r.mchunk = (mpanels + r.msplit - 1) // r.msplit
    return r


# Forward strategies, in the order conv2d_forward_core tries them; `force_conv_path` pins one for the tests (a
# path that cannot take the shape falls back to the automatic choice).
cdef enum:
    PATH_AUTO = 0
    PATH_DIRECT = 1
    PATH_IM2COL = 2
    PATH_PIXELS = 3
    PATH_SMALLC = 4       # conv_smallc.pxi: forward of 1-4 channel float32 inputs
    PATH_POINTWISE = 5    # 1x1, stride 1, no padding: the input planes are the GEMM's B rows, read in place
    PATH_LANES = 6        # grad_weight only: dY's channels in the vector lanes (conv_grad_weight.pxi)
    PATH_WINOGRAD = 7     # forward, opt-in: taken only with weights packed for it (conv_winograd.pxi)


cdef int forced_path = PATH_AUTO


def force_conv_path(str name):
    """Pin conv2d's forward strategy ('direct', 'im2col', 'pixels', 'smallc', 'pointwise') for every later call, or
    restore the automatic choice ('auto'). For tests and benchmarks: each path must give the same answers."""
    global forced_path
    paths = {"auto": PATH_AUTO, "direct": PATH_DIRECT, "im2col": PATH_IM2COL, "pixels": PATH_PIXELS,
             "smallc": PATH_SMALLC, "pointwise": PATH_POINTWISE}
    if name not in paths:
        raise ValueError(f"unknown conv path {name!r}; expected one of {sorted(paths)}")
    forced_path = paths[name]


cdef inline int output_panel_nv(const ConvGeom* p, floating dummy) noexcept nogil:
    """Vectors per column panel of the pixel path, whose GEMM columns are a group's output channels (NR =
    output_panel_nv * VL): the tile that pads them least."""
    return pick_nv((p.K // p.G + vlen(<floating>0) - 1) // vlen(<floating>0))


cdef inline Py_ssize_t weight_block(const ConvGeom* p, floating dummy) noexcept nogil:
    """KC, the depth of the k blocks in which the forward packs W (pack_weights): the forward's kernels and a
    frozen plan's weights packed once (conv2d_pack) must agree on it."""
    # The row-vector direct kernel takes blocks of up to ROWS_KMAX (one for every 3x3 conv of up to 128 input
    # channels): each k block after the first reloads and stores its C tile, a tenth of the micro-kernel's time
    # outside its FMA loop. Zen 4, 1 thread, batch 64, A/B, GFLOP/s: 32x16x16 -> 64 93-95 -> 96-100, 64x8x8 -> 128
    # 95-102 -> 106-107 (earlier: 64x32x32 -> 64 100 -> 104, 128x16x16 -> 128 105 -> 109). A longer chain of
    # products rounds a little differently: LeNet-8x8's predict differs from forward by ~1e-6 of its logits' scale
    # (2.4e-6 at most over 20 seeds with KC 256 blocks, 4.3e-6 with one block).
    if floating is float:
        if direct_rows_taken(p):
            return balanced_block((p.C // p.G) * p.KH * p.KW, ROWS_KMAX)
    return balanced_block((p.C // p.G) * p.KH * p.KW, block_k(<floating>0))


cdef bint use_pixels(const ConvGeom* p, floating dummy) noexcept nogil:
    """Whether the pixel path can take the shape well: the output channels fill most of their NR-wide panels,
    each tap reduces over enough input channels to amortise the tile's load and store, and the padded rows of
    one unit stay small."""
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t NR = output_panel_nv(p, dummy) * vlen(<floating>0)
    if Cg < PIXEL_MIN_CHANNELS or not mostly_used(Kg, round_up(Kg, NR)):
        return False
    return Cg * window_rows(p, pixel_rows(p, PIXELS_PER_TASK)) <= MAX_DIRECT_SCRATCH // window_width(p)


cdef bint pixels_skip_padding(const ConvGeom* p) noexcept nogil:
    """Whether an eighth or more of the shape's pixel-taps read only padding (inside_taps, row by row and column by
    column): the pixel path skips those, the direct kernels compute them."""
    cdef Py_ssize_t o, lo, hi, rows = 0, cols = 0
    for o in range(p.OH):
        lo, hi = inside_taps(o, p.sh, p.pt, p.dh, p.KH, p.H)
        rows = rows + hi - lo
    for o in range(p.OW):
        lo, hi = inside_taps(o, p.sw, p.pl, p.dw, p.KW, p.W)
        cols = cols + hi - lo
    return 8 * rows * cols <= 7 * p.OH * p.KH * p.OW * p.KW


# Whether a shape can take the first-layer path of conv_smallc.pxi (forward only; float64 keeps the GEMM paths).
cdef inline bint smallc_fits(const ConvGeom* p, floating dummy) noexcept nogil:
    if floating is double:
        return False
    if forced_path != PATH_AUTO and forced_path != PATH_SMALLC:
        return False
    # and rows of output pixels that whole tiles pad by at most a seventh (stride-2 16-pixel rows, padded to 32,
    # ran at 30 GFLOP/s against 40 on the GEMM paths; 28-pixel rows in 32 pay; with a one-vector tile (smallc_nv)
    # the 16-pixel rows of a 32x32 stride-2 stem run at 60, Zen 4, 1 thread, batch 64)
    cdef Py_ssize_t VL = vlen(<floating>0)
    cdef Py_ssize_t tile = smallc_nv(p.OW, VL) * VL
    return (p.G == 1 and p.C <= 4 and p.dh == 1 and p.dw == 1 and p.sw <= 2 and p.KW <= 16
            and p.OW >= VL and 7 * ((p.OW + tile - 1) // tile * tile) <= 8 * p.OW)


cdef inline bint rows_beat_smallc(const ConvGeom* p) noexcept nogil:
    """Whether a shape that smallc could take runs faster on the row-vector direct kernel: output rows
    that smallc's tiles pad (the direct kernel's vectors run on across rows), or at most 16 output channels over
    27 or more taps (smallc's tile of output rows x channels then has few channels to share each input load). Zen
    4, 1 thread, batch 1 / 16 / 64, us smallc -> direct rows: 28-pixel rows: 1x28x28 -> 32 3x3 13.0 -> 9.4 / 178 ->
    127 / 798 -> 507, 3x32x32 -> 6 5x5 (LeNet-5) 17.6 -> 15.6 / 217 -> 215 / 869 -> 858, 3x32x32 -> 32 5x5 49 ->
    41 / 714 -> 617 / 2860 -> 2616; 32-pixel rows: 3 -> 8 3x3 9.7 -> 9.9 / 133 -> 100 / 446 -> 409, 3 -> 16 3x3
    14.8 -> 13.1 / - / 752 -> 723. Left to smallc: fewer taps (1x16x16 -> 16 3x3 3.2 -> 3.3 / 17 -> 22 / 68 -> 86;
    2 -> 16 3x3 b64 516 -> 544) and 32-pixel rows of more channels at large batches (3 -> 32 3x3 b64 1354 ->
    1489, 3 -> 64 5x5 6229 -> 7894: the direct kernel's stores into many 4 KiB-apart planes). The same rule holds
    at stride 2 (the direct kernel's strided copies), 3 x 3, batch 64 / 1: 3x56x56 -> 32 (28-pixel rows) 1.74-1.84
    -> 1.47-1.51 ms / 27.9 -> 20.4 us, 3x56x56 -> 16 0.98-1.0 -> 0.68 ms, 3x32x32 -> 16 350 -> 303 us, 3x32x32 ->
    8 182 -> 137 us; left to smallc: 3x32x32 -> 32 514 -> 521-537 us (8.9 -> 8.3 at batch 1), 3x64x64 -> 64 3.1-3.3
    -> 4.1-4.4 ms. It depends on the output channels: a frozen plan's channel slices follow the whole conv
    (conv2d_forward_core)."""
    cdef Py_ssize_t VL = vlen(<float>0)
    cdef Py_ssize_t tile = smallc_nv(p.OW, VL) * VL
    return (use_direct_rows(p)
            and (p.OW % tile != 0 or (p.K // p.G <= 16 and (p.C // p.G) * p.KH * p.KW >= 27)))


cdef inline bint use_smallc(const ConvGeom* p, floating dummy) noexcept nogil:
    """Whether a shape takes the first-layer path of conv_smallc.pxi: where it fits, unless the row-vector direct
    kernel is faster there (and smallc is not forced)."""
    if not smallc_fits(p, dummy):
        return False
    return forced_path == PATH_SMALLC or not rows_beat_smallc(p)


cdef inline int pointwise_nv(Py_ssize_t P, Py_ssize_t VL) noexcept nogil:
    """Vectors per tile row of the pointwise path for planes of P pixels: the wide tile while it pads P by at most
    a sixteenth (its 3 loads per 8 broadcasts feed 24 FMAs, the narrow tile's 2 only 16: 64x64x32x32 -> 64 ran at
    53 GFLOP/s narrow, 57 wide, Zen 4, 1 thread; 16x16 planes, padded by an eighth, ran faster narrow: 81 against
    76), else the one that pads least (8x8 planes: 64 columns in 2 x 32, not 2 x 48)."""
    cdef Py_ssize_t wide = CE_NV * VL
    if 16 * P >= 15 * round_up(P, wide):
        return CE_NV
    return pick_nv((P + VL - 1) // VL)


cdef inline bint use_pointwise(const ConvGeom* p, floating dummy) noexcept nogil:
    """Whether the pointwise path takes the shape: a 1x1 kernel at stride 1 without padding (the GEMM's B rows are
    then the input planes), planes that fill most of their column panels (a 4x4 plane would fill half of a
    32-wide panel: the pixel path packs pixels across images), and a packed last panel of sane size. Measured
    (Zen 4, 1 thread, batch 64; 32x16x16 -> 64, 64x8x8 -> 128, 128x8x8 -> 128): 82-102 GFLOP/s against 40-59 on the
    direct and pixel paths and 55-64 on im2col."""
    cdef Py_ssize_t VL = vlen(<floating>0)
    cdef Py_ssize_t P = p.H * p.W
    cdef Py_ssize_t NR = pointwise_nv(P, VL) * VL
    return (p.KH == 1 and p.KW == 1 and p.sh == 1 and p.sw == 1 and p.pt == 0 and p.pl == 0
            and p.OH == p.H and p.OW == p.W and mostly_used(P, round_up(P, NR))
            and (p.C // p.G) <= MAX_DIRECT_SCRATCH // NR)


cdef inline Py_ssize_t channel_blocks(Py_ssize_t units, Py_ssize_t mpanels, int n_threads) noexcept nogil:
    """Blocks of output channel panels per unit (image, group, block of rows or columns) of the pointwise, direct
    and pixel paths: one while the units give every thread four tasks, else enough blocks that they do (batch 1:
    a 16x16 image was one task of the pixel path, and its second thread idle). Which task computes an element
    never changes its sum, so this may follow the thread count."""
    if n_threads <= 1 or units >= 4 * n_threads:
        return 1
    return max(1, min(mpanels, (4 * n_threads + units - 1) // units))


cdef int forward_path(const ConvGeom* p, floating dummy) noexcept nogil:
    """The forward strategy for a (non-depthwise) shape: the pointwise path for 1x1 kernels that it takes, the
    direct path where its dropped columns are few, else the pixel path where it fits, else implicit im2col. A
    forced path is taken where it can be."""
    cdef Py_ssize_t NR = tile_n(<floating>0)
    cdef bint direct = use_direct(p, NR, block_columns(<floating>0))
    cdef bint pointwise = use_pointwise(p, dummy)
    cdef bint pixels = use_pixels(p, dummy)
    cdef bint rows = False
    if floating is float:
        rows = direct_rows_taken(p)
    if forced_path == PATH_DIRECT and (direct or rows):
        return PATH_DIRECT
    if forced_path == PATH_IM2COL:
        return PATH_IM2COL
    if forced_path == PATH_PIXELS and pixels:
        return PATH_PIXELS
    if pointwise:
        return PATH_POINTWISE
    # the row-vector direct kernel (float32, output rows or planes of whole vectors) wherever it can go: no
    # dropped columns, each k block reduced in registers (the pixel path reloaded its tile per tap), KW copies of
    # the input per pixel (im2col copies KH*KW). Zen 4, 1 thread, batch 64 / batch 1, pixels -> direct rows,
    # GFLOP/s: 64x8x8 -> 128 93 -> 99 / 71 -> 88; 128x8x8 -> 128 96 -> 100; 128x4x4 -> 256 95 -> 101 / 36 -> 66;
    # 64x12x12 -> 64 77 -> 97; im2col -> direct rows: 16x8x8 -> 20 32 -> 57, 8x8x8 -> 20 34 -> 58. (Those
    # pixel-path figures predate its skipping of padding taps: where padding is an eighth of the taps, and the
    # batch large, the pixel path now goes first; see PIXEL_SKIP_MIN_PIXELS.)
    if floating is float:
        if (CE_VBYTES == 64 and pixels_first and pixels and p.B * p.OH * p.OW >= PIXEL_SKIP_MIN_PIXELS
                and pixels_skip_padding(p)):
            return PATH_PIXELS
    if direct or rows:
        return PATH_DIRECT
    if pixels:
        return PATH_PIXELS
    return PATH_IM2COL


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


cdef bint grad_input_as_conv(const ConvGeom* q, floating dummy) noexcept nogil:
    """Whether grad_input goes as the forward conv of the transposed geometry q: by its direct path when the
    tile's MR rows (q's output channels) are mostly used, or by its pixel or pointwise path."""
    cdef int path = forward_path(q, dummy)
    if path == PATH_POINTWISE:
        return True
    if path == PATH_DIRECT:
        if floating is float:
            # the row-vector kernel wastes no columns; it also takes the shapes the pixel path took. Not planes
            # ending in a partial vector with a partial MR-row tile: the transposed conv of LeNet-5's 6 -> 16
            # layer (10x10 dY, 14x14 dx, 6 of 8 rows) took 1.03 ms there against 0.83 by the lanes kernel (Zen 4,
            # batch 64, 1 thread); with whole tiles it pays (16x14x14 <- 32 3x3: 1.49 -> 1.38)
            if use_direct_rows(q):
                if rows_partial(q) and (q.K // q.G) % CE_MR != 0:
                    return False
                return mostly_used(q.K // q.G, round_up(q.K // q.G, CE_MR)) or use_pixels(q, dummy)
        # three quarters of the columns (the transposed conv of LeNet-5's 6 -> 16 layer, 10 of 14 useful, was
        # slower than col2im: 1.31 against 1.20 ms)
        return (mostly_used(q.K // q.G, round_up(q.K // q.G, CE_MR))
                and direct_columns_used(q, tile_n(<floating>0), block_columns(<floating>0), False))
    return path == PATH_PIXELS


cdef inline bint use_grad_input_phases(const ConvGeom* p) noexcept nogil:
    """Whether float32 grad_input goes as four stride-1 convs, one per parity of the input pixels
    (conv2d_grad_input_phases): stride 2 both ways, dilation 1, every phase's padding non-negative (padding at
    most the kernel's reach, as transposed_geometry asks at stride 1), and enough input channels for the MR-row
    tile (an RGB layer's 3 would fill 3 of its 8 rows: col2im wastes nothing there)."""
    cdef ConvGeom q
    cdef Py_ssize_t kh0, kw0, a
    if p.sh != 2 or p.sw != 2 or p.dh != 1 or p.dw != 1 or p.H < 2 or p.W < 2 or is_depthwise(p):
        return False
    if not mostly_used(p.C // p.G, round_up(p.C // p.G, CE_MR)):
        return False
    for a in range(4):
        if not phase_geometry(p, a // 2, a % 2, &q, &kh0, &kw0):
            return False
    return True


cdef inline bint use_grad_input_lanes(const ConvGeom* p, floating dummy) noexcept nogil:
    """Whether grad_input goes by the lane-reduction kernel: float32, stride 1, dilation 1, one group, 16 or fewer
    output channels filling whole vectors, a kernel of at least 2x2, and 3 to 12 input channels (the caller tries
    the transposed direct path first, which takes those that fill its MR-row tile). Zen 4, batch 64, 1 thread, ms
    col2im -> lanes: 6x14x14 <- 16 5x5 (LeNet-5) 1.17 -> 0.91-1.0, 3x32x32 <- 16 3x3 1.75 -> 1.64; but 1x28x28 <- 16
    5x5 1.3 -> 2.1-2.6 (two of the tile's three channels empty), and with 32 or 64 output channels the
    channels-last rows leave L2 and the copy into them costs more (3x32x32 <- 64: 5.45 -> 6.5)."""
    return (floating is float and p.G == 1 and p.sh == 1 and p.sw == 1 and p.dh == 1 and p.dw == 1
            and p.K % vlen(<float>0) == 0 and p.K <= 16 and p.KH * p.KW >= 4 and 3 <= p.C <= 4 * CE_GI_CB
            and p.OH >= 1 and p.OW >= 1)


cdef inline Py_ssize_t grad_input_lanes_cols(const ConvGeom* p) noexcept nogil:
    """Columns of the channels-last dY rows: every tile's taps read inside (pixels padded to whole tiles)."""
    return max(p.OW + 2 * (p.KW - 1), round_up(p.W, CE_GI_NP) + p.pl + p.KW - 1)


cdef inline Py_ssize_t grad_input_lanes_floats(const ConvGeom* p) noexcept nogil:
    """Floats of one task's scratch: the channels-last, zero-bordered dY rows of one image."""
    return (p.OH + 2 * (p.KH - 1)) * grad_input_lanes_cols(p) * p.K


cdef inline bint col2im_phased(const ConvGeom* p, floating dummy) noexcept nogil:
    """Whether grad_input's col2im scatters through phase-split planes (see col2im_add_phased): column stride > 1
    and the planes of a task's images within MAX_DIRECT_SCRATCH elements."""
    cdef Py_ssize_t per_task = max(1, min(p.B, 8 * tile_n(<floating>0) // (p.OH * p.OW)))
    return p.sw > 1 and (p.C // p.G) * p.H * p.sw * phase_width(p) <= MAX_DIRECT_SCRATCH // per_task


cdef inline Py_ssize_t grad_weight_chunks(Py_ssize_t units, Py_ssize_t unit_pixels) noexcept nogil:
    """How many fixed slices of the pixels grad_weight reduces separately (then sums in order): about 2048+
    pixels each, at most 16, a power of two. A function of the shape only, never of the thread count."""
    return pow2_floor(min(16, min(units, units * unit_pixels // 2048)))


cdef inline Py_ssize_t channel_panel(const ConvGeom* p, floating dummy) noexcept nogil:
    """NR of grad_weight's pixel path, whose GEMM columns are the group's input channels."""
    cdef Py_ssize_t VL = vlen(<floating>0)
    return pick_nv((p.C // p.G + VL - 1) // VL) * VL


cdef bint use_pixels_grad_weight(const ConvGeom* p, floating dummy) noexcept nogil:
    """Whether grad_weight's pixel path fits: the input channels fill most of their NR-wide panels, the output
    channels most of the MR-row tile, and one unit's padded rows stay small."""
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Cgpad = round_up(Cg, channel_panel(p, dummy))
    if not mostly_used(Cg, Cgpad) or not mostly_used(Kg, round_up(Kg, CE_MR)):
        return False
    return (window_rows(p, pixel_rows(p, GRAD_WEIGHT_PIXELS)) * pixel_stride(Cgpad, dummy)
            <= MAX_DIRECT_SCRATCH // window_width(p))


cdef inline Py_ssize_t pixel_chunks(const ConvGeom* p) noexcept nogil:
    """Fixed slices of the units that grad_weight's pixel path reduces separately: about GRAD_WEIGHT_PIXELS pixels
    or more each, at most 16 and a power of two, and at most 2^20 partial-sum elements in all; a function of the
    shape only."""
    cdef Py_ssize_t R = pixel_rows(p, GRAD_WEIGHT_PIXELS)
    cdef Py_ssize_t units = p.B * ((p.OH + R - 1) // R)
    cdef Py_ssize_t per_chunk = (p.C // p.G) * p.KH * p.KW * p.K
    return pow2_floor(min(min(16, (1 << 20) // per_chunk), min(units, units * R * p.OW // GRAD_WEIGHT_PIXELS)))


cdef inline Py_ssize_t pixel_msplit(const ConvGeom* p, Py_ssize_t nchunks, Py_ssize_t mpanels,
                                    int n_threads) noexcept nogil:
    """Blocks of M panels per chunk of grad_weight's pixel path: where its chunks are fewer than the threads, each
    chunk's output channels are cut into blocks, one task each, so that every thread has one. Each output element is
    still one task's sum over the chunk's units in the same order, so the bits do not depend on the split (nor on
    the thread count). With 256 channels the partial sums' cap left one chunk, one task: 64x256x8x8 -> 256 ran at 88
    GFLOP/s on 2 threads where 128 channels ran at 190, 165 with the split (203-208 since a step is one k block; AMD
    EPYC Zen 4). More blocks than threads only copy the input's rows again: eight, or blocks sized to keep a task's
    accumulators within 256 KB-1 MB, gave 125-144 GFLOP/s at 2 threads on 256 channels against 159-173 with one per
    thread, and nothing at 1 thread."""
    cdef Py_ssize_t tasks = p.G * nchunks
    if tasks >= n_threads:
        return 1
    return min(mpanels, (n_threads + tasks - 1) // tasks)


cdef inline Py_ssize_t pixel_stride(Py_ssize_t Cgpad, floating dummy) noexcept nogil:
    """Distance between pixels in grad_weight's channels-last rows: Cgpad, plus a vector when that is a multiple
    of 256 bytes (with 128 channels, 512 bytes, a B panel's rows fell into 8 of the 64 L1 sets and evicted
    each other)."""
    if (Cgpad * sizeof(floating)) % 256 == 0:
        return Cgpad + vlen(<floating>0)
    return Cgpad


cdef inline bint use_smallc_grad_weight(const ConvGeom* p, floating dummy) noexcept nogil:
    """grad_weight of 1-4 channel float32 first layers at stride 1 or 2 (conv_smallc.pxi), where its scratch is
    small; the caller also needs finite inputs (the rows' zero-padded tails multiply x). A stride-2 stem went by
    im2col before (Zen 4, 64x3x32x32 -> 32 3x3 s2: 31 GFLOP/s at 1 thread)."""
    if floating is double:
        return False
    if forced_path != PATH_AUTO and forced_path != PATH_SMALLC:
        return False
    return (p.G == 1 and p.C <= 4 and p.sh == p.sw and p.sw <= 2 and p.dh == 1 and p.dw == 1
            and smallc_gw_floats(p) <= MAX_DIRECT_SCRATCH)


cdef inline bint use_grad_weight_lanes(const ConvGeom* p, floating dummy) noexcept nogil:
    """grad_weight of few-channel float32 layers at stride 1 whose 16 or fewer output channels fill whole vectors,
    by dY's channels in the lanes (conv_grad_weight.pxi), kernels 2-5 wide. Zen 4, batch 64, 1 thread, ms against
    the direct path: LeNet-5's 6x14x14 -> 16 5x5 0.96 -> 0.44; 8x16x16 -> 16 3x3 1.02 -> 0.65-0.91; but 16x16x16 ->
    32 3x3 2.0 -> 2.3-2.5 (144 taps in six tiles, each reading every dY vector again): C <= 8, K <= 16. Not under a
    forced path."""
    if floating is double:
        return False
    return (forced_path == PATH_AUTO and p.G == 1 and 4 < p.C <= 8 and p.K % vlen(<float>0) == 0
            and p.K <= 16 and p.sh == 1 and p.sw == 1 and p.dh == 1 and p.dw == 1 and 2 <= p.KW <= 5
            and CE_GW_T // p.KW <= 12)


cdef inline Py_ssize_t grad_weight_lanes_floats(const ConvGeom* p) noexcept nogil:
    """Floats of one task's scratch: an image's zero-bordered planes, its dY channels-last, the accumulators."""
    return (p.C * (p.OH + p.KH - 1) * (p.OW + p.KW - 1) + p.OH * p.OW * p.K + p.C * p.KH * p.KW * p.K)


cdef int grad_weight_path(const ConvGeom* p, floating dummy) noexcept nogil:
    """grad_weight's strategy: the pointwise path for the 1x1 kernels it takes, the pixel path where it fits (it
    wastes nothing and measured as fast as or faster than the others on every benchmark shape), else as
    forward_path chooses. The direct path needs finite inputs
    too, checked by the caller."""
    cdef bint direct = use_direct(p, tile_n(<floating>0), grad_weight_columns(<floating>0))
    if use_smallc_grad_weight(p, dummy):
        return PATH_SMALLC
    if use_grad_weight_lanes(p, dummy):
        return PATH_LANES
    if use_pointwise(p, dummy) and (forced_path == PATH_POINTWISE or (
            forced_path == PATH_AUTO and p.H * p.W >= POINTWISE_GRAD_WEIGHT_PIXELS)):
        return PATH_POINTWISE
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


cdef Py_ssize_t forward_scratch(const ConvGeom* q, floating dummy, Py_ssize_t T) noexcept nogil:
    """Bytes conv2d_forward_core allocates for geometry q with T threads, path by path."""
    cdef Py_ssize_t isz = sizeof(floating), ptr = sizeof(void*)
    cdef Py_ssize_t NR = tile_n(<floating>0), NC = block_columns(<floating>0), LD = NC + vlen(<floating>0)
    cdef Py_ssize_t Cg = q.C // q.G, Kg = q.K // q.G, Kd = Cg * q.KH * q.KW, taps = q.KH * q.KW
    cdef Py_ssize_t KC = weight_block(q, dummy)
    cdef Py_ssize_t Mpad = round_up(Kg, CE_MR)
    cdef Py_ssize_t Wp, R, rows_in, ncmax, upt, maxpix, Npad, VL = vlen(<floating>0)
    cdef RowsPlan rp
    cdef int path = forward_path(q, dummy)
    if use_smallc(q, dummy):
        return smallc_scratch(q, T)
    if path == PATH_PIXELS:
        Npad = round_up(Kg, output_panel_nv(q, dummy) * VL)
        R = pixel_rows(q, PIXELS_PER_TASK)
        upt = units_per_task(q, R, PIXELS_PER_TASK)
        maxpix = round_up(upt * R * q.OW, CE_MR)
        # the packed weights; the tap offsets and each output row's and column's inside taps; per thread the
        # units' padded rows, the C block, the pixels' A rows and offsets in y, each panel's taps
        return ((q.G * taps * Npad * Cg + T * (upt * Cg * window_rows(q, R) * window_width(q) + maxpix * Npad)) * isz
                + (taps + 3 * (q.OH + q.OW)) * sizeof(Py_ssize_t) + T * (maxpix + CE_MR + taps * Cg) * ptr
                + T * (maxpix + 4 * (maxpix // CE_MR) + taps) * sizeof(Py_ssize_t))
    if path == PATH_POINTWISE:
        NR = pointwise_nv(q.H * q.W, VL) * VL
        return q.G * Mpad * Kd * isz + T * ((CE_MR * NR + Cg * (BLOCK_TILES * NR + VL)) * isz + (Cg + CE_MR) * ptr
                                             + (q.H * q.W // VL + 1) * sizeof(Py_ssize_t))
    if path == PATH_DIRECT and floating is float and use_direct_rows(q):
        # conv2d_forward_direct_rows: per thread a block's segments of input rows, three offsets per vector, the
        # taps
        rp = rows_plan(q, T)
        return (q.G * Mpad * Kd + T * rp.nseg * rp.segstride) * isz + T * (
            (3 * rp.maxvec + 2) * sizeof(Py_ssize_t) + Kd * ptr)
    if path == PATH_DIRECT:
        Wp = padded_width(q)
        R = direct_rows(q, NC)
        rows_in = R + (q.KH - 1) * q.dh
        ncmax = round_up(R * Wp, NR)
        return (q.G * Mpad * Kd + T * (Cg * rows_in * Wp + ncmax + (q.KW - 1) * q.dw + Mpad * ncmax)) * isz + T * (
            Kd + Mpad) * ptr
    return (q.G * Mpad * Kd + T * (KC * LD + Mpad * NC)) * isz + T * (KC + Mpad) * ptr


cdef struct PhasePlan:
    # conv2d_grad_input_phases' layout for one call: what the kernel runs and the scratch report counts
    Py_ssize_t top, left    # where dY sits in each image's zero-bordered copy
    Py_ssize_t Hp, Wp       # rows and columns of that copy: every tap of every phase reads inside it
    Py_ssize_t nimg         # images per task
    Py_ssize_t maxvec       # tile vectors of one phase of a task, at most (one per VL pixels of a row)
    Py_ssize_t maxtaps      # taps (k, u, v) of the largest phase: Kg * KHq * KWq
    Py_ssize_t packoff[4]   # where each phase's packed weights start (a phase without taps has none)
    Py_ssize_t packed       # floats of the four phases' packed weights
    Py_ssize_t per_thread   # floats a thread holds: nimg bordered dY copies (+ VL of slack) and their phases


# Floats of a task's phase outputs (nimg * C * H * W): with its bordered dY copies they stay in a core's L2 until
# interleaved into dx (Zen 4: 1 MiB). Not sensitive: AMD EPYC Zen 4, 3 rounds, GFLOP/s at 1 | 2 threads for 32768 /
# 98304 / 262144 floats: 64x32x32x32 -> 64 88-91 / 90-92 / 91-92 | 173-177 / 171-174 / 174-180; 32x64x56x56 -> 64
# 81-86 / 85 / 85 | 165-167 / 165-168 / 164-168.
cdef Py_ssize_t PHASE_TASK_FLOATS = 98304


cdef PhasePlan phase_plan(const ConvGeom* p, Py_ssize_t n_threads) noexcept nogil:
    """conv2d_grad_input_phases' layout for n_threads (PhasePlan). Tasks of about PHASE_TASK_FLOATS of output,
    at least two per thread where the batch allows (the bits do not depend on it: each element is the same sum
    whichever tile computes it)."""
    cdef ConvGeom q
    cdef PhasePlan r
    cdef Py_ssize_t kh0, kw0, a, VL = vlen(<float>0), Cg = p.C // p.G, Kg = p.K // p.G
    r.top = r.left = r.maxvec = r.maxtaps = r.packed = 0
    for a in range(4):
        phase_geometry(p, a // 2, a % 2, &q, &kh0, &kw0)
        if q.KH > 0 and q.KW > 0:
            r.top = max(r.top, q.pt)
            r.left = max(r.left, q.pl)
    r.Hp = r.top + p.OH
    r.Wp = r.left + p.OW
    for a in range(4):
        phase_geometry(p, a // 2, a % 2, &q, &kh0, &kw0)
        r.packoff[a] = r.packed
        if q.KH > 0 and q.KW > 0:
            r.Hp = max(r.Hp, r.top - q.pt + q.OH + q.KH - 1)
            r.Wp = max(r.Wp, r.left - q.pl + q.OW + q.KW - 1)
            r.maxtaps = max(r.maxtaps, Kg * q.KH * q.KW)
            r.packed = r.packed + p.G * round_up(Cg, CE_MR) * Kg * q.KH * q.KW
            r.maxvec = max(r.maxvec, q.OH * ((q.OW + VL - 1) // VL))
    r.nimg = max(1, min(min(p.B, PHASE_TASK_FLOATS // max(1, p.C * p.H * p.W)), p.B // (2 * max(1, n_threads))))
    r.maxvec = r.maxvec * r.nimg
    r.per_thread = r.nimg * (p.K * r.Hp * r.Wp + p.C * p.H * p.W) + VL
    return r


cdef bint phase_rows_in_place(const ConvGeom* p) noexcept nogil:
    """Whether conv2d_grad_input_phases reads the phases' taps in place, a vector per VL pixels of a phase row:
    where those vectors are mostly used in every phase (rows of 12 pixels or more on AVX-512); shorter rows go
    by conv2d_grad_input_phase_convs. Zen 4, 1 thread, ms phase convs -> in place: 64x32x32x32 -> 64 (16-pixel
    rows) 7.5 -> 6.5, 64x128x28x28 -> 128 (14) 43.0 -> 40.8, 32x64x56x56 -> 64 (28: 16 + 12) 22.1 -> 21.7;
    but 64x32x14x14 -> 64 (7) 1.80 -> 2.73."""
    cdef ConvGeom q
    cdef Py_ssize_t kh0, kw0, a, VL = vlen(<float>0)
    for a in range(4):
        phase_geometry(p, a // 2, a % 2, &q, &kh0, &kw0)
        if q.KH > 0 and q.KW > 0 and not mostly_used(q.OW, round_up(q.OW, VL)):
            return False
    return True


cdef Py_ssize_t grad_input_phases_scratch(const ConvGeom* p, Py_ssize_t T) noexcept nogil:
    """conv2d_grad_input_phases: the packed weights of the four phases, then per thread its PhasePlan floats, three
    offsets per vector and a tap table."""
    cdef PhasePlan pp = phase_plan(p, T)
    return (pp.packed + T * pp.per_thread) * sizeof(float) + T * (
        3 * pp.maxvec * sizeof(Py_ssize_t) + pp.maxtaps * sizeof(void*))


cdef Py_ssize_t grad_input_phase_convs_scratch(const ConvGeom* p, Py_ssize_t T) noexcept nogil:
    """conv2d_grad_input_phase_convs: the phase outputs of a few images and each phase's taps, then the largest of the
    phase convs' own scratch (they run one after another)."""
    cdef ConvGeom q
    cdef Py_ssize_t kh0, kw0, a, nb = phase_images(p, T), total, most = 0
    total = nb * p.C * p.H * p.W * sizeof(float)
    for a in range(4):
        phase_geometry(p, a // 2, a % 2, &q, &kh0, &kw0)
        if q.KH > 0 and q.KW > 0:
            q.B = nb
            total = total + p.C * (p.K // p.G) * q.KH * q.KW * sizeof(float)
            most = max(most, forward_scratch(&q, <float>0, T))
    return total + most


cdef inline Py_ssize_t phase_images(const ConvGeom* p, Py_ssize_t n_threads) noexcept nogil:
    """Images per round of conv2d_grad_input_phase_convs: their four phase outputs about 1 MiB of float32 per thread
    (each round is five OpenMP regions; a larger share left L2 at 1 thread)."""
    return max(1, min(p.B, (1 << 18) * max(1, n_threads) // max(1, p.C * p.H * p.W)))


cdef dict scratch_bytes(const ConvGeom* p, floating dummy, Py_ssize_t T):
    """Bytes each conv2d direction allocates per call with T threads, following the same path choices as the
    kernels (packed weights, per-thread panels and padded rows, grad_weight's per-chunk partial sums; grad_weight
    as called with grad_bias). Never the im2col matrix of the batch: everything per thread is bounded by the
    blocking constants and one block of padded input rows."""
    cdef Py_ssize_t isz = sizeof(floating), ptr = sizeof(void*)
    cdef Py_ssize_t NR = tile_n(<floating>0), NC = block_columns(<floating>0), LD = NC + vlen(<floating>0)
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G, Kd = Cg * p.KH * p.KW, taps = p.KH * p.KW
    cdef Py_ssize_t KCmax = block_k(<floating>0), KC, Mpad, R, rows_in, ncmax, Wp, nchunks, Npad, nv, upt, maxpix
    cdef Py_ssize_t VL = vlen(<floating>0)
    cdef ConvGeom q
    cdef int path
    cdef dict out = {}
    if is_depthwise(p):
        # per thread a padded plane (or its phases) and a row buffer; the taps' offsets; grad_weight's lanes;
        # grad_input at stride 1 is the forward of the transposed geometry on reversed taps
        out["forward"] = T * (
            max(dw_padded_h(p) * dw_padded_w(p) + dw_slack(p), dw_phased_len(p) if dw_phased(p) else 0)
            + p.OH * dw_padded_w(p)) * isz + taps * sizeof(Py_ssize_t)
        out["grad_input"] = T * (max(dw_padded_h(p) * dw_padded_w(p) + dw_slack(p), dw_phased_len(p))
                                 + p.OH * dw_padded_w(p)) * isz
        out["grad_weight"] = out["grad_input"] + T * 16 * taps * isz + taps * sizeof(Py_ssize_t)
        if dw_phased(p):
            out["forward"] = T * (dw_phased_len(p) + p.OH * dw_phase_w(p) + 2 * VL) * isz + taps * sizeof(Py_ssize_t)
        else:
            out["forward"] += T * 2 * VL * isz
        if transposed_geometry(p, &q) and is_depthwise(&q):
            out["grad_input"] = p.C * taps * isz + T * (
                dw_padded_h(&q) * dw_padded_w(&q) + dw_slack(&q) + q.OH * dw_padded_w(&q) + 2 * VL) * isz + (
                taps * sizeof(Py_ssize_t))
            if dw_small_kernel(&q, dummy) != DW_GENERAL:
                out["grad_input"] = p.C * taps * isz        # the reversed taps only
        # the whole-plane kernels read x and write y directly
        if dw_small_kernel(p, dummy) != DW_GENERAL:
            out["forward"] = out["grad_weight"] = 0
            if dw_small_kernel(p, dummy) == DW_3X3S2_W16:
                out["grad_input"] = 0
        return out
    out["forward"] = forward_scratch(p, dummy, T)
    if transposed_geometry(p, &q) and grad_input_as_conv(&q, dummy):
        # the flipped weights, then the forward of the transposed geometry
        out["grad_input"] = p.K * Kd * isz + forward_scratch(&q, dummy, T)
    elif floating is float and use_grad_input_phases(p):
        out["grad_input"] = (grad_input_phases_scratch(p, T) if phase_rows_in_place(p)
                             else grad_input_phase_convs_scratch(p, T))
    elif use_grad_input_lanes(p, dummy):
        # the channels-last weights (channels rounded up to CE_GI_CB), per thread one image's dY rows
        out["grad_input"] = (round_up(p.C, CE_GI_CB) * taps * p.K + T * grad_input_lanes_floats(p)) * isz
    else:
        Mpad = round_up(Kd, CE_MR)
        KC = balanced_block(Kg, KCmax)
        out["grad_input"] = (p.G * Mpad * Kg + T * (KC * LD + Mpad * NC)) * isz + T * (KC + Mpad) * ptr
        if col2im_phased(p, dummy):
            out["grad_input"] += T * max(1, min(p.B, NC // (p.OH * p.OW))) * Cg * p.H * p.sw * phase_width(p) * isz
    Mpad = round_up(Kd, CE_MR)
    path = grad_weight_path(p, dummy)
    if path == PATH_SMALLC:
        nchunks = grad_weight_chunks(p.B, p.OH * p.OW)
        out["grad_weight"] = (nchunks * Kd * Kg + T * smallc_gw_floats(p)) * isz
    elif path == PATH_LANES:
        nchunks = grad_weight_chunks(p.B, p.OH * p.OW)
        out["grad_weight"] = (nchunks * Kd * Kg + T * grad_weight_lanes_floats(p)) * isz + T * 12 * ptr
    elif path == PATH_POINTWISE:
        nchunks = grad_weight_chunks(p.B, p.H * p.W)
        out["grad_weight"] = (p.G * nchunks * Kd * Kg + T * (CE_PW_TILE * CE_PW_TILE * (VL + 1))) * isz + (
            T * 2 * CE_PW_TILE * ptr)
    elif path == PATH_PIXELS:
        NR = channel_panel(p, dummy)
        Npad = round_up(Cg, NR)
        Mpad = round_up(Kg, CE_MR)
        R = pixel_rows(p, GRAD_WEIGHT_PIXELS)
        upt = units_per_task(p, R, GRAD_WEIGHT_PIXELS)
        maxpix = upt * R * p.OW
        nchunks = pixel_chunks(p)
        # the chunks' partial sums (weights, then bias); per thread the channels-last input rows, dY's rows
        # (one zero row where a step is one unit and A is dY in place), the taps' C tiles
        out["grad_weight"] = (p.G * nchunks * (Kd * Kg + Kg) + T * (
            upt * window_rows(p, R) * window_width(p) * pixel_stride(Npad, dummy)
            + (maxpix if upt == 1 else Mpad * maxpix) + taps * Mpad * Npad)) * isz + (
            taps * sizeof(Py_ssize_t) + T * (maxpix + Mpad) * ptr)
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
    names = {PATH_DIRECT: "direct", PATH_IM2COL: "im2col", PATH_PIXELS: "pixels", PATH_SMALLC: "smallc",
             PATH_LANES: "lanes",
             PATH_POINTWISE: "pointwise"}
    if is_depthwise(p):
        # grad_input at stride 1 runs the forward of the transposed geometry (depthwise_grad_input)
        # grad_weight takes the forward's whole-plane kernels' geometries, grad_input only the stride-2 one
        grad_input = "depthwise"
        if transposed_geometry(p, &q) and is_depthwise(&q):
            grad_input = "transposed " + dw_path_name(&q, dummy)
        elif dw_small_kernel(p, dummy) == DW_3X3S2_W16:
            grad_input = dw_path_name(p, dummy)
        return {"forward": dw_path_name(p, dummy), "grad_input": grad_input, "grad_weight": dw_path_name(p, dummy)}
    if transposed_geometry(p, &q) and grad_input_as_conv(&q, dummy):
        grad_input = "transposed " + ("smallc" if use_smallc(&q, dummy) else names[forward_path(&q, dummy)])
    elif floating is float and use_grad_input_phases(p):
        grad_input = "phases"
    elif use_grad_input_lanes(p, dummy):
        grad_input = "lanes"
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
