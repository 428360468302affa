"""benchmarks.train: the F-adjoint and autograd SGD from one seed follow the same trajectory."""
import json

import pytest

from benchmarks import train


def test_float64_losses_agree_at_every_step(data_root, tmp_path):
    """784-32-10 ReLU, 3000 images, 2 epochs, float64: the same losses at every step, and it learns.

    Measured (benchmarks/results/cpu_capability): max |Δloss| 0.0 and accuracy 0.8816 here (seed 0) under
    ATEN_CPU_CAPABILITY default and avx2, with the init moved by 1 ulp, in float32 and with
    MKL_CBWR=COMPATIBLE; seeds 0-9 span 0.8356-0.8822 in every one of those settings. Threshold 0.8 (chance
    0.1), 0.035 below the worst seed. With the F-adjoint's update sign flipped: 0.1028 (and |Δloss| 5e43).
    """
    results = train.main(["--data-root", str(data_root), "--dtype", "float64", "--widths", "784,32,10",
                          "--train-subset", "3000", "--epochs", "2", "--momentum", "0.9", "--progress", "false",
                          "--out", str(tmp_path)])
    fadjoint, sgd = results
    assert sgd["max_step_loss_diff_vs_fadjoint"] <= 1e-9
    assert fadjoint["history"][-1]["test_acc"] > 0.8
    written = json.loads((tmp_path / "mnist_sgd_seed0.json").read_text())
    assert written["config"]["dtype"] == "float64" and written["environment"]["torch"]


@pytest.mark.slow
def test_float32_one_epoch_agrees_to_1e_4(data_root, tmp_path):
    """configs/mnist_mlp.toml (784-256-10 ReLU, one epoch, float32): autograd SGD's losses equal the
    F-adjoint's to 1e-4 at every step, and it learns.

    Measured (benchmarks/results/cpu_capability): sgd vs fadjoint max |Δloss| 0.0 in every run (seeds 0-4 x
    ATEN_CPU_CAPABILITY default / avx2 x {as is, init + 1 ulp, MKL_CBWR=COMPATIBLE}); accuracy 0.9576-0.9606
    at seed 0 (0.9576 under AVX512, issue 13), 0.9446-0.9654 over seeds 0-4. Threshold 0.93, 0.014 below the
    worst seed. The fused run is not checked here: its largest per-step difference is chaotic (3e-7, or
    0.04-0.11 for seeds 3 and 4 under MKL_CBWR=COMPATIBLE, 6.1e-2 under AVX512) because its GEMM rounds
    differently and a ReLU net amplifies that over 469 steps.
    """
    results = train.main(["--config", "configs/mnist_mlp.toml", "--data-root", str(data_root),
                          "--progress", "false", "--out", str(tmp_path)])
    by_variant = {r["variant"]: r for r in results}
    assert by_variant["sgd"]["max_step_loss_diff_vs_fadjoint"] <= 1e-4
    assert by_variant["fadjoint"]["history"][-1]["test_acc"] > 0.93
