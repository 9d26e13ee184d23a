"""Tests for fastdd.models: shapes, the reference's layout rules, seeded init, vmap over stacked models."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, stack_module_state

from fastdd.models import MLP, ConvNet, ResNet18, get_model, init_parameters, model_names


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# shapes and layout


@pytest.mark.parametrize(
    "name, channel, size, feat",
    [
        ("ConvNet", 1, 28, 2048),
        ("ConvNet", 3, 32, 2048),
        ("ConvNet", 3, 64, 128 * 8 * 8),
        ("ConvNetD4", 3, 64, 2048),
        ("ConvNetW32", 3, 32, 32 * 4 * 4),
        ("ConvNetNP", 3, 8, 128 * 8 * 8),
    ],
)
def test_embedding_sizes(name, channel, size, feat):
    model = get_model(name, channel, 10, size, generator=gen(0))
    assert model.feature_dim == feat
    x = torch.randn(2, channel, size, size)
    assert model.embed(x).shape == (2, feat)
    assert model(x).shape == (2, 10)


def test_28x28_padding_rule():
    convs = lambda m: [l for l in m.features if isinstance(l, nn.Conv2d)]
    mnist = ConvNet(1, 10, im_size=(28, 28))
    assert [c.padding for c in convs(mnist)] == [(3, 3), (1, 1), (1, 1)]
    assert mnist.feature_shape == (128, 4, 4)  # 28x28 is treated as 32x32
    # the first block's map really is 32x32 (the LayerNorm variant is sized from the bookkeeping)
    assert mnist.features[0](torch.randn(1, 1, 28, 28)).shape == (1, 128, 32, 32)
    assert ConvNet(1, 10, norm="layernorm", im_size=28).features[1].normalized_shape == (128, 32, 32)

    rgb28 = ConvNet(3, 10, im_size=(28, 28))
    assert [c.padding for c in convs(rgb28)] == [(1, 1)] * 3
    assert rgb28.feature_dim == 128 * 3 * 3
    assert rgb28.embed(torch.randn(2, 3, 28, 28)).shape == (2, 128 * 3 * 3)
    gray32 = ConvNet(1, 10, im_size=(32, 32))
    assert convs(gray32)[0].padding == (1, 1) and gray32.feature_dim == 2048


def test_layer_layout_matches_reference_state_dict_keys():
    # conv, norm, act, pool per block; norm/pool entries omitted when "none"
    keys = set(ConvNet(3, 10).state_dict())
    assert keys == {f"features.{i}.{p}" for i in (0, 1, 4, 5, 8, 9) for p in ("weight", "bias")} | {
        "classifier.weight",
        "classifier.bias",
    }
    nn_keys = set(ConvNet(3, 10, norm="none", pool="none").state_dict())
    assert {k.rsplit(".", 1)[0] for k in nn_keys} == {"features.0", "features.2", "features.4", "classifier"}


def test_parameter_count_cifar10_convnet3():
    m = ConvNet(3, 10)
    counts = [sum(p.numel() for p in l.parameters()) for l in m.features]
    assert counts[0] == 3584 and counts[4] == 147584 and counts[8] == 147584
    assert counts[1] + counts[5] + counts[9] == 768
    assert sum(p.numel() for p in m.classifier.parameters()) == 20490
    assert sum(p.numel() for p in m.parameters()) == 320010


def test_instancenorm_is_per_sample_channel_groupnorm():
    m = get_model("ConvNet", 3, 10, 32, generator=gen(1))
    norm = m.features[1]
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels == 128 and norm.affine
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0, generator=gen(2))
        norm.bias.normal_(generator=gen(3))
        x = torch.randn(4, 3, 32, 32, generator=gen(6)) * 3 + 1
        out = m.features[:2](x)
        before_affine = (out - norm.bias[:, None, None]) / norm.weight[:, None, None]
    mean = before_affine.mean(dim=(2, 3))
    var = before_affine.var(dim=(2, 3), unbiased=False)
    assert mean.abs().max() < 1e-4
    # GroupNorm divides by sqrt(var + eps); the post-conv maps have var >> eps
    assert (var - 1).abs().max() < 1e-2


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetNN", "ConvNetLN", "ConvNetGN", "ResNet18"])
def test_embedding_is_batch_independent(name):
    # float64 so that batch-size dependent conv kernels (float32 rounding, amplified by the
    # normalisations over 2x2 maps deep in ResNet) cannot hide or fake a dependence
    size = 16
    m = get_model(name, 3, 10, size, generator=gen(4)).double()
    x = torch.randn(3, 3, size, size, generator=gen(5), dtype=torch.float64)
    full = m.embed(x)
    alone = m.embed(x[:1])
    other = m.embed(torch.cat([x[:1], torch.randn(2, 3, size, size, generator=gen(6), dtype=torch.float64) * 5]))
    torch.testing.assert_close(full[:1], alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(other[:1], alone, rtol=1e-10, atol=1e-10)


def test_batchnorm_embedding_depends_on_batch_in_train_mode():
    # the counterpart of the test above: batch statistics mix samples
    m = get_model("ConvNetBN", 3, 10, 16, generator=gen(4))
    x = torch.randn(4, 3, 16, 16, generator=gen(5))
    assert not torch.allclose(m.embed(x)[:2], m.embed(x[:2]), atol=1e-4)


@pytest.mark.parametrize(
    "act, fn",
    [
        ("relu", F.relu),
        ("sigmoid", torch.sigmoid),
        ("leakyrelu", lambda t: F.leaky_relu(t, 0.01)),
        ("swish", lambda t: t * torch.sigmoid(t)),
    ],
)
def test_activations(act, fn):
    m = ConvNet(3, 10, depth=1, act=act, norm="none", pool="none", im_size=8)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(m.embed(x), fn(m.features[0](x)).flatten(1))


def test_pooling_variants():
    x = torch.randn(2, 3, 8, 8)
    for pool, fn in (("avgpooling", F.avg_pool2d), ("maxpooling", F.max_pool2d)):
        m = ConvNet(3, 10, depth=1, norm="none", pool=pool, im_size=8)
        torch.testing.assert_close(m.embed(x), fn(F.relu(m.features[0](x)), 2, 2).flatten(1))


# ----------------------------------------------------------------------------------------------
# registry


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_runs(name):
    m = get_model(name, 3, 10, (32, 32), generator=gen(5))
    x = torch.randn(2, 3, 32, 32)
    e = m.embed(x)
    assert e.shape == (2, m.feature_dim) and torch.isfinite(e).all()
    out = m(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_registry_variants():
    c = lambda name, **kw: get_model(name, 3, 10, 32, **kw)
    assert c("ConvNetD1").depth == 1 and c("ConvNetD4").depth == 4 and c("ConvNetW256").width == 256
    assert c("ConvNetASwishBN").act == "swish" and c("ConvNetASwishBN").norm == "batchnorm"
    assert c("ConvNetNP").pool == "none" and c("ConvNetMP").pool == "maxpooling"
    assert isinstance(c("ConvNetLN").features[1], nn.LayerNorm)
    gn = c("ConvNetGN").features[1]
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4
    assert isinstance(c("ResNet18BN").bn1, nn.BatchNorm2d)
    for name in ("ResNet18", "ResNet18IN"):
        assert isinstance(c(name).bn1, nn.GroupNorm) and c(name).bn1.num_groups == 64
    assert c("ConvNet", depth=4).depth == 4  # kwargs override
    mlp = get_model("MLP", 1, 10, 28, hidden=64)
    assert isinstance(mlp, MLP) and mlp.feature_dim == 64 and mlp.fc_1.in_features == 784
    assert mlp(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert isinstance(c("ResNet18"), ResNet18) and c("ResNet18").feature_dim == 512


def test_resnet18_stem_and_sizes():
    m = ResNet18(1, 10, norm="batchnorm", im_size=28)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(l, nn.MaxPool2d) for l in m.modules())
    assert m.embed(torch.randn(2, 1, 28, 28)).shape == (2, 512)
    assert ResNet18(3, 10, im_size=64).embed(torch.randn(1, 3, 64, 64)).shape == (1, 512)


def test_bad_arguments():
    with pytest.raises(ValueError, match="ConvNetD4"):
        get_model("ConvNetXL", 3, 10, 32)
    with pytest.raises(ValueError, match="act"):
        ConvNet(3, 10, act="gelu")
    with pytest.raises(ValueError, match="norm"):
        ConvNet(3, 10, norm="weird")
    with pytest.raises(ValueError, match="depth"):
        ConvNet(3, 10, depth=6, im_size=32)
    with pytest.raises(ValueError, match="im_size"):
        ConvNet(3, 10, im_size=(32, 32, 3))
    with pytest.raises(TypeError, match="channel"):
        ConvNet(3.0, 10)
    m = ConvNet(3, 10)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="x"):
        m.embed(torch.randn(2, 3, 28, 28))
    with pytest.raises(TypeError, match="generator"):
        init_parameters(m, 0)
    with pytest.raises(TypeError, match="PReLU"):
        init_parameters(nn.Sequential(nn.Linear(2, 2), nn.PReLU()), gen(0))


# ----------------------------------------------------------------------------------------------
# seeded initialisation


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_init_reproducible_and_seed_dependent():
    a = _params(get_model("ConvNet", 3, 10, 32, generator=gen(7)))
    b = _params(get_model("ConvNet", 3, 10, 32, generator=gen(7)))
    _assert_same(a, b)
    m = get_model("ConvNet", 3, 10, 32, generator=gen(8))
    c = _params(m)
    assert not torch.equal(a["features.0.weight"], c["features.0.weight"])
    assert not torch.equal(a["classifier.bias"], c["classifier.bias"])
    # in-place re-init of an existing (modified) model reproduces the fresh one
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    init_parameters(m, gen(7))
    _assert_same(_params(m), a)


def test_init_matches_pytorch_default_construction():
    for name in ("ConvNet", "ConvNetBN", "ResNet18BN", "MLP"):
        torch.manual_seed(11)
        ref = get_model(name, 3, 10, 32)  # plain constructors, global RNG
        _assert_same(_params(get_model(name, 3, 10, 32, generator=gen(11))), _params(ref))


def test_init_leaves_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    m = get_model("ConvNetBN", 3, 10, 32, generator=gen(1))
    init_parameters(m, gen(2))
    assert torch.equal(torch.get_rng_state(), state)


def test_init_bounds_and_norm_layers():
    m = get_model("ConvNetBN", 3, 10, 32, generator=gen(3))
    m(torch.randn(4, 3, 32, 32) + 3)  # move the running statistics
    init_parameters(m, gen(3))
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            fan_in = mod.weight[0].numel()
            # kaiming_uniform(a=sqrt(5)): bound = sqrt(3) * sqrt(2 / (1 + 5)) / sqrt(fan_in)
            bound = math.sqrt(3.0) * math.sqrt(2.0 / 6.0) / math.sqrt(fan_in)
            w = mod.weight
            assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
            assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
            assert mod.bias.abs().max() <= 1 / math.sqrt(fan_in)
        elif isinstance(mod, nn.BatchNorm2d):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight))
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias))
            assert torch.equal(mod.running_mean, torch.zeros_like(mod.running_mean))
            assert torch.equal(mod.running_var, torch.ones_like(mod.running_var))
            assert mod.num_batches_tracked.item() == 0


def test_init_independent_of_dtype_and_memory_format():
    ref = _params(get_model("ConvNet", 3, 10, 32, generator=gen(9)))
    m64 = ConvNet(3, 10).double()
    init_parameters(m64, gen(9))
    for k, v in m64.state_dict().items():
        assert v.dtype == torch.float64 and torch.equal(v, ref[k].double()), k
    mcl = ConvNet(3, 10).to(memory_format=torch.channels_last)
    init_parameters(mcl, gen(9))
    assert mcl.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    _assert_same(_params(mcl), ref)


# ----------------------------------------------------------------------------------------------
# vmap over stacked models (the evaluation's several-models-at-once path)


def _stacked_call(models):
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def call(p, b, x):
        return functional_call(base, (p, b), (x,))

    return call, params, buffers


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetNN", "ConvNetBN"])
def test_vmap_forward_equals_separate_forwards(name):
    models = [get_model(name, 3, 10, 16, generator=gen(20 + i)) for i in range(3)]
    refs = copy.deepcopy(models)
    x = torch.randn(3, 4, 3, 16, 16, generator=gen(0))
    call, params, buffers = _stacked_call(models)
    out = torch.vmap(call)(params, buffers, x)
    expected = torch.stack([m(x[i]) for i, m in enumerate(refs)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # one input batch shared by all models
    shared = torch.vmap(call, in_dims=(0, 0, None))(params, buffers, x[0])
    expected = torch.stack([m(x[0]) for m in refs])
    torch.testing.assert_close(shared, expected, rtol=1e-5, atol=1e-5)
    if name == "ConvNetBN":
        # train-mode BatchNorm updated the stacked running statistics per model, as the loop did
        assert buffers and all(v.shape[0] == 3 for v in buffers.values())
        for key, val in buffers.items():
            want = torch.stack([dict(r.named_buffers())[key] for r in refs])
            torch.testing.assert_close(val, want, rtol=1e-5, atol=1e-6)
        assert buffers["features.1.num_batches_tracked"].tolist() == [2, 2, 2]
        # eval mode uses each model's (now non-trivial) running statistics
        for m in refs:
            m.eval()
        call, params, buffers = _stacked_call(refs)
        out = torch.vmap(call)(params, buffers, x)
        expected = torch.stack([m(x[i]) for i, m in enumerate(refs)])
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_vmap_batchnorm_running_stats_match_separate_models():
    models = [get_model("ConvNetBN", 3, 10, 16, generator=gen(30 + i)) for i in range(3)]
    refs = copy.deepcopy(models)
    x = torch.randn(3, 4, 3, 16, 16, generator=gen(1))
    call, params, buffers = _stacked_call(models)
    torch.vmap(call)(params, buffers, x)
    for i, r in enumerate(refs):
        r(x[i])
        for key, val in r.named_buffers():
            torch.testing.assert_close(buffers[key][i], val, rtol=1e-5, atol=1e-6)
    # unbatched BatchNorm buffers cannot take a per-model in-place update
    with pytest.raises(RuntimeError, match="running_mean"):
        torch.vmap(call, in_dims=(0, None, 0))(params, dict(models[0].named_buffers()), x)


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetBN"])
def test_vmap_grad_equals_separate_gradients(name):
    models = [get_model(name, 3, 10, 16, generator=gen(40 + i), width=32) for i in range(3)]
    x = torch.randn(3, 4, 3, 16, 16, generator=gen(2))
    y = torch.randint(0, 10, (3, 4), generator=gen(3))
    expected = []
    for i, m in enumerate(copy.deepcopy(models)):
        F.cross_entropy(m(x[i]), y[i]).backward()
        expected.append({k: p.grad for k, p in m.named_parameters()})
    call, params, buffers = _stacked_call(models)
    grads = torch.vmap(grad(lambda p, b, xi, yi: F.cross_entropy(call(p, b, xi), yi)))(params, buffers, x, y)
    for k, g in grads.items():
        torch.testing.assert_close(g, torch.stack([e[k] for e in expected]), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# property: feature_dim bookkeeping agrees with the real forward


@settings(max_examples=15, deadline=None)
@given(
    channel=st.sampled_from([1, 3]),
    h=st.integers(4, 20),
    w=st.integers(4, 20),
    depth=st.integers(1, 3),
    norm=st.sampled_from(["instancenorm", "layernorm", "none", "batchnorm"]),
    pool=st.sampled_from(["avgpooling", "maxpooling", "none"]),
)
def test_feature_dim_bookkeeping(channel, h, w, depth, norm, pool):
    if pool != "none" and min(h, w) < 2**depth:
        with pytest.raises(ValueError):
            ConvNet(channel, 5, width=8, depth=depth, norm=norm, pool=pool, im_size=(h, w))
        return
    m = ConvNet(channel, 5, width=8, depth=depth, norm=norm, pool=pool, im_size=(h, w))
    x = torch.randn(2, channel, h, w)
    assert m.embed(x).shape == (2, m.feature_dim)
    assert m(x).shape == (2, 5)


@pytest.mark.parametrize("depth,pool", [(3, "avgpooling"), (2, "maxpooling"), (2, "none")])
def test_embed_with_taps_matches_embed_and_tap_shapes(depth, pool):
    from fastdd.models import embed_with_taps

    g = torch.Generator().manual_seed(0)
    net = ConvNet(1, 10, width=8, depth=depth, pool=pool, im_size=(28, 28))
    x = torch.randn(3, 1, 28, 28, generator=g)
    emb, taps = embed_with_taps(net, x)
    assert torch.equal(emb, net.embed(x))
    assert len(taps) == depth
    size = 32  # 28x28 single-channel inputs are padded to 32x32 by the first conv
    for tap in taps:
        assert tap.shape == (3, 8, size, size)
        assert bool((tap >= 0).all())  # post-ReLU, as the DDM reference matches
        if pool != "none":
            size //= 2
    # the first tap is exactly block 0's activation output
    manual = net.features[2](net.features[1](net.features[0](x)))
    assert torch.equal(taps[0], manual)


def test_embed_with_taps_rejects_models_without_taps():
    from fastdd.models import MLP, embed_with_taps

    with pytest.raises(ValueError, match="model: MLP exposes no feature taps"):
        embed_with_taps(MLP(1, 10, im_size=(28, 28)), torch.zeros(1, 1, 28, 28))
