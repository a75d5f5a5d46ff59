"""Hostile data-set files: crafted CIFAR-10 pickles (tampered NumPy dtypes, zero-stride views, unknown codecs) and
IDX files that declare one size and inflate to another. Each is refused with a ValueError naming the file, before
anything big is allocated; the crashing cases run in a subprocess, whose exit status is checked."""
import gzip
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from convengine import data

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Reduce:
    """Pickles as `func(*args)`, then BUILD with state when given: any call the pickle format can express."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def dtype_object(spec, state=(3, "|", None, None, None, -1, -1, 0)):
    return Reduce(np.dtype, (spec, False, True), state)


def reconstruct():
    """numpy's own _reconstruct, under the module name this NumPy pickles it with."""
    return pickle.loads(pickle.dumps(np.zeros(1), protocol=2)).__reduce__()[0]


def raw_array(shape, dtype, data):
    """An array pickled as _reconstruct(ndarray, (0,), b'b') + BUILD (version, shape, dtype, fortran, data)."""
    return Reduce(reconstruct(), (np.ndarray, (0,), b"b"), (1, shape, dtype, False, data))


def write_batches(directory, batch):
    directory.mkdir(exist_ok=True)
    for name in ("data_batch_1", "test_batch"):
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


def good_data(n=2):
    return np.zeros((n, 3072), np.uint8)


# A 6 KB batch that once segfaulted the loader: np.dtype('O8') rebuilt with flags 0 forgets that it holds objects,
# ndarray((2,), it, buffer=...) wraps file bytes as object pointers, and reading the labels follows them.
HOSTILE_BATCHES = {
    "object-pointers": {b"data": good_data(), b"labels": Reduce(np.ndarray, ((2,), dtype_object("O8"),
                                                                             b"AAAAAAAABBBBBBBB"))},
    "object-dtype-reconstructed": {b"data": good_data(), b"labels": raw_array((2,), dtype_object("O8"),
                                                                              b"AAAAAAAABBBBBBBB")},
    "tampered-dtype-state": {b"data": good_data(), b"labels": raw_array(
        (2,), dtype_object("i8", (3, "|", None, None, None, 1, 1, 0)), b"\0" * 16)},
    "zero-stride-view": {b"data": Reduce(np.ndarray, ((20000, 3072), dtype_object("u1"), b"x" * 3072, 0,
                                                      (0, 1))), b"labels": [0] * 20000},
    "short-data": {b"data": raw_array((20000, 3072), dtype_object("u1"), b"x" * 3072), b"labels": [0] * 20000},
    "unknown-codec": {b"data": good_data(), b"labels": [0, 1], b"x": Reduce(__import__("_codecs").encode,
                                                                            ("abc", "no-such-codec"))},
    "label-objects": {b"data": good_data(), b"labels": [0, b"1"]},
    "float-labels": {b"data": good_data(), b"labels": raw_array((2,), dtype_object("f8"), b"\0" * 16)},
}


def run_python(code, *args, timeout=120):
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


LOAD = """
import sys
from convengine import data
try:
    data.load_cifar10(sys.argv[1])
except ValueError as e:
    print(e)
    sys.exit(3)
sys.exit(0)
"""


@pytest.mark.parametrize("case", sorted(HOSTILE_BATCHES))
def test_hostile_cifar_batch_is_a_value_error_naming_the_file(case, tmp_path):
    write_batches(tmp_path / "d", HOSTILE_BATCHES[case])
    result = run_python(LOAD, str(tmp_path / "d"))
    assert result.returncode == 3, (result.returncode, result.stdout, result.stderr)
    assert "data_batch_1" in result.stdout and "Traceback" not in result.stderr, result


def test_hostile_cifar_batch_in_the_cli_exits_1_with_one_line(tmp_path):
    write_batches(tmp_path / "d", HOSTILE_BATCHES["object-pointers"])
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "convengine", "train", "--dataset", "cifar10", "--data",
                             str(tmp_path / "d"), "--epochs", "0"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "data_batch_1" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_cifar_arrays_own_their_data_and_keep_their_byte_order(tmp_path, rng):
    pixels = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    labels = np.array([2, 0, 9], ">i8")
    write_batches(tmp_path / "d", {b"data": pixels, b"labels": labels})
    (x, y), _ = data.load_cifar10(str(tmp_path / "d"))
    np.testing.assert_array_equal(np.round(x * 255).reshape(3, 3072).astype(np.uint8), pixels)
    np.testing.assert_array_equal(y, [2, 0, 9])
    assert y.dtype == np.int64


def test_cifar_python2_pickle_with_byte_strings_loads(tmp_path, rng):
    """The shipped batches come from Python 2: read with encoding='bytes', the dtype code and byte order are bytes
    and the constructor flags are ints."""
    pixels = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    state = (3, b"|", None, None, None, -1, -1, 0)
    batch = {b"data": raw_array((2, 3072), Reduce(np.dtype, (b"u1", 0, 1), state), pixels.tobytes()),
             b"labels": [7, 3], b"batch_label": b"training batch 1 of 5"}
    write_batches(tmp_path / "d", batch)
    (x, y), (xt, yt) = data.load_cifar10(str(tmp_path / "d"))
    np.testing.assert_array_equal(np.round(x * 255).reshape(2, 3072).astype(np.uint8), pixels)
    np.testing.assert_array_equal(y, [7, 3])


def idx_header(code, shape):
    return bytes([0, 0, code, len(shape)]) + b"".join(struct.pack(">I", d) for d in shape)


def gzip_bomb(path, header, megabytes):
    """A gzip file: header then megabytes MiB of zeros, written a chunk at a time."""
    chunk = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header)
        for _ in range(megabytes):
            f.write(chunk)


def peak_mib(func, *args):
    """Peak Python allocation while func runs, in MiB (and what it raised)."""
    import tracemalloc
    tracemalloc.start()
    try:
        func(*args)
        error = None
    except ValueError as e:
        error = e
    peak = tracemalloc.get_traced_memory()[1] / (1 << 20)
    tracemalloc.stop()
    return peak, error


def test_gzip_idx_declaring_one_byte_is_refused_before_it_inflates(tmp_path):
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    gzip_bomb(p, idx_header(0x08, (1,)), 64)
    assert p.stat().st_size < 100_000
    peak, error = peak_mib(data.load_idx, p)
    assert error is not None and str(p) in str(error) and "trailing" in str(error)
    assert peak < 8, f"peak {peak:.0f} MiB"


def test_gzip_idx_declaring_more_than_deflate_can_hold_is_refused_at_once(tmp_path):
    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as f:
        f.write(idx_header(0x08, (60000, 4096, 4096)))
    peak, error = peak_mib(data.load_idx, p)
    assert error is not None and "needs" in str(error) and str(p) in str(error)
    assert peak < 8, f"peak {peak:.0f} MiB"


@pytest.mark.parametrize("code", [0x0D, 0x0E])
def test_idx_labels_of_float_type_are_refused(code, tmp_path):
    from test_data import write_mnist
    write_mnist(tmp_path)
    labels = np.array([0, 1.5, 2.9, 3, 4], ">f4" if code == 0x0D else ">f8")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_header(code, labels.shape) + labels.tobytes())
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*integer"):
        data.load_mnist(str(tmp_path))
