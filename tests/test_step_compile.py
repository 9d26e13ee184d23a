"""The loss computation of a DM, a DDM and a DANCE step is free of host syncs and data-dependent shapes: it
compiles with ``torch.compile(fullgraph=True)`` and equals the eager loss and gradient (fp32)."""
from __future__ import annotations

import pytest
import torch

from fastdd.methods import get


@pytest.mark.parametrize("method, extra", [("dm", {}), ("ddm", {"gram_weight": 1.0})])
def test_step_loss_compiles_fullgraph_and_matches_eager(digits_train, method, extra):
    torch._dynamo.reset()
    cls = get(method)
    m = cls(cls.config_cls(ipc=2, iterations=1, batch_real=8, seed=3, model="ConvNetD2", **extra), digits_train)
    real, real_labels, draw = m.draw()  # every random draw, eagerly, from the run's generator

    def loss_and_grad(fn):
        syn = m.images.detach().clone().requires_grad_(True)
        loss = fn(real, real_labels, syn, draw)
        (grad,) = torch.autograd.grad(loss, syn)
        return loss.detach(), grad

    eager_loss, eager_grad = loss_and_grad(m.loss)
    compiled_loss, compiled_grad = loss_and_grad(torch.compile(m.loss, fullgraph=True, backend="aot_eager"))
    assert eager_loss > 0
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_dance_inner_loss_compiles_fullgraph_and_matches_eager(digits_train, tmp_path):
    from test_dance import fake_experts, small

    from fastdd.methods.dance import DANCE, DANCEConfig

    torch._dynamo.reset()
    ds = small(digits_train)
    m = DANCE(DANCEConfig(experts=str(fake_experts(tmp_path, digits_train)), num_premodel=2, ipc=1, batch_real=4,
                          iterations=1, step_mode="batched"), ds)
    m.set_mid(1, 0.3)
    real, real_labels = m.sampler.sample(4, m.generator)
    draws = m.aug.draw(m.num_classes, m.generator, ds.image_size, device=m.device)
    syn0, syn_labels = m._all_syn()

    def fn(real, real_labels, syn, draws):
        return m.inner_loss_drawn(real, syn, real_labels, syn_labels, m.num_classes, draws)

    def loss_and_grad(f):
        syn = syn0.detach().clone().requires_grad_(True)
        loss = f(real, real_labels, syn, draws)
        (grad,) = torch.autograd.grad(loss, syn)
        return loss.detach(), grad

    eager_loss, eager_grad = loss_and_grad(fn)
    compiled_loss, compiled_grad = loss_and_grad(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    assert eager_loss > 0
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)
