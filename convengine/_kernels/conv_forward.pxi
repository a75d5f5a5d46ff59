# conv2d forward: the pointwise, direct, im2col and pixel paths on the packed GEMM (gemm.pxi), the dispatch between them
# (and to conv_smallc.pxi and depthwise.pxi), and the def entry.


# Tags of the row-vector micro-kernel's width (see ukernel_rows_f): CE_NV vectors, or one for a block's last vectors.
cdef struct single_tile:
    char unused
ctypedef fused rows_width:
    wide_tile
    single_tile


cdef void ukernel_rows_f(Py_ssize_t kc, const float* apanel, const float** brow, const Py_ssize_t* boff,
                         float* c, const Py_ssize_t* coff, const Py_ssize_t* lanes, Py_ssize_t ldc,
                         Py_ssize_t mrows, bint accumulate, const Epilogue* e, Py_ssize_t k0,
                         rows_width* width) noexcept nogil:
    """c[i*ldc + coff[j] : +VL] (+)= sum over p < kc of apanel[p*MR + i] * (brow[p] + boff[j])[0:VL], for rows
    i < mrows and the tile's vectors j; then, where e is not NULL, the epilogue of channel k0 + i from registers.
    lanes: NULL, or the lanes of each vector that are output pixels (VL but for the last vector of a plane that
    does not end on a whole vector): only those are read and written in c.

    ukernel_f with each B vector (and its C vector) at its own offset: vector j of the tile is VL output pixels of
    one output row wherever that row lies (another row, another image), so a tile never computes the padded
    columns past an output row's end. Each element is ukernel_f's sum: zero, + a*b for p in order, then added to
    c (c + acc, the same bits as acc + c): the direct path's bits whichever kernel computes it."""
    cdef vfloat acc[CE_MR][CE_NV]
    cdef vfloat bv[CE_NV]
    cdef vfloat v
    cdef vfloat* dst
    cdef Py_ssize_t bo[CE_NV]
    cdef Py_ssize_t ln[CE_NV]
    cdef Py_ssize_t i, j, p
    cdef Py_ssize_t VL = CE_VBYTES // sizeof(float)
    cdef float bval, sc, sh
    cdef int nv
    if rows_width is wide_tile:
        nv = CE_NV
    else:
        nv = 1
    for j in range(nv):
        bo[j] = boff[j]
        ln[j] = VL if lanes == NULL else lanes[j]
    for i in range(CE_MR):
        for j in range(nv):
            acc[i][j] = ce_vf_zero()
    for p in range(kc):
        for j in range(nv):
            bv[j] = (<const vfloat*>(brow[p] + bo[j]))[0]
        for i in range(CE_MR):
            for j in range(nv):
                acc[i][j] += apanel[p * CE_MR + i] * bv[j]
    for i in range(CE_MR):
        if i < mrows:
            if e != NULL:
                # store_span's arithmetic, in its order (bias 0 where absent: -0 + 0 = +0 there too)
                bval = (<const float*>e.bias)[k0 + i] if e.bias != NULL else 0
                sc = (<const float*>e.scale)[k0 + i] if e.scale != NULL else 1
                sh = (<const float*>e.shift)[k0 + i] if e.scale != NULL else 0
            for j in range(nv):
                dst = <vfloat*>(c + i * ldc + coff[j])
                v = acc[i][j]
                if accumulate:
                    if ln[j] == VL:
                        v = dst[0] + v
                    else:
                        v = ce_vf_load_first(<float*>dst, ln[j]) + v
                if e != NULL:
                    v = v + bval
                    if e.relu:
                        v = ce_vf_relu(v)
                    if e.scale != NULL:
                        v = v * sc + sh
                if ln[j] == VL:
                    dst[0] = v
                else:
                    ce_vf_store_first(<float*>dst, v, ln[j])


cdef void shifted_tap_rows(const ConvGeom* p, const float* xblk, Py_ssize_t rows_in,
                           const float** table) noexcept nogil:
    """table[r] = start of tap r = (c, kh, kw) in a block of shifted row copies (fill_shifted_rows):
    xblk + (((c*KW + kw)*A + a)*rows_in + i)*OW with a, i = (kh*dh) % sh, (kh*dh) // sh and A = rows_phases
    (tap_rows' twin; nested loops, no division per tap)."""
    cdef Py_ssize_t r = 0, c, kh, kw, a, i
    cdef Py_ssize_t A = rows_phases(p)
    for c in range(p.C // p.G):
        for kh in range(p.KH):
            a = kh * p.dh % p.sh
            i = kh * p.dh // p.sh
            for kw in range(p.KW):
                table[r] = xblk + (((c * p.KW + kw) * A + a) * rows_in + i) * p.OW
                r = r + 1


cdef inline (Py_ssize_t, Py_ssize_t, Py_ssize_t) rows_unit(const ConvGeom* p, Py_ssize_t u, Py_ssize_t nblk,
                                                          Py_ssize_t R) noexcept nogil:
    """(g, r0, r1): unit u of conv2d_forward_direct_rows is group g's output rows r0 <= r < r1 of the batch."""
    cdef Py_ssize_t g = u // nblk
    cdef Py_ssize_t r0 = (u - g * nblk) * R
    return g, r0, min(p.B * p.OH, r0 + R)


cdef int conv2d_forward_direct_rows(const float* x, const float* apack, Py_ssize_t KC, const Epilogue* e,
                                    float* y, const ConvGeom* p, int n_threads) noexcept nogil:
    """The direct path (see conv2d_forward_direct) for float32 rows of whole vectors (OW a multiple of VL), its
    columns being output pixels only. A block is R consecutive output rows of the batch (row b*OH + oh), across
    images; it copies the zero-padded input rows each of its images needs into segments of the same layout, and
    tile vector j is VL pixels of one output row, read from the segment at each tap's offset (ukernel_rows_f) and
    written straight into y, the epilogue applied from registers with the last k block. Where rows are shifted
    copies (rows_shifted: also every stride of 2, whose copies hold every sw-th column of each row phase) a vector
    runs on across output rows; where a plane does not end on a whole vector
    (rows_partial: LeNet-5's 10x10), blocks are whole images and each plane's last vector has only its pixels
    read and written (its other lanes compute on what follows in the segment, or on its zeroed slack).

    The same k blocks of the same packed weights, each element the same sum in the same order as
    conv2d_forward_direct: the same bits. What it saves (Zen 4, 1 thread, batch 64): the padded columns (16 of 18
    on 16-pixel rows were useful, 32 of 34 on 32-pixel rows, then rounded up to whole 48-column panels) and the
    second pass over a C buffer for the epilogue (5-8% of the time in perf)."""
    cdef fpstate fp, fps
    cdef Py_ssize_t VL = vlen(<float>0)
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Kd = Cg * p.KH * p.KW
    cdef Py_ssize_t Mpad = round_up(Kg, CE_MR)
    cdef Py_ssize_t mpanels = Mpad // CE_MR
    cdef Py_ssize_t P = p.OH * p.OW
    cdef bint shifted = rows_shifted(p)
    cdef Py_ssize_t Wr = rows_len(p)
    cdef RowsPlan plan = rows_plan(p, n_threads)
    cdef Py_ssize_t R = plan.R, nblk = plan.nblk, rows_in = plan.rows_in, seglen = plan.seglen, nseg = plan.nseg
    cdef Py_ssize_t segstride = plan.segstride, maxvec = plan.maxvec, msplit = plan.msplit, mchunk = plan.mchunk
    cdef Py_ssize_t npix, zs
    cdef Py_ssize_t* lanes
    cdef Py_ssize_t task, u, g, r0, r1, b, s, nvec, nfull, v, jp, ip, ip0, ip1, k0, kc, kk, q, seg_r0, seg_r1
    cdef const Epilogue* last
    cdef float* xblk
    cdef Py_ssize_t* boffs
    cdef Py_ssize_t* coffs
    cdef const float** brow
    cdef int failed = 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        xblk = <float*>malloc(nseg * segstride * sizeof(float))
        # boffs[3*maxvec]: the unit whose segments, offsets and taps this thread holds, boffs[3*maxvec + 1] its
        # vectors (a unit's msplit tasks are consecutive: a thread given several of them copies its rows once)
        boffs = <Py_ssize_t*>malloc((3 * maxvec + 2) * sizeof(Py_ssize_t))
        brow = <const float**>malloc(Kd * sizeof(float*))
        if boffs != NULL:
            boffs[3 * maxvec] = -1
        if xblk != NULL:
            for zs in range(nseg):
                memset(xblk + zs * segstride + seglen, 0, VL * sizeof(float))
        for task in prange(p.G * nblk * msplit, schedule='static'):
            if xblk == NULL or boffs == NULL or brow == NULL:
                flag_failure(&failed)
                continue
            coffs = boffs + maxvec
            lanes = boffs + 2 * maxvec
            u = task // msplit
            ip0 = (task - u * msplit) * mchunk
            ip1 = min(mpanels, ip0 + mchunk)
            if ip0 >= ip1:
                continue
            g, r0, r1 = rows_unit(p, u, nblk, R)
            if boffs[3 * maxvec] != u:
                # one segment per image: its rows of the block and the KH-1 around them; vector offsets
                # vector q // VL of a segment: its pixels q.. in the segment's rows, row-major
                nvec = 0
                s = 0
                b = r0 // p.OH
                while b * p.OH < r1:
                    seg_r0 = max(r0, b * p.OH) - b * p.OH
                    seg_r1 = min(r1 - b * p.OH, p.OH)
                    if shifted:
                        fill_shifted_rows(x, p, b, g, seg_r0, seg_r1 - seg_r0 + rows_reach(p), rows_in,
                                          xblk + s * segstride)
                    else:
                        fill_padded_rows(x, p, b, g, seg_r0, seg_r1 - seg_r0 + rows_reach(p), rows_in,
                                         xblk + s * segstride)
                    npix = (seg_r1 - seg_r0) * p.OW
                    for v in range((npix + VL - 1) // VL):
                        q = v * VL
                        boffs[nvec] = s * segstride + (q // p.OW) * Wr + q % p.OW
                        coffs[nvec] = b * p.K * P + seg_r0 * p.OW + q
                        lanes[nvec] = min(VL, npix - q)
                        nvec = nvec + 1
                    s = s + 1
                    b = b + 1
                if shifted:
                    shifted_tap_rows(p, xblk, rows_in, brow)
                else:
                    tap_rows(p, xblk, rows_in, brow)
                boffs[3 * maxvec] = u
                boffs[3 * maxvec + 1] = nvec
                if u + 1 < p.G * nblk:
                    prefetch_block_rows(x, p, rows_unit(p, u + 1, nblk, R))
            nvec = boffs[3 * maxvec + 1]
            nfull = nvec // CE_NV
            k0 = 0
            while k0 < Kd:
                kc = min(KC, Kd - k0)
                last = e if k0 + kc == Kd else NULL
                for jp in range(nfull):
                    for ip in range(ip0, ip1):
                        kk = g * Kg + ip * CE_MR
                        ukernel_rows_f(kc, apack + g * Mpad * Kd + k0 * Mpad + ip * CE_MR * kc, brow + k0,
                                       boffs + jp * CE_NV, y + kk * P, coffs + jp * CE_NV, lanes + jp * CE_NV, P,
                                       min(CE_MR, Kg - ip * CE_MR), k0 > 0, last, kk, <wide_tile*>NULL)
                for v in range(nfull * CE_NV, nvec):
                    for ip in range(ip0, ip1):
                        kk = g * Kg + ip * CE_MR
                        ukernel_rows_f(kc, apack + g * Mpad * Kd + k0 * Mpad + ip * CE_MR * kc, brow + k0,
                                       boffs + v, y + kk * P, coffs + v, lanes + v, P,
                                       min(CE_MR, Kg - ip * CE_MR), k0 > 0, last, kk, <single_tile*>NULL)
                k0 = k0 + kc
        free(xblk)
        free(boffs)
        free(brow)
        fp_leave(fp)
    fp_resume(fps)
    return -failed


cdef int conv2d_forward_direct(const floating* x, const floating* apack, Py_ssize_t KC, const Epilogue* e,
                               floating* y, const ConvGeom* p, int n_threads) noexcept nogil:
    """Stride-1 forward without im2col. A task (image, group, block of R output rows) copies the R + (KH-1)*dh
    input rows it needs into a zero-padded buffer of width Wp; B row r = (c, kh, kw) is that buffer at the tap's
    offset, and output pixel (oh, ow) of the block is column (oh - oh0)*Wp + ow (columns ow >= OW are computed
    and dropped). With few tasks (batch 1) each also takes a block of output channel panels (channel_blocks)."""
    cdef fpstate fp, fps
    cdef int nv = CE_NV
    cdef Py_ssize_t NR = tile_n(<floating>0)
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Kd = Cg * p.KH * p.KW
    cdef Py_ssize_t Mpad = round_up(Kg, CE_MR)
    cdef Py_ssize_t Wp = padded_width(p)
    cdef Py_ssize_t R = direct_rows(p, block_columns(<floating>0))
    cdef Py_ssize_t rows_in = R + (p.KH - 1) * p.dh
    cdef Py_ssize_t nrb = (p.OH + R - 1) // R
    cdef Py_ssize_t ncmax = round_up(R * Wp, NR)
    # panels read up to ncmax columns from a tap's start: slack after the last channel keeps them in bounds
    cdef Py_ssize_t xlen = Cg * rows_in * Wp + ncmax + (p.KW - 1) * p.dw
    cdef Py_ssize_t mpanels = Mpad // CE_MR
    cdef Py_ssize_t msplit = channel_blocks(p.B * p.G * nrb, mpanels, n_threads)
    cdef Py_ssize_t mchunk = (mpanels + msplit - 1) // msplit
    cdef Py_ssize_t task, u, b, g, rb, oh0, nrows, ncpad, k0, kc, ri, ip0, ip1, kk0, nk
    cdef floating* xblk
    cdef floating* cbuf
    cdef const floating** brow
    cdef const floating** arow
    cdef int failed = 0
    if floating is float:
        if use_direct_rows(p):
            return conv2d_forward_direct_rows(x, apack, KC, e, y, p, n_threads)
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        xblk = <floating*>calloc(xlen, sizeof(floating))
        cbuf = <floating*>malloc(Mpad * ncmax * sizeof(floating))
        brow = <const floating**>malloc(Kd * sizeof(floating*))
        arow = <const floating**>malloc(Mpad * sizeof(floating*))
        for task in prange(p.B * p.G * nrb * msplit, schedule='static'):
            if xblk == NULL or cbuf == NULL or brow == NULL or arow == NULL:
                flag_failure(&failed)
                continue
            u = task // msplit
            ip0 = (task - u * msplit) * mchunk
            ip1 = min(mpanels, ip0 + mchunk)
            if ip0 >= ip1:
                continue
            b = u // (p.G * nrb)
            g = (u // nrb) % p.G
            rb = u % nrb
            oh0 = rb * R
            nrows = min(R, p.OH - oh0)
            ncpad = round_up(nrows * Wp, NR)
            fill_padded_rows(x, p, b, g, oh0, nrows + (p.KH - 1) * p.dh, rows_in, xblk)
            tap_rows(p, xblk, rows_in, brow)
            k0 = 0
            while k0 < Kd:
                kc = min(KC, Kd - k0)
                packed_a_table(arow, apack + g * Mpad * Kd + k0 * Mpad + ip0 * CE_MR * kc, ip1 - ip0, kc)
                macro_kernel(ip1 - ip0, ncpad // NR, kc, arow, CE_MR, brow + k0, NR, cbuf, ncmax, k0 > 0, nv)
                k0 = k0 + kc
            kk0 = g * Kg + ip0 * CE_MR                     # the block's first output channel
            nk = min(Kg, ip1 * CE_MR) - ip0 * CE_MR
            for ri in range(nrows):
                store_rows(cbuf + ri * Wp, ncmax, nk, p.OW, e, kk0,
                           y + ((b * p.K + kk0) * p.OH + oh0 + ri) * p.OW, p.OH * p.OW)
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
    cdef Py_ssize_t NC = block_columns(<floating>0)
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


cdef int conv2d_forward_pointwise(const floating* x, const floating* apack, Py_ssize_t KC, const Epilogue* e,
                                  floating* y, const ConvGeom* p, int n_threads) noexcept nogil:
    """1x1 kernels at stride 1 without padding (use_pointwise): per image and group the GEMM
    Y (Kg x P) = W (Kg x Cg) . X (Cg x P), P = H*W, whose B rows are the input planes themselves, read where they
    lie (the direct path copied them into padded rows first, and stored through a block buffer that left L1;
    large planes copy a block of rows, see `copied`).
    A tile wholly inside y is written there and takes the epilogue at once, while it is in L1; a tile at an edge
    (the last channels or a last partial column panel, which is packed) goes through a tile buffer.

    Tasks are (image, group, block of column panels, block of channel panels). Every output element is one
    micro-kernel sum over the same k blocks in the same order whichever task computes it, so the channel split
    may follow the thread count (channel_blocks): batch 1 splits its few pixels' channels."""
    cdef fpstate fp, fps
    cdef Py_ssize_t VL = vlen(<floating>0)
    cdef Py_ssize_t P = p.H * p.W
    cdef int nv = pointwise_nv(P, VL)
    cdef Py_ssize_t NR = nv * VL
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t Mpad = round_up(Kg, CE_MR)
    cdef Py_ssize_t mpanels = Mpad // CE_MR
    cdef Py_ssize_t npanels = (P + NR - 1) // NR
    cdef Py_ssize_t nblocks = (npanels + BLOCK_TILES - 1) // BLOCK_TILES
    cdef Py_ssize_t units = p.B * p.G * nblocks
    cdef Py_ssize_t msplit = channel_blocks(units, mpanels, n_threads)
    cdef Py_ssize_t mchunk = (mpanels + msplit - 1) // msplit
    cdef Py_ssize_t task, u, b, g, nb, ms, jp, ip, q0, ncols, k, k0, kc, nrows, c, qb, ncb
    cdef bint full
    cdef bint plain = e.bias == NULL and e.scale == NULL and not e.relu
    # planes of more than one column block: the block's rows are first copied side by side (ld past a multiple of
    # 256 bytes), as long runs the prefetcher follows; read in place, a 32x32 plane's rows are 4 KiB apart and a
    # panel's 64 rows fall into a few L1 sets (Zen 4, 64x64x32x32 -> 64: 47 against 44 GFLOP/s; one-block planes
    # read in place: 94 against 87 on 128x8x8 -> 128)
    cdef bint copied = npanels > BLOCK_TILES
    # float32 planes of whole vectors read in place: the row-vector micro-kernel (ukernel_rows_f) writes each tile
    # straight into y with the epilogue from registers (no second pass for bias and ReLU), its wide tile 8 x 48
    # against the GEMM's 8 x 32 on 16x16 planes; the same sums, the same bits. Zen 4, 1 thread, best of 7 x 3,
    # GFLOP/s GEMM tiles -> row vectors: batch 1 32x16x16 -> 64 74 -> 77, 64x8x8 -> 128 77 -> 80, 128x8x8 -> 128 87
    # -> 91; batch 64 32x16x16 -> 64 88 -> 91, 128x8x8 -> 128 102 -> 109
    cdef bint rows_tiles = False
    cdef Py_ssize_t nvec = P // VL, nfull = 0, v, iv
    cdef Py_ssize_t* offs = NULL
    cdef const Epilogue* last
    if floating is float:
        rows_tiles = not copied and P % VL == 0
        nfull = nvec // CE_NV
    cdef floating* tile
    cdef floating* bpack
    cdef floating* dst
    cdef const floating* xb
    cdef const floating** brow
    cdef const floating** arow
    cdef int failed = 0
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        tile = <floating*>malloc(CE_MR * NR * sizeof(floating))
        bpack = <floating*>malloc(Cg * (BLOCK_TILES * NR + VL) * sizeof(floating))
        brow = <const floating**>malloc(Cg * sizeof(floating*))
        arow = <const floating**>malloc(CE_MR * sizeof(floating*))
        # vector v at offset v*VL of every input and output plane (the row-vector tiles)
        offs = <Py_ssize_t*>malloc((nvec + 1) * sizeof(Py_ssize_t))
        if offs != NULL:
            for iv in range(nvec):
                offs[iv] = iv * VL
        for task in prange(units * msplit, schedule='static'):
            if tile == NULL or bpack == NULL or brow == NULL or arow == NULL or offs == NULL:
                flag_failure(&failed)
                continue
            u = task // msplit
            ms = task - u * msplit
            b = u // (p.G * nblocks)
            g = (u // nblocks) % p.G
            nb = u % nblocks
            xb = x + (b * p.C + g * Cg) * P
            if floating is float:
                if rows_tiles:
                    # the plane's vectors in tiles of CE_NV, then one by one
                    for c in range(Cg):
                        brow[c] = xb + c * P
                    for jp in range(nfull + nvec - nfull * CE_NV):
                        v = jp * CE_NV if jp < nfull else nfull * CE_NV + jp - nfull
                        for ip in range(ms * mchunk, min(mpanels, (ms + 1) * mchunk)):
                            k = ip * CE_MR
                            dst = y + (b * p.K + g * Kg + k) * P
                            k0 = 0
                            while k0 < Cg:
                                kc = min(KC, Cg - k0)
                                last = e if k0 + kc == Cg else NULL
                                if jp < nfull:
                                    ukernel_rows_f(kc, apack + g * Mpad * Cg + k0 * Mpad + ip * CE_MR * kc,
                                                   brow + k0, offs + v, dst, offs + v, NULL, P, min(CE_MR, Kg - k),
                                                   k0 > 0, last, g * Kg + k, <wide_tile*>NULL)
                                else:
                                    ukernel_rows_f(kc, apack + g * Mpad * Cg + k0 * Mpad + ip * CE_MR * kc,
                                                   brow + k0, offs + v, dst, offs + v, NULL, P, min(CE_MR, Kg - k),
                                                   k0 > 0, last, g * Kg + k, <single_tile*>NULL)
                                k0 = k0 + kc
                    continue
            if copied:
                qb = nb * BLOCK_TILES * NR
                ncb = min(P - qb, BLOCK_TILES * NR)
                for c in range(Cg):
                    memcpy(bpack + c * (BLOCK_TILES * NR + VL), xb + c * P + qb, ncb * sizeof(floating))
                    memset(bpack + c * (BLOCK_TILES * NR + VL) + ncb, 0, (round_up(ncb, NR) - ncb) * sizeof(floating))
            for jp in range(nb * BLOCK_TILES, min(npanels, (nb + 1) * BLOCK_TILES)):
                q0 = jp * NR
                ncols = min(NR, P - q0)
                if copied:
                    row_table(brow, bpack + q0 - qb, Cg, BLOCK_TILES * NR + VL)
                elif ncols == NR:
                    for c in range(Cg):
                        brow[c] = xb + c * P + q0
                else:
                    # the last panel would read past the plane (past x itself after the last one): packed
                    pack_b_strided(xb + q0, P, 1, Cg, ncols, NR, bpack)
                    row_table(brow, bpack, Cg, NR)
                for ip in range(ms * mchunk, min(mpanels, (ms + 1) * mchunk)):
                    k = ip * CE_MR
                    nrows = min(CE_MR, Kg - k)
                    full = ncols == NR and nrows == CE_MR
                    if full:
                        dst = y + (b * p.K + g * Kg + k) * P + q0
                    else:
                        dst = tile
                    k0 = 0
                    while k0 < Cg:
                        kc = min(KC, Cg - k0)
                        packed_a_table(arow, apack + g * Mpad * Cg + k0 * Mpad + ip * CE_MR * kc, 1, kc)
                        macro_kernel(1, 1, kc, arow, CE_MR, brow + k0, 0, dst, P if full else NR, k0 > 0, nv)
                        k0 = k0 + kc
                    if not full:
                        store_rows(tile, NR, nrows, ncols, e, g * Kg + k, y + (b * p.K + g * Kg + k) * P + q0, P)
                    elif not plain:
                        store_rows(dst, P, CE_MR, NR, e, g * Kg + k, dst, P)
        free(tile)
        free(bpack)
        free(brow)
        free(arow)
        free(offs)
        fp_leave(fp)
    fp_resume(fps)
    return -failed


cdef inline Py_ssize_t pixel_weights_len(const ConvGeom* p, floating dummy) noexcept nogil:
    """Elements of the pixel path's packed weights (pack_pixel_weights)."""
    return p.G * p.KH * p.KW * round_up(p.K // p.G, output_panel_nv(p, dummy) * vlen(<floating>0)) * (p.C // p.G)


cdef int pack_pixel_weights(const floating* w, const ConvGeom* p, floating* bpack) noexcept nogil:
    """bpack[((g*T + t)*npan + jp)*Cg*NR + c*NR + j] = w[g*Kg + jp*NR + j, c, kh, kw], zero past Kg: the pixel
    path's B operand, tap by tap. By blocks of a panel's NR weight rows x a few channels: each row's piece (its
    channels' taps, contiguous) is copied into a tile in cache, then each tap's NR-wide rows are written out from
    it in order (a pass per tap over w, strided, read every cache line of w T times: 3.4 ms for 512 -> 512 3x3
    weights, a batch-1 call's arithmetic several times over). Returns -1 where the tile cannot be allocated."""
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G, T = p.KH * p.KW, VL = vlen(<floating>0)
    cdef Py_ssize_t NR = output_panel_nv(p, <floating>0) * VL
    cdef Py_ssize_t Npad = round_up(Kg, NR)
    cdef Py_ssize_t CB = max(1, 64 // T)
    cdef Py_ssize_t g, t, jp, c, c0, cb, cn, j, j0, jn, k, i
    cdef floating* dst
    cdef const floating* rows[8]
    cdef floating* zeros
    cdef floating* tile = <floating*>malloc((NR + 1) * CB * T * sizeof(floating))
    if tile == NULL:
        return -1
    zeros = tile + NR * CB * T
    memset(zeros, 0, CB * T * sizeof(floating))
    for g in range(p.G):
        for jp in range(Npad // NR):
            for cb in range((Cg + CB - 1) // CB):
                c0 = cb * CB
                cn = min(CB, Cg - c0)
                # eight weight rows at a time, as pack_a_strided reads (NR rows at once missed in cache)
                for j0 in range(0, NR, 8):
                    jn = min(8, NR - j0)
                    for j in range(jn):
                        k = jp * NR + j0 + j
                        rows[j] = w + ((g * Kg + k) * Cg + c0) * T if k < Kg else zeros
                    for i in range(cn * T):
                        for j in range(jn):
                            tile[i * NR + j0 + j] = rows[j][i]
                for t in range(T):
                    dst = bpack + ((g * T + t) * Npad + jp * NR) * Cg + c0 * NR
                    for c in range(cn):
                        memcpy(dst + c * NR, tile + (c * T + t) * NR, NR * sizeof(floating))
    free(tile)
    return 0


cdef void ukernel_taps_f(Py_ssize_t ntap, const Py_ssize_t* taps, const Py_ssize_t* tapoff, Py_ssize_t kc,
                         const float** arow, Py_ssize_t a_cs, const float** brow, float* c, Py_ssize_t ldc,
                         tile_width* width) noexcept nogil:
    """c[MR, nv*VL] = sum over the taps t = taps[0:ntap] of a_t[MR, kc] b_t[kc, nv*VL], held in registers from
    the first tap to the last: row i of a_t is arow[i] + tapoff[t] at stride a_cs, row p of b_t is brow[t*kc + p].

    ukernel_f over a list of taps (the pixel path's panel: its pixels' rows of input channels at each tap's
    offset), so that a tile is loaded and stored once, not once per tap."""
    cdef vfloat acc[CE_MR][CE_NV]
    cdef vfloat bv[CE_NV]
    cdef const float* ap[CE_MR]
    cdef const float** bt
    cdef Py_ssize_t i, j, p, q, t
    cdef Py_ssize_t VL = CE_VBYTES // sizeof(float)
    cdef int nv
    if tile_width is wide_tile:
        nv = CE_NV
    else:
        nv = CE_NV_ALT
    for i in range(CE_MR):
        for j in range(nv):
            acc[i][j] = ce_vf_zero()
    for q in range(ntap):
        t = taps[q]
        for i in range(CE_MR):
            ap[i] = arow[i] + tapoff[t]
        bt = brow + t * kc
        for p in range(kc):
            for j in range(nv):
                bv[j] = (<const vfloat*>(bt[p] + j * VL))[0]
            for i in range(CE_MR):
                for j in range(nv):
                    acc[i][j] += ap[i][p * a_cs] * bv[j]
    for i in range(CE_MR):
        for j in range(nv):
            (<vfloat*>(c + i * ldc + j * VL))[0] = acc[i][j]


cdef inline Py_ssize_t class_key(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t KS) noexcept nogil:
    """Sort key of a row's (column's) inside taps [lo, hi) of KS: 0 for all of them, then by lo and hi."""
    return 0 if lo == 0 and hi == KS else 1 + lo * (KS + 1) + KS - hi


cdef void tap_classes(Py_ssize_t n, Py_ssize_t s, Py_ssize_t pad, Py_ssize_t d, Py_ssize_t KS, Py_ssize_t N,
                      Py_ssize_t* lo, Py_ssize_t* hi, Py_ssize_t* order) noexcept nogil:
    """lo[o], hi[o] = inside_taps of output rows (or columns) o < n, and order = 0..n-1 sorted stably by that
    range, the rows whose every tap reads inside first: rows of one class are then adjacent. (Insertion: all but
    a few edge rows share key 0.)"""
    cdef Py_ssize_t o, j, key
    for o in range(n):
        lo[o], hi[o] = inside_taps(o, s, pad, d, KS, N)
        key = class_key(lo[o], hi[o], KS)
        j = o
        while j > 0 and class_key(lo[order[j - 1]], hi[order[j - 1]], KS) > key:
            order[j] = order[j - 1]
            j = j - 1
        order[j] = o


cdef inline Py_ssize_t class_end(const Py_ssize_t* order, const Py_ssize_t* lo, const Py_ssize_t* hi, Py_ssize_t i,
                                 Py_ssize_t n) noexcept nogil:
    """The end of the run of order[i:] whose rows (columns) share order[i]'s inside taps."""
    cdef Py_ssize_t a = order[i]
    i = i + 1
    while i < n and lo[order[i]] == lo[a] and hi[order[i]] == hi[a]:
        i = i + 1
    return i


cdef int conv2d_forward_pixels(const floating* x, const floating* w, const Epilogue* e, floating* y,
                               const ConvGeom* p, int n_threads, const floating* prepacked) noexcept nogil:
    """Forward with output pixels as the GEMM's rows and output channels as its columns, for any stride:
    y^T (pixels x Kg) = sum over taps t = (kh, kw) of X_t (pixels x Cg) . W_t (Cg x Kg).

    A task takes a few units (image, block of output rows), copies the input rows they read into zero-padded
    rows, and points row i of A at pixel i's window origin plus the tap's offset; column c of A is then input
    channel c, a fixed stride away. Nothing is wasted: im2col copies KH*KW values per pixel; the direct path
    computes dropped columns and every tap of the pixels at the image's edge, which read only padding (on an 8x8
    image 92 of 576 pixel-taps with a 3x3 kernel, 44 of 144 on 4x4). Here a task's pixels are listed by the taps
    that read inside the image (tap_classes: rows, then columns, across its units), so that most 8-pixel panels
    share them, and a panel skips every tap that none of its pixels reads inside. Per B panel (NR output
    channels) and pixel panel, ukernel_taps_f sums the panel's taps in order, input channels inner, in registers
    (float64: tap by tap into the C tile). With few tasks (batch 1) each also takes a block of the output
    channels' column panels (channel_blocks). prepacked: pack_pixel_weights' result, or NULL to pack here."""
    cdef fpstate fp, fps
    cdef Py_ssize_t Cg = p.C // p.G, Kg = p.K // p.G
    cdef Py_ssize_t T = p.KH * p.KW
    cdef Py_ssize_t VL = vlen(<floating>0)
    cdef int nv = output_panel_nv(p, <floating>0)
    cdef Py_ssize_t NR = nv * VL
    cdef Py_ssize_t npan = (Kg + NR - 1) // NR
    cdef Py_ssize_t Npad = npan * NR
    cdef Py_ssize_t OHW = p.OH * p.OW
    cdef Py_ssize_t Wpad = window_width(p)
    cdef Py_ssize_t R = pixel_rows(p, PIXELS_PER_TASK)
    cdef Py_ssize_t nrb = (p.OH + R - 1) // R
    cdef Py_ssize_t rows_in = window_rows(p, R)
    cdef Py_ssize_t ld_c = rows_in * Wpad
    cdef Py_ssize_t unit_len = Cg * ld_c
    cdef Py_ssize_t upt = units_per_task(p, R, PIXELS_PER_TASK)
    cdef Py_ssize_t nunits = p.B * nrb
    cdef Py_ssize_t ntasks = (nunits + upt - 1) // upt
    cdef Py_ssize_t maxpix = round_up(upt * R * p.OW, CE_MR)
    cdef Py_ssize_t maxpan = maxpix // CE_MR
    cdef Py_ssize_t nsplit = channel_blocks(p.G * ntasks, npan, n_threads)
    cdef Py_ssize_t nchunk = (npan + nsplit - 1) // nsplit
    cdef Py_ssize_t task, g, u, u0, u1, b, oh0, nrows, ip, t, i, k, n, j0, j1, jp, npanels, kh, kw
    cdef Py_ssize_t r0, r1, c0, c1, ri, ci, oh, ow, ntap, q
    cdef Py_ssize_t* taps
    cdef floating* dst
    cdef const floating* bpack
    cdef floating* owned = NULL
    cdef floating* xblk
    cdef floating* cbuf
    cdef floating* blk
    cdef const floating** pix
    cdef const floating** arow
    cdef const floating** brow
    cdef Py_ssize_t* at
    cdef Py_ssize_t* box
    cdef Py_ssize_t* tapoff
    cdef int failed = 0
    # per call: each tap's offset, then per output row and column its inside taps and the class order
    tapoff = <Py_ssize_t*>malloc((T + 3 * (p.OH + p.OW)) * sizeof(Py_ssize_t))
    if prepacked == NULL:
        owned = <floating*>malloc(pixel_weights_len(p, <floating>0) * sizeof(floating))
    if tapoff == NULL or (prepacked == NULL and owned == NULL):
        free(owned)
        free(tapoff)
        return -1
    cdef Py_ssize_t* rlo = tapoff + T
    cdef Py_ssize_t* rhi = rlo + p.OH
    cdef Py_ssize_t* rord = rhi + p.OH
    cdef Py_ssize_t* clo = rord + p.OH
    cdef Py_ssize_t* chi = clo + p.OW
    cdef Py_ssize_t* cord = chi + p.OW
    # skipped taps would add only zeros (x * 0 with finite weights; a sum never holds -0, so adding +-0 keeps its
    # bits): each sum is then the same whichever pixels share a panel. A non-finite weight times padding is NaN, as
    # the direct path and the reference compute it: there every panel takes every tap.
    cdef bint every_tap = not all_finite(w, p.K * Cg * T)
    tap_classes(p.OH, p.sh, p.pt, p.dh, p.KH, p.H, rlo, rhi, rord)
    tap_classes(p.OW, p.sw, p.pl, p.dw, p.KW, p.W, clo, chi, cord)
    for t in range(T):
        tapoff[t] = (t // p.KW) * p.dh * Wpad + (t % p.KW) * p.dw
    if prepacked == NULL:
        if pack_pixel_weights(w, p, owned):
            free(owned)
            free(tapoff)
            return -1
        bpack = owned
    else:
        bpack = prepacked
    fps = fp_suspend()
    with parallel(num_threads=n_threads):
        fp = fp_enter()
        xblk = <floating*>malloc(upt * unit_len * sizeof(floating))
        cbuf = <floating*>malloc(maxpix * Npad * sizeof(floating))
        pix = <const floating**>malloc(maxpix * sizeof(floating*))
        arow = <const floating**>malloc(CE_MR * sizeof(floating*))
        brow = <const floating**>malloc(T * Cg * sizeof(floating*))
        # per pixel its offset in y; per panel the box of taps it computes (kh, kw ranges); the taps of one panel
        at = <Py_ssize_t*>malloc((maxpix + 4 * maxpan + T) * sizeof(Py_ssize_t))
        for task in prange(p.G * ntasks * nsplit, schedule='static'):
            if xblk == NULL or cbuf == NULL or pix == NULL or arow == NULL or brow == NULL or at == NULL:
                flag_failure(&failed)
                continue
            box = at + maxpix
            taps = box + 4 * maxpan
            j0 = (task % nsplit) * nchunk                  # this task's column panels (output channels)
            j1 = min(npan, j0 + nchunk)
            if j0 >= j1:
                continue
            g = (task // nsplit) // ntasks
            u0 = ((task // nsplit) - g * ntasks) * upt
            u1 = min(nunits, u0 + upt)
            for u in range(u0, u1):
                b = u // nrb
                oh0 = (u - b * nrb) * R
                fill_window_rows(x, p, b, g, oh0 * p.sh - p.pt, window_rows(p, min(R, p.OH - oh0)), ld_c,
                                 xblk + (u - u0) * unit_len)
            # the units' pixels by class: each run of rows with the same inside taps, each run of columns, across
            # the units
            n = 0
            r0 = 0
            while r0 < p.OH:
                r1 = class_end(rord, rlo, rhi, r0, p.OH)
                c0 = 0
                while c0 < p.OW:
                    c1 = class_end(cord, clo, chi, c0, p.OW)
                    for u in range(u0, u1):
                        b = u // nrb
                        oh0 = (u - b * nrb) * R
                        nrows = min(R, p.OH - oh0)
                        blk = xblk + (u - u0) * unit_len
                        for ri in range(r0, r1):
                            oh = rord[ri]
                            if oh < oh0 or oh >= oh0 + nrows:
                                continue
                            for ci in range(c0, c1):
                                ow = cord[ci]
                                pix[n] = blk + (oh - oh0) * p.sh * Wpad + ow * p.sw
                                at[n] = b * p.K * OHW + oh * p.OW + ow
                                n = n + 1
                    c0 = c1
                r0 = r1
            npanels = (n + CE_MR - 1) // CE_MR
            # a partial last panel repeats pixel 0 (computed, never stored)
            for i in range(n, npanels * CE_MR):
                pix[i] = pix[0]
            # each panel's taps: the box of its pixels' inside taps (kh in [box0, box1), kw in [box2, box3))
            for ip in range(npanels):
                box[ip] = 0 if every_tap else p.KH
                box[maxpan + ip] = p.KH if every_tap else 0
                box[2 * maxpan + ip] = 0 if every_tap else p.KW
                box[3 * maxpan + ip] = p.KW if every_tap else 0
                if every_tap:
                    continue
                for i in range(ip * CE_MR, min(n, ip * CE_MR + CE_MR)):
                    oh = (at[i] % OHW) // p.OW
                    ow = at[i] % p.OW
                    box[ip] = min(box[ip], rlo[oh])
                    box[maxpan + ip] = max(box[maxpan + ip], rhi[oh])
                    box[2 * maxpan + ip] = min(box[2 * maxpan + ip], clo[ow])
                    box[3 * maxpan + ip] = max(box[3 * maxpan + ip], chi[ow])
            for jp in range(j0, j1):
                for t in range(T):
                    row_table(brow + t * Cg, bpack + ((g * T + t) * Npad + jp * NR) * Cg, Cg, NR)
                for ip in range(npanels):
                    # the taps that some pixel of the panel reads inside, in order
                    ntap = 0
                    for t in range(T):
                        kh = t // p.KW
                        kw = t - kh * p.KW
                        if (box[ip] <= kh < box[maxpan + ip] and box[2 * maxpan + ip] <= kw < box[3 * maxpan + ip]):
                            taps[ntap] = t
                            ntap = ntap + 1
                    dst = cbuf + ip * CE_MR * Npad + jp * NR
                    if ntap == 0:
                        # every pixel of the panel reads only padding: its sums are zero
                        for i in range(CE_MR):
                            memset(dst + i * Npad, 0, NR * sizeof(floating))
                        continue
                    if floating is float:
                        for i in range(CE_MR):
                            arow[i] = pix[ip * CE_MR + i]
                        if nv == CE_NV:
                            ukernel_taps_f(ntap, taps, tapoff, Cg, arow, ld_c, brow, dst, Npad, <wide_tile*>NULL)
                        else:
                            ukernel_taps_f(ntap, taps, tapoff, Cg, arow, ld_c, brow, dst, Npad, <narrow_tile*>NULL)
                    else:
                        for q in range(ntap):
                            for i in range(CE_MR):
                                arow[i] = pix[ip * CE_MR + i] + tapoff[taps[q]]
                            macro_kernel(1, 1, Cg, arow, ld_c, brow + taps[q] * Cg, 0, dst, Npad, q > 0, nv)
            # y[at[q] + (g*Kg + k)*OH*OW] = epilogue of cbuf[q, k]
            for k in range(j0 * NR, min(Kg, j1 * NR)):
                store_gather(cbuf + k, Npad, y + (g * Kg + k) * OHW, at, n, e, g * Kg + k)
        free(xblk)
        free(cbuf)
        free(pix)
        free(arow)
        free(brow)
        free(at)
        fp_leave(fp)
    fp_resume(fps)
    free(owned)
    free(tapoff)
    return -failed


cdef int conv2d_forward_core(const floating* x, const floating* w, const Epilogue* e, floating* y,
                             const ConvGeom* p, int n_threads, const floating* prepacked=NULL,
                             int prepacked_path=PATH_AUTO, bint forced=False) noexcept nogil:
    """y = epilogue(conv2d(x, w)), all C-contiguous NCHW / KCRS. prepacked: the weights as conv2d_pack packed them
    for path prepacked_path, used where the shape takes that path now (else packed here), or always where forced
    (a frozen plan's conv takes the path it packed for at any batch, and a slice of its output channels the path
    of the whole conv, and so their bits). Returns -1 on allocation failure."""
    cdef Py_ssize_t KC = weight_block(p, <floating>0)
    cdef floating* apack = NULL
    cdef int rc
    cdef int path
    if floating is float:
        if prepacked_path == PATH_WINOGRAD and prepacked != NULL and winograd_fits(p):
            return conv2d_forward_winograd(x, prepacked, e, y, p, n_threads)
    if is_depthwise(p):
        return depthwise_forward(x, w, e, y, p, n_threads)
    if floating is float:
        # a forced call without packed weights is a slice of a conv that took smallc (the only packing-free path
        # here): it takes smallc too, whatever its own channel count would choose (rows_beat_smallc)
        if (smallc_fits(p, <float>0) and prepacked == NULL) if forced else use_smallc(p, <float>0):
            return conv2d_forward_smallc(x, w, e, y, p, n_threads)
    cdef const floating* packed
    path = prepacked_path if forced and prepacked != NULL else forward_path(p, <floating>0)
    if prepacked_path != path:
        prepacked = NULL
    if path == PATH_PIXELS:
        return conv2d_forward_pixels(x, w, e, y, p, n_threads, prepacked)
    if prepacked != NULL:
        packed = prepacked
    elif pack_weights(w, p, KC, &apack):
        return -1
    else:
        packed = apack
    if path == PATH_POINTWISE:
        rc = conv2d_forward_pointwise(x, packed, KC, e, y, p, n_threads)
    elif path == PATH_DIRECT:
        rc = conv2d_forward_direct(x, packed, KC, e, y, p, n_threads)
    else:
        rc = conv2d_forward_im2col(x, packed, KC, e, y, p, n_threads)
    free(apack)
    return rc


def conv2d_forward(const floating[:, :, :, ::1] x,        # IN  (B, C, H, W)
                   const floating[:, :, :, ::1] weight,   # IN  (K, C/G, KH, KW)
                   bias,                                  # IN  (K,) or None
                   floating[:, :, :, ::1] out,            # OUT (B, K, OH, OW)
                   tuple params, int n_threads,
                   bint relu=False,                       # epilogue: max(., 0) after the bias
                   scale=None, shift=None,                # IN  (K,) each or None: then * scale + shift
                   packed=None,                           # IN  conv2d_pack's result for these weights, or None
                   bint forced=False):                    # take packed's path whatever this batch would choose
    """params = (sh, sw, pad_top, pad_left, dh, dw, groups, OH, OW); shapes already validated. The epilogue (see
    Epilogue) is applied as each output tile is stored. packed (a frozen plan's): the weights packed once by
    conv2d_pack for this geometry, used where the shape still takes the path they were packed for, or always
    where forced (a frozen plan runs every batch on the path it packed for: the pixel path's choice depends on
    the batch, PIXEL_SKIP_MIN_PIXELS, and a plan's batch per thread on the thread count)."""
    cdef fpstate fp, fps
    cdef ConvGeom p
    cdef Epilogue e
    cdef const floating[::1] bias_v
    cdef const floating[::1] scale_v
    cdef const floating[::1] shift_v
    cdef const floating[::1] packed_v
    cdef const floating* prepacked = NULL
    cdef int prepacked_path = PATH_AUTO
    cdef int rc
    fill_geom(&p, (x.shape[0], x.shape[1], x.shape[2], x.shape[3]), weight.shape[0], weight.shape[2], weight.shape[3], params)
    if packed is not None:
        prepacked_path, packed_v = packed
        if packed_v.shape[0] != packed_length(&p, prepacked_path, <floating>0):
            raise ValueError("conv2d: packed weights of another geometry")
        prepacked = &packed_v[0]
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
        rc = conv2d_forward_core(&x[0, 0, 0, 0], &weight[0, 0, 0, 0], &e, &out[0, 0, 0, 0], &p, n_threads,
                                 prepacked, prepacked_path, forced and prepacked != NULL)
        fp_leave_call(fp)
    if rc:
        raise MemoryError("conv2d: could not allocate packing buffers")


cdef Py_ssize_t packed_length(const ConvGeom* p, int path, floating dummy) noexcept nogil:
    """Elements of conv2d_pack's weights for path (0 for a path that packs none of its own)."""
    if path == PATH_PIXELS:
        return pixel_weights_len(p, dummy)
    if path == PATH_POINTWISE or path == PATH_DIRECT or path == PATH_IM2COL:
        return packed_weights_len(p)
    if path == PATH_WINOGRAD and floating is float and winograd_fits(p):
        return winograd_weights_len(p)
    return 0


def conv2d_pack(tuple x_shape,                            # (B, C, H, W) of the inputs (any B)
                const floating[:, :, :, ::1] weight,      # IN  (K, C/G, KH, KW)
                tuple params,
                floating[::1] out,                        # OUT conv2d_pack_length elements
                int path=PATH_AUTO):                      # a path returned before for these weights' whole conv
    """Pack the weights once, as the forward path of this geometry packs them on every call; returns that path,
    to pass as conv2d_forward(..., packed=(path, out)). (A frozen plan's weights do not change: batch 1 paid 5-45
    us per conv for packing them again.) path: pack for that path instead (a slice of a conv's output channels
    packed for the whole conv's path)."""
    cdef ConvGeom p
    fill_geom(&p, x_shape, weight.shape[0], weight.shape[2], weight.shape[3], params)
    if path == PATH_AUTO:
        path = forward_path(&p, <floating>0)
    elif path not in (PATH_DIRECT, PATH_IM2COL, PATH_PIXELS, PATH_POINTWISE, PATH_WINOGRAD):
        raise ValueError(f"conv2d_pack: no packed path {path}")
    elif path == PATH_WINOGRAD and (floating is double or not winograd_fits(&p)):
        raise ValueError("conv2d_pack: Winograd F(2x2, 3x3) takes float32 3x3 convs of stride 1, dilation 1, one "
                         "group")
    if out.shape[0] != packed_length(&p, path, <floating>0) or out.shape[0] == 0:
        raise ValueError("conv2d_pack: out has the wrong length (see conv2d_pack_length)")
    if path == PATH_PIXELS:
        if pack_pixel_weights(&weight[0, 0, 0, 0], &p, &out[0]):
            raise MemoryError()
    elif path == PATH_WINOGRAD:
        if floating is float:
            pack_winograd_weights(&weight[0, 0, 0, 0], &p, &out[0])
    else:
        pack_weights_into(&weight[0, 0, 0, 0], &p, weight_block(&p, <floating>0), &out[0])
    return path


def conv2d_pack_length(tuple x_shape, tuple w_shape, tuple params, Py_ssize_t itemsize, int path=PATH_AUTO):
    """Elements of conv2d_pack's result for this geometry packed for `path`, if given (a slice of a conv's output
    channels packed for the whole conv's path, whatever the slice alone would take: a group of 2 channels of a
    grouped conv would take the first-layer path); else for the path it takes, 0 where that packs no weights
    worth keeping (a depthwise conv, the first-layer path)."""
    cdef ConvGeom p
    fill_geom(&p, x_shape, w_shape[0], w_shape[2], w_shape[3], params)
    if path != PATH_AUTO:
        return packed_length(&p, path, <float>0) if itemsize == 4 else packed_length(&p, path, <double>0)
    if is_depthwise(&p) or (itemsize == 4 and use_smallc(&p, <float>0)):
        return 0
    if itemsize == 4:
        return packed_length(&p, forward_path(&p, <float>0), <float>0)
    return packed_length(&p, forward_path(&p, <double>0), <double>0)
