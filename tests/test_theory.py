"""Tests of fastdd.theory (the multi-index distillation study)."""
import pytest
import torch

from fastdd.theory import (
    StudyConfig,
    get_variant,
    init_network,
    make_setting,
    make_task,
    network_output,
    stage1,
    stage1_direction,
    threshold,
)

CFG = StudyConfig(n_test=4000, n2=2000, gm_steps=1000, gm_restarts=2)


def test_stage1_autograd_equals_closed_form():
    gen = torch.Generator().manual_seed(0)
    task = make_task(8, 2, gen)
    net = init_network(8, 16, gen)
    X, y = task.sample(200, gen)
    W = net.W0.clone().requires_grad_(True)
    assert torch.allclose(network_output(net, W, X), torch.zeros(200, dtype=X.dtype), atol=1e-12)  # f == 0 at init
    loss = 0.5 * ((network_output(net, W, X) - y) ** 2).mean()
    (g,) = torch.autograd.grad(loss, W)
    assert torch.allclose(-g, stage1_direction(net, X, y), atol=1e-12, rtol=1e-10)


def test_full_data_improves_with_n1_towards_its_floor():
    cfgs = [StudyConfig(n1_factor=f, n_test=4000, n2=2000) for f in (0.25, 1.0, 16.0)]
    nm = [make_setting(16, 2, 0, c).nmse_ref for c in cfgs]
    assert nm[2] < nm[1] < nm[0] and nm[2] < 0.5 * nm[0]
    assert nm[2] < 0.02
    # the floor: stage 1 on max(1e5, 40 d^2) samples (variant B's good stage 1, same stage 2)
    s = make_setting(16, 2, 0, cfgs[2])
    floor = s.test_nmse(s.good_reference())
    assert floor < 0.003 and nm[2] < 5 * floor  # n1 = 16 d^2 is within a small factor of the floor


def test_variant_a_encodes_subspace_and_beats_random():
    s = make_setting(16, 2, 0, CFG)
    o = get_variant("A").run(s, 3, torch.Generator().manual_seed(1))
    assert o.energy >= 0.9
    assert min(o.cosines) >= 0.9
    assert o.nmse_random >= 0.5
    # Issue 13's acceptance 1 asks NMSE <= 2x the full-data NMSE at m <= 4; it is NOT met (measured 4.1x here,
    # 3.9-7.4x over seeds 0-4 at m = 4). The limit is the sampling noise of the matched G(D), not the optimiser:
    # see the next test and the README's theory section. This asserts what is reliably reached.
    assert o.nmse <= 5 * s.nmse_ref and o.nmse <= threshold(s.nmse_ref) + 0.01


def test_variant_a_limit_is_the_sampling_noise_of_the_matched_gradient():
    # Same algorithm, but matching the stage-1 direction of max(1e5, 40 d^2) fresh points (a population proxy)
    # instead of G(D) on the n1 = 16 d^2 stage-1 points: the distilled inputs then span the task subspace to
    # cosine >= 0.999 and the 2x bar is met with room (0.58x). A diagnostic, not a distillation of the reference.
    with pytest.raises(ValueError, match="gm_target"):
        StudyConfig(gm_target="test")
    s = make_setting(16, 2, 0, StudyConfig(n_test=4000, n2=2000, gm_steps=1000, gm_restarts=2, gm_target="population"))
    o = get_variant("A").run(s, 3, torch.Generator().manual_seed(1))
    assert o.nmse <= 2 * s.nmse_ref
    assert o.energy >= 0.9 and min(o.cosines) >= 0.99
    assert o.nmse_random >= 0.5


def test_variant_d_reproduces_reference():
    s = make_setting(16, 2, 0, CFG)
    o = get_variant("D").run(s, 0, torch.Generator().manual_seed(0))
    assert abs(o.nmse - s.nmse_ref) <= 1e-6 * s.nmse_ref
    assert o.memory == CFG.width


def test_reproducible_from_seed():
    cfg = StudyConfig(n_test=1000, n2=1000, gm_steps=50, gm_restarts=1)
    a = [get_variant("A").run(make_setting(16, 1, 3, cfg), 2, torch.Generator().manual_seed(5)).nmse for _ in range(2)]
    assert a[0] == a[1]


def test_good_reference_uses_40_d2_samples_in_chunks():
    # spec §6.4: variant B's stage 1 needs n1 >= 40 d^2 (1e5 samples give rho ~ 0.65 at d = 64)
    cfg = StudyConfig(n1_good=1000, n_test=500, n2=500, width=32)
    s = make_setting(8, 2, 0, cfg)
    assert s.n1_good == 40 * 8 * 8
    good = s.good_reference(chunk=700)  # 2560 samples in chunks of 700, 700, 700, 460
    gen = torch.Generator().manual_seed(10_000 + s.seed)
    parts = [s.task.sample(k, gen) for k in (700, 700, 700, 460)]
    X = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    assert torch.allclose(good.W1, stage1(s.net, X, y), atol=1e-12)
    assert make_setting(8, 2, 0, StudyConfig(n1_good=5000, width=32)).n1_good == 5000


def test_variant_a_sizes_batched_equals_separate_runs():
    # all sizes optimised together (padded, masked) follow each set's own trajectory
    from fastdd.theory.variants import _batched_init, run_gm_sizes

    cfg = StudyConfig(n_test=1000, n2=1000, gm_steps=60, gm_restarts=2)
    s = make_setting(16, 2, 0, cfg)
    both = run_gm_sizes(s, [2, 3], torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    _batched_init(s, 2, cfg.gm_restarts, g)  # the size-2 draws come first in the batched run
    alone = run_gm_sizes(s, [3], g)[0]
    assert [o.m for o in both] == [2, 3] and both[1].X.shape == (3, 16)
    torch.testing.assert_close(both[1].X, alone.X, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(both[1].y, alone.y, rtol=1e-9, atol=1e-11)
    assert abs(both[1].nmse - alone.nmse) <= 1e-9
