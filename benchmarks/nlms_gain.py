"""The gain of an η = 1 consequentialism / NLMS step, per weight-op kind (docs/maths.md §7.3, issue 22).

For each weight op k of a model recorded on the tape (``FPropagation(model, graph=True)``), with Δ_k the F-adjoint
at its output (the batch-mean loss) and G_k the rule's feedback for its parameters, one plain step of that op alone,
θ_k ← θ_k − G_k (η = 1), moves its output by ΔY_k = −J_θ G_k (the op is affine in its parameters: ΔY_k is the op
run with G_k in place of its weight and bias). §4 promises ΔY_k = −B Δ_k (each sample moves by its own delta):

    projected gain   γ_k = ⟨ΔY_k, −B Δ_k⟩ / ‖B Δ_k‖²         1: the step removes the error along its own direction
    magnitude        ρ_k = ‖ΔY_k‖ / ‖B Δ_k‖
    top gain         λ_k = the largest eigenvalue of D ↦ J_θ G_k(D) / B (power iteration over output adjoints D;
                     the energies and δ are this batch's): a quadratic loss on Y_k with unit Hessian is stable
                     under plain steps for 0 < η < 2 / λ_k, along Δ_k's own direction for 0 < η < 2 / γ_k

at initialisation and after ``warm_steps`` F-adjoint SGD steps, over ``seeds`` × ``batches``, for positions="sum"
(§6.5 as written) and "mean" (G ÷ P, P the op's positions per sample). Then a short training check: every model
trained ``train_steps`` plain steps by ``Consequentialism`` at each η, both positions; "diverged" = a non-finite
or > 10 × initial loss.

    FADJOINT_DATA=/work/shared/datasets python -m benchmarks.nlms_gain --out benchmarks/results/nlms_gain
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint.rules.consequentialism import ConsequentialismGraphRule
from torch_fadjoint.tape_sweep import FADJOINT

from .common import environment, parse_config, write_json, write_markdown

DEFAULTS = {
    "dataset": "mnist", "data_root": "", "download": False, "subset": 4096,
    "models": ["mlp", "cnn", "cnn_bn", "tokens"], "modes": ["nlms", "consequentialism"],
    "batch": 64, "seeds": [0, 1], "batches": 1, "power_iterations": 20, "warm_steps": 100, "warm_lr": 0.05, "warm_momentum": 0.9,
    "train_steps": 60, "train_lrs": [0.1, 0.5, 1.0, 2.0], "threads": 2, "out": "runs/nlms_gain",
}


class TokenMixer(nn.Module):
    """An image as 28 tokens of 28 pixels: x @ W (a matmul with a parameter, 28 positions), ReLU, x @ W2, a mean."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(28, 64) / math.sqrt(28))
        self.w2 = nn.Parameter(torch.randn(64, 64) / math.sqrt(64))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        t = x.reshape(x.shape[0], 28, 28)
        h = torch.relu(t @ self.w1)
        h = torch.relu(h @ self.w2) + h
        return self.head(h.mean(1))


class SmallCNN(nn.Module):
    """conv(1→16) → [BN] → ReLU → conv(16→32) → [BN] → ReLU (+ a 1×1 skip) → max pool 2 → Linear(32·14·14 → 10)."""

    def __init__(self, bn: bool):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.b1, self.b2 = (nn.BatchNorm2d(16), nn.BatchNorm2d(32)) if bn else (nn.Identity(), nn.Identity())
        self.skip = nn.Conv2d(16, 32, 1, bias=False)
        self.fc = nn.Linear(32 * 14 * 14, 10)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x.reshape(-1, 1, 28, 28))))
        h = torch.relu(self.b2(self.c2(h))) + self.skip(h)
        return self.fc(F.max_pool2d(h, 2).flatten(1))


def build(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if name == "tokens":
        return TokenMixer()
    return SmallCNN(bn=name == "cnn_bn")


class Probe(ConsequentialismGraphRule):
    """The rule, measuring each weight op it normalises while its records are still there."""

    def __init__(self, *args, iterations: int = 30, **kwargs):
        super().__init__(*args, **kwargs)
        self.iterations, self.found = iterations, []

    def through_op(self, tape, op, out_adj):
        found = super().through_op(tape, op, out_adj)
        params = [key for key, (k, _) in op.inputs.items() if k == "param" and key in op.needed]
        if getattr(op.entry, "nlms", None) is None or not params:
            return found
        move = self._move(op, {key: found[key] for key in params})
        target = self.batch * out_adj
        gamma = (move * target).sum() / target.pow(2).sum()
        rho = move.norm() / target.norm()
        d = torch.randn_like(out_adj)
        lam = torch.zeros(())
        for _ in range(self.iterations):  # the top eigenvalue of D ↦ J_θ G(D) / B (the map is similar to a PSD one)
            d = d / d.norm()
            grads = super().through_op(tape, op, d)
            md = self._move(op, {key: grads[key] for key in params}) / self.batch
            lam = (md * d).sum()
            d = md
        self.found.append({"op": f"{op.entry.name} in {op.where}", "kind": op.entry.nlms, "gamma": gamma.item(),
                           "rho": rho.item(), "lambda": lam.item(), "positions": self._positions(op, out_adj)})
        return found

    def _positions(self, op, out_adj) -> float:
        weight = op.saved[2] if op.entry.nlms in ("linear", "conv") else (
            op.saved[3] if op.inputs.get(op.saved[2], ("",))[0] == "param" else op.saved[1])
        contracted = {"linear": lambda: weight.shape[1], "conv": lambda: weight[0].numel(),
                      "matmul": lambda: weight.shape[-2]}[op.entry.nlms]()
        return out_adj.numel() * contracted / (weight.numel() * self.batch)

    def _move(self, op, grads):
        """J_θ G: the op's output change per unit step, the op run with G in place of its parameters."""
        kind = op.entry.nlms
        if kind in ("linear", "conv"):
            keys = dict(op.saved[0])
            g_w, g_b = grads.get(keys.get("weight")), grads.get(keys.get("bias"))
            x = op.saved[1]
            if kind == "linear":
                return F.linear(x, g_w if g_w is not None else torch.zeros_like(op.saved[2]), g_b)
            stride, padding, dilation, _, groups = op.saved[4]
            pad = op.saved[5]
            x = x if pad is None else F.pad(x, pad)
            conv = (F.conv1d, F.conv2d, F.conv3d)[op.entry.n - 1]
            return conv(x, g_w if g_w is not None else torch.zeros_like(op.saved[2]), g_b, stride, padding, dilation,
                        groups)
        ka, a, kb, b = op.saved
        return a @ grads[kb] if kb in grads else grads[ka] @ b


def measure(model: nn.Module, x, t, mode: str, positions: str, iterations: int) -> list[dict]:
    net = tfa.FPropagation(model, graph=True)
    out = net(x)
    _, out_adj = tfa.losses.cross_entropy(out, t)
    probe = Probe(mode, None, 1e-3, positions, out.shape[0], iterations=iterations)
    with torch.no_grad():
        net.graph_grads(out_adj, rule=probe)
    net.remove()
    return probe.found


def warm(model: nn.Module, data, cfg: dict, gen) -> None:
    net = tfa.FPropagation(model, graph=True)
    opt = tfa.optim.FAdjoint(net, lr=cfg["warm_lr"], momentum=cfg["warm_momentum"])  # 0.9 (the default) killed cnn_bn's ReLUs (REPORT.md)
    for _ in range(cfg["warm_steps"]):
        idx = torch.randint(0, len(data[0]), (cfg["batch"],), generator=gen)
        net(data[0][idx])
        opt.step(target=data[1][idx])
    net.remove()


def train_check(name: str, data, cfg: dict, mode: str, positions: str, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build(name)
    net = tfa.FPropagation(model, graph=True)
    opt = tfa.optim.Consequentialism(net, lr=lr, mode=mode, positions=positions, validate=False)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(cfg["train_steps"]):
        idx = torch.randint(0, len(data[0]), (cfg["batch"],), generator=gen)
        net(data[0][idx])
        losses.append(float(opt.step(target=data[1][idx])))
        if not math.isfinite(losses[-1]) or losses[-1] > 10 * losses[0]:
            break
    diverged = not math.isfinite(losses[-1]) or losses[-1] > 10 * losses[0]
    last = losses[-10:]
    return {"model": name, "mode": mode, "positions": positions, "lr": lr, "seed": seed, "diverged": diverged,
            "steps": len(losses), "first_loss": losses[0], "last_loss": sum(last) / len(last)}


def _stats(values):
    values = sorted(values)
    return sum(values) / len(values), values[0], values[-1]


def report(cfg: dict, gains: list[dict], runs: list[dict], env: dict, out: Path) -> None:
    lines = ["# The gain of an η = 1 consequentialism / NLMS step, per weight-op kind", "",
             f"`{cfg['command']}`", "",
             f"{env['device']}, torch {env['torch']}, {cfg['dataset']} ({cfg['subset']} training images), batch "
             f"{cfg['batch']}, seeds {cfg['seeds']} × {cfg['batches']} batches, float32, δ = 1e-3 · mean ‖x̃‖². "
             "Definitions: benchmarks/nlms_gain.py's docstring and docs/maths.md §7.3. γ: projected gain along the "
             "op's own −BΔ; ρ: ‖ΔY‖/‖BΔ‖; λ: top gain over all output adjoints (plain steps on that op's output are "
             "stable for 0 < η < 2/λ). Mean [min, max] over seeds, batches and the ops of that kind.", ""]
    for state in ("init", "warm"):
        title = "At initialisation" if state == "init" else f"After {cfg['warm_steps']} F-adjoint SGD steps (lr {cfg['warm_lr']}, momentum {cfg['warm_momentum']})"
        lines += [f"## {title}", "", "| model | op kind | P | mode | positions | γ | ρ | λ | 2/λ |", "|---|---|---|---|---|---|---|---|---|"]
        groups: dict = {}
        for g in gains:
            if g["state"] == state:
                groups.setdefault((g["model"], g["label"], g["mode"], g["positions_option"]), []).append(g)
        for (model, label, mode, positions), rows in groups.items():
            gm, glo, ghi = _stats([r["gamma"] for r in rows])
            rm, _, _ = _stats([r["rho"] for r in rows])
            lm, llo, lhi = _stats([r["lambda"] for r in rows])
            p = sorted({round(r["positions"], 2) for r in rows})
            lines.append(f"| {model} | {label} | {', '.join(f'{v:g}' for v in p)} | {mode} | {positions} | {gm:.3g} "
                         f"[{glo:.3g}, {ghi:.3g}] | {rm:.3g} | {lm:.3g} [{llo:.3g}, {lhi:.3g}] | {2 / lhi:.3g} |")
        lines.append("")
    lines += [f"## Training check: {cfg['train_steps']} plain steps (SGD, no momentum), seed {cfg['seeds'][0]}", "",
              "Mean loss of the last 10 steps (initial ≈ 2.3); `div@n`: non-finite or > 10 × the first loss at step n.",
              "", "| model | mode | positions | " + " | ".join(f"η = {lr:g}" for lr in cfg["train_lrs"]) + " |",
              "|---|---|---|" + "---|" * len(cfg["train_lrs"])]
    cells: dict = {}
    for r in runs:
        cells.setdefault((r["model"], r["mode"], r["positions"]), {})[r["lr"]] = (
            f"div@{r['steps']}" if r["diverged"] else f"{r['last_loss']:.3f}")
    for (model, mode, positions), by_lr in cells.items():
        lines.append(f"| {model} | {mode} | {positions} | " + " | ".join(by_lr.get(lr, "") for lr in cfg["train_lrs"])
                     + " |")
    write_markdown(out, "REPORT.md", lines)


def label_of(model: str, row: dict) -> str:
    kind = row["kind"]
    if kind == "conv":
        return "conv + BN" if model == "cnn_bn" and "skip" not in row["op"] else "conv"
    if kind == "linear":
        return "linear"
    return "matmul x @ W"


def main(argv=None) -> dict:
    cfg = parse_config(DEFAULTS, __doc__.splitlines()[0], argv)
    torch.set_num_threads(cfg["threads"] or 1)
    env = environment(torch.device("cpu"))
    splits = tfa.data.load(cfg["dataset"], cfg["data_root"] or None, download=cfg["download"])
    data = (splits["train"].x[:cfg["subset"]], splits["train"].t[:cfg["subset"]])
    gains, start = [], time.perf_counter()
    for name in cfg["models"]:
        for seed in cfg["seeds"]:
            torch.manual_seed(seed)
            model = build(name)
            gen = torch.Generator().manual_seed(1000 + seed)
            for state in ("init", "warm"):
                if state == "warm":
                    warm(model, data, cfg, gen)
                for _ in range(cfg["batches"]):
                    idx = torch.randint(0, len(data[0]), (cfg["batch"],), generator=gen)
                    for mode in cfg["modes"]:
                        for positions in ("sum", "mean"):
                            for row in measure(model, data[0][idx], data[1][idx], mode, positions,
                                               cfg["power_iterations"]):
                                gains.append({**row, "model": name, "seed": seed, "state": state, "mode": mode,
                                              "positions_option": positions, "label": label_of(name, row)})
            print(f"{name} seed {seed}: gains measured ({time.perf_counter() - start:.0f} s)", flush=True)
    runs = []
    for name in cfg["models"]:
        for mode in cfg["modes"]:
            for positions in ("sum", "mean"):
                for lr in cfg["train_lrs"]:
                    runs.append(train_check(name, data, cfg, mode, positions, lr, cfg["seeds"][0]))
                    r = runs[-1]
                    print(f"{name} {mode} {positions} η {lr}: {'diverged' if r['diverged'] else r['last_loss']:}",
                          flush=True)
    out = Path(cfg["out"])
    payload = {"config": cfg, "environment": env, "seconds": time.perf_counter() - start, "gains": gains, "runs": runs}
    write_json(out / "results.json", payload)
    report(cfg, gains, runs, env, out)
    print((out / "REPORT.md").read_text())
    return payload


if __name__ == "__main__":
    main()
