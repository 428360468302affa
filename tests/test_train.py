"""benchmarks.train: the F-adjoint and autograd SGD from one seed follow the same trajectory."""
import json

import pytest

from benchmarks import train


def test_float64_losses_agree_at_every_step(data_root, tmp_path):
    results = train.main(["--data-root", str(data_root), "--dtype", "float64", "--widths", "784,32,10",
                          "--train-subset", "3000", "--epochs", "2", "--momentum", "0.9", "--progress", "false",
                          "--out", str(tmp_path)])
    fadjoint, sgd = results
    assert sgd["max_step_loss_diff_vs_fadjoint"] <= 1e-9
    assert fadjoint["history"][-1]["test_acc"] > 0.85
    written = json.loads((tmp_path / "mnist_sgd_seed0.json").read_text())
    assert written["config"]["dtype"] == "float64" and written["environment"]["torch"]


@pytest.mark.slow
def test_float32_one_epoch_agrees_to_1e_4(data_root, tmp_path):
    results = train.main(["--config", "configs/mnist_mlp.toml", "--data-root", str(data_root),
                          "--progress", "false", "--out", str(tmp_path)])
    assert results[1]["max_step_loss_diff_vs_fadjoint"] <= 1e-4
    assert results[0]["history"][-1]["test_acc"] > 0.95
