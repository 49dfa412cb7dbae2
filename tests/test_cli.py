"""The gradnoise command: a smoke run on the built-in task and on a user entry point."""

import json
import sys
import types

import pytest
import torch
from torch import nn

from gradnoise.cli import main


def test_measure_builtin_task(tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = main(["measure", "--task", "linreg", "--train-steps", "20", "--batch-sizes", "8,64", "--batches", "3", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "B_simple" in text and "wrote" in text
    data = json.loads(out.read_text())
    assert [r["batch_size"] for r in data["rows"]] == [8, 64]
    assert data["rows"][0]["noise"] > data["rows"][1]["noise"]  # 1/B


def test_commands_write_nothing_without_out(tmp_path, monkeypatch, capsys):
    """Without --out, measure and sharpness only print: nothing lands in the working
    directory (a repository checkout, typically)."""
    monkeypatch.chdir(tmp_path)
    assert main(["measure", "--task", "linreg", "--train-steps", "5", "--batch-sizes", "8,32", "--batches", "2", "--no-suggest"]) == 0
    assert main(["sharpness", "--task", "linreg", "--train-steps", "5", "--examples", "64", "--k", "1", "--trace-hvps", "6"]) == 0
    assert "wrote" not in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_measure_user_entry_point(tmp_path, monkeypatch):
    mod = types.ModuleType("my_models")

    def factory():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), nn.CrossEntropyLoss(), (torch.randn(100, 3), torch.randint(0, 2, (100,)))

    mod.factory = factory
    monkeypatch.setitem(sys.modules, "my_models", mod)
    out = tmp_path / "m.json"
    assert main(["measure", "--model", "my_models:factory", "--train-steps", "5", "--batch-sizes", "10,50", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["description"] == "my_models:factory" and set(data["per_layer"]) == {"0", "2"}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["measure", "--model", "nocolon"], "package.module:factory"),
        (["measure", "--task", "linreg", "--batch-sizes", "8,99999"], "between 2 and the training-set size"),
        (["measure", "--batch-sizes", "8,x"], "invalid parse_sizes value"),
    ],
)
def test_measure_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--train-steps", "0"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_sharpness_builtin_task(tmp_path, capsys):
    out = tmp_path / "s.json"
    argv = ["sharpness", "--task", "linreg", "--train-steps", "10", "--examples", "200", "--k", "2", "--trace-hvps", "12", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Hessian eigenvalues" in text and "ε-sharpness" in text
    data = json.loads(out.read_text())
    eig = data["eigenvalues"]["eigenvalues"]
    assert len(eig) == 2 and eig[0] >= eig[1] > 0  # linear regression: H = 2·(1/n)XᵀX ≻ 0
    assert data["eigenvalues"]["converged"]


def test_a_model_module_in_the_working_directory_imports(tmp_path, monkeypatch, capsys):
    """As with `python -m`, `--model mymodels:factory` finds mymodels.py in the working
    directory; a missing one says where it looked."""
    (tmp_path / "cwd_models_for_test.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def factory():\n    torch.manual_seed(0)\n"
        "    return nn.Linear(3, 2), nn.CrossEntropyLoss(), (torch.randn(64, 3), torch.randint(0, 2, (64,)))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["measure", "--model", "cwd_models_for_test:factory", "--train-steps", "2", "--batch-sizes", "8,16", "--no-suggest"]) == 0
    with pytest.raises(SystemExit):
        main(["measure", "--model", "no_such_module_here:factory"])
    assert f"looked in {tmp_path}" in capsys.readouterr().err


def test_measure_prints_no_numpy_warnings(recwarn):
    """Infinite bootstrap resamples (|G|² ≤ 0 in a resample) are intended: no RuntimeWarning."""
    assert main(["measure", "--task", "linreg", "--train-steps", "300", "--batch-sizes", "16,64", "--batches", "4"]) == 0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
