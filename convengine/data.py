"""Data sets as NumPy arrays: the embedded 8x8 digits, MNIST / Fashion-MNIST IDX files, CIFAR-10 python batches,
and a download helper that verifies a SHA-256.

Every loader returns ((x_train, y_train), (x_test, y_test)) with x float32 of shape (N, C, H, W) scaled to [0, 1]
and y int64 class labels, and checks that the labels fit the images.
"""
import contextlib
import gzip
import hashlib
import math
import os
import pickle
import re
import time
import urllib.parse
import urllib.request
import zlib

import numpy as np

from . import datasets
from ._args import check_labels
from ._outputs import temporary_beside

__all__ = ["load_digits", "load_idx", "load_mnist", "load_fashion_mnist", "load_cifar10",
           "load_dataset", "download", "DATASETS", "DOWNLOAD_MAX_BYTES"]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
CLASS_NAMES = {
    "digits": [str(i) for i in range(10)],
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


def _split_stratified(labels, test_fraction, seed):
    """Indices (train, test): test_fraction of each class, chosen by a seeded generator, so the split is fixed."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(test_fraction=0.2, seed=0):
    """The embedded 1,797 8x8 handwritten digits (see convengine.datasets), split per class into train and test
    with a fixed seed: 1,438 training and 359 test images for the defaults. x is (N, 1, 8, 8) in [0, 1]."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    with np.load(datasets.path("digits.npz"), allow_pickle=False) as f:
        images, labels = f["images"], f["labels"]
    x = (images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = check_labels(labels.astype(np.int64), len(x), 10).astype(np.int64)
    train, test = _split_stratified(y, float(test_fraction), seed)
    return (x[train], y[train]), (x[test], y[test])


# IDX type codes (http://yann.lecun.com/exdb/mnist/): all multi-byte values are big-endian.
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


# DEFLATE inflates at most ~1032 bytes per compressed byte: a gzipped file declaring more than this many times its
# own size cannot hold it, and is refused before anything is inflated.
_MAX_DEFLATE_RATIO = 1100


@contextlib.contextmanager
def _open_maybe_gzip(path):
    """(stream, stored size, gzipped) of the file, gunzipping when it starts with the gzip magic (whatever its
    name); the stream inflates only as much as is read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        gzipped = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        if not gzipped:
            yield f, size, False
            return
        try:
            with gzip.GzipFile(fileobj=f) as g:
                yield g, size, True
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data: {e}") from None


def load_idx(path):
    """Parse one IDX file (raw or gzipped) into an array of its declared type and shape. The header is read first;
    only the size it declares is then read (or inflated), and a file holding more or less is refused."""
    with _open_maybe_gzip(path) as (f, stored, gzipped):
        head = f.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0:
            raise ValueError(f"{path}: not an IDX file (it must start with two zero bytes, a type code and a rank)")
        code, ndim = head[2], head[3]
        if code not in _IDX_TYPES:
            raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
        dims = f.read(4 * ndim)
        if ndim == 0 or len(dims) < 4 * ndim:
            raise ValueError(f"{path}: truncated IDX header (rank {ndim})")
        shape = tuple(int(d) for d in np.frombuffer(dims, ">u4", ndim))
        dtype = _IDX_TYPES[code]
        nbytes = math.prod(shape) * dtype.itemsize
        expected = 4 + 4 * ndim + nbytes
        limit = stored * _MAX_DEFLATE_RATIO if gzipped else stored
        if expected > limit:
            raise ValueError(f"{path}: IDX file truncated: shape {shape} of {dtype} needs {expected} bytes, "
                             f"the file {'cannot inflate to' if gzipped else 'has'} "
                             f"{'that many' if gzipped else stored}")
        body = f.read(nbytes)
        extra = f.read(1)
        if len(body) != nbytes or extra:
            kind = "truncated" if len(body) < nbytes else "has trailing bytes"
            got = 4 + 4 * ndim + len(body)
            raise ValueError(f"{path}: IDX file {kind}: shape {shape} of {dtype} needs {expected} bytes, "
                             f"the file has {got if not extra else 'more'}")
    return np.frombuffer(body, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory, stems):
    """The first existing file among stem, stem.gz for each candidate stem."""
    for stem in stems:
        for name in (stem, stem + ".gz"):
            p = os.path.join(directory, name)
            if os.path.isfile(p):
                return p
    raise FileNotFoundError(f"none of {', '.join(s + '[.gz]' for s in stems)} in {directory}")


def _idx_images_labels(directory, prefix, num_classes=10):
    images_path = _find(directory, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
    labels_path = _find(directory, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
    images = load_idx(images_path)
    labels = load_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} "
                         f"{images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected 1-D labels, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{labels_path}: labels must be of an integer IDX type, got {labels.dtype} (a float "
                         f"label such as 1.5 is no class)")
    labels = check_labels(labels.astype(np.int64), len(images), num_classes, name=f"labels in {labels_path}")
    x = (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    return x, labels.astype(np.int64)


def load_mnist(directory):
    """MNIST from the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
    t10k-labels-idx1-ubyte, each raw or .gz) in directory. x is (N, 1, 28, 28) in [0, 1]."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory holding the MNIST IDX files")
    return _idx_images_labels(directory, "train"), _idx_images_labels(directory, "t10k")


def load_fashion_mnist(directory):
    """Fashion-MNIST: the same file names and layout as MNIST (see load_mnist)."""
    return load_mnist(directory)


class _PickledDtype:
    """What a pickle's `numpy.dtype(spec, align, copy)` call stands for: only a plain numeric type code, and only
    a byte order from its state. Nothing is handed to NumPy's own dtype reconstruction, so the pickled state
    (flags, fields, item size) cannot tamper with it."""

    _CODES = re.compile(r"[uif][1248]|b1")

    def __init__(self, spec, align=False, copy=True):
        if isinstance(spec, bytes):  # a Python 2 str, read with encoding="bytes"
            spec = spec.decode("latin1")
        if not isinstance(spec, str) or not self._CODES.fullmatch(spec) or spec == "f1":
            raise pickle.UnpicklingError(f"refusing dtype {spec!r}: only plain numeric arrays are read")
        self.spec = spec
        self.order = "="
        self._state_set = False

    def __setstate__(self, state):
        if self._state_set or not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise pickle.UnpicklingError(f"refusing dtype state {state!r}")
        order, subarray, names, fields = state[1], state[2], state[3], state[4]
        if isinstance(order, bytes):
            order = order.decode("latin1")
        plain = state[5:8] == (-1, -1, 0) and (len(state) == 8 or state[8] is None)
        if order not in ("<", ">", "|", "=") or subarray is not None or names is not None or fields is not None \
                or not plain:
            raise pickle.UnpicklingError(f"refusing dtype state {state!r}: only plain numeric types are read")
        self.order = "=" if order == "|" else order
        self._state_set = True

    def dtype(self):
        return np.dtype(self.order + self.spec)


class _PickledArray:
    """What a pickle's array reconstruction stands for: a shape, a _PickledDtype and the raw bytes, turned into a
    real array by array() only once the bytes are exactly what the shape and type declare."""

    _ndarray = object()  # what the pickle's `numpy.ndarray` global resolves to: a marker, never callable

    def __init__(self, shape=None, dtype=None, data=None, order="C"):
        self.shape, self.dtype_, self.data, self.order = shape, dtype, data, order

    @classmethod
    def reconstruct(cls, subtype, shape, typecode):
        if subtype is not cls._ndarray:
            raise pickle.UnpicklingError("refusing an array of a type other than numpy.ndarray")
        return cls()

    @classmethod
    def frombuffer(cls, buffer, dtype, shape, order):
        return cls(shape, dtype, buffer, order)

    def __setstate__(self, state):
        if self.shape is not None or not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("refusing a malformed array state")
        if len(state) == 5:
            if state[0] != 1:
                raise pickle.UnpicklingError(f"refusing array state version {state[0]!r}")
            state = state[1:]
        shape, dtype, fortran, data = state
        self.shape, self.dtype_, self.data = shape, dtype, data
        self.order = "F" if fortran else "C"

    def array(self):
        """The array, after checking every part; a copy that owns its data."""
        shape, dtype, data = self.shape, self.dtype_, self.data
        if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in shape) or len(shape) > 8:
            raise ValueError(f"an array has a bad shape {shape!r}")
        if not isinstance(dtype, _PickledDtype):
            raise ValueError("an array has no plain numeric dtype")
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"an array's data must be bytes, got {type(data).__name__}")
        if self.order not in ("C", "F"):
            raise ValueError(f"an array has a bad order {self.order!r}")
        dtype = dtype.dtype()
        need = math.prod(shape) * dtype.itemsize
        if len(data) != need:
            raise ValueError(f"an array of shape {shape} and dtype {dtype} needs {need} bytes of data, the file "
                             f"holds {len(data)}")
        return np.frombuffer(data, dtype).reshape(shape, order=self.order).astype(dtype.newbyteorder("="),
                                                                                   order="C")


def _latin1(text, encoding="utf-8"):
    """The `_codecs.encode` that protocol-2 pickles use for bytes: only the latin-1 codec, only of a str."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower().replace("_", "-") not in (
            "latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"refusing codec {encoding!r}: protocol-2 bytes are encoded as latin1")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles of a dict holding a NumPy uint8 array and lists. A pickle can name any
    callable, so only the names those files use are resolved, and none of them to NumPy itself: NumPy's array
    reconstruction (protocol 2, as shipped, and protocol 5's from-buffer form, for re-saved copies) and its dtype
    become inert stand-ins that record the declared shape, plain numeric type code, byte order and bytes, and
    the bytes codec of protocol 2 becomes a latin-1 encoder. _arrays() then builds each array with
    numpy.frombuffer, only when its bytes are exactly what its shape and type declare, so a file cannot make NumPy
    rebuild an object array, a tampered dtype or a zero-stride view."""

    _RESOLVE = {("numpy.core.multiarray", "_reconstruct"): _PickledArray.reconstruct,
                ("numpy._core.multiarray", "_reconstruct"): _PickledArray.reconstruct,
                ("numpy.core.numeric", "_frombuffer"): _PickledArray.frombuffer,
                ("numpy._core.numeric", "_frombuffer"): _PickledArray.frombuffer,
                ("numpy", "ndarray"): _PickledArray._ndarray,
                ("numpy", "dtype"): _PickledDtype,
                ("_codecs", "encode"): _latin1}

    def find_class(self, module, name):
        try:
            return self._RESOLVE[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch") from None


def _arrays(value):
    """value with each _PickledArray, at the top level or in a dict's values, replaced by its checked array."""
    if isinstance(value, _PickledArray):
        return value.array()
    if isinstance(value, dict):
        return {k: _arrays(v) for k, v in value.items()}
    return value


def _cifar_labels(labels, path):
    if isinstance(labels, np.ndarray):
        if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
            raise ValueError(f"{path}: 'labels' must be 1-D integers, got {labels.dtype} {labels.shape}")
        return labels.astype(np.int64)
    if not isinstance(labels, list):
        raise ValueError(f"{path}: 'labels' must be a list of ints, got {type(labels).__name__}")
    for v in labels:
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{path}: 'labels' must be a list of ints, found {type(v).__name__}")
        if not -2 ** 63 <= v < 2 ** 63:
            raise ValueError(f"{path}: 'labels' holds {v}, far out of range")
    return np.array(labels, dtype=np.int64).reshape(-1)


def _load_cifar_batch(path):
    with open(path, "rb") as f:
        try:
            batch = _arrays(_CifarUnpickler(f, encoding="bytes").load())
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, ImportError, MemoryError, OverflowError, LookupError, RecursionError,
                UnicodeError) as e:
            raise ValueError(f"{path}: not a CIFAR-10 python batch: {e}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (a dict was expected, got {type(batch).__name__})")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    labels = check_labels(_cifar_labels(labels, path), len(data), 10, name=f"labels in {path}")
    x = (data.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255.0))
    return x, labels.astype(np.int64)


def load_cifar10(directory):
    """CIFAR-10 from its python batches (data_batch_1..5 and test_batch) in directory, or in its
    cifar-10-batches-py subdirectory. These files are pickles: they are parsed with a restricted unpickler that
    refuses every callable (NumPy's array reconstruction included: arrays are rebuilt from their checked bytes), and only ever from a path the caller gives.
    x is (N, 3, 32, 32) in [0, 1]."""
    if os.path.isdir(os.path.join(directory, "cifar-10-batches-py")):
        directory = os.path.join(directory, "cifar-10-batches-py")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory holding the CIFAR-10 python batches")
    train_paths = sorted((p for p in os.listdir(directory) if re.fullmatch(r"data_batch_\d+", p)),
                         key=lambda p: int(p.rsplit("_", 1)[1]))
    if not train_paths:
        raise FileNotFoundError(f"no data_batch_<n> files in {directory}")
    test_path = os.path.join(directory, "test_batch")
    if not os.path.isfile(test_path):
        raise FileNotFoundError(f"no test_batch file in {directory}")
    parts = [_load_cifar_batch(os.path.join(directory, p)) for p in train_paths]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return (x_train, y_train), _load_cifar_batch(test_path)


def load_dataset(name, path=None):
    """((x_train, y_train), (x_test, y_test)) for one of DATASETS; all but the embedded digits need path."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        if path is not None:
            raise ValueError("the digits are embedded; a data path is only for mnist, fashion-mnist and cifar10")
        return load_digits()
    if path is None:
        raise ValueError(f"{name} needs the path of a directory holding its files")
    return {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}[name](path)


def _check_sha256(sha256):
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return sha256.lower()


def _file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http and https (urllib's default also follows ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"{req.full_url} redirects to {newurl!r}; only http and https are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# Without a known size a download may bring at most this much (CIFAR-10's archive is 163 MiB).
DOWNLOAD_MAX_BYTES = 1 << 30


def download(url, path, sha256, timeout=60.0, size=None, max_bytes=None, deadline=3600.0):
    """Fetch url (http or https) to path unless path already holds a file with this SHA-256. The data go to a
    temporary file beside path, renamed over it only once the digest matches; a mismatch is a ValueError and leaves
    no file behind. Returns path.

    Bounds, each leaving no file behind: `timeout` seconds per network operation; `deadline` seconds for the whole
    download (TimeoutError), whatever the server's pace; at most `size` bytes when the size is known (a body of
    another size is a ValueError), else at most `max_bytes` (default DOWNLOAD_MAX_BYTES). Redirects are followed only to http and https."""
    sha256 = _check_sha256(sha256)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"url must be http or https, got {url!r}")
    for name, value in (("timeout", timeout), ("deadline", deadline)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if size is not None:
        size = _check_int_arg(size, "size", 0)
    max_bytes = _check_int_arg(DOWNLOAD_MAX_BYTES if max_bytes is None else max_bytes, "max_bytes", 1)
    limit = size if size is not None else max_bytes
    path = os.fspath(path)
    if os.path.isfile(path) and _file_sha256(path) == sha256:
        return path
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    ends = time.monotonic() + deadline
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    fd, tmp = temporary_beside(path, ".part")
    try:
        h = hashlib.sha256()
        received = 0
        with os.fdopen(fd, "wb") as out, opener.open(url, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise ValueError(f"{url} declares {int(declared):,} bytes, more than the "
                                 f"{'expected size' if size is not None else 'limit'} of {limit:,}")
            while True:
                if time.monotonic() > ends:
                    raise TimeoutError(f"{url}: the download took more than its deadline of {deadline:g} s "
                                       f"({received:,} bytes received); the file was discarded")
                # read1: whatever has arrived (one read from the socket), so that a server trickling bytes
                # cannot hold the loop past the deadline.
                chunk = response.read1(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
                if received > limit:
                    raise ValueError(f"{url} sent more than the {'expected size' if size is not None else 'limit'} "
                                     f"of {limit:,} bytes; the file was discarded")
                h.update(chunk)
                out.write(chunk)
        if size is not None and received != size:
            raise ValueError(f"{url} sent {received:,} bytes, {size:,} were expected; the file was discarded")
        digest = h.hexdigest()
        if digest != sha256:
            raise ValueError(f"SHA-256 mismatch for {url}: expected {sha256}, got {digest}; the file was discarded")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _check_int_arg(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
