"""Data-parallel training over MPI whose weights do not depend on the number of processes.

Every rank holds the whole model and the whole data set. Each global mini-batch of N samples is cut into `shards`
fixed micro-batches (shard s holds samples [s*N//S ... ) of the batch in order: the first N % S shards get one
sample more), and rank r computes the contiguous block of shards [r*S//P, (r+1)*S//P). For each of its shards a
rank runs forward, loss and backward on that shard alone and writes one fixed-size record: the shard's gradient
(of the shard-mean loss times the shard weight n_s / N, so that the records sum to the gradient of the global
batch's mean loss; weight 1 for reduction='sum'), its BatchNorm statistics, its loss and its count of correct
predictions. One MPI Allgatherv of these records (raw bytes, never pickled) gives every rank all S records in shard
order, and every rank sums them in that order: g = ((g_0 + g_1) + g_2) + ... . The same code runs the same sum in
a single process with `shards=S` and no communicator, and every kernel is bitwise deterministic whatever its
thread count, so the weights after fit are bitwise identical for 1, 2, ... S ranks and without MPI.

Decisions that keep this invariance:
- BatchNorm is ghost batch norm: each shard is normalised with its own statistics (as the shard would be if it
  were the whole batch). Synchronising the statistics over the global batch would need a collective inside every
  BatchNorm forward and backward; ghost statistics need none, and small per-shard batches regularise much as the
  small batches of single-machine training do. The running statistics are updated once per shard, in shard order,
  on every rank, from the gathered per-shard mean and variance, so every rank holds the same running statistics.
- Dropout masks are drawn per shard, not per rank: before each global batch every rank draws one 63-bit seed from
  convengine's generator (manual_seed), so that generator advances identically everywhere and a checkpoint's
  random state resumes exactly; shard s of that batch then draws its masks from a generator seeded with
  (seed, s), whichever rank computes it.

The weights after fit equal those of a run with the same `shards` and any rank count, not those of the classic
trainer (shards=None), which runs each batch whole and draws dropout from convengine's generator directly.

Launching: `launched_by_mpiexec()` looks for the variables that mpiexec sets (PMI_RANK, PMI_SIZE, PMIX_RANK,
OMPI_COMM_WORLD_SIZE, ...); only then does `world()` import mpi4py, so convengine never needs MPI otherwise.
An exception on one rank of a multi-rank job prints that rank's message and traceback and ends the whole job
(MPI Abort) instead of leaving the other ranks waiting in a collective (`abort_on_error`).
Set CONVENGINE_CHECK_RANKS=1 (or DataParallel.check = True) to assert after every step that every rank holds
bitwise identical weights, buffers and random state. CONVENGINE_EXCHANGE=reduce_scatter (or DataParallel.exchange)
swaps the single Allgatherv, whose traffic per rank grows with the rank count, for three collectives that move
about twice one record whatever the rank count, with the same bits (see EXCHANGES).
"""
import contextlib
import hashlib
import math
import os
import sys
import time
import traceback

import numpy as np

from . import _args, _random
from .layers import BatchNorm2d

__all__ = ["DataParallel", "launched_by_mpiexec", "world", "mpi_info", "shard_bounds", "shard_owners",
           "abort_on_error"]

# Environment variables that MPI launchers set in every process they start: MPICH's and Intel MPI's Hydra (PMI_*),
# PMIx (Open MPI 5, Slurm's PMIx plug-in), Open MPI's ORTE, MVAPICH.
LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                      "MV2_COMM_WORLD_SIZE")

# How the records travel: one Allgatherv of whole records (each rank receives (P - 1) records per step), or
# "reduce_scatter": an Allgatherv of the small parts (metrics, BatchNorm statistics), an Alltoallv that gives rank r
# slice r of every shard's gradient, the ordered sum of that slice, and an Allgatherv of the summed slices (each
# rank receives about 2 (P - 1) / P of one record). The sum is per coordinate and in shard order either way, so the
# two give the same bits; the second moves far less data past a few ranks.
EXCHANGES = ("allgather", "reduce_scatter")

# Header of each shard's record, in float64: the shard's loss, its correct predictions, its rank's stop request.
_HEADER = 3


def launched_by_mpiexec(environ=None):
    """True when this process was started by mpiexec/mpirun (one of LAUNCHER_VARIABLES is set)."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in LAUNCHER_VARIABLES)


def world():
    """mpi4py's COMM_WORLD when started by mpiexec, else None; mpi4py (and MPI_Init) is imported only then."""
    if not launched_by_mpiexec():
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("started by mpiexec, but mpi4py is not installed: pip install 'convengine[mpi]'") \
            from None
    return MPI.COMM_WORLD


def mpi_info():
    """{'vendor', 'library', 'ranks', 'rank', 'mpi4py'} when started by mpiexec, else None; {'error': ...} when
    started by mpiexec without mpi4py."""
    try:
        comm = world()
    except RuntimeError as e:
        return {"error": str(e), "rank": 0}
    if comm is None:
        return None
    import mpi4py
    from mpi4py import MPI
    name, version = MPI.get_vendor()
    library = MPI.Get_library_version().strip().splitlines()[0].strip()
    return {"vendor": f"{name} {'.'.join(map(str, version))}", "library": library, "ranks": comm.Get_size(),
            "rank": comm.Get_rank(), "mpi4py": mpi4py.__version__}


def shard_bounds(n, shards):
    """[(start, stop)] of the `shards` micro-batches of a batch of n samples, in order; the first n % shards get
    one sample more (a shard is empty when n < shards)."""
    base, extra = divmod(n, shards)
    bounds, start = [], 0
    for s in range(shards):
        stop = start + base + (1 if s < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def shard_owners(shards, ranks):
    """first[r] .. first[r + 1] - 1 are the shards of rank r: contiguous blocks, so gathering the ranks' records
    in rank order puts them in shard order."""
    return [r * shards // ranks for r in range(ranks + 1)]


@contextlib.contextmanager
def abort_on_error(comm):
    """Run the block; if it raises on a rank of a multi-rank communicator, print that rank's message and traceback
    to stderr and end the whole job with comm.Abort(1). With no communicator or one rank, exceptions pass."""
    try:
        yield
    except BaseException as e:
        if comm is None or comm.Get_size() == 1 or (isinstance(e, SystemExit) and e.code in (0, None)):
            raise
        rank, size = comm.Get_rank(), comm.Get_size()
        message = str(e) or type(e).__name__
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        try:
            sys.stdout.flush()
        except Exception:
            pass
        sys.stderr.write(f"{text}convengine: rank {rank} of {size} failed, ending the job: "
                         f"{type(e).__name__}: {message}\n")
        sys.stderr.flush()
        comm.Abort(1)
        raise  # Abort does not return; this only keeps a mocked communicator honest


def _ordered_sum(rows):
    """rows[0] + rows[1] + ... in that order, per coordinate: the sum every rank and rank count computes alike."""
    total = rows[0].copy()
    for s in range(1, rows.shape[0]):
        total += rows[s]
    return total


class _RecordLayout:
    """Where each part of a shard's record lies: a float64 head (loss, correct, stop, one element count per
    BatchNorm layer), then in the model's dtype each BatchNorm's mean and variance and every parameter's
    gradient, flat and in model order. The record is padded to whole float64s."""

    def __init__(self, params, norms):
        dtypes = {p.data.dtype for p in params} | {layer.dtype for layer in norms}
        if len(dtypes) > 1:
            raise TypeError(f"data-parallel training needs one dtype for every parameter, got "
                            f"{sorted(d.name for d in dtypes)}")
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
        self.head = _HEADER + len(norms)
        offset = 0
        self.stats = []
        for layer in norms:
            c = layer.num_features
            self.stats.append((offset, offset + c, offset + 2 * c))
            offset += 2 * c
        self.grad_start = offset
        self.grads = []
        for p in params:
            self.grads.append((offset, offset + p.data.size))
            offset += p.data.size
        self.typed = offset
        typed_bytes = offset * self.dtype.itemsize
        self.nbytes = 8 * self.head + 8 * -(-typed_bytes // 8)

    def views(self, records):
        """(head, typed) views of a (k, nbytes) uint8 array of records: float64 (k, head) and dtype (k, typed)."""
        head = records[:, :8 * self.head].view(np.float64)
        typed = records[:, 8 * self.head:8 * self.head + self.typed * self.dtype.itemsize].view(self.dtype)
        return head, typed


class DataParallel:
    """The shard plan and the gradient exchange of Trainer(model, loss, optimizer, comm, shards).

    `comm`: an mpi4py communicator, or None for a single process; `shards` (>= the rank count; default: the rank
    count) micro-batches per global batch. See the module's documentation for the arithmetic."""

    def __init__(self, model, comm=None, shards=None):
        if comm is not None:
            for name in ("Get_rank", "Get_size", "Allgatherv", "Abort"):
                if not callable(getattr(comm, name, None)):
                    raise TypeError(f"comm must be an mpi4py communicator (e.g. MPI.COMM_WORLD), got "
                                    f"{type(comm).__name__}")
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.shards = self.size if shards is None else _args.check_int(shards, "shards", 1)
        if self.shards < self.size:
            raise ValueError(f"shards must be >= the number of ranks ({self.size}) so that every rank has a shard, "
                             f"got shards={self.shards}")
        first = shard_owners(self.shards, self.size)
        self.first = first
        self.local = range(first[self.rank], first[self.rank + 1])
        self.model = model
        self.check = os.environ.get("CONVENGINE_CHECK_RANKS", "") not in ("", "0")
        self.exchange = os.environ.get("CONVENGINE_EXCHANGE", "allgather")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"CONVENGINE_EXCHANGE must be one of {EXCHANGES}, got {self.exchange!r}")
        self.steps = 0
        # Seconds spent per part of gradients(), summed over the steps: this rank's shards (forward, backward,
        # packing), the exchange (waiting for the slowest rank included), the ordered sum and running statistics.
        self.seconds = {"compute": 0.0, "exchange": 0.0, "reduce": 0.0}
        self._layout = None
        self._records = None

    @property
    def is_root(self):
        """True on rank 0, the rank that prints, writes checkpoints and saves."""
        return self.rank == 0

    def __repr__(self):
        return f"<DataParallel rank {self.rank} of {self.size}, {self.shards} shards per batch>"

    # -- the step --------------------------------------------------------------------------------------------------

    def _norms(self):
        return [layer for layer in getattr(self.model, "layers", ()) if isinstance(layer, BatchNorm2d)]

    def _prepare(self, params, norms):
        layout = _RecordLayout(params, norms)
        if self._layout is None or self._layout.nbytes != layout.nbytes or self._layout.dtype != layout.dtype:
            self._layout = layout
            self._records = np.zeros((self.shards, layout.nbytes), np.uint8)
        return self._layout

    def gradients(self, loss, x, y, idx, count_correct, stop_requested=False):
        """Compute this rank's shards of the global batch x[idx], y[idx], exchange the records and leave in every
        model parameter's .grad the sum over the shards in shard order; update BatchNorm's running statistics in
        shard order. Returns (loss of the global batch, correct predictions in it, stop), where stop is True when
        any rank asked to stop (a Ctrl-C) and every rank then receives the same answer.

        `count_correct(out, y_shard)` counts the correct predictions of a shard's outputs."""
        if self.check:
            self.check_replicas(f"before step {self.steps + 1}")
        t0 = time.perf_counter()
        params = self.model.parameters()
        norms = self._norms()
        layout = self._prepare(params, norms)
        n = len(idx)
        bounds = shard_bounds(n, self.shards)
        # One draw per global batch on every rank, whatever the rank count: the generator stays in step everywhere.
        seed = int(_random.generator().integers(0, 2 ** 63))
        reduction_mean = getattr(loss, "reduction", "mean") == "mean"
        head, typed = layout.views(self._records)
        for s in self.local:
            start, stop = bounds[s]
            head[s] = 0
            typed[s] = 0
            head[s, 2] = 1.0 if stop_requested else 0.0
            if stop == start:
                continue
            shard_idx = idx[start:stop]
            xs, ys = x[shard_idx], y[shard_idx]
            sink = []
            for layer in norms:
                layer._stats_hook = lambda mean, var, m, _sink=sink: _sink.append((mean, var, m))
            try:
                with _random.using(np.random.default_rng([seed, s])):
                    out = self.model.forward(xs, training=True)
            finally:
                for layer in norms:
                    layer._stats_hook = None
            value = loss(out, ys)
            grad = loss.backward()
            weight = (stop - start) / n if reduction_mean else 1.0
            if weight != 1.0:
                grad = grad * grad.dtype.type(weight)
            for p in params:
                if p.grad is None or p.grad.shape != p.data.shape or p.grad.dtype != p.data.dtype:
                    p.grad = np.zeros_like(p.data)
                else:
                    p.grad.fill(0)
            self.model.backward(grad)
            for p, (a, b) in zip(params, layout.grads):
                typed[s, a:b] = p.grad.reshape(-1)
            for j, ((mean, var, m), (a, b, c)) in enumerate(zip(sink, layout.stats)):
                typed[s, a:b] = mean
                typed[s, b:c] = var
                head[s, _HEADER + j] = m
            head[s, 0] = value * weight
            head[s, 1] = count_correct(out, ys)
        t1 = time.perf_counter()
        if self.exchange == "allgather" or self.comm is None or self.size == 1:
            self._exchange()
            t2 = time.perf_counter()
            total = _ordered_sum(typed[:, layout.grad_start:])
        else:
            total = self._exchange_sliced(layout)
            t2 = time.perf_counter()
        for p, (a, b) in zip(params, layout.grads):
            a -= layout.grad_start
            b -= layout.grad_start
            np.copyto(p.grad, total[a:b].reshape(p.data.shape))
        for s in range(self.shards):
            for j, (layer, (a, b, c)) in enumerate(zip(norms, layout.stats)):
                m = head[s, _HEADER + j]
                if m > 0:
                    layer.update_running_stats(typed[s, a:b], typed[s, b:c], int(m))
        value = 0.0
        for s in range(self.shards):
            value += float(head[s, 0])
        correct = int(round(float(np.sum(head[:, 1]))))
        stop = bool(np.any(head[:, 2] != 0))
        self.steps += 1
        t3 = time.perf_counter()
        self.seconds["compute"] += t1 - t0
        self.seconds["exchange"] += t2 - t1
        self.seconds["reduce"] += t3 - t2
        return value, correct, stop

    @property
    def record_bytes(self):
        """Bytes of one shard's record (gradients, BatchNorm statistics, metrics); a step gathers `shards` of
        them. None before the first step."""
        return None if self._layout is None else self._layout.nbytes

    def _exchange(self):
        """Allgatherv of the records in place: rank r contributes rows first[r]..first[r+1]-1."""
        if self.comm is None or self.size == 1:
            return
        from mpi4py import MPI
        nbytes = self._records.shape[1]
        counts = [(self.first[r + 1] - self.first[r]) * nbytes for r in range(self.size)]
        displs = [self.first[r] * nbytes for r in range(self.size)]
        self.comm.Allgatherv(MPI.IN_PLACE, [self._records, counts, displs, MPI.BYTE])

    def _exchange_sliced(self, layout):
        """The reduce_scatter exchange: returns the summed gradient (identical to the ordered sum of all records)
        and leaves every record's head and BatchNorm statistics on every rank."""
        from mpi4py import MPI
        size, rank, first, records = self.size, self.rank, self.first, self._records
        lo, hi = first[rank], first[rank + 1]
        item = layout.dtype.itemsize
        meta = 8 * layout.head + layout.grad_start * item
        # 1. the small parts of every record, to every rank
        small = np.empty((self.shards, meta), np.uint8)
        small[lo:hi] = records[lo:hi, :meta]
        self.comm.Allgatherv(MPI.IN_PLACE, [small, [(first[q + 1] - first[q]) * meta for q in range(size)],
                                            [first[q] * meta for q in range(size)], MPI.BYTE])
        records[:, :meta] = small
        # 2. slice q of this rank's shards' gradients to rank q; slice `rank` of every shard's gradient back
        grads = layout.views(records)[1][:, layout.grad_start:]
        g = grads.shape[1]
        cuts = [q * g // size for q in range(size + 1)]
        local = hi - lo
        send = np.empty(local * g, layout.dtype)
        send_counts, send_displs, offset = [], [], 0
        for q in range(size):
            width = cuts[q + 1] - cuts[q]
            send[offset:offset + local * width].reshape(local, width)[...] = grads[lo:hi, cuts[q]:cuts[q + 1]]
            send_counts.append(local * width * item)
            send_displs.append(offset * item)
            offset += local * width
        width = cuts[rank + 1] - cuts[rank]
        mine = np.empty((self.shards, width), layout.dtype)
        self.comm.Alltoallv([send.view(np.uint8), send_counts, send_displs, MPI.BYTE],
                            [mine.reshape(-1).view(np.uint8), [(first[q + 1] - first[q]) * width * item
                                                               for q in range(size)],
                             [first[q] * width * item for q in range(size)], MPI.BYTE])
        # 3. this rank's slice summed in shard order, then every slice to every rank
        total = np.empty(g, layout.dtype)
        total[cuts[rank]:cuts[rank + 1]] = _ordered_sum(mine)
        self.comm.Allgatherv(MPI.IN_PLACE, [total.view(np.uint8), [(cuts[q + 1] - cuts[q]) * item
                                                                    for q in range(size)],
                                            [cuts[q] * item for q in range(size)], MPI.BYTE])
        return total

    # -- inference split over ranks ----------------------------------------------------------------------------

    def predict(self, x, batch_size):
        """model.predict(x, batch_size) computed by all ranks together: the batches of predict are dealt out in
        contiguous blocks, so every rank predicts exactly the batches (and bits) a single process would, then
        Allgatherv gives every rank all outputs."""
        batch_size = _args.check_int(batch_size, "batch_size", 1)
        x = self.model._input(x)
        if self.comm is None or self.size == 1:
            return self.model.predict(x, batch_size)
        from mpi4py import MPI
        n = x.shape[0]
        out_shape = tuple(self.model.output_shape(x.shape[1:]))
        dtype = self.model.dtype
        outputs = np.empty((n,) + out_shape, dtype)
        batches = -(-n // batch_size)
        rows = [min(n, (r * batches // self.size) * batch_size) for r in range(self.size + 1)]
        lo, hi = rows[self.rank], rows[self.rank + 1]
        if hi > lo:
            outputs[lo:hi] = self.model.predict(x[lo:hi], batch_size)
        row_bytes = math.prod(out_shape) * outputs.itemsize
        counts = [(rows[r + 1] - rows[r]) * row_bytes for r in range(self.size)]
        displs = [rows[r] * row_bytes for r in range(self.size)]
        flat = outputs.reshape(-1).view(np.uint8)
        self.comm.Allgatherv(MPI.IN_PLACE, [flat, counts, displs, MPI.BYTE])
        return outputs

    # -- checks ------------------------------------------------------------------------------------------------

    def _digest(self):
        h = hashlib.sha256()
        for p in self.model.parameters():
            h.update(np.ascontiguousarray(p.data).tobytes())
        for a in self.model.buffers().values():
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(repr(_random.get_state()).encode())
        return np.frombuffer(h.digest(), np.uint8).copy()

    def check_replicas(self, when="now"):
        """Raise RuntimeError (on every rank alike) unless every rank holds bitwise identical parameters,
        BatchNorm buffers and random state."""
        if self.comm is None or self.size == 1:
            return
        from mpi4py import MPI
        mine = self._digest()
        every = np.empty((self.size, mine.size), np.uint8)
        self.comm.Allgather([mine, MPI.BYTE], [every, MPI.BYTE])
        differ = [r for r in range(self.size) if not np.array_equal(every[r], every[0])]
        if differ:
            raise RuntimeError(f"ranks {differ} hold weights, buffers or random state different from rank 0's "
                               f"{when}: build the model with the same manual_seed on every rank")

    def barrier(self):
        if self.comm is not None and self.size > 1:
            self.comm.Barrier()
