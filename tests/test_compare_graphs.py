"""Issue 22's comparisons on graphs: configs/compare_cnn_examples.toml (pytorch/examples' Net as logits, the chain),
configs/compare_resnet20.toml and configs/compare_vit.toml (the tape), configs/speed_graph_rules.toml; the tiny ViT
of benchmarks/models.py recorded on the tape exactly as autograd (float64); reuse_selection."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import torch_fadjoint as tfa
from benchmarks import compare, models, speed
from benchmarks.common import parse_config
from benchmarks.rules import build_trainer

from . import oracles


@pytest.mark.parametrize("config, model, graph", [("configs/compare_cnn_examples.toml", "examples_mnist_logits", False),
                                                  ("configs/compare_resnet20.toml", "resnet20", True),
                                                  ("configs/compare_vit.toml", "vit_tiny", True)])
def test_configs_parse_and_select_on_validation(config, model, graph):
    cfg = parse_config(compare.DEFAULTS, "", ["--config", config])
    assert cfg["model"] == model and cfg["graph"] is graph and cfg["validation"] > 0 and cfg["reuse_selection"]
    assert cfg["epochs"] == cfg["select_epochs"]  # the seed-0 final run is the selection run
    variants = cfg["variants"]
    assert {"sgd", "fadjoint", "equilibrium", "lfp", "consequentialism", "nlms"} <= set(variants)
    for name in ("sgd", "fadjoint", "equilibrium", "lfp", "consequentialism", "nlms"):
        assert len(variants[name]["grid"]["lr"]) == 3, name
    assert min(variants["lfp"]["grid"]["lr"]) >= 10 * min(variants["sgd"]["grid"]["lr"])  # updates ∝ |θ|: 10× SGD's
    assert variants["equilibrium"]["sequential"] is False
    assert ("il_prox" in variants) is (not graph)  # IL-prox refuses graphs


def test_speed_config_parses():
    cfg = parse_config(speed.DEFAULTS, "", ["--config", "configs/speed_graph_rules.toml"])
    assert cfg["models"] == ["resnet20", "vit_tiny"] and cfg["graph"] is True and cfg["sequential"] is False
    assert cfg["T"] == 5 and cfg["batches"] == [64]


def test_examples_net_logits_is_nets_function():
    torch.manual_seed(0)
    logits = models.build_model({"model": "examples_mnist_logits"})
    torch.manual_seed(0)
    net = models.Net().eval()
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(F.log_softmax(logits(x), 1), net(x))


def test_vit_on_the_tape_equals_autograd_float64():
    torch.manual_seed(0)
    model = models.build_model({"model": "vit_tiny"}).double()
    reference = copy.deepcopy(model)
    x, t = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 3, 7, 9])
    want = oracles.autograd_grads(lambda: reference(x), dict(reference.named_parameters()), "cross_entropy", t)
    net = tfa.FPropagation(model)
    net(x)
    assert net.graph  # not a plain nn.Sequential: the tape
    net.backward(F.cross_entropy, t)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("rule", ["lfp", "equilibrium", "consequentialism", "nlms"])
def test_every_graph_rule_steps_on_the_vit(rule):
    torch.manual_seed(0)
    cfg = {**compare.TRAIN_DEFAULTS, "model": "vit_tiny", "graph": True, "lr": 0.01, "sequential": False}
    model = models.build_model(cfg)
    trainer = build_trainer(rule, model, cfg)
    before = [p.clone() for p in model.parameters()]
    loss = trainer.step(torch.randn(8, 1, 28, 28), torch.arange(8))
    assert torch.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_reuse_selection_and_per_variant_datasets(data_root, tmp_path):
    """reuse_selection: seed 0's final run is the chosen selection run (not trained again); a variant's own
    `datasets` runs it on those only."""
    config = tmp_path / "c.toml"
    config.write_text('datasets = ["mnist"]\nwidths = [784, 16, 10]\nseeds = [0, 1]\nepochs = 1\n'
                      'select_epochs = 1\nvalidation = 128\ntrain_subset = 256\nreuse_selection = true\n'
                      'speed_results = ""\n[variants.a]\nrule = "fadjoint"\ngrid = { lr = [0.1, 0.01] }\n'
                      '[variants.b]\nrule = "fadjoint"\nlr = 0.1\nseeds = [0]\ndatasets = ["fashion_mnist"]\n')
    compare.main(["--config", str(config), "--data-root", str(data_root), "--out", str(tmp_path / "o"),
                  "--progress", "false"])
    runs = tmp_path / "o" / "runs"
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert set(summary["datasets"]["mnist"]) == {"a"}  # b: fashion_mnist only, which this run does not load
    tag = "lr" + str(summary["datasets"]["mnist"]["a"]["chosen"]["lr"])
    final = json.loads((runs / f"mnist_a_final_{tag}_seed0.json").read_text())
    assert final["reused_from"] == f"mnist_a_select_{tag}.json"
    assert final["history"] == json.loads((runs / final["reused_from"]).read_text())["history"]
    assert "reused_from" not in json.loads((runs / f"mnist_a_final_{tag}_seed1.json").read_text())
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        [f"mnist_a_final_{tag}_seed0.json", f"mnist_a_final_{tag}_seed1.json", "mnist_a_select_lr0.1.json",
         "mnist_a_select_lr0.01.json"])
