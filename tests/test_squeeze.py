"""``fastdd squeeze`` (BN teacher training, exact resume) and teacher loading (squeeze directories and
torchvision-format ResNet-18/50 state dicts), with clear errors for missing or wrong-shape files."""
from __future__ import annotations

import json

import pytest
import torch

from fastdd.cli import main
from fastdd.data import ImageDataset
from fastdd.models import get_model
from fastdd.squeeze import SqueezeConfig, squeeze
from fastdd.teacher import load_teacher


def toy_dataset(n_per_class=12, classes=3, size=8, seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    images = torch.randn(len(labels), 1, size, size, generator=g) + labels.view(-1, 1, 1, 1).float()
    return ImageDataset("toy", "train", images, labels, classes, mean=(0.5,), std=(0.5,))


CFG = dict(model="ConvNetBN", epochs=3, batch_size=8, lr=0.01)


def test_squeeze_writes_a_teacher_that_loads_frozen_in_eval_mode(tmp_path):
    ds = toy_dataset()
    squeeze(ds, SqueezeConfig(**CFG), tmp_path, test=ds, progress=False)
    meta = json.loads((tmp_path / "teacher.json").read_text())
    assert meta["epochs_done"] == 3 and meta["model"] == "ConvNetBN" and 0 <= meta["test_accuracy"] <= 1
    net, info = load_teacher(str(tmp_path), 1, 3, (8, 8))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert info["model"] == "ConvNetBN"
    # the running statistics were trained (not the fresh 0 / 1)
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    assert bn.running_mean.abs().sum() > 0


def test_squeeze_resumes_bit_exactly(tmp_path):
    ds = toy_dataset()
    squeeze(ds, SqueezeConfig(**CFG), tmp_path / "full", progress=False)

    class Killed(Exception):
        pass

    def kill_after_one(epoch):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        squeeze(ds, SqueezeConfig(**CFG), tmp_path / "cut", progress=False, on_epoch=kill_after_one)
    assert not (tmp_path / "cut" / "teacher.pt").exists()
    squeeze(ds, SqueezeConfig(**CFG), tmp_path / "cut", progress=False, resume=True)
    a = torch.load(tmp_path / "full" / "teacher.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "teacher.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_recipe(tmp_path):
    ds = toy_dataset()
    squeeze(ds, SqueezeConfig(**CFG), tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr"):
        squeeze(ds, SqueezeConfig(**dict(CFG, lr=0.05)), tmp_path, progress=False, resume=True)


def test_torchvision_layout_and_parameter_counts():
    # torchvision's published sizes for 1000 classes: ResNet-18 11,689,512 and ResNet-50 25,557,032 parameters
    with torch.device("meta"):
        r18 = get_model("TVResNet18", 3, 1000, (224, 224))
        r50 = get_model("TVResNet50", 3, 1000, (224, 224))
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032
    keys = set(r18.state_dict())
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
              "layer2.0.downsample.1.running_mean", "layer4.1.bn2.weight", "fc.weight", "fc.bias"):
        assert k in keys
    assert "layer3.5.conv3.weight" in r50.state_dict() and "layer4.2.bn3.bias" in r50.state_dict()
    assert r18.conv1.kernel_size == (7, 7)
    small = get_model("TVResNet18S", 3, 100, (32, 32), generator=torch.Generator().manual_seed(0))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_resnet_spec_loads_a_torchvision_state_dict_and_rejects_bad_files(tmp_path):
    net = get_model("TVResNet18", 3, 10, (32, 32), generator=torch.Generator().manual_seed(1))
    state = net.state_dict()
    torch.save(state, tmp_path / "r18.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    for name in ("r18.pth", "wrapped.pth"):
        teacher, info = load_teacher(f"resnet18:{tmp_path / name}", 3, 10, (32, 32))
        assert info["model"] == "TVResNet18"
        assert torch.equal(teacher(x), net(x))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_teacher(f"resnet18:{tmp_path / 'absent.pth'}", 3, 10, (32, 32))
    with pytest.raises(ValueError, match=r"fc.weight: shape \(10, 512\) in the file, \(100, 512\) expected"):
        load_teacher(f"resnet18:{tmp_path / 'r18.pth'}", 3, 100, (32, 32))
    with pytest.raises(ValueError, match="missing key"):
        load_teacher(f"resnet50:{tmp_path / 'r18.pth'}", 3, 10, (32, 32))
    with pytest.raises(FileNotFoundError, match="not a teacher directory"):
        load_teacher(str(tmp_path / "nowhere"), 3, 10, (32, 32))


def test_squeeze_directory_of_another_shape_is_refused(tmp_path):
    squeeze(toy_dataset(), SqueezeConfig(**dict(CFG, epochs=1)), tmp_path, progress=False)
    with pytest.raises(ValueError, match="was trained for"):
        load_teacher(str(tmp_path), 1, 5, (8, 8))


def test_cli_squeeze_then_teacher_errors(tmp_path, fmnist, capsys):
    out = tmp_path / "teacher"
    assert main(["squeeze", "--dataset", "fashion-mnist", "--model", "ConvNetBN", "--epochs", "1",
                 "--train-subset", "100", "--batch-size", "32", "--lr", "0.01", "--no-test-accuracy",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    assert (out / "teacher.pt").exists()
    assert main(["squeeze", "--dataset", "fashion-mnist", "--model", "ConvNet", "--out", str(tmp_path / "x"),
                 "--device", "cpu"]) == 2
    assert "no BatchNorm layer" in capsys.readouterr().err
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    for teacher, message in ((f"resnet18:{tmp_path / 'missing.pth'}", "does not exist"),
                             (f"resnet18:{tmp_path / 'bad.pth'}", "does not fit"),
                             (str(tmp_path / "no-dir"), "not a teacher directory")):
        code = main(["distill", "--method", "sre2l", "--teacher", teacher, "--dataset", "fashion-mnist",
                     "--ipc", "1", "--iterations", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("subset,workers", [(0, 0), (6, 2)], ids=["all-rows", "subset-2-workers"])
def test_lazy_image_folder_squeeze_equals_in_memory(tmp_path, subset, workers):
    """A lazily read JPEG tree (``--lazy on``: batches decoded by DataLoader workers) trains the same teacher,
    bit for bit, as the in-memory read of the same pixels: same shuffles, crops and flips, same subset rows;
    the lazy test split is streamed for the accuracy."""
    from helpers import make_tree

    from fastdd.data import LazyImageFolder, load_dataset

    root = make_tree(tmp_path / "tree", per_class=(5, 6, 5), val_per_class=3)
    kw = dict(root=root, image_size=(12, 12), decoder="pil")
    eager = [load_dataset("imagefolder", s, **kw) for s in ("train", "test")]
    lazy = [load_dataset("imagefolder", s, lazy=True, **kw) for s in ("train", "test")]
    assert all(isinstance(d, LazyImageFolder) for d in lazy)
    cfg = SqueezeConfig(model="ConvNetBN", epochs=2, batch_size=5, lr=0.05, train_subset=subset, seed=3)
    outs = {}
    for name, (train, test) in (("eager", eager), ("lazy", lazy)):
        out = squeeze(train, cfg, tmp_path / name, test=test, progress=False, workers=workers)
        outs[name] = (torch.load(out / "teacher.pt"), json.loads((out / "teacher.json").read_text()))
    for key, value in outs["eager"][0].items():
        assert torch.equal(outs["lazy"][0][key], value), key
    assert outs["lazy"][1]["test_accuracy"] == outs["eager"][1]["test_accuracy"]


def test_cli_squeeze_lazy_folder(tmp_path, capsys):
    """``--lazy on --workers 1`` on a tree of JPEGs of several sizes: without ``--image-size`` the test split
    is read at the training split's size (each split would otherwise take its own first file's); with it,
    every image is resized to it; a malformed size is a usage error naming the flag."""
    from helpers import make_tree

    root = make_tree(tmp_path / "tree", per_class=(4, 4, 4), val_per_class=2)
    argv = ["squeeze", "--dataset", "imagefolder", "--data-path", str(root), "--model", "ConvNetBN", "--epochs",
            "1", "--batch-size", "4", "--lazy", "on", "--workers", "1", "--device", "cpu", "--no-progress"]
    for name, extra in (("t", []), ("t16", ["--image-size", "16x12"])):
        assert main(argv + ["--out", str(tmp_path / name)] + extra) == 0
        meta = json.loads((tmp_path / name / "teacher.json").read_text())
        assert meta["epochs_done"] == 1 and meta["test_accuracy"] is not None
    assert meta["image_size"] == [16, 12]
    for bad in ("16x", "0", "ax3", "2x3x4"):
        assert main(argv + ["--out", str(tmp_path / "bad"), "--image-size", bad]) == 2
        assert "--image-size" in capsys.readouterr().err
