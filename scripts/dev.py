#!/usr/bin/env python3
"""The README's Quick start: set up a virtual environment (once), then train the MNIST benchmark or run the tests.

    python3 scripts/dev.py train [benchmarks.train options]   # configs/mnist_mlp.toml: fadjoint vs sgd, a table
    python3 scripts/dev.py test  [pytest options]             # python -m pytest -q

Needs only python3 (>= 3.11, standard library). Creates ``.venv`` in the clone, or reuses it, and installs the
pinned torch and torchvision and this package (editable, with the ``bench`` and ``dev`` extras) into it; a stamp
file in the environment, keyed on setup.py, pyproject.toml and the pins, skips that step when nothing changed.
Runs from the clone's root, whatever the current folder. The editable install is for development;
``python3 scripts/check_package.py`` checks what a lab gets (the wheel and the sdist, installed into a fresh
environment; CI runs it). Environment variables:

* ``FADJOINT_DATA``: the data root (default ``./data``; torchvision downloads MNIST / Fashion-MNIST there);
* ``FADJOINT_VENV``: another environment folder (scripts/check_torch_version.py uses a scratch one);
* ``FADJOINT_TORCH``: the pip arguments that install torch (default below; extra pip options allowed).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.14.1 torchvision==0.29.1"
PACKAGE = ".[bench,dev]"
COMMANDS = {
    "train": ["-m", "benchmarks.train", "--config", "configs/mnist_mlp.toml"],
    "test": ["-m", "pytest", "-q"],
}


def _python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _install_key(torch_spec: str) -> str:
    """What the installed environment depends on: the pins, the extras, setup.py and pyproject.toml."""
    digest = hashlib.sha256(f"{torch_spec}\n{PACKAGE}\n".encode())
    for name in ("setup.py", "pyproject.toml"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_environment(env_dir: Path, torch_spec: str = TORCH) -> Path:
    """Create ``env_dir`` if needed and install torch and the package unless its stamp is current; its python."""
    python = _python(env_dir)
    if not python.exists():
        print(f"creating {env_dir}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(env_dir)
    stamp, key = env_dir / ".torch_fadjoint-installed", _install_key(torch_spec)
    if stamp.is_file() and stamp.read_text() == key:
        return python
    print(f"installing {torch_spec} and torch-fadjoint{PACKAGE[1:]} into {env_dir}", file=sys.stderr)
    stamp.unlink(missing_ok=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *torch_spec.split()], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "-e", PACKAGE], check=True, cwd=ROOT)
    stamp.write_text(key)
    return python


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):
        raise SystemExit(f"error: torch_fadjoint needs Python >= 3.11; this is {sys.version.split()[0]}")
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(__doc__)
    env_dir = Path(os.environ.get("FADJOINT_VENV") or ROOT / ".venv")
    try:
        python = ensure_environment(env_dir, os.environ.get("FADJOINT_TORCH") or TORCH)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"error: setting up {env_dir} failed: {' '.join(map(str, exc.cmd))} "
                         f"exited with {exc.returncode}") from None
    return subprocess.run([python, *COMMANDS[argv[0]], *argv[1:]], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
