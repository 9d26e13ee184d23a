"""``fastdd evaluate --protocol kd`` under torchrun: 2 gloo processes train the students with
DistributedDataParallel and give the 1-process result; only rank 0 writes and prints.

- ``tests/kd_ddp_worker.py`` (FMNIST-shaped random data, 7 images, global batch 3 so that rank 1 holds no row
  of the last batch of each epoch, 3 epochs, 2+2 ConvNetW32 students, a ConvNetBN teacher): the online protocol
  with the cifar preset (AdamW, crop + flip, MixUp; the models looped, and stacked under one ``vmap`` as on
  CUDA) and with the tiny preset (SGD, warm-up, RRC + flip, CutMix, T^2), and the stored-label protocol; the final weights and test accuracies of the 2-process run against the
  same function called in-process with ``ddp=False``.
- the command line on the bundled digits (real data): ``eval.json`` of a 2-process run against the 1-process one.

Tolerance. The two runs compute the same global batches, draws and losses; they differ only in the order of
floating-point sums: DDP sums the two ranks' gradients (each a sum over its rows) where one process sums over
the whole batch, and the teacher and students run on batches of other sizes (other oneDNN blockings). Those
rounding differences (fp32, ~1e-7 relative) are amplified by the 9 optimiser steps: measured at most 7e-5 on
weights of magnitude <= 0.3 (the largest with the tiny preset: lr 0.2 and the T^2 = 400 factor) and 1.3e-4 on
logits of magnitude 3. The test allows 5e-4 absolute on every weight and 5e-4 x the largest logit on the
logits; the accuracies must be equal. Conv biases before instance norm have no true gradient, so Adam moves
them by rounding noise alone; they are included (their differences are ~3e-6)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import kd_ddp_worker as worker
import pytest
import torch
from helpers import make_kd_set_dir, torchrun

from fastdd.cli import main

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_ATOL = 5e-4
LOGIT_RTOL = 5e-4

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------ weights
@pytest.fixture(scope="module")
def fake_teacher_and_store(tmp_path_factory):
    """(teacher dir, relabel dir): a ConvNetBN teacher squeezed 1 epoch on 40 FMNIST-shaped random images, and
    3 epochs of its soft labels (cifar preset, batch 3) for the worker's set."""
    from fastdd.data import ImageDataset
    from fastdd.relabel import RelabelConfig, relabel_set
    from fastdd.squeeze import SqueezeConfig, squeeze
    from fastdd.teacher import load_teacher

    root = tmp_path_factory.mktemp("kd-ddp")
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset("fake", "train", torch.randn(40, 1, 28, 28, generator=g), torch.arange(10).repeat(4), 10,
                      mean=(0.5,), std=(0.5,))
    squeeze(ds, SqueezeConfig(model="ConvNetBN", epochs=1, batch_size=16, lr=0.01), root / "teacher", progress=False)
    teacher = load_teacher(str(root / "teacher"), 1, 10, (28, 28))[0]
    images = worker.data()[0]
    relabel_set(images, torch.arange(worker.N) % 10, teacher,
                RelabelConfig(preset="cifar", epochs=3, batch_size=3).resolved("fake", (28, 28)), root / "store")
    return str(root / "teacher"), str(root / "store")


def _logits(states, x):
    from fastdd.models import get_model

    out = []
    for state in states:
        net = get_model("ConvNetW32", 1, 10, (28, 28))
        net.load_state_dict(state)
        net.eval()
        with torch.no_grad():
            out.append(net(x))
    return torch.stack(out)


def test_two_processes_train_the_one_process_students(fake_teacher_and_store, tmp_path):
    teacher, store = fake_teacher_and_store
    path = tmp_path / "ddp.pt"
    proc = torchrun([str(ROOT / "tests" / "kd_ddp_worker.py"), teacher, store, str(path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(path, weights_only=False)
    want = worker.run(teacher, store, ddp=False)
    test_x = worker.data()[2]
    assert sorted(got) == sorted(want) == ["cifar", "cifar_vmap", "stored", "tiny"]
    for name in want:
        assert got[name]["acc"].tolist() == want[name]["acc"].tolist(), name
        assert len(got[name]["states"]) == len(want[name]["states"]) == 4
        for i, (g, w) in enumerate(zip(got[name]["states"], want[name]["states"])):
            assert g.keys() == w.keys()
            for key in w:
                diff = float((g[key] - w[key]).abs().max())
                assert diff <= WEIGHT_ATOL, (name, i, key, diff)
        lg, lw = _logits(got[name]["states"], test_x), _logits(want[name]["states"], test_x)
        assert float((lg - lw).abs().max()) <= LOGIT_RTOL * float(lw.abs().max()), name
    # the students did train (the comparison is not between two untouched initialisations)
    from fastdd.evaluate import fresh_models

    start = fresh_models(worker.config("cifar", teacher).resolved("fake", (28, 28)), [11], 1, 10, (28, 28),
                         "cpu").state_dicts()[0]
    assert float((want["cifar"]["states"][0]["classifier.weight"] - start["classifier.weight"]).abs().max()) > 1e-3


def test_local_rows_is_a_strided_split_with_an_empty_share_marked():
    from fastdd.evaluate import local_rows

    x = torch.arange(10).view(2, 5)
    assert local_rows(x, 0, 1, dim=1) == (x, 1.0)
    a, wa = local_rows(x, 0, 2, dim=1)
    b, wb = local_rows(x, 1, 2, dim=1)
    assert a.tolist() == [[0, 2, 4], [5, 7, 9]] and b.tolist() == [[1, 3], [6, 8]] and wa == wb == 1.0
    row, weight = local_rows(torch.arange(3).view(1, 3), 1, 2)  # 1 row, rank 1 of 2: row 0 with weight 0
    assert row.tolist() == [[0, 1, 2]] and weight == 0.0


def test_ddp_outside_a_process_group_is_a_clear_error():
    from fastdd.evaluate import dist_rank_world

    with pytest.raises(ValueError, match="^ddp: torch.distributed is not initialised"):
        dist_rank_world(True)
    assert dist_rank_world(False) == (0, 1)


# ------------------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_train):
    """A `fastdd distill`-style directory with 3 real digits per class and a ConvNetBN teacher (1 epoch)."""
    return make_kd_set_dir(tmp_path_factory.mktemp("kd-ddp-cli"), digits_train, 3)


EVAL_FLAGS = ["--protocol", "kd", "--epochs", "3", "--batch-size", "7", "--models", "2", "--device", "cpu",
              "--compile", "off"]


def test_cli_torchrun_equals_one_process_and_only_rank_0_writes(digits_run, capsys):
    one, two = digits_run / "one", digits_run / "two"
    shutil.copytree(digits_run / "set", one)
    shutil.copytree(digits_run / "set", two)
    assert main(["evaluate", str(one), *EVAL_FLAGS]) == 0
    single = capsys.readouterr().out
    proc = torchrun(["-m", "fastdd", "evaluate", str(two), *EVAL_FLAGS])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    want, got = json.loads((one / "eval.json").read_text()), json.loads((two / "eval.json").read_text())
    assert got["accuracies"] == want["accuracies"] and len(want["accuracies"]) == 2
    assert got["random_baseline_accuracies"] == want["random_baseline_accuracies"]
    assert got["config"] == want["config"] and got["config"]["kd_preset"] == "cifar"
    assert (want["processes"], got["processes"]) == (1, 2)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("digits IPC 3")]
    assert len(lines) == 1 and "2 processes (DDP)" in lines[0], proc.stdout  # rank 0 alone prints
    assert "digits IPC 3" in single and "DDP" not in single
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # nothing else written
    assert not list(two.glob("*.tmp"))


def test_other_protocols_are_refused_under_torchrun(digits_run, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    code = main(["evaluate", str(digits_run / "set"), "--protocol", "dm", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "--protocol dm: only --protocol kd trains with DistributedDataParallel" in err, err
