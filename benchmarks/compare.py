"""Every learning rule × MNIST / Fashion-MNIST against autograd SGD: one command, one report (issue 7).

    python -m benchmarks.compare --config configs/compare.toml [--quick] [--resume]

For each data set and each rule variant of ``[variants.*]`` in the config: the learning rate (and the
variant's own knob, if it lists one) is picked on a validation split carved from train, by the
validation accuracy after ``select_epochs`` epochs from seed 0; then the variant is trained for
``epochs`` epochs from every seed and tested on the official test set. Each finished run is written to
``<out>/runs/`` as it completes; ``--resume`` reuses those files. ``REPORT.md`` and the PNG plots in
``<out>`` are rebuilt from the run files at the end.

A variant's own ``datasets`` runs it on those data sets only. ``reuse_selection = true``: where a variant's final
epochs equal ``select_epochs``, its seed-0 final run is the chosen setting's selection run (the same seed, data,
split and epochs: the same run), read instead of repeated.

``stop_after_s`` > 0: no run starts once that many seconds have passed (a run in progress finishes); what
finished is reported (a variant whose selection is incomplete, or with no finished final run, is listed as
not run) and ``--resume`` continues from there (``benchmarks.gpu`` runs the protocol in its time left).

``model`` picks the network (``benchmarks/models.py``; ``configs/compare_cnn.toml``: the small CNN). ``beside``
names another compare's ``summary.json`` (e.g. the MLP's, ``benchmarks/results/compare/summary.json``): its
test accuracy per variant and data set is shown in a column beside this run's.
"""
from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .common import environment, parse_config, pyplot, write_json, write_markdown
from .models import describe
from .train import DEFAULTS as TRAIN_DEFAULTS
from .train import load_splits, run

DEFAULTS = {
    **{k: v for k, v in TRAIN_DEFAULTS.items() if k not in ("rules", "rule", "tag", "dataset")},
    "datasets": ["mnist", "fashion_mnist"],
    "seeds": [0, 1, 2, 3, 4],
    "widths": [784, 256, 256, 10],
    "epochs": 10,
    "select_epochs": 2,
    "validation": 5000,
    "variants": {},
    "only": [],
    "quick": False,
    "resume": False,
    "out": "runs/compare",  # with --config FILE: runs/<FILE's name>
    "thresholds": [0.97, 0.85],
    "speed_results": "benchmarks/results/speed/speed.json",  # interleaved step-time / memory ratios (benchmarks.speed)
    "beside": "",  # another compare's summary.json: its test accuracy per variant shown beside (the MLP's for CNNs)
    "stop_after_s": 0.0,  # > 0: start no run after this many seconds (resume later with --resume)
    "reuse_selection": False,  # true: seed 0's final run is the chosen selection run when select_epochs = epochs
}
QUICK = {"seeds": [0], "epochs": 2, "select_epochs": 1, "train_subset": 3000, "validation": 1000}


def _variant_cfg(cfg: dict, dataset: str, spec: dict) -> dict:
    base = {**TRAIN_DEFAULTS, **{k: v for k, v in cfg.items() if k in TRAIN_DEFAULTS}, "dataset": dataset}
    fixed = {k: v for k, v in spec.items() if k not in ("rule", "grid")}
    return {**base, **fixed}


def _grid(spec: dict) -> list[dict]:
    grid = spec.get("grid", {})
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


def _run_cached(path: Path, resume: bool, make, env: dict):
    if resume and path.exists():
        return json.loads(path.read_text())
    result = make()
    result.pop("step_losses", None)
    write_json(path, {**result, "environment": env})
    return result


def _diverged_or(make):
    """A run that stops on a non-finite update (the rule's own check) counts as diverged, not as an error: a
    selection run is never chosen, a final run is reported as diverged and left out of the statistics."""
    try:
        return make()
    except RuntimeError as exc:
        if "non-finite" not in str(exc):
            raise
        return {"history": [], "diverged": str(exc)}


def _tag(values: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in sorted(values.items())) or "default"


def main(argv=None) -> Path:
    cfg = parse_config(DEFAULTS, __doc__.splitlines()[1], argv)
    if cfg["quick"]:
        cfg.update(QUICK)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    out = Path(cfg["out"])
    variants = {name: spec for name, spec in cfg["variants"].items() if not cfg["only"] or name in cfg["only"]}
    if not variants:
        raise SystemExit("error: no [variants.*] in the config (or none matches --only)")
    selections = {name: (1 if cfg["quick"] else len(_grid(s))) * bool(s.get("grid")) for name, s in variants.items()}
    jobs = sum((selections[name] + len(s.get("seeds", cfg["seeds"]))) * len(set(s.get("datasets", cfg["datasets"])))
               for name, s in variants.items())
    overall = tqdm(total=jobs, desc="compare", disable=not cfg["progress"], file=sys.stderr)
    env = environment(device)
    summary = {"config": cfg, "environment": env, "datasets": {}}
    started, skipped, not_run = time.monotonic(), 0, []

    def out_of_time(path: Path) -> bool:  # a cached run (--resume) costs nothing: it is always taken
        return 0 < cfg["stop_after_s"] < time.monotonic() - started and not (cfg["resume"] and path.exists())
    for dataset in cfg["datasets"]:
        splits = load_splits({**cfg, "dataset": dataset}, device)
        per_dataset = summary["datasets"][dataset] = {}
        for name, spec in variants.items():
            if dataset not in spec.get("datasets", [dataset]):
                continue  # a variant run on some data sets only (its own `datasets`: a budget)
            rule = spec.get("rule", name)
            selection = []
            grid = _grid(spec) if spec.get("grid") else []  # no grid: nothing to select
            for values in grid[:1] if cfg["quick"] else grid:  # --quick: the first setting only
                vcfg = {**_variant_cfg(cfg, dataset, spec), **values, "epochs": cfg["select_epochs"]}
                overall.set_postfix_str(f"{dataset} {name} select {_tag(values)}")
                path = out / "runs" / f"{dataset}_{name}_select_{_tag(values)}.json"
                if out_of_time(path):
                    selection = None  # incomplete: no final run may use a choice made on part of the grid
                    break
                result = _run_cached(path, cfg["resume"],
                                     lambda: _diverged_or(lambda: run(vcfg, rule, 0, splits, device, position=1)), env)
                val_acc = result["history"][-1].get("val_acc", float("nan")) if result["history"] else float("nan")
                selection.append({"values": values, "val_acc": val_acc, **({"diverged": result["diverged"]}
                                                                          if "diverged" in result else {})})
                overall.update()
            seeds = spec.get("seeds", cfg["seeds"])  # a variant may set its own seeds / epochs (ablations)
            if selection is None:
                skipped += selections[name] + len(seeds)  # (an upper bound: a few selection runs may have finished)
                not_run.append(f"{dataset} {name}")
                continue
            best = max(selection, key=lambda s: s["val_acc"] if s["val_acc"] == s["val_acc"] else -1)["values"] \
                if selection else {}
            runs = []
            for seed in seeds:
                vcfg = {**_variant_cfg(cfg, dataset, spec), **best, "epochs": spec.get("epochs", cfg["epochs"])}
                overall.set_postfix_str(f"{dataset} {name} seed {seed}")
                path = out / "runs" / f"{dataset}_{name}_final_{_tag(best)}_seed{seed}.json"
                chosen_run = out / "runs" / f"{dataset}_{name}_select_{_tag(best)}.json"
                reuse = cfg["reuse_selection"] and seed == 0 and selection and vcfg["epochs"] == cfg["select_epochs"] \
                    and chosen_run.exists()
                if reuse:
                    write_json(path, {**json.loads(chosen_run.read_text()), "reused_from": chosen_run.name})
                if out_of_time(path):
                    skipped += 1
                    continue
                result = json.loads(path.read_text()) if reuse else _run_cached(
                    path, cfg["resume"], lambda: _diverged_or(lambda: run(vcfg, rule, seed, splits, device, position=1)),
                    env)
                runs.append({**result, "seed": seed})
                overall.update()
            if not runs:
                not_run.append(f"{dataset} {name}")
                continue
            per_dataset[name] = {"name": name, "rule": rule, "selection": selection, "chosen": best, "grid": spec.get("grid", {}),
                                 "histories": [r["history"] for r in runs if "diverged" not in r],
                                 "diverged": [{"seed": r["seed"], "error": r["diverged"]} for r in runs if "diverged" in r]}
    overall.close()
    if skipped:
        summary["stopped"] = {"after_s": cfg["stop_after_s"], "runs_not_started": skipped, "not_run": not_run}
    write_json(out / "summary.json", summary)
    report = write_report(summary, out)
    print(report.read_text())
    return report


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _load_speed(cfg: dict) -> dict:
    """{rule: ratios} of the benchmarks.speed cell with this protocol's MLP and batch ({} if none)."""
    path = Path(cfg.get("speed_results") or "")
    if not path.is_file():
        return {}
    model = cfg.get("model", "mlp")
    for cell in json.loads(path.read_text())["results"]:
        if cell["batch"] != cfg["batch_size"]:
            continue
        if model == "mlp" and cell.get("widths") == cfg["widths"]:
            return cell["rules"]
        if model in cell.get("models", []):  # a models cell: entries keyed model/rule
            return {e["rule"]: e for e in cell["rules"].values() if e["model"] == model}
    return {}


def _load_beside(cfg: dict) -> dict | None:
    """The ``beside`` summary (another compare's summary.json), or None."""
    path = Path(cfg.get("beside") or "")
    if not cfg.get("beside"):
        return None
    if not path.is_file():
        raise SystemExit(f"error: beside: no file {path.resolve()}")
    return json.loads(path.read_text())


def _beside_cell(beside: dict | None, dataset: str, name: str) -> str:
    res = (beside or {}).get("datasets", {}).get(dataset, {}).get(name)
    if res is None:
        return "–"
    mean, std = _mean_std([hist[-1]["test_acc"] for hist in res["histories"]])
    return f"{mean:.4f} ± {std:.4f} ({_tag(res['chosen'])})"


def _speed_cell(speed: dict, res: dict, cfg: dict) -> str:
    entry = speed.get(res["rule"])
    variant = cfg["variants"].get(res.get("name", ""), {})
    if entry is None or variant.get("activation", "relu") != "relu":
        return "– | –"
    return f"{entry.get('time_ratio', float('nan')):.2f}× | {entry.get('kept_ratio', float('nan')):.2f}×"


def write_report(summary: dict, out: Path) -> Path:
    """REPORT.md and the plots, from the summary alone."""
    cfg, env = summary["config"], summary["environment"]
    speed = _load_speed(cfg)
    beside = _load_beside(cfg)
    grids = any(spec.get("grid") for spec in cfg["variants"].values())
    selection = (f"hyper-parameters chosen on a {cfg['validation']}-image validation split after "
                 f"{cfg['select_epochs']} epoch(s)" if grids else "fixed hyper-parameters (no selection)")
    lines = ["# All rules against autograd SGD", "",
             f"Command: `{cfg['command']}`  ",
             f"Machine: {env['device_name']} ({env['device']}), torch {env['torch']}, {env['threads']} threads.  ",
             f"Protocol: {describe(cfg)}, batch {cfg['batch_size']}, {cfg['epochs']} epochs, "
             f"seeds {cfg['seeds']}, {selection}" + (f", training on the first {cfg['train_subset']} images"
                                                    if cfg["train_subset"] else "") + "."]
    if beside is not None:
        bcfg = beside["config"]
        lines += ["", f"Beside: the test accuracy of the same variant in `{cfg['beside']}` ({describe(bcfg)}, batch "
                  f"{bcfg['batch_size']}, {bcfg['epochs']} epochs, seeds {bcfg['seeds']}; its chosen setting in "
                  "brackets)" + (f", training on the first {bcfg['train_subset']} images" if bcfg.get("train_subset")
                                 else ", the full training set") + "."]
    stopped = summary.get("stopped")
    if stopped:
        lines += ["", f"**Stopped after {stopped['after_s']:.0f} s** (`stop_after_s`): up to {stopped['runs_not_started']} "
                  f"run(s) not started; not run: {', '.join(stopped['not_run']) or '–'}; a variant with fewer seeds "
                  "says so. Rerun the same command with `--resume` to continue."]
    lines.append("")
    diverged_lines: list[str] = []
    for (dataset, rules), threshold in zip(summary["datasets"].items(), itertools.cycle(cfg["thresholds"])):
        sgd_time = None
        if "sgd" in rules:
            sgd_time = statistics.fmean(h["seconds"] for hist in rules["sgd"]["histories"] for h in hist)
        extra = " beside: test acc |" if beside is not None else ""
        lines += [f"## {dataset}", "",
                  f"| variant | rule | grid | {'chosen' if grids else 'setting'} | test acc (mean ± std) |{extra} best epoch | epochs to {threshold:.0%} | "
                  "s / epoch | time vs sgd | step time vs sgd † | kept for backward vs sgd † |",
                  "|---|---|---|---|---|" + "---|" * bool(extra) + "---|---|---|---|---|---|"]
        for name, res in rules.items():
            grid = "; ".join(f"{k} ∈ {v}" for k, v in res.get("grid", {}).items()) or "–"
            extra = f" {_beside_cell(beside, dataset, name)} |" if beside is not None else ""
            fixed = {k: v for k, v in cfg["variants"].get(name, {}).items() if k not in ("rule", "grid", "seeds", "epochs")}
            chosen = _tag(res["chosen"]) if res.get("grid") else ", ".join(f"{k} {v}" for k, v in fixed.items()) or "–"
            diverged = res.get("diverged", [])
            if diverged:
                diverged_note = f" (diverged: seed{'s' * (len(diverged) > 1)} {', '.join(str(d['seed']) for d in diverged)})"
                diverged_lines.append(f"- {dataset} {name}, seed {diverged[0]['seed']}: {diverged[0]['error']}")
            else:
                diverged_note = ""
            if not res["histories"]:
                lines.append(f"| {name} | {res['rule']} | {grid} | {chosen} | diverged (every seed) |{extra} – | – | – | – | {_speed_cell(speed, res, cfg)} |")
                continue
            finals = [hist[-1]["test_acc"] for hist in res["histories"]]
            mean, std = _mean_std(finals)
            curve = [statistics.fmean(hist[e]["test_acc"] for hist in res["histories"])
                     for e in range(len(res["histories"][0]))]
            best_epoch = max(range(len(curve)), key=curve.__getitem__) + 1
            reach = next((e + 1 for e, acc in enumerate(curve) if acc >= threshold), None)
            seconds = statistics.fmean(h["seconds"] for hist in res["histories"] for h in hist)
            ratio = f"{seconds / sgd_time:.2f}×" if sgd_time else "–"
            n_note = "" if len(finals) == len(cfg["seeds"]) and len(curve) == cfg["epochs"] else \
                f" ({len(finals)} seed{'s' * (len(finals) > 1)}, {len(curve)} epochs)"
            lines.append(f"| {name} | {res['rule']} | {grid} | {chosen} | {mean:.4f} ± {std:.4f}{n_note}{diverged_note} |{extra} {best_epoch} | "
                         f"{reach or '–'} | {seconds:.2f} | {ratio} | {_speed_cell(speed, res, cfg)} |")
        lines += ["", f"![accuracy vs epoch]({dataset}_accuracy.png) ![accuracy vs time]({dataset}_wallclock.png)"
                  + (f" ![selection]({dataset}_selection.png)" if grids else ""), ""]
    if diverged_lines:
        lines += ["Diverged runs (the rule refused a non-finite update; left out of the statistics):", "",
                  *diverged_lines, ""]
    lines += ["s / epoch is the wall time of each training run; the runs shared a 2-core machine with other "
              "jobs, so `time vs sgd` carries their load. † Interleaved ratios to autograd SGD from "
              + (f"`{cfg['speed_results']}` (benchmarks.speed) at the same model and batch, with the variant's "
                 "activation (ReLU there; – where not measured)." if cfg.get("speed_results")
                 else "benchmarks.speed: none given for this protocol (`speed_results`)."), ""]
    report = write_markdown(out, "REPORT.md", lines)
    _plots(summary, out)
    return report


def _plots(summary: dict, out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    for dataset, rules in summary["datasets"].items():
        for kind in ("accuracy", "wallclock"):
            fig, ax = plt.subplots(figsize=(6, 4))
            for name, res in rules.items():
                if not res["histories"]:
                    continue
                acc = torch.tensor([[h["test_acc"] for h in hist] for hist in res["histories"]])
                if kind == "accuracy":
                    xs = list(range(1, acc.shape[1] + 1))
                else:
                    secs = torch.tensor([[h["seconds"] for h in hist] for hist in res["histories"]]).mean(0)
                    xs = secs.cumsum(0).tolist()
                mean, std = acc.mean(0), acc.std(0) if acc.shape[0] > 1 else torch.zeros(acc.shape[1])
                # lists of floats: an older torch's tensors do not convert under numpy 2
                ax.plot(xs, mean.tolist(), label=name)
                ax.fill_between(xs, (mean - std).tolist(), (mean + std).tolist(), alpha=0.2)
            ax.set_xlabel("epoch" if kind == "accuracy" else "training seconds")
            ax.set_ylabel("test accuracy")
            ax.set_title(dataset)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / f"{dataset}_{kind}.png", dpi=100)
            plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, res in rules.items():
            values = res["selection"][0]["values"] if res["selection"] else {}
            key = next((k for k in ("lr", "alpha") if k in values), None)
            if key is None:
                continue
            others = [k for k in values if k != key]  # one curve per setting of the other knobs
            for setting in sorted({tuple(s["values"][k] for k in others) for s in res["selection"]}):
                pts = sorted((s["values"][key], s["val_acc"]) for s in res["selection"]
                             if tuple(s["values"][k] for k in others) == setting)
                label = name + (f" ({_tag(dict(zip(others, setting)))})" if others else "") + (" [α]" if key == "alpha" else "")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (α for il_prox: the implicit step)")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{dataset}: learning-rate sensitivity")
        if not ax.get_lines():  # no variant with a learning-rate grid: no selection plot
            plt.close(fig)
            continue
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{dataset}_selection.png", dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    main()
