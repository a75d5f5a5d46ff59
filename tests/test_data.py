"""Data: the embedded digits, IDX and CIFAR-10 loaders on small files written here, bad labels and bad files, and
the download helper against a real HTTP server on 127.0.0.1."""
import contextlib
import gzip
import hashlib
import http.server
import os
import pickle
import struct
import threading
import time

import numpy as np
import pytest

from convengine import _args, data


def test_digits_are_the_embedded_scikit_learn_digits_split_per_class():
    (x, y), (xt, yt) = data.load_digits()
    assert x.shape == (1438, 1, 8, 8) and xt.shape == (359, 1, 8, 8)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.bincount(yt).min() >= 35 and np.bincount(yt).max() <= 37
    (x2, y2), (xt2, yt2) = data.load_digits()
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(yt, yt2)
    # Disjoint: no image (with its label) is in both splits.
    train = {(xi.tobytes(), int(yi)) for xi, yi in zip(x, y)}
    assert sum((xi.tobytes(), int(yi)) in train for xi, yi in zip(xt, yt)) < 5  # the set has a few duplicates


def test_digits_match_scikit_learn():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    (x, y), (xt, yt) = data.load_digits()
    ours = np.concatenate([x, xt])[:, 0] * 16
    labels = np.concatenate([y, yt])
    order = np.lexsort((labels,) + tuple(ours.reshape(len(ours), -1).T))
    theirs_order = np.lexsort((d.target,) + tuple(d.images.reshape(len(d.images), -1).T))
    np.testing.assert_array_equal(ours[order], d.images[theirs_order])
    np.testing.assert_array_equal(labels[order], d.target[theirs_order])


def idx_bytes(a, code=0x08):
    a = np.asarray(a)
    header = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_mnist(directory, n_train=5, n_test=3, gz=False, names="lecun", labels=None, rng=None):
    rng = rng or np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    sets = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8) if labels is None else np.asarray(labels[prefix], np.uint8)
        sep = "-" if names == "lecun" else "."
        for kind, arr, code in (("images", images, 0x08), ("labels", y, 0x08)):
            name = f"{prefix}-{kind}{sep}idx{3 if kind == 'images' else 1}-ubyte"
            payload = idx_bytes(arr, code)
            if gz:
                with gzip.open(os.path.join(directory, name + ".gz"), "wb") as f:
                    f.write(payload)
            else:
                with open(os.path.join(directory, name), "wb") as f:
                    f.write(payload)
        sets[prefix] = (images, y)
    return sets


@pytest.mark.parametrize("gz, names", [(False, "lecun"), (True, "lecun"), (False, "kaggle")])
def test_mnist_idx_files_raw_and_gzipped(gz, names, tmp_path):
    sets = write_mnist(tmp_path, gz=gz, names=names)
    (x, y), (xt, yt) = data.load_mnist(str(tmp_path))
    assert x.shape == (5, 1, 28, 28) and xt.shape == (3, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_array_equal(np.round(x[:, 0] * 255).astype(np.uint8), sets["train"][0])
    np.testing.assert_array_equal(y, sets["train"][1])
    np.testing.assert_array_equal(yt, sets["t10k"][1])
    (fx, _), _ = data.load_fashion_mnist(str(tmp_path))
    np.testing.assert_array_equal(fx, x)


def test_idx_types_and_big_endian(tmp_path):
    a = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 1000
    p = tmp_path / "a.idx"
    p.write_bytes(idx_bytes(a, 0x0C))
    np.testing.assert_array_equal(data.load_idx(p), a)
    f = np.linspace(-1, 1, 5)
    p.write_bytes(idx_bytes(f, 0x0E))
    np.testing.assert_array_equal(data.load_idx(p), f)


@pytest.mark.parametrize("payload, match", [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\x00", "trailing"),
    (lambda b: b[:6], "truncated IDX header"),
    (lambda b: b"\x01\x02" + b[2:], "not an IDX file"),
    (lambda b: b[:2] + b"\x42" + b[3:], "type code"),
    (lambda b: b"", "not an IDX file"),
])
def test_bad_idx_files(payload, match, tmp_path):
    good = idx_bytes(np.zeros((2, 3, 3), np.uint8))
    p = tmp_path / "bad-idx3-ubyte"
    p.write_bytes(payload(good))
    with pytest.raises(ValueError, match=match):
        data.load_idx(p)


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 4), np.uint8)))[:-6])
    with pytest.raises(ValueError, match="gzip"):
        data.load_idx(p)


@pytest.mark.parametrize("labels, match", [
    ({"train": [0, 1, 2, 3, 10], "t10k": [0, 1, 2]}, "from 0 to 10"),
    ({"train": [0, 1, 2, 3], "t10k": [0, 1, 2]}, "4 entries but there are 5"),
])
def test_mnist_bad_labels(labels, match, tmp_path):
    write_mnist(tmp_path, labels=labels)
    with pytest.raises(ValueError, match=match):
        data.load_mnist(str(tmp_path))


def test_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.load_mnist(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        data.load_mnist(str(tmp_path / "nope"))


def write_cifar_batch(path, n, rng, labels=None, protocol=2):
    batch = {b"batch_label": b"training batch 1 of 5",
             b"labels": list(rng.integers(0, 10, n)) if labels is None else labels,
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    batch[b"labels"] = [int(v) for v in batch[b"labels"]]
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    return batch


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_python_batches(protocol, tmp_path, rng):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = [write_cifar_batch(root / f"data_batch_{i}", 4, rng, protocol=protocol) for i in (1, 2, 10)]
    test = write_cifar_batch(root / "test_batch", 3, rng, protocol=protocol)
    (x, y), (xt, yt) = data.load_cifar10(str(tmp_path))
    assert x.shape == (12, 3, 32, 32) and xt.shape == (3, 3, 32, 32)
    expected = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(np.round(x * 255).astype(np.uint8), expected)
    np.testing.assert_array_equal(y, sum((b[b"labels"] for b in batches), []))
    np.testing.assert_array_equal(yt, test[b"labels"])


class Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cifar10_refuses_pickles_that_run_code(tmp_path, rng):
    write_cifar_batch(tmp_path / "test_batch", 2, rng)
    marker = tmp_path / "code-ran"
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Boom(str(marker)), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"refusing to load \w+\.open"):
        data.load_cifar10(str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("labels, match", [([0, 1, 10], "from 0 to 10"), ([0, 1], "2 entries but there are 3"),
                                           ([0, -1, 2], "from -1 to 2")])
def test_cifar10_bad_labels(labels, match, tmp_path, rng):
    write_cifar_batch(tmp_path / "data_batch_1", 3, rng, labels=labels)
    write_cifar_batch(tmp_path / "test_batch", 2, rng)
    with pytest.raises(ValueError, match=match):
        data.load_cifar10(str(tmp_path))


def test_cifar10_bad_files(tmp_path, rng):
    write_cifar_batch(tmp_path / "test_batch", 2, rng)
    (tmp_path / "data_batch_1").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        data.load_cifar10(str(tmp_path))
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        data.load_cifar10(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        data.load_cifar10(str(tmp_path / "missing"))


def test_check_labels():
    np.testing.assert_array_equal(_args.check_labels(np.array([0, 2, 1], np.uint8), 3, 3), [0, 2, 1])
    with pytest.raises(TypeError, match="integer"):
        _args.check_labels(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        _args.check_labels(np.array([0, 2]), 2, 2)


def test_load_dataset_arguments(tmp_path):
    assert data.load_dataset("digits")[0][0].shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="needs the path"):
        data.load_dataset("mnist")
    with pytest.raises(ValueError, match="embedded"):
        data.load_dataset("digits", str(tmp_path))


@contextlib.contextmanager
def serve(directory):
    """An HTTP server on 127.0.0.1 (a free port) serving directory from a thread; yields (base url, request log)."""
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_verifies_sha256(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    payload = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    (served / "file.bin").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    out = tmp_path / "out" / "file.bin"
    with serve(served) as (url, requests):
        assert data.download(f"{url}/file.bin", out, digest.upper()) == str(out)
        assert out.read_bytes() == payload
        data.download(f"{url}/file.bin", out, digest)
        assert len(requests) == 1  # a file with the right digest is not fetched again

        wrong = hashlib.sha256(b"other").hexdigest()
        other = tmp_path / "out" / "other.bin"
        with pytest.raises(ValueError, match="SHA-256 mismatch"):
            data.download(f"{url}/file.bin", other, wrong)
        assert sorted(os.listdir(tmp_path / "out")) == ["file.bin"]  # nothing left behind

        with pytest.raises(OSError):
            data.download(f"{url}/missing.bin", other, digest)
        assert sorted(os.listdir(tmp_path / "out")) == ["file.bin"]


@pytest.mark.parametrize("url, sha, match", [
    ("file:///etc/passwd", "0" * 64, "http or https"),
    ("ftp://127.0.0.1/x", "0" * 64, "http or https"),
    ("http://127.0.0.1/x", "abc", "64 hexadecimal"),
    ("http://127.0.0.1/x", "g" * 64, "64 hexadecimal"),
])
def test_download_bad_arguments(url, sha, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        data.download(url, tmp_path / "x", sha)


def test_download_to_the_longest_legal_file_name(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    payload = os.urandom(1000)
    (served / "f.bin").write_bytes(payload)
    out = tmp_path / "out" / ("d" * 250)
    with serve(served) as (url, _):
        data.download(f"{url}/f.bin", out, hashlib.sha256(payload).hexdigest())
    assert out.read_bytes() == payload and os.listdir(tmp_path / "out") == [out.name]


@contextlib.contextmanager
def hostile_server(behaviour):
    """An HTTP server on 127.0.0.1 whose GET does behaviour(handler); yields its base url."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            try:
                behaviour(self)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def endless(handler, megabytes=64):
    """A body without Content-Length that goes on (64 MiB here, 'endless' for a client with a small limit)."""
    handler.send_response(200)
    handler.end_headers()
    chunk = bytes(1 << 20)
    for _ in range(megabytes):
        handler.wfile.write(chunk)


def trickle(handler, seconds=8.0):
    """One byte every 0.1 s: never idle long enough to trip a per-read timeout."""
    handler.send_response(200)
    handler.end_headers()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        handler.wfile.write(b"x")
        handler.wfile.flush()
        time.sleep(0.1)


def test_download_stops_an_endless_body_at_the_byte_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DOWNLOAD_MAX_BYTES", 2 << 20)
    with hostile_server(endless) as url:
        with pytest.raises(ValueError, match="more than the limit of 2,097,152 bytes"):
            data.download(f"{url}/x", tmp_path / "x", "0" * 64)
        with pytest.raises(ValueError, match="more than the expected size of 1,000 bytes"):
            data.download(f"{url}/x", tmp_path / "x", "0" * 64, size=1000)
    assert os.listdir(tmp_path) == []


def test_download_refuses_a_declared_length_over_the_limit_before_reading(tmp_path):
    def declared(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(10 ** 12))
        handler.end_headers()
        handler.wfile.write(b"x" * 100)
    with hostile_server(declared) as url:
        with pytest.raises(ValueError, match="declares 1,000,000,000,000 bytes"):
            data.download(f"{url}/x", tmp_path / "x", "0" * 64)
    assert os.listdir(tmp_path) == []


def test_download_has_an_overall_deadline_against_a_trickling_server(tmp_path):
    with hostile_server(trickle) as url:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="deadline of 1 s"):
            data.download(f"{url}/x", tmp_path / "x", "0" * 64, timeout=2, deadline=1)
        assert time.monotonic() - start < 4
    assert os.listdir(tmp_path) == []


def test_download_follows_redirects_only_to_http(tmp_path):
    payload = b"payload"

    def redirect(handler):
        if handler.path == "/ftp":
            handler.send_response(302)
            handler.send_header("Location", "ftp://127.0.0.1:9/secret")
            handler.end_headers()
        elif handler.path == "/http":
            handler.send_response(302)
            handler.send_header("Location", "/data")
            handler.end_headers()
        else:
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)

    with hostile_server(redirect) as url:
        with pytest.raises(ValueError, match="redirects to 'ftp://127.0.0.1:9/secret'; only http and https"):
            data.download(f"{url}/ftp", tmp_path / "x", "0" * 64)
        out = data.download(f"{url}/http", tmp_path / "y", hashlib.sha256(payload).hexdigest())
    assert open(out, "rb").read() == payload and sorted(os.listdir(tmp_path)) == ["y"]
