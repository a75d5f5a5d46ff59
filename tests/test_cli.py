"""The command line, end to end in subprocesses (train, evaluate, info, --help) and in-process for dispatch and
error paths."""
import os
import re
import subprocess
import sys

import pytest

import convengine
from convengine.__main__ import build_parser, main

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(convengine.__file__)))


def run_cli(*args, cwd, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "convengine", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def accuracy_in(text, label):
    m = re.search(label + r"[^\n]*?(\d+\.\d+)%", text)
    assert m, f"no {label!r} accuracy in:\n{text}"
    return float(m.group(1))


def test_train_save_then_evaluate(tmp_path):
    r = run_cli("train", "--epochs", "2", "--batch-size", "64", "--threads", "1", "--save", "model.npz",
                "--verbose", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "epoch 1/2: loss=" in r.stdout and "epoch 2/2: loss=" in r.stdout
    trained = accuracy_in(r.stdout, "test accuracy")
    assert trained > 50  # two epochs already learn most digits: a broken pipeline stays near 10%
    assert (tmp_path / "model.npz").exists()

    r = run_cli("evaluate", "model.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert accuracy_in(r.stdout, "accuracy") == trained
    matrix = [line.split() for line in r.stdout.splitlines() if re.fullmatch(r"\s*\d+(\s+\d+){10}\s*", line)]
    assert len(matrix) == 10 and sum(int(v) for row in matrix for v in row[1:]) == 359
    correct = sum(int(row[1 + i]) for i, row in enumerate(matrix))
    assert abs(100 * correct / 359 - trained) < 0.01


def test_default_training_reaches_97_percent(tmp_path):
    r = run_cli("train", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "epoch 20/20" in r.stdout
    assert accuracy_in(r.stdout, "test accuracy") >= 97.0


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    r = run_cli("train", "--epochs", "1", "--plot", "curves.png", "--verbose", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_info_and_help(tmp_path):
    r = run_cli("info", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^threads: [1-9]\d*$", r.stdout, re.M)
    assert "openmp" in r.stdout and "simd" in r.stdout
    r = run_cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    for command in ("train", "evaluate", "info", "bench"):
        assert command in r.stdout


@pytest.mark.parametrize("command", ["train", "evaluate", "export", "info"])
def test_every_option_is_in_the_help(command, capsys):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text
        if action.help and action.help != "==SUPPRESS==":
            first_words = " ".join(action.help.split()[:3])
            assert first_words in " ".join(text.split())


def test_bench_forwards_its_arguments(monkeypatch):
    seen = []
    import convengine.bench
    monkeypatch.setattr(convengine.bench, "main", lambda argv: seen.append(argv) or 0)
    assert main(["bench", "--quick", "--plot", "out.png"]) == 0
    assert main(["bench", "--help"]) == 0
    assert seen == [["--quick", "--plot", "out.png"], ["--help"]]


def test_errors_are_one_line_and_status_1(tmp_path, capsys):
    assert main(["train", "--dataset", "mnist", "--epochs", "1"]) == 1
    assert "needs --data PATH" in capsys.readouterr().err
    assert main(["train", "--dataset", "mnist", "--data", str(tmp_path), "--epochs", "1"]) == 1
    assert "train-images-idx3-ubyte" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    assert main(["evaluate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("convengine evaluate: error:") and "not a convengine model file" in err
    assert main(["evaluate", str(tmp_path / "missing.npz")]) == 1
    assert "No such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "--epochs", "-1"])
    assert info.value.code == 2


def test_plot_without_matplotlib_says_so_before_training(monkeypatch, capsys, tmp_path):
    # Every matplotlib module, not only the package: an earlier test may have imported matplotlib.pyplot.
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["train", "--plot", str(tmp_path / "c.png"), "--verbose", "0"]) == 1
    err = capsys.readouterr()
    assert "needs matplotlib" in err.err and "epoch" not in err.out


def test_evaluate_refuses_a_model_of_another_shape(tmp_path, capsys):
    from convengine.model import lenet
    model = lenet((1, 28, 28))
    model.save(tmp_path / "mnist.npz")
    assert main(["evaluate", str(tmp_path / "mnist.npz"), "--dataset", "digits"]) == 1
    assert "does not fit digits images" in capsys.readouterr().err
