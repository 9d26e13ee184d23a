"""fastdd.allocator: freed large blocks are reused inside the block (fewer page faults), the switch works,
nesting is safe, and results are unchanged."""
import resource

import pytest
import torch

from fastdd import allocator
from fastdd.allocator import malloc_mode, reuse_active, reuse_freed_memory

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc's mallopt (Linux)")


def _faults_of_forwards(n: int = 10) -> int:
    """Minor page faults of ``n`` no-grad 1->128-channel convolutions of 128 28x28 images (a ConvNet's first
    layer: a fresh 49 MiB output each, freed before the next)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(128, 1, 28, 28, generator=g), torch.randn(128, 1, 3, 3, generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.no_grad():
        for _ in range(n):
            torch.nn.functional.conv2d(x, w, padding=1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_reuse_cuts_page_faults_of_large_activations():
    system = _faults_of_forwards()
    with reuse_freed_memory("reuse") as on:
        assert on and reuse_active()
        _faults_of_forwards(2)  # the heap grows to the working set
        reused = _faults_of_forwards()
    assert not reuse_active()
    pages = 10 * (128 * 128 * 28 * 28 * 4) // resource.getpagesize()
    assert system > pages // 2, (system, pages)  # every fresh mmap'ed output faults its pages in
    assert reused < system // 5, (reused, system)


def test_system_mode_leaves_glibc_alone(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "system")
    with reuse_freed_memory() as on:
        assert not on and not reuse_active()


@glibc
def test_nested_blocks_restore_only_at_the_outermost_exit():
    with reuse_freed_memory():
        with reuse_freed_memory(release=False) as inner:
            assert inner
        assert reuse_active()
    assert not reuse_active()


def test_bad_mode_names_its_source(monkeypatch):
    with pytest.raises(ValueError, match="malloc"):
        malloc_mode("jemalloc")
    monkeypatch.setenv(allocator.ENV, "fast")
    with pytest.raises(ValueError, match="FASTDD_MALLOC"):
        with reuse_freed_memory():
            pass


def test_decorated_function_and_results_unchanged():
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    conv = torch.nn.Conv2d(1, 128, 3, padding=1)

    @reuse_freed_memory()
    def forward():
        return conv(x)

    with torch.no_grad():
        expected = conv(x)
        assert torch.equal(forward(), expected)
        assert torch.equal(forward(), expected)
    assert not reuse_active()
