"""User errors of the command line: one line on stderr, exit code 2, no traceback; damaged and foreign files."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdd.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = ["distill", "--dataset", "digits", "--ipc", "1", "--batch-real", "4", "--no-progress"]
NO_GPU = not torch.cuda.is_available()


def _bad(tmp):
    o = str(tmp / "o")
    return [
        pytest.param(BASE + ["--out", o, "--device", "cuda"], "--device", marks=pytest.mark.skipif(not NO_GPU, reason="has a GPU"), id="cuda-no-gpu"),
        pytest.param(BASE + ["--out", o, "--device", "tpu"], "--device", id="tpu"),
        pytest.param(BASE + ["--out", o, "--device", "cuda:7"], "--device", id="cuda7"),
        pytest.param(BASE + ["--out", o, "--device", "banana"], "--device", id="unknown-device"),
        pytest.param(["evaluate", o, "--device", "cuda"], "--device", marks=pytest.mark.skipif(not NO_GPU, reason="has a GPU"), id="evaluate-cuda"),
        pytest.param(["pretrain", "--dataset", "digits", "--out", o, "--device", "tpu"], "--device", id="pretrain-tpu"),
        pytest.param(["continual", "--dataset", "digits", "--out", o, "--device", "tpu"], "--device", id="continual-tpu"),
        pytest.param(BASE + ["--out", o, "--device", "cpu", "--checkpoint-every", "-1"], "--checkpoint-every", id="ckpt-neg"),
        pytest.param(BASE + ["--out", o, "--device", "cpu", "--ipc", "0"], "ipc", id="ipc0"),
        pytest.param(BASE + ["--out", o, "--device", "cpu", "--ipc", "x"], "--ipc", id="ipc-not-int"),
        pytest.param(["evaluate", o, "--device", "cpu", "--protocol", "nope"], "protocol", id="evaluate-protocol"),
        pytest.param(BASE + ["--out", o, "--device", "cpu", "--method", "nope"], "nope", id="unknown-method"),
        pytest.param(BASE + ["--out", o, "--device", "cpu", "--model", "NoNet"], "NoNet", id="unknown-model"),
        pytest.param(BASE + ["--out", o, "--device", "cpu", "--bogus"], "--bogus", id="unknown-flag"),
        pytest.param(["distill", "--out", o, "--device", "cpu"], "--dataset", id="no-dataset"),
        pytest.param(["distill", "--dataset", "nope", "--out", o, "--device", "cpu"], "nope", id="unknown-dataset"),
        pytest.param(BASE + ["--out", o, "--device", "cpu", "--resume", "--force"], "--force", id="resume-force"),
        pytest.param(["evaluate", str(tmp / "none"), "--device", "cpu"], "synthetic set", id="evaluate-no-set"),
        pytest.param(["evaluate", o, "--device", "cpu", "--epochs", "0"], "", id="evaluate-epochs0"),
        pytest.param(["pretrain", "--dataset", "digits", "--out", o, "--device", "cpu", "--models", "0"], "models", id="pretrain-models0"),
        pytest.param(["continual", "--dataset", "digits", "--out", o, "--device", "cpu", "--classes-per-step", "3"], "classes", id="continual-cps"),
        pytest.param(["show", str(tmp / "none")], "none", id="show-missing"),
        pytest.param(["frobnicate"], "frobnicate", id="unknown-command"),
        pytest.param([], "", id="no-command"),
    ]


@pytest.mark.parametrize("case", range(24))
def test_bad_invocation_is_one_line_exit_2(case, tmp_path, capsys):
    param = _bad(tmp_path)[case]
    for mark in param.marks:
        if mark.name == "skipif" and mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    argv, needle = param.values
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and needle in lines[0], err
    assert not (tmp_path / "o").exists(), "a rejected run left its --out directory"


def test_device_errors_in_a_real_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fastdd", *BASE, "--out", str(tmp_path / "o"), "--device", "tpu"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--device" in proc.stderr


def _distill(out, *extra, iterations=2):
    return main(BASE + ["--iterations", str(iterations), "--device", "cpu", "--out", str(out), *extra])


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_damaged_checkpoint_and_set_name_the_file(damage, tmp_path, capsys):
    out = tmp_path / "run"
    assert _distill(out) == 0
    for name in ("checkpoint.pt", "synthetic.pt"):
        path = out / name
        data = path.read_bytes()
        path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                          "random": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                        dtype=torch.uint8).tolist())}[damage])
    capsys.readouterr()
    assert _distill(out, "--resume") == 2
    err = capsys.readouterr().err
    assert str(out / "checkpoint.pt") in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["evaluate", str(out), "--device", "cpu", "--epochs", "1", "--models", "1"]) == 2
    err = capsys.readouterr().err
    assert str(out / "synthetic.pt") in err and len(err.strip().splitlines()) == 1


def test_damaged_pretrain_state_names_the_file(tmp_path, capsys):
    out = tmp_path / "exp"
    argv = ["pretrain", "--dataset", "digits", "--models", "1", "--epochs", "1", "--train-subset", "50",
            "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    (out / "pretrain_state.pt").write_bytes(b"\x80\x02garbage")
    capsys.readouterr()
    assert main(argv[:4] + ["2"] + argv[5:] + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert str(out / "pretrain_state.pt") in err and len(err.strip().splitlines()) == 1


def _fake_digits(tmp_path, name):
    """A dataset with the same name/shape as digits but other pixels, via a monkeypatched loader."""
    from fastdd import data

    real = data.load_dataset

    def load(dataset, split, root=None, **kwargs):
        ds = real(dataset, split, root=root, **kwargs)
        return dataclasses.replace(ds, images=ds.images.flip(-1).contiguous())
    return load


def test_resume_refuses_a_checkpoint_of_another_dataset(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert _distill(out) == 0
    import fastdd.data

    monkeypatch.setattr(fastdd.data, "load_dataset", _fake_digits(tmp_path, "digits"))
    capsys.readouterr()
    assert _distill(out, "--resume", iterations=3) == 2
    err = capsys.readouterr().err
    assert "another run" in err and "fingerprint" in err and str(out / "checkpoint.pt") in err


def test_resume_refuses_other_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert _distill(out) == 0
    capsys.readouterr()
    assert main(BASE[:4] + ["2"] + BASE[5:] + ["--iterations", "3", "--device", "cpu", "--out", str(out),
                                               "--resume"]) == 2
    assert "ipc" in capsys.readouterr().err


def test_resume_accepts_another_compile_setting(tmp_path, capsys):
    """``--compile`` chooses how the run executes: a run written eagerly resumes under ``auto`` (a short run:
    also eager), and a longer ``--iterations`` extends it."""
    out = tmp_path / "run"
    assert _distill(out, "--compile", "off") == 0
    assert _distill(out, "--resume", "--compile", "auto", iterations=3) == 0
    assert torch.load(out / "synthetic.pt", weights_only=True)["config"]["iterations"] == 3


def test_force_replaces_a_finished_run_entirely(tmp_path):
    out = tmp_path / "run"
    assert _distill(out) == 0
    (out / "eval.json").write_text("{}")
    (out / ".synthetic.pt.abc.tmp").write_text("stale")
    assert _distill(out, "--force", iterations=1) == 0
    assert not (out / "eval.json").exists() and not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert torch.load(out / "synthetic.pt", weights_only=True)["config"]["iterations"] == 1


def test_force_over_an_interrupted_run_leaves_no_old_files(tmp_path):
    out = tmp_path / "run"
    assert _distill(out) == 0

    class Stop(Exception):
        pass

    from fastdd import checkpoint

    real = checkpoint.save_atomic

    def boom(obj, path):
        raise Stop

    checkpoint.save_atomic = boom
    try:
        with pytest.raises(Stop):
            _distill(out, "--force", "--checkpoint-every", "1", iterations=3)
    finally:
        checkpoint.save_atomic = real
    assert not (out / "synthetic.pt").exists() and not (out / "config.json").exists()
    assert real is checkpoint.save_atomic


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    parent = tmp_path / "file"
    parent.write_text("not a directory")
    assert _distill(parent / "run") == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(parent) in err


def test_missing_class_in_evaluate(tmp_path, capsys):
    from fastdd.evaluate import EvalConfig

    if "allow_missing_classes" not in {f.name for f in dataclasses.fields(EvalConfig)}:
        pytest.skip("EvalConfig.allow_missing_classes (the set check in evaluate.py) does not exist yet")
    out = tmp_path / "run"
    assert _distill(out) == 0
    path = out / "synthetic.pt"
    data = torch.load(path, weights_only=True)
    keep = data["labels"] != 3
    data["images"], data["labels"] = data["images"][keep], data["labels"][keep]
    torch.save(data, path)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--device", "cpu", "--epochs", "1", "--models", "1"]) == 2
    assert "labels" in capsys.readouterr().err
