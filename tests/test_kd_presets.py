"""KD evaluation presets (spec ``lowrank_dwa_theory.md`` §2.1 / §2.4) and the pieces they use: each preset
resolves to the spec's values, ``auto`` picks by dataset name and image size, an explicit value (keyword or
flag) wins over the preset, a bad preset name is a ValueError naming ``kd_preset``; the warm-up + cosine
schedule equals torchvision's SequentialLR, CutMix / the mix choice / RandomResizedCrop + flip are the
documented per-model / per-sample operations, SGD decays every tensor."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_kd_set_dir

from fastdd.crops import random_resized_crop_flip, rrc_boxes
from fastdd.evaluate import KD_PRESETS, EvalConfig, kd_preset_for, protocol_config
from fastdd.kd import cutmix_groups, kd_epoch_lr, kd_optimizer, mix_groups, mixup_groups

pytestmark = pytest.mark.usefixtures("single_thread")

#: the spec's recipes, written out independently of KD_PRESETS
SPEC = {
    "cifar": dict(epochs=400, batch_size=128, kd_optimizer="adamw", lr=1e-3, weight_decay=0.01, warmup_epochs=0,
                  temperature=30.0, t_squared=False, mixup_alpha=0.8, cutmix_alpha=0.0, kd_augment="crop_flip"),
    "tiny": dict(epochs=200, batch_size=64, kd_optimizer="sgd", lr=0.2, weight_decay=1e-4, warmup_epochs=5,
                 temperature=20.0, t_squared=True, mixup_alpha=0.0, cutmix_alpha=1.0, kd_augment="rrc_flip"),
    "imagenet": dict(epochs=300, batch_size=128, kd_optimizer="adamw", lr=1e-3, weight_decay=0.01, warmup_epochs=0,
                     temperature=20.0, t_squared=False, mixup_alpha=0.0, cutmix_alpha=1.0, kd_augment="rrc_flip"),
}


@pytest.mark.parametrize("preset", ["cifar", "tiny", "imagenet"])
def test_each_preset_resolves_to_the_spec_values(preset):
    cfg = protocol_config("kd", kd_preset=preset).resolved("whatever", (32, 32))
    assert cfg.kd_preset == preset
    assert {k: getattr(cfg, k) for k in SPEC[preset]} == SPEC[preset]
    assert set(KD_PRESETS[preset]) == set(SPEC[preset])
    assert cfg.momentum == 0.9 and cfg.warmup_factor == 0.01 and cfg.kd_min_scale == 0.08 and not cfg.dsa


@pytest.mark.parametrize("name, size, want", [("cifar10", (32, 32), "cifar"), ("fashion-mnist", (28, 28), "cifar"),
                                              ("tiny-imagenet", (64, 64), "tiny"), ("imagefolder", (224, 224),
                                                                                    "imagenet"),
                                              ("imagenette", (128, 160), "imagenet"), ("digits", (8, 8), "cifar")])
def test_auto_picks_by_dataset_name_and_image_size(name, size, want):
    assert kd_preset_for(name, size) == want
    assert protocol_config("kd").resolved(name, size).kd_preset == want


def test_explicit_values_override_the_preset():
    cfg = protocol_config("kd", kd_preset="tiny", lr=0.05, t_squared=False, epochs=7, cutmix_alpha=0.0,
                          mixup_alpha=0.5, warmup_epochs=0).resolved("tiny-imagenet", (64, 64))
    assert (cfg.lr, cfg.t_squared, cfg.epochs, cfg.cutmix_alpha, cfg.mixup_alpha, cfg.warmup_epochs) == \
        (0.05, False, 7, 0.0, 0.5, 0)
    assert (cfg.kd_optimizer, cfg.batch_size, cfg.temperature, cfg.weight_decay) == ("sgd", 64, 20.0, 1e-4)
    # resolving again changes nothing; other protocols are returned as they are
    assert cfg.resolved("cifar10", (32, 32)) == cfg
    dm = protocol_config("dm")
    assert dm.resolved("tiny-imagenet", (64, 64)) is dm


def test_bad_preset_and_kd_values_are_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match=r"^kd_preset: expected one of \['auto', 'cifar', 'tiny', 'imagenet'\], "
                                         r"got 'cifar100'"):
        protocol_config("kd", kd_preset="cifar100").resolved("cifar100", (32, 32))
    with pytest.raises(ValueError, match="^kd_preset"):
        protocol_config("kd", kd_preset="").validate()
    for field, value in (("kd_optimizer", "adam"), ("kd_augment", "zoom"), ("cutmix_alpha", -1.0),
                         ("warmup_factor", 0.0), ("kd_min_scale", 1.5)):
        with pytest.raises(ValueError, match=f"^{field}: "):
            protocol_config("kd", **{field: value}).validate()
    with pytest.raises(ValueError, match=r"^warmup_epochs: must be < epochs \(5\)"):
        protocol_config("kd", epochs=5, warmup_epochs=5).validate()
    with pytest.raises(ValueError, match="^epochs: must be set for the dm protocol"):
        EvalConfig(epochs=None).validate()


def test_warmup_cosine_equals_torchvisions_sequential_lr():
    epochs, warm, base = 12, 5, 0.2
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=base)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warm),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs - warm)], milestones=[warm])
    for e in range(epochs):
        assert kd_epoch_lr(base, e, epochs, warm, 0.01) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()
    assert kd_epoch_lr(1.0, 3, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))  # no warm-up: cosine


def test_cutmix_groups_pastes_one_box_per_model_from_its_own_batch():
    m, b, h, w = 3, 5, 16, 12
    x = torch.arange(m * b, dtype=torch.float32).view(m, b, 1, 1, 1).expand(m, b, 2, h, w).contiguous()
    out = cutmix_groups(x, torch.Generator().manual_seed(3), 1.0)
    assert torch.equal(out, cutmix_groups(x, torch.Generator().manual_seed(3), 1.0))
    for i in range(m):
        own = set(range(i * b, (i + 1) * b))
        assert set(out[i].unique().long().tolist()) <= own  # partners come from the same model's batch
        changed = (out[i] != x[i]).any(1)  # [b, H, W]
        box = changed.any(0)  # one box for the whole batch of model i
        if box.any():
            rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
            assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a rectangle
    assert torch.equal(cutmix_groups(x, torch.Generator(), 0.0), x)


def test_mix_groups_picks_mixup_or_cutmix_per_model():
    x = torch.randn(4, 6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(mix_groups(x, g, 0.8, 0.0), mixup_groups(x, torch.Generator().manual_seed(1), 0.8))
    assert torch.equal(mix_groups(x, torch.Generator().manual_seed(1), 0.0, 1.0),
                       cutmix_groups(x, torch.Generator().manual_seed(1), 1.0))
    assert torch.equal(mix_groups(x, g, 0.0, 0.0), x)
    g = torch.Generator().manual_seed(2)
    coin = torch.rand(4, generator=torch.Generator().manual_seed(2)) < 0.5
    both = mix_groups(x, g, 0.8, 1.0)
    g2 = torch.Generator().manual_seed(2)
    torch.rand(4, generator=g2)
    mixed, cut = mixup_groups(x, g2, 0.8), cutmix_groups(x, g2, 1.0)
    for i in range(4):
        assert torch.equal(both[i], mixed[i] if coin[i] else cut[i])


@pytest.mark.parametrize("size", [(8, 8), (28, 28), (64, 48)])
def test_random_resized_crop_flip_equals_interpolate_per_crop(size):
    x = torch.randn(40, 3, *size, generator=torch.Generator().manual_seed(0))
    out = random_resized_crop_flip(x, torch.Generator().manual_seed(1), (0.08, 1.0))
    g = torch.Generator().manual_seed(1)
    boxes, coins = rrc_boxes(40, *size, g, (0.08, 1.0)), torch.rand(40, generator=g) < 0.5
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        want = F.interpolate(x[i:i + 1, :, top:top + h, left:left + w], size=size, mode="bilinear",
                             align_corners=False)[0]
        want = want.flip(-1) if coins[i] else want
        # fp32: two separable lerps against interpolate's 2-d weights (a few ulps of |x| <= 5)
        assert torch.allclose(out[i], want, rtol=0, atol=2e-5), (i, float((out[i] - want).abs().max()))
    assert not torch.equal(out, x)
    if size[0] == size[1]:  # scale 1 of a square image: the whole image (a 1 x 1 window per output pixel)
        whole = random_resized_crop_flip(x, torch.Generator().manual_seed(1), (1.0, 1.0), flip=False)
        assert torch.equal(whole, x)
    assert torch.isfinite(random_resized_crop_flip(torch.randn(2, 1, 1, 1), torch.Generator())).all()


def test_kd_optimizer_sgd_decays_every_tensor_and_adamw_only_matrices():
    w, b = torch.zeros(3, 2, requires_grad=True), torch.zeros(3, requires_grad=True)
    sgd = kd_optimizer([w, b], "sgd", 0.2, 1e-4, momentum=0.9)
    assert isinstance(sgd, torch.optim.SGD) and len(sgd.param_groups) == 1
    assert sgd.param_groups[0]["weight_decay"] == 1e-4 and sgd.param_groups[0]["momentum"] == 0.9
    adamw = kd_optimizer([w, b], "adamw", 1e-3, 0.01)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.01, 0.0]
    with pytest.raises(ValueError, match="^kd_optimizer"):
        kd_optimizer([w], "lamb", 1.0, 0.0)


# ------------------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def digits_set(tmp_path_factory, digits_train):
    """A `fastdd distill`-style directory: 2 real digits per class and a ConvNetBN teacher squeezed 1 epoch."""
    return make_kd_set_dir(tmp_path_factory.mktemp("kdset"), digits_train, 2) / "set"


def test_cli_kd_preset_flag_and_overrides(digits_set, capsys):
    from fastdd.cli import main

    code = main(["evaluate", str(digits_set), "--protocol", "kd", "--kd-preset", "tiny", "--lr", "0.05",
                 "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "8", "--models", "1", "--device", "cpu",
                 "--compile", "off"])
    out = capsys.readouterr().out
    assert code == 0 and "kd preset tiny" in out, out
    config = json.loads((digits_set / "eval.json").read_text())["config"]
    assert (config["kd_preset"], config["lr"], config["epochs"], config["warmup_epochs"], config["batch_size"]) == \
        ("tiny", 0.05, 2, 1, 8)
    assert (config["kd_optimizer"], config["temperature"], config["t_squared"], config["cutmix_alpha"],
            config["kd_augment"], config["weight_decay"]) == ("sgd", 20.0, True, 1.0, "rrc_flip", 1e-4)
    code = main(["evaluate", str(digits_set), "--protocol", "kd", "--kd-preset", "cifar-100", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "kd_preset: expected one of" in err and "'cifar-100'" in err, err
    assert len(err.strip().splitlines()) == 1, err
