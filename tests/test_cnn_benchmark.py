"""The CNN benchmarks (issue 14): pytorch/examples' MNIST Net trained by the F-adjoint equals autograd step for
step; the models are built from the config and fed (B, 1, 28, 28) images; every rule steps on the small CNN."""
import copy
import json
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import torch_fadjoint as tfa
from benchmarks import models, train
from benchmarks.rules import RULES, build_trainer


def test_examples_net_dropout_off_losses_equal_autograd_at_every_step(data_root, tmp_path):
    """configs/mnist_cnn.toml (Adadelta lr 1, StepLR, batch 64) with every Dropout p = 0, float32: the drop-in
    F-adjoint (FPropagation + tfa.losses.nll + net.adjoint + Adadelta) and autograd give the same loss at
    every step (6 steps over 2 epochs, so StepLR's second learning rate is used too)."""
    results = train.main(["--config", "configs/mnist_cnn.toml", "--data-root", str(data_root), "--datasets", "mnist",
                          "--train-subset", "192", "--test-subset", "200", "--dropout", "false", "--threads", "1",
                          "--progress", "false", "--out", str(tmp_path)])
    fadjoint, autograd = results
    assert (fadjoint["variant"], autograd["variant"]) == ("fadjoint", "autograd")
    assert fadjoint["config"]["dropout"] is False and fadjoint["config"]["optimizer"] == "adadelta"
    assert autograd["max_step_loss_diff_vs_fadjoint"] == 0.0
    assert fadjoint["step_loss_last"] == autograd["step_loss_last"]
    assert fadjoint["step_loss_first"][0] != fadjoint["step_loss_last"][-1]  # it trained
    assert [h["test_acc"] for h in fadjoint["history"]] == [h["test_acc"] for h in autograd["history"]]
    assert (tmp_path / "mnist_fadjoint_seed1.json").is_file() and (tmp_path / "mnist_autograd_seed1.json").is_file()


def test_cnn_data_are_images_and_the_mlp_keeps_flat_rows(data_root):
    cfg = {**train.DEFAULTS, "data_root": str(data_root), "train_subset": 10, "test_subset": 5}
    flat = train.load_splits(cfg, torch.device("cpu"))
    assert flat["train"].x.shape == (10, 784) and flat["test"].x.shape == (5, 784)
    images = train.load_splits({**cfg, "model": "small_cnn"}, torch.device("cpu"))
    assert images["train"].x.shape == (10, 1, 28, 28)
    assert torch.equal(images["train"].x.flatten(1), flat["train"].x)


def test_models_from_config():
    """The example's Net as written (functional forward) and its module twin: same initial weights from one
    seed, same outputs; ``dropout = false`` sets every p to 0; an unknown model name is a one-line error."""
    cfg = dict(train.DEFAULTS)
    torch.manual_seed(1)
    net = models.build_model({**cfg, "model": "examples_mnist"})
    torch.manual_seed(1)
    seq = models.build_model({**cfg, "model": "examples_mnist_modules"})
    assert [p.shape for p in net.parameters()] == [p.shape for p in seq.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), seq.parameters()))
    x = torch.randn(3, 1, 28, 28)
    net.eval(), seq.eval()
    assert torch.equal(net(x), seq(x))
    off = models.build_model({**cfg, "model": "examples_mnist", "dropout": False})
    assert [m.p for m in off.modules() if isinstance(m, torch.nn.Dropout)] == [0.0, 0.0]
    with pytest.raises(SystemExit, match="model must be one of"):
        models.build_model({**cfg, "model": "resnet"})


def test_examples_net_adjoint_is_bitwise_autograd_with_dropout_off():
    torch.manual_seed(0)
    model = models.build_model({**train.DEFAULTS, "model": "examples_mnist", "dropout": False})
    twin = copy.deepcopy(model)
    x, t = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    net = tfa.FPropagation(model)
    with torch.no_grad():
        loss, out_adj = tfa.losses.nll(net(x), t)
    net.adjoint(out_adj)
    reference = F.nll_loss(twin(x), t)
    reference.backward()
    assert torch.equal(loss, reference.detach())
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("rule", sorted(set(RULES) - {"equilibrium_ref"}))
def test_every_rule_steps_on_the_small_cnn(rule):
    """Every benchmark rule takes finite steps on configs/compare_cnn.toml's CNN (conv, ReLU, max and average
    pooling, flatten, Linear). equilibrium_ref (§2.4's σ'(D) quirk) needs elementwise maps: refused at MaxPool."""
    cfg = {**train.DEFAULTS, "model": "small_cnn", "lr": 0.01, "T": 3, "steps": 5}
    model = models.build_model(cfg)
    trainer = build_trainer(rule, model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    x, t = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(2):
        loss = trainer.step(x, t)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), rule


def test_equilibrium_ref_refuses_max_pool_naming_it():
    cfg = {**train.DEFAULTS, "model": "small_cnn", "lr": 0.01, "steps": 5}
    trainer = build_trainer("equilibrium_ref", models.build_model(cfg), cfg)
    with pytest.raises(TypeError, match=r"MaxPool2d"):
        trainer.step(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))


def test_compare_on_the_small_cnn_with_the_mlp_beside(data_root, tmp_path):
    """benchmarks.compare with ``model = "small_cnn"``: fadjoint = sgd; the MLP summary's accuracy is shown beside."""
    from benchmarks import compare

    config = tmp_path / "c.toml"
    config.write_text('datasets = ["mnist"]\nmodel = "small_cnn"\nseeds = [0]\nepochs = 1\nvalidation = 0\n'
                      'train_subset = 512\nspeed_results = ""\nbeside = "benchmarks/results/compare/summary.json"\n'
                      '[variants.sgd]\nlr = 0.05\nmomentum = 0.9\n[variants.fadjoint]\nlr = 0.05\nmomentum = 0.9\n')
    report = compare.main(["--config", str(config), "--data-root", str(data_root), "--out", str(tmp_path / "o"),
                           "--progress", "false", "--test-subset", "1000"])
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())["datasets"]["mnist"]
    assert summary["sgd"]["histories"] == [[{**h, "seconds": s["seconds"]} for h, s in
                                            zip(summary["fadjoint"]["histories"][0], summary["sgd"]["histories"][0])]]
    text = report.read_text()
    assert "small CNN Conv2d(1→8, 5×5, stride 2, pad 2)" in text and "beside: test acc" in text
    mlp = json.loads(Path("benchmarks/results/compare/summary.json").read_text())["datasets"]["mnist"]["fadjoint"]
    assert f"{statistics.fmean(h[-1]['test_acc'] for h in mlp['histories']):.4f} ±" in text
    assert "| fadjoint | fadjoint | – | lr 0.05, momentum 0.9 |" in text


def test_speed_models_cells_interleave_functional_and_module_nets(tmp_path):
    """benchmarks.speed with ``models``: one cell per batch holding every (model, rule) pair; ratios to the same
    model's reference (``reference_of``), and to the same rule on ``model_reference``."""
    from benchmarks import speed

    payload = speed.main(["--config", "configs/speed_cnn.toml", "--batches", "2", "--repeats", "2", "--min-repeats",
                          "2", "--warmup", "1", "--threads", "1", "--progress", "false", "--out", str(tmp_path),
                          "--rules", "sgd,fadjoint,autograd,fadjoint_dropin,forward,record"])
    (cell,) = payload["results"]
    assert cell["models"] == ["examples_mnist", "examples_mnist_modules"] and cell["batch"] == 2
    entries = cell["rules"]
    assert len(entries) == 12
    assert entries["examples_mnist/fadjoint"]["reference"] == "examples_mnist/sgd"
    assert entries["examples_mnist/fadjoint_dropin"]["reference"] == "examples_mnist/autograd"
    assert entries["examples_mnist_modules/record"]["reference"] == "examples_mnist_modules/forward"
    assert entries["examples_mnist/record"]["model_reference"] == "examples_mnist_modules/record"
    assert "model_reference" not in entries["examples_mnist_modules/record"]
    for e in entries.values():
        assert e["time_ratio"] > 0 and e["paired_ratio"] > 0 and e["peak_bytes"] > 0
    assert entries["examples_mnist/forward"]["kept_bytes"] == 0 < entries["examples_mnist/record"]["kept_bytes"]
    # the same layers record the same tensors, whichever way the forward is written
    assert entries["examples_mnist/fadjoint"]["kept_bytes"] == entries["examples_mnist_modules/fadjoint"]["kept_bytes"]
    assert entries["examples_mnist/fadjoint"]["model_paired_ratio"] > 0
    text = (tmp_path / "SPEED.md").read_text()
    assert "| examples_mnist | 2 | record | " in text and "paired ratio to examples_mnist_modules" in text


def test_compare_reports_a_diverged_final_run_and_keeps_going(tmp_path):
    """A final run whose rule refuses a non-finite update is recorded as diverged (left out of the mean), not
    raised: the other variants and data sets still run (configs/compare_cnn.toml's equilibrium_lr003)."""
    from benchmarks import compare

    calls = []

    def fake_run(vcfg, rule, seed, splits, device, position=0, name=None):
        calls.append((vcfg["dataset"], rule, seed))
        if rule == "equilibrium":
            raise RuntimeError("EquilibriumFAdjoint step: non-finite values in the update of 7.weight")
        return {"rule": rule, "seed": seed, "history": [{"epoch": 1, "train_loss": 1.0, "seconds": 1.0,
                                                          "test_acc": 0.5 + 0.1 * seed}]}

    config = tmp_path / "c.toml"
    config.write_text('datasets = ["mnist", "fashion_mnist"]\nseeds = [0, 1]\nepochs = 1\nvalidation = 0\n'
                      'speed_results = ""\n[variants.sgd]\n[variants.equilibrium]\n')
    original = (compare.run, compare.load_splits)
    compare.run, compare.load_splits = fake_run, lambda cfg, device: {}
    try:
        report = compare.main(["--config", str(config), "--out", str(tmp_path / "o"), "--progress", "false"])
    finally:
        compare.run, compare.load_splits = original
    assert len(calls) == 8
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())["datasets"]
    assert summary["fashion_mnist"]["equilibrium"]["histories"] == []
    assert [d["seed"] for d in summary["mnist"]["equilibrium"]["diverged"]] == [0, 1]
    text = report.read_text()
    assert "| equilibrium | equilibrium | – | – | diverged (every seed) |" in text
    assert "- mnist equilibrium, seed 0: EquilibriumFAdjoint step: non-finite values" in text
    assert "| sgd | sgd | – | – | 0.5500 ± 0.0707 |" in text
