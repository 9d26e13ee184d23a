"""DM on the real Fashion-MNIST at a small CPU budget beats its paired random baseline.

The same property as the README's headline command (IPC 1, batch-real 32, 300 iterations, 3 models ×
300 epochs: DM beats the initial real subset by ≥ 3 points), at a smaller budget that fits CI.
"""
from __future__ import annotations

from helpers import assert_beats_initial_subset

from fastdd.evaluate import EvalConfig
from fastdd.methods import get

MARGIN = 3.0  # percentage points


def test_dm_beats_its_initial_real_subset_on_fashion_mnist(fmnist):
    train, test = fmnist
    dm = get("dm")
    method = dm(dm.config_cls(ipc=1, iterations=60, batch_real=16, seed=0), train).fit(progress=False)
    assert_beats_initial_subset(method, train, test, EvalConfig(num_models=3, epochs=100, seed=0, faithful_epochs=False), MARGIN)
