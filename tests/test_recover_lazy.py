"""SRe2L / DWA on a lazily read image folder (``LazyImageFolder``), on a generated ImageNet-layout tree of real
JPEG files (3 classes of 6, 5 and 6 images; one grayscale JPEG, one PNG, one nested folder; every image
resized to the first file's size, as both readers do without ``image_size``).

- DWA's real-image initialisation decodes exactly the drawn files and gives the same initial images, and
  the same set after its units, as the same folder read into memory; SRe2L's noise init decodes nothing.
- A shard built for torchrun (``shard=(rank, world)``) decodes only its own rows; the shards merged equal
  the one-process run.
- Methods that sample the real set at every iteration (DM, DC) refuse a lazy set and say ``--lazy off``;
  IPC larger than a class and an empty class are clear errors.
- ``fastdd distill --method dwa --lazy on`` writes the same set as ``--lazy off``; ``--lazy auto`` reads
  lazily above the size threshold for dwa and in memory for dm.
"""
from __future__ import annotations

import pytest
import torch
from helpers import count_decoded_files, make_tree

from fastdd.data import LazyImageFolder, load_dataset
from fastdd.data.folder import _torchvision_io
from fastdd.methods import get
from fastdd.squeeze import SqueezeConfig, squeeze

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny per-step tensors: a second thread only waits

DWA_OPTIONS = dict(iterations=2, batch_classes=2, seed=3, rho=0.5, perturb_steps=1)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("imagenet") / "imagenet")


def read(tree, lazy: bool):
    """The train split of ``tree``: in memory, or lazily with the Pillow decoder (the same pixels)."""
    extra = dict(decoder="pil") if lazy else {}
    return load_dataset("imagefolder", "train", root=tree, lazy=lazy, **extra)


@pytest.fixture(scope="module")
def teacher(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    squeeze(read(tree, False), SqueezeConfig(model="ConvNetBN", epochs=1, batch_size=8, lr=0.01), out, progress=False)
    return str(out)


@pytest.fixture
def count_decodes(monkeypatch):
    return count_decoded_files(monkeypatch)


def dwa(teacher, dataset, ipc=2, **kw):
    cls = get("dwa")
    return cls(cls.config_cls(teacher=teacher, ipc=ipc, **DWA_OPTIONS), dataset, **kw)


# ------------------------------------------------------------------------------------------------ in process
def test_dwa_real_init_decodes_only_the_drawn_files_and_equals_eager(tree, teacher, count_decodes):
    lazy, eager = read(tree, True), read(tree, False)
    assert isinstance(lazy, LazyImageFolder) and lazy.class_counts().tolist() == [6, 5, 6]
    count_decodes.clear()
    m = dwa(teacher, lazy)
    assert m.init_indices.shape == (6,)
    assert sorted(count_decodes) == sorted(lazy.path(i) for i in m.init_indices.tolist())  # 6 opens, nothing else
    ref = dwa(teacher, eager)
    assert torch.equal(m.init_indices, ref.init_indices)
    assert torch.equal(m.images.detach(), ref.images.detach())  # the same initial images, bit for bit
    count_decodes.clear()
    m.fit(2, progress=False)  # the first unit (IPC index 0, classes 0-1): 2 iterations
    ref.fit(2, progress=False)
    assert torch.equal(m.images.detach(), ref.images.detach())
    m.fit(progress=False)
    ref.fit(progress=False)
    assert count_decodes == []  # synthesis opens no file
    got, want = m.synthetic_set(), ref.synthetic_set()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert m.last_loss == ref.last_loss


def test_sre2l_noise_init_on_a_lazy_folder_decodes_nothing(tree, teacher, count_decodes):
    cls = get("sre2l")
    cfg = cls.config_cls(teacher=teacher, ipc=1, iterations=2, batch_classes=3, seed=1)
    count_decodes.clear()
    m = cls(cfg, read(tree, True)).fit(progress=False)
    assert count_decodes == [] and m.init_indices is None
    ref = cls(cfg, read(tree, False)).fit(progress=False)
    assert torch.equal(m.synthetic_set()["images"], ref.synthetic_set()["images"])


def test_a_shard_decodes_only_its_rows_and_the_merged_shards_equal_one_process(tree, teacher, count_decodes):
    lazy = read(tree, True)
    whole = dwa(teacher, read(tree, False), ipc=3)  # IPC indices 0, 2 -> rank 0; 1 -> rank 1
    start = whole.images.detach().clone()
    shards = []
    for rank in (0, 1):
        count_decodes.clear()
        m = dwa(teacher, lazy, ipc=3, shard=(rank, 2))
        rows = m.shard_rows()
        assert (m.rank, m.world) == (rank, 2) and rows.numel() == 3 * (2 if rank == 0 else 1)
        assert sorted(count_decodes) == sorted(lazy.path(i) for i in m.init_indices[rows].tolist())
        assert torch.equal(m.init_indices, whole.init_indices)  # every rank draws the whole set's indices
        images = m.images.detach()
        assert torch.equal(images[rows], start[rows])
        others = torch.ones(images.shape[0], dtype=torch.bool)
        others[rows] = False
        assert not images[others].any()  # never read on this rank; merge_shards fills them
        with pytest.raises(RuntimeError, match=f"built for rank {rank} of 2"):
            m.shard(1 - rank, 2)  # its initial images hold only its own rows
        shards.append(m.fit(progress=False))
    whole.fit(progress=False)
    merged = shards[0].merge_shards([s.state_dict() for s in shards])
    assert torch.equal(merged.synthetic_set()["images"], whole.synthetic_set()["images"])
    assert merged.iteration == whole.iteration


@pytest.mark.parametrize("name", ["dm", "dc"])
def test_methods_sampling_the_real_set_refuse_a_lazy_folder(tree, name):
    cls = get(name)
    with pytest.raises(ValueError, match=r"needs the training set in memory.*--lazy off"):
        cls(cls.config_cls(ipc=1, iterations=1, batch_real=2), read(tree, True))


def test_lazy_class_size_errors(tree, teacher):
    lazy = read(tree, True)
    with pytest.raises(ValueError, match="ipc=6 is larger than class 1 of imagefolder, which has only 5 images"):
        dwa(teacher, lazy, ipc=6)
    with_empty = LazyImageFolder(lazy.files, lazy.labels, [*lazy.class_names, "n09999999"], name="imagefolder",
                                 split="train", mean=lazy.mean, std=lazy.std, decoder="pil")
    with pytest.raises(ValueError, match="class 3 of imagefolder has no images"):
        dwa(teacher, with_empty, ipc=1)


# ------------------------------------------------------------------------------------------------ command line
def distill_argv(tree, teacher, out, method="dwa", lazy="on", *extra):
    """``fastdd distill`` arguments for ``tree`` (IPC 1, 2 iterations); ``extra`` flags come last and win."""
    flags = ["--rho", "0.5", "--perturb-steps", "1", "--teacher", teacher] if method == "dwa" else ["--batch-real", "2"]
    return ["distill", "--method", method, "--dataset", "imagefolder", "--data-path", str(tree), "--ipc", "1",
            "--iterations", "2", "--seed", "1", "--device", "cpu", "--no-progress", "--no-jpeg", "--lazy", lazy,
            "--out", str(out), *flags, *extra]


def distill(tree, teacher, out, method="dwa", lazy="on", *extra):
    from fastdd.cli import main

    return main(distill_argv(tree, teacher, out, method, lazy, *extra))


def test_distill_cli_lazy_dwa_equals_in_memory_and_dm_says_lazy_off(tree, teacher, tmp_path, capsys, monkeypatch):
    from fastdd.data import registry
    from fastdd.synset import load_synset

    if _torchvision_io() is not None:
        pytest.skip("the CLI's lazy decoder is torchvision here (pixels differ from Pillow's)")
    for lazy in ("on", "off"):
        assert distill(tree, teacher, tmp_path / lazy, lazy=lazy) == 0
    got, want = load_synset(tmp_path / "on"), load_synset(tmp_path / "off")
    for key in ("images", "labels", "init_indices"):
        assert torch.equal(got[key], want[key]), key
    assert got["metadata"]["fingerprint"] != want["metadata"]["fingerprint"]  # a lazy set is identified by its files

    assert distill(tree, teacher, tmp_path / "dm", method="dm") == 2
    assert "--lazy off" in capsys.readouterr().err
    # --lazy auto: lazy above the size threshold for dwa (only the drawn files decoded), in memory for dm
    monkeypatch.setattr(registry, "LAZY_AUTO_BYTES", 0)
    opened = count_decoded_files(monkeypatch)
    assert distill(tree, teacher, tmp_path / "auto", lazy="auto") == 0
    assert len(opened) == 3 + 8  # 1 image per class, and lazy_fingerprint's 8 sampled files
    opened.clear()
    assert distill(tree, teacher, tmp_path / "dm-auto", method="dm", lazy="auto") == 0
    assert len(opened) == 17  # the whole split, in memory


def test_torchrun_dwa_on_a_lazy_folder_equals_one_process(tree, teacher, tmp_path):
    """A real 2-process gloo ``torchrun`` of ``fastdd distill --method dwa --lazy on`` on the JPEG tree (each rank
    decodes its own IPC index's initial images) writes the set of the 1-process ``--lazy on`` run."""
    from helpers import torchrun

    from fastdd.synset import load_synset

    if _torchvision_io() is not None:
        pytest.skip("the CLI's lazy decoder is torchvision here; kept to the Pillow path as the test above")
    flags = ("--ipc", "2", "--batch-classes", "2")  # IPC index 0 on rank 0, 1 on rank 1
    assert distill(tree, teacher, tmp_path / "single", "dwa", "on", *flags) == 0
    proc = torchrun(["-m", "fastdd", *distill_argv(tree, teacher, tmp_path / "two", "dwa", "on", *flags)],
                    timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = load_synset(tmp_path / "two"), load_synset(tmp_path / "single")
    for key in ("images", "labels", "init_indices"):
        assert torch.equal(got[key], want[key]), key
