"""The speed paths keep results: bf16 real side close to fp32, in-place ReLU only without autograd, and the
GPU check script runs end to end in its CPU dry-run mode."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdd.methods.dm import dm_loss_batched
from fastdd.models import get_model

ROOT = Path(__file__).resolve().parents[1]


def test_bf16_real_side_changes_the_dm_loss_little():
    g = torch.Generator().manual_seed(0)
    net = get_model("ConvNet", 1, 4, (28, 28), generator=g)
    real = torch.randn(4 * 16, 1, 28, 28, generator=g)
    rl = torch.arange(4).repeat_interleave(16)
    syn = torch.randn(8, 1, 28, 28, generator=g, requires_grad=True)
    sl = torch.arange(4).repeat_interleave(2)
    fp32 = dm_loss_batched(net, None, None, real, rl, syn, sl, 4)
    bf16 = dm_loss_batched(net, None, None, real, rl, syn, sl, 4, real_dtype="bfloat16")
    assert bf16.dtype == torch.float32 and bf16.requires_grad
    assert abs(float(bf16.detach()) - float(fp32.detach())) < 0.02 * float(fp32.detach())  # bf16 keeps ~3 significant digits
    with pytest.raises(ValueError, match="real_dtype"):
        dm_loss_batched(net, None, None, real, rl, syn, sl, 4, real_dtype="fp8")


def test_relu_in_place_only_without_autograd():
    net = get_model("ConvNet", 1, 4, (8, 8))
    relu = next(m for m in net.features if isinstance(m, torch.nn.ReLU))
    x = torch.randn(5) - 0.5
    y = x.clone().requires_grad_(True)
    out = relu(y * 1.0)
    out.sum().backward()  # autograd path: out of place, differentiable
    torch.testing.assert_close(y.grad, (x > 0).float())
    z = x.clone()
    with torch.no_grad():
        assert relu(z).data_ptr() == z.data_ptr()  # no-grad path reuses the buffer


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, GPU_CHECK_BUDGET="400",
               PYTHONPATH=str(ROOT))
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=450)
    summary = (tmp_path / "gpu_check" / "summary.txt").read_text()
    assert res.returncode == 0, summary + res.stdout[-2000:] + res.stderr[-2000:]
    for step in ("tests_gpu", "bench_mmd", "bench_lowrank", "bench_dm_iteration", "bench_evaluate",
                 "distill_dm", "evaluate_dm"):
        assert f"{step}: rc=0" in summary
    assert (tmp_path / "gpu_check" / "results" / "dm_iteration.md").exists()
    assert (tmp_path / "gpu_check" / "results" / "evaluate.csv").exists()
