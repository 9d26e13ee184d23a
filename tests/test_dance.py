"""DANCE: mid encoder, loss terms vs plain float64 references, the faithful 2C-step update, the saved set,
exact resume, bad input, and a real-data check on Fashion-MNIST."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from fastdd.experts import META_FILE, init_file, trained_file
from fastdd.methods import get
from fastdd.methods.dance import DANCEConfig, interpolate_params
from fastdd.models import get_model

DANCE = get("dance")


def fake_experts(path, ds, n=2, seed=0):
    """n (init, 'trained') pairs of random ConvNets written in the `fastdd pretrain` layout."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        for j, name in enumerate((init_file(i), trained_file(i))):
            g = torch.Generator().manual_seed(seed * 100 + 2 * i + j)
            net = get_model("ConvNet", ds.channels, ds.num_classes, ds.image_size, generator=g)
            torch.save(net.state_dict(), path / name)
    meta = {"dataset": ds.name, "num_classes": ds.num_classes, "channels": ds.channels,
            "image_size": list(ds.image_size), "model": "ConvNet", "config": {}, "finished_models": n}
    (path / META_FILE).write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def experts(tmp_path_factory, digits_train):
    return fake_experts(tmp_path_factory.mktemp("experts"), digits_train)


def small(digits_train, per_class=12, dtype=torch.float32):
    idx = torch.cat([torch.nonzero(digits_train.labels == c).flatten()[:per_class] for c in range(10)])
    return dataclasses.replace(digits_train, images=digits_train.images[idx].to(dtype), labels=digits_train.labels[idx])


def make(ds, experts, **kw):
    cfg = DANCEConfig(**{**dict(experts=str(experts), num_premodel=2, ipc=1, batch_real=4, iterations=2), **kw})
    return DANCE(cfg, ds)


def test_mid_encoder_interpolation_exact_at_ends_and_linear():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    b = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    out = [torch.empty_like(t) for t in a]
    interpolate_params(out, a, b, 0.0)
    assert all(torch.equal(o, t) for o, t in zip(out, b))  # lambda 0: the trained expert
    interpolate_params(out, a, b, 1.0)
    assert all(torch.equal(o, t) for o, t in zip(out, a))  # lambda 1: the initialisation
    a64, b64 = [t.double() for t in a], [t.double() for t in b]
    out64 = [torch.empty_like(t) for t in a64]
    for lam in (0.25, 0.7):
        interpolate_params(out64, a64, b64, lam)
        assert all(torch.allclose(o, lam * x + (1 - lam) * y, rtol=0, atol=1e-15) for o, x, y in zip(out64, a64, b64))


def test_set_mid_uses_cached_expert_k(digits_train, experts):
    m = make(small(digits_train), experts)
    m.set_mid(1, 0.0)
    trained = torch.load(experts / trained_file(1), weights_only=True)
    init = torch.load(experts / init_file(1), weights_only=True)
    for name, p in m.mid.named_parameters():
        assert torch.equal(p, trained[name])
    for name, p in m.expert.named_parameters():
        assert torch.equal(p, trained[name])
    m.set_mid(1, 1.0)
    for name, p in m.mid.named_parameters():
        assert torch.equal(p, init[name])
    assert not any(p.requires_grad for p in m.mid.parameters()) and not any(p.requires_grad for p in m.expert.parameters())


def _double(m):
    m.mid.double()
    m.expert.double()
    m.expert_init = [[t.double() for t in ps] for ps in m.expert_init]
    m.expert_trained = [[t.double() for t in ps] for ps in m.expert_trained]


def test_inner_loss_matches_float64_reference_with_gradients(digits_train, experts):
    m = make(small(digits_train), experts, dsa=False)
    _double(m)
    m.set_mid(0, 0.3)
    g = torch.Generator().manual_seed(3)
    real = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    syn = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.zeros
    loss = m.inner_loss(real, syn, z(6, dtype=torch.long), z(3, dtype=torch.long), 1)
    (grad,) = torch.autograd.grad(loss, syn)
    syn_ref = syn.detach().clone().requires_grad_()
    ref = ((m.mid.embed(real).mean(0) - m.mid.embed(syn_ref).mean(0)) ** 2).sum()
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad, syn_ref.grad, rtol=1e-8, atol=1e-12)


def test_inner_loss_augmentation_is_shared_between_real_and_synthetic(digits_train, experts):
    m = make(small(digits_train), experts)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator(device='cpu').manual_seed(1000))
    labels = torch.tensor([0, 0, 1, 1])
    # identical real and synthetic batches: a shared draw per class keeps the per-class means equal
    assert float(m.inner_loss(x, x.clone(), labels, labels, 2)) == pytest.approx(0.0, abs=1e-8)


def test_calibration_loss_matches_float64_reference_with_gradients(digits_train, experts):
    m = make(small(digits_train), experts, dsa=False)
    _double(m)
    m.set_mid(1, 0.5)
    g = torch.Generator().manual_seed(4)
    syn = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    groups = torch.tensor([0, 0, 1, 1, 1])
    classes = torch.tensor([3, 3, 7, 7, 7])
    loss = m.calib_loss(syn, groups, classes, 2)
    (grad,) = torch.autograd.grad(loss, syn)
    syn_ref = syn.detach().clone().requires_grad_()
    logp = torch.log_softmax(m.expert(syn_ref), dim=1)
    ref = -(logp[:2, 3].mean() + logp[2:, 7].mean())  # sum over classes of each class's mean CE
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-10) and torch.allclose(grad, syn_ref.grad, rtol=1e-8, atol=1e-12)


def three_classes(ds):
    keep = ds.labels < 3
    return dataclasses.replace(ds, images=ds.images[keep], labels=ds.labels[keep], num_classes=3,
                               class_names=ds.class_names[:3])


def test_per_class_step_equals_hand_written_2C_momentum_steps(digits_train, experts):
    ds = three_classes(small(digits_train, per_class=6, dtype=torch.float64))
    exp = fake_experts(experts.parent / "e3", ds)
    m = make(ds, exp, dsa=False, batch_real=3, ipc=2, lr_img=0.3, momentum_img=0.5)
    _double(m)
    x = m.synth.images.detach().clone()
    state = m.generator.get_state()
    m.step()
    m.step()
    # replay by hand: same draws, plain formulas, plain SGD with momentum (buffer over the whole tensor)
    g = torch.Generator().manual_seed(0)
    g.set_state(state)
    mean, std = m._mean, m._std
    buf = None
    for _ in range(2):
        k = int(torch.randint(0, 2, (1,), generator=g))
        lam = float(torch.rand((), generator=g))
        m.set_mid(k, lam)
        real, _ = m.sampler.sample(3, g)
        x = x.clamp(0, 1)
        steps = [("inner", c) for c in range(3)] + [("calib", c) for c in range(3)]
        for kind, c in steps:
            xv = x.clone().requires_grad_()
            s = (xv[2 * c:2 * c + 2] - mean) / std
            if kind == "inner":
                loss = ((m.mid.embed(real[3 * c:3 * c + 3]).mean(0) - m.mid.embed(s).mean(0)) ** 2).sum()
            else:
                loss = F.cross_entropy(m.expert(s), torch.full((2,), c))
            (gr,) = torch.autograd.grad(loss, xv)
            buf = gr if buf is None else 0.5 * buf + gr
            x = x - 0.3 * buf
    assert torch.allclose(m.synth.images.detach(), x, rtol=1e-10, atol=1e-12)


def test_batched_mode_runs_and_differs(digits_train, experts):
    ds = small(digits_train)
    a = make(ds, experts, step_mode="per_class", lr_img=0.5)
    b = make(ds, experts, step_mode="batched", lr_img=0.5)
    a.fit(progress=False)
    b.fit(progress=False)
    assert not torch.allclose(a.synth.images, b.synth.images)
    assert float(b.synth.images.detach().min()) >= -0.5  # pixel storage


def test_saved_set_holds_decoded_images_and_stored_tensor(digits_train, experts):
    ds = small(digits_train)
    m = make(ds, experts, factor=2, ipc=1)
    assert m.synth.images.shape == (10, 1, 8, 8) and float(m.synth.images.detach().min()) >= 0.0
    m.fit(progress=False)
    s = m.synthetic_set()
    assert s["images"].shape == (40, 1, 8, 8) and s["labels"].tolist() == sorted(list(range(10)) * 4)
    assert s["stored_images"].shape == (10, 1, 8, 8) and s["stored_labels"].shape == (10,)
    assert s["init_indices"].shape == (40,)
    from fastdd.idc import decode

    pix = decode(s["stored_images"].clamp(0, 1), 2)
    assert torch.allclose(s["images"], ds.normalize(pix), atol=1e-6)
    # init: the first 4 images of each class (dataset order) mosaicked
    first = torch.nonzero(ds.labels == 0).flatten()[:4]
    assert torch.equal(s["init_indices"][:4], first)


def test_normalized_storage_is_not_clamped(digits_train, experts):
    m = make(small(digits_train), experts, storage="normalized")
    assert float(m.synth.images.min()) < 0  # normalised space
    assert m.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / m.dataset.std[0] ** 2)  # same step per pixel
    m.fit(progress=False)
    s = m.synthetic_set()
    assert torch.allclose(s["images"], s["stored_images"])


def test_exact_resume(digits_train, experts):
    ds = three_classes(small(digits_train))
    experts = fake_experts(experts.parent / "e3r", ds)
    kw = dict(iterations=3, lr_img=0.2, factor=2, batch_syn_max=3)
    straight = make(ds, experts, **kw).fit(progress=False)
    first = make(ds, experts, **kw).fit(2, progress=False)
    state = first.state_dict()
    resumed = make(ds, experts, **kw)
    resumed.load_state_dict(state)
    resumed.fit(progress=False)
    assert torch.equal(resumed.synth.images, straight.synth.images)


def test_bad_input(tmp_path, digits_train, experts):
    ds = small(digits_train)
    with pytest.raises(ValueError, match="experts: DANCE needs"):
        DANCE(DANCEConfig(ipc=1), ds)
    with pytest.raises(FileNotFoundError, match="not an expert directory"):
        make(ds, tmp_path / "nothing")
    with pytest.raises(ValueError, match="num_premodel=5 is larger than the 2 finished experts"):
        make(ds, experts, num_premodel=5)
    with pytest.raises(ValueError, match="ipc=4 with factor=2 needs 16 images"):
        make(ds, experts, ipc=4, factor=2)
    with pytest.raises(ValueError, match="ipc=13 is larger than class 0"):
        make(ds, experts, ipc=13)
    with pytest.raises(ValueError, match="batch_real=13 is larger than class"):
        make(ds, experts, batch_real=13)
    with pytest.raises(ValueError, match="step_mode"):
        make(ds, experts, step_mode="fused")
    with pytest.raises(ValueError, match="storage"):
        make(ds, experts, storage="x")
    with pytest.raises(ValueError, match="lr_img"):
        make(ds, experts, lr_img=-1.0)
    other = fake_experts(tmp_path / "rgb", dataclasses.replace(ds, images=ds.images.expand(-1, 3, -1, -1),
                                                               mean=(0.5,) * 3, std=(0.5,) * 3))
    with pytest.raises(ValueError, match="experts: trained for channels"):
        make(ds, other)


def test_dance_beats_its_initial_real_subset_on_fashion_mnist(tmp_path, fmnist):
    """Tiny real pipeline: 2 width-32 ConvNet experts x 1 epoch on 2000 images, DANCE IPC 1 (faithful
    per-class steps) for a few dozen iterations, DM protocol at a small budget; DANCE beats the real
    images it started from by a margin. (Width 32 keeps the test within the 2-core CI budget.)"""
    import time

    from fastdd.evaluate import EvalConfig, evaluate_synset
    from fastdd.experts import PretrainConfig, pretrain_experts

    train, test = fmnist
    t0 = time.perf_counter()
    exp = pretrain_experts(train, PretrainConfig(models=2, epochs=1, train_subset=2000, model="ConvNetW32"),
                           tmp_path / "exp", progress=False)
    t1 = time.perf_counter()
    cfg = DANCEConfig(experts=str(exp), num_premodel=2, ipc=1, iterations=ITER_FM, batch_real=16, lr_img=LR_FM,
                      init_order="random", model="ConvNetW32")
    m = DANCE(cfg, train).fit(progress=False)
    t2 = time.perf_counter()
    s = m.synthetic_set()
    idx = torch.cat([torch.nonzero(test.labels == c).flatten()[:100] for c in range(10)])
    test_small = dataclasses.replace(test, images=test.images[idx], labels=test.labels[idx])
    res = evaluate_synset(s["images"], s["labels"], train, test_small,
                          EvalConfig(model="ConvNetW32", num_models=3, epochs=100, faithful_epochs=False),
                          baseline_indices=s["init_indices"])
    d = res.to_dict()
    print(res.summary(), f"pretrain {t1 - t0:.0f} s, distill {t2 - t1:.0f} s")
    assert d["accuracy_mean"] >= d["random_baseline_mean"] + 3.0, d


ITER_FM, LR_FM = 30, 0.05


def test_cli_pretrain_distill_evaluate_idc(tmp_path, capsys):
    from fastdd.cli import main

    exp, run = tmp_path / "exp", tmp_path / "run"
    assert main(["pretrain", "--dataset", "digits", "--models", "1", "--epochs", "1", "--train-subset", "100",
                 "--out", str(exp), "--device", "cpu", "--no-progress"]) == 0
    assert main(["distill", "--method", "dance", "--dataset", "digits", "--experts", str(exp), "--num-premodel", "1",
                 "--ipc", "1", "--factor", "2", "--iterations", "2", "--batch-real", "4", "--out", str(run),
                 "--device", "cpu", "--no-progress"]) == 0
    data = torch.load(run / "synthetic.pt", weights_only=True)  # plain torch
    assert data["images"].shape == (40, 1, 8, 8) and data["stored_images"].shape == (10, 1, 8, 8)
    assert data["config"]["factor"] == 2 and data["config"]["storage"] == "pixel"
    assert main(["evaluate", str(run), "--protocol", "idc", "--epochs", "2", "--models", "1", "--device", "cpu"]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["config"]["protocol"] == "idc" and report["config"]["batch_size"] == 64
    assert report["best_accuracy_mean"] >= report["accuracy_mean"] and report["best_is_test_set_selection"]
    assert len(report["checkpoint_accuracies"][0]) == 1
    assert "best of test checkpoints" in capsys.readouterr().out
    # missing experts directory: a clear CLI error
    assert main(["distill", "--method", "dance", "--dataset", "digits", "--experts", str(tmp_path / "none"),
                 "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "not an expert directory" in capsys.readouterr().err


def test_low_rank_plugin_over_dance(digits_train, experts):
    """rank 2: the stored images are the (clamped) reconstruction of the factors; the saved set holds
    the factors (no stored pixels needed to rebuild it) and decodes to the training images."""
    pytest.importorskip("fastdd.matchers.lowrank")
    ds = small(digits_train)
    m = make(ds, experts, rank=2, ipc=1, factor=2, lr_img=0.1)
    n = m.images_per_class
    m.fit(progress=False)
    s = m.synthetic_set()
    assert "factor_a" in s and "factor_b" in s
    rebuilt = torch.matmul(s["factor_a"], s["factor_b"]).clamp(0, 1)
    assert torch.allclose(s["stored_images"], rebuilt, atol=1e-6)
    assert s["images"].shape[0] == 10 * n * 4 and s["labels"].shape[0] == 10 * n * 4
    from fastdd.idc import decode

    assert torch.allclose(s["images"], ds.normalize(decode(rebuilt, 2)), atol=1e-5)


@pytest.mark.parametrize("form", ["supcon", "nce"])
@pytest.mark.parametrize("step_mode", ["per_class", "batched"])
def test_mim_addon_over_dance_trains_heads_and_changes_the_update(digits_train, experts, form, step_mode):
    """--mim-weight over DANCE: the add-on's heads are trained and the images move differently. In the
    per-class step mode the add-on contrasts the class's synthetic images with the real images of every
    class (a one-class contrast would have no negatives: the NCE form would then be exactly 0)."""
    ds = small(digits_train)
    plain = make(ds, experts, ipc=2, iterations=2, step_mode=step_mode).fit(progress=False)
    mim = make(ds, experts, ipc=2, iterations=2, mim_weight=1.0, mim_form=form, step_mode=step_mode)
    real, real_labels = mim.sampler.sample(4, torch.Generator().manual_seed(1))
    emb, taps, labels = mim._real_features_all(real, real_labels)
    syn = mim._class_syn(3)
    syn_emb, syn_taps = mim._embed(syn)
    term = mim.addon_loss(emb, taps, labels, syn_emb, syn_taps, torch.full((syn.shape[0],), 3))
    assert float(term) > 0 and torch.autograd.grad(term, mim.synth.images)[0].abs().sum() > 0
    assert set(mim.addons) == {"mim"}
    heads_before = mim.state_dict()["addons"]["mim"]["heads"]
    assert heads_before  # learned linear heads by default
    mim.fit(progress=False)
    assert torch.isfinite(torch.tensor(mim.last_loss))
    assert not torch.equal(plain.synthetic_set()["images"], mim.synthetic_set()["images"])
    after = mim.state_dict()["addons"]["mim"]["heads"]
    assert any(not torch.equal(heads_before[k], after[k]) for k in heads_before)


def test_low_rank_noise_init_starts_inside_the_pixel_range(digits_train, experts):
    """rank > 0 with noise init projects DANCE's own N(0,1)/4 + 0.5 images: the pixel clamp clips few pixels."""
    m = make(small(digits_train), experts, rank=2, init="noise")
    x = m.images.detach()
    assert float(((x < 0) | (x > 1)).float().mean()) < 0.1


def test_experts_architecture_must_match_the_model_option(digits_train, experts):
    with pytest.raises(ValueError, match="model: 'ConvNetW32' differs from the experts' architecture 'ConvNet'"):
        make(small(digits_train), experts, model="ConvNetW32")


def test_saved_stored_tensor_is_clamped_and_decodes_to_the_saved_images(digits_train, experts):
    from fastdd.idc import decode

    ds = small(digits_train)
    m = make(ds, experts, factor=2, lr_img=5.0).fit(progress=False)  # a large step leaves [0, 1] before the clamp
    s = m.synthetic_set()
    assert float(s["stored_images"].min()) >= 0 and float(s["stored_images"].max()) <= 1
    torch.testing.assert_close(s["images"], ds.normalize(decode(s["stored_images"], 2)), rtol=1e-5, atol=1e-5)
