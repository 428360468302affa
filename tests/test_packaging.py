"""Packaging (issue 20): what the build reads from pyproject.toml ships every module of the package, one version
and the LICENSE. Fast: no network, no environment; scripts/check_package.py (CI) builds and installs for real."""
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import torch_fadjoint

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "torch_fadjoint"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _build_packages() -> set[str]:
    """The packages the build ships: setuptools' own call for [tool.setuptools.packages.find]."""
    from setuptools.config.expand import find_packages

    return set(find_packages(root_dir=ROOT, **_pyproject()["tool"]["setuptools"]["packages"]["find"]))


def test_every_folder_with_modules_is_a_package_the_build_ships():
    folders = sorted({path.parent for path in PACKAGE.rglob("*.py")})
    assert PACKAGE in folders
    no_init = [str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()]
    assert not no_init, f"folders with modules but no __init__.py (left out of the wheel): {no_init}"
    shipped = _build_packages()
    missing = sorted({".".join(f.relative_to(ROOT).parts) for f in folders} - shipped)
    assert not missing, f"packages the build's find_packages does not list: {missing}"
    stray = sorted(name for name in shipped if name.split(".")[0] != "torch_fadjoint")
    assert not stray, f"the wheel would ship more than torch_fadjoint: {stray}"


def test_one_version_read_by_the_metadata_without_torch():
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"], "the version must be read, not written"
    attr = _pyproject()["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    # setuptools' read_attr, as the build calls it; it falls back to importing the module (and torch) when the
    # assignment is not a literal, which an isolated build environment without torch cannot do
    code = ("import sys; from setuptools.config.expand import read_attr; value = read_attr(sys.argv[1], None, "
            "sys.argv[2]); assert 'torch' not in sys.modules, 'reading the version imported torch'; print(value)")
    proc = subprocess.run([sys.executable, "-c", code, attr, str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == torch_fadjoint.__version__
    # one place for the metadata: setup.py only hands over to setuptools
    calls = [node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"]
    assert calls and not any(call.args or call.keywords for call in calls), "setup.py repeats metadata"


def test_license_is_shipped():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "Copyright (c) 2026 the torch_fadjoint authors" in text
    project = _pyproject()["project"]
    assert "LICENSE" in project["license-files"]
    assert "License :: OSI Approved :: MIT License" in project["classifiers"]
