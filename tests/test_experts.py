"""Expert pre-training (DANCE §2.1) and the IDC helpers: resume exactness, CutMix, decode, bad input."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fastdd.experts import PretrainConfig, available_experts, init_file, load_experts, pretrain_experts, trained_file
from fastdd.idc import IDCAugment, cutmix, cutmix_loss, decode, mosaic, multistep_lr

TINY = dict(models=2, epochs=2, train_subset=100, batch_size=32, seed=5)


class _Stop(Exception):
    pass


def _weights(d, i):
    return torch.load(d / trained_file(i), weights_only=True)


def test_killed_pretraining_resumes_to_identical_weights(tmp_path, digits_train):
    cfg = PretrainConfig(**TINY)
    straight = pretrain_experts(digits_train, cfg, tmp_path / "a", progress=False)

    def stop(i, epoch):  # "kill" model 1 after its first epoch (model 0 already finished)
        if (i, epoch) == (1, 1):
            raise _Stop

    with pytest.raises(_Stop):
        pretrain_experts(digits_train, cfg, tmp_path / "b", progress=False, on_epoch=stop)
    assert available_experts(tmp_path / "b") == 1 and (tmp_path / "b" / "pretrain_state.pt").exists()
    resumed = pretrain_experts(digits_train, cfg, tmp_path / "b", progress=False, resume=True)
    for i in range(2):
        for name in (init_file(i), trained_file(i)):
            a = torch.load(straight / name, weights_only=True)
            b = torch.load(resumed / name, weights_only=True)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not (resumed / "pretrain_state.pt").exists()
    meta = json.loads((resumed / "experts.json").read_text())
    assert meta["finished_models"] == 2 and meta["image_size"] == [8, 8]
    # training moved the weights away from the initialisation, and the two experts differ
    init0 = torch.load(straight / init_file(0), weights_only=True)
    w0, w1 = _weights(straight, 0), _weights(straight, 1)
    assert any(not torch.equal(init0[k], w0[k]) for k in w0)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


def test_pretrain_refuses_to_overwrite_and_checks_config_on_resume(tmp_path, digits_train):
    cfg = PretrainConfig(**dict(TINY, models=1, epochs=1))
    pretrain_experts(digits_train, cfg, tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain_experts(digits_train, cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr"):
        pretrain_experts(digits_train, PretrainConfig(**dict(TINY, models=1, epochs=1, lr=0.1)), tmp_path,
                         progress=False, resume=True)


def test_load_experts_bad_input(tmp_path, digits_train):
    with pytest.raises(FileNotFoundError, match="fastdd pretrain"):
        load_experts(tmp_path / "missing", 1)
    pretrain_experts(digits_train, PretrainConfig(**dict(TINY, models=1, epochs=1)), tmp_path, progress=False)
    meta, pairs = load_experts(tmp_path, 1)
    assert meta["num_classes"] == 10 and len(pairs) == 1
    with pytest.raises(ValueError, match="num_premodel=3 is larger than the 1 finished experts"):
        load_experts(tmp_path, 3)
    with pytest.raises(ValueError, match="train_subset"):
        PretrainConfig(train_subset=-1).validate()


def test_multistep_milestones_are_two_thirds_and_five_sixths():
    lrs = [multistep_lr(0.01, e, 60) for e in range(60)]
    assert lrs[39] == 0.01 and lrs[40] == pytest.approx(0.002) and lrs[49] == pytest.approx(0.002)
    assert lrs[50] == pytest.approx(0.0004) and lrs[59] == pytest.approx(0.0004)


def test_cutmix_box_and_ratio():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(4 * 6 * 1 * 10 * 10, dtype=torch.float64).reshape(4, 6, 1, 10, 10)
    y = torch.arange(24).reshape(4, 6) % 10
    out, ya, yb, lam = cutmix(x, y, g, p=1.0)
    for m in range(4):
        changed = (out[m] != x[m]).any(0).any(0)  # [H, W] pixels taken from another sample
        # lam = 1 - pasted area / HW (the box may paste a sample onto itself, so <= holds for "changed")
        assert int(changed.sum()) <= round((1 - float(lam[m])) * 100)
        assert torch.equal(ya[m], y[m])
    none = cutmix(x, y, g, p=0.0)
    assert torch.equal(none[0], x) and torch.equal(none[2], y) and torch.equal(none[3], torch.ones(4, dtype=x.dtype))
    logits = torch.randn(4, 6, 10, dtype=torch.float64, generator=torch.Generator(device='cpu').manual_seed(1000))
    ref = sum(float(lam[m]) * F.cross_entropy(logits[m], ya[m]) + (1 - float(lam[m])) * F.cross_entropy(logits[m], yb[m])
              for m in range(4))
    assert torch.allclose(cutmix_loss(logits, ya, yb, lam), ref)


def _decode_reference(stored, f):
    """Plain loop: tile (i, j) of each image, bilinear upsample (align_corners False)."""
    n, c, h, w = stored.shape
    th, tw = h // f, w // f
    out = []
    for k in range(n):
        for i in range(f):
            for j in range(f):
                tile = stored[k:k + 1, :, i * th:(i + 1) * th, j * tw:(j + 1) * tw]
                out.append(F.interpolate(tile, size=(h, w), mode="bilinear", align_corners=False))
    return torch.cat(out)


def test_decode_factor_2_matches_crop_and_bilinear_upsample():
    x = torch.rand(3, 2, 8, 6, dtype=torch.float64, requires_grad=True, generator=torch.Generator(device='cpu').manual_seed(1001))
    out = decode(x, 2)
    assert out.shape == (12, 2, 8, 6)
    assert torch.allclose(out, _decode_reference(x, 2))
    assert decode(x, 1) is x
    torch.autograd.gradcheck(lambda t: decode(t, 2), (x[:1].detach().clone().requires_grad_(),))
    # odd size: padded with 0.5 at the bottom/right before tiling
    odd = torch.rand(1, 1, 7, 7, dtype=torch.float64, generator=torch.Generator(device='cpu').manual_seed(1002))
    padded = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)
    padded[..., :7, :7] = odd
    tiles = padded.reshape(1, 1, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(4, 1, 4, 4)
    assert torch.allclose(decode(odd, 2), F.interpolate(tiles, size=(7, 7), mode="bilinear", align_corners=False))


def test_mosaic_is_read_back_by_decode():
    imgs = torch.rand(8, 1, 8, 8, dtype=torch.float64, generator=torch.Generator(device='cpu').manual_seed(1003))
    stored = mosaic(imgs, 2)
    assert stored.shape == (2, 1, 8, 8)
    small = F.interpolate(imgs, size=(4, 4), mode="nearest")
    assert torch.allclose(decode(stored, 2), F.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False))
    with pytest.raises(ValueError, match="divisible"):
        mosaic(torch.rand(4, 1, 7, 7), 2)


def test_idc_augment_composition_and_sharing():
    aug = IDCAugment("color_crop_flip_scale_rotate")
    assert [s.ops for s in aug.stages] == [("flip", "color"), ("crop", "scale", "rotate")]
    assert [s.mode for s in aug.stages] == ["M", "S"]
    cond = IDCAugment("color_crop_cutout")
    assert [s.ops for s in cond.stages] == [("color",), ("crop",), ("cutout",)]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator(device='cpu').manual_seed(1004))
    a, b = cond.shared([x, x[:2]], g)
    assert torch.equal(a[:2], b)  # one parameter set for both tensors
    y = aug.per_sample(x, g)
    assert y.shape == x.shape and not torch.equal(y, x)
