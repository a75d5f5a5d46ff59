"""Hostile model files: convengine.load gives a clear ValueError naming the file, never runs code, never crashes,
never lets a small file claim a huge allocation; what it does load is exactly what was saved.

Covered here beyond test_model.py's catalogue of bad descriptions: damage at the zip level (compression method,
encryption flag, format version, members that are not .npy), declared sizes far larger than the file (array
headers, layer configurations, a compressed member that inflates to hundreds of megabytes), pickles in every place
a loader might unpickle, hostile hyper-parameters that load fine and must not crash predict, and a fuzzer that flips
bytes of a saved model and truncates it (hypothesis: the examples of the loaded profile, CONVENGINE_FUZZ_LONG=1 for
10,000).
"""
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import convengine
from convengine.layers import AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU

LONG = os.environ.get("CONVENGINE_FUZZ_LONG") == "1" or os.environ.get("HYPOTHESIS_PROFILE") == "long"
fuzz = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                **({"max_examples": int(os.environ.get("CONVENGINE_FUZZ_EXAMPLES", "10000"))} if LONG else {}))

X = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)


def small_model():
    convengine.manual_seed(0)
    model = convengine.Sequential([Conv2d(1, 4, 3, padding=1), BatchNorm2d(4), ReLU(), MaxPool2d(2),
                                   AvgPool2d(2, count_include_pad=False), Flatten(), Dropout(0.2), Linear(16, 3)],
                                  input_shape=(1, 8, 8))
    # Running statistics away from their initial values, so that the buffers matter.
    model.forward(X, training=True)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path, bytes, the model's parameters and buffers, its predictions on X) of one saved model."""
    path = tmp_path_factory.mktemp("model") / "good.npz"
    model = small_model()
    model.save(path)
    state = {p.name: p.data.copy() for p in model.parameters()}
    state.update({f"buffer {k}": v.copy() for k, v in model.buffers().items()})
    return path, path.read_bytes(), state, model.predict(X)


def members(data):
    """{name: raw bytes} of a zip file's members."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n: z.read(n) for n in z.namelist()}


def build_zip(entries, compression=zipfile.ZIP_STORED):
    bio = io.BytesIO()
    with zipfile.ZipFile(bio, "w", compression=compression) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return bio.getvalue()


def npy(a, **kw):
    bio = io.BytesIO()
    np.save(bio, a, **kw)
    return bio.getvalue()


def npy_header(shape, descr="<f4"):
    """A version 1.0 .npy header declaring `shape` (the data that should follow is up to the caller)."""
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode("latin1")
    text += b" " * (63 - (len(text) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def description_member(desc):
    return npy(np.frombuffer(json.dumps(desc).encode(), np.uint8))


def description(data):
    return json.loads(np.load(io.BytesIO(members(data)["__convengine__.npy"])).tobytes())


def assert_refused(path):
    """load(path) raises ValueError naming the file."""
    with pytest.raises(ValueError) as info:
        convengine.load(path)
    assert str(path) in str(info.value)
    return info.value


def assert_loads_exactly(path, saved):
    """load(path) returns the saved model: same parameters and buffers, same predictions."""
    _, _, state, prediction = saved
    model = convengine.load(path)
    got = {p.name: p.data for p in model.parameters()}
    got.update({f"buffer {k}": v for k, v in model.buffers().items()})
    assert got.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(got[k], state[k], err_msg=k)
    np.testing.assert_array_equal(model.predict(X), prediction)


def test_the_saved_model_loads(saved, tmp_path):
    assert_loads_exactly(saved[0], saved)


# ---------------------------------------------------------------------------------------------------------------
# Damage at the zip level
# ---------------------------------------------------------------------------------------------------------------

def central_directory_entries(data):
    """Offsets of the central directory file headers (signature PK\\1\\2)."""
    offsets, i = [], data.find(b"PK\x01\x02")
    while i >= 0:
        offsets.append(i)
        i = data.find(b"PK\x01\x02", i + 4)
    return offsets


def patch_central(data, field_offset, fmt, value, entry=0):
    """data with one field of a central directory entry overwritten (offsets per APPNOTE 4.3.12)."""
    b = bytearray(data)
    at = central_directory_entries(data)[entry] + field_offset
    b[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(b)


ZIP_DAMAGE = {
    # compression methods zipfile does not implement: NotImplementedError inside the zip reader
    "method-implode": lambda d: patch_central(d, 10, "<H", 6),
    "method-99-aes": lambda d: patch_central(d, 10, "<H", 99),
    "method-deflate-on-stored-data": lambda d: patch_central(d, 10, "<H", 8),
    "method-bzip2-on-stored-data": lambda d: patch_central(d, 10, "<H", 12),
    "method-lzma-on-stored-data": lambda d: patch_central(d, 10, "<H", 14),
    "encrypted-flag": lambda d: patch_central(d, 8, "<H", 1),
    "version-needed-9.9": lambda d: patch_central(d, 6, "<H", 99),
    "version-needed-on-a-later-member": lambda d: patch_central(d, 6, "<H", 99, entry=-1),
    "huge-uncompressed-size": lambda d: patch_central(d, 24, "<I", 0xFFFFFFF0),
    "huge-local-header-offset": lambda d: patch_central(d, 42, "<I", 0xFFFFFFF0),
    "no-central-directory": lambda d: d[:central_directory_entries(d)[0]],
    "only-the-central-directory": lambda d: d[central_directory_entries(d)[0]:],
    "zip-of-nothing": lambda d: build_zip({}),
}


@pytest.mark.parametrize("damage", list(ZIP_DAMAGE))
def test_zip_level_damage_is_refused_or_harmless(saved, tmp_path, damage):
    """A ValueError, or (damage to a field the reader does not use) exactly the saved model."""
    path = tmp_path / "bad.npz"
    path.write_bytes(ZIP_DAMAGE[damage](saved[1]))
    try:
        convengine.load(path)
    except ValueError as e:
        assert str(path) in str(e)
    else:
        assert_loads_exactly(path, saved)


NOT_NPY_MEMBERS = {
    # NpzFile hands back the raw bytes of a member that is not an .npy: the loader must not take them for an array
    "description-as-raw-json": ("__convengine__.npy", lambda d: json.dumps(description(d)).encode()),
    "parameter-as-raw-bytes": ("param/0.weight.npy", lambda d: b"\0" * 144),
    "extra-member-without-npy-suffix": ("evil", lambda d: b"junk"),
    "parameter-as-a-pickle": ("param/0.bias.npy", lambda d: pickle.dumps(np.zeros(4, np.float32))),
}


@pytest.mark.parametrize("case", list(NOT_NPY_MEMBERS))
def test_members_that_are_not_arrays_are_a_value_error(saved, tmp_path, case):
    name, make = NOT_NPY_MEMBERS[case]
    entries = members(saved[1])
    entries[name] = make(saved[1])
    path = tmp_path / "bad.npz"
    path.write_bytes(build_zip(entries))
    assert_refused(path)


# ---------------------------------------------------------------------------------------------------------------
# Code execution: pickles wherever a loader might unpickle
# ---------------------------------------------------------------------------------------------------------------

class Marker:
    """Unpickling this creates the marker file: if the file appears, loading ran code from the model file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


PICKLE_PLACES = {
    "whole-file": lambda d, m: pickle.dumps(Marker(m)),
    "whole-file-protocol-0": lambda d, m: pickle.dumps(Marker(m), protocol=0),
    "object-array-parameter": lambda d, m: build_zip(
        dict(members(d), **{"param/0.weight.npy": npy(np.array([Marker(m)], object), allow_pickle=True)})),
    "object-array-description": lambda d, m: build_zip(
        dict(members(d), **{"__convengine__.npy": npy(np.array([Marker(m)], object), allow_pickle=True)})),
    "object-array-extra-member": lambda d, m: build_zip(
        dict(members(d), **{"state/optimizer/evil.npy": npy(np.array([Marker(m)], object), allow_pickle=True)})),
    "pickle-as-member": lambda d, m: build_zip(dict(members(d), **{"param/0.weight.npy": pickle.dumps(Marker(m))})),
    "npy-whose-header-says-object": lambda d, m: build_zip(
        dict(members(d), **{"param/0.bias.npy": npy_header((1,), "|O") + pickle.dumps([Marker(m)])})),
}


@pytest.mark.parametrize("place", list(PICKLE_PLACES))
def test_pickles_never_run(saved, tmp_path, place):
    marker = tmp_path / "code-ran"
    path = tmp_path / "bad.npz"
    path.write_bytes(PICKLE_PLACES[place](saved[1], marker))
    try:
        assert_refused(path)
    finally:
        assert not marker.exists(), "loading the file ran code from it"


def test_layer_types_are_never_looked_up_by_name(saved, tmp_path):
    """Type names that would reach code if a loader resolved them (importlib, getattr on modules, builtins)."""
    for name in ["os.system", "builtins.eval", "__import__", "__class__", "Layer", "Sequential", "convengine.load",
                 "numpy.load", "subprocess.Popen", "object"]:
        desc = description(saved[1])
        desc["layers"][0]["type"] = name
        path = tmp_path / "bad.npz"
        path.write_bytes(build_zip(dict(members(saved[1]), **{"__convengine__.npy": description_member(desc)})))
        error = assert_refused(path)
        assert "unknown type" in str(error)


# ---------------------------------------------------------------------------------------------------------------
# Declared sizes far beyond the file
# ---------------------------------------------------------------------------------------------------------------

def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("shape,descr", [((2 ** 31,), "<f4"), ((2 ** 40,), "<f4"), ((2 ** 45, 2 ** 10), "<f8"),
                                         ((2 ** 62,), "<f8"), ((16, 2 ** 60), "<f4")],
                         ids=["2^31", "2^40", "2^55", "2^62", "past-2^63"])
def test_array_headers_declaring_huge_shapes(saved, tmp_path, shape, descr):
    """A parameter whose .npy header claims a huge array, followed by a few bytes: a ValueError (the header does
    not fit the architecture, or the data is missing), not a MemoryError, and no memory taken."""
    path = tmp_path / "bad.npz"
    path.write_bytes(build_zip(dict(members(saved[1]), **{"param/7.weight.npy": npy_header(shape, descr) + bytes(64)})))
    before = rss_bytes()
    assert_refused(path)
    assert rss_bytes() - before < 64 << 20


def run_limited(code, extra_bytes, timeout=120):
    """Run `code` in a fresh interpreter importing this convengine, whose address space is capped at what it uses
    after the imports plus extra_bytes; (exit code, output)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(convengine.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    prelude = textwrap.dedent(f"""
        import resource, sys
        import numpy as np
        import convengine
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + {extra_bytes}, used + {extra_bytes}))
    """)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def load_in_limited_process(path, extra_bytes=256 << 20):
    """convengine.load(path) with little memory to spare: 'ValueError', or what else happened."""
    rc, out = run_limited(f"""
        try:
            convengine.load({str(path)!r})
        except ValueError as e:
            print("OUTCOME ValueError", e)
        except BaseException as e:
            print("OUTCOME", type(e).__name__, e)
        else:
            print("OUTCOME loaded")
    """, extra_bytes)
    lines = [line for line in out.splitlines() if line.startswith("OUTCOME")]
    assert rc == 0 and lines, f"exit code {rc}:\n{out[-3000:]}"
    return lines[-1][len("OUTCOME "):]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_the_limited_process_loads_a_good_model(saved):
    """The harness of the tests below: a process with 256 MB to spare loads an ordinary model."""
    assert load_in_limited_process(saved[0]) == "loaded"


LAYER_BOMBS = {
    "linear-1e12-features": {"type": "Linear", "config": {"in_features": 10 ** 12, "out_features": 3}},
    "linear-1e5-by-1e4": {"type": "Linear", "config": {"in_features": 10 ** 5, "out_features": 10 ** 4}},
    "conv-1e4-channels-9x9": {"type": "Conv2d", "config": {"in_channels": 10 ** 4, "out_channels": 10 ** 4,
                                                            "kernel_size": 9}},
    "batchnorm-1e10-features": {"type": "BatchNorm2d", "config": {"num_features": 10 ** 10}},
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
@pytest.mark.parametrize("bomb", list(LAYER_BOMBS))
def test_layer_configs_declaring_huge_layers(saved, tmp_path, bomb):
    """A ~3 KB file describing a layer of gigabytes whose parameters the file does not hold: refused with a
    ValueError before the layer's initial weights are drawn (the file's arrays do not fit the declared shapes),
    within a few hundred MB of memory."""
    desc = description(saved[1])
    desc["layers"][-1] = LAYER_BOMBS[bomb]
    path = tmp_path / "bad.npz"
    path.write_bytes(build_zip(dict(members(saved[1]), **{"__convengine__.npy": description_member(desc)})))
    assert path.stat().st_size < 16 << 10
    outcome = load_in_limited_process(path)
    assert outcome.startswith("ValueError") and str(path) in outcome, outcome


def deflate_bomb(entries, name, header, size):
    """The zip of `entries` plus a deflated member `name`: `header` then `size` zero bytes (a few MB on disk)."""
    bio = io.BytesIO()
    with zipfile.ZipFile(bio, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for k, v in entries.items():
            z.writestr(k, v)
        with z.open(name, "w", force_zip64=True) as f:
            f.write(header)
            chunk = bytes(1 << 20)
            for _ in range(size // len(chunk)):
                f.write(chunk)
    return bio.getvalue()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
@pytest.mark.parametrize("name", ["junk.npy", "state/optimizer/junk.npy", "param/0.weight.npy"])
def test_members_inflating_to_hundreds_of_megabytes(saved, tmp_path, name):
    """A member of 512 MB that compresses to a few MB: an unexpected name, an unused checkpoint slot, or a
    parameter of the wrong shape. The loader must see from the names and the .npy headers that the file does not
    fit, without inflating it (here with 256 MB to spare)."""
    size = 512 << 20
    path = tmp_path / "bomb.npz"
    entries = members(saved[1])
    entries.pop(name, None)
    path.write_bytes(deflate_bomb(entries, name, npy_header((size,), "|u1"), size))
    assert path.stat().st_size < 8 << 20
    outcome = load_in_limited_process(path)
    if name.startswith("state/"):
        # A checkpoint's optimizer slots are not the model's: load may skip them, if it reads nothing of them.
        assert outcome == "loaded" or outcome.startswith("ValueError"), outcome
    else:
        assert outcome.startswith("ValueError") and str(path) in outcome, outcome


# ---------------------------------------------------------------------------------------------------------------
# Hostile hyper-parameters: a file may describe layers no constructor call would build; load refuses them, or
# predict refuses or computes, never crashes
# ---------------------------------------------------------------------------------------------------------------

HOSTILE_CONFIGS = {
    "dilation-2^61": {"dilation": [2 ** 61, 2 ** 61], "padding": [2 ** 61, 2 ** 61]},
    "padding-2^62": {"padding": [2 ** 62, 0]},
    "stride-2^63": {"stride": [2 ** 63, 1], "kernel_size": [1, 1]},
    "dilation-2^31": {"dilation": [2 ** 31, 1], "padding": [2 ** 31, 1]},
    "negative-padding": {"padding": [-5, 0]},
    "zero-stride": {"stride": [0, 1]},
    "padding-string": {"padding": "full"},
}


@pytest.mark.parametrize("config", list(HOSTILE_CONFIGS))
def test_hostile_hyper_parameters_never_crash(tmp_path, config):
    convengine.manual_seed(0)
    path = tmp_path / "hostile.npz"
    convengine.Sequential([Conv2d(1, 1, 3), Flatten()], input_shape=(1, 4, 4)).save(path)
    data = path.read_bytes()
    desc = description(data)
    desc["layers"][0]["config"].update(HOSTILE_CONFIGS[config])
    if "kernel_size" in HOSTILE_CONFIGS[config]:
        entries = members(data)
        entries["param/0.weight.npy"] = npy(np.ones((1, 1, 1, 1), np.float32))
        data = build_zip(entries)
    path.write_bytes(build_zip(dict(members(data), **{"__convengine__.npy": description_member(desc)})))
    rc, out = run_limited(f"""
        try:
            model = convengine.load({str(path)!r})
        except ValueError as e:
            print("OUTCOME refused at load", e)
            raise SystemExit(0)
        try:
            y = model.predict(np.ones((2, 1, 4, 4), np.float32))
            print("OUTCOME computed", y.shape)
        except ValueError as e:
            print("OUTCOME ValueError", e)
        except BaseException as e:
            print("OUTCOME", type(e).__name__, e)
    """, 1 << 30)
    assert rc == 0, f"loading or predicting crashed the process (exit code {rc}):\n{out[-3000:]}"
    outcome = [line for line in out.splitlines() if line.startswith("OUTCOME")][-1]
    assert outcome.startswith(("OUTCOME computed", "OUTCOME ValueError", "OUTCOME refused at load")), outcome


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing a saved model: byte flips and truncation
# ---------------------------------------------------------------------------------------------------------------

@st.composite
def damages(draw, size):
    """A list of (offset, xor mask) byte flips, a fifth of them in the last 512 bytes (the central directory),
    and maybe a truncation length."""
    n = draw(st.integers(1, 8))
    tail = max(0, size - 512)
    flips = [(draw(st.one_of(st.integers(0, size - 1), st.integers(tail, size - 1))), draw(st.integers(1, 255)))
             for _ in range(n)]
    cut = draw(st.one_of(st.none(), st.integers(0, size - 1)))
    return flips, cut


def damaged(data, flips, cut):
    b = bytearray(data)
    for offset, mask in flips:
        b[offset] ^= mask
    return bytes(b if cut is None else b[:cut])


@fuzz
@given(data=st.data())
@example(data=None)
def test_fuzzed_model_files_load_exactly_or_are_refused(saved, tmp_path, data):
    """Whatever the damage, load refuses it with a ValueError or returns the very model that was saved (damage in
    parts of the zip that hold no data): never another exception, a crash, or different weights."""
    raw = saved[1]
    if data is None:  # the explicit case: flip the compression method of the first central directory entry
        flips, cut = [(central_directory_entries(raw)[0] + 10, 0x07)], None
    else:
        flips, cut = data.draw(damages(len(raw)), "damage")
    path = tmp_path / "fuzzed.npz"
    path.write_bytes(damaged(raw, flips, cut))
    try:
        model = convengine.load(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    assert_loads_exactly(path, saved)
    assert isinstance(model, convengine.Sequential)


def test_every_truncation_is_refused(saved, tmp_path):
    raw = saved[1]
    path = tmp_path / "cut.npz"
    lengths = sorted(set(range(0, len(raw), max(1, len(raw) // 300))) | {len(raw) - 1, len(raw) - 22, 30})
    for n in lengths:
        path.write_bytes(raw[:n])
        with pytest.raises(ValueError):
            convengine.load(path)


# ---------------------------------------------------------------------------------------------------------------
# Compressed members and layer counts: the file's size bounds what loading it allocates
# ---------------------------------------------------------------------------------------------------------------

def test_a_compressed_model_file_is_refused(saved, tmp_path):
    """The same members, honestly describing the model, but DEFLATE-compressed (numpy.savez_compressed): a small
    such file can declare and inflate to hundreds of megabytes, so the format has only stored members."""
    path = tmp_path / "compressed.npz"
    path.write_bytes(build_zip(members(saved[1]), compression=zipfile.ZIP_DEFLATED))
    error = assert_refused(path)
    assert "compressed" in str(error)


def test_an_honest_compressed_big_layer_is_refused_within_little_memory(tmp_path):
    """Linear(2048, 2048) of zeros compresses to a few KB; loading it must not inflate the 16 MB."""
    import tracemalloc
    from convengine.model import Sequential
    model = Sequential([Linear(2048, 2048)], input_shape=(2048,))
    for p in model.parameters():
        p.data[...] = 0
    plain = tmp_path / "plain.npz"
    model.save(plain)
    path = tmp_path / "small.npz"
    path.write_bytes(build_zip(members(plain.read_bytes()), compression=zipfile.ZIP_DEFLATED))
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    try:
        assert_refused(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak >> 20} MiB"


def test_a_description_of_too_many_layers_is_refused(saved, tmp_path):
    from convengine.model import MAX_LAYERS
    desc = description(saved[1])
    desc["layers"] = [{"type": "ReLU", "config": {}}] * (MAX_LAYERS + 1)
    desc["input_shape"] = None
    entries = {k: v for k, v in members(saved[1]).items() if not k.startswith(("param/", "buffer/"))}
    entries["__convengine__.npy"] = description_member(desc)
    path = tmp_path / "deep.npz"
    path.write_bytes(build_zip(entries))
    error = assert_refused(path)
    assert "layers" in str(error) and f"{MAX_LAYERS:,}" in str(error)


def test_saving_more_layers_than_a_file_may_hold_is_refused(tmp_path):
    from convengine.model import MAX_LAYERS, Sequential
    model = Sequential([ReLU() for _ in range(MAX_LAYERS + 1)])
    with pytest.raises(ValueError, match="at most"):
        model.save(tmp_path / "deep.npz")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("random_state", [
    {"bit_generator": "PCG64", "state": {"state": 2 ** 200, "inc": 1}, "has_uint32": 0, "uinteger": 0},
    {"bit_generator": "PCG64", "state": {"state": -1, "inc": 1}, "has_uint32": 0, "uinteger": 0},
    {"bit_generator": "PCG64", "state": {"state": 1, "inc": 1}, "has_uint32": 2 ** 70, "uinteger": 0},
], ids=["state-2^200", "state-negative", "has_uint32-2^70"])
def test_a_checkpoint_with_crafted_generator_state_is_a_value_error(random_state, tmp_path):
    from convengine.losses import CrossEntropyLoss
    from convengine.optim import SGD
    model = small_model()
    trainer = convengine.Trainer(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1))
    path = tmp_path / "ckpt.npz"
    trainer.save_checkpoint(path)
    entries = members(path.read_bytes())
    desc = description(path.read_bytes())
    desc["training"]["random_state"] = random_state
    entries["__convengine__.npy"] = description_member(desc)
    path.write_bytes(build_zip(entries))
    before = convengine._random.get_state()
    with pytest.raises(ValueError, match="random state") as info:
        trainer.load_checkpoint(path)
    assert str(path) in str(info.value)
    assert convengine._random.get_state() == before


def test_a_model_saves_to_the_longest_legal_file_name(saved, tmp_path):
    """A 250-byte name is legal; the temporary file written beside it must not push past the 255-byte limit."""
    path = tmp_path / ("m" * 246 + ".npz")
    small_model().save(path)
    assert_loads_exactly(path, saved)
    assert os.listdir(tmp_path) == [path.name]
