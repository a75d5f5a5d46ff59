"""The command line's error paths: output paths (--save, --plot, --json, --markdown) checked before any training or
measuring, files written to exactly the path given, bench's bad options, and a model whose activations cannot fit
in memory: one line naming the problem and a non-zero exit status, never a traceback."""
import os

import numpy as np
import pytest

import convengine
from convengine import data
from convengine.bench import report as bench_report
from convengine.__main__ import main
from convengine.layers import Conv2d, Flatten, GlobalAvgPool2d, Linear


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any data is loaded (train) or anything is measured (bench)."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the output paths were checked")
    monkeypatch.setattr(data, "load_dataset", refuse)
    monkeypatch.setattr(bench_report, "run", refuse)


@pytest.mark.parametrize("option", ["--save", "--plot"])
def test_train_output_in_a_missing_directory_fails_before_training(option, tmp_path, capsys, no_work):
    path = str(tmp_path / "missing" / "out.png")
    assert main(["train", option, path, "--verbose", "0"]) == 1
    err = capsys.readouterr().err
    assert f"{option} {path}" in err and "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("option", ["--save", "--plot"])
def test_train_output_that_is_a_directory_fails_before_training(option, tmp_path, capsys, no_work):
    (tmp_path / "curves").mkdir()
    path = str(tmp_path / "curves")
    assert main(["train", option, path, "--verbose", "0"]) == 1
    assert f"{option} {path}: is a directory" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["curves"]  # no curves.png beside it


def test_train_output_in_a_read_only_directory_fails_before_training(tmp_path, capsys, no_work):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["train", "--save", str(locked / "m.npz"), "--verbose", "0"]) == 1
    finally:
        locked.chmod(0o700)
    assert "not writable" in capsys.readouterr().err


def test_plot_is_written_to_exactly_the_path_given(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1", "--plot", "curves", "--verbose", "0"]) == 0
    assert "wrote the curves to curves" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["curves"]
    assert (tmp_path / "curves").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("option", ["--json", "--markdown", "--plot"])
def test_bench_output_in_a_missing_directory_fails_before_measuring(option, tmp_path, capsys, no_work):
    path = str(tmp_path / "nonexistent" / "x.out")
    with pytest.raises(SystemExit) as info:
        bench_report.main([option, path, "--quick"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{option} {path}" in err and "does not exist" in err


def test_bench_output_that_is_a_directory_fails_before_measuring(tmp_path, capsys, no_work):
    with pytest.raises(SystemExit):
        bench_report.main(["--markdown", str(tmp_path), "--quick"])
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("threads", ["5000", "0", "-3"])
def test_bench_threads_out_of_range_is_a_usage_error(threads, capsys, no_work):
    with pytest.raises(SystemExit) as info:
        bench_report.main(["--threads", threads, "--quick"])
    assert info.value.code == 2
    assert "--threads must be in [1, 1024]" in capsys.readouterr().err


def test_evaluate_a_model_whose_activations_cannot_fit_is_one_line(tmp_path, capsys):
    """A 1 KB model declaring padding=20000 on the 8x8 digits: refused before allocating (~1 TB at batch 256)."""
    convengine.manual_seed(0)
    model = convengine.Sequential([Conv2d(1, 64, 3, padding=20000), GlobalAvgPool2d(), Flatten(), Linear(64, 10)],
                                  input_shape=(1, 8, 8))
    model.metadata = {"dataset": "digits"}
    path = tmp_path / "wide.npz"
    model.save(path)
    assert main(["evaluate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "layer 0 (Conv2d)" in err and "GiB of memory" in err
    with pytest.raises(ValueError, match="GiB of memory"):
        model.predict(np.zeros((2, 1, 8, 8), np.float32))
