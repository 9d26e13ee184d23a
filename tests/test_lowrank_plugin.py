"""The low-rank plugin (``rank`` > 0) inside the method base class: image count at the same storage,
projection / noise init, factor-only saved sets that reload with plain torch, exact resume, and a real
storage check on Fashion-MNIST."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastdd.checkpoint import load, save_atomic
from fastdd.methods import get
from fastdd.methods.dm import DMConfig
from fastdd.ops.lowrank import lowrank_ipc, lowrank_project
from fastdd.synset import load_synset, save_synset


def _dm(dataset, **kw):
    base = dict(ipc=1, iterations=2, batch_real=8, seed=0, model="ConvNetD2")
    base.update(kw)
    return get("dm")(DMConfig(**base), dataset)


def test_rank_sets_images_per_class_labels_and_projected_real_init(digits_train):
    m = _dm(digits_train, rank=2)
    per_class = lowrank_ipc(1, 8, 8, 2)  # 8x8 digits: floor(64 / (2 * 16)) = 2
    assert per_class == 2 and m.images_per_class == per_class
    assert m.images.shape == (10 * per_class, 1, 8, 8)
    assert torch.equal(m.labels, torch.arange(10).repeat_interleave(per_class))
    real = digits_train.images[m.init_indices]
    a, b = lowrank_project(real, 2)
    torch.testing.assert_close(m.images.detach(), a @ b, rtol=1e-5, atol=1e-5)
    assert sorted(n for n, _ in m.synth.named_parameters()) == ["factor_a", "factor_b"]


def test_rank_noise_init_is_generator_seeded(digits_train):
    m1, m2 = _dm(digits_train, rank=1, init="noise"), _dm(digits_train, rank=1, init="noise")
    assert m1.init_indices is None
    assert torch.equal(m1.synth.factor_a, m2.synth.factor_a)
    assert float(m1.synth.factor_a.detach().std()) == pytest.approx(1.0, abs=0.15)  # N(0, 1) factors, as the reference


def test_rank_larger_than_image_or_class_is_rejected(digits_train):
    with pytest.raises(ValueError, match="rank"):
        _dm(digits_train, rank=9)
    with pytest.raises(ValueError, match=r"ipc \(rank 1: .* images per class\)=\d+ is larger than class"):
        _dm(digits_train, ipc=100, rank=1)  # 4x more images per class than the smallest class holds


def test_lowrank_set_saves_factors_only_and_reloads_with_plain_torch(digits_train, tmp_path):
    m = _dm(digits_train, rank=2).fit(progress=False)
    syn = m.synthetic_set()
    assert "images" not in syn and {"factor_a", "factor_b"} <= set(syn)
    save_synset(tmp_path, syn, m.config.to_dict(), {"mean": [0.5], "std": [0.5]})
    raw = torch.load(tmp_path / "synthetic.pt", weights_only=True)  # no fastdd needed to rebuild the images
    torch.testing.assert_close(raw["factor_a"] @ raw["factor_b"], m.images.detach(), rtol=1e-5, atol=1e-5)
    assert "images" not in raw
    loaded = load_synset(tmp_path)
    torch.testing.assert_close(loaded["images"], m.images.detach(), rtol=1e-5, atol=1e-5)


def test_lowrank_run_resumes_exactly(digits_train, tmp_path):
    full = _dm(digits_train, rank=2, iterations=4).fit(progress=False)
    part = _dm(digits_train, rank=2, iterations=4)
    part.fit(2, progress=False)
    save_atomic(part.state_dict(), tmp_path / "ck.pt")
    resumed = _dm(digits_train, rank=2, iterations=4)
    resumed.load_state_dict(load(tmp_path / "ck.pt"))
    resumed.fit(progress=False)
    assert torch.equal(resumed.synth.factor_a, full.synth.factor_a)
    assert torch.equal(resumed.synth.factor_b, full.synth.factor_b)


def test_lowrank_rank2_fashion_mnist_stores_at_most_the_plain_bytes(fmnist, tmp_path):
    """Acceptance: at rank 2 and the same IPC the low-rank set's stored bytes <= the plain set's."""
    train, _ = fmnist
    idx = torch.cat([torch.nonzero(train.labels == c).flatten()[:80] for c in range(10)])
    small = dataclasses.replace(train, images=train.images[idx], labels=train.labels[idx])
    for ipc in (1, 10):
        plain = _dm(small, ipc=ipc, rank=0, iterations=1, model="ConvNet").synthetic_set()
        low = _dm(small, ipc=ipc, rank=2, iterations=1, model="ConvNet").synthetic_set()
        plain_bytes = plain["images"].numel() * plain["images"].element_size()
        low_bytes = sum(low[k].numel() * low[k].element_size() for k in ("factor_a", "factor_b"))
        assert low["factor_a"].shape[0] == 10 * 7 * ipc  # 28x28, r = 2: 7x more images per class
        assert low_bytes <= plain_bytes, (ipc, low_bytes, plain_bytes)
        # the files written hold the factors, not reconstructed images
        out = tmp_path / f"ipc{ipc}"
        save_synset(out, low, {}, {})
        raw = torch.load(out / "synthetic.pt", weights_only=True)
        tensor_bytes = sum(v.numel() * v.element_size() for k, v in raw.items()
                           if isinstance(v, torch.Tensor) and k != "labels" and k != "init_indices")
        assert tensor_bytes == low_bytes


def test_lowrank_rank2_beats_a_same_storage_random_subset_on_fashion_mnist(fmnist):
    """DM with the plugin at rank 2 (7 images per class in the floats of 1) beats a random real subset of the
    same storage (1 image per class) by a margin, at a small CPU budget."""
    from fastdd.data import ClassSampler, stratified_subset
    from fastdd.evaluate import EvalConfig, evaluate_synset

    train, test = fmnist
    m = get("dm")(DMConfig(ipc=1, rank=2, iterations=60, batch_real=16, seed=0), train).fit(progress=False)
    g = torch.Generator().manual_seed(0)
    same_storage = ClassSampler(train.images, train.labels, 10).sample_indices(1, g).reshape(-1)
    cfg = EvalConfig(num_models=2, epochs=60, seed=0, faithful_epochs=False)
    result = evaluate_synset(m.images.detach(), m.labels, train, stratified_subset(test, 200), cfg,
                             baseline_indices=same_storage).to_dict()
    print(result["accuracy_mean"], result["random_baseline_mean"])
    assert result["accuracy_mean"] >= result["random_baseline_mean"] + 3.0, result
