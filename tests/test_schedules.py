"""Schedules against SPEC.md §2.1 (P2 Algorithm 1, Eq. 1) and Zhu & Gupta's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsrnn.schedules import (
    CubicSparsity,
    GradualThreshold,
    percentile_abs,
    percentile_block_scores,
)


def algorithm_1(start, ramp, end, theta, phi, freq, steps):
    """P2 Algorithm 1 written as its loop: ε at each iteration."""
    eps, out = 0.0, []
    for itr in range(steps):
        if start < itr < end and itr % freq == 0:
            if itr < ramp:
                eps = theta * (itr - start + 1) / freq
            else:
                eps = (theta * (ramp - start + 1) + phi * (itr - ramp + 1)) / freq
        out.append(eps)
    return np.array(out)


def test_algorithm_1_hand_computed():
    s = GradualThreshold(start_itr=10, ramp_itr=20, end_itr=40, start_slope=0.5, ramp_slope=1.0,
                         freq=5)
    eps = lambda itr: float(s.threshold(itr))  # noqa: E731
    assert eps(0) == 0.0 and eps(10) == 0.0 and eps(14) == 0.0  # before the first update
    assert eps(15) == pytest.approx(0.5 * 6 / 5)  # first update: θ·(15−10+1)/freq = 0.6
    assert eps(19) == pytest.approx(0.6)  # held between updates
    assert eps(20) == pytest.approx((0.5 * 11 + 1.0 * 1) / 5)  # ramp: 1.3
    assert eps(35) == pytest.approx((0.5 * 11 + 1.0 * 16) / 5)  # last update before end: 4.3
    assert eps(40) == pytest.approx(4.3) and eps(10_000) == pytest.approx(4.3)  # frozen
    updates = [i for i in range(60) if bool(s.is_update_step(i))]
    assert updates == [15, 20, 25, 30, 35]


@pytest.mark.parametrize("params", [(3, 7, 50, 0.02, 0.035, 4), (0, 0, 9, 1.0, 2.0, 1),
                                    (100, 250, 500, 1e-3, 2e-3, 100)])
def test_threshold_matches_the_loop_jitted(params):
    s = GradualThreshold(*params)
    steps = params[2] + 3 * params[5] + 5
    got = jax.jit(jax.vmap(s.threshold))(jnp.arange(steps))
    np.testing.assert_allclose(got, algorithm_1(*params, steps), rtol=1e-6, atol=1e-9)


def test_eq_1_and_block_scaling():
    s = GradualThreshold.from_quantile(q=0.3, start_itr=100, ramp_itr=400, end_itr=1000, freq=100)
    theta = 2 * 0.3 * 100 / (2 * 300 + 3 * 600)
    assert s.start_slope == pytest.approx(theta) and s.ramp_slope == pytest.approx(1.5 * theta)
    # With φ = 1.5θ, ε reaches about q at the end (exactly q·(1 + small +1 terms)).
    final = float(s.threshold(10_000))
    assert final == pytest.approx((theta * 301 + 1.5 * theta * 501) / 100)
    assert 0.25 < final < 0.3
    b = s.scaled_for_block((4, 4))  # N_b = 16, 16^(1/4) = 2
    assert b.start_slope == pytest.approx(2 * theta) and b.ramp_slope == pytest.approx(3 * theta)
    assert s.scaled_for_block((12, 2)).start_slope == pytest.approx(theta * 24**0.25)


def test_cubic_sparsity_hand_computed():
    s = CubicSparsity(final_sparsity=0.9, begin_step=10, end_step=50, freq=10)
    assert float(s.sparsity(5)) == 0.0
    assert float(s.sparsity(10)) == pytest.approx(0.0)
    assert float(s.sparsity(25)) == pytest.approx(0.9 - 0.9 * (1 - 10 / 40) ** 3)  # held from 20
    assert float(s.sparsity(50)) == pytest.approx(0.9)
    assert float(s.sparsity(999)) == pytest.approx(0.9)
    assert [i for i in range(70) if bool(s.is_update_step(i))] == [10, 20, 30, 40, 50]
    odd = CubicSparsity(final_sparsity=0.5, begin_step=0, end_step=25, freq=10)
    assert [i for i in range(40) if bool(odd.is_update_step(i))] == [0, 10, 20, 25]
    assert float(odd.sparsity(25)) == pytest.approx(0.5)


def test_percentile_abs():
    rng = np.random.default_rng(0)
    tree = {"a": rng.standard_normal((5, 5)), "b": {"c": rng.standard_normal(7)}}
    values = np.abs(np.concatenate([tree["a"].ravel(), tree["b"]["c"]]))
    assert percentile_abs(tree) == pytest.approx(np.percentile(values, 90))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: GradualThreshold(10, 5, 20, 0.1, 0.2), "start_itr <= ramp_itr <= end_itr"),
        (lambda: GradualThreshold(0, 30, 20, 0.1, 0.2), "ramp_itr=30"),
        (lambda: GradualThreshold(5, 5, 5, 0.1, 0.2), "start_itr < end_itr"),
        (lambda: GradualThreshold(0, 1, 2, 0.1, 0.2, freq=0), "freq must be >= 1"),
        (lambda: GradualThreshold(0, 1, 2, -0.1, 0.2), "slopes must be >= 0"),
        (lambda: CubicSparsity(0.9, 50, 10), "begin_step < end_step"),
        (lambda: CubicSparsity(1.0, 0, 10), "final_sparsity < 1"),
    ],
)
def test_bad_schedules(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_block_exponent_scales_theta_by_n_b_to_the_exponent():
    s = GradualThreshold.from_quantile(q=0.3, start_itr=100, ramp_itr=400, end_itr=1000, freq=100)
    for shape, exponent in (((8, 8), 0.125), ((12, 2), 0.2), ((4, 4), 0.0)):
        b = s.scaled_for_block(shape, exponent)
        factor = (shape[0] * shape[1]) ** exponent
        assert b.start_slope == pytest.approx(s.start_slope * factor)
        assert b.ramp_slope == pytest.approx(s.ramp_slope * factor)
    assert s.scaled_for_block((8, 8), 0.125).start_slope == pytest.approx(
        s.start_slope * 2**0.75)  # 64^(1/8) = 2^(6/8)
    with pytest.raises(ValueError, match="block exponent must be >= 0"):
        s.scaled_for_block((4, 4), -0.25)


def test_percentile_of_block_scores_hand_made():
    # A 4x4 kernel of -1..-16 (|w|: signs must not matter) and a 2x6 kernel whose three
    # 2x2 blocks have maxima 1, 2, 3.
    a = -np.arange(1.0, 17.0).reshape(4, 4)
    b = np.array([[1.0, 0.5, 2.0, 0.1, 3.0, 0.0], [0.2, 0.3, 1.0, 1.5, 1.2, 2.5]])
    # a's blocks: rows 0-1 cols 0-1 -> max |w| 6, 0-1/2-3 -> 8, 2-3/0-1 -> 14, 2-3/2-3 -> 16.
    scores = [6, 8, 14, 16, 1, 2, 3]  # b's: 1, 2, 3
    tree = {"a": a, "b": b}
    for p in (50, 90):
        assert percentile_block_scores(tree, (2, 2), "max", p) == pytest.approx(
            np.percentile(scores, p))
    # mean reduction of a's first block: (1 + 2 + 5 + 6) / 4.
    assert percentile_block_scores({"a": a}, (2, 2), "mean", 0) == pytest.approx(3.5)
    # 1x1 blocks are single weights: percentile_abs.
    assert percentile_block_scores(tree, (1, 1)) == pytest.approx(percentile_abs(tree))
    with pytest.raises(ValueError, match="empty tree"):
        percentile_block_scores({}, (2, 2))
