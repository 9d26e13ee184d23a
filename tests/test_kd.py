"""The soft-label KD evaluation protocol: its loss, MixUp, optimiser groups and schedule, and that
``evaluate_synset(..., protocol kd)`` trains students against a teacher and a paired random baseline."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastdd.crops import beta_draws
from fastdd.data import ImageDataset
from fastdd.evaluate import evaluate_synset, protocol_config
from fastdd.kd import adamw_groups, cosine_epoch_lr, kd_loss, mixup_groups
from fastdd.squeeze import SqueezeConfig, squeeze

pytestmark = pytest.mark.usefixtures("single_thread")


def test_kd_loss_is_batchmean_kl_per_model_summed():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    T = 4.0
    want = sum(F.kl_div(F.log_softmax(s[m] / T, 1), F.softmax(t[m] / T, 1), reduction="batchmean") for m in range(3))
    assert torch.allclose(kd_loss(s, t, T), want, atol=1e-6)
    assert torch.allclose(kd_loss(s, t, T, t_squared=True), want * T * T, atol=1e-5)
    assert float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)


def test_mixup_groups_mixes_within_each_model_and_is_seeded():
    x = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1, 1, 1).expand(2, 4, 1, 2, 2).contiguous()
    a = mixup_groups(x, torch.Generator().manual_seed(0), 0.8)
    b = mixup_groups(x, torch.Generator().manual_seed(0), 0.8)
    assert torch.equal(a, b)
    # model 0 mixes values 0..3 only, model 1 values 4..7 only
    assert a[0].min() >= 0 and a[0].max() <= 3 and a[1].min() >= 4 and a[1].max() <= 7
    assert torch.equal(mixup_groups(x, torch.Generator(), 0.0), x)
    draws = beta_draws(0.8, 4000, torch.Generator().manual_seed(1))
    assert 0 <= float(draws.min()) and float(draws.max()) <= 1
    assert abs(float(draws.mean()) - 0.5) < 0.02  # Beta(a, a) has mean 1/2
    assert abs(float(draws.var()) - 1 / (4 * (2 * 0.8 + 1))) < 0.01  # and variance 1 / (4 (2a + 1))


def test_adamw_groups_and_cosine():
    w, b = torch.zeros(3, 2, requires_grad=True), torch.zeros(3, requires_grad=True)
    groups = adamw_groups([w, b], 0.01)
    assert groups[0]["params"] == [w] and groups[0]["weight_decay"] == 0.01
    assert groups[1]["params"] == [b] and groups[1]["weight_decay"] == 0.0
    assert cosine_epoch_lr(1.0, 0, 10) == 1.0
    assert cosine_epoch_lr(1.0, 5, 10) == pytest.approx(0.5)
    assert cosine_epoch_lr(1.0, 9, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))


def toy(split, n_per_class, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    patterns = torch.zeros(3, 1, 8, 8)
    for c in range(3):  # class c: a bright horizontal band at rows 3c..3c+1 (visible through instance norm)
        patterns[c, :, 3 * c:3 * c + 2] = 2.0
    images = torch.randn(len(labels), 1, 8, 8, generator=g) * 0.5 + patterns[labels]
    return ImageDataset("toy", split, images, labels, 3, mean=(0.5,), std=(0.5,))


def test_kd_protocol_trains_students_from_the_teacher(tmp_path):
    train, test = toy("train", 30, 0), toy("test", 20, 1)
    squeeze(train, SqueezeConfig(model="ConvNetW32BN", epochs=10, batch_size=16, lr=0.05), tmp_path, test=test,
            progress=False)
    # no crop: a 4-pixel shift would move the class band of these 8x8 images
    cfg = protocol_config("kd", epochs=60, batch_size=3, num_models=2, model="ConvNetW32", teacher=str(tmp_path),
                          temperature=1.0, kd_augment="none", compile="off", lr=0.01)
    idx = torch.tensor([0, 1, 30, 31, 60, 61])
    result = evaluate_synset(train.images[idx], train.labels[idx], train, test, cfg, baseline_indices=idx,
                             progress=False)
    d = result.to_dict()
    assert len(d["accuracies"]) == len(d["random_baseline_accuracies"]) == 2
    # three well-separated classes: every student learns from the teacher's soft labels alone
    assert min(d["accuracies"] + d["random_baseline_accuracies"]) > 60.0, d
    with pytest.raises(ValueError, match="teacher"):
        evaluate_synset(train.images[idx], train.labels[idx], train, test,
                        protocol_config("kd", epochs=1, teacher=""), progress=False)
    with pytest.raises(ValueError, match="kd_augment"):
        protocol_config("kd", kd_augment="zoom").validate()


def test_cli_kd_needs_a_usable_teacher(tmp_path, fmnist, capsys):
    from fastdd.cli import main
    from fastdd.synset import save_synset

    train, _ = fmnist
    save_synset(tmp_path, {"images": torch.zeros(10, 1, 28, 28), "labels": torch.arange(10)}, {"ipc": 1},
                {"dataset": "fashion-mnist", "method": "dm", "mean": list(train.mean), "std": list(train.std)})
    for extra, message in (([], "needs a teacher"), (["--teacher", str(tmp_path / "missing.pth")], "not a teacher"),
                           (["--teacher", f"resnet18:{tmp_path / 'missing.pth'}"], "does not exist")):
        code = main(["evaluate", str(tmp_path), "--protocol", "kd", "--device", "cpu", *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
