"""benchmarks.speed: the memory counters against hand counts, the --quick harness end to end, CUDA capture."""
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import speed
from benchmarks.rules import build_trainer

CFG = {**speed.DEFAULTS, "lr": 0.01, "momentum": 0.9, "validate": False}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3))


def test_bytes_kept_counts_what_each_side_holds():
    """Autograd saves x (first addmm), the ReLU output (ReLU + second addmm, one storage) and the
    log-softmax output (4 bytes each), plus nll_loss's int64 targets and its 4-byte total weight; our
    records hold x, X¹ (= the ReLU's record) and the logits."""
    x, t = torch.randn(5, 20), torch.randint(0, 3, (5,))
    sgd_model, ours_model = mlp(), mlp()
    sgd = build_trainer("sgd", sgd_model, CFG)
    ours = build_trainer("fadjoint", ours_model, CFG)
    assert speed.bytes_kept(sgd, sgd_model, x, t) == 4 * 5 * (20 + 8 + 3) + 8 * 5 + 4
    assert speed.bytes_kept(ours, ours_model, x, t) == 4 * 5 * (20 + 8 + 3)
    assert all(p.grad is None for p in ours_model.parameters())  # measuring does not train


def test_peak_bytes_sees_a_known_allocation():
    class Alloc:
        def step(self, x, t):
            big = torch.empty(1000, dtype=torch.float64)  # 8 000 bytes alive at once with a copy
            copy = big.clone()
            del big, copy

    assert speed.peak_step_bytes(Alloc(), torch.zeros(1), torch.zeros(1))["peak_bytes"] == 16000


def test_peak_bytes_ignores_views_and_in_place_writes_of_older_memory():
    weight = torch.zeros(1000, dtype=torch.float64)

    class InPlace:
        def step(self, x, t):
            view = weight.view(10, 100).t()
            view.add_(1.0)
            weight.mul_(2.0)
            fresh = weight * 2.0  # the only allocation: 8 000 bytes
            fresh.add_(1.0)
            del view, fresh

    assert speed.peak_step_bytes(InPlace(), torch.zeros(1), torch.zeros(1))["peak_bytes"] == 8000


def test_quick_harness_writes_every_rule_with_finite_ratios(tmp_path):
    payload = speed.main(["--quick", "--progress", "false", "--out", str(tmp_path), "--threads", "1",
                          "--rules", "sgd,fadjoint,equilibrium,lfp,il_prox", "--repeats", "2"])
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["results"] == json.loads(json.dumps(payload["results"]))
    for cell in saved["results"]:
        assert set(cell["rules"]) == {"sgd", "fadjoint", "equilibrium", "lfp", "il_prox"}
        for entry in cell["rules"].values():
            assert math.isfinite(entry["time_ratio"]) and entry["time_ratio"] > 0
            assert math.isfinite(entry["paired_ratio"]) and entry["paired_ratio"] > 0
            assert math.isfinite(entry["peak_ratio"]) and math.isfinite(entry["kept_ratio"])
            assert entry["kept_bytes"] > 0 and entry["peak_bytes"] > 0
        assert 0.9 < cell["rules"]["fadjoint"]["kept_ratio"] <= 1.0
    assert "| fadjoint |" in (tmp_path / "SPEED.md").read_text()
    assert (tmp_path / "step_time.png").stat().st_size > 1000


def test_the_read_floor_is_the_unchecked_step_plus_one_read_of_every_parameter_and_buffer(tmp_path):
    """configs/speed_default_step.toml (issue 20's table) small: ``read_floor`` trains as ``fadjoint_unchecked`` does
    (same weights after 3 steps, bit for bit: the read decides nothing) and is timed beside the default step."""
    config = tmp_path / "speed_default_step.toml"
    text = (Path(__file__).parents[1] / "configs" / "speed_default_step.toml").read_text()
    config.write_text("\n".join("sizes = [[784, 16, 10]]" if line.startswith("sizes") else line
                                for line in text.splitlines()))
    payload = speed.main(["--config", str(config), "--batches", "4", "--repeats", "2", "--min-repeats", "2",
                          "--warmup", "1", "--threads", "1", "--progress", "false", "--out", str(tmp_path)])
    (cell,) = payload["results"]
    assert {"sgd", "fadjoint", "fadjoint_unchecked", "read_floor"} <= set(cell["rules"])
    for entry in cell["rules"].values():
        assert math.isfinite(entry["paired_ratio"]) and entry["paired_ratio"] > 0
    cfg = {**speed.DEFAULTS, "lr": 0.01, "momentum": 0.9, "foreach": True}
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 784, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    models = {rule: speed._make(cfg, rule, [784, 16, 10], torch.device("cpu"), torch.float32) for rule in
              ("read_floor", "fadjoint_unchecked")}
    for _ in range(3):
        for _, trainer in models.values():
            trainer.step(x, t)
    floor, unchecked = (list(models[rule][0].parameters()) for rule in ("read_floor", "fadjoint_unchecked"))
    assert all(torch.equal(a, b) for a, b in zip(floor, unchecked))
    assert models["read_floor"][1].trainer.opt.state  # momentum buffers: the floor read them from the second step


@pytest.mark.cuda
@pytest.mark.parametrize("rule", ["fadjoint", "fadjoint_fused", "equilibrium", "lfp", "sgd"])
def test_cuda_graph_step_equals_eager(rule):
    device = torch.device("cuda")
    x = torch.randn(32, 20, device=device)
    t = torch.randint(0, 3, (32,), device=device)
    diff = speed._check_equal({**CFG, "activation": "relu"}, rule, [20, 16, 3], device, torch.float32,
                              speed.cuda_graph_step, x, t)
    assert diff <= 1e-6, diff


def _compiled_equals_eager(device, rule):
    x = torch.randn(8, 20, device=device)
    t = torch.randint(0, 3, (8,), device=device)
    return speed._check_equal({**CFG, "activation": "relu"}, rule, [20, 16, 3], device, torch.float32,
                              lambda trainer, *_: speed.compiled_step(trainer), x, t)


_OLD_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < speed.COMPILE_MIN_TORCH


def test_compiled_step_is_refused_below_its_torch_version(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.4.1")
    with pytest.raises(RuntimeError, match=r"^compiled_step: torch.compile of the whole step needs torch >= 2.14, "
                                           r"found 2.4.1; use the eager step$"):
        speed.compiled_step(None)


@pytest.mark.slow
@pytest.mark.skipif(_OLD_TORCH, reason="torch.compile of the whole step needs torch >= 2.14 (refused below)")
@pytest.mark.parametrize("rule", ["fadjoint", "fadjoint_fused", "sgd"])
def test_compiled_step_equals_eager_on_cpu(rule):
    """torch.compile of the whole step (forward with the recorder's hooks, adjoint, SGD update) on CPU:
    same parameters as the eager step after 3 steps (inductor reorders float32 sums: tolerance 1e-6).
    Slow: ~2 minutes of inductor compilation on a 2-core machine."""
    torch._dynamo.reset()
    assert _compiled_equals_eager(torch.device("cpu"), rule) <= 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("rule", ["fadjoint", "fadjoint_fused", "sgd"])
def test_compiled_step_equals_eager_on_cuda(rule):
    torch._dynamo.reset()
    assert _compiled_equals_eager(torch.device("cuda"), rule) <= 1e-5


@pytest.mark.cuda
def test_cuda_graph_replay_follows_new_inputs():
    """The captured step reads its static buffers: replaying with new data equals eager on that data."""
    device = torch.device("cuda")
    xs = [torch.randn(16, 20, device=device) for _ in range(3)]
    ts = [torch.randint(0, 3, (16,), device=device) for _ in range(3)]
    model_a, eager = speed._make({**CFG, "activation": "relu"}, "fadjoint", [20, 16, 3], device, torch.float32)
    model_b, fast = speed._make({**CFG, "activation": "relu"}, "fadjoint", [20, 16, 3], device, torch.float32)
    step = speed.cuda_graph_step(fast, xs[0], ts[0])  # its warm-up is undone: the first replay is step 1
    for x, t in zip(xs, ts):
        eager.step(x, t)
        step(x, t)
    torch.cuda.synchronize()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fadjoint_step_peak_is_below_autograds():
    """Exact byte counts (no timing), where the records weigh more than the weights (narrow layers, large
    batch): records are freed as the sweep passes them (X^k right after step 1 of layer k) and step 1
    writes into X*^k's buffer, so the F-adjoint's peak is below autograd's. With X^k released only at the
    end of its layer this fails (301 868 vs 274 992 bytes). Where ∂W dominates, the two peaks are equal
    up to the B × n_L tensor X*^L (benchmarks/results/speed/README.md)."""
    torch.manual_seed(0)
    widths, batch = [50, 64, 64, 10], 256
    x, t = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))
    peaks = {}
    for rule in ("sgd", "fadjoint"):
        model, trainer = speed._make({**CFG, "activation": "relu"}, rule, widths, torch.device("cpu"), torch.float32)
        trainer.step(x, t)  # momentum buffers exist: a steady-state step
        peaks[rule] = speed.peak_step_bytes(trainer, x, t)["peak_bytes"]
    assert peaks["fadjoint"] < peaks["sgd"], peaks


@pytest.mark.parametrize("widths, batch", [([64, 256, 256, 10], 16), ([64, 512, 512, 10], 64)])
def test_the_checked_steps_peak_is_at_most_autograds_where_it_bounds_by_factors(widths, batch):
    """validate=True bounds a Linear weight's gradient by its factors' norms where Y*, X hold fewer numbers than
    the weight (here): the norms are taken in the sweep, so the factors are freed as the sweep passes them (held
    until the step's one read, the peak was 1.13× autograd's at 784-1024-1024-10, batch 128; here +133 117 bytes).
    What the checked step holds beyond autograd is its 0-dim norms and flags: a few bytes (5 measured, as on 34c015e)."""
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(batch, widths[0], generator=gen), torch.randint(0, widths[-1], (batch,), generator=gen)
    peaks = {}
    for rule in ("sgd", "fadjoint"):
        model, trainer = speed._make({**CFG, "activation": "relu", "validate": True}, rule, widths, torch.device("cpu"),
                                     torch.float32)
        trainer.step(x, t)  # momentum buffers exist: a steady-state step
        peaks[rule] = speed.peak_step_bytes(trainer, x, t)["peak_bytes"]
    assert peaks["fadjoint"] <= peaks["sgd"] + 64, peaks


def test_profile_step_lists_every_rules_ops_and_gemms():
    from benchmarks.profile_step import profile_rules, report

    threads = torch.get_num_threads()
    result = profile_rules(["sgd", "fadjoint_fused"], [16, 8, 4], batch=4, steps=2, threads=1, shapes=True)
    assert torch.get_num_threads() == threads
    text = report(result, 2, min_ms=0.0)
    assert "aten::addmm" in text and "GEMM (mm, addmm, addmm_)" in text and "fadjoint_fused" in text
    self_ms, calls, wall = result["sgd"]
    assert wall[0] > 0 and any(key.startswith("aten::mm") for key in self_ms)


@pytest.mark.parametrize("widths, batch, fused_below", [([50, 64, 64, 10], 256, False), ([40, 300, 300, 10], 16, True)],
                         ids=["factors-larger", "factors-smaller"])
def test_fused_step_peak_is_at_most_the_unfused_and_autograds(widths, batch, fused_below):
    """Exact byte counts (no timing). The fused step keeps a weight's factors only where they are smaller
    than its gradient, so its peak never exceeds the unfused F-adjoint's (equal where every layer's factors
    are larger, below where they are smaller), which never exceeds autograd's."""
    x, t = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))
    cfg = dict(lr=0.01, momentum=0.9, foreach=True, validate=False, activation="relu")
    peaks = {}
    for rule in ("sgd", "fadjoint", "fadjoint_fused"):
        model, trainer = speed._make(cfg, rule, widths, torch.device("cpu"), torch.float32)
        trainer.step(x, t)  # momentum buffers exist: a steady-state step
        peaks[rule] = speed.peak_step_bytes(trainer, x, t)["peak_bytes"]
    assert peaks["fadjoint"] <= peaks["sgd"], peaks  # X*^L freed once the top layer read it (it was held before)
    assert (peaks["fadjoint_fused"] < peaks["fadjoint"]) if fused_below else \
        (peaks["fadjoint_fused"] <= peaks["fadjoint"]), peaks


@pytest.mark.parametrize("validate", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_a_residual_nets_step_peak_is_at_most_autograds(validate):
    """Exact byte counts (no timing), torchvision's ResNet-18 on the tape (issue 21's "peak memory ≤ 1.0×"): the
    step hands X*^L to the sweep, which drops it once the top op has read it, and the guard decides the signal's
    finiteness at once instead of holding it (before: 5 120 bytes over autograd's at batch 128, 160 here)."""
    from benchmarks.models import build_resnet18_tv

    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    cfg = dict(lr=0.01, momentum=0.9, foreach=True, validate=validate, graph=True)
    peaks = {}
    for rule in ("sgd", "fadjoint"):
        torch.manual_seed(0)
        trainer = build_trainer(rule, build_resnet18_tv(), cfg)
        trainer.step(x, t)  # momentum buffers exist: a steady-state step
        peaks[rule] = speed.peak_step_bytes(trainer, x, t)["peak_bytes"]
    assert peaks["fadjoint"] <= peaks["sgd"], peaks
