"""fastdd.compat: reference-style scripts run unchanged through ``python -m fastdd.compat``; reference-
layout state dicts load into the compat networks; DiffAugment's seeded siamese semantics; match_loss."""
from __future__ import annotations

import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch import nn

from fastdd.compat import networks as N
from fastdd.compat import utils as U

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "compat_scripts"


def _run(script, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-m", "fastdd.compat", str(SCRIPTS / script), *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    acc = [float(line.split()[-1]) for line in out.stdout.splitlines() if line.startswith("ACCURACY")]
    assert len(acc) == 1 and 0.3 < acc[0] <= 1.0, out.stdout  # a trained 10-class net, far above chance
    return acc[0]


@pytest.mark.parametrize("script,args", [("dm_style.py", ["--Iteration", "2"]),
                                         ("dc_style.py", ["--Iteration", "1", "--batch_real", "16"])])
def test_reference_style_scripts_run_through_the_runner(fmnist, script, args):
    print(script, _run(script, "--epoch_eval_train", "5", *args))


def _reference_layout_convnet(channel=1, width=16, depth=2, classes=10):
    """The reference ConvNet's module layout (features: conv, GroupNorm(C, C), ReLU, AvgPool per block;
    classifier), built independently with torch.nn, 28x28 one-channel input (first padding 3)."""
    layers, c, side = [], channel, 32
    for d in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=3 if channel == 1 and d == 0 else 1),
                   nn.GroupNorm(width, width, affine=True), nn.ReLU(), nn.AvgPool2d(2, 2)]
        c, side = width, side // 2
    return nn.Sequential(*layers), nn.Linear(width * side * side, classes)


def test_reference_layout_state_dict_loads_and_gives_same_embed_and_logits():
    g = torch.Generator().manual_seed(0)
    features, classifier = _reference_layout_convnet()
    ref = nn.Module()
    ref.features, ref.classifier = features, classifier
    _randomise(ref, g)
    net = N.ConvNet(1, 10, net_width=16, net_depth=2, im_size=(28, 28))
    net.load_state_dict(ref.state_dict())  # strict: same names and shapes
    x = torch.randn(5, 1, 28, 28, generator=g)
    emb = features(x).flatten(1)
    torch.testing.assert_close(net.embed(x), emb)
    torch.testing.assert_close(net(x), classifier(emb))


def test_all_reference_networks_build_and_run():
    for c, s in ((1, 28),):  # the 3x32x32 shapes are exercised by fastdd's model tests
        for name in N.__all__:
            net = U.get_network(name, c, 10, (s, s), seed=0)
            y = net(torch.randn(2, c, s, s))
            assert y.shape == (2, 10) and net.embed(torch.randn(2, c, s, s)).shape[0] == 2
    with pytest.raises(ValueError, match="model"):
        U.get_network("NoSuchNet", 1, 10)


def test_diffaugment_equal_seeds_transform_two_batches_identically():
    p = U.ParamDiffAug()
    assert p.aug_mode == "S" and p.latestseed == -1 and p.Siamese is False
    x = torch.randn(6, 3, 32, 32)
    strategy = "color_crop_cutout_flip_scale_rotate"
    for seed in (0, 1, 7, 123):
        a = U.DiffAugment(x, strategy, seed=seed, param=p)
        b = U.DiffAugment(x.clone(), strategy, seed=seed, param=p)
        assert torch.equal(a, b) and p.latestseed == seed and p.batchmode
    # one transform for the whole batch: two equal images stay equal
    twins = torch.randn(1, 3, 32, 32).expand(4, 3, 32, 32).contiguous()
    out = U.DiffAugment(twins, strategy, seed=5, param=p)
    assert all(torch.equal(out[0], out[i]) for i in range(4))
    outs = [U.DiffAugment(x, strategy, seed=s, param=p) for s in range(6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # different seeds, different transforms
    xg = x.clone().requires_grad_(True)
    U.DiffAugment(xg, strategy, seed=3, param=p).sum().backward()
    assert xg.grad is not None


def test_match_loss_and_distance_wb_against_float64_loops():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 2, 3, 3), (4,), (3, 5)]
    gr = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    gs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    expected = 0.0
    for r, s in zip(gr, gs):
        if r.dim() > 1:
            r2, s2 = r.reshape(r.shape[0], -1), s.reshape(s.shape[0], -1)
            expected += sum(1 - float(r2[i] @ s2[i]) / (float(r2[i].norm() * s2[i].norm()) + 1e-6)
                            for i in range(r2.shape[0]))
    args = Namespace(dis_metric="ours", device="cpu")
    assert float(U.match_loss(gs, gr, args)) == pytest.approx(expected, rel=1e-12)
    assert float(U.distance_wb(gr[1], gs[1])) == 0.0
    fr, fs = torch.cat([t.reshape(-1) for t in gr]), torch.cat([t.reshape(-1) for t in gs])
    args.dis_metric = "mse"
    assert float(U.match_loss(gs, gr, args)) == pytest.approx(float(((fs - fr) ** 2).sum()), rel=1e-12)


def test_small_helpers_follow_the_reference():
    assert U.get_loops(10) == (10, 50)
    assert U.get_eval_pool("S", "ConvNetBN", "ConvNet") == ["ConvNet"]
    assert U.get_eval_pool("M", "ConvNet", "ConvNet")[0] == "MLP"
    assert U.get_default_convnet_setting() == (128, 3, "relu", "instancenorm", "avgpooling")
    assert U.get_daparam("MNIST", "ConvNet", "ConvNet", 1)["strategy"] == "crop_scale_rotate"
    ds = U.TensorDataset(torch.zeros(3, 1, 2, 2), torch.arange(3))
    assert len(ds) == 3 and int(ds[2][1]) == 2
    with pytest.raises(ValueError, match="dataset"):
        U.get_dataset("SVHN", None)


# ---------------------------------------------------------------- reference layouts beyond the 1-channel ConvNet
# Each builder below is an independent torch.nn construction of the reference network's module layout (names,
# shapes, forward order) written for these tests; a compat network must load its state dict strictly and
# give the same logits (BatchNorm in eval mode with non-trivial running statistics).

class _RefBasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class _RefResNet18BN(nn.Module):
    """Reference ResNet18BN: conv1/bn1, layer1..4 of two basic blocks, avg_pool2d(., 4), classifier."""

    def __init__(self, channel, classes):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channel, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
            setattr(self, f"layer{i}", nn.Sequential(_RefBasicBlock(cin, planes, stride),
                                                     _RefBasicBlock(planes, planes, 1)))
            cin = planes
        self.classifier = nn.Linear(512, classes)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.classifier(torch.nn.functional.avg_pool2d(h, 4).flatten(1))


class _RefFeaturesHead(nn.Module):
    """``features`` Sequential, flatten, then named linear layers with ReLU between them (LeNet: fc_1..fc_3)."""

    def __init__(self, features, heads):
        super().__init__()
        self.features = features
        self.head_names = [name for name, _ in heads]
        for name, layer in heads:
            setattr(self, name, layer)

    def forward(self, x):
        h = self.features(x).flatten(1)
        for i, name in enumerate(self.head_names):
            h = getattr(self, name)(h)
            h = torch.relu(h) if i + 1 < len(self.head_names) else h
        return h


def _ref_lenet(channel, classes):
    f = nn.Sequential(nn.Conv2d(channel, 6, 5, padding=2 if channel == 1 else 0), nn.ReLU(), nn.MaxPool2d(2, 2),
                      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2))
    return _RefFeaturesHead(f, [("fc_1", nn.Linear(400, 120)), ("fc_2", nn.Linear(120, 84)),
                                ("fc_3", nn.Linear(84, classes))])


def _ref_alexnet_bn(channel, classes):
    layers, cin = [], channel
    for cout, k, pad, pool in ((128, 5, 4 if channel == 1 else 2, True), (192, 5, 2, True), (256, 3, 1, False),
                               (192, 3, 1, False), (192, 3, 1, True)):
        layers += [nn.Conv2d(cin, cout, k, padding=pad), nn.BatchNorm2d(cout), nn.ReLU()]
        layers += [nn.MaxPool2d(2, 2)] if pool else []
        cin = cout
    return _RefFeaturesHead(nn.Sequential(*layers), [("fc", nn.Linear(192 * 16, classes))])


def _ref_vgg11(channel, classes, batchnorm):
    layers, cin = [], channel
    for i, v in enumerate((64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        norm = nn.BatchNorm2d(v) if batchnorm else nn.GroupNorm(v, v, affine=True)
        layers += [nn.Conv2d(cin, v, 3, padding=3 if channel == 1 and i == 0 else 1), norm, nn.ReLU()]
        cin = v
    layers.append(nn.AvgPool2d(1, 1))
    return _RefFeaturesHead(nn.Sequential(*layers), [("classifier", nn.Linear(512, classes))])


def _ref_convnet(channel, classes):
    features, classifier = _reference_layout_convnet(channel=channel, width=16, depth=3, classes=classes)
    return _RefFeaturesHead(features, [("classifier", classifier)])


def _randomise(module, g):
    """Fill every floating tensor of the state dict from ``g`` (running variances kept positive)."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var")
                        else 0.2 * torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("name,channel,make_ref", [
    ("ConvNet", 3, _ref_convnet),
    ("LeNet", 1, _ref_lenet),
    ("LeNet", 3, _ref_lenet),
    ("AlexNetBN", 1, _ref_alexnet_bn),
    ("VGG11", 3, lambda c, k: _ref_vgg11(c, k, False)),
    ("VGG11BN", 1, lambda c, k: _ref_vgg11(c, k, True)),
    ("ResNet18BN", 3, _RefResNet18BN),
    ("ResNet18BN", 1, _RefResNet18BN),
])
def test_reference_layout_state_dicts_of_other_networks_load_and_give_same_logits(name, channel, make_ref):
    g = torch.Generator().manual_seed(11)
    ref = make_ref(channel, 10)
    _randomise(ref, g)
    if name == "ConvNet":
        net = N.ConvNet(channel, 10, net_width=16, net_depth=3, im_size=(32, 32))
    else:
        net = getattr(N, name)(channel, 10)
    net.load_state_dict(ref.state_dict())  # strict: same names and shapes
    ref.eval(), net.eval()
    side = 28 if channel == 1 else 32
    x = torch.randn(3, channel, side, side, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-5)
