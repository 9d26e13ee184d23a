"""fastdd.compile: the switch, the eager fallback, and compiled == eager for the DM step (one small compile)."""
from __future__ import annotations

import pytest
import torch

from fastdd import compile as fc
from fastdd.data import ImageDataset
from fastdd.methods.dm import DM, DMConfig, equal_chunks


def test_mode_resolution(monkeypatch):
    monkeypatch.delenv("FASTDD_COMPILE", raising=False)
    assert fc.should_compile("off", "cpu", 10**6) is False
    with pytest.raises(ValueError, match="compile: expected one of"):
        fc.should_compile("yes", "cpu")
    if fc.compiler_available("cpu")[0]:
        assert fc.should_compile("auto", "cpu", fc.AUTO_MIN_CALLS) is True
        assert fc.should_compile("on", "cpu", 1) is True
    assert fc.should_compile("auto", "cpu", fc.AUTO_MIN_CALLS - 1) is False  # too short to amortise
    monkeypatch.setenv("FASTDD_COMPILE", "off")
    assert fc.should_compile("auto", "cpu", 10**6) is False
    monkeypatch.setattr(fc.shutil, "which", lambda name: None)
    monkeypatch.setenv("FASTDD_COMPILE", "")
    assert fc.compiler_available("cpu")[0] is False
    assert fc.should_compile("auto", "cpu", 10**6) is False
    with pytest.raises(RuntimeError, match="compile='on'"):
        fc.should_compile("on", "cpu")


def test_failed_compile_falls_back_to_eager_once(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    f = fc.Compiled(lambda x: x * 2, True, name="double")
    with pytest.warns(RuntimeWarning, match="double failed .*inductor exploded"):
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))
    assert not f.enabled
    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))  # eager from now on, no second warning
    g = fc.Compiled(lambda x: x.reshape(5), True)
    with pytest.raises(RuntimeError):  # an error eager code raises too propagates
        g(torch.ones(3))


def test_equal_chunks_and_cache_rows():
    assert equal_chunks(2560, 128) == 128 and equal_chunks(2560, 300) == 256
    assert equal_chunks(100, 0) == 100 and equal_chunks(97, 50) == 50  # prime: ragged last chunk
    assert 32 <= fc.cache_rows(128 * 32 * 32 * 4) <= 512


def _dataset():
    g = torch.Generator().manual_seed(0)
    return ImageDataset(name="fashion-mnist", split="train", images=torch.randn(4 * 12, 1, 12, 12, generator=g),
                        labels=torch.arange(4).repeat_interleave(12), num_classes=4, mean=(0.0,), std=(1.0,))


@pytest.mark.skipif(not fc.compiler_available("cpu")[0], reason="no C++ compiler for inductor")
def test_compiled_dm_step_equals_eager():
    """Same loss, same gradient (hence the same update) and the same synthetic set after 3 iterations."""
    ds = _dataset()
    runs = {}
    for mode in ("off", "on"):
        m = DM(DMConfig(ipc=2, batch_real=8, iterations=3, compile=mode, real_chunk=16, model="ConvNetD2"),
               ds)
        losses = [m.step() for _ in range(3)]
        runs[mode] = (losses, m.images.detach().clone(), m.synth.images.grad.clone())
    assert fc.embedder_for(m.net).enabled  # the compiled path really ran
    torch.testing.assert_close(torch.tensor(runs["on"][0]), torch.tensor(runs["off"][0]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs["on"][2], runs["off"][2], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(runs["on"][1], runs["off"][1], rtol=1e-4, atol=1e-5)
