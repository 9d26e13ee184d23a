"""The command line end to end on real (digits) data: files written, reload without fastdd, errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdd.cli import main

ROOT = Path(__file__).resolve().parents[1]
DISTILL = ["distill", "--method", "dm", "--dataset", "digits", "--ipc", "2", "--batch-real", "8",
           "--device", "cpu", "--no-progress"]


def test_distill_then_evaluate_writes_the_documented_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(DISTILL + ["--iterations", "4", "--seed", "1", "--out", str(out)]) == 0
    for name in ("synthetic.pt", "synthetic.png", "config.json", "synthetic.safetensors"):
        assert (out / name).is_file(), name
    data = torch.load(out / "synthetic.pt", weights_only=True)  # plain torch, no fastdd classes
    assert data["images"].shape == (20, 1, 8, 8) and data["images"].dtype == torch.float32
    assert data["labels"].dtype == torch.int64 and data["labels"].tolist() == sorted(list(range(10)) * 2)
    assert data["config"]["ipc"] == 2 and data["metadata"]["dataset"] == "digits"
    from safetensors.torch import load_file

    st = load_file(str(out / "synthetic.safetensors"))
    assert torch.equal(st["images"], data["images"])
    from PIL import Image

    with Image.open(out / "synthetic.png") as im:
        assert im.size[0] > 0 and im.size[1] >= 10 * 8  # one row per class
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["iterations"] == 4

    assert main(["evaluate", str(out), "--models", "2", "--epochs", "3", "--seed", "0", "--device", "cpu"]) == 0
    report = json.loads((out / "eval.json").read_text())
    for key in ("accuracy_mean", "accuracy_std", "random_baseline_mean", "random_baseline_std"):
        assert isinstance(report[key], float)
    assert len(report["accuracies"]) == 2
    printed = capsys.readouterr().out
    assert "synthetic set" in printed and "random real subset" in printed


def test_existing_output_is_not_overwritten_without_force(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(DISTILL + ["--iterations", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(DISTILL + ["--iterations", "1", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(DISTILL + ["--iterations", "1", "--out", str(out), "--force"]) == 0


def test_missing_dataset_error_names_it_and_the_search_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTDD_DATA", str(tmp_path / "nowhere"))
    code = main(["distill", "--dataset", "cifar10", "--data-path", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cifar10" in err and str(tmp_path / "empty") in err


def test_ipc_larger_than_a_class_is_a_clear_cli_error(tmp_path, capsys):
    assert main(DISTILL[:5] + ["--ipc", "500", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "ipc=500 is larger than class" in capsys.readouterr().err


def _synset(path):
    return torch.load(Path(path) / "synthetic.pt", weights_only=True)["images"]


def test_killed_run_resumes_to_the_identical_set(tmp_path):
    """SIGKILL a real `fastdd distill` process mid-run, resume it, compare with an uninterrupted run."""
    iterations = 200
    args = DISTILL + ["--iterations", str(iterations), "--seed", "3", "--checkpoint-every", "5"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fastdd.cli", *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if ckpt.exists() and torch.load(ckpt, weights_only=True)["state"]["iteration"] >= 10:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    stopped_at = torch.load(ckpt, weights_only=True)["state"]["iteration"]
    assert 10 <= stopped_at < iterations and not (killed / "synthetic.pt").exists()

    assert main(args + ["--out", str(killed), "--resume"]) == 0
    straight = tmp_path / "straight"
    assert main(args + ["--out", str(straight)]) == 0
    assert torch.equal(_synset(killed), _synset(straight))
