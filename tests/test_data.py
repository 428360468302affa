"""MNIST / Fashion-MNIST through torchvision from FADJOINT_DATA (gzipped IDX unpacked on first use)."""
import subprocess
import sys

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
