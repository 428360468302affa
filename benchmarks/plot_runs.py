"""Test accuracy vs epoch of benchmarks.train run files, one curve each.

    python -m benchmarks.plot_runs OUT.png RUN.json [RUN.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import pyplot


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        raise SystemExit(__doc__)
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in args[1:]:
        run = json.loads(Path(name).read_text())
        history = run["history"]
        label = f"{Path(name).stem} (best {max(h['test_acc'] for h in history):.4f})"
        ax.plot([h["epoch"] for h in history], [h["test_acc"] for h in history], label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args[0], dpi=100)


if __name__ == "__main__":
    main()
