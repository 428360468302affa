#!/usr/bin/env python3
"""Checks that a lab can ``pip install`` torch-fadjoint: builds the wheel and the sdist, installs each (never
editable) into one fresh virtual environment outside the clone and runs scripts/smoke_installed.py there.

    python3 scripts/check_package.py [--keep]      # CI runs it after the test suite (.ci/run)

Needs only python3 (>= 3.11, standard library) and pip's access to the package index. In a temporary folder:

1. copies the clone's files (git's tracked and untracked-but-not-ignored ones; the whole clone less .git,
   .venv, build outputs and data where git is missing), so no build output or stale egg-info of the clone
   reaches the artifacts and nothing is written into the clone;
2. creates the environment, installs ``build`` into it and builds the sdist, then the wheel from the sdist
   (``python -m build``: each in its own isolated environment with the setuptools that pyproject.toml asks
   for), then uninstalls ``build`` and what it brought;
3. checks the artifacts: the wheel holds the ``torch_fadjoint`` package (every module of the copy) and its
   metadata only, with the LICENSE; the sdist holds README.md, LICENSE, pyproject.toml, setup.py and the package;
4. installs torch from ``FADJOINT_TORCH`` (default below: pip arguments, extra options allowed), then the
   wheel, and runs the smoke program with the environment's python, isolated (``-I``), from the temporary
   folder; uninstalls it, installs the sdist (pip builds it in an isolated environment) and runs it again.

Prints one line per phase with its time; on a failure, the failing command's last lines and a one-line reason,
and exits 1. The temporary folder (about 5 GB with a CUDA torch) is removed at the end unless ``--keep``.
``python3 scripts/dev.py`` keeps its editable install for development; this script does not touch ``.venv``.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
import zipfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.14.1 torchvision==0.29.1"
PACKAGE = "torch_fadjoint"
DIST = "torch-fadjoint"
SMOKE = ROOT / "scripts" / "smoke_installed.py"
SDIST_NEEDS = ("README.md", "LICENSE", "pyproject.toml", "setup.py", "PKG-INFO")
NOT_COPIED = {".git", ".venv", "build", "dist", "data", "runs", "__pycache__", ".pytest_cache"}
TIMEOUT = 1200  # seconds for one command (the torch install is the long one: 1-2 minutes from a local index)
TAIL = 40


class Failure(Exception):
    """A failed phase: its message (and the failing command's output, already printed)."""


def log(message: str) -> None:
    print(f"check_package: {message}", flush=True)


@contextmanager
def phase(name: str):
    start = time.perf_counter()
    try:
        yield
    except Failure as exc:
        raise Failure(f"{name}: {exc}") from None
    log(f"{name}: {time.perf_counter() - start:.1f} s")


def run(cmd: list, cwd: Path, logfile: Path) -> str:
    """Run ``cmd`` (output to ``logfile`` too); its output, or Failure with the output's tail printed."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
        output, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        code = f"no end within {TIMEOUT} s"
    with logfile.open("a") as f:
        f.write(f"$ {shlex.join(map(str, cmd))}  (in {cwd})\n{output}\n")
    if code != 0:
        lines = output.rstrip().splitlines()[-TAIL:]
        print("\n".join(f"    | {line}" for line in lines), flush=True)
        raise Failure(f"`{shlex.join(map(str, cmd))}` exited with {code}")
    return output


def copy_sources(dest: Path) -> str:
    """The clone's files into ``dest``: git's list (tracked + untracked, not ignored), else a filtered copy."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True).stdout
        names = [name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        names = None
    if names is None:
        shutil.copytree(ROOT, dest, ignore=lambda _d, entries: {e for e in entries
                                                                 if e in NOT_COPIED or e.endswith(".egg-info")})
        return "a copy of the clone (git unavailable)"
    for name in names:
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return f"{len(names)} files listed by git"


def python_of(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def installed(python: Path, cwd: Path, logfile: Path) -> set[str]:
    out = run([python, "-m", "pip", "list", "--format=freeze"], cwd, logfile)
    return {line.split("==")[0].lower() for line in out.splitlines() if "==" in line}


def check_wheel(wheel: Path, src: Path) -> str:
    names = zipfile.ZipFile(wheel).namelist()
    info = f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info/"
    stray = sorted(n for n in names if not n.startswith((f"{PACKAGE}/", info)))
    if stray:
        raise Failure(f"the wheel holds files outside {PACKAGE}/ and its metadata: {stray[:10]}")
    if not any(n.startswith(info) and n.endswith("/LICENSE") for n in names):
        raise Failure(f"the wheel's {info} holds no LICENSE")
    modules = {p.relative_to(src).as_posix() for p in (src / PACKAGE).rglob("*.py")}
    missing = sorted(modules - set(names))
    if missing:
        raise Failure(f"the wheel lacks modules of the package: {missing} (a folder without __init__.py?)")
    return f"{len(modules)} modules + LICENSE"


def check_sdist(sdist: Path) -> str:
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    top = names[0].split("/")[0]
    files = {n.split("/", 1)[1] for n in names if "/" in n}
    missing = [n for n in (*SDIST_NEEDS, f"{PACKAGE}/__init__.py") if n not in files]
    if missing:
        raise Failure(f"the sdist {sdist.name} lacks {missing}")
    extra = sorted({n.split("/")[0] for n in files} - {PACKAGE, f"{PACKAGE}.egg-info", *SDIST_NEEDS, "setup.cfg",
                                                         "MANIFEST.in"})
    if extra:
        raise Failure(f"the sdist {sdist.name} carries {extra} (not needed to build or install the package)")
    return f"{top}/: {', '.join(SDIST_NEEDS)}, {PACKAGE}/"


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):
        raise SystemExit(f"check_package: torch_fadjoint needs Python >= 3.11; this is {sys.version.split()[0]}")
    if set(argv) - {"--keep"}:
        raise SystemExit(__doc__)
    torch_spec = shlex.split(os.environ.get("FADJOINT_TORCH") or TORCH)
    tmp = Path(tempfile.mkdtemp(prefix="torch_fadjoint-check-")).resolve()
    src, dist, env_dir, logfile = tmp / "src", tmp / "dist", tmp / "venv", tmp / "commands.log"
    python = python_of(env_dir)
    start = time.perf_counter()
    log(f"working in {tmp} (log: {logfile.name}); torch: {shlex.join(torch_spec)}")
    try:
        with phase("copy the clone's files"):
            src.mkdir()
            what = copy_sources(src)
        log(f"  {what}")
        with phase("create a fresh virtual environment"):
            venv.EnvBuilder(with_pip=True).create(env_dir)
            if not python.exists():
                raise Failure(f"no python at {python}")
        with phase("build the sdist, then the wheel from it (python -m build)"):
            before = installed(python, tmp, logfile)
            run([python, "-m", "pip", "install", "-q", "build"], tmp, logfile)
            run([python, "-m", "build", "--outdir", dist, src], tmp, logfile)
            added = sorted(installed(python, tmp, logfile) - before)
            if added:  # leave the environment as a lab's: torch-fadjoint must not lean on build's packaging
                run([python, "-m", "pip", "uninstall", "-y", "-q", *added], tmp, logfile)
            wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
            if len(wheels) != 1 or len(sdists) != 1:
                raise Failure(f"expected one wheel and one sdist in {dist}, found {sorted(p.name for p in dist.iterdir())}")
            wheel, sdist = wheels[0], sdists[0]
        with phase("check the artifacts' contents"):
            log(f"  {wheel.name}: {check_wheel(wheel, src)}")
            log(f"  {sdist.name}: {check_sdist(sdist)}")
        with phase(f"install {shlex.join(torch_spec)}"):
            run([python, "-m", "pip", "install", "-q", *torch_spec], tmp, logfile)
        for label, artifact in (("wheel", wheel), ("sdist", sdist)):
            with phase(f"install the {label} (non-editable)"):
                run([python, "-m", "pip", "install", "-q", artifact], tmp, logfile)
            with phase(f"smoke test of the installed {label}"):
                out = run([python, "-I", SMOKE], tmp, logfile)
            log(f"  {out.strip().splitlines()[-1]}")
            with phase(f"uninstall the {label}"):
                run([python, "-m", "pip", "uninstall", "-y", "-q", DIST], tmp, logfile)
                run([python, "-I", "-c", f"import importlib.util, sys; "
                                         f"sys.exit(importlib.util.find_spec({PACKAGE!r}) is not None)"], tmp, logfile)
    except Failure as exc:
        log(f"FAILED after {time.perf_counter() - start:.0f} s: {exc}")
        return 1
    finally:
        if "--keep" in argv:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"ok: the wheel and the sdist install and pass the smoke test ({time.perf_counter() - start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
