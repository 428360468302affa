#!/usr/bin/env python3
"""Run the test suite against another torch release, in a scratch environment.

    FADJOINT_DATA=../shared/datasets python3 scripts/check_torch_version.py 2.4.1 [--ref REF] [pytest options]

Creates (or reuses) ``$TMPDIR/torch_fadjoint-torch<VERSION>/venv``, installs ``torch==VERSION`` with its
torchvision (torch 2.X.Y ships with torchvision 0.(X+15).Y: 2.1.2 → 0.16.2, 2.4.1 → 0.19.1, 2.8.0 → 0.23.0) and
this package, and runs ``python -m pytest -q -x`` there through scripts/dev.py. Without ``--ref`` the working
tree is tested in place; ``--ref REF`` tests that commit, exported (``git archive``) into the scratch folder,
so the clone can change while it runs. The clone's ``.venv`` is not touched. Exit status: pytest's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchvision_for(torch_version: str) -> str:
    major, minor, patch = (int(part) for part in torch_version.split("+")[0].split("."))
    if major != 2:
        raise SystemExit(f"error: torch {torch_version}: only torch 2.x is supported")
    return f"0.{minor + 15}.{patch}"


def export(ref: str, target: Path) -> Path:
    """The tree of commit ``ref`` in ``target`` (replaced)."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        raise SystemExit(__doc__)
    version, rest = argv[0], argv[1:]
    ref = None
    if rest[:1] == ["--ref"]:
        if len(rest) < 2:
            raise SystemExit("error: --ref needs a commit")
        ref, rest = rest[1], rest[2:]
    scratch = Path(tempfile.gettempdir()) / f"torch_fadjoint-torch{version}"
    src = export(ref, scratch / "src") if ref else ROOT
    env = {**os.environ, "FADJOINT_VENV": str(scratch / "venv"),
           "FADJOINT_TORCH": f"torch=={version} torchvision=={torchvision_for(version)}"
                             + (" numpy<2" if tuple(map(int, version.split(".")[:2])) < (2, 3) else "")}
    # torch < 2.3 was built against NumPy 1: with NumPy 2 (pip's pick) its Tensor.numpy() raises
    print(f"torch {version} in {scratch / 'venv'}, testing {ref or 'the working tree'} ({src})", file=sys.stderr)
    code = subprocess.run([sys.executable, str(src / "scripts" / "dev.py"), "test", "-x", *rest], env=env).returncode
    print(f"torch {version}: pytest exited with {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
