"""SRe2L's relabel step (:mod:`fastdd.relabel`): stored soft labels replay bit-exactly through a plain
Dataset / Sampler, a killed relabel resumes to the uninterrupted result, the top-k fold, the storage report
against the reference format, ``fastdd relabel`` + ``fastdd evaluate --soft-labels`` end to end, and the
errors (missing directory, epochs / batch mismatch, another set or teacher, wrong checkpoint)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fastdd.cli import main
from fastdd.data import ImageDataset
from fastdd.relabel import (
    RelabelConfig,
    RelabelStore,
    decode_logits,
    encode_logits,
    epoch_file,
    reference_batch_bytes,
    relabel_set,
    replay_loader,
    storage_report,
)
from fastdd.squeeze import SqueezeConfig, squeeze
from fastdd.teacher import load_teacher

pytestmark = pytest.mark.usefixtures("single_thread")


def toy_dataset(n_per_class=8, classes=3, size=8, seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    images = torch.randn(len(labels), 1, size, size, generator=g) + labels.view(-1, 1, 1, 1).float()
    return ImageDataset("toy", "train", images, labels, classes, mean=(0.5,), std=(0.5,))


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    squeeze(toy_dataset(), SqueezeConfig(model="ConvNetBN", epochs=2, batch_size=8, lr=0.01), out, progress=False)
    net, _ = load_teacher(str(out), 1, 3, (8, 8))
    return str(out), net


def toy_set(n=11):
    ds = toy_dataset(seed=1)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(2))[:n]
    return ds.images[idx].contiguous(), ds.labels[idx].contiguous()


RECIPES = {
    "pad_mixup": dict(preset="cifar", epochs=2, batch_size=4, padding=2),
    "rrc_cutmix": dict(preset="imagenet", epochs=2, batch_size=4),
    "rrc_cutmix_top2": dict(preset="imagenet", epochs=2, batch_size=5, topk=2, fold_temperature=4.0),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_replay_is_bit_exact(tmp_path, toy_teacher, recipe):
    spec, teacher = toy_teacher
    images, labels = toy_set()
    cfg = RelabelConfig(**RECIPES[recipe]).resolved("toy", (8, 8))
    fed = []
    handle = teacher.register_forward_pre_hook(lambda _m, inp: fed.append(inp[0].clone()))
    try:
        meta = relabel_set(images, labels, teacher, cfg, tmp_path, teacher_spec=spec)
    finally:
        handle.remove()
    fed = fed[1:]  # the first call only probes the number of classes
    store = RelabelStore(tmp_path)
    assert store.epochs == 2 and store.batches == -(-11 // cfg.batch_size) and meta["epochs_done"] == 2
    loader, sampler = replay_loader(images, store)
    seen = 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        rec = load_file(str(epoch_file(tmp_path, epoch)))
        for j, (x, soft) in enumerate(loader):
            assert torch.equal(x, fed[seen]), (epoch, j)  # the images the relabel step fed the teacher
            seen += 1
            with torch.no_grad():
                again = encode_logits(teacher(x), cfg.topk, cfg.fold_temperature)
            rows = slice(j * cfg.batch_size, (j + 1) * cfg.batch_size)
            for key, value in again.items():  # the teacher on the replayed batch gives the stored fp16 bytes
                assert value.dtype == rec[key].dtype and torch.equal(value, rec[key][rows]), key
            assert torch.equal(soft, decode_logits(again, 3))
        # every image appears once per epoch; a new epoch draws a new order
        assert torch.equal(rec["order"].long().sort().values, torch.arange(11))
    assert seen == len(fed) == 2 * store.batches
    e0, e1 = (load_file(str(epoch_file(tmp_path, e))) for e in (0, 1))
    assert not torch.equal(e0["order"], e1["order"])
    if cfg.crop == "rrc":
        assert (e0["boxes"][:, 2:] < 8).any()  # some crops are resized
    if cfg.mix == "cutmix":
        assert (e0["mix_lam"] <= 1).all() and (e0["mix_lam"] >= 0).all()
    assert e0["boxes"].dtype == torch.int16 and e0["flips"].dtype == torch.uint8 and e0["order"].dtype == torch.int16


def test_killed_relabel_resumes_to_the_uninterrupted_result(tmp_path, toy_teacher):
    spec, teacher = toy_teacher
    images, labels = toy_set()
    cfg = RelabelConfig(preset="imagenet", epochs=3, batch_size=4).resolved("toy", (8, 8))
    relabel_set(images, labels, teacher, cfg, tmp_path / "full", teacher_spec=spec)
    calls = []

    def kill(_m, _inp):
        calls.append(1)
        if len(calls) == 1 + 3 + 2:  # probe, epoch 0 (3 batches), then in the middle of epoch 1
            raise KeyboardInterrupt

    handle = teacher.register_forward_pre_hook(kill)
    with pytest.raises(KeyboardInterrupt):
        relabel_set(images, labels, teacher, cfg, tmp_path / "cut", teacher_spec=spec)
    handle.remove()
    assert epoch_file(tmp_path / "cut", 0).exists() and not epoch_file(tmp_path / "cut", 1).exists()
    first = epoch_file(tmp_path / "cut", 0).stat().st_mtime_ns
    meta = relabel_set(images, labels, teacher, cfg, tmp_path / "cut", teacher_spec=spec, resume=True)
    assert epoch_file(tmp_path / "cut", 0).stat().st_mtime_ns == first  # kept, not recomputed
    for e in range(3):
        a, b = (load_file(str(epoch_file(tmp_path / d, e))) for d in ("full", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), e
        assert epoch_file(tmp_path / "full", e).read_bytes() == epoch_file(tmp_path / "cut", e).read_bytes()
    assert meta["epochs_done"] == 3
    # more epochs extend the run; other options are refused
    relabel_set(images, labels, teacher, RelabelConfig(**{**cfg.__dict__, "epochs": 4}), tmp_path / "cut",
                teacher_spec=spec, resume=True)
    assert RelabelStore(tmp_path / "cut").epochs == 4
    with pytest.raises(ValueError, match="--resume.*seed"):
        relabel_set(images, labels, teacher, RelabelConfig(**{**cfg.__dict__, "seed": 7}), tmp_path / "cut",
                    resume=True)
    with pytest.raises(ValueError, match="--resume.*another set"):
        relabel_set(images + 1, labels, teacher, cfg, tmp_path / "cut", resume=True)


def test_topk_fold_keeps_the_top_probabilities_and_sums_to_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 5
    t0 = 4.0
    stored = encode_logits(logits, 5, t0)
    assert set(stored) == {"topk_values", "topk_indices", "rest_logit"}
    assert stored["topk_values"].dtype == torch.float16 and stored["topk_indices"].dtype == torch.int16
    folded = torch.softmax(decode_logits(stored, 50) / t0, dim=1)
    full = torch.softmax(logits / t0, dim=1)
    assert torch.allclose(folded.sum(1), torch.ones(6), atol=1e-6)
    top = full.topk(5, dim=1)
    assert torch.equal(stored["topk_indices"].long(), top.indices)
    assert torch.allclose(folded.gather(1, top.indices), top.values, atol=2e-3)  # fp16 logits
    rest = torch.ones_like(full, dtype=torch.bool).scatter(1, top.indices, False)
    assert torch.allclose(folded[rest].view(6, 45).sum(1), 1 - top.values.sum(1), atol=2e-3)  # the mass folded
    assert torch.allclose(folded[rest].view(6, 45).std(1), torch.zeros(6), atol=1e-7)  # spread uniformly
    dense = encode_logits(logits, 0, t0)
    assert set(dense) == {"logits"} and torch.equal(decode_logits(dense, 50), logits.half().float())
    assert set(encode_logits(logits, 50, t0)) == {"logits"}  # k >= K: nothing to fold


def test_storage_report_against_the_reference_format(tmp_path, toy_teacher):
    spec, teacher = toy_teacher
    images, labels = toy_set()
    cfg = RelabelConfig(preset="cifar", epochs=1, batch_size=4).resolved("toy", (8, 8))
    report = relabel_set(images, labels, teacher, cfg, tmp_path, teacher_spec=spec)["storage"]
    assert report["bytes_per_epoch"] == epoch_file(tmp_path, 0).stat().st_size
    assert report["bytes_per_image_per_epoch"] == pytest.approx(report["bytes_per_epoch"] / 11)
    assert report["reference_files_per_epoch"] == 3 and report["ratio_reference_to_this"] > 1
    assert json.loads((tmp_path / "relabel.json").read_text())["storage"] == report
    # ImageNet-1K shapes (IPC 50, batch 1024), analytically: the tensors need 2 bytes per logit plus 8 + 1 + 2 * 4
    big = RelabelConfig(preset="imagenet").resolved("imagenet", (224, 224))
    rep = storage_report(50_000, 1000, big, epoch_bytes=50_000 * 2017)
    assert rep["tensor_bytes_per_image_per_epoch"] == pytest.approx(2017, abs=0.5)
    assert rep["reference_tensor_bytes_per_image_per_epoch"] == 2025
    assert rep["reference_bytes_per_image_per_epoch"] > 2025  # plus a zip container per batch file
    assert reference_batch_bytes(1024, 1000) >= 1024 * 2025
    top = storage_report(50_000, 1000, RelabelConfig(preset="imagenet", topk=10).resolved("imagenet", (224, 224)),
                         epoch_bytes=1)
    assert top["tensor_bytes_per_image_per_epoch"] == pytest.approx(10 * 2 + 10 * 2 + 2 + 17, abs=0.5)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_train):
    """A squeeze teacher on digits and a 2-IPC set of real digits saved as a distilled set."""
    from fastdd.synset import save_synset

    root = tmp_path_factory.mktemp("digits_relabel")
    code = main(["squeeze", "--dataset", "digits", "--model", "ConvNetBN", "--epochs", "2", "--batch-size", "64",
                 "--no-test-accuracy", "--no-progress", "--device", "cpu", "--out", str(root / "teacher")])
    assert code == 0
    idx = torch.cat([torch.nonzero(digits_train.labels == c).flatten()[:2] for c in range(10)])
    meta = {"dataset": "digits", "method": "dm", "num_classes": 10, "mean": list(digits_train.mean),
            "std": list(digits_train.std)}
    save_synset(root / "set", {"images": digits_train.images[idx], "labels": digits_train.labels[idx]},
                {"ipc": 2, "model": "ConvNetBN"}, meta)
    other = digits_train.images[idx].flip(-1)
    save_synset(root / "other", {"images": other, "labels": digits_train.labels[idx]}, {"ipc": 2}, meta)
    return root


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_relabel_then_evaluate_from_stored_labels(digits_run, capsys):
    root = digits_run
    code, out, err = run_cli(capsys, "relabel", str(root / "set"), "--teacher", str(root / "teacher"), "--epochs",
                             "2", "--batch-size", "8", "--seed", "1", "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert "B per image per epoch" in out and "reference format" in out
    meta = json.loads((root / "set" / "relabel" / "relabel.json").read_text())
    assert meta["config"]["preset"] == "cifar" and meta["config"]["mix"] == "mixup" and meta["epochs_done"] == 2
    assert meta["storage"]["bytes_per_image_per_epoch"] < meta["storage"]["reference_bytes_per_image_per_epoch"]
    # a second relabel into the same folder needs --resume (keeps the epochs) or --force
    code, _, err = run_cli(capsys, "relabel", str(root / "set"), "--teacher", str(root / "teacher"), "--device", "cpu")
    assert code == 2 and "--out" in err and "--resume" in err
    code, out, err = run_cli(capsys, "relabel", str(root / "set"), "--teacher", str(root / "teacher"), "--epochs",
                             "2", "--batch-size", "8", "--seed", "1", "--device", "cpu", "--resume", "--no-progress")
    assert code == 0, err
    code, out, err = run_cli(capsys, "evaluate", str(root / "set"), "--protocol", "kd", "--soft-labels",
                             str(root / "set" / "relabel"), "--models", "1", "--compile", "off", "--device", "cpu")
    assert code == 0, err
    report = json.loads((root / "set" / "eval.json").read_text())
    assert report["config"]["epochs"] == 2 and report["config"]["batch_size"] == 8  # from the store
    assert report["config"]["temperature"] == 30.0 and report["soft_labels"].endswith("relabel")
    assert "teacher queried online" in report["baseline_labels"] and "stored soft labels" in report["set_labels"]
    assert "baseline labels" in out
    assert len(report["accuracies"]) == len(report["random_baseline_accuracies"]) == 1


def test_cli_relabel_and_soft_label_errors_name_the_argument(digits_run, tmp_path, capsys, toy_teacher):
    root = digits_run
    rel = root / "set" / "errors_relabel"
    assert run_cli(capsys, "relabel", str(root / "set"), "--teacher", str(root / "teacher"), "--epochs", "1",
                   "--batch-size", "8", "--out", str(rel), "--device", "cpu", "--no-progress")[0] == 0
    other_teacher = tmp_path / "teacher2"
    assert main(["squeeze", "--dataset", "digits", "--model", "ConvNetBN", "--epochs", "1", "--batch-size", "64",
                 "--seed", "5", "--no-test-accuracy", "--no-progress", "--device", "cpu", "--out",
                 str(other_teacher)]) == 0
    capsys.readouterr()
    ev = ("evaluate", str(root / "set"), "--protocol", "kd", "--models", "1", "--device", "cpu")
    cases = [
        ((*ev, "--soft-labels", str(tmp_path / "missing")), "--soft-labels", "not a directory"),
        ((*ev, "--soft-labels", str(root / "set")), "--soft-labels", "not a relabel directory"),
        ((*ev, "--soft-labels", str(rel), "--epochs", "3"), "--epochs", "stores 1"),
        ((*ev, "--soft-labels", str(rel), "--batch-size", "4"), "--batch-size", "batches of 8"),
        ((*ev, "--soft-labels", str(rel), "--teacher", str(other_teacher)), "--teacher", "another teacher"),
        ((*ev, "--soft-labels", str(rel), "--teacher", f"resnet18:{tmp_path / 'missing.pth'}"), "--teacher",
         "does not exist"),
        (("evaluate", str(root / "other"), "--protocol", "kd", "--soft-labels", str(rel), "--device", "cpu"),
         "--soft-labels", "another set"),
        (("evaluate", str(root / "set"), "--soft-labels", str(rel), "--device", "cpu"), "--protocol", "kd protocol"),
        # a teacher of another set (3 classes, 1x8x8 toy images) and a wrong checkpoint
        (("relabel", str(root / "set"), "--teacher", toy_teacher[0], "--out", str(tmp_path / "r1"), "--device",
          "cpu"), "--teacher", "was trained for"),
        (("relabel", str(root / "set"), "--teacher", f"resnet18s:{root / 'teacher' / 'teacher.pt'}", "--out",
          str(tmp_path / "r2"), "--device", "cpu"), "--teacher", "does not fit"),
        (("relabel", str(root / "set"), "--teacher", str(root / "teacher"), "--topk", "-1", "--out",
          str(tmp_path / "r3"), "--device", "cpu"), "topk", "must be"),
    ]
    for argv, flag, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and flag in err and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_rrc_boxes_fit_and_follow_the_area_and_ratio_rule():
    from fastdd.crops import rrc_boxes

    boxes = rrc_boxes(2000, 12, 20, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 12).all() and (left + w <= 20).all()
    assert (h > 0).all() and (w > 0).all()
    frac = (h * w).double() / 240
    assert frac.min() >= 0.04 and frac.max() <= 1  # area in [0.08, 1] up to the rounding of h and w
    assert (w.double() / h).min() >= 0.5 and (w.double() / h).max() <= 2.0  # ratio in [3/4, 4/3] up to rounding
    assert len({tuple(b) for b in boxes.tolist()}) > 500  # independent per image
    assert torch.equal(boxes, rrc_boxes(2000, 12, 20, torch.Generator().manual_seed(0)))


def band_toy(split, n_per_class, seed):
    """3 classes of 1x8x8 images, class c a bright band at rows 3c..3c+1 (as tests/test_kd.py)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    patterns = torch.zeros(3, 1, 8, 8)
    for c in range(3):
        patterns[c, :, 3 * c:3 * c + 2] = 2.0
    images = torch.randn(len(labels), 1, 8, 8, generator=g) * 0.5 + patterns[labels]
    return ImageDataset("toy", split, images, labels, 3, mean=(0.5,), std=(0.5,))


def test_students_learn_from_stored_labels_and_the_online_replay_baseline_matches(tmp_path):
    from fastdd.evaluate import evaluate_synset, protocol_config

    train, test = band_toy("train", 30, 0), band_toy("test", 20, 1)
    squeeze(train, SqueezeConfig(model="ConvNetW32BN", epochs=10, batch_size=16, lr=0.05), tmp_path / "t", test=test,
            progress=False)
    net, _ = load_teacher(str(tmp_path / "t"), 1, 3, (8, 8))
    idx = torch.tensor([0, 1, 30, 31, 60, 61])
    cfg = RelabelConfig(preset="cifar", epochs=60, batch_size=3, crop="none", fold_temperature=1.0).resolved("toy", (8, 8))
    relabel_set(train.images[idx], train.labels[idx], net, cfg, tmp_path / "rel", teacher_spec=str(tmp_path / "t"))
    ev = protocol_config("kd", epochs=60, batch_size=3, num_models=2, model="ConvNetW32", temperature=1.0,
                         compile="off", lr=0.01, soft_labels=str(tmp_path / "rel"))
    d = evaluate_synset(train.images[idx], train.labels[idx], train, test, ev, baseline_indices=idx,
                        progress=False).to_dict()
    assert min(d["accuracies"]) > 60.0, d  # three separable classes, learnt from the stored labels alone
    # the baseline here is the set's own images: labelled online on the replayed draws it gets the stored bits,
    # so its students train identically
    assert d["accuracies"] == d["random_baseline_accuracies"] and "online" in d["baseline_labels"]
