"""Test fixtures: every test starts from the same seed (reproducible runs, STYLE T3)."""
import os
from pathlib import Path

import pytest
import torch

DATA_ROOT = Path(os.environ.get("FADJOINT_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def data_root():
    """The folder holding MNIST/ and FashionMNIST/ (FADJOINT_DATA, else ../shared/datasets)."""
    if not (DATA_ROOT / "MNIST" / "raw").is_dir():
        pytest.skip(f"no data sets under {DATA_ROOT} (set FADJOINT_DATA)")
    return DATA_ROOT
