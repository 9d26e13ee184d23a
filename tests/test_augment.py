"""Tests for fastdd.augment (DSA): identity, siamese semantics, per-op formulas, ranges, determinism,
gradients, op-group sharing and argument checks. All small CPU tensors."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdd.augment import (
    DSA,
    FULL_STRATEGY,
    NO_FLIP_STRATEGY,
    OPS,
    AugDraw,
    DSAParams,
    cutout_size,
    dsa_strategy_for,
)

SIZES = [(28, 28), (32, 32), (7, 9)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n, c, h, w, seed=0, dtype=torch.float32):
    return torch.randn(n, c, h, w, generator=gen(seed), dtype=dtype)


def fixed_draw(g=1, **kw):
    """Identity draw of g groups with some fields overwritten (scalars broadcast to all groups)."""
    d = AugDraw.identity(g, "cpu")
    for k, v in kw.items():
        old = getattr(d, k)
        setattr(d, k, torch.as_tensor(v, dtype=old.dtype).expand(g).clone())
    return d


# ---------------------------------------------------------------------------------------------------
# identity
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["S", "M"])
def test_identity_draw_is_identity(size, channels, mode):
    x = images(4, channels, *size)
    for strategy in list(OPS) + [FULL_STRATEGY]:
        dsa = DSA(strategy, mode=mode)
        k = len(dsa.ops)
        d = AugDraw.identity(4, "cpu")
        d.op = torch.arange(4) % k  # whichever op is chosen, identity parameters leave x unchanged
        out = dsa.apply(x, d, torch.tensor([0, 1, 2, 3]))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.equal(out, x), (strategy, mode)


def test_none_strategy_is_identity():
    for s in ["none", "", "None"]:
        dsa = DSA(s)
        assert dsa.ops == () and not dsa.enabled
        x = images(3, 3, 8, 8)
        assert torch.equal(dsa.per_sample(x, gen()), x)


def test_ops_tuple():
    assert DSA().ops == ("color", "crop", "cutout", "flip", "scale", "rotate")
    assert DSA(NO_FLIP_STRATEGY).ops == ("color", "crop", "cutout", "scale", "rotate")


# ---------------------------------------------------------------------------------------------------
# siamese
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["S", "M"])
def test_siamese_same_transform_for_real_and_syn(mode):
    dsa = DSA(mode=mode)
    G = 8
    base = images(G, 3, 16, 16, seed=1)
    real_group = torch.tensor([0, 3, 1, 7, 2, 5, 4, 6, 3, 0])
    real = base[real_group]  # real sample i is the image of its group
    syn_group = torch.arange(G).flip(0)
    syn = base[syn_group]
    for seed in range(5):
        ra, sa = dsa.siamese(real, real_group, syn, syn_group, G, gen(seed))
        pos = {int(g): i for i, g in enumerate(syn_group)}
        for i, g in enumerate(real_group.tolist()):
            assert torch.equal(ra[i], sa[pos[g]])


def test_siamese_different_groups_differ():
    dsa = DSA()
    G = 12
    x = images(1, 3, 16, 16).expand(G, -1, -1, -1).contiguous()  # same image in every group
    ra, sa = dsa.siamese(x, torch.arange(G), x[:2], torch.tensor([0, 1]), G, gen(3))
    distinct = {tuple(r.flatten().tolist()) for r in ra}
    # independent op and parameters per group; only "flip op, no flip" (p = 1/12) maps to the input
    assert len(distinct) >= G - 2


def test_siamese_equals_one_draw_two_applies():
    dsa = DSA()
    real, syn = images(6, 3, 12, 12, seed=2), images(3, 3, 12, 12, seed=3)
    rg, sg = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 2])
    ra, sa = dsa.siamese(real, rg, syn, sg, 3, gen(7))
    d = dsa.draw(3, gen(7), (12, 12))
    assert torch.equal(ra, dsa.apply(real, d, rg)) and torch.equal(sa, dsa.apply(syn, d, sg))


# ---------------------------------------------------------------------------------------------------
# each op against a plain formulation
# ---------------------------------------------------------------------------------------------------


def test_crop_matches_manual_shift():
    x = images(2, 2, 5, 6)
    dsa = DSA("crop")
    d = fixed_draw(2)
    d.shift_x = torch.tensor([1, -3])
    d.shift_y = torch.tensor([-2, 0])
    out = dsa.apply(x, d, torch.tensor([0, 1]))
    ref = torch.zeros_like(x)
    for n in range(2):
        tx, ty = int(d.shift_x[n]), int(d.shift_y[n])
        for i in range(5):
            for j in range(6):
                if 0 <= i + ty < 5 and 0 <= j + tx < 6:
                    ref[n, :, i, j] = x[n, :, i + ty, j + tx]
    assert torch.equal(out, ref)


@pytest.mark.parametrize("h,w", [(6, 6), (7, 5)])
def test_cutout_matches_clamped_reference(h, w):
    # Reference formulation: indices cy - s//2 + a (a < s) clamped into the image, those pixels zeroed.
    sy, sx = cutout_size((h, w))
    dsa = DSA("cutout")
    x = images(1, 2, h, w) + 5.0  # no accidental zeros
    for cy in range(h + 1 - sy % 2):
        for cx in range(w + 1 - sx % 2):
            d = fixed_draw(1, cutout_x=cx, cutout_y=cy)
            out = dsa.apply(x, d, torch.tensor([0]))
            ref = x.clone()
            for a in range(sy):
                for b in range(sx):
                    i = min(max(cy - sy // 2 + a, 0), h - 1)
                    j = min(max(cx - sx // 2 + b, 0), w - 1)
                    ref[0, :, i, j] = 0
            assert torch.equal(out, ref), (cy, cx)


@pytest.mark.parametrize("size,side", [((32, 32), 16), ((28, 28), 14)])
def test_cutout_inside_zeroes_side_squared_pixels(size, side):
    x = torch.ones(1, 3, *size)
    d = fixed_draw(1, cutout_x=size[1] // 2, cutout_y=size[0] // 2)
    out = DSA("cutout").apply(x, d, torch.tensor([0]))
    assert int((out[0, 0] == 0).sum()) == side * side
    assert torch.equal(out[0, 0], out[0, 2])


def test_flip():
    x = images(3, 3, 4, 5)
    d = fixed_draw(3)
    d.flip = torch.tensor([True, False, True])
    out = DSA("flip").apply(x, d, torch.tensor([0, 1, 2]))
    assert torch.equal(out[0], x[0, :, :, torch.arange(4, -1, -1)])
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[2], x[2].flip(-1))


@pytest.mark.parametrize("channels", [1, 3])
def test_color_formulas(channels):
    x = images(2, channels, 4, 5, dtype=torch.float64)
    b, s, c = torch.tensor([0.3, -0.2]), torch.tensor([1.7, 0.4]), torch.tensor([0.6, 1.4])
    d = fixed_draw(2)
    d.brightness, d.saturation, d.contrast = b, s, c
    out = DSA("color").apply(x, d, torch.tensor([0, 1]))
    for n in range(2):
        y = x[n] + float(b[n])
        if channels > 1:
            m = y.mean(dim=0, keepdim=True)
            y = (y - m) * float(s[n]) + m
        m = y.mean()
        y = (y - m) * float(c[n]) + m
        torch.testing.assert_close(out[n], y, rtol=1e-12, atol=1e-12)


def test_saturation_noop_for_one_channel():
    x = images(1, 1, 5, 5)
    d = fixed_draw(1, saturation=0.0)  # would collapse colour; gray images have none
    assert torch.equal(DSA("color").apply(x, d, torch.tensor([0])), x)


def _bilinear_affine_numpy(img, theta):
    """Plain grid_sample(affine_grid(theta), bilinear, zeros, align_corners=False) for one [C,H,W] image."""
    c, h, w = img.shape
    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            xn, yn = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
            xs = theta[0][0] * xn + theta[0][1] * yn + theta[0][2]
            ys = theta[1][0] * xn + theta[1][1] * yn + theta[1][2]
            px, py = ((xs + 1) * w - 1) / 2, ((ys + 1) * h - 1) / 2
            x0, y0 = math.floor(px), math.floor(py)
            for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[:, i, j] += wy * wx * img[:, yy, xx]
    return out


def test_scale_matches_plain_bilinear():
    x = images(2, 2, 6, 7, dtype=torch.float64)
    d = fixed_draw(2)
    d.scale_x, d.scale_y = torch.tensor([0.9, 1.15]), torch.tensor([1.1, 0.85])
    out = DSA("scale").apply(x, d, torch.tensor([0, 1]))
    for n in range(2):
        theta = [[float(d.scale_x[n]), 0, 0], [0, float(d.scale_y[n]), 0]]
        ref = _bilinear_affine_numpy(x[n].numpy(), theta)
        np.testing.assert_allclose(out[n].numpy(), ref, rtol=1e-6, atol=1e-6)


def test_rotate_matches_plain_bilinear():
    x = images(2, 2, 6, 7, dtype=torch.float64)
    d = fixed_draw(2)
    d.angle = torch.tensor([12.0, -7.5])
    out = DSA("rotate").apply(x, d, torch.tensor([0, 1]))
    for n in range(2):
        a = math.radians(float(d.angle[n]))
        theta = [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]]
        ref = _bilinear_affine_numpy(x[n].numpy(), theta)
        np.testing.assert_allclose(out[n].numpy(), ref, rtol=1e-6, atol=1e-6)


def test_rotate_then_inverse_recovers_centre():
    h = w = 32
    ii, jj = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    smooth = torch.sin(ii / 5.0) + torch.cos(jj / 7.0) + 0.02 * ii * jj / 32
    x = smooth.expand(1, 2, h, w).contiguous()
    dsa = DSA("rotate")
    y = dsa.apply(x, fixed_draw(1, angle=13.0), torch.tensor([0]))
    assert (y - x).abs()[..., 8:24, 8:24].max() > 0.1  # the rotation did something
    z = dsa.apply(y, fixed_draw(1, angle=-13.0), torch.tensor([0]))
    assert (z - x).abs()[..., 8:24, 8:24].max() < 0.05


def test_mode_s_equals_single_op_strategy():
    """In mode S, a group whose op is k gets exactly what the single-op strategy ops[k] gives it."""
    dsa = DSA()
    G = 12
    d = dsa.draw(G, gen(11), (9, 10))
    d.op = torch.arange(G) % 6
    x = images(G, 3, 9, 10, seed=4)
    grp = torch.arange(G)
    out = dsa.apply(x, d, grp)
    for k, name in enumerate(dsa.ops):
        rows = (d.op == k).nonzero().flatten()
        dk = d.index(rows)
        dk.op = torch.zeros_like(dk.op)
        single = DSA(name).apply(x[rows], dk, torch.arange(len(rows)))
        assert torch.equal(out[rows], single), name


def test_mode_m_applies_all_ops_in_order():
    dsa = DSA(mode="M")
    d = dsa.draw(3, gen(5), (10, 10))
    x = images(3, 3, 10, 10, seed=5)
    grp = torch.tensor([2, 0, 1])
    ref = x
    for name in dsa.ops:
        ref = DSA(name, mode="M").apply(ref, d, grp)
    assert torch.equal(dsa.apply(x, d, grp), ref)


# ---------------------------------------------------------------------------------------------------
# parameter ranges
# ---------------------------------------------------------------------------------------------------


def test_parameter_ranges():
    dsa = DSA()
    n = 4000
    d = dsa.draw(n, gen(0), (32, 32))
    assert d.num_groups == n
    assert set(d.op.tolist()) == set(range(6))
    assert set(d.shift_x.tolist()) == set(range(-4, 5)) and set(d.shift_y.tolist()) == set(range(-4, 5))
    # side 16 (even): centres in [0, 33)
    assert set(d.cutout_x.tolist()) == set(range(33)) and set(d.cutout_y.tolist()) == set(range(33))
    for t in (d.scale_x, d.scale_y):
        assert t.min() >= 1 / 1.2 - 1e-7 and t.max() < 1.2 and t.min() < 0.85 and t.max() > 1.18
    assert d.angle.min() >= -15 and d.angle.max() < 15 and d.angle.min() < -14.5 and d.angle.max() > 14.5
    assert d.brightness.min() >= -0.5 and d.brightness.max() < 0.5
    assert d.saturation.min() >= 0 and d.saturation.max() < 2
    assert d.contrast.min() >= 0.5 and d.contrast.max() < 1.5
    assert 0.45 < d.flip.float().mean() < 0.55
    assert 0.45 < (d.scale_x < 1).float().mean() < 0.55  # not a check of uniformity, just symmetry-ish
    d28 = dsa.draw(n, gen(1), (28, 28))
    assert set(d28.shift_x.tolist()) == set(range(-4, 5))
    assert set(d28.cutout_y.tolist()) == set(range(29))  # side 14 (even): [0, 29)
    dr = dsa.draw(n, gen(2), (28, 64))  # non-square: per-axis ranges
    assert set(dr.shift_y.tolist()) == set(range(-4, 5)) and set(dr.shift_x.tolist()) == set(range(-8, 9))
    assert set(dr.cutout_x.tolist()) == set(range(65))


def test_sizes():
    assert cutout_size((32, 32)) == (16, 16) and cutout_size((28, 28)) == (14, 14)
    assert cutout_size((64, 64)) == (32, 32) and cutout_size((7, 9)) == (4, 5)
    odd = DSA().draw(2000, gen(0), (7, 9))  # sides 4 (even) and 5 (odd)
    assert set(odd.cutout_y.tolist()) == set(range(8)) and set(odd.cutout_x.tolist()) == set(range(9))


def test_custom_params():
    p = DSAParams(prob_flip=0.0, ratio_scale=1.0, ratio_rotate=0.0, ratio_crop_pad=0.0, brightness=0.0,
                  saturation=0.0, contrast=1.0)
    d = DSA(params=p).draw(200, gen(0), (32, 32))
    assert not d.flip.any() and (d.scale_x == 1).all() and (d.angle == 0).all()
    assert (d.shift_x == 0).all() and (d.brightness == 0).all() and (d.saturation == 0).all()
    assert (d.contrast >= 1).all()


# ---------------------------------------------------------------------------------------------------
# determinism and RNG hygiene
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["S", "M"])
def test_determinism_and_global_rng_untouched(mode):
    dsa = DSA(mode=mode)
    x = images(8, 3, 12, 12)
    state = torch.get_rng_state()
    a = dsa.per_sample(x, gen(42))
    b = dsa.per_sample(x, gen(42))
    ra, sa = dsa.siamese(x, torch.arange(8) % 4, x[:4], torch.arange(4), 4, gen(9))
    rb, sb = dsa.siamese(x, torch.arange(8) % 4, x[:4], torch.arange(4), 4, gen(9))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and torch.equal(ra, rb) and torch.equal(sa, sb)
    assert not torch.equal(dsa.per_sample(x, gen(43)), a)


def test_generator_advances():
    dsa = DSA()
    g = gen(0)
    d1, d2 = dsa.draw(5, g, (8, 8)), dsa.draw(5, g, (8, 8))
    assert not torch.equal(d1.angle, d2.angle)


# ---------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------

_GRAD_DRAWS = {
    "color": dict(brightness=0.2, saturation=1.3, contrast=0.7),
    "crop": dict(shift_x=1, shift_y=-1),
    "cutout": dict(cutout_x=2, cutout_y=1),
    "flip": dict(flip=True),
    "scale": dict(scale_x=0.9, scale_y=1.1),
    "rotate": dict(angle=9.0),
}


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_each_op(op):
    x = images(2, 2, 4, 5, dtype=torch.float64).requires_grad_(True)
    d = fixed_draw(2, **_GRAD_DRAWS[op])
    dsa = DSA(op)
    grp = torch.tensor([1, 0])
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, d, grp), (x,), eps=1e-6, atol=1e-6)


def test_gradients_flow_through_siamese_and_full_mode_m():
    for mode in ("S", "M"):
        syn = images(4, 3, 8, 8, dtype=torch.float64).requires_grad_(True)
        real = images(6, 3, 8, 8, seed=1, dtype=torch.float64)
        _, sa = DSA(mode=mode).siamese(real, torch.arange(6) % 2, syn, torch.tensor([0, 0, 1, 1]), 2, gen(1))
        sa.square().sum().backward()
        assert syn.grad is not None and torch.isfinite(syn.grad).all() and syn.grad.abs().sum() > 0
    x = images(1, 2, 4, 4, dtype=torch.float64).requires_grad_(True)
    dsa = DSA(mode="M")
    d = dsa.draw(1, gen(4), (4, 4))
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, d, torch.tensor([0])), (x,), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# per_sample and op groups
# ---------------------------------------------------------------------------------------------------


def test_per_sample_default_shares_one_op():
    dsa = DSA()
    x = images(10, 3, 8, 8)
    for seed in range(4):
        d = dsa.draw(10, gen(seed), (8, 8), op_groups=torch.zeros(10, dtype=torch.long))
        assert len(set(d.op.tolist())) == 1
        assert torch.equal(dsa.per_sample(x, gen(seed)), dsa.apply(x, d, torch.arange(10)))
        # ... but the parameters are independent per sample
        assert len(set(d.angle.tolist())) == 10


def test_per_sample_op_groups():
    dsa = DSA()
    N = 12
    op_groups = torch.arange(N) // 3  # 4 "models" of 3 samples
    x = images(N, 3, 8, 8)
    seen_distinct = False
    for seed in range(6):
        d = dsa.draw(N, gen(seed), (8, 8), op_groups=op_groups)
        ops = d.op.view(4, 3)
        assert (ops == ops[:, :1]).all()  # same op within an op group
        seen_distinct |= len(set(ops[:, 0].tolist())) > 1
        assert torch.equal(dsa.per_sample(x, gen(seed), op_groups), dsa.apply(x, d, torch.arange(N)))
    assert seen_distinct  # different op groups choose independently


def test_draw_default_op_per_group():
    d = DSA().draw(300, gen(0), (8, 8))
    assert set(d.op.tolist()) == set(range(6))


def test_augdraw_to_and_index():
    d = DSA().draw(4, gen(0), (8, 8))
    assert d.to("cpu") is d
    e = d.index(torch.tensor([2, 2]))
    assert e.num_groups == 2 and torch.equal(e.angle, d.angle[[2, 2]])


# ---------------------------------------------------------------------------------------------------
# hypothesis: random shapes / strategies
# ---------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
    ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=6, unique=True),
    mode=st.sampled_from(["S", "M"]), seed=st.integers(0, 2**31 - 1),
)
def test_property_identity_and_siamese(n, c, h, w, ops, mode, seed):
    dsa = DSA("_".join(ops), mode=mode)
    x = images(n, c, h, w, seed=seed % 1000)
    grp = torch.arange(n) % 2
    assert torch.equal(dsa.apply(x, AugDraw.identity(2, "cpu"), grp), x)
    ra, sa = dsa.siamese(x, grp, x, grp, 2, gen(seed))
    assert torch.equal(ra, sa) and ra.shape == x.shape and torch.isfinite(ra).all()


# ---------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------


def test_bad_inputs():
    dsa = DSA()
    x = images(3, 3, 8, 8)
    d = dsa.draw(2, gen(), (8, 8))
    grp = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="^x:"):
        dsa.apply(x[0], d, grp)
    with pytest.raises(TypeError, match="^x:"):
        dsa.apply(x.long(), d, grp)
    with pytest.raises(ValueError, match="^group:"):
        dsa.apply(x, d, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="^group:"):
        dsa.apply(x, d, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="^group:"):
        dsa.apply(x, d, torch.tensor([0, -1, 1]))
    with pytest.raises(TypeError, match="^group:"):
        dsa.apply(x, d, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="^draw:"):
        dsa.apply(x, "nope", grp)
    bad = dsa.draw(2, gen(), (8, 8))
    bad.angle = bad.angle[:1]
    with pytest.raises(ValueError, match="^draw.angle:"):
        dsa.apply(x, bad, grp)
    bad = dsa.draw(2, gen(), (8, 8))
    bad.op = torch.tensor([0, 6])
    with pytest.raises(ValueError, match="^draw.op:"):
        dsa.apply(x, bad, grp)
    with pytest.raises(ValueError, match="^strategy:"):
        DSA("color_blur")
    with pytest.raises(ValueError, match="^strategy:"):
        DSA("crop_crop")
    with pytest.raises(ValueError, match="^mode:"):
        DSA(mode="X")
    with pytest.raises(TypeError, match="^params:"):
        DSA(params={"prob_flip": 0.5})
    with pytest.raises(ValueError, match="^prob_flip:"):
        DSAParams(prob_flip=1.5)
    with pytest.raises(ValueError, match="^ratio_scale:"):
        DSAParams(ratio_scale=0.5)
    with pytest.raises(TypeError, match="^generator:"):
        dsa.draw(2, 0, (8, 8))
    with pytest.raises(ValueError, match="^image_size:"):
        dsa.draw(2, gen(), (8, 0))
    with pytest.raises(ValueError, match="^op_groups:"):
        dsa.draw(2, gen(), (8, 8), op_groups=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="^op_groups:"):
        dsa.per_sample(x, gen(), op_groups=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="^syn:"):
        dsa.siamese(x, grp, images(2, 3, 8, 9), torch.tensor([0, 1]), 2, gen())
    with pytest.raises(ValueError, match="^syn_group:"):
        dsa.siamese(x, grp, x, torch.tensor([0, 1]), 2, gen())
    with pytest.raises(ValueError, match="^num_groups:"):
        dsa.siamese(x, grp, x, grp, 0, gen())


def test_dsa_strategy_for():
    assert dsa_strategy_for("mnist") == "color_crop_cutout_scale_rotate"
    assert dsa_strategy_for("SVHN") == "color_crop_cutout_scale_rotate"
    assert dsa_strategy_for("digits") == "color_crop_cutout_scale_rotate"
    for name in ("fashion_mnist", "FashionMNIST", "cifar10", "cifar100", "tinyimagenet"):
        assert dsa_strategy_for(name) == "color_crop_cutout_flip_scale_rotate"


# ---------------------------------------------------------------------------------------------------
# mode 'S' computes each op only on the rows that chose it
# ---------------------------------------------------------------------------------------------------


def _dense_mode_s(dsa, x, d, grp):
    """The dense mode-'S' formulation: every op on every row, identity parameters where not chosen.

    Mode 'M' applies the ops in strategy order; with the effective parameters only the chosen op of a row
    is not the identity (and scale / rotate each with the other factor at its identity give the same
    theta as one fused resampling).
    """
    return DSA("_".join(dsa.ops), params=dsa.params, mode="M").apply(x, dsa._effective(d), grp)


@pytest.mark.parametrize("strategy", [FULL_STRATEGY, NO_FLIP_STRATEGY, "scale_rotate", "flip_color"])
@pytest.mark.parametrize("shape", [(40, 3, 9, 10), (30, 1, 8, 8)])
def test_mode_s_rowwise_equals_single_op(strategy, shape):
    """Each row of a mode-'S' apply equals the single-op DSA of that row's op applied to that row alone."""
    dsa = DSA(strategy)
    G = 9
    x = images(*shape, seed=6)
    grp = torch.randint(0, G, (shape[0],), generator=gen(2))  # unsorted, several rows per group
    d = dsa.draw(G, gen(13), shape[-2:])
    d.op = torch.arange(G) % len(dsa.ops)  # every op present
    out = dsa.apply(x, d, grp)
    assert out.shape == x.shape and out.dtype == x.dtype
    for i in range(shape[0]):
        di = d.index(grp[i:i + 1])
        name = dsa.ops[int(di.op)]
        di.op = torch.zeros_like(di.op)
        assert torch.equal(out[i:i + 1], DSA(name).apply(x[i:i + 1], di, torch.tensor([0]))), (i, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_mode_s_equals_dense_formulation(dtype, seed):
    dsa = DSA()
    G, n = 7, 50
    x = images(n, 3, 12, 11, seed=seed, dtype=dtype)
    grp = torch.randint(0, G, (n,), generator=gen(seed + 50))
    d = dsa.draw(G, gen(seed), (12, 11))
    assert torch.equal(dsa.apply(x, d, grp), _dense_mode_s(dsa, x, d, grp))
    # per_sample (one op for the call, then several op groups) takes the same path
    for og in (None, torch.arange(n) % 5):
        dp_groups = torch.zeros(n, dtype=torch.long) if og is None else og
        dp = dsa.draw(n, gen(seed), (12, 11), op_groups=dp_groups)
        ref = _dense_mode_s(dsa, x, dp, torch.arange(n))
        assert torch.equal(dsa.per_sample(x, gen(seed), og), ref)


def test_mode_s_gradients_mixed_ops():
    dsa = DSA()
    d = dsa.draw(6, gen(3), (5, 6))
    d.op = torch.tensor([0, 1, 2, 3, 4, 5])
    d.flip[:] = True
    grp = torch.tensor([5, 0, 3, 1, 1, 4, 2, 5, 0])
    x = images(9, 2, 5, 6, dtype=torch.float64).requires_grad_(True)
    f = lambda t: dsa.apply(t, d, grp)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x,), eps=1e-6, atol=1e-6, fast_mode=True)
    w = images(9, 2, 5, 6, seed=1, dtype=torch.float64)
    (g_new,) = torch.autograd.grad((f(x) * w).sum(), x)
    (g_ref,) = torch.autograd.grad((_dense_mode_s(dsa, x, d, grp) * w).sum(), x)
    assert torch.equal(g_new, g_ref)


def test_mode_s_single_op_batch_and_empty_batch():
    dsa = DSA()
    x = images(6, 3, 8, 8)
    for k in range(len(dsa.ops)):
        d = dsa.draw(3, gen(k), (8, 8))
        d.op = torch.full((3,), k)
        grp = torch.tensor([2, 0, 1, 1, 0, 2])
        assert torch.equal(dsa.apply(x, d, grp), _dense_mode_s(dsa, x, d, grp)), dsa.ops[k]
    e = dsa.apply(x[:0], dsa.draw(3, gen(), (8, 8)), torch.zeros(0, dtype=torch.long))
    assert e.shape == (0, 3, 8, 8) and e.dtype == x.dtype


def test_mode_s_dense_path_under_compile_matches(monkeypatch):
    """Under torch.compile mode 'S' falls back to the dense formulation (no data-dependent shapes)."""
    dsa = DSA()
    x = images(20, 3, 8, 8)
    grp = torch.arange(20) % 6
    d = dsa.draw(6, gen(8), (8, 8))
    eager = dsa.apply(x, d, grp)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(DSA, "_apply_chosen", None)  # the sorted path must not be taken
    assert torch.equal(dsa.apply(x, d, grp), eager)
