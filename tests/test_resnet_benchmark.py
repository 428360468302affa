"""The ResNet benchmarks (issue 21): configs/resnet.toml trains He et al.'s ResNet-20 through the tape
(``graph = true``) step for step as autograd + SGD; configs/speed_resnet18.toml measures torchvision's ResNet-18
on it; the models and the ``graph`` key as the benchmarks build them."""
import json
import math

import pytest
import torch
from torch import nn

from benchmarks import models, speed, train
from benchmarks.common import parse_config
from benchmarks.rules import build_trainer


@pytest.mark.parametrize("config", ["configs/resnet.toml", "configs/resnet_cifar10.toml"])
def test_resnet_configs_parse(config):
    cfg = parse_config(train.DEFAULTS, "", ["--config", config])
    assert cfg["model"] == "resnet20" and cfg["graph"] is True and cfg["rules"] == ["sgd", "fadjoint"]
    assert (cfg["lr"], cfg["momentum"], cfg["weight_decay"], cfg["dtype"]) == (0.1, 0.9, 5e-4, "float32")
    shapes = {models.input_shape({**cfg, "dataset": d}) for d in (cfg["datasets"] or [cfg["dataset"]])}
    assert shapes == ({(1, 28, 28)} if config.endswith("resnet.toml") else {(3, 32, 32)})


def test_speed_config_parses():
    cfg = parse_config(speed.DEFAULTS, "", ["--config", "configs/speed_resnet18.toml"])
    assert cfg["models"] == ["resnet18_tv"] and cfg["graph"] is True and cfg["validate"] is True
    assert models.input_shape({**cfg, "model": "resnet18_tv"}) == (3, 32, 32) and cfg["batches"] == [128]


def test_resnet_models():
    """ResNet-20: 19 3×3 convolutions and 2 option-B 1×1 shortcuts, one Linear (6n + 2 = 20 weighted layers),
    the input's channels from the data set; torchvision's ResNet-18 gets a 1-channel conv1 for MNIST."""
    cfg = {**train.DEFAULTS, "model": "resnet20"}
    net = models.build_model(cfg)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 19 and sum(m.kernel_size == (1, 1) for m in convs) == 2
    assert convs[0].in_channels == 1 and [m.out_features for m in net.modules() if isinstance(m, nn.Linear)] == [10]
    assert models.build_model({**cfg, "dataset": "cifar10"}).conv1.in_channels == 3
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    tv = models.build_model({**cfg, "model": "resnet18_tv"})  # 11 M parameters: built once
    assert tv.conv1.in_channels == 1 and tv.conv1.kernel_size == (7, 7) and tv.fc.out_features == 10
    assert models.input_shape({**cfg, "model": "resnet18_tv", "image_shape": [3, 32, 32]}) == (3, 32, 32)


@pytest.mark.parametrize("rule", ["fadjoint", "fadjoint_unchecked", "fadjoint_dropin", "lfp"])
def test_graph_key_reaches_every_library_rule(rule):
    torch.manual_seed(0)
    cfg = {**train.DEFAULTS, "model": "small_cnn", "graph": True}
    assert build_trainer(rule, models.build_model(cfg), cfg).net.graph is True
    assert build_trainer(rule, models.build_model(cfg), {**cfg, "graph": False}).net.graph is False


def test_resnet20_on_the_tape_equals_autograd_sgd_at_every_step(data_root, tmp_path):
    """configs/resnet.toml cut to 3 steps of 32 MNIST images: the F-adjoint on the tape (validate on) and autograd +
    SGD (momentum 0.9, weight decay 5e-4) from the same weights give the same loss at every step, within float32
    rounding (measured: bit for bit, here and over the committed 100-step runs, benchmarks/results/resnet20)."""
    results = train.main(["--config", "configs/resnet.toml", "--data-root", str(data_root), "--datasets", "mnist",
                          "--batch-size", "32", "--train-subset", "96", "--test-subset", "64",
                          "--test-batch-size", "64", "--threads", "1", "--progress", "false", "--out", str(tmp_path)])
    sgd, fadjoint = results
    assert (sgd["variant"], fadjoint["variant"]) == ("sgd", "fadjoint") and fadjoint["config"]["graph"] is True
    a, b = sgd["step_losses"], fadjoint["step_losses"]
    assert len(a) == len(b) == 3 and a[0] != a[-1]
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6 * max(a)
    assert fadjoint["max_step_loss_diff_vs_sgd"] <= 1e-6 * max(a)
    assert json.loads((tmp_path / "mnist_fadjoint_seed0.json").read_text())["step_losses"] == b


def test_speed_resnet18_runs_small(tmp_path):
    """configs/speed_resnet18.toml at batch 4 and 2 repetitions (the full run: benchmarks/results/speed_resnet18):
    every entry has finite ratios, the tape keeps bytes for the sweep, `record` is measured against `forward`."""
    payload = speed.main(["--config", "configs/speed_resnet18.toml", "--batches", "4", "--repeats", "2",
                          "--warmup", "1", "--min-repeats", "2", "--threads", "1", "--progress", "false",
                          "--out", str(tmp_path)])
    (cell,) = payload["results"]
    entries = cell["rules"]
    assert set(entries) == {f"resnet18_tv/{r}" for r in ("sgd", "fadjoint", "forward", "record")}
    assert entries["resnet18_tv/record"]["reference"] == "resnet18_tv/forward"
    for entry in entries.values():
        assert math.isfinite(entry["time_ratio"]) and math.isfinite(entry["paired_ratio"])
        assert entry["peak_bytes"] > 0
    assert entries["resnet18_tv/fadjoint"]["kept_bytes"] > 0 and entries["resnet18_tv/sgd"]["kept_bytes"] > 0
    assert "| resnet18_tv | 4 | fadjoint |" in (tmp_path / "SPEED.md").read_text()


def test_record_overhead_pairs_the_record_with_plain_and_autograd_forwards():
    """benchmarks.record_overhead on the language model at 2 × 8 tokens, 3 repetitions: the tape's 82 ops, finite
    paired ratios against the plain forward and against autograd's forward, each the median of its own pairs."""
    from benchmarks import record_overhead

    torch.manual_seed(0)
    row = record_overhead.paired(record_overhead.LanguageModel().train(), torch.randint(0, 512, (2, 8)), repeats=3,
                                 warmup=1)
    assert row["ops"] == 82
    for low, middle, high in (("q1", "ratio", "q3"), ("own_q1", "own", "own_q3")):
        assert 0 < row[low] <= row[middle] <= row[high] < math.inf
    assert row["autograd_ratio"] > 0 and row["record_ms"] > 0
