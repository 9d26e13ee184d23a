"""Every registered method (and the two plug-ins) runs from the command line on the real Fashion-MNIST,
and the set it saves reloads with plain torch (no fastdd) into images of the right shape.

Tiny budgets: this checks the wiring (CLI flags from the config, dataset loading, saving, the
low-rank factor format), not accuracy; the accuracy checks are the per-method real-data tests.
"""
from __future__ import annotations

import pytest
import torch

from fastdd.cli import main
from fastdd.methods import names

COMMON = ["--dataset", "fashion-mnist", "--ipc", "1", "--iterations", "2", "--batch-real", "4", "--device", "cpu",
          "--no-progress", "--model", "ConvNetW32"]
RUNS = {
    "dm": ["--method", "dm"],
    "ddm": ["--method", "ddm", "--ipc", "2"],
    "mim4dd": ["--method", "mim4dd"],
    "dance": ["--method", "dance", "--num-premodel", "1", "--factor", "2"],
    "dm+mim": ["--method", "dm", "--mim-weight", "0.5", "--mim-form", "nce"],
    "dm+rank2": ["--method", "dm", "--rank", "2"],
    "dc": ["--method", "dc"],
    "dsa": ["--method", "dsa"],
    "sre2l": ["--method", "sre2l", "--batch-classes", "5"],
    "dwa": ["--method", "dwa", "--perturb-steps", "2"],
}


@pytest.fixture(scope="module")
def fmnist_experts(tmp_path_factory, fmnist):
    out = tmp_path_factory.mktemp("experts")
    assert main(["pretrain", "--dataset", "fashion-mnist", "--models", "1", "--epochs", "1", "--train-subset", "100",
                 "--model", "ConvNetW32", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def fmnist_teacher(tmp_path_factory, fmnist):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["squeeze", "--dataset", "fashion-mnist", "--epochs", "1", "--train-subset", "100", "--lr", "0.01",
                 "--no-test-accuracy", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    return out


def test_every_registered_method_is_covered():
    assert set(names()) <= {run[1] for run in RUNS.values()}


@pytest.mark.parametrize("label", list(RUNS))
def test_method_runs_from_the_cli_on_fashion_mnist_and_reloads_without_fastdd(label, tmp_path, fmnist, request):
    argv = ["distill", *COMMON, *RUNS[label], "--out", str(tmp_path / "run")]
    if label == "dance":
        argv += ["--experts", str(request.getfixturevalue("fmnist_experts"))]
    if label in ("sre2l", "dwa"):
        argv += ["--teacher", str(request.getfixturevalue("fmnist_teacher"))]
    assert main(argv) == 0
    data = torch.load(tmp_path / "run" / "synthetic.pt", weights_only=True)
    images = data["images"] if "images" in data else data["factor_a"] @ data["factor_b"]
    labels = data["labels"]
    assert images.dtype == torch.float32 and images.shape[1:] == (1, 28, 28)
    assert images.shape[0] == labels.shape[0] and torch.isfinite(images).all()
    per_class = torch.bincount(labels, minlength=10)
    expected = {"ddm": 2, "dance": 4, "dm+rank2": 7}.get(label, 1)  # dance: factor 2 decodes 4 per stored image
    assert per_class.tolist() == [expected] * 10
    assert data["metadata"]["dataset"] == "fashion-mnist"
    if label == "dm+rank2":
        assert "images" not in data  # factors only: the storage of the plain IPC-1 set
        stored = data["factor_a"].numel() + data["factor_b"].numel()
        assert stored <= 10 * 1 * 28 * 28
