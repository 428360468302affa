"""MNIST, Fashion-MNIST and CIFAR-10 through ``torchvision.datasets``, held as tensors on a device.

The data root is the ``root`` argument (the benchmarks' ``--data-root``), else the ``FADJOINT_DATA``
environment variable, else ``./data`` (:func:`data_root`, used by the library, the benchmarks and the tests).
Under it torchvision's layout, ``<root>/MNIST/raw/`` and ``<root>/FashionMNIST/raw/``:

* unpacked IDX files there are read as they are;
* gzipped IDX files (``*.gz``) are unpacked into ``${XDG_CACHE_HOME:-~/.cache}/torch_fadjoint/``, never next to
  themselves: a data root may be shared or read-only, and is never written;
* anything missing is downloaded by torchvision into ``<root>``. A failed download removes the folders it
  created and raises :class:`DatasetNotFoundError`: one line naming the folder and torchvision's own message.

CIFAR-10 is read from torchvision's ``<root>/cifar-10-batches-py/`` (the python version of its batches: pickled
dicts of uint8 rows, channel first), downloaded by torchvision (checksummed) when missing; its images are
flattened channel first (3 × 32 × 32) and standardised per channel.

torchvision is imported only when a data set is read (``pip install torchvision`` matching your torch).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DATASETS", "DatasetNotFoundError", "TensorDataset", "cache_dir", "data_root", "load", "prepare"]

DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "fashionmnist": "FashionMNIST", "cifar10": "CIFAR10",
            "cifar_10": "CIFAR10"}
_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Channel statistics of the training images (pixels / 255), the usual normalisation constants.
_MEAN_STD = {"MNIST": (0.1307, 0.3081), "FashionMNIST": (0.2860, 0.3530),
             "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}  # per channel
_CIFAR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


class DatasetNotFoundError(RuntimeError):
    """The data set is neither on disk nor downloadable."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` (``--data-root``), else ``$FADJOINT_DATA``, else ``./data``; empty strings count as unset."""
    chosen = root if root not in (None, "") else os.environ.get("FADJOINT_DATA") or "data"
    return Path(chosen).expanduser()


def cache_dir() -> Path:
    """Where gzipped IDX files are unpacked: ``${XDG_CACHE_HOME:-~/.cache}/torch_fadjoint``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_fadjoint"


def _has_all(folder: Path, suffix: str = "") -> bool:
    return all((folder / f"{name}{suffix}").is_file() for name in _FILES)


def _torchvision():
    try:
        import torchvision
    except ImportError:
        raise ModuleNotFoundError("torch_fadjoint.data needs torchvision: pip install torchvision "
                                  "(the release matching your torch), or torch-fadjoint[data]") from None
    return torchvision


def _unpacked_copy(raw: Path, folder: str) -> Path:
    """Gunzip ``raw/*.gz`` into a cache folder keyed by their path, size and mtime; returns its torchvision root."""
    try:
        return _gunzip_into_cache(raw, folder)
    except OSError as exc:
        raise DatasetNotFoundError(f"cannot unpack {raw}/*.gz into {cache_dir()}: {exc} "
                                   "(set XDG_CACHE_HOME to a writable folder)") from None


def _gunzip_into_cache(raw: Path, folder: str) -> Path:
    stats = [(raw / f"{name}.gz").stat() for name in _FILES]
    key = hashlib.sha256(repr([str(raw.resolve())] + [(s.st_size, s.st_mtime_ns) for s in stats]).encode())
    root = cache_dir() / "unpacked" / key.hexdigest()[:16]
    target = root / folder / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for name in _FILES:
        if (target / name).is_file():
            continue
        part = target / f"{name}.part{os.getpid()}"
        try:
            with gzip.open(raw / f"{name}.gz", "rb") as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(part, target / name)
        finally:
            part.unlink(missing_ok=True)
    return root


def _download(folder: str, root: Path) -> None:
    """torchvision's download into ``root``; on failure, the folders it created are removed."""
    torchvision = _torchvision()
    raw = root / folder / "raw"
    created = next((p for p in reversed([raw, *raw.parents]) if not p.exists()), None)  # the topmost it makes
    try:
        getattr(torchvision.datasets, folder)(str(root), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - any download failure becomes one line
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        cause = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        message = f"{folder} not found under {raw.absolute()} and the download failed: {cause}"
        raise DatasetNotFoundError(message) from None


def prepare(name: str, root: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Make ``name`` readable and return the torchvision root that holds it unpacked.

    That is :func:`data_root` itself, or the cache folder where its gzipped IDX files were unpacked; with
    ``download`` whatever is missing is downloaded into :func:`data_root`.
    """
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of: mnist, fashion_mnist, cifar10")
    folder, root = DATASETS[key], data_root(root)
    if folder == "CIFAR10":
        return _prepare_cifar(root, download)
    raw = root / folder / "raw"
    if _has_all(raw):
        return root
    if _has_all(raw, ".gz"):
        return _unpacked_copy(raw, folder)
    if not download:
        raise DatasetNotFoundError(f"{folder} not found under {root.absolute()} (set --data-root or FADJOINT_DATA)")
    _download(folder, root)
    return root


def _prepare_cifar(root: Path, download: bool) -> Path:
    batches = root / _CIFAR
    if all((batches / name).is_file() for name in (*_CIFAR_TRAIN, "test_batch")):
        return root
    if not download:
        raise DatasetNotFoundError(f"CIFAR-10 not found under {batches.absolute()} (set --data-root or FADJOINT_DATA)")
    try:
        _torchvision().datasets.CIFAR10(str(root), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - any download failure becomes one line
        cause = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        raise DatasetNotFoundError(f"CIFAR-10 not found under {batches.absolute()} and the download failed: "
                                   f"{cause}") from None
    return root


def _read_cifar(root: Path, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """Images (N, 3·32·32) uint8, channel first, and labels (N,) from CIFAR-10's python batches."""
    images, labels = [], []
    for name in names:
        with open(root / _CIFAR / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # CIFAR's own format (torchvision reads it alike)
        images.append(torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3 * 32 * 32))
        labels.append(torch.as_tensor(batch[b"labels"], dtype=torch.int64))
    return torch.cat(images), torch.cat(labels)


@dataclass
class TensorDataset:
    """A split held as tensors: ``x`` (N, pixels) float (784 for MNIST, 3072 for CIFAR-10), ``t`` (N,) int64."""

    x: Tensor
    t: Tensor

    def __len__(self) -> int:
        return len(self.t)

    def batches(self, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True):
        """Yield ``(x, t)`` mini-batches from a permutation (no per-sample Python work)."""
        n = len(self.t)
        order = torch.randperm(n, generator=generator).to(self.x.device) if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                yield self.x[start:start + batch_size], self.t[start:start + batch_size]
            else:
                idx = order[start:start + batch_size]
                yield self.x[idx], self.t[idx]


def load(name: str, root: str | os.PathLike | None = None, *, device="cpu", dtype=torch.float32,
         normalize: bool = True, download: bool = True, validation: int = 0,
         split_seed: int = 0) -> dict[str, TensorDataset]:
    """Load ``name`` ("mnist", "fashion_mnist" or "cifar10") from :func:`data_root` as flat tensors on ``device``.

    Pixels are scaled to [0, 1] (``/ 255``) and, with ``normalize``, standardised by the training set's
    mean and std. ``validation > 0`` carves that many images (a seeded permutation) from train into a
    ``"val"`` split. Returns ``{"train", "test"[, "val"]}``.
    """
    base = prepare(name, root, download=download)
    folder = DATASETS[name.lower().replace("-", "_")]
    splits = {}
    for split, train in (("train", True), ("test", False)):
        if folder == "CIFAR10":
            images, targets = _read_cifar(base, _CIFAR_TRAIN if train else ("test_batch",))
        else:
            ds = getattr(_torchvision().datasets, folder)(str(base), train=train, download=False)
            images, targets = ds.data.reshape(len(ds.data), -1), ds.targets.long()
        x = images.to(dtype).div_(255.0)
        if normalize:
            mean, std = _MEAN_STD[folder]
            if isinstance(mean, tuple):  # per channel, channel first
                shape = (1, len(mean), -1)
                x = x.reshape(len(x), len(mean), -1).sub_(torch.tensor(mean, dtype=dtype).reshape(shape)) \
                    .div_(torch.tensor(std, dtype=dtype).reshape(shape)).reshape(len(x), -1)
            else:
                x = x.sub_(mean).div_(std)
        splits[split] = TensorDataset(x.to(device), targets.to(device))
    if validation:
        train = splits["train"]
        if not 0 < validation < len(train):
            raise ValueError(f"validation must be in (0, {len(train)}), got {validation}")
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed)).to(train.x.device)
        val_idx, train_idx = perm[:validation], perm[validation:]
        splits["val"] = TensorDataset(train.x[val_idx], train.t[val_idx])
        splits["train"] = TensorDataset(train.x[train_idx], train.t[train_idx])
    return splits
