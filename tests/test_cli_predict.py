"""`convengine predict MODEL INPUT.npy`, and the command line's wording: defaults said once in --help, "1 epoch",
--verbose 0 printing the result alone, the held-out split called "test" throughout, evaluate naming where the data
set came from."""
import json
import re

import numpy as np
import pytest

import convengine
from convengine import metrics
from convengine.__main__ import build_parser, main
from convengine.data import load_digits
from convengine.model import lenet


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A digits model trained for a moment, its file, and three test images with their labels."""
    from convengine import losses, optim
    from convengine.trainer import Trainer
    convengine.manual_seed(0)
    (x, y), (xt, yt) = load_digits()
    model = lenet((1, 8, 8), 10)
    Trainer(model, losses.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.05, momentum=0.9)).fit(
        x[:512], y[:512], epochs=2, batch_size=32, seed=0, verbose=0)
    model.metadata = {"dataset": "digits", "classes": [f"digit{i}" for i in range(10)]}
    folder = tmp_path_factory.mktemp("predict")
    path = folder / "digits.npz"
    model.save(path)
    return model, str(path), folder, xt[:3], yt[:3]


def test_predict_prints_each_images_class_and_probability(saved, capsys):
    model, path, folder, x, _ = saved
    np.save(folder / "three.npy", x)
    assert main(["predict", path, str(folder / "three.npy"), "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "3 images of shape (1, 8, 8)" in lines[0] and len(lines) == 4
    p = model.predict_proba(x)
    for i, line in enumerate(lines[1:]):
        first, second = np.argsort(-p[i], kind="stable")[:2]
        m = re.fullmatch(rf"{i}: +digit(\d) (\d\.\d{{4}}), +digit(\d) (\d\.\d{{4}})", line)
        assert m, line
        assert (int(m.group(1)), int(m.group(3))) == (first, second)
        assert float(m.group(2)) == pytest.approx(p[i, first], abs=1e-4)
        assert float(m.group(4)) == pytest.approx(p[i, second], abs=1e-4)


def test_predict_takes_one_image_channels_last_images_and_prints_json(saved, capsys):
    model, path, folder, x, _ = saved
    p = model.predict_proba(x)
    np.save(folder / "one.npy", x[1, 0])                                 # (H, W): one single-channel image
    np.save(folder / "last.npy", x.transpose(0, 2, 3, 1))                # (N, H, W, C)
    assert main(["predict", path, str(folder / "one.npy"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["class"] == int(p[1].argmax())
    assert rows[0]["name"] == f"digit{p[1].argmax()}" and rows[0]["probability"] == pytest.approx(p[1].max())
    assert main(["predict", path, str(folder / "last.npy")]) == 1
    assert "add --channels-last" in capsys.readouterr().err
    assert main(["predict", path, str(folder / "last.npy"), "--channels-last", "--json", "--top", "10"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["class"] for r in rows] == list(p.argmax(axis=1))
    np.testing.assert_allclose([[t["probability"] for t in r["top"]] for r in rows], -np.sort(-p, axis=1),
                               rtol=1e-6)


def test_predict_with_winograd_runs_the_opt_in_plan_and_agrees(tmp_path, capsys, monkeypatch):
    """predict --winograd freezes with winograd=True (a model with 32-channel 3x3 convs takes it) and prints the
    probabilities the default plan gives, within float32 rounding; evaluate --winograd prints the same accuracy; a
    graph model is refused by name."""
    from convengine.graph import Graph, Input
    from convengine.layers import Conv2d, Flatten, GlobalAvgPool2d, Linear, ReLU
    convengine.manual_seed(1)
    model = convengine.Sequential([Conv2d(1, 32, 3, padding=1), ReLU(), Conv2d(32, 32, 3, padding=1), ReLU(),
                                   GlobalAvgPool2d(), Linear(32, 10)], input_shape=(1, 8, 8))
    model.save(tmp_path / "wide.npz")
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    asked = []
    freeze = convengine.Sequential.freeze
    monkeypatch.setattr(convengine.Sequential, "freeze",
                        lambda self, winograd=False: asked.append(winograd) or freeze(self, winograd=winograd))
    results = {}
    for flags in ([], ["--winograd"]):
        assert main(["predict", str(tmp_path / "wide.npz"), str(tmp_path / "x.npy"), "--json", "--top", "10"]
                    + flags) == 0
        rows = json.loads(capsys.readouterr().out)
        results[bool(flags)] = np.array([[t["probability"] for t in sorted(r["top"], key=lambda t: t["class"])]
                                         for r in rows])
    assert True in asked
    np.testing.assert_allclose(results[True], results[False], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(results[True], model.predict_proba(x), rtol=1e-5, atol=1e-7)
    # evaluate on the digits test split: the same accuracy line through the Winograd plan
    asked.clear()
    lines = {}
    for flags in ([], ["--winograd"]):
        assert main(["evaluate", str(tmp_path / "wide.npz")] + flags) == 0
        lines[bool(flags)] = capsys.readouterr().out.splitlines()[0]
    assert asked == [False, True] and lines[True] == lines[False] and "accuracy" in lines[True]
    inp = Input((1, 8, 8))
    graph_path = tmp_path / "graph.npz"
    Graph(inp, Linear(64, 10)(Flatten()(inp))).save(graph_path)
    assert main(["predict", str(graph_path), str(tmp_path / "x.npy"), "--winograd"]) == 1
    assert "--winograd needs a Sequential model" in capsys.readouterr().err


def test_predict_refuses_bad_input(saved, capsys, tmp_path):
    _, path, _, x, _ = saved
    np.save(tmp_path / "small.npy", x[:, :, :6, :6])
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    np.savez(tmp_path / "many.npz", a=x, b=x)
    for name, message in (("small.npy", "the model takes (1, 8, 8)"), ("text.npy", "not real numbers"),
                          ("many.npz", "several arrays"), ("missing.npy", "No such file")):
        assert main(["predict", path, str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("convengine predict: error:") and message in err, err


def test_evaluate_prints_the_metrics_confusion_matrix(saved, capsys):
    model, path, _, _, _ = saved
    assert main(["evaluate", path]) == 0
    out = capsys.readouterr().out
    (_, _), (xt, yt) = load_digits()
    scores = model.predict(xt)
    assert f"accuracy {100 * metrics.accuracy(yt, scores):.2f}%" in out
    counts = metrics.confusion_matrix(yt, scores)
    assert metrics.format_confusion_matrix(counts, [str(i) for i in range(10)]) in out
    assert counts.trace() == round(metrics.accuracy(yt, scores) * len(yt)) and f"({counts.trace()}/359)" in out


def test_evaluate_names_the_model_when_its_data_set_needs_data(tmp_path, capsys):
    model = lenet((1, 28, 28))
    model.metadata = {"dataset": "mnist"}
    model.save(tmp_path / "mnist.npz")
    assert main(["evaluate", str(tmp_path / "mnist.npz")]) == 1
    err = capsys.readouterr().err
    assert "mnist.npz was trained on mnist: pass --data PATH" in err and "--dataset mnist needs" not in err
    assert main(["evaluate", str(tmp_path / "mnist.npz"), "--dataset", "mnist"]) == 1
    assert "--dataset mnist needs --data PATH" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "export", "info", "show"])
def test_help_says_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for m in re.finditer(r"\(([^()]*default[^()]*)\)", text):
        tail = text[m.end():m.end() + 40]
        assert "(default:" not in tail.split(" --")[0], f"a default said twice: {m.group(0)}{tail}"
    assert "(default: 0.05 for sgd, 0.001 for adam)" in text or command != "train"
    assert "(default: 32)" in text or command != "train"


def test_train_wording(capsys, tmp_path):
    assert main(["train", "--epochs", "1", "--verbose", "2", "--batch-size", "128"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^epoch 1/1: loss=\S+ acc=\S+ test_loss=\S+ test_acc=", out, re.M), out
    assert "val_" not in out and "after 1 epoch (" in out
    assert main(["train", "--epochs", "0", "--verbose", "0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("test accuracy:") and "after 0 epochs (" in out[0]


def test_predict_is_in_the_top_level_help():
    parser = build_parser()
    assert "predict" in parser._subparsers._group_actions[0].choices
