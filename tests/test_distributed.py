"""Data-parallel training: bitwise identical weights for any rank count, every rank alike, a failing rank ending
the job, the CLI under mpiexec, resuming under MPI. The MPI tests start `mpiexec -n N` (oversubscribed on small
machines, one kernel thread per rank) on tests/distributed_worker.py and skip where mpi4py or mpiexec is missing;
the shard arithmetic itself is tested in-process without MPI."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import convengine
from convengine import distributed
from convengine import layers as L
from convengine.losses import CrossEntropyLoss, MSELoss
from convengine.optim import SGD
from convengine.trainer import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "distributed_worker.py")
sys.path.insert(0, HERE)
import distributed_worker as worker  # noqa: E402
import test_model_fuzz as model_fuzz  # noqa: E402

TIMEOUT = 120  # seconds for one mpiexec job: a hang fails the test instead of hanging CI


def _mpiexec():
    pytest.importorskip("mpi4py")
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    path = local if os.access(local, os.X_OK) else shutil.which("mpiexec")
    if path is None:
        pytest.skip("no mpiexec on PATH")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    return [path, "--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else [path]


def _launch(ranks, args, timeout=TIMEOUT, env=None):
    """Run `mpiexec -n ranks python args...` in its own process group; kill the whole group on timeout."""
    command = _mpiexec() + ["-n", str(ranks), sys.executable] + list(args)
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get(
        "PYTHONPATH", ""), **(env or {}))
    for name in distributed.LAUNCHER_VARIABLES:  # a test run itself started by mpiexec must not leak its rank
        environment.pop(name, None)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                            cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec -n {ranks} {' '.join(args)} hung for {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


def _arrays(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _assert_bitwise(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), f"{what}: {k} differs"


# -- the shard plan, in-process -----------------------------------------------------------------------------------

def test_shard_bounds_and_owners():
    assert distributed.shard_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert distributed.shard_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert distributed.shard_owners(4, 2) == [0, 2, 4]
    assert distributed.shard_owners(5, 3) == [0, 1, 3, 5]


def test_launcher_detection():
    assert not distributed.launched_by_mpiexec({})
    assert distributed.launched_by_mpiexec({"PMI_RANK": "0", "PMI_SIZE": "2"})
    assert distributed.launched_by_mpiexec({"OMPI_COMM_WORLD_SIZE": "4"})


def test_bad_arguments():
    model = worker.build(0)
    opt = SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="shards"):
        Trainer(model, CrossEntropyLoss(), opt, shards=0)
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        Trainer(model, CrossEntropyLoss(), opt, comm=object())


def _fit_in_process(shards, loss=None, epochs=2):
    x, y, x_val, y_val = worker.digits()
    model = worker.build(0)
    trainer = worker.trainer_for(model, None, shards)
    if loss is not None:
        trainer.loss = loss
    history = trainer.fit(x, y, epochs=epochs, batch_size=worker.BATCH, validation_data=(x_val, y_val), seed=1,
                          verbose=0)
    return trainer, history


def test_one_shard_gradient_is_the_batch_gradient():
    """Without dropout and BatchNorm, shards only split the sum: S shards give the classic trainer's gradient up
    to rounding, and S=1 gives it bitwise."""
    x, y, _, _ = worker.digits()
    grads = {}
    for shards in (None, 1, 3):
        convengine.manual_seed(5)
        model = convengine.Sequential([L.Conv2d(1, 3, 3), L.ReLU(), L.Flatten(), L.Linear(3 * 6 * 6, 10)])
        trainer = Trainer(model, MSELoss(), SGD(model.parameters(), lr=0.0), shards=shards)
        trainer.fit(x[:30], y[:30], epochs=1, batch_size=30, shuffle=False, verbose=0)
        grads[shards] = [p.grad.copy() for p in model.parameters()]
    for a, b in zip(grads[None], grads[1]):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(grads[None], grads[3]):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-7)
        assert np.abs(a).max() > 0


def test_shards_change_the_result_but_one_shard_count_gives_one_result():
    first, h1 = _fit_in_process(4)
    again, h2 = _fit_in_process(4)
    other, _ = _fit_in_process(2)
    p1 = [p.data for p in first.model.parameters()]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(p1, (p.data for p in again.model.parameters())))
    assert h1["loss"] == h2["loss"]
    # ghost BatchNorm and per-shard dropout streams: another shard count is another (valid) run
    assert any(a.tobytes() != b.tobytes() for a, b in zip(p1, (p.data for p in other.model.parameters())))
    # BatchNorm's running statistics were updated, once per shard
    assert not np.array_equal(first.model.buffers()["1.running_mean"], np.zeros(4, np.float32))


# -- under mpiexec ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mpi_runs(tmp_path_factory):
    """The worker's `train` under mpiexec -n 1, 2 and 4 (4 shards each, one Allgatherv per step) and -n 3 (4
    shards dealt 1, 1, 2; the reduce_scatter exchange), the per-step rank check on, a checkpoint after each
    epoch."""
    _mpiexec()
    runs = {}
    for ranks, exchange in ((1, "allgather"), (2, "allgather"), (4, "allgather"), (3, "reduce_scatter")):
        out = tmp_path_factory.mktemp(f"ranks{ranks}")
        code, stdout, stderr = _launch(ranks, [WORKER, "train", str(out), "--shards", "4", "--checkpoint",
                                               str(out / "ckpt-{epoch}.npz")],
                                       env={"CONVENGINE_CHECK_RANKS": "1", "CONVENGINE_EXCHANGE": exchange})
        assert code == 0, f"mpiexec -n {ranks} failed:\n{stdout}\n{stderr}"
        runs[ranks] = out
    return runs


def test_weights_bitwise_identical_without_mpi_and_for_1_2_3_4_ranks(mpi_runs, tmp_path):
    trainer, history = _fit_in_process(4)
    worker.write(str(tmp_path), trainer, history, 0)
    expected = _arrays(tmp_path / "rank0.npz")
    expected_history = json.loads((tmp_path / "history.json").read_text())
    for ranks, out in mpi_runs.items():
        _assert_bitwise(_arrays(out / "rank0.npz"), expected, f"{ranks} ranks vs no MPI")
        # validation split over the ranks and the training metrics gathered from the shards: exact
        assert json.loads((out / "history.json").read_text()) == expected_history


def test_every_rank_holds_identical_weights(mpi_runs):
    for ranks, out in mpi_runs.items():
        files = sorted(p.name for p in out.glob("rank*.npz"))
        assert files == [f"rank{r}.npz" for r in range(ranks)]
        first = _arrays(out / "rank0.npz")
        for r in range(1, ranks):
            _assert_bitwise(_arrays(out / f"rank{r}.npz"), first, f"rank {r} of {ranks}")


def test_only_rank_0_writes_checkpoints_and_resume_is_bitwise(mpi_runs, tmp_path):
    source = mpi_runs[4]
    assert (source / "ckpt-1.npz").exists() and (source / "ckpt-2.npz").exists()
    # resumed from the 4-rank job's epoch-1 checkpoint by a 2-rank job, one more epoch: the uninterrupted weights
    code, stdout, stderr = _launch(2, [WORKER, "resume", str(tmp_path), "--shards", "4", "--epochs", "1",
                                       "--checkpoint", str(source / "ckpt-1.npz")])
    assert code == 0, f"{stdout}\n{stderr}"
    for r in range(2):
        _assert_bitwise(_arrays(tmp_path / f"rank{r}.npz"), _arrays(source / "rank0.npz"), f"resumed rank {r}")


@settings(deadline=None, max_examples=300 if settings().max_examples > 60 else min(20, settings().max_examples),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=model_fuzz.nets(head=False), classes=st.integers(2, 5), adam=st.booleans(),
       shards=st.integers(2, 4), ranks=st.sampled_from([2, 3]), samples=st.integers(5, 14),
       batch=st.integers(2, 6))
def test_a_drawn_model_trains_to_the_same_bits_on_any_rank_count(net, classes, adam, shards, ranks, samples, batch,
                                                                tmp_path_factory):
    """Drawn models (test_model_fuzz's bodies: convs of every geometry, batch norms, pools; a linear head),
    optimizers, shard counts, batch sizes and sample counts that leave a short last batch: mpiexec -n 2 or 3 ends
    with the weights, buffers and history of the in-process run without MPI, bit for bit, on every rank (ranks
    above the shard count refused by name, as every rank must hold a shard)."""
    _mpiexec()
    specs, input_shape, dtype = net
    shape = input_shape
    for spec in specs:
        shape = model_fuzz.layer_of(spec, dtype).output_shape(shape)
    net = (specs + [("flatten",), ("linear", int(np.prod(shape)), classes)], input_shape, dtype)
    note(f"{net[0]}, input {input_shape}, {dtype}, {'Adam' if adam else 'SGD'}, {shards} shards, {ranks} ranks, "
         f"{samples} samples in batches of {batch}")
    folder = tmp_path_factory.mktemp("drawn")
    model_fuzz.build(net).save(folder / "model.npz")
    rng = np.random.default_rng(23)
    model_dtype = np.dtype(dtype)
    np.savez(folder / "data.npz", x=rng.standard_normal((samples,) + input_shape).astype(model_dtype),
             y=rng.integers(0, classes, samples), x_val=rng.standard_normal((5,) + input_shape).astype(model_dtype),
             y_val=rng.integers(0, classes, 5))
    args = ["--model", str(folder / "model.npz"), "--data", str(folder / "data.npz"), "--shards", str(shards),
            "--batch", str(batch), "--epochs", "2"] + (["--adam"] if adam else [])
    out = folder / "mpi"
    out.mkdir()
    try:
        trainer, history = worker.fit_saved(folder / "model.npz", folder / "data.npz", None, shards, 2, batch, adam)
    except ValueError as error:
        # a shard whose batch norm would see one value per channel: refused alike under MPI
        assert "batch statistics need more than one value" in str(error)
        code, stdout, stderr = _launch(ranks, [WORKER, "fit", str(out)] + args)
        assert code != 0 and ("batch statistics need more than one value" in stderr
                              or "shards must be >= the number of ranks" in stderr), stderr
        return
    (folder / "alone").mkdir()
    worker.write(str(folder / "alone"), trainer, history, 0)
    expected = _arrays(folder / "alone" / "rank0.npz")
    code, stdout, stderr = _launch(ranks, [WORKER, "fit", str(out)] + args)
    if ranks > shards:
        assert code != 0 and "shards must be >= the number of ranks" in stderr, stderr
        return
    assert code == 0, f"mpiexec -n {ranks} failed:\n{stdout}\n{stderr}"
    for r in range(ranks):
        _assert_bitwise(_arrays(out / f"rank{r}.npz"), expected, f"rank {r} of {ranks} vs no MPI")
    assert json.loads((out / "history.json").read_text()) == json.loads(
        (folder / "alone" / "history.json").read_text())


def test_a_failing_rank_ends_the_job(tmp_path):
    code, stdout, stderr = _launch(2, [WORKER, "fail", str(tmp_path), "--shards", "2"], timeout=60)
    assert code != 0
    assert "rank 1 of 2 failed, ending the job" in stderr
    assert "labels" in stderr and "99" in stderr  # that rank's own message


def test_cli_train_under_mpiexec_writes_one_model_and_one_progress_stream(tmp_path):
    _mpiexec()
    model_path = tmp_path / "model.npz"
    code, stdout, stderr = _launch(2, ["-m", "convengine", "train", "--epochs", "1", "--shards", "2",
                                       "--verbose", "2", "--save", str(model_path)])
    assert code == 0, f"{stdout}\n{stderr}"
    assert stdout.count("epoch 1/1:") == 1 and stdout.count("test accuracy:") == 1
    assert stdout.count("saved the model") == 1
    assert "2 ranks" in stdout and "2 shards" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]
    # the same run in one process, 2 shards, no MPI: the same model, bit for bit
    from convengine.__main__ import main
    single = tmp_path / "single.npz"
    threads = convengine.get_num_threads()
    try:
        assert main(["train", "--epochs", "1", "--shards", "2", "--verbose", "0", "--threads", "1",
                     "--save", str(single)]) == 0
    finally:
        convengine.set_num_threads(threads)
    a, b = convengine.load(str(model_path)), convengine.load(str(single))
    for p, q in zip(a.parameters(), b.parameters()):
        assert p.data.tobytes() == q.data.tobytes()


def test_info_reports_mpi_under_mpiexec():
    code, stdout, stderr = _launch(2, ["-m", "convengine", "info"])
    assert code == 0, stderr
    assert stdout.count("mpi: ") == 1 and "2 ranks" in stdout


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_batch(tmp_path):
    code, stdout, stderr = _launch(2, [WORKER, "interrupt", str(tmp_path), "--shards", "2"], timeout=60)
    assert code == 0, f"{stdout}\n{stderr}"
    states = [json.loads((tmp_path / f"interrupt{r}.json").read_text()) for r in range(2)]
    # rank 1's request travels with batch 3's gradients: both ranks finish batch 3 and stop there
    assert states[0] == states[1] == {"interrupted": True, "epochs": 0, "batches": 3}
    _assert_bitwise(_arrays(tmp_path / "rank1.npz"), _arrays(tmp_path / "rank0.npz"), "interrupted ranks")


def test_a_non_finite_shard_loss_undoes_the_batch_and_stops():
    """The global-batch loss is the same number on every rank, so a NaN in one shard stops every rank alike;
    in one process with shards the batch is undone as in the classic trainer."""
    x, y, _, _ = worker.digits()
    x = x.copy()
    x[worker.BATCH + 3] = np.nan  # second batch, first shard
    model = worker.build(0)
    trainer = worker.trainer_for(model, None, 2)
    trainer.fit(x[:worker.BATCH], y[:worker.BATCH], epochs=1, batch_size=worker.BATCH, shuffle=False, verbose=0)
    before = [p.data.copy() for p in model.parameters()] + [a.copy() for a in model.buffers().values()]
    with pytest.raises(FloatingPointError, match="epoch 2, batch 2 of 4"):
        trainer.fit(x, y, epochs=1, batch_size=worker.BATCH, shuffle=False, verbose=0)
    after = [p.data for p in model.parameters()] + list(model.buffers().values())
    # batch 1 of the second fit ran (same data as before), batch 2 was undone: the buffers are finite
    assert all(np.all(np.isfinite(a)) for a in after)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_info_without_mpi4py_under_a_launcher_says_so(monkeypatch):
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    info = distributed.mpi_info()
    assert "mpi4py is not installed" in info["error"]
