"""The equilibrium study's setup (issue 4, docs/maths.md §2.4): every variant of
configs/equilibrium_reference.toml takes exactly the reference code's step.

The oracle is a hand-written transcription of the reference's local update (``Digit_local.py``,
``Fstar_pass_dyn``) in its own layout: samples as columns, the bias folded into W as a last column fed
by a constant 1, the explicit 100-step Euler loops, and the dictionary aliasing that overwrites the stored
output pre-activation with the drive D before σ' is taken (the quirk). Backprop is the same code with
the relaxation removed (``Fstar_pass``: X*^L = X^L − y, α = 0.001 on the batch sum).
"""
import tomllib

import pytest
import torch
import torch.nn.functional as F

from benchmarks import common, train
from benchmarks.rules import build_trainer, half_sse

DT = torch.float64
CONFIG = "configs/equilibrium_reference.toml"


def _reference_cfg() -> dict:
    with open(CONFIG, "rb") as fh:
        loaded = tomllib.load(fh)
    base = {**train.DEFAULTS, **{k: v for k, v in loaded.items() if k in train.DEFAULTS}}
    return base, loaded["variants"]


def _sigmoid_prime(z):
    s = torch.sigmoid(z)
    return s - s * s


def _reference_step(ws, x, y, alpha, *, local, quirk, sequential, steps, tau=0.1):
    """One update of the reference code; ws: folded weights (n_k × (n_{k-1}+1)); x: (n_0 × B); y: one-hot (n_L × B)."""
    ws = [w.clone() for w in ws]
    n_layers = len(ws)
    xs, ys = [torch.cat([x, torch.ones(1, x.shape[1], dtype=DT)])], []
    for k, w in enumerate(ws):
        ys.append(w @ xs[-1])
        act = torch.sigmoid(ys[-1])
        xs.append(act if k == n_layers - 1 else torch.cat([act, torch.ones(1, act.shape[1], dtype=DT)]))
    old = [w.clone() for w in ws]
    top_drive = (xs[-1] - y) * _sigmoid_prime(ys[-1])
    deltas = [None] * n_layers
    for k in reversed(range(n_layers)):
        above = ws if sequential else old
        if k == n_layers - 1:
            drive, start = top_drive, xs[-1]
        else:
            drive, start = above[k + 1].T @ deltas[k + 1], xs[k + 1]
        state = start.clone()
        if not local:
            state = drive
        elif steps is None:
            state = drive
        else:
            for _ in range(steps):
                state = state - tau * (state - drive)
        if k == n_layers - 1:
            deltas[k] = state * _sigmoid_prime(top_drive) if quirk else state
        else:
            deltas[k] = state[:-1] * _sigmoid_prime(ys[k])
        update = deltas[k] @ xs[k].T
        ws[k] = ws[k] - alpha * update  # non-sequential: the drive below reads `old`, so the order does not matter
    return ws


@pytest.mark.parametrize("variant", ["backprop", "equilibrium", "equilibrium_quirk", "backprop_lr_quarter",
                                     "equilibrium_quirk_parallel", "equilibrium_exact", "equilibrium_parallel"])
def test_reference_config_step_equals_hand_written_reference_update(variant):
    """Why: the study claims to run the reference's setup; a wrong loss scale, lr, or quirk would not show."""
    base, variants = _reference_cfg()
    spec = variants[variant]
    cfg = {**base, **{k: v for k, v in spec.items() if k not in ("rule", "grid")}}
    assert cfg["loss"] == "half_sse" and cfg["reduction"] == "sum"
    torch.manual_seed(3)
    model = common.build_mlp([20, 12, 10], cfg["activation"], cfg["output_activation"], cfg["init"]).to(DT)
    x, t = torch.rand(32, 20, dtype=DT), torch.arange(32) % 10
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    ws = [torch.cat([m.weight, m.bias[:, None]], 1).detach().clone() for m in linears]
    rule = spec.get("rule", variant)
    local = rule.startswith("equilibrium")
    steps = cfg["steps"] if cfg["steps"] >= 0 else None
    want = _reference_step(ws, x.T, F.one_hot(t, 10).to(DT).T, 0.001 / (4 if variant == "backprop_lr_quarter" else 1),
                           local=local, quirk=rule == "equilibrium_ref", sequential=cfg["sequential"] and local,
                           steps=steps)
    for w0, w1 in zip(ws, want):
        assert (w1 - w0).abs().max() > 1e-6  # a real step
    trainer = build_trainer(rule, model, cfg)
    trainer.step(x, t)
    for m, w in zip(linears, want):
        torch.testing.assert_close(torch.cat([m.weight, m.bias[:, None]], 1).detach(), w, rtol=0, atol=1e-12)


def test_quirk_changes_the_step_and_equilibrium_is_not_backprop():
    """The oracle itself distinguishes the variants (so the test above can fail)."""
    torch.manual_seed(0)
    ws = [torch.randn(12, 21, dtype=DT) * 0.3, torch.randn(10, 13, dtype=DT) * 0.3]
    x, y = torch.rand(20, 16, dtype=DT), F.one_hot(torch.arange(16) % 10, 10).to(DT).T
    bp = _reference_step(ws, x, y, 1e-3, local=False, quirk=False, sequential=True, steps=100)
    eq = _reference_step(ws, x, y, 1e-3, local=True, quirk=False, sequential=True, steps=100)
    qk = _reference_step(ws, x, y, 1e-3, local=True, quirk=True, sequential=True, steps=100)
    assert (bp[0] - eq[0]).abs().max() > 1e-9
    assert (qk[1] - ws[1]).abs().max() < 0.3 * (eq[1] - ws[1]).abs().max()  # ~σ'(D) ≈ 1/4 of the step


def test_reference_backprop_equals_autograd_sgd():
    """fadjoint with half_sse/sum at α is autograd SGD on ½ Σ‖X^L − y‖² at α (sgd rule, same loss)."""
    base, _ = _reference_cfg()
    torch.manual_seed(1)
    models = [common.build_mlp([20, 12, 10], "sigmoid", "sigmoid", "xavier_normal_folded").to(DT) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    trainers = [build_trainer("fadjoint", models[0], base), build_trainer("sgd", models[1], base)]
    for step in range(3):
        x, t = torch.rand(32, 20, dtype=DT), torch.randint(0, 10, (32,))
        losses = [tr.step(x, t) for tr in trainers]
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-12)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_half_sse_closed_form():
    out, t = torch.tensor([[0.2, 0.7, 0.1], [0.5, 0.5, 0.9]], dtype=DT), torch.tensor([1, 2])
    y = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=DT)
    loss, adj = half_sse(out, t)
    torch.testing.assert_close(adj, out - y)
    torch.testing.assert_close(loss, 0.5 * ((out - y) ** 2).sum())
    loss_mean, adj_mean = half_sse(out, t, reduction="mean")
    torch.testing.assert_close(adj_mean, (out - y) / 2)
    torch.testing.assert_close(loss_mean, loss / 2)
    with pytest.raises(ValueError, match="reduction"):
        half_sse(out, t, reduction="none")


def test_xavier_normal_folded_draws_bias_with_the_reference_std():
    """Reference: W_folded ~ N(0, sqrt(2 / (n_in + n_out))), bias column included (Digit_local.py, "xavier")."""
    torch.manual_seed(0)
    linear = common.build_mlp([784, 400], "sigmoid", "", "xavier_normal_folded")[1]
    want = (2.0 / (784 + 400)) ** 0.5
    assert abs(linear.weight.std().item() / want - 1) < 0.01
    assert abs(linear.bias.std().item() / want - 1) < 0.15  # 400 draws
    assert abs(linear.bias.mean().item()) < 4 * want / 20


def test_train_runs_the_equilibrium_configs(data_root, tmp_path):
    """`python -m benchmarks.train --config configs/equilibrium_*.toml` runs every variant (tiny subset)."""
    for config in ("configs/equilibrium_reference.toml", "configs/equilibrium_modern.toml"):
        results = train.main(["--config", config, "--data-root", str(data_root), "--datasets", "mnist",
                              "--train-subset", "256", "--epochs", "1", "--seeds", "0", "--out", str(tmp_path),
                              "--progress", "false", "--validation", "0"])
        with open(config, "rb") as fh:
            names = set(tomllib.load(fh)["variants"])
        assert {r["variant"] for r in results} == names


def test_pairs_reports_paired_differences(tmp_path):
    """benchmarks.pairs: b − a per seed at the last epoch, max |Δ| over epochs, loss ratio."""
    import json

    from benchmarks import pairs
    runs = tmp_path / "runs"
    runs.mkdir()
    for variant, accs, loss in (("a", [0.5, 0.8], 2.0), ("b", [0.6, 0.7], 1.0)):
        history = [{"epoch": e + 1, "test_acc": acc, "train_loss": loss} for e, acc in enumerate(accs)]
        (runs / f"mnist_{variant}_final_default_seed0.json").write_text(json.dumps({"history": history}))
    text = pairs.main(["--out", str(tmp_path), "--pairs", "a:b"]).read_text()
    assert "| mnist | a → b | [0] | -0.1000 | 0.1000 | 0.500 |" in text
