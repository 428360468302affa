"""Where the equilibrium F-adjoint's local rule diverges and SGD does not (issue 22): lr × init × sequential.

    FADJOINT_DATA=/work/shared/datasets python -m benchmarks.equilibrium_stability \\
        --config configs/equilibrium_stability.toml --out benchmarks/results/equilibrium_stability

**Grid.** For every model in ``models`` ("mlp": ``widths`` ReLU MLP; "cnn": ``benchmarks.models``' small_cnn of
``channels``/``kernels``/…), every lr in ``lrs`` and every seed: ``EquilibriumFAdjoint`` with each start ``init``
("zero", "scaled", "forward") × ``sequential`` (True, False) at τ, K = ``tau``, ``steps``, its exact sequential form
(``steps=None``, "exact/seq"), and ``FAdjoint`` (= autograd SGD step for step) as the reference. Every variant of a
(model, seed) starts from the same weights and sees the same batches (the seed draws both): ``epochs`` over the
first ``train_subset`` training images, batch ``batch_size``, mean cross-entropy, momentum ``momentum``. A run
that the rule refuses as non-finite, or whose loss is not finite, is recorded as diverged with the step it
stopped at; the others with their test accuracy (the official test set, or its first ``test_subset`` images).

**Mechanism** (``mechanism = true``, the MLP, seed 0). For the MLP's first layer the sequential update changes the
feedback by exactly ``a = g_seq − g_par``: the drive of layer 1 goes through W² − lr g² instead of W², so (f → 0)

    a = −lr · X⁰ᵀ [(Ỹ² g²) ⊙ σ'(Y¹)] = −lr · ∇_{W¹} ½‖g²‖²   (Ỹ² held fixed, g² = Ỹ²ᵀ X¹)

i.e. the layer-1 update −lr·g_seq adds a gradient *ascent* step of size lr² on ½‖g²‖², the top layer's gradient
norm. At every step of the SGD run and of the sequential run (init "zero") it measures, from the library's own
steps (no formula): ‖a‖ / ‖g_par‖, that ratio / lr (constant if ``a`` is first order in lr, the update's change
second order), how well the closed form above predicts ``a`` (‖a − a_pred‖ / ‖a‖), and the forward start's term
b = g_par(forward) − g_par(zero) beside it (cos(a, b) < 0: it opposes the look-ahead). Writes ``results.json``,
``GRID.md`` (the tables), ``accuracy_vs_lr.png`` and ``mechanism.png`` to ``out``; ``--replot`` rebuilds the
last three from ``out/results.json`` without training.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

import torch_fadjoint as tfa
from torch_fadjoint.optim.equilibrium import equilibrium_grads

from .common import environment, parse_config, pyplot, write_json, write_markdown
from .models import build_model
from .train import DEFAULTS as TRAIN_DEFAULTS
from .train import load_splits

# name -> EquilibriumFAdjoint keyword arguments (None: FAdjoint, the SGD reference)
VARIANTS = {
    "sgd": None,
    "zero/seq": {"init": "zero", "sequential": True},
    "zero/par": {"init": "zero", "sequential": False},
    "scaled/seq": {"init": "scaled", "sequential": True},
    "scaled/par": {"init": "scaled", "sequential": False},
    "forward/seq": {"init": "forward", "sequential": True},
    "forward/par": {"init": "forward", "sequential": False},
    "exact/seq": {"steps": None, "sequential": True},
}

DEFAULTS = {
    "dataset": "mnist", "data_root": "", "download": True,
    "models": ["mlp", "cnn"],
    "widths": [784, 256, 10],
    "channels": [8, 16], "kernels": [5, 3], "strides": [2, 1], "pools": ["max", "avg"], "hidden": [],
    "lrs": [0.01, 0.03, 0.1, 0.3],
    "variants": list(VARIANTS),
    "seeds": [0, 1, 2],
    "train_subset": 20000, "test_subset": 0,
    "batch_size": 128, "epochs": 1, "momentum": 0.0,
    "tau": 0.1, "steps": 100,
    "mechanism": True, "mechanism_steps": 0,  # 0: every step of the epoch
    "threads": 1,
    "replot": False,  # rebuild GRID.md and the plots from out/results.json, no training
    "out": "runs/equilibrium_stability",
}

MODEL_CFG = {"mlp": {"model": "mlp"}, "cnn": {"model": "small_cnn"}}


def _model_cfg(cfg: dict, name: str) -> dict:
    keys = ("widths", "channels", "kernels", "strides", "pools", "hidden", "dataset", "data_root", "download",
            "train_subset", "test_subset")
    return {**TRAIN_DEFAULTS, **{k: cfg[k] for k in keys}, **MODEL_CFG[name], "validation": 0}


def make_optimizer(net, variant: str, lr: float, cfg: dict):
    kwargs = VARIANTS[variant]
    common = dict(lr=lr, momentum=cfg["momentum"], loss="cross_entropy")
    if kwargs is None:
        return tfa.optim.FAdjoint(net, **common)
    return tfa.optim.EquilibriumFAdjoint(net, **common, **{"tau": cfg["tau"], "steps": cfg["steps"], **kwargs})


@torch.no_grad()
def test_accuracy(model, split, batch_size: int = 4096) -> float:
    correct = sum((model(x).argmax(1) == t).sum().item() for x, t in split.batches(batch_size, shuffle=False))
    return correct / len(split)


def run_one(mcfg: dict, splits: dict, variant: str, lr: float, seed: int, cfg: dict) -> dict:
    torch.manual_seed(seed)
    model = build_model(mcfg)
    net = tfa.FPropagation(model)
    opt = make_optimizer(net, variant, lr, cfg)
    gen = torch.Generator().manual_seed(seed)
    losses, step, start = [], 0, time.perf_counter()
    record = {"variant": variant, "lr": lr, "seed": seed, "diverged": False, "diverged_step": None}
    for _ in range(cfg["epochs"]):
        for x, t in splits["train"].batches(cfg["batch_size"], generator=gen):
            with torch.no_grad():
                net(x)
            try:
                loss = float(opt.step(target=t))
            except RuntimeError as exc:
                if "non-finite" not in str(exc):
                    raise
                record.update(diverged=True, diverged_step=step, error=str(exc).splitlines()[0][:200])
                break
            if not math.isfinite(loss):
                record.update(diverged=True, diverged_step=step, error=f"loss {loss}")
                break
            losses.append(loss)
            step += 1
        if record["diverged"]:
            break
    record["steps"] = step
    record["seconds"] = time.perf_counter() - start
    record["losses"] = losses
    record["test_acc"] = None if record["diverged"] else test_accuracy(model, splits["test"])
    return record


def _layer1_grads(model, net, x, t, cfg: dict, lr: float) -> dict:
    """At the model's current weights and the batch (x, t), layer 1's weight feedback from the library:
    g_par (zero start, non-sequential), g_fwd (forward start, non-sequential), g_seq (zero start, sequential:
    a real step on a copy), and the closed-form prediction of g_seq − g_par. Nothing of ``model`` changes."""
    lin = [m for m in model if isinstance(m, torch.nn.Linear)]
    w1, w2 = lin[0].weight, lin[1].weight
    loss_fn = tfa.losses.get_loss("cross_entropy")
    with torch.no_grad():
        net(x)
    _, out_adj = loss_fn(net.output, t, reduction="mean")
    x0 = x.reshape(len(x), -1)
    with torch.no_grad():
        y1 = lin[0](x0)
        x1 = torch.relu(y1)
        g2 = out_adj.T @ x1
        drive = out_adj @ (w2 - lr * g2) - out_adj @ w2  # the look-ahead's change of layer 1's drive
        a_pred = (drive * (y1 > 0)).T @ x0
    g_par = equilibrium_grads(net, out_adj, tau=cfg["tau"], steps=cfg["steps"], init="zero")[w1]
    with torch.no_grad():
        net(x)
    g_fwd = equilibrium_grads(net, out_adj, tau=cfg["tau"], steps=cfg["steps"], init="forward")[w1]
    twin = copy.deepcopy(model)
    twin_net = tfa.FPropagation(twin)
    opt = tfa.optim.EquilibriumFAdjoint(twin_net, lr=lr, loss="cross_entropy", tau=cfg["tau"], steps=cfg["steps"],
                                        init="zero", sequential=True)
    with torch.no_grad():
        twin_net(x)
    opt.step(target=t)
    g_seq = [m for m in twin if isinstance(m, torch.nn.Linear)][0].weight.grad
    return {"g_par": g_par, "g_fwd": g_fwd, "g_seq": g_seq, "a_pred": a_pred, "g2_norm": g2.norm().item(),
            "x1_norm": x1.norm(dim=1).mean().item()}


def mechanism(cfg: dict, splits: dict, mcfg: dict) -> dict:
    """Per step along the SGD run and the sequential (zero start) run of the MLP, seed 0, at every lr."""
    out = {}
    for lr in cfg["lrs"]:
        for trajectory in ("sgd", "zero/seq"):
            torch.manual_seed(0)
            model = build_model(mcfg)
            net = tfa.FPropagation(model)
            opt = make_optimizer(net, trajectory, lr, cfg)
            gen = torch.Generator().manual_seed(0)
            rows = []
            for step, (x, t) in enumerate(splits["train"].batches(cfg["batch_size"], generator=gen)):
                if cfg["mechanism_steps"] and step >= cfg["mechanism_steps"]:
                    break
                try:
                    g = _layer1_grads(model, net, x, t, cfg, lr)
                except RuntimeError as exc:  # the weights already blew up: the step would be refused too
                    if "non-finite" not in str(exc):
                        raise
                    break
                a, b, gp = g["g_seq"] - g["g_par"], g["g_fwd"] - g["g_par"], g["g_par"]
                ratio = (a.norm() / gp.norm()).item()
                rows.append({"step": step, "a_rel": ratio, "a_rel_per_lr": ratio / lr,
                             "pred_err": ((a - g["a_pred"]).norm() / a.norm()).item(),
                             "b_rel": (b.norm() / gp.norm()).item(),
                             "cos_ab": (a.flatten() @ b.flatten() / (a.norm() * b.norm())).item(),
                             "g2_norm": g["g2_norm"], "x1_norm": g["x1_norm"], "w1_norm": model[1].weight.norm().item()})
                with torch.no_grad():
                    net(x)
                try:
                    loss = float(opt.step(target=t))
                except RuntimeError as exc:
                    if "non-finite" not in str(exc):
                        raise
                    break
                rows[-1]["loss"] = loss
                if not math.isfinite(loss):
                    break
            out[f"{trajectory}@{lr}"] = rows
    return out


def _cell(runs: list[dict]) -> str:
    done = [r["test_acc"] for r in runs if not r["diverged"]]
    div = [r["diverged_step"] for r in runs if r["diverged"]]
    parts = []
    if done:
        t = torch.tensor(done)
        parts.append(f"{t.mean():.4f}" + (f" ± {t.std():.4f}" if len(done) > 1 else ""))
    if div:
        parts.append(f"**div {len(div)}/{len(runs)}** (step {min(div)}" + (f"–{max(div)})" if max(div) != min(div) else ")"))
    return "; ".join(parts)


def _trains_where_sgd(runs: list[dict], variant: str, margin: float = 0.02) -> list[str]:
    """(model, lr, seed) cells where SGD finished with > 0.5 test acc but ``variant`` diverged or ended more than
    ``margin`` below it."""
    by = {(r["model"], r["lr"], r["seed"], r["variant"]): r for r in runs}
    misses = []
    for (model, lr, seed, v), sgd in by.items():
        if v != "sgd" or sgd["diverged"] or sgd["test_acc"] <= 0.5 or (model, lr, seed, variant) not in by:
            continue
        other = by[(model, lr, seed, variant)]
        if other["diverged"] or other["test_acc"] < sgd["test_acc"] - margin:
            misses.append(f"{model} lr {lr} seed {seed}")
    return misses


def _finite_mean(values: list[float]) -> float:
    kept = [v for v in values if math.isfinite(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _finite_max(values: list[float]) -> float:
    kept = [v for v in values if math.isfinite(v)]
    return max(kept) if kept else float("nan")


def report(cfg: dict, runs: list[dict], mech: dict, env: dict, out: Path) -> None:
    lines = ["# Equilibrium F-adjoint stability grid (issue 22)", "",
             f"Command: `{cfg['command']}`", "",
             f"{cfg['dataset']}, the first {cfg['train_subset'] or 'all'} training images, {cfg['epochs']} epoch(s), batch "
             f"{cfg['batch_size']}, mean cross-entropy, momentum {cfg['momentum']}, τ = {cfg['tau']}, K = {cfg['steps']} "
             f"(f = {(1 - cfg['tau']) ** cfg['steps']:.2e}); test accuracy on "
             f"{'the first ' + str(cfg['test_subset']) if cfg['test_subset'] else 'all 10 000'} test images; seeds "
             f"{cfg['seeds']}. Cells: mean ± std of the finished runs' test accuracy; **div n/m (step …)**: n of m "
             f"seeds refused as non-finite, at that step (0-based). `sgd` is `FAdjoint` (= autograd SGD step for step); "
             f"`exact/seq` is steps=None, sequential. {env['device_name']}, torch {env['torch']}, {env['threads']} "
             f"thread(s), CPU capability {env['cpu_capability']}.", ""]
    for model in cfg["models"]:
        lines += [f"## {model}", "", "| variant | " + " | ".join(f"lr {lr}" for lr in cfg["lrs"]) + " |",
                  "|---|" + "---|" * len(cfg["lrs"])]
        for v in cfg["variants"]:
            cells = [_cell([r for r in runs if r["model"] == model and r["variant"] == v and r["lr"] == lr])
                     for lr in cfg["lrs"]]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Which variant trains wherever SGD does", "",
              "A (model, lr, seed) cell counts as a miss where SGD finished above 0.5 test accuracy and the variant "
              "diverged or finished more than 0.02 below it.", "", "| variant | misses |", "|---|---|"]
    for v in cfg["variants"]:
        if v != "sgd":
            misses = _trains_where_sgd(runs, v)
            lines.append(f"| {v} | {len(misses)}" + (f": {', '.join(misses)}" if misses else "") + " |")
    lines.append("")
    if mech:
        lines += ["## Mechanism (MLP, seed 0, layer 1)", "",
                  "a = g_seq − g_par (zero start), measured from the library's steps; b = g_par(forward) − g_par(zero). "
                  "Means over the steps of each run (until it stops; non-finite values left out); `pred err` = ‖a − a_pred‖/‖a‖ for "
                  "a_pred = −lr·X⁰ᵀ[(Ỹ² g²) ⊙ σ'(Y¹)] = −lr·∇_{W¹} ½‖g²‖².", "",
                  "| run | lr | steps measured | ‖a‖/‖g‖ | ‖a‖/(lr‖g‖) | first step ‖a‖ > ‖g‖ | pred err (max) | ‖b‖/‖g‖ | cos(a, b) | ‖g²‖ first → last | mean ‖X¹‖ first → last |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, rows in mech.items():
            if not rows:
                continue
            traj, lr = key.split("@")
            mean = {k: _finite_mean([r[k] for r in rows]) for k in ("a_rel", "a_rel_per_lr", "b_rel", "cos_ab")}
            over = next((r["step"] for r in rows if not r["a_rel"] <= 1.0), None)
            lines.append(f"| {traj} | {lr} | {len(rows)} | {mean['a_rel']:.3g} | {mean['a_rel_per_lr']:.3g} | "
                         f"{'–' if over is None else over} | {_finite_max([r['pred_err'] for r in rows]):.1e} | "
                         f"{mean['b_rel']:.3g} | {mean['cos_ab']:.2f} | "
                         f"{rows[0]['g2_norm']:.3g} → {rows[-1]['g2_norm']:.3g} | "
                         f"{rows[0]['x1_norm']:.3g} → {rows[-1]['x1_norm']:.3g} |")
        lines.append("")
    write_markdown(out, "GRID.md", lines)


def plots(cfg: dict, runs: list[dict], mech: dict, out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(cfg["models"]), figsize=(6 * len(cfg["models"]), 4.5), squeeze=False)
    styles = {"sgd": ("k", "o", "-"), "exact/seq": ("tab:purple", "s", ":")}
    colours = {"zero": "tab:blue", "scaled": "tab:orange", "forward": "tab:green"}
    for ax, model in zip(axes[0], cfg["models"]):
        for v in cfg["variants"]:
            colour, marker, line = styles.get(v, (colours.get(v.split("/")[0]), "o" if v.endswith("seq") else "^",
                                                  "-" if v.endswith("seq") else "--"))
            means, lost = [], []
            for lr in cfg["lrs"]:
                rs = [r for r in runs if r["model"] == model and r["variant"] == v and r["lr"] == lr]
                accs = [0.0 if r["diverged"] else r["test_acc"] for r in rs]  # a diverged run counts as 0
                means.append(sum(accs) / len(accs) if accs else float("nan"))
                lost.append(any(r["diverged"] for r in rs))
            ax.plot(cfg["lrs"], means, color=colour, marker=marker, linestyle=line, label=v)
            ax.scatter([lr for lr, d in zip(cfg["lrs"], lost) if d], [m for m, d in zip(means, lost) if d],
                       color=colour, marker="x", s=80, zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("lr")
        ax.set_ylabel("test acc. (mean of seeds; diverged = 0, ×)")
        ax.set_title(f"{model}: {cfg['dataset']}, {cfg['train_subset']} images, {cfg['epochs']} epoch, momentum {cfg['momentum']}")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_lr.png", dpi=110)
    plt.close(fig)
    if not mech:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, rows in mech.items():
        traj, lr = key.split("@")
        line = "-" if traj == "sgd" else "--"
        axes[0].plot([r["step"] for r in rows], [r["a_rel_per_lr"] for r in rows], line, label=f"{traj} lr {lr}")
        axes[1].plot([r["step"] for r in rows], [r["g2_norm"] for r in rows], line, label=f"{traj} lr {lr}")
    axes[0].set_ylabel("‖g_seq − g_par‖ / (lr ‖g_par‖), layer 1")
    axes[1].set_ylabel("‖g²‖ (top layer's gradient)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "mechanism.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    cfg = parse_config(DEFAULTS, __doc__.splitlines()[0], argv)
    torch.set_num_threads(cfg["threads"] or 1)
    unknown = sorted(set(cfg["variants"]) - set(VARIANTS)) + sorted(set(cfg["models"]) - set(MODEL_CFG))
    if unknown:
        raise SystemExit(f"error: unknown variants/models {unknown}; variants: {list(VARIANTS)}, models: {list(MODEL_CFG)}")
    out = Path(cfg["out"])
    if cfg["replot"]:
        payload = json.loads((out / "results.json").read_text())
        saved = {**payload["config"], "command": payload["config"]["command"]}
        report(saved, payload["runs"], payload["mechanism"], payload["environment"], out)
        plots(saved, payload["runs"], payload["mechanism"], out)
        return payload
    env = environment(torch.device("cpu"))
    runs, mech, start = [], {}, time.perf_counter()
    for model in cfg["models"]:
        mcfg = _model_cfg(cfg, model)
        splits = load_splits(mcfg, torch.device("cpu"))
        for lr in cfg["lrs"]:
            for v in cfg["variants"]:
                for seed in cfg["seeds"]:
                    r = run_one(mcfg, splits, v, lr, seed, cfg)
                    runs.append({"model": model, **r})
                    state = f"diverged at step {r['diverged_step']}" if r["diverged"] else f"test acc {r['test_acc']:.4f}"
                    print(f"{model} lr {lr} {v:12s} seed {seed}: {state} ({r['seconds']:.1f} s)", flush=True)
        if cfg["mechanism"] and model == "mlp":
            mech = mechanism(cfg, splits, mcfg)
    payload = {"config": cfg, "environment": env, "seconds": time.perf_counter() - start, "runs": runs,
               "mechanism": mech}
    write_json(out / "results.json", payload)
    report(cfg, runs, mech, env, out)
    plots(cfg, runs, mech, out)
    print((out / "GRID.md").read_text())
    return payload


if __name__ == "__main__":
    main()
