"""Every Python snippet in README.md runs as written, in order, in one namespace (in a
temporary working directory: the tour's monitor writes a run folder)."""

from __future__ import annotations

import pathlib
import re

import matplotlib
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert len(snippets()) >= 5


def test_readme_snippets_run(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(snippets()):
        try:
            exec(compile(code, f"README.md snippet {i + 1}", "exec"), namespace)
        except Exception as exc:  # name the snippet that failed
            pytest.fail(f"README.md snippet {i + 1} raised {type(exc).__name__}: {exc}\n{code}")
    # the tour's results are what it says they are
    assert namespace["everything"].batch_size == 4000
    assert tuple(namespace["s"].mean["2.weight"].shape) == (512, 512)
    assert -1.1 < namespace["law"].exponent < -0.9
    assert (tmp_path / "runs" / "exp1" / "metrics.jsonl").exists() and namespace["records"]
