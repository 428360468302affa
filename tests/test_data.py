"""MNIST / Fashion-MNIST through torchvision from the data root (gzipped IDX unpacked into the cache)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torch_fadjoint import data


@pytest.mark.parametrize("name, mean", [("mnist", 0.1307), ("fashion_mnist", 0.2860)])
def test_load_real_data_as_tensors(data_root, name, mean):
    splits = data.load(name, data_root, normalize=False, validation=5000)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (55000, 5000, 10000)
    assert splits["test"].x.shape == (10000, 784) and splits["test"].t.dtype == torch.int64
    full = torch.cat([splits["train"].x, splits["val"].x])
    assert abs(full.mean().item() - mean) < 5e-4
    assert torch.bincount(splits["test"].t).tolist() == ([1000] * 10 if name == "fashion_mnist" else
                                                        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    normalized = data.load(name, data_root)["train"].x
    assert abs(normalized.mean().item()) < 1e-3 and abs(normalized.std().item() - 1) < 2e-3


def test_batches_cover_the_split_once(data_root):
    test = data.load("mnist", data_root)["test"]
    seen = torch.cat([t for _, t in test.batches(999, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(torch.bincount(seen), torch.bincount(test.t))


def test_missing_data_set_is_a_one_line_error(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match="MNIST not found under"):
        data.load("mnist", tmp_path, download=False)
    with pytest.raises(ValueError, match="unknown data set"):
        data.load("cifar", tmp_path)


def test_cli_reports_a_missing_data_set_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train", "--data-root", str(tmp_path), "--download",
                           "false", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: MNIST not found under {tmp_path} "
                                                "(set --data-root or FADJOINT_DATA)"]


# -- the data root, the cache, offline ------------------------------------------------------------------------

def _write_fake_idx_gz(raw, n_train=6, n_test=4):
    """Tiny gzipped IDX files in torchvision's MNIST layout; returns {file name: (images, labels)}."""
    import gzip

    raw.mkdir(parents=True)
    made = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), dtype=torch.uint8)
        header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(images.flatten().tolist())))
        header = (2049).to_bytes(4, "big") + n.to_bytes(4, "big")
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + bytes(labels.tolist())))
        made[prefix] = (images, labels)
    return made


def _tree(root):
    return {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*")}


def _offline(monkeypatch):
    """torchvision's download fails as it does offline: it creates raw/, then raises its own message."""
    import torchvision

    def fail(self):
        import os

        os.makedirs(self.raw_folder, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://ossci-datasets.s3.amazonaws"
                           ".com/mnist/, got:\n<urlopen error [Errno -3] Temporary failure in name resolution>\n")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fail)  # FashionMNIST inherits it


def test_data_root_is_the_argument_then_fadjoint_data_then_dot_data(monkeypatch):
    monkeypatch.delenv("FADJOINT_DATA", raising=False)
    assert data.data_root() == data.data_root("") == Path("data")
    monkeypatch.setenv("FADJOINT_DATA", "/from/env")
    assert data.data_root() == data.data_root(None) == Path("/from/env")
    assert data.data_root("/from/flag") == Path("/from/flag")


def test_gzipped_files_are_unpacked_into_the_cache_never_beside_themselves(tmp_path, monkeypatch):
    root, cache = tmp_path / "shared", tmp_path / "cache"
    made = _write_fake_idx_gz(root / "MNIST" / "raw")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    before = _tree(root)
    splits = data.load("mnist", root, normalize=False)
    assert _tree(root) == before  # the data root is never written
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = made[prefix]
        assert torch.equal(splits[split].x, images.reshape(len(images), -1).float() / 255)
        assert torch.equal(splits[split].t, labels.long())
    unpacked = sorted(p.name for p in cache.rglob("*-ubyte"))
    assert unpacked == sorted(["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
                               "train-labels-idx1-ubyte"])
    cached = _tree(cache)
    data.load("mnist", root)
    assert _tree(cache) == cached  # unpacked once, then reused


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_a_failed_download_is_one_line_with_torchvisions_cause_and_leaves_no_folder(tmp_path, monkeypatch,
                                                                                    name, folder):
    _offline(monkeypatch)
    for root in (tmp_path / "new" / "data", tmp_path):  # a root that did not exist, and one that did
        with pytest.raises(data.DatasetNotFoundError) as info:
            data.load(name, root)
        message = str(info.value)
        assert message.splitlines() == [message]
        assert message.startswith(f"{folder} not found under {root / folder / 'raw'} and the download failed: "
                                  "Error downloading train-images-idx3-ubyte.gz:")
        assert "Temporary failure in name resolution" in message
    assert list(tmp_path.iterdir()) == []


def test_offline_training_fails_in_one_line_naming_the_folder_and_the_cause(tmp_path, monkeypatch, capsys):
    from benchmarks import train

    _offline(monkeypatch)
    with pytest.raises(SystemExit) as info:
        train.main(["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--progress", "false"])
    message = str(info.value.code)
    assert message.splitlines() == [message]
    assert message.startswith(f"error: MNIST not found under {tmp_path / 'data' / 'MNIST' / 'raw'} and the "
                              "download failed: Error downloading")
    assert "Temporary failure in name resolution" in message and list(tmp_path.iterdir()) == []


def test_offline_and_absent_the_data_tests_skip_with_the_reason(tmp_path, monkeypatch):
    from tests.conftest import available_data_root

    _offline(monkeypatch)
    monkeypatch.setenv("FADJOINT_DATA", str(tmp_path / "data"))
    with pytest.raises(pytest.skip.Exception, match="no data sets: MNIST not found under .* download failed: "
                                                    "Error downloading"):
        available_data_root()


def _write_cifar(root, per_batch=4):
    """Small CIFAR-10 batches in CIFAR's own python format: pickled {b"data": (N, 3072) uint8 rows, channel first,
    b"labels": [...]}, under <root>/cifar-10-batches-py/."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        written[name] = (data, labels)
    return written


def test_cifar10_is_read_channel_first_and_standardised_per_channel(tmp_path):
    from torch_fadjoint.data import load

    written = _write_cifar(tmp_path)
    raw = load("cifar10", tmp_path, normalize=False, download=False)
    assert raw["train"].x.shape == (20, 3072) and raw["test"].x.shape == (4, 3072)
    first = torch.as_tensor(written["data_batch_1"][0][0], dtype=torch.float32) / 255
    assert torch.equal(raw["train"].x[0], first)  # the file's own row: channel first, as the benchmarks reshape it
    assert raw["train"].t.tolist()[:4] == written["data_batch_1"][1]
    assert raw["test"].t.tolist() == written["test_batch"][1]
    norm = load("cifar10", tmp_path, download=False)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    red = (first[:1024] - mean[0]) / std[0]
    blue = (first[2048:] - mean[2]) / std[2]
    torch.testing.assert_close(norm["train"].x[0, :1024], red, rtol=0, atol=1e-6)
    torch.testing.assert_close(norm["train"].x[0, 2048:], blue, rtol=0, atol=1e-6)


def test_cifar10_missing_is_one_line_without_download(tmp_path):
    from torch_fadjoint.data import DatasetNotFoundError, load

    with pytest.raises(DatasetNotFoundError, match=r"^CIFAR-10 not found under .*cifar-10-batches-py \(set"):
        load("cifar10", tmp_path, download=False)
