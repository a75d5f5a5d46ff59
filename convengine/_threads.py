"""The engine's thread count: one process-wide setting that every kernel call reads and passes on as n_threads."""
import contextlib
import os
import threading

from ._args import ceil_div

_lock = threading.Lock()
_num_threads = None
# GNU OpenMP cannot start a thread team in a process forked from one whose team already ran: the child hangs
# (GCC bug 52303). A forked child therefore runs the kernels on one thread, as PyTorch does; results are the same
# for any thread count. Use the 'spawn' start method for workers that should compute in parallel.
_forked_child = False
# Above this an OpenMP runtime may fail to start the team (and abort the process); no machine this engine targets
# has more cores than this.
MAX_THREADS = 1024


# Calls below a size threshold run on one thread (functional.py): waking the team costs more than they take.
# Tests of thread invariance, concurrency and fork turn that off with every_call_threaded(), so that their small
# inputs really run on the whole team.
_serial_small_calls = True


@contextlib.contextmanager
def every_call_threaded():
    """For tests: within the `with`, every kernel call uses get_num_threads() threads, however small (process-wide,
    and inherited by a forked child)."""
    global _serial_small_calls
    before = _serial_small_calls
    _serial_small_calls = False
    try:
        yield
    finally:
        _serial_small_calls = before


def _usable_cores():
    """Cores this process may run on: CPU affinity, capped by a cgroup v2/v1 CPU quota when one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, quota)
    return max(1, n)


def _cgroup_quota():
    """ceil(quota / period) from cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`, or None when unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, ceil_div(int(quota), int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        if quota > 0 and period > 0:
            return max(1, ceil_div(quota, period))
    except (OSError, ValueError):
        pass
    return None


def _default_threads():
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env:
        try:
            n = int(env)
            if n >= 1:
                return min(n, MAX_THREADS)
        except ValueError:
            pass
    return _usable_cores()


def _after_fork_in_child():
    global _lock, _num_threads, _forked_child
    _lock = threading.Lock()  # the parent's may have been held by another thread at the fork
    _forked_child = True
    _num_threads = 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_n(n):
    if isinstance(n, bool) or not isinstance(n, int) and not hasattr(n, "__index__"):
        raise TypeError(f"n must be an int, got {n!r}")
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > MAX_THREADS:
        raise ValueError(f"n must be <= {MAX_THREADS}, got {n}")
    return n


def set_num_threads(n):
    """Set how many OpenMP threads the kernels use (1 <= n <= MAX_THREADS). Results do not depend on it, only
    speed does. In a forked child process it stays 1 (see _forked_child)."""
    global _num_threads
    n = _check_n(n)
    with _lock:
        _num_threads = 1 if _forked_child else n


def get_num_threads():
    """The thread count the kernels use: set_num_threads(), else OMP_NUM_THREADS, else the usable cores."""
    global _num_threads
    n = _num_threads                  # set once, then only replaced whole: read without the lock
    if n is not None:
        return n
    with _lock:
        if _num_threads is None:
            _num_threads = _default_threads()
        return _num_threads


class num_threads:
    """Context manager: the kernels use n threads inside the block, and the previous count again after it.

        with convengine.num_threads(1):
            model.predict(x)

    The count is process-wide (like set_num_threads), so blocks in several Python threads at once change it for
    each other; results never depend on it, only speed does."""

    def __init__(self, n):
        self._n = n
        self._previous = []
        _check_n(n)

    def __enter__(self):
        self._previous.append(get_num_threads())
        set_num_threads(self._n)
        return self

    def __exit__(self, *exc):
        set_num_threads(self._previous.pop())
        return False
