"""Lazy image-folder reading (fastdd.data.lazy) on a generated ImageNet-layout tree of real JPEG files.

The tree: ``train/<wnid>/...`` and ``val/<wnid>/...`` with 3 classes, JPEGs of varied sizes (40x30,
50x64, ...), one grayscale JPEG, one nested sub-folder and one PNG. Pillow is the decoder tested here
(torchvision does not import on the CI machine; its path is checked where it does).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLASSES, count_decoded_files, make_tree
from helpers import write_image as _write

from fastdd.data import DatasetNotFoundError, LazyImageFolder, load_dataset, make_loader
from fastdd.data.folder import scan_image_folder

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny per-step tensors: a second thread only waits


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("imagenet") / "imagenet")


def lazy_set(root: Path, split: str = "train", **kw) -> LazyImageFolder:
    kw.setdefault("image_size", (24, 20))
    return load_dataset("imagefolder", split, root=root, lazy=True, decoder="pil", **kw)


# ------------------------------------------------------------------------------------------------ index
def test_index_equals_eager_scan(tree):
    ds = lazy_set(tree)
    files, labels, classes = scan_image_folder(tree, "train")
    assert isinstance(ds, LazyImageFolder) and not hasattr(ds, "images")
    assert ds.files == files and ds.labels.tolist() == labels.tolist()
    assert ds.class_names == list(CLASSES) and ds.num_classes == 3
    assert len(ds) == 17 and ds.class_counts().tolist() == [6, 5, 6]
    assert any("extra" in str(f) for f in ds.files) and any(str(f).endswith(".png") for f in ds.files)
    eager = load_dataset("imagefolder", "train", root=tree, image_size=(24, 20))
    assert eager.labels.tolist() == ds.labels.tolist()
    assert (ds.channels, *ds.image_size) == tuple(eager.images.shape[1:]) == (3, 24, 20)
    assert (ds.mean, ds.std, ds.name, ds.split) == (eager.mean, eager.std, eager.name, eager.split)
    # val/ for "test", with the train split's class ids
    te = load_dataset("imagefolder", "test", root=tree, lazy=True, decoder="pil")
    assert te.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert te.image_size == (30, 40)  # the first file's (H, W) without image_size, as the eager reader


def test_index_is_compact_and_picklable(tree):
    ds = lazy_set(tree)
    assert ds._paths.dtype.kind == "S"  # one byte-string array, no per-file Python objects
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[3][0], ds[3][0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("resize", ["direct", "center_crop"])
def test_items_equal_eager_reader(tree, resize):
    ds = lazy_set(tree, resize=resize)
    eager = load_dataset("imagefolder", "train", root=tree, image_size=(24, 20), resize=resize)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 24, 20) and isinstance(y, int)
        assert y == int(eager.labels[i])
        torch.testing.assert_close(x, eager.images[i], rtol=0, atol=0)  # same decoder, same arithmetic


def test_grayscale_and_center_crop_rule(tree):
    gray = lazy_set(tree, mean=(0.5,), std=(0.25,))
    eager = load_dataset("imagefolder", "train", root=tree, image_size=(24, 20), mean=(0.5,), std=(0.25,))
    assert gray.channels == 1 and gray[0][0].shape == (1, 24, 20)
    torch.testing.assert_close(torch.stack([gray[i][0] for i in range(len(gray))]), eager.images, rtol=0, atol=0)
    # center_crop: shorter side to side / crop_fraction, then the centre; by hand for one 50x64 (W x H) file
    from PIL import Image

    ds = lazy_set(tree, image_size=(16, 16), resize="center_crop", crop_fraction=0.5)
    i = next(j for j, f in enumerate(ds.files) if Image.open(f).size == (50, 64))
    with Image.open(ds.path(i)) as im:
        im = im.convert("RGB").resize((32, 41), Image.BILINEAR)  # shorter side 50 -> 16 / 0.5 = 32
        want = np.asarray(im)[12:28, 8:24].transpose(2, 0, 1)  # top round(25 / 2) = 12, left 8
    np.testing.assert_array_equal(ds.pixels(i), want)


def test_dataloader_workers_match_single_process(tree):
    ds = lazy_set(tree)
    batches0 = list(make_loader(ds, batch_size=4, workers=0))
    batches2 = list(make_loader(ds, batch_size=4, workers=2))
    assert len(batches0) == len(batches2) == 5
    for (x0, y0), (x2, y2) in zip(batches0, batches2):
        torch.testing.assert_close(x2, x0, rtol=0, atol=0)
        assert y2.tolist() == y0.tolist()
    assert torch.cat([y for _, y in batches0]).tolist() == ds.labels.tolist()


# ------------------------------------------------------------------------------------------------ few per class
@pytest.fixture
def count_decodes(monkeypatch):
    return count_decoded_files(monkeypatch)


def test_class_images_reads_only_the_chosen_files(tree, count_decodes):
    ds = lazy_set(tree)
    x, idx = ds.class_images(1, 3, torch.Generator().manual_seed(5))
    assert x.shape == (3, 3, 24, 20) and idx.shape == (3,) and len(set(idx.tolist())) == 3
    assert (ds.labels[idx] == 1).all()
    assert sorted(count_decodes) == sorted(ds.path(i) for i in idx.tolist())  # 3 opens, nothing else
    torch.testing.assert_close(x, torch.stack([ds[i][0] for i in idx.tolist()]), rtol=0, atol=0)
    x2, idx2 = ds.class_images(1, 3, torch.Generator().manual_seed(5))  # reproducible from the generator
    assert idx2.tolist() == idx.tolist() and torch.equal(x2, x)
    draws = {tuple(ds.class_images(1, 3, torch.Generator().manual_seed(s))[1].tolist()) for s in range(8)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="ipc=6 exceeds class 1"):
        ds.class_images(1, 6, torch.Generator())
    with pytest.raises(ValueError, match="class 3"):
        ds.class_images(3, 1, torch.Generator())


def test_sample_indices_match_in_memory_sampler(tree, count_decodes):
    from fastdd.data import ClassSampler

    ds = lazy_set(tree)
    eager = load_dataset("imagefolder", "train", root=tree, image_size=(24, 20))
    count_decodes.clear()
    idx = ds.sample_indices(2, torch.Generator().manual_seed(3))
    assert count_decodes == []  # choosing indices opens no file
    want = ClassSampler(eager.images, eager.labels, 3).sample_indices(2, torch.Generator().manual_seed(3))
    assert idx.tolist() == want.tolist()
    x = ds.images_at(idx)
    assert len(count_decodes) == 6
    torch.testing.assert_close(x, eager.images[want.reshape(-1)], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ evaluation
def test_lazy_evaluation_equals_in_memory(tree):
    from fastdd.evaluate import EvalConfig, evaluate_synset

    size = (16, 16)
    train_mem = load_dataset("imagefolder", "train", root=tree, image_size=size)
    test_mem = load_dataset("imagefolder", "test", root=tree, image_size=size)
    train_lazy = lazy_set(tree, image_size=size)
    test_lazy = lazy_set(tree, "test", image_size=size)
    g = torch.Generator().manual_seed(0)
    syn = torch.randn(6, 3, *size, generator=g)
    syn_labels = torch.arange(3).repeat_interleave(2)
    cfg = EvalConfig(model="ConvNet", num_models=2, epochs=3, batch_size=4, dsa=False, test_batch_size=5,
                     compile="off", workers=0)
    want = evaluate_synset(syn, syn_labels, train_mem, test_mem, cfg, progress=False)
    got = evaluate_synset(syn, syn_labels, train_lazy, test_lazy, cfg, progress=False)
    assert got.accuracies == want.accuracies
    assert got.baseline_accuracies == want.baseline_accuracies  # same baseline draw, decoded on its own
    import dataclasses

    got2 = evaluate_synset(syn, syn_labels, train_mem, test_lazy, dataclasses.replace(cfg, workers=2),
                           progress=False)
    assert got2.accuracies == want.accuracies and got2.baseline_accuracies == want.baseline_accuracies


def test_stream_accuracy_counts_every_row(tree):
    from fastdd.evaluate import EvalConfig, accuracy_stacked, accuracy_stream, fresh_models

    size = (16, 16)
    test_mem = load_dataset("imagefolder", "test", root=tree, image_size=size)
    test_lazy = lazy_set(tree, "test", image_size=size)
    cfg = EvalConfig(model="ConvNet", num_models=3, compile="off")
    net = fresh_models(cfg, [0, 1, 2], 3, 3, size, torch.device("cpu"), calls=0)
    want = accuracy_stacked(net, test_mem.images, test_mem.labels, 5)
    for bs in (5, 7, 0):  # a ragged last batch; the default size
        torch.testing.assert_close(accuracy_stream(net, test_lazy, bs), want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ errors
def test_corrupt_jpeg_names_the_file(tmp_path):
    root = make_tree(tmp_path / "t", per_class=(2, 2, 2), val_per_class=1)
    bad = root / "train" / CLASSES[1] / f"{CLASSES[1]}_0001.JPEG"
    bad.write_bytes(bad.read_bytes()[:40] + b"\x00garbage" * 8)  # header kept, data broken
    junk = root / "train" / CLASSES[2] / "zz_not_a_jpeg.jpg"
    junk.write_bytes(b"this is not an image")
    ds = lazy_set(root)
    i_bad, i_junk = ds.files.index(bad), ds.files.index(junk)
    with pytest.raises(ValueError, match=f"{bad.name}: cannot decode image"):
        ds[i_bad]
    with pytest.raises(ValueError, match=f"{junk.name}: cannot decode image"):
        ds[i_junk]
    with pytest.raises(Exception, match=bad.name):  # re-raised from a DataLoader worker, still naming it
        list(make_loader(ds, batch_size=len(ds), workers=1))
    ds[0]  # the other files still read


def test_empty_trees_are_clear_errors(tmp_path):
    root = tmp_path / "empty"
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "b").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no images"):
        load_dataset("imagefolder", "train", root=root, lazy=True)
    (root / "val").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images"):
        load_dataset("imagefolder", "val", root=root, lazy=True)
    # one class folder empty: the class exists (its id is kept) but cannot give images
    rng = np.random.default_rng(0)
    _write(root / "train" / "a" / "x.jpg", rng, (20, 20))
    ds = load_dataset("imagefolder", "train", root=root, lazy=True, decoder="pil")
    assert ds.class_names == ["a", "b"] and ds.class_counts().tolist() == [1, 0]
    with pytest.raises(ValueError, match="class 1 has no images"):
        ds.sample_indices(1, torch.Generator())
    with pytest.raises(ValueError, match=r"ipc=1 exceeds class 1 \(b\), which has 0 images"):
        ds.class_images(1, 1, torch.Generator())
    with pytest.raises(DatasetNotFoundError, match="no class sub-folders"):
        (tmp_path / "none" / "train").mkdir(parents=True)
        load_dataset("imagefolder", "train", root=tmp_path / "none", lazy=True)


def test_load_dataset_lazy_options(tree, monkeypatch):
    from fastdd.data import registry

    with pytest.raises(ValueError, match="lazy: fashion-mnist is read from array files"):
        load_dataset("fashion-mnist", lazy=True)
    with pytest.raises(ValueError, match="lazy: expected"):
        load_dataset("imagefolder", root=tree, lazy="yes")
    with pytest.raises(ValueError, match="resize: expected"):
        load_dataset("imagefolder", root=tree, resize="stretch")
    with pytest.raises(ValueError, match="decoder: expected"):
        load_dataset("imagefolder", root=tree, lazy=True, decoder="cv2")
    assert not isinstance(load_dataset("imagefolder", root=tree, lazy="auto"), LazyImageFolder)
    monkeypatch.setattr(registry, "LAZY_AUTO_BYTES", 17 * 3 * 24 * 20 * 4 - 1)  # just below this split
    assert isinstance(load_dataset("imagefolder", root=tree, lazy="auto", image_size=(24, 20)), LazyImageFolder)
    assert not isinstance(load_dataset("imagefolder", root=tree, lazy="auto", image_size=(24, 19)),
                          LazyImageFolder)


def test_decoder_choice():
    from fastdd.data.folder import _torchvision_io, resolve_decoder

    assert resolve_decoder("pil") == "pil"
    if _torchvision_io() is None:
        assert resolve_decoder("auto") == "pil"
        with pytest.raises(ValueError, match="torchvision does not import"):
            resolve_decoder("torchvision")
    else:
        assert resolve_decoder("auto") == "torchvision"


def test_torchvision_decoder_close_to_pillow(tree):
    from fastdd.data.folder import _torchvision_io

    if _torchvision_io() is None:
        pytest.skip("torchvision does not import here")
    pil = lazy_set(tree, image_size=(30, 40))
    tv = load_dataset("imagefolder", "train", root=tree, lazy=True, decoder="torchvision", image_size=(30, 40))
    for i in range(len(pil)):  # decoders and resamplers differ by rounding (libjpeg IDCT, antialias filter)
        diff = (tv.pixels(i).astype(int) - pil.pixels(i).astype(int)).__abs__()
        assert diff.mean() < 4, (pil.path(i), diff.mean())


def test_evaluate_cli_streams_a_lazy_test_split(tmp_path):
    """``fastdd evaluate --lazy on --workers 1`` on an image-folder set: the same accuracies as in memory."""
    import json

    from fastdd.cli import main
    from fastdd.synset import save_synset

    rng = np.random.default_rng(2)
    root = tmp_path / "uniform"  # the CLI takes each split's first image size: one size for all files
    for split, n in (("train", 3), ("val", 4)):
        for wnid in CLASSES:
            for i in range(n):
                _write(root / split / wnid / f"{wnid}_{i}.JPEG", rng, (20, 16))
    out = tmp_path / "run"
    images = torch.randn(3, 3, 16, 20, generator=torch.Generator().manual_seed(1))
    save_synset(out, {"images": images, "labels": torch.arange(3)}, config={"model": "ConvNet", "ipc": 1},
                metadata={"dataset": "imagefolder", "method": "dm"})
    results = {}
    for lazy, workers in (("off", "0"), ("on", "1")):
        rc = main(["evaluate", str(out), "--data-path", str(root), "--device", "cpu", "--models", "1",
                   "--epochs", "2", "--no-dsa", "--compile", "off", "--lazy", lazy, "--workers", workers,
                   "--test-batch-size", "5"])
        assert rc == 0
        results[lazy] = json.loads((out / "eval.json").read_text())
    assert results["on"]["accuracies"] == results["off"]["accuracies"]
    assert results["on"]["random_baseline_accuracies"] == results["off"]["random_baseline_accuracies"]
    assert main(["evaluate", str(out), "--data-path", str(root), "--device", "cpu", "--lazy", "maybe"]) == 2


def test_no_pixels_held(tree):
    ds = lazy_set(tree)
    tensors = [v for v in vars(ds).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in tensors) == len(ds)  # the labels only
    assert os.fspath(ds.path(0)).startswith(os.fspath(tree))
