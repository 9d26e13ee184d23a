"""Tests for fastdd.data: readers on files of the real formats, path resolution, and the sampler."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastdd.data.paths as paths_mod
from fastdd.data import (
    ClassSampler,
    DatasetNotFoundError,
    ImageDataset,
    dataset_names,
    from_torch_dataset,
    load_dataset,
)
from fastdd.data.digits import digits_split_indices
from fastdd.data.idx import IDXFormatError, parse_idx, read_idx
from fastdd.data.stats import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATION

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------------ helpers
def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode ``arr`` in the IDX format (big-endian, type code from the dtype)."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    header = struct.pack(">HBB", 0, codes[arr.dtype], arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_idx_dataset(directory: Path, n_train: int, n_test: int = 4, gz: bool = True, seed: int = 0):
    """Write an MNIST-style IDX dataset with 28x28 uint8 images; returns the arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, (img, lbl) in (("train", n_train, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
                                 ("test", n_test, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        write_idx(directory / img, x, gz)
        write_idx(directory / lbl, y, gz)
        out[split] = (x, y)
    return out


def to_uint8(ds: ImageDataset) -> np.ndarray:
    """De-normalise back to 0..255 integers."""
    return (ds.denormalize(ds.images) * 255).round().to(torch.uint8).numpy()


@pytest.fixture
def isolated_paths(tmp_path, monkeypatch):
    """No FASTDD_DATA, a fresh HOME and a fake system dir, so tests never see real datasets."""
    home, system = tmp_path / "home", tmp_path / "system"
    home.mkdir()
    system.mkdir()
    monkeypatch.delenv("FASTDD_DATA", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(paths_mod, "SYSTEM_DATA_DIRS", (str(system),))
    return home, system


# ------------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_idx_roundtrip(tmp_path, gz, dtype):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    p = write_idx(tmp_path / "a-idx3-ubyte", arr, gz)
    out = read_idx(p)
    assert out.dtype == np.dtype(dtype) and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


def test_idx_bad_magic_and_sizes(tmp_path):
    good = idx_bytes(np.zeros((2, 3), np.uint8))
    with pytest.raises(IDXFormatError, match="magic"):
        parse_idx(b"\x00\x01" + good[2:])
    with pytest.raises(IDXFormatError, match="magic"):
        parse_idx(good[:2] + b"\x07" + good[3:])  # unknown type code
    with pytest.raises(IDXFormatError, match="shape"):
        parse_idx(good[:-1])  # truncated data
    with pytest.raises(IDXFormatError, match="header"):
        parse_idx(good[:6])
    p = tmp_path / "bad.gz"
    p.write_bytes(b"\x1f\x8b" + b"junk" * 10)
    with pytest.raises(IDXFormatError, match="gzip"):
        read_idx(p)


def test_idx_dataset_load_exact(tmp_path, isolated_paths):
    data = make_idx_dataset(tmp_path / "fm", n_train=30, gz=False)
    ds = load_dataset("fashion-mnist", "train", root=tmp_path / "fm")
    assert ds.images.shape == (30, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64 and ds.num_classes == 10 and ds.channels == 1
    assert ds.mean == (0.2861,) and ds.std == (0.3530,)
    np.testing.assert_array_equal(to_uint8(ds)[:, 0], data["train"][0])
    np.testing.assert_array_equal(ds.labels.numpy(), data["train"][1])
    # exact normalisation formula
    x = torch.from_numpy(data["train"][0]).float()
    assert torch.equal(ds.images[:, 0], (x / 255 - 0.2861) / 0.3530)
    te = load_dataset("mnist", "test", root=tmp_path / "fm")
    assert len(te) == 4 and te.mean == (0.1307,)


def test_idx_mismatched_counts(tmp_path, isolated_paths):
    d = tmp_path / "mnist"
    make_idx_dataset(d, n_train=10)
    write_idx(d / "train-labels-idx1-ubyte", np.zeros(9, np.uint8), gz=True)  # overwrite .gz
    with pytest.raises(IDXFormatError, match="10 images"):
        load_dataset("mnist", root=tmp_path)


def test_real_fashion_mnist():
    if not FMNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST not installed at /usr/share/datasets/fashion-mnist")
    tr = load_dataset("FashionMNIST", "train", root=FMNIST_DIR)
    te = load_dataset("fmnist", "test", root=FMNIST_DIR.parent)
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    assert tr.num_classes == 10 and tr.class_names[0] == "T-shirt/top"
    assert tr.class_counts().tolist() == [6000] * 10
    assert te.class_counts().tolist() == [1000] * 10
    assert abs(float(tr.images.mean())) < 0.01 and abs(float(tr.images.std()) - 1) < 0.01
    assert float(tr.images.min()) == pytest.approx(-0.2861 / 0.3530, abs=1e-6)
    assert float(tr.images.max()) == pytest.approx((1 - 0.2861) / 0.3530, abs=1e-5)


# ------------------------------------------------------------------------------------------------ CIFAR
def _write_cifar_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10_two_batches(tmp_path, isolated_paths):
    d = tmp_path / "parent" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(2)
    batches = []
    for k in (1, 2):
        x = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, 20).tolist()
        _write_cifar_pickle(d / f"data_batch_{k}", {b"batch_label": b"x", b"data": x, b"labels": y})
        batches.append((x, y))
    xt = rng.integers(0, 256, (7, 3072), dtype=np.uint8)
    _write_cifar_pickle(d / "test_batch", {b"data": xt, b"labels": list(range(7))})
    names = [f"c{i}".encode() for i in range(10)]
    _write_cifar_pickle(d / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 20})

    ds = load_dataset("CIFAR_10", root=tmp_path / "parent")  # parent of the dataset folder
    assert ds.images.shape == (40, 3, 32, 32) and ds.class_names[3] == "c3"
    want = np.concatenate([b[0] for b in batches]).reshape(40, 3, 32, 32)
    np.testing.assert_array_equal(to_uint8(ds), want)
    np.testing.assert_array_equal(ds.labels.numpy(), batches[0][1] + batches[1][1])
    assert ds.mean == NORMALIZATION["cifar10"][0]
    te = load_dataset("cifar10", "test", root=d)  # the dataset folder itself
    np.testing.assert_array_equal(to_uint8(te), xt.reshape(7, 3, 32, 32))
    assert te.labels.tolist() == list(range(7))


def test_cifar100(tmp_path, isolated_paths):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (25, 3072), dtype=np.uint8)
    y = rng.integers(0, 100, 25).tolist()
    _write_cifar_pickle(d / "train", {b"data": x, b"fine_labels": y, b"coarse_labels": [0] * 25})
    _write_cifar_pickle(d / "test", {b"data": x[:5], b"fine_labels": y[:5], b"coarse_labels": [0] * 5})
    _write_cifar_pickle(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                     b"coarse_label_names": [b"a"] * 20})
    ds = load_dataset("cifar-100", root=tmp_path)
    assert ds.num_classes == 100 and ds.class_names[99] == "f99"
    np.testing.assert_array_equal(to_uint8(ds), x.reshape(25, 3, 32, 32))
    assert ds.labels.tolist() == y
    assert ds.std == (0.2673, 0.2564, 0.2762)
    assert len(load_dataset("cifar100", "test", root=d)) == 5


def test_cifar_bad_shape(tmp_path, isolated_paths):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    _write_cifar_pickle(d / "data_batch_1", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match="3072"):
        load_dataset("cifar10", root=tmp_path)


# ------------------------------------------------------------------------------------------------ folders
def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "imgs"
    want = {}
    for split, n in (("train", 3), ("val", 2)):
        for c in ("cat", "dog", "eel"):
            for i in range(n):
                a = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
                ext = ".png" if i % 2 == 0 else ".PNG"
                _png(root / split / c / f"{i}{ext}", a)
                want[(split, c, i)] = a
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    ds = load_dataset("imagefolder", "train", root=root)
    assert ds.images.shape == (9, 3, 6, 5) and ds.class_names == ["cat", "dog", "eel"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ds.mean == IMAGENET_MEAN and ds.std == IMAGENET_STD
    np.testing.assert_array_equal(to_uint8(ds)[4], want[("train", "dog", 1)].transpose(2, 0, 1))
    te = load_dataset("image_folder", "test", root=root)  # falls back to val/
    assert len(te) == 6 and te.labels.tolist() == [0, 0, 1, 1, 2, 2]
    small = load_dataset("imagefolder", "train", root=root, image_size=(4, 3))
    assert small.images.shape == (9, 3, 4, 3)
    gray = load_dataset("imagefolder", "train", root=root, mean=(0.5,), std=(0.25,))
    assert gray.images.shape == (9, 1, 6, 5) and gray.mean == (0.5,)
    with pytest.raises(DatasetNotFoundError, match="root"):
        load_dataset("imagefolder")


def test_tiny_imagenet_layout(tmp_path, isolated_paths):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    colours = {"n01": (200, 10, 30), "n02": (5, 120, 250)}
    for w in wnids:
        for i in range(2):
            p = root / "train" / w / "images" / f"{w}_{i}.JPEG"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), colours[w]).save(p, quality=100)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, w in enumerate(["n01", "n02", "n02"]):
        Image.new("RGB", (64, 64), colours[w]).save(root / "val" / "images" / f"val_{i}.JPEG", quality=100)
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")

    tr = load_dataset("tiny-imagenet", "train", root=tmp_path)
    assert tr.images.shape == (4, 3, 64, 64) and tr.class_names == ["n01", "n02"]
    assert tr.labels.tolist() == [0, 0, 1, 1] and tr.mean == IMAGENET_MEAN
    va = load_dataset("TinyImageNet", "val", root=root)
    assert va.split == "test" and va.labels.tolist() == [0, 1, 1]
    px = (va.denormalize(va.images) * 255)[:, :, 32, 32]
    assert torch.allclose(px[0], torch.tensor(colours["n01"], dtype=torch.float32), atol=4)
    assert torch.allclose(px[2], torch.tensor(colours["n02"], dtype=torch.float32), atol=4)
    assert load_dataset("tiny-imagenet", "test", root=root, image_size=(32, 32)).images.shape == (3, 3, 32, 32)
    # alternative val layout val/<wnid>/*
    (root / "val" / "val_annotations.txt").unlink()
    for i, w in enumerate(["n02", "n01"]):
        (root / "val" / w).mkdir()
        Image.new("RGB", (64, 64), colours[w]).save(root / "val" / w / f"v{i}.png")
    (root / "val" / "images").rename(tmp_path / "unused")
    assert load_dataset("tiny-imagenet", "test", root=root).labels.tolist() == [0, 1]


# ------------------------------------------------------------------------------------------------ digits
def test_digits():
    tr, te = load_dataset("digits", "train"), load_dataset("Digits", "test")
    assert tr.images.shape[1:] == (1, 8, 8) and te.images.shape[1:] == (1, 8, 8)
    assert tr.num_classes == te.num_classes == 10 and len(tr) + len(te) == 1797
    assert len(te) == 450 and (te.class_counts() >= 43).all()
    train_idx, test_idx = digits_split_indices()
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    again = load_dataset("digits", "train")
    assert torch.equal(again.images, tr.images) and torch.equal(again.labels, tr.labels)
    # stored constants are the train split's statistics of x/16
    raw = tr.denormalize(tr.images)
    assert float(raw.mean()) == pytest.approx(NORMALIZATION["digits"][0][0], abs=1e-4)
    assert float(raw.std(unbiased=False)) == pytest.approx(NORMALIZATION["digits"][1][0], abs=1e-4)
    assert ((raw * 16) - (raw * 16).round()).abs().max() < 1e-4  # pixel values k/16


# ------------------------------------------------------------------------------------------------ torch Dataset
class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items, classes=None):
        self.items = items
        if classes is not None:
            self.classes = classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_from_torch_dataset_forms():
    from PIL import Image

    rng = np.random.default_rng(5)
    arrs = [rng.integers(0, 256, (4, 5, 3), dtype=np.uint8) for _ in range(3)]
    items = [
        (Image.fromarray(arrs[0]), 2),
        (torch.from_numpy(arrs[1]).permute(2, 0, 1).float() / 255, torch.tensor(0)),
        (arrs[2], np.int64(1)),
    ]
    ds = from_torch_dataset(_ListDataset(items, classes=["a", "b", "c"]), "toy", (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    assert isinstance(ds, ImageDataset) and ds.images.shape == (3, 3, 4, 5)
    assert ds.labels.tolist() == [2, 0, 1] and ds.num_classes == 3 and ds.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(to_uint8(ds), np.stack(arrs).transpose(0, 3, 1, 2))
    gray = from_torch_dataset(_ListDataset([(Image.fromarray(arrs[0]), 0)]), "g", (0.5,), (0.5,), num_classes=4)
    assert gray.images.shape == (1, 1, 4, 5) and gray.num_classes == 4
    with pytest.raises(ValueError, match="differs"):
        from_torch_dataset(_ListDataset([(arrs[0], 0), (arrs[0][:2], 0)]), "bad", (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(TypeError, match="label"):
        from_torch_dataset(_ListDataset([(arrs[0], 0.5)]), "bad", (0.5,) * 3, (0.5,) * 3)


def test_imagedataset_helpers():
    x01 = torch.rand(6, 2, 3, 3)
    ds = ImageDataset("t", "train", torch.zeros(6, 2, 3, 3), torch.tensor([0, 1, 1, 2, 2, 2]), 4,
                      mean=(0.5, 0.2), std=(0.1, 0.4))
    xn = ds.normalize(x01)
    assert torch.allclose(ds.denormalize(xn), x01, atol=1e-6)
    assert float(ds.denormalize(torch.full((2, 3, 3), 100.0)).max()) == 1.0  # clamped
    assert ds.class_counts().tolist() == [1, 2, 3, 0]
    assert ds.to("cpu") is ds and ds.image_size == (3, 3) and len(ds) == 6
    with pytest.raises(ValueError, match="labels"):
        ImageDataset("t", "train", torch.zeros(2, 1, 2, 2), torch.tensor([0, 5]), 3, mean=(0.0,), std=(1.0,))


# ------------------------------------------------------------------------------------------------ names and paths
def test_names():
    assert set(dataset_names()) == {"fashion-mnist", "mnist", "cifar10", "cifar100", "digits",
                                    "tiny-imagenet", "imagefolder"}
    with pytest.raises(ValueError, match="cifar10.*digits"):
        load_dataset("imagenet-21k")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "validation")


def test_path_resolution_order(tmp_path, isolated_paths, monkeypatch):
    home, system = isolated_paths
    explicit, env1, env2 = tmp_path / "explicit", tmp_path / "env1", tmp_path / "env2"
    # different number of training images identifies which copy was read
    make_idx_dataset(system / "fashion-mnist", n_train=11)
    assert len(load_dataset("fashion-mnist")) == 11
    make_idx_dataset(home / ".cache" / "fastdd" / "FashionMNIST" / "raw", n_train=12, gz=False)
    assert len(load_dataset("fashion-mnist")) == 12
    make_idx_dataset(env2 / "FashionMNIST", n_train=13)
    monkeypatch.setenv("FASTDD_DATA", os.pathsep.join([str(env1), str(env2)]))
    assert len(load_dataset("fashion-mnist")) == 13
    make_idx_dataset(env1 / "fashion-mnist", n_train=14)
    assert len(load_dataset("fashion-mnist")) == 14  # earlier FASTDD_DATA entry wins
    make_idx_dataset(explicit, n_train=15)
    assert len(load_dataset("fashion-mnist", root=explicit)) == 15
    # MNIST files sitting directly in a shared parent are not taken for Fashion-MNIST
    make_idx_dataset(tmp_path / "shared", n_train=16)
    monkeypatch.setenv("FASTDD_DATA", str(tmp_path / "shared"))
    assert len(load_dataset("fashion-mnist")) == 12


def test_dataset_not_found_message(tmp_path, isolated_paths, monkeypatch):
    home, system = isolated_paths
    monkeypatch.setenv("FASTDD_DATA", str(tmp_path / "envdir"))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", root=tmp_path / "given")
    err = info.value
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    for d in (tmp_path / "given", tmp_path / "envdir" / "fashion-mnist", home / ".cache" / "fastdd" / "fashion-mnist",
              system / "FashionMNIST" / "raw"):
        assert str(d) in msg and str(d) in err.searched
    assert "fashion-mnist" in msg and "FASTDD_DATA" in msg and "--data-path" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10")


# ------------------------------------------------------------------------------------------------ sampler
def _toy(sizes, seed=0, feat=3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(sizes)])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    images = torch.arange(labels.numel(), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, feat, 2, 2).clone()
    return images, labels  # images[i] is filled with the value i: tracks identity


def test_sampler_basic():
    images, labels = _toy([5, 9, 7])
    s = ClassSampler(images, labels, 3)
    assert s.class_counts.tolist() == [5, 9, 7]
    before = torch.get_rng_state()
    x, y = s.sample(4, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), before)  # global RNG untouched
    assert x.shape == (12, 3, 2, 2) and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    idx = x[:, 0, 0, 0].long()
    assert torch.equal(labels[idx], y)
    for c in range(3):
        assert len(set(idx[c * 4:(c + 1) * 4].tolist())) == 4
    a = s.sample_indices(4, torch.Generator().manual_seed(7))
    b = s.sample_indices(4, torch.Generator().manual_seed(7))
    c = s.sample_indices(4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(7)
    assert not torch.equal(s.sample_indices(4, g), s.sample_indices(4, g))  # independent draws
    first = s.first_indices(3)
    for c in range(3):
        assert first[c].tolist() == torch.nonzero(labels == c).flatten()[:3].tolist()


def test_sampler_errors():
    images, labels = _toy([5, 9, 7, 5])
    s = ClassSampler(images, labels, 4)
    with pytest.raises(ValueError, match=r"n_per_class=6 exceeds class 0 which has 5 images"):
        s.sample(6, torch.Generator())
    with pytest.raises(ValueError, match="n_per_class"):
        s.first_indices(0)
    with pytest.raises(TypeError, match="generator"):
        s.sample_indices(2, None)
    with pytest.raises(ValueError, match="class 3 has no images"):
        ClassSampler(images, labels.clamp(max=2), 4)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ClassSampler(images, labels, 3)
    with pytest.raises(ValueError, match="labels"):
        ClassSampler(images, labels[:-1], 4)


def test_sampler_uniform():
    """Every image of a class is drawn equally often (a permutation prefix, not a biased pick)."""
    images, labels = _toy([4, 6])
    s = ClassSampler(images, labels, 2)
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([s.sample_indices(2, g) for _ in range(600)])  # [600, 2, 2]
    counts = torch.bincount(idx.flatten(), minlength=10).float()
    cls0 = counts[labels == 0]  # expected 600*2/4 = 300 each
    cls1 = counts[labels == 1]  # expected 200 each
    assert (cls0 - 300).abs().max() < 60 and (cls1 - 200).abs().max() < 50


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6), data=st.data())
def test_sampler_property(sizes, data):
    images, labels = _toy(sizes, seed=len(sizes))
    k = len(sizes)
    n = data.draw(st.integers(1, min(sizes)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    s = ClassSampler(images, labels, k)
    idx = s.sample_indices(n, torch.Generator().manual_seed(seed))
    assert idx.shape == (k, n) and idx.dtype == torch.int64
    assert torch.equal(labels[idx], torch.arange(k).view(-1, 1).expand(k, n))
    for c in range(k):
        assert len(set(idx[c].tolist())) == n
    x, y = s.sample(n, torch.Generator().manual_seed(seed))
    assert torch.equal(x[:, 0, 0, 0].long(), idx.flatten()) and torch.equal(y, labels[idx.flatten()])
    smallest = sizes.index(min(sizes))
    with pytest.raises(ValueError, match=f"exceeds class {smallest} which has {min(sizes)} images"):
        s.sample(min(sizes) + 1, torch.Generator())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_cpu_generator_cuda_data():
    images, labels = _toy([5, 8])
    s = ClassSampler(images.cuda(), labels.cuda(), 2)
    x, y = s.sample(3, torch.Generator().manual_seed(0))
    assert x.is_cuda and y.is_cuda
    ref = ClassSampler(images, labels, 2).sample_indices(3, torch.Generator().manual_seed(0))
    assert torch.equal(s.sample_indices(3, torch.Generator().manual_seed(0)).cpu(), ref)
    gx, _ = s.sample(3, torch.Generator(device="cuda").manual_seed(0))
    assert gx.is_cuda
