"""DC / DSA gradient matching: the distances against float64 per-layer references, batched per-class
gradients against the per-class loop, get_loops, exact resume of a dsa run, and a real-data property."""
from __future__ import annotations

import pytest
import torch

from fastdd.checkpoint import load, save_atomic
from fastdd.data import stratified_subset
from fastdd.evaluate import EvalConfig, evaluate_synset
from fastdd.matchers.gradient import gradient_distance
from fastdd.methods import get
from fastdd.methods.dc import get_loops, per_class_gradients_batched, per_class_gradients_loop
from fastdd.models import get_model


def _grads(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


SHAPES = [(8, 3, 3, 3), (8,), (4, 5, 6), (10, 32), (10,)]


def _ours_reference(gr, gs):
    total = 0.0
    for r, s in zip(gr, gs):
        if r.dim() == 1:
            continue
        r2, s2 = r.reshape(r.shape[0], -1), s.reshape(s.shape[0], -1)
        for i in range(r2.shape[0]):
            total += 1 - float(r2[i] @ s2[i]) / (float(r2[i].norm() * s2[i].norm()) + 1e-6)
    return total


def test_ours_mse_cos_match_float64_per_layer_references():
    gr, gs = _grads(0, SHAPES), _grads(1, SHAPES)
    assert float(gradient_distance(gr, gs, "ours")) == pytest.approx(_ours_reference(gr, gs), rel=1e-12)
    fr, fs = torch.cat([g.reshape(-1) for g in gr]), torch.cat([g.reshape(-1) for g in gs])
    assert float(gradient_distance(gr, gs, "mse")) == pytest.approx(float(((fr - fs) ** 2).sum()), rel=1e-12)
    cos = 1 - float(fr @ fs) / (float(fr.norm() * fs.norm()) + 1e-6)
    assert float(gradient_distance(gr, gs, "cos")) == pytest.approx(cos, rel=1e-12)
    assert float(gradient_distance(gr, gr, "ours")) == pytest.approx(0.0, abs=1e-5)  # identical gradients (up to the 1e-6 eps)


def test_batched_distance_equals_one_call_per_item():
    gr = [torch.stack(x) for x in zip(*[_grads(i, SHAPES) for i in range(3)])]
    gs = [torch.stack(x) for x in zip(*[_grads(10 + i, SHAPES) for i in range(3)])]
    for metric in ("ours", "mse", "cos"):
        batched = gradient_distance(gr, gs, metric, batched=True)
        single = torch.stack([gradient_distance([g[b] for g in gr], [g[b] for g in gs], metric) for b in range(3)])
        torch.testing.assert_close(batched, single, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="metric"):
        gradient_distance(gr, gs, "l1")


def test_batched_per_class_gradients_equal_the_per_class_loop_float64():
    net = get_model("ConvNetD2", 1, 4, (8, 8), generator=torch.Generator().manual_seed(0)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4 * 3, 1, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.arange(4).repeat_interleave(3)
    batched = per_class_gradients_batched(net, x, y, 4, create_graph=True)
    loop = per_class_gradients_loop(net, x, y, 4, create_graph=True)
    for b, lp in zip(batched, loop):
        torch.testing.assert_close(b, lp, rtol=1e-10, atol=1e-12)
    # and the second-order path (the synthetic images' gradient) agrees too
    gb = torch.autograd.grad(sum((t ** 2).sum() for t in batched), x)[0]
    gl = torch.autograd.grad(sum((t ** 2).sum() for t in loop), x)[0]
    torch.testing.assert_close(gb, gl, rtol=1e-9, atol=1e-12)


def test_get_loops_reference_table_and_clear_error():
    assert get_loops(1) == (1, 1) and get_loops(10) == (10, 50) and get_loops(50) == (50, 10)
    assert [get_loops(i) for i in (20, 30, 40)] == [(20, 25), (30, 20), (40, 15)]
    with pytest.raises(ValueError, match="ipc"):
        get_loops(7)
    cfg = get("dc").config_cls(ipc=7, outer_loop=2, inner_loop=3)
    cfg.validate()  # explicit loops make any ipc valid
    assert cfg.loops() == (2, 3)
    with pytest.raises(ValueError, match="ipc"):
        get("dc").config_cls(ipc=7).validate()


def _dsa(ds, **kw):
    m = get("dsa")
    base = dict(ipc=2, iterations=2, batch_real=4, seed=0, model="ConvNetD2", outer_loop=2, inner_loop=1)
    base.update(kw)
    return m(m.config_cls(**base), ds)


def test_dsa_run_resumes_exactly(digits_train, tmp_path):
    full = _dsa(digits_train, iterations=3).fit(progress=False)
    part = _dsa(digits_train, iterations=3).fit(1, progress=False)
    save_atomic(part.state_dict(), tmp_path / "ck.pt")
    resumed = _dsa(digits_train, iterations=3)
    resumed.load_state_dict(load(tmp_path / "ck.pt"))
    resumed.fit(progress=False)
    assert torch.equal(resumed.images, full.images)
    assert not torch.equal(full.images, _dsa(digits_train).images)  # the run did change the images


def _beats(fmnist, name, margin, **kw):
    train, test = fmnist
    m = get(name)
    cfg = m.config_cls(ipc=1, iterations=kw.pop("iterations", 20), batch_real=16, seed=0, **kw)
    method = m(cfg, train).fit(progress=False)
    syn = method.synthetic_set()
    ev = EvalConfig(num_models=2, epochs=60, seed=0, faithful_epochs=False)
    if cfg.rank:  # same-storage random subset (ipc real images per class)
        result = evaluate_synset(syn["factor_a"] @ syn["factor_b"], syn["labels"], train,
                                 stratified_subset(test, 200), ev, with_baseline=False)
        base = evaluate_synset(*_random_subset(train, cfg.ipc), train, stratified_subset(test, 200), ev,
                               with_baseline=False)
        acc, ref = result.to_dict()["accuracy_mean"], base.to_dict()["accuracy_mean"]
    else:
        result = evaluate_synset(syn["images"], syn["labels"], train, stratified_subset(test, 200), ev,
                                 baseline_indices=syn["init_indices"])
        d = result.to_dict()
        acc, ref = d["accuracy_mean"], d["random_baseline_mean"]
    print(name, kw, acc, ref)
    assert acc >= ref + margin, (acc, ref)


def _random_subset(train, ipc):
    subset = stratified_subset(train, ipc, torch.Generator().manual_seed(123))
    return subset.images, subset.labels


def test_dc_beats_initial_real_subset_on_fashion_mnist(fmnist):
    _beats(fmnist, "dc", 3.0)


def test_dsa_beats_initial_real_subset_on_fashion_mnist(fmnist):
    _beats(fmnist, "dsa", 3.0)


def test_dsa_rank2_beats_same_storage_random_subset_on_fashion_mnist(fmnist):
    _beats(fmnist, "dsa", 3.0, rank=2)


def test_checkpoint_resumes_under_another_gradient_batching(digits_train, tmp_path):
    """``batched_grads`` chooses how the per-class gradients are formed, not their values: a checkpoint written
    with the vmapped path (the earlier default) resumes under the default (the loop on a CPU)."""
    part = _dsa(digits_train, iterations=3, batched_grads=True).fit(1, progress=False)
    resumed = _dsa(digits_train, iterations=3)
    assert not resumed.batched
    resumed.load_state_dict(part.state_dict())
    assert resumed.iteration == 1
    with pytest.raises(ValueError, match="dis_metric"):
        _dsa(digits_train, iterations=3, dis_metric="mse").load_state_dict(part.state_dict())
