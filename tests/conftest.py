"""Test fixtures: every test starts from the same seed (reproducible runs, STYLE T3)."""
import pytest
import torch

from torch_fadjoint import data as tfa_data


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


def available_data_root():
    """The library's data root (FADJOINT_DATA, else ./data) once MNIST and Fashion-MNIST are readable there
    (torchvision downloads what is missing); skips, with the one-line reason, when they cannot be."""
    try:
        for name in ("mnist", "fashion_mnist"):
            tfa_data.prepare(name)
    except tfa_data.DatasetNotFoundError as exc:
        pytest.skip(f"no data sets: {exc}")
    return tfa_data.data_root()


@pytest.fixture(scope="session")
def data_root():
    return available_data_root()
