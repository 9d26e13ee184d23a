"""SRe2L / DWA recover: the fused BN-statistics loss against a float64 hook reference, the one-draw-per-batch
jitter, the recover loop (N(0,1) init, clamp, last iterate, exact resume), DWA's directed perturbation
against a hand-computed two-step case and its reset / accumulate modes, and the presets."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdd.crops import RecoverJitter
from fastdd.data import ImageDataset
from fastdd.matchers import BNStatisticsLoss
from fastdd.matchers.bn_stats import FusedStatsBatchNorm2d
from fastdd.methods import dwa as dwa_module
from fastdd.methods import get
from fastdd.methods.recover import unit_generator
from fastdd.models import get_model
from fastdd.squeeze import SqueezeConfig, squeeze


def toy_dataset(n_per_class=6, classes=4, size=8, channels=3, seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    images = torch.randn(len(labels), channels, size, size, generator=g) + labels.view(-1, 1, 1, 1).float() / 2
    return ImageDataset("toy", "train", images, labels, classes, mean=(0.5,) * channels, std=(0.25,) * channels)


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    squeeze(toy_dataset(), SqueezeConfig(model="ConvNetBN", epochs=2, batch_size=8, lr=0.01), out, progress=False)
    return str(out)


# ------------------------------------------------------------------------------------------------ BN loss
def hook_reference_loss(model64: nn.Module, x64: torch.Tensor, first: float, var_weight: float) -> torch.Tensor:
    """The reference's hook formulation in float64: per BN layer the input is permuted to [C, N*H*W],
    made contiguous, and its mean / biased variance taken per row."""
    terms = []

    def hook(module, inputs, _output):
        a = inputs[0]
        flat = a.permute(1, 0, 2, 3).contiguous().view(a.shape[1], -1)
        mean, var = flat.mean(1), flat.var(1, unbiased=False)
        terms.append(torch.norm(module.running_mean - mean, 2) + var_weight * torch.norm(module.running_var - var, 2))

    handles = [m.register_forward_hook(hook) for m in model64.modules() if isinstance(m, nn.BatchNorm2d)]
    model64(x64)
    for h in handles:
        h.remove()
    return first * terms[0] + sum(terms[1:])


@pytest.mark.parametrize("model_name,size", [("ConvNetBN", 16), ("TVResNet18S", 8)])
@pytest.mark.parametrize("var_weight", [1.0, 11.0])
@pytest.mark.parametrize("fused,channels_last", [(True, False), (True, True), (False, False), (False, True)],
                         ids=["fused", "fused-channels_last", "prehook", "prehook-channels_last"])
def test_bn_statistics_loss_and_gradient_match_float64_hook_reference(model_name, size, var_weight, fused,
                                                                      channels_last):
    """CE + L_BN and its gradient to the pixels against the float64 hook formulation, with the BN layers
    fused with their statistics (``fused``) or captured by pre-hooks, NCHW or channels_last; ``remove``
    gives the model back unchanged."""
    g = torch.Generator().manual_seed(3)
    kwargs = {"width": 16} if model_name == "ConvNetBN" else {}
    net = get_model(model_name, 3, 5, (size, size), generator=g, **kwargs).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    net64 = copy.deepcopy(net).double()
    keys = list(net.state_dict())
    x = torch.randn(6, 3, size, size, generator=g)
    y = torch.arange(6) % 5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x32 = x.clone().contiguous(memory_format=fmt).requires_grad_(True)
    bn = BNStatisticsLoss(net, first_multiplier=10.0, var_weight=var_weight, fused=fused)
    assert all(type(m) is (FusedStatsBatchNorm2d if fused else nn.BatchNorm2d) for m in bn.layers)
    loss = F.cross_entropy(net(x32), y) + bn.loss()
    loss.backward()
    x64 = x.double().requires_grad_(True)
    logits64 = []
    h = net64.register_forward_hook(lambda _m, _i, out: logits64.append(out))
    ref = hook_reference_loss(net64, x64, 10.0, var_weight)
    h.remove()
    ref = ref + F.cross_entropy(logits64[0], y)
    ref.backward()
    assert loss.dtype == torch.float32
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-5 * float(ref.detach())
    err = (x32.grad.double() - x64.grad).abs().max()
    assert err <= 1e-4 * x64.grad.abs().max(), float(err)
    assert len(bn.layers) == sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    bn.remove()
    assert all(type(m) is nn.BatchNorm2d for m in bn.layers) and list(net.state_dict()) == keys


def test_fused_bn_loss_in_train_mode_copies_and_pickles():
    """The switched layers: in train mode the input is captured as the pre-hook does; a deepcopy or pickle of
    the model leaves the loss behind (its layers act as plain BatchNorm); ``remove`` restores the class."""
    import pickle

    g = torch.Generator().manual_seed(4)
    net = get_model("ConvNetBN", 3, 4, (8, 8), generator=g, width=8).eval()
    x = torch.randn(5, 3, 8, 8, generator=g)
    plain = copy.deepcopy(net)
    bn, ref = BNStatisticsLoss(net, fused=True), BNStatisticsLoss(plain, fused=False)
    net.train(), plain.train()
    net(x), plain(x)
    torch.testing.assert_close(bn.loss(), ref.loss())
    net.eval()
    net(x)
    twin = copy.deepcopy(net)  # after a forward, before loss(): the copy must not drag the loss along
    assert not hasattr(twin, "_fastdd_owner") and all(not hasattr(m, "_fastdd_owner") for m in twin.modules())
    torch.testing.assert_close(twin(x), net(x))
    pickle.loads(pickle.dumps(net))
    bn.loss()
    bn.remove()
    assert all(type(m) is nn.BatchNorm2d for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_bn_loss_refuses_a_network_without_batchnorm():
    with pytest.raises(ValueError, match="no BatchNorm"):
        BNStatisticsLoss(get_model("ConvNet", 1, 2, (8, 8)))


# ------------------------------------------------------------------------------------------------ jitter
def test_jitter_draws_once_per_batch_from_the_generator():
    jit = RecoverJitter(crop=True, jitter=3)
    x = torch.randn(1, 3, 12, 12).expand(5, 3, 12, 12).contiguous()
    out = jit(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert all(torch.equal(out[0], out[i]) for i in range(5))  # one crop / flip / roll for the whole batch
    again = jit(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    g = torch.Generator().manual_seed(1)
    shifts = [RecoverJitter(jitter=3).draw((12, 12), g).shifts for _ in range(400)]
    values = {s for pair in shifts for s in pair}
    assert values == set(range(-3, 4))  # uniform on {-J..J} (the class default, offsets="symmetric")
    plain = RecoverJitter(crop=False, jitter=0)
    assert torch.equal(plain(x, g), x)


@pytest.mark.parametrize("offsets,low", [("symmetric", -3), ("nonnegative", 0)])
def test_roll_offsets_cover_their_range_reproducibly(offsets, low):
    """``symmetric``: o1, o2 uniform on {-J..J}; ``nonnegative``: on {0..J} (the spec's U{0..J}); the same
    generator state gives the same offsets, and the roll applied is exactly ``torch.roll`` by them."""
    jit = RecoverJitter(jitter=3, offsets=offsets)

    def draws(seed: int):
        g = torch.Generator().manual_seed(seed)
        return [jit.draw((12, 12), g).shifts for _ in range(400)], g

    shifts, g = draws(1)
    assert {s for pair in shifts for s in pair} == set(range(low, 4))
    assert draws(1)[0] == shifts and draws(2)[0] != shifts
    x = torch.arange(2 * 144.0).view(2, 1, 12, 12)
    d = jit.draw((12, 12), g)
    assert torch.equal(jit.apply(x, d), torch.roll(x, shifts=d.shifts, dims=(2, 3)))
    with pytest.raises(ValueError, match="offsets"):
        RecoverJitter(offsets="both")


def test_roll_offsets_option_presets_flag_and_validation(toy_teacher):
    from fastdd.cli import build_parser
    from fastdd.cliflags import values_from_args

    ds = toy_dataset()
    for name in ("sre2l", "dwa"):
        cls = get(name)
        for preset in ("cifar", "tiny", "imagenet"):  # symmetric by default in every preset
            m = cls(cls.config_cls(teacher=toy_teacher, preset=preset, ipc=1), ds)
            assert m.config.roll_offsets == m.jitter.offsets == "symmetric", (name, preset)
        m = cls(cls.config_cls(teacher=toy_teacher, ipc=1, roll_offsets="nonnegative"), ds)
        assert m.jitter.offsets == "nonnegative"
    cls = get("sre2l")
    args = build_parser("sre2l").parse_args(["distill", "--dataset", "digits", "--out", "x", "--method", "sre2l",
                                             "--roll-offsets", "symmetric"])
    assert cls.config_cls(**values_from_args(cls.config_cls, args)).roll_offsets == "symmetric"
    with pytest.raises(ValueError, match="roll_offsets"):
        cls.config_cls(teacher=toy_teacher, roll_offsets="both").validate()


# ------------------------------------------------------------------------------------------------ recover loop
def test_sre2l_noise_init_clamp_last_iterate_and_resume(toy_teacher):
    ds = toy_dataset()
    cls = get("sre2l")
    cfg = cls.config_cls(teacher=toy_teacher, ipc=2, iterations=6, batch_classes=3, lr_img=0.25, seed=5)
    m = cls(cfg, ds)
    assert m.config.preset == "cifar" and m.config.r_bn == 0.01 and m.config.first_bn_multiplier == 10.0
    assert m.units == 4 and m.total_steps == 24  # 2 IPC indices x 2 class batches (3 + 1 classes)
    expected = torch.empty(8, 3, 8, 8)
    for unit in range(m.units):  # N(0, 1) from each unit's own init generator
        rows = m.unit_rows(unit)[2]
        expected[rows] = torch.randn(rows.numel(), 3, 8, 8, generator=unit_generator(5, unit, "init"))
    assert torch.equal(m.images.detach(), expected)
    m.fit(progress=False)
    images = m.synthetic_set()["images"]
    low, high = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert images.min() >= low - 1e-6 and images.max() <= high + 1e-6
    assert not torch.equal(images, expected)
    assert torch.equal(images[m.unit_rows(3)[2]], m.work.detach())  # the last iterate is what is kept

    half = cls(cfg, ds)
    half.fit(9, progress=False)  # stops inside unit 1
    state = copy.deepcopy(half.state_dict())
    resumed = cls(cfg, ds)
    resumed.load_state_dict(state)
    resumed.fit(progress=False)
    assert torch.equal(resumed.synthetic_set()["images"], images)

    # a checkpoint from before the roll_offsets and compile fields (symmetric offsets, eager) still resumes
    old = copy.deepcopy(half.state_dict())  # (resuming moved the tensors of ``state``'s Adam state in place)
    del old["config"]["roll_offsets"], old["config"]["compile"]
    again = cls(cfg, ds)
    again.load_state_dict(old)
    again.fit(progress=False)
    assert torch.equal(again.synthetic_set()["images"], images)
    # steps per unit define the run (unit boundaries, cosine schedule): another value is refused
    with pytest.raises(ValueError, match="iterations: checkpoint 6 vs now 7"):
        cls(dataclasses.replace(cfg, iterations=7), ds).load_state_dict(copy.deepcopy(half.state_dict()))
    nonneg = copy.deepcopy(half.state_dict())
    del nonneg["config"]["roll_offsets"]
    with pytest.raises(ValueError, match="roll_offsets: checkpoint 'symmetric' vs now 'nonnegative'"):
        cls(dataclasses.replace(cfg, roll_offsets="nonnegative"), ds).load_state_dict(nonneg)


def test_recover_loss_decreases_over_a_unit(toy_teacher):
    ds = toy_dataset()
    cls = get("sre2l")
    m = cls(cls.config_cls(teacher=toy_teacher, ipc=1, iterations=40, lr_img=0.1, jitter=0, seed=0), ds)
    losses = []
    for _ in range(40):
        losses.append(m.step())
        m.iteration += 1
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])


@pytest.mark.parametrize("name", ["sre2l", "dwa"])
def test_compiled_teacher_loss_matches_eager(name, toy_teacher):
    """``compile="on"``: the teacher loss runs through torch.compile (fullgraph) and gives the eager run's
    losses and images up to fp32 rounding, DWA's perturbed teacher included (its parameters are graph inputs)."""
    ds = toy_dataset()
    cls = get(name)
    extra = dict(rho=0.5, perturb_steps=2) if name == "dwa" else {}
    runs = {}
    for mode in ("off", "on"):
        m = cls(cls.config_cls(teacher=toy_teacher, ipc=2, iterations=3, batch_classes=2, seed=4, compile=mode,
                               **extra), ds)
        assert m._teacher_loss.enabled == (mode == "on")
        losses = []
        for _ in range(m.total_steps):
            losses.append(m.step())
            m.iteration += 1
        runs[mode] = (torch.tensor(losses), m.synthetic_set()["images"])
        assert m._teacher_loss.enabled == (mode == "on")  # no fallback to eager happened
    torch.testing.assert_close(runs["on"][0], runs["off"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs["on"][1], runs["off"][1], rtol=1e-3, atol=1e-3)


def test_compile_option_is_checked(toy_teacher):
    cls = get("sre2l")
    with pytest.raises(ValueError, match="compile"):
        cls(cls.config_cls(teacher=toy_teacher, ipc=1, iterations=1, compile="yes"), toy_dataset())
    with pytest.raises(ValueError, match="memory_format"):
        cls(cls.config_cls(teacher=toy_teacher, ipc=1, iterations=1, memory_format="nhwc"), toy_dataset())


@pytest.mark.parametrize("name", ["sre2l", "dwa"])
def test_channels_last_teacher_matches_contiguous(name, toy_teacher):
    """``memory_format``: the channels_last teacher (``auto`` on a CPU; the BN statistics read its maps in
    place) gives the NCHW teacher's losses and images up to fp32 rounding, DWA's perturbed teacher included;
    the option may change on resume (an execution field)."""
    ds = toy_dataset()
    cls = get(name)
    extra = dict(rho=0.5, perturb_steps=2) if name == "dwa" else {}
    runs = {}
    for fmt in ("contiguous", "auto"):
        m = cls(cls.config_cls(teacher=toy_teacher, ipc=2, iterations=3, batch_classes=2, seed=4, compile="off",
                               memory_format=fmt, **extra), ds)
        conv = next(p for p in m.teacher.parameters() if p.dim() == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last) == (fmt == "auto")
        losses = []
        for _ in range(m.total_steps):
            losses.append(m.step())
            m.iteration += 1
        runs[fmt] = (torch.tensor(losses), m.synthetic_set()["images"], m.state_dict())
    torch.testing.assert_close(runs["auto"][0], runs["contiguous"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs["auto"][1], runs["contiguous"][1], rtol=1e-3, atol=1e-3)
    m = cls(cls.config_cls(teacher=toy_teacher, ipc=2, iterations=3, batch_classes=2, seed=4, compile="off",
                           memory_format="contiguous", **extra), ds)
    m.load_state_dict(runs["auto"][2])


# ------------------------------------------------------------------------------------------------ DWA
def tiny_bn_classifier(channels=3, classes=4) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(channels), nn.Flatten(), nn.Linear(channels, classes)).double()
    with torch.no_grad():
        net[0].weight.uniform_(0.5, 1.5, generator=g)
        net[0].bias.normal_(0, 0.3, generator=g)
        net[0].running_mean.normal_(0, 0.5, generator=g)
        net[0].running_var.uniform_(0.5, 2.0, generator=g)
        net[2].weight.normal_(0, 1, generator=g)
        net[2].bias.normal_(0, 0.1, generator=g)
    return net.eval()


def hand_step(gamma, beta, W, b, rm, rv, x, y, rho, K):
    """One normalised ascent step of DWA, with the gradients of CE through eval-mode BN + linear written out."""
    xhat = (x - rm) / torch.sqrt(rv + 1e-5)  # [N, C]
    z = gamma * xhat + beta
    logits = z @ W.T + b
    G = (torch.softmax(logits, 1) - F.one_hot(y, W.shape[0]).double()) / x.shape[0]  # dCE/dlogits [N, K]
    dW, db = G.T @ z, G.sum(0)
    dz = G @ W
    dgamma, dbeta = (dz * xhat).sum(0), dz.sum(0)
    norm = torch.sqrt(sum((t ** 2).sum() for t in (dgamma, dbeta, dW, db)))
    s = (rho / K) / (norm + 1e-12)
    return gamma + s * dgamma, beta + s * dbeta, W + s * dW, b + s * db


def test_directed_perturbation_matches_hand_computed_two_steps():
    net = tiny_bn_classifier()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 1, 1, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    theta0 = [p.detach().clone() for p in net.parameters()]
    rm, rv = net[0].running_mean.clone(), net[0].running_var.clone()
    rho, K = 0.3, 2
    want = [t.clone() for t in theta0]
    for _ in range(K):
        want = list(hand_step(*want, rm, rv, x.view(5, 3), y, rho, K))
    dwa_module.directed_perturbation(net, x, y, rho, K)
    got = list(net.parameters())
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    dist = torch.sqrt(sum(((a.detach() - b) ** 2).sum() for a, b in zip(got, theta0)))
    assert 0 < float(dist) <= rho * (1 + 1e-12)
    assert torch.equal(net[0].running_mean, rm) and torch.equal(net[0].running_var, rv)  # stats untouched
    assert not net.training
    # ascent: the loss went up
    with torch.no_grad():
        before = copy.deepcopy(net)
        for p, q in zip(before.parameters(), theta0):
            p.copy_(q)
        assert F.cross_entropy(net(x), y) > F.cross_entropy(before(x), y)


@pytest.mark.parametrize("mode", ["reset", "accumulate"])
def test_dwa_modes_start_each_perturbation_where_the_spec_says(mode, toy_teacher, monkeypatch):
    ds = toy_dataset()
    cls = get("dwa")
    cfg = cls.config_cls(teacher=toy_teacher, ipc=2, iterations=2, batch_classes=2, rho=0.5, perturb_steps=3,
                         dwa_mode=mode, seed=0)
    m = cls(cfg, ds)
    assert m.config.r_var == 11.0 and m.init_indices is not None  # cifar preset, real init
    trained = [p.detach().clone() for p in m.teacher.parameters()]
    stats = [b.detach().clone() for b in m.teacher.buffers()]
    starts, ends = [], []
    original = dwa_module.directed_perturbation

    def recording(model, x, labels, rho, steps):
        starts.append([p.detach().clone() for p in model.parameters()])
        original(model, x, labels, rho, steps)
        ends.append([p.detach().clone() for p in model.parameters()])

    monkeypatch.setattr(dwa_module, "directed_perturbation", recording)
    m.fit(progress=False)
    assert len(starts) == 4  # one perturbation per unit: 2 IPC indices x 2 class batches

    def same(a, b):
        return all(torch.equal(s, t) for s, t in zip(a, b))

    def dist(a, b):
        return float(torch.sqrt(sum(((s - t) ** 2).sum() for s, t in zip(a, b))))

    for u in range(4):
        assert 0 < dist(ends[u], starts[u]) <= 0.5 * (1 + 1e-5)
    assert same(starts[0], trained) and same(starts[2], trained)  # each IPC index starts from the teacher
    if mode == "reset":
        assert same(starts[1], trained) and same(starts[3], trained)
    else:  # the second class batch continues from the first one's perturbed teacher
        assert same(starts[1], ends[0]) and same(starts[3], ends[2])
        assert dist(ends[1], trained) <= 1.0 * (1 + 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(m.teacher.buffers(), stats))  # running stats untouched


def test_dwa_resume_restores_the_perturbed_teacher(toy_teacher):
    ds = toy_dataset()
    cls = get("dwa")
    cfg = cls.config_cls(teacher=toy_teacher, ipc=1, iterations=4, batch_classes=2, perturb_steps=2, seed=2)
    full = cls(cfg, ds).fit(progress=False)
    half = cls(cfg, ds)
    half.fit(6, progress=False)  # inside unit 1, after its perturbation (accumulated on unit 0's)
    resumed = cls(cfg, ds)
    resumed.load_state_dict(copy.deepcopy(half.state_dict()))
    resumed.fit(progress=False)
    assert torch.equal(resumed.synthetic_set()["images"], full.synthetic_set()["images"])


def test_presets_and_validation(toy_teacher):
    cls = get("dwa")
    ds = toy_dataset()
    for preset, want in (("cifar", (1000, 100, 11.0, 4, False, 12)), ("tiny", (2000, 200, 11.0, 4, True, 12)),
                         ("imagenet", (2000, 100, 2.0, 32, True, 15))):
        c = cls(cls.config_cls(teacher=toy_teacher, preset=preset, ipc=1), ds).config
        assert (c.iterations, c.batch_classes, c.r_var, c.jitter, c.crop, c.perturb_steps) == want
        assert c.rho == 0.015 and c.r_bn == 0.01 and c.first_bn_multiplier == 10.0
    s = get("sre2l")
    c = s(s.config_cls(teacher=toy_teacher, preset="imagenet", ipc=1, iterations=3), ds).config
    assert (c.iterations, c.lr_img, c.jitter, c.crop, c.r_var) == (3, 0.25, 32, True, 1.0)  # flags beat the preset
    with pytest.raises(ValueError, match="dwa_mode"):
        cls.config_cls(teacher=toy_teacher, dwa_mode="sometimes").validate()
    with pytest.raises(ValueError, match="teacher"):
        cls.config_cls().validate()
    with pytest.raises(ValueError, match="r_var"):
        cls.config_cls(teacher=toy_teacher, r_var=-1.0).validate()
