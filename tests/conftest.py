"""Shared fixtures: small real datasets (digits always; Fashion-MNIST where the Debian package is)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running the tests from a source tree without installing
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module of small per-step tensors (a second OpenMP thread only adds
    synchronisation there); the count is restored after the module. Use with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_train():
    from fastdd.data import load_dataset

    return load_dataset("digits", "train")


@pytest.fixture(scope="session")
def digits_test():
    from fastdd.data import load_dataset

    return load_dataset("digits", "test")


@pytest.fixture(scope="session")
def fmnist():
    """(train, test) of the real Fashion-MNIST, skipping when it is not installed."""
    from fastdd.data import DatasetNotFoundError, load_dataset

    try:
        return load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    except DatasetNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
