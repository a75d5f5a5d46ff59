# The compute kernels of one ISA level: GEMM, convolution, pooling, elementwise ops and batch norm. Included by each
# _engine_<isa>.pyx so that the same source is compiled once per ISA (see setup.py).
include "runtime.pxi"
include "gemm.pxi"
include "conv.pxi"
include "conv_smallc.pxi"
include "depthwise.pxi"
include "pool.pxi"
include "eltwise.pxi"
include "batchnorm.pxi"
include "optim.pxi"
