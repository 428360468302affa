"""What the benchmark commands write, and where: runs/ by default (git-ignored), the run's CPU kernels recorded."""
import torch

from benchmarks import common, compare, speed, train


def test_results_go_to_runs_unless_out_is_given():
    assert common.parse_config(train.DEFAULTS, "", [])["out"] == "runs/train"
    assert common.parse_config(compare.DEFAULTS, "", [])["out"] == "runs/compare"
    assert common.parse_config(speed.DEFAULTS, "", [])["out"] == "runs/speed"
    assert common.parse_config(train.DEFAULTS, "", ["--config", "configs/mnist_mlp.toml"])["out"] == "runs/mnist_mlp"
    explicit = ["--config", "configs/mnist_mlp.toml", "--out", "benchmarks/results/train"]
    assert common.parse_config(train.DEFAULTS, "", explicit)["out"] == "benchmarks/results/train"


def test_every_result_records_the_cpu_capability():
    env = common.environment(torch.device("cpu"))
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() != ""
