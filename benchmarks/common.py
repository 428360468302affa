"""Shared pieces of the benchmark scripts: TOML configs with command-line overrides, models, results."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tomllib
from pathlib import Path

import torch
from torch import nn

import torch_fadjoint as tfa

ACTIVATIONS = {
    "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU,
    "elu": nn.ELU, "softplus": nn.Softplus, "leaky_relu": nn.LeakyReLU, "step": tfa.nn.Step,
    "identity": nn.Identity, "none": None, "": None,
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _parse_value(text: str, default):
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if isinstance(default, list):
        items = [s for s in text.split(",") if s != ""]
        kind = type(default[0]) if default else str
        return [_parse_value(s, kind()) for s in items]
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def parse_config(defaults: dict, description: str, argv=None) -> dict:
    """``--config file.toml`` then ``--key value`` for every key (lists comma-separated)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    cfg = dict(defaults)
    if known.config:
        with open(known.config, "rb") as fh:
            loaded = tomllib.load(fh)
        unknown = sorted(set(loaded) - set(defaults))
        if unknown:
            raise SystemExit(f"error: {known.config}: unknown keys {unknown}; known: {sorted(defaults)}")
        cfg.update(loaded)
        if "out" in defaults and "out" not in loaded:  # results go to a git-ignored folder named after the config
            cfg["out"] = str(Path("runs") / Path(known.config).stem)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="TOML file; every key below overrides it")
    for key, value in cfg.items():
        if isinstance(value, dict):
            continue  # tables ([variants.*]) come from the TOML file only
        flag = "--" + key.replace("_", "-")
        extra = {"nargs": "?", "const": True} if isinstance(value, bool) else {}
        parser.add_argument(flag, dest=key, default=value, metavar=type(value).__name__.upper(),
                            type=lambda s, d=defaults.get(key, value): _parse_value(s, d),
                            help=f"(default: {value!r})", **extra)
    args = parser.parse_args(argv)
    out = {key: getattr(args, key, value) for key, value in cfg.items()}
    out["command"] = "python -m " + " ".join(shlex.quote(a) for a in [_module_name()] + sys.argv[1:])
    return out


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0])


def build_mlp(widths: list[int], activation: str, output_activation: str = "", init: str = "default",
              input_noise: float = 0.0) -> nn.Sequential:
    """Flatten, then Linear(widths[i], widths[i+1]) with ``activation`` between, ``output_activation`` last."""
    if activation not in ACTIVATIONS or output_activation not in ACTIVATIONS:
        raise SystemExit(f"error: activation must be one of {sorted(k for k in ACTIVATIONS if k)}")
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        if input_noise:
            layers.append(tfa.nn.InputNoise(input_noise))
        linear = nn.Linear(n_in, n_out)
        if init == "xavier_normal":
            nn.init.xavier_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
        elif init == "xavier_normal_folded":  # docs/maths.md §2.4: the bias is a column of W, drawn with it;
            std = (2.0 / (n_in + n_out)) ** 0.5  # the reference's std uses n_in, not n_in + 1 (Digit_local.py)
            with torch.no_grad():
                linear.weight.normal_(0.0, std)
                linear.bias.normal_(0.0, std)
        elif init != "default":
            raise SystemExit(f"error: init must be 'default', 'xavier_normal' or 'xavier_normal_folded', got {init!r}")
        layers.append(linear)
        last = i == len(widths) - 2
        act = ACTIVATIONS[output_activation if last else activation]
        if act is not None:
            layers.append(act())
    return nn.Sequential(*layers)


def write_markdown(out: Path, name: str, lines: list[str]) -> Path:
    """Write ``lines`` as ``out/name`` (creating ``out``); returns the path."""
    report = out / name
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))
    return report


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def environment(device: torch.device) -> dict:
    """Device name, torch version, threads, the CPU kernels torch picked (``cpu_capability``: "AVX2",
    "AVX512", …; ``ATEN_CPU_CAPABILITY`` changes it): recorded with every result."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def write_json(path: Path, payload: dict) -> None:
    """Write atomically (temp file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
