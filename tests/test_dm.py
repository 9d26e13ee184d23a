"""DM: batched loss equals the per-class reference; the method learns something on real data."""
from __future__ import annotations

import pytest
import torch

from fastdd.augment import DSA
from fastdd.methods import get
from fastdd.methods.dm import DMConfig, dm_loss_batched, dm_loss_per_class
from fastdd.models import get_model


@pytest.mark.parametrize("real_chunk", [0, 7])
@pytest.mark.parametrize("use_dsa", [True, False])
@pytest.mark.parametrize("model", ["ConvNet", "ConvNetNN"])
def test_batched_loss_and_gradient_equal_per_class_loop(use_dsa, model, real_chunk):
    g = torch.Generator().manual_seed(3)
    k, n, ipc = 4, 5, 3
    real = torch.randn(k * n, 3, 16, 16, generator=g, dtype=torch.float64)
    real_labels = torch.arange(k).repeat_interleave(n)
    perm = torch.randperm(k * n, generator=g)  # classes need not be contiguous
    real, real_labels = real[perm], real_labels[perm]
    syn = torch.randn(k * ipc, 3, 16, 16, generator=g, dtype=torch.float64)
    syn_labels = torch.arange(k).repeat_interleave(ipc)
    net = get_model(model, 3, k, (16, 16), generator=g).double()
    for p in net.parameters():
        p.requires_grad_(False)
    dsa = DSA() if use_dsa else None
    draw = dsa.draw(k, g, (16, 16)) if use_dsa else None

    s1 = syn.clone().requires_grad_(True)
    batched = dm_loss_batched(net, dsa, draw, real, real_labels, s1, syn_labels, k, real_chunk=real_chunk)
    (g1,) = torch.autograd.grad(batched, s1)
    s2 = syn.clone().requires_grad_(True)
    looped = dm_loss_per_class(net, dsa, draw, real, real_labels, s2, syn_labels, k)
    (g2,) = torch.autograd.grad(looped, s2)
    assert batched.item() > 0
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_dm_step_is_reproducible_and_leaves_global_rng_alone(digits_train):
    state = torch.get_rng_state()
    cls = get("dm")
    runs = []
    for _ in range(2):
        m = cls(DMConfig(ipc=2, iterations=3, batch_real=8, seed=5), digits_train)
        m.fit(progress=False)
        runs.append(m.synthetic_set()["images"])
    assert torch.equal(runs[0], runs[1])
    other = cls(DMConfig(ipc=2, iterations=3, batch_real=8, seed=6), digits_train).fit(progress=False)
    assert not torch.equal(runs[0], other.synthetic_set()["images"])
    assert torch.equal(state, torch.get_rng_state())


def _dm_objective(images, labels, dataset, seeds=range(8)):
    """DM objective over fixed random ConvNetD2s and all real images (no augmentation).

    (Depth 2 on 8x8 digits: depth 3 leaves a 1x1 map whose instance norm acts on 2x2 positions only.)
    """
    total = 0.0
    for seed in seeds:
        net = get_model("ConvNetD2", 1, 10, (8, 8), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            total += float(dm_loss_batched(net, None, None, dataset.images, dataset.labels, images, labels, 10))
    return total / len(seeds)


def test_dm_objective_decreases_and_init_is_the_recorded_real_subset(digits_train):
    m = get("dm")(DMConfig(ipc=3, iterations=80, batch_real=32, seed=0, model="ConvNetD2"), digits_train)
    idx = m.init_indices
    assert torch.equal(m.images.detach(), digits_train.images[idx])
    assert torch.equal(digits_train.labels[idx], m.labels)
    before = _dm_objective(m.images.detach(), m.labels, digits_train)
    m.fit(progress=False)
    after = _dm_objective(m.images.detach(), m.labels, digits_train, seeds=range(100, 108))
    assert after < 0.4 * before, (before, after)


@pytest.mark.parametrize("ipc,batch_real,bad", [(200, 8, "ipc"), (1, 10_000, "batch_real")])
def test_sizes_larger_than_a_class_are_refused(digits_train, ipc, batch_real, bad):
    with pytest.raises(ValueError, match=f"{bad}=.*larger than class"):
        get("dm")(DMConfig(ipc=ipc, batch_real=batch_real), digits_train)


def test_nan_in_dataset_images_is_refused(digits_train):
    import dataclasses

    images = digits_train.images.clone()
    images[3, 0, 2, 2] = float("nan")
    bad = dataclasses.replace(digits_train, images=images)
    with pytest.raises(ValueError, match="dataset.images: contains NaN"):
        get("dm")(DMConfig(ipc=1), bad)


def test_divergence_is_reported_not_silently_saved(digits_train):
    m = get("dm")(DMConfig(ipc=1, iterations=50, batch_real=8, lr_img=1e30), digits_train)
    with pytest.raises(FloatingPointError, match="lr_img"):
        m.fit(progress=False)


def test_unknown_method_lists_registered_ones():
    with pytest.raises(ValueError, match="registered methods: .*dm"):
        get("nope")
