"""MIM4DD add-on: the term against a dense plain-torch InfoNCE over pooled, headed taps (gradients included),
exact resume with the heads, bad options, the CLI (ddm, mim4dd, dm --mim-weight), real Fashion-MNIST."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_beats_initial_subset

from fastdd.cli import main
from fastdd.methods import get
from fastdd.methods.dm import DMConfig, embed_pairs
from fastdd.methods.mim4dd import MIM4DDConfig


def dense_infonce(zs, ys, zr, yr, tau, form="supcon", normalize=True):
    """Dense reference: multi-positive InfoNCE or CRD binary NCE (c = N_i / Nr) of syn anchors vs real rows."""
    if normalize:
        zs, zr = F.normalize(zs, dim=1), F.normalize(zr, dim=1)
    s = zs @ zr.T / tau
    pos = (ys[:, None] == yr[None, :]).to(s.dtype)
    if form == "supcon":
        per = torch.logsumexp(s, 1) - (s * pos).sum(1) / pos.sum(1)
    else:
        logc = torch.log((1 - pos).sum(1) / zr.shape[0])[:, None]
        h = torch.sigmoid(s - logc)
        per = -(torch.log(h) * pos).sum(1) / pos.sum(1) - (torch.log(1 - h) * (1 - pos)).sum(1)
    return per.mean()


def _method(ds, **kw):
    base = dict(ipc=2, iterations=4, batch_real=8, seed=3, model="ConvNetD2", mim_weight=0.7)
    base.update(kw)
    return get("mim4dd")(MIM4DDConfig(**base), ds)


# ------------------------------------------------------------------------------------------ the term
@pytest.mark.parametrize("form", ["supcon", "nce"])
@pytest.mark.parametrize("layers,head,shared,sym", [("all", "linear", False, False), ("all", "linear", True, False),
                                                    ("last", "linear", False, False), ("all", "none", False, False),
                                                    ("all", "linear", False, True)])
def test_mim_term_matches_dense_reference_with_gradients(digits_train, form, layers, head, shared, sym):
    m = _method(digits_train, mim_form=form, mim_layers=layers, mim_head=head, mim_shared_head=shared,
                mim_temperature=0.2, mim_symmetric=sym)
    addon = m.addons["mim"]
    assert addon.needs_taps == (layers == "all") and m.needs_taps == (layers == "all")
    real, real_labels = m.sampler.sample(8, m.generator)
    syn = m.images.detach().clone().requires_grad_(True)
    out = embed_pairs(m.net, None, None, real, real_labels, syn, m.labels, taps=True)
    real_emb, real_taps, syn_emb, syn_taps = out
    fast = addon.loss(real_emb, real_taps, real_labels, syn_emb, syn_taps, m.labels)
    params = list(addon.heads.parameters())
    grads_fast = torch.autograd.grad(fast, [syn] + params, retain_graph=True)

    feats_r = [real_emb] if layers == "last" else [t.mean((2, 3)) for t in real_taps]
    feats_s = [syn_emb] if layers == "last" else [t.mean((2, 3)) for t in syn_taps]
    ref = 0.0
    for l, (fr, fs) in enumerate(zip(feats_r, feats_s)):
        if head == "linear":
            hr = addon.heads["shared" if shared else "real"][l]
            hs = addon.heads["shared" if shared else "syn"][l]
            fr, fs = F.linear(fr, hr.weight, hr.bias), F.linear(fs, hs.weight, hs.bias)
            assert fr.shape[1] == 128
        term = dense_infonce(fs.double(), m.labels, fr.double(), real_labels, 0.2, form)
        if sym:  # real rows as anchors too; the mean of the two directions
            term = 0.5 * (term + dense_infonce(fr.double(), real_labels, fs.double(), m.labels, 0.2, form))
        ref = ref + term
    ref = 0.7 * ref
    grads_ref = torch.autograd.grad(ref, [syn] + params)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-6)
    assert grads_fast[0].abs().sum() > 0
    if head == "linear":
        assert all(g.abs().sum() > 0 for g in grads_fast[1:])  # the heads learn (real heads included)
    else:
        assert not params


def test_mim_layer_mean_divides_by_layers(digits_train):
    vals = []
    for red in ("sum", "mean"):
        m = _method(digits_train, mim_layer_reduction=red)
        real, rl = m.sampler.sample(8, m.generator)
        out = embed_pairs(m.net, None, None, real, rl, m.images.detach(), m.labels, taps=True)
        vals.append(float(m.addons["mim"].loss(out[0], out[1], rl, out[2], out[3], m.labels).detach()))
    torch.testing.assert_close(vals[1] * 2, vals[0])  # ConvNetD2: 2 taps


# ------------------------------------------------------------------------------------------ state
def test_mim4dd_resume_is_exact_heads_included(digits_train, tmp_path):
    from fastdd.checkpoint import load, save_atomic

    straight = _method(digits_train).fit(progress=False)
    first = _method(digits_train).fit(2, progress=False)
    save_atomic(first.state_dict(), tmp_path / "ck.pt")
    resumed = _method(digits_train, seed=99)  # its own init is overwritten by the checkpoint ...
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict(load(tmp_path / "ck.pt"))  # ... but a different config is refused
    resumed = _method(digits_train)
    resumed.load_state_dict(load(tmp_path / "ck.pt"))
    resumed.fit(progress=False)
    assert torch.equal(straight.images, resumed.images)
    hs, hr = straight.addons["mim"].heads.state_dict(), resumed.addons["mim"].heads.state_dict()
    assert sorted(hs) == sorted(hr) and all(torch.equal(hs[k], hr[k]) for k in hs)
    init = _method(digits_train).addons["mim"].heads.state_dict()
    assert not all(torch.equal(init[k], hs[k]) for k in hs)  # the heads were trained
    assert straight.addons["mim"].optimizer.state_dict()["state"]  # momentum buffers exist and resumed


def test_mim_heads_init_from_the_run_generator(digits_train):
    a = _method(digits_train).addons["mim"].heads.state_dict()
    b = _method(digits_train).addons["mim"].heads.state_dict()
    c = _method(digits_train, seed=4).addons["mim"].heads.state_dict()
    state = torch.get_rng_state()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(state, torch.get_rng_state())


def test_mim_off_by_default_on_dm_and_on_over_ddm(digits_train):
    dm = get("dm")(DMConfig(ipc=2, batch_real=8, model="ConvNetD2"), digits_train)
    assert dm.addons == {}
    from fastdd.methods.ddm import DDMConfig

    ddm = get("ddm")(DDMConfig(ipc=2, iterations=2, batch_real=8, model="ConvNetD2", mim_weight=0.5,
                                mim_symmetric=True), digits_train)
    assert list(ddm.addons) == ["mim"]
    before = ddm.addons["mim"].heads.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    ddm.fit(progress=False)
    after = ddm.addons["mim"].heads.state_dict()
    assert not all(torch.equal(before[k], after[k]) for k in before)  # DDM steps the add-on


@pytest.mark.parametrize("field,value,match", [
    ("mim_form", "triplet", "mim_form"), ("mim_layers", "first", "mim_layers"), ("mim_pool", "flatten", "16.8M"),
    ("mim_head", "mlp", "mim_head"), ("mim_temperature", 0.0, "mim_temperature"), ("mim_weight", -1.0, "mim_weight"),
    ("mim_dim", 0, "mim_dim"), ("mim_lr", 0.0, "mim_lr"), ("mim_layer_reduction", "max", "mim_layer_reduction")])
def test_mim_bad_options_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        MIM4DDConfig(**{field: value}).validate()


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("argv", [["--method", "ddm"], ["--method", "mim4dd"],
                                  ["--method", "dm", "--mim-weight", "0.5", "--mim-form", "nce"]])
def test_cli_distills_and_saved_set_reloads_with_plain_torch(tmp_path, argv):
    out = tmp_path / "run"
    assert main(["distill", *argv, "--dataset", "digits", "--ipc", "2", "--batch-real", "8", "--iterations", "3",
                 "--model", "ConvNetD2", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    data = torch.load(out / "synthetic.pt", weights_only=True)
    assert data["images"].shape == (20, 1, 8, 8) and torch.isfinite(data["images"]).all()
    assert data["metadata"]["method"] == argv[1]
    if argv[1] != "ddm":
        assert data["config"]["mim_weight"] > 0
    else:
        assert data["config"]["style_weight"] == 1e4 and data["config"]["icd_weight"] == 10.0


# ------------------------------------------------------------------------------------------ real data
def test_mim4dd_beats_its_initial_real_subset_on_fashion_mnist(fmnist):
    from fastdd.evaluate import EvalConfig

    train, test = fmnist
    method = get("mim4dd")(MIM4DDConfig(ipc=1, iterations=60, batch_real=16, seed=0), train).fit(progress=False)
    assert_beats_initial_subset(method, train, test, EvalConfig(num_models=2, epochs=60, seed=0, faithful_epochs=False), 3.0)
