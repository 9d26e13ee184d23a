"""DDM: the ICD term and the whole objective against plain per-class formulations of the reference scripts
(float64, gradients included), the k rules, bad input, and the method on real Fashion-MNIST."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_beats_initial_subset

from fastdd.augment import DSA
from fastdd.matchers.diversity import icd_k, icd_loss
from fastdd.methods import get
from fastdd.methods.ddm import DDMConfig, DDMLoss, legacy_class_weights
from fastdd.methods.dm import embed_pairs
from fastdd.models import embed_with_taps, get_model


# ------------------------------------------------------------------------------------------ references
def icd_reference(emb, labels, k, reduction="mean"):
    """The original script's loop: per class, per sample, Euclidean k-NN (self excluded), softmax probs."""
    total = emb.new_zeros(())
    for c in labels.unique().tolist():
        e = emb[labels == c]
        n = e.shape[0]
        kls = []
        for i in range(n):
            d = torch.stack([(e[i] - e[j]).norm() if j != i else e.new_tensor(float("inf")) for j in range(n)])
            idx = torch.argsort(d.detach())[:k]
            p = torch.softmax(e[i], 0)
            q = torch.softmax(e[idx].mean(0), 0)
            kls.append((p * torch.log(p / q)).sum())
        kl = torch.stack(kls)
        total = total - (kl.mean() if reduction == "mean" else kl.sum())
    return total


def _mean_std(x, mode, eps):
    """calc_mean_std of the scripts for one class batch x [n, C, H, W] -> (mean [C], std [C])."""
    n, c = x.shape[:2]
    f = x.reshape(n, c, -1)
    if mode == "batchavg":
        a = f.mean(0)
        return a.mean(1), torch.sqrt(a.var(1, unbiased=True) + eps)
    return f.mean(2).mean(0), torch.sqrt(f.var(2, unbiased=False) + eps).mean(0)


def _gram(x):
    n, c = x.shape[:2]
    f = x.reshape(n, c, -1)
    return (f @ f.transpose(1, 2) / f[0].numel()).mean(0)


def ddm_reference(net, dsa, draw, real, real_labels, syn, syn_labels, num_classes, cfg, ipc, k):
    """One forward per class and side, style accumulated as the released scripts do (``legacy``) or reset."""
    loss = syn.new_zeros(())
    acc = syn.new_zeros(())
    for c in range(num_classes):
        r, s = real[real_labels == c], syn[syn_labels == c]
        lab_r = torch.full((r.shape[0],), c, dtype=torch.long)
        lab_s = torch.full((s.shape[0],), c, dtype=torch.long)
        if dsa is not None:
            with torch.no_grad():
                r = dsa.apply(r, draw, lab_r)
            s = dsa.apply(s, draw, lab_s)
        with torch.no_grad():
            er, tr = embed_with_taps(net, r)
        es, ts = embed_with_taps(net, s)
        loss = loss + ((er.mean(0) - es.mean(0)) ** 2).sum()
        style = syn.new_zeros(())
        for xs, xr in zip(ts, tr):
            ms, ss = _mean_std(xs, cfg.style_mode, cfg.style_eps)
            mr, sr = _mean_std(xr, cfg.style_mode, cfg.style_eps)
            em, es_ = ((ms - mr) ** 2).mean(), ((ss - sr) ** 2).mean()
            if cfg.style_relative:
                em, es_ = em / ((mr ** 2).mean() + 1e-8), es_ / ((sr ** 2).mean() + 1e-8)
            style = style + cfg.style_weight * 0.5 * (em + es_)
            style = style + cfg.gram_weight * ((_gram(xs) - _gram(xr)) ** 2).sum()
        if cfg.style_accumulator == "legacy":
            acc = (acc + style) / len(ts)
            loss = loss + acc
        else:
            loss = loss + style / len(ts)
        if cfg.icd_weight > 0 and k > 0:
            loss = loss + cfg.icd_weight * icd_reference(es, lab_s, k, cfg.icd_reduction)
    return loss


# ------------------------------------------------------------------------------------------ ICD
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ipc,k", [(2, 1), (4, 2), (5, 3)])
def test_icd_matches_the_per_sample_loop_with_gradients(ipc, k, reduction):
    g = torch.Generator().manual_seed(ipc * 10 + k)
    K, D = 3, 7
    emb = torch.randn(K * ipc, D, generator=g, dtype=torch.float64)
    labels = torch.arange(K).repeat_interleave(ipc)
    a = emb.clone().requires_grad_(True)
    b = emb.clone().requires_grad_(True)
    fast = icd_loss(a, ipc, k, reduction=reduction)
    ref = icd_reference(b, labels, k, reduction)
    (ga,) = torch.autograd.grad(fast, a)
    (gb,) = torch.autograd.grad(ref, b)
    assert fast.item() < 0  # KL >= 0, maximised
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: icd_loss(x, ipc, k, reduction=reduction), (a.detach().requires_grad_(),))


def test_icd_float32_close_to_float64_and_pushes_samples_apart():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(4 * 6, 32, generator=g, dtype=torch.float64)
    torch.testing.assert_close(icd_loss(emb.float(), 6, 2).double(), icd_loss(emb, 6, 2), rtol=1e-5, atol=1e-5)
    x = (0.1 * emb).requires_grad_(True)  # minimising the loss increases the KL to the neighbours
    opt = torch.optim.SGD([x], lr=0.5)
    first = None
    for _ in range(20):
        loss = icd_loss(x, 6, 2)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(icd_loss(x.detach(), 6, 2)) < first


@pytest.mark.parametrize("rule,ipc,expected", [
    ("code", 10, 2), ("paper", 10, 2), ("paper", 50, 10), ("code", 50, 2), ("code", 2, 1), ("paper", 3, 1),
    ("paper", 7, 1), ("paper", 8, 2), ("code", 1, 0), ("paper", 1, 0), ("paper", 100, 20)])
def test_icd_k_rules(rule, ipc, expected):
    assert icd_k(rule, ipc) == expected


def test_icd_bad_input_is_named():
    emb = torch.randn(6, 4, generator=torch.Generator(device='cpu').manual_seed(1000))
    with pytest.raises(ValueError, match="k"):
        icd_loss(emb, 3, 3)
    with pytest.raises(ValueError, match="ipc"):
        icd_loss(emb, 1, 1)
    with pytest.raises(ValueError, match="multiple"):
        icd_loss(emb, 4, 1)
    with pytest.raises(ValueError, match="reduction"):
        icd_loss(emb, 3, 1, reduction="max")
    with pytest.raises(ValueError, match="icd_k_rule"):
        icd_k("median", 10)


# ------------------------------------------------------------------------------------------ objective
def test_legacy_weights_are_the_accumulator_recursion():
    for K, L in [(1, 3), (5, 3), (10, 4), (4, 1)]:
        s = torch.rand(K, dtype=torch.float64, generator=torch.Generator(device='cpu').manual_seed(1001))
        acc, total = 0.0, 0.0
        for c in range(K):
            acc = (acc + s[c]) / L
            total = total + acc
        w = legacy_class_weights(K, L, dtype=torch.float64)
        torch.testing.assert_close((w * s).sum(), torch.as_tensor(total, dtype=torch.float64))
        assert abs(float(w[-1]) - 1.0 / L) < 1e-12
    # L = 3: the early classes get about 1.5x the intended 1/L
    assert abs(float(legacy_class_weights(10, 3, dtype=torch.float64)[0]) * 3 - 1.5) < 1e-3


@pytest.mark.parametrize("accumulator", ["legacy", "reset"])
@pytest.mark.parametrize("mode,relative,gram", [("batchavg", False, 0.0), ("persample", True, 50.0),
                                                ("batchavg", False, 50.0)])
def test_ddm_objective_matches_per_class_reference_scripts(accumulator, mode, relative, gram):
    g = torch.Generator().manual_seed(7)
    K, n_real, ipc = 3, 5, 4
    real = torch.randn(K * n_real, 3, 16, 16, generator=g, dtype=torch.float64)
    real_labels = torch.arange(K).repeat_interleave(n_real)
    perm = torch.randperm(K * n_real, generator=g)
    real, real_labels = real[perm], real_labels[perm]
    syn = torch.randn(K * ipc, 3, 16, 16, generator=g, dtype=torch.float64)
    syn_labels = torch.arange(K).repeat_interleave(ipc)
    net = get_model("ConvNet", 3, K, (16, 16), generator=g).double()
    for p in net.parameters():
        p.requires_grad_(False)
    dsa = DSA()
    draw = dsa.draw(K, g, (16, 16))
    cfg = DDMConfig(ipc=ipc, style_weight=30.0, gram_weight=gram, style_mode=mode, style_relative=relative,
                    style_accumulator=accumulator, icd_weight=2.0, icd_k_rule="code")
    objective = DDMLoss(cfg, K, ipc)
    assert objective.k == 2 and objective.icd_on and objective.style_on

    s1 = syn.clone().requires_grad_(True)
    out = embed_pairs(net, dsa, draw, real, real_labels, s1, syn_labels, real_chunk=4, taps=True)
    fast, parts = objective(out[0], out[1], real_labels, out[2], out[3], syn_labels)
    (g1,) = torch.autograd.grad(fast, s1)
    s2 = syn.clone().requires_grad_(True)
    ref = ddm_reference(net, dsa, draw, real, real_labels, s2, syn_labels, K, cfg, ipc, objective.k)
    (g2,) = torch.autograd.grad(ref, s2)
    assert parts["style"] > 0 and parts["icd"] < 0
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)


def test_legacy_and_reset_differ_by_the_accumulated_earlier_classes():
    g = torch.Generator().manual_seed(1)
    K = 4
    taps_s = [torch.randn(K * 2, 8, 4, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    taps_r = [torch.randn(K * 5, 8, 4, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    ls, lr = torch.arange(K).repeat_interleave(2), torch.arange(K).repeat_interleave(5)
    emb_s, emb_r = torch.randn(K * 2, 6, dtype=torch.float64, generator=torch.Generator(device='cpu').manual_seed(1002)), torch.randn(K * 5, 6, dtype=torch.float64, generator=torch.Generator(device='cpu').manual_seed(1002))
    vals = {}
    for acc in ("legacy", "reset"):
        obj = DDMLoss(DDMConfig(ipc=2, style_accumulator=acc, icd_weight=0.0), K, 2)
        vals[acc] = obj(emb_r, taps_r, lr, emb_s, taps_s, ls)[1]["style"]
    assert vals["legacy"] > 1.2 * vals["reset"]  # ~1.5x for all classes but the last at L = 3


# ------------------------------------------------------------------------------------------ method, bad input
def test_ddm_at_ipc1_skips_icd_and_explicit_k_raises(digits_train):
    cls = get("ddm")
    m = cls(DDMConfig(ipc=1, iterations=2, batch_real=8, model="ConvNetD2"), digits_train)
    assert not m.objective.icd_on  # documented no-op: the ICD is undefined with one image per class
    m.fit(progress=False)
    assert "icd" not in m.last_parts and "style" in m.last_parts
    with pytest.raises(ValueError, match="icd_k=1"):
        cls(DDMConfig(ipc=1, icd_k=1, batch_real=8, model="ConvNetD2"), digits_train)


@pytest.mark.parametrize("field,value", [("style_mode", "median"), ("style_accumulator", "never"),
                                         ("icd_k_rule", "x"), ("icd_reduction", "max"), ("icd_k", -1),
                                         ("style_weight", -1.0), ("style_eps", 0.0)])
def test_ddm_unknown_options_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        DDMConfig(**{field: value}).validate()


def test_ddm_step_reproducible_and_loss_terms_logged(digits_train):
    cls = get("ddm")
    runs = []
    for _ in range(2):
        m = cls(DDMConfig(ipc=3, iterations=3, batch_real=8, seed=2, model="ConvNetD2"), digits_train)
        m.fit(progress=False)
        runs.append(m.synthetic_set()["images"])
    assert torch.equal(runs[0], runs[1])
    assert set(m.last_parts) == {"mmd", "style", "icd"}


# ------------------------------------------------------------------------------------------ real data
def test_ddm_beats_its_initial_real_subset_on_fashion_mnist(fmnist):
    from fastdd.evaluate import EvalConfig

    train, test = fmnist
    cls = get("ddm")
    method = cls(DDMConfig(ipc=2, iterations=40, batch_real=16, seed=0), train).fit(progress=False)
    assert_beats_initial_subset(method, train, test, EvalConfig(num_models=2, epochs=60, seed=0, faithful_epochs=False), 3.0)
