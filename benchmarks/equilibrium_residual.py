"""How far one equilibrium F-adjoint gradient is from backprop's, per layer, on real batches (docs/maths.md §2.2-§2.4).

    python -m benchmarks.equilibrium_residual --config configs/equilibrium_reference.toml
    python -m benchmarks.equilibrium_residual --config configs/equilibrium_modern.toml

From the config's initial weights (seed 0) and its first ``batches`` training batches: the relative
difference ‖g_eq − g_bp‖ / ‖g_bp‖ of every weight gradient for the finite relaxation (τ, K of the config;
non-sequential, so only the relaxation differs), and for the reference quirk (σ'(D) on the output delta,
the effective step it implies: ‖g_quirk‖ / ‖g_bp‖). No training.
"""
from __future__ import annotations

import torch

import torch_fadjoint as tfa
from torch_fadjoint.optim.equilibrium import equilibrium_grads
from torch_fadjoint.optim.fadjoint import fadjoint_grads

from .common import DTYPES, build_mlp, parse_config
from .rules import _rule_loss
from .train import DEFAULTS as TRAIN_DEFAULTS
from .train import load_splits

DEFAULTS = {**TRAIN_DEFAULTS, "batches": 20, "select_epochs": 0, "thresholds": [0.97, 0.85]}


def main(argv=None) -> dict:
    cfg = parse_config(DEFAULTS, __doc__.splitlines()[0], argv)
    torch.set_num_threads(cfg["threads"] or 1)
    steps = None if cfg["steps"] < 0 else cfg["steps"]
    loss_fn = tfa.losses.get_loss(_rule_loss(cfg))
    out = {}
    for dataset in cfg["datasets"] or [cfg["dataset"]]:
        splits = load_splits({**cfg, "dataset": dataset, "validation": 0}, torch.device("cpu"))
        torch.manual_seed(0)
        model = build_mlp(cfg["widths"], cfg["activation"], cfg["output_activation"], cfg["init"]).to(DTYPES["float64"])
        net = tfa.FPropagation(model)
        weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
        rel = {"relaxation": [], "quirk_scale": []}
        gen = torch.Generator().manual_seed(0)
        for i, (x, t) in enumerate(splits["train"].batches(cfg["batch_size"], generator=gen)):
            if i == cfg["batches"]:
                break
            grads = {}
            for name, kwargs in (("bp", None), ("eq", {}), ("quirk", {"steps": None, "reference_output_derivative": True})):
                with torch.no_grad():
                    net(x.double())
                _, out_adj = loss_fn(net.output, t, reduction=cfg["reduction"])
                if kwargs is None:
                    by_param = fadjoint_grads(net, out_adj)
                else:
                    by_param = equilibrium_grads(net, out_adj, **{"tau": cfg["tau"], "steps": steps, **kwargs})
                grads[name] = [by_param[w] for w in weights]  # layers 1..L
            rel["relaxation"].append([((e - b).norm() / b.norm()).item() for e, b in zip(grads["eq"], grads["bp"])])
            rel["quirk_scale"].append([(q.norm() / b.norm()).item() for q, b in zip(grads["quirk"], grads["bp"])])
        mean = {k: torch.tensor(v).mean(0).tolist() for k, v in rel.items()}
        out[dataset] = mean
        print(f"{dataset} ({'x'.join(map(str, cfg['widths']))}, {cfg['loss']}/{cfg['reduction']}, tau {cfg['tau']}, "
              f"K {steps}; mean over {cfg['batches']} batches, layers 1..L):")
        print("  ||g_eq - g_bp|| / ||g_bp||  (finite relaxation): " + ", ".join(f"{v:.2e}" for v in mean["relaxation"]))
        print("  ||g_quirk|| / ||g_bp||      (sigma'(D) factor):   " + ", ".join(f"{v:.4f}" for v in mean["quirk_scale"]))
    return out


if __name__ == "__main__":
    main()
