"""Paired differences between variants of a ``benchmarks.compare`` run directory (same seed = same initial
weights and the same batches, so the difference of two runs isolates the rule).

    python -m benchmarks.pairs --out benchmarks/results/equilibrium_reference \\
        --pairs backprop:equilibrium,backprop_lr_quarter:equilibrium_quirk

For each data set and pair ``a:b`` and each seed both ran: the test accuracy of b minus a's at the last
epoch, the largest |Δ| over the epochs, and the ratio of final training losses. Writes ``PAIRS.md`` in ``out``.
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from .common import parse_config

DEFAULTS = {"out": "runs/equilibrium_reference", "pairs": ["backprop:equilibrium"]}
_RUN = re.compile(r"^(?P<dataset>mnist|fashion_mnist)_(?P<variant>.+)_final_(?P<tag>.+)_seed(?P<seed>\d+)\.json$")


def load_runs(out: Path) -> dict:
    """{(dataset, variant): {seed: history}} from ``out/runs``."""
    runs: dict = {}
    for path in sorted((out / "runs").glob("*_final_*.json")):
        match = _RUN.match(path.name)
        if match:
            key = (match["dataset"], match["variant"])
            runs.setdefault(key, {})[int(match["seed"])] = json.loads(path.read_text())["history"]
    return runs


def pair_rows(runs: dict, pairs: list[str]) -> list[str]:
    lines = ["| data set | a → b | seeds | Δ test acc, last epoch (b − a) | max |Δ test acc| over epochs | "
             "final train loss b / a |", "|---|---|---|---|---|---|"]
    for dataset in ("mnist", "fashion_mnist"):
        for pair in pairs:
            a, b = pair.split(":")
            ra, rb = runs.get((dataset, a), {}), runs.get((dataset, b), {})
            seeds = sorted(set(ra) & set(rb))
            if not seeds:
                continue
            last = [rb[s][-1]["test_acc"] - ra[s][-1]["test_acc"] for s in seeds]
            worst = max(abs(hb["test_acc"] - ha["test_acc"]) for s in seeds for ha, hb in zip(ra[s], rb[s]))
            ratio = statistics.fmean(rb[s][-1]["train_loss"] / ra[s][-1]["train_loss"] for s in seeds)
            lines.append(f"| {dataset} | {a} → {b} | {seeds} | {' '.join(f'{d:+.4f}' for d in last)} | "
                         f"{worst:.4f} | {ratio:.3f} |")
    return lines


def main(argv=None) -> Path:
    cfg = parse_config(DEFAULTS, __doc__.splitlines()[0], argv)
    out = Path(cfg["out"])
    lines = [f"# Paired differences ({out.name})", "", f"Command: `{cfg['command']}`", "",
             *pair_rows(load_runs(out), cfg["pairs"]), ""]
    path = out / "PAIRS.md"
    path.write_text("\n".join(lines))
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
