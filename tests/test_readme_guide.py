"""The README's "A model, trained" and "Guide" examples run as written, one after the other, and print what the
README shows."""
import contextlib
import io
import os
import re

import pytest

import convengine

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def guide_code():
    if not os.path.isfile(README):
        pytest.skip("README.md is not beside the tests (an installed copy of the tests)")
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index("## A model, trained")
    end = text.index("\n## ", text.index("## Guide"))
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], re.S)
    assert len(blocks) >= 7, "the Guide lost its examples"
    return blocks, text[start:end]


def test_readme_guide_examples_run(tmp_path, monkeypatch):
    blocks, text = guide_code()
    monkeypatch.chdir(tmp_path)
    threads = convengine.get_num_threads()
    namespace = {}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            for block in blocks:
                exec(compile(block, README, "exec"), namespace)
    finally:
        convengine.set_num_threads(threads)
    printed = out.getvalue()
    summary = re.search(r"```\n(#  layer.*?)```", text, re.S).group(1)
    assert summary.strip() in printed, "summary() prints something else than the README shows"
    assert (tmp_path / "best.npz").is_file() and (tmp_path / "digits.npz").is_file()
    assert namespace["resumed"].epoch == namespace["trainer"].epoch - 2 + 1
    assert namespace["metrics"].accuracy(namespace["y_test"], namespace["scores"]) > 0.9
