"""MNIST and Fashion-MNIST through ``torchvision.datasets``, held as tensors on a device.

The root comes from the ``root`` argument (the benchmarks' ``--data-root``), else the ``FADJOINT_DATA``
environment variable, else ``./data``. Gzipped IDX files found under ``<root>/<Name>/raw/`` are
unpacked next to themselves (torchvision only unpacks what it downloads itself); where that folder
is read-only they are unpacked into ``~/.cache/torch_fadjoint/<Name>/raw`` instead. torchvision
downloads only when the files are missing; when neither works, :class:`DatasetNotFoundError` says so
in one line.
"""
from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DATASETS", "DatasetNotFoundError", "TensorDataset", "data_root", "load"]

DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "fashionmnist": "FashionMNIST"}
_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Channel statistics of the training images (pixels / 255), the usual normalisation constants.
_MEAN_STD = {"MNIST": (0.1307, 0.3081), "FashionMNIST": (0.2860, 0.3530)}


class DatasetNotFoundError(RuntimeError):
    """The data set is neither on disk nor downloadable."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$FADJOINT_DATA``, else ``./data``."""
    return Path(root if root is not None else os.environ.get("FADJOINT_DATA", "data")).expanduser()


def _unpack(raw_dir: Path, target_dir: Path) -> bool:
    """Gunzip every missing IDX file of ``raw_dir`` into ``target_dir``; True if all four are there."""
    target_dir.mkdir(parents=True, exist_ok=True)
    for name in _FILES:
        out, packed = target_dir / name, raw_dir / f"{name}.gz"
        if out.exists() or not packed.exists():
            continue
        tmp = out.with_suffix(".part")
        with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, out)
    return all((target_dir / name).exists() for name in _FILES)


def _prepare_root(root: Path, folder: str) -> Path:
    """The torchvision root to read from, after unpacking what is there."""
    raw = root / folder / "raw"
    if not raw.is_dir():
        return root
    try:
        if _unpack(raw, raw):
            return root
    except OSError:
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_fadjoint"
    if _unpack(raw, cache / folder / "raw"):
        return cache
    return root


def _torchvision_split(folder: str, root: Path, train: bool, download: bool):
    import torchvision

    cls = getattr(torchvision.datasets, folder)
    try:
        return cls(str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise DatasetNotFoundError(f"{folder} not found under {root} (set --data-root or FADJOINT_DATA)")
    try:
        return cls(str(root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - any download failure becomes one line
        raise DatasetNotFoundError(
            f"{folder} not found under {root / folder / 'raw'} and the download failed "
            f"({type(exc).__name__}); set --data-root or FADJOINT_DATA to a folder holding {folder}/raw/"
        ) from None


@dataclass
class TensorDataset:
    """A split held as tensors: ``x`` (N, 784) float, ``t`` (N,) int64."""

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
    """Load ``name`` ("mnist" or "fashion_mnist") as flat tensors on ``device``.

    Pixels are scaled to [0, 1] (``/ 255``) and, with ``normalize``, standardised by the training set's
    mean and std. ``validation > 0`` carves that many images (a seeded permutation) from train into a
    ``"val"`` split. Returns ``{"train", "test"[, "val"]}``.
    """
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of: mnist, fashion_mnist")
    folder = DATASETS[key]
    base = _prepare_root(data_root(root), folder)
    splits = {}
    for split, train in (("train", True), ("test", False)):
        ds = _torchvision_split(folder, base, train, download)
        x = ds.data.reshape(len(ds.data), -1).to(dtype).div_(255.0)
        if normalize:
            mean, std = _MEAN_STD[folder]
            x = x.sub_(mean).div_(std)
        splits[split] = TensorDataset(x.to(device), ds.targets.long().to(device))
    if validation:
        train = splits["train"]
        if not 0 < validation < len(train):
            raise ValueError(f"validation must be in (0, {len(train)}), got {validation}")
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed)).to(train.x.device)
        val_idx, train_idx = perm[:validation], perm[validation:]
        splits["val"] = TensorDataset(train.x[val_idx], train.t[val_idx])
        splits["train"] = TensorDataset(train.x[train_idx], train.t[train_idx])
    return splits
