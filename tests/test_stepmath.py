import math

import pytest
import torch

from egrpo.stepmath import (
    flow_noise_std,
    gaussian_log_prob,
    ode_step,
    sde_distribution,
    sde_step,
    step_entropy,
    time_grid,
)

ORACLE_SINGLE_H = [
    2.893, 2.989, 2.137, 1.763, 1.542, 1.392, 1.281, 1.193, 1.120, 1.056, 0.997, 0.937, 0.872, 0.795, 0.692, 0.528,
]


def test_time_grid_closed_form():
    sigmas = time_grid(16, 3.0)
    assert sigmas.shape == (17,)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    u = 1 - 5 / 16
    assert sigmas[5].item() == pytest.approx(3 * u / (1 + 2 * u), abs=1e-15)
    assert torch.all(sigmas[1:] < sigmas[:-1])
    assert torch.allclose(time_grid(8, 1.0), torch.linspace(1, 0, 9, dtype=torch.float64))


def test_eta_zero_is_the_euler_ode_step():
    gen = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(5, 16, 4, generator=gen) for _ in range(3))
    sigmas = time_grid(16, 3.0)
    s_from, s_to = sigmas[[0, 2, 3, 7, 10]], sigmas[[1, 4, 4, 9, 16]]
    step = sde_step(x, v, s_from, s_to, eta=0.0, sigma_clamp=float(sigmas[1]), noise=noise)
    expected = x + v * (s_to - s_from).float()[:, None, None]
    assert torch.allclose(step.sample, expected, atol=1e-6)
    assert torch.allclose(ode_step(x, v, s_from, s_to), expected, atol=1e-6)


def test_log_prob_is_normal_log_density_averaged_over_dims():
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 16, 4, generator=gen)
    std = torch.tensor([0.3, 1.2, 0.05])
    sample = mean + std[:, None, None] * torch.randn(3, 16, 4, generator=gen)
    expected = torch.distributions.Normal(mean, std[:, None, None]).log_prob(sample).flatten(1).mean(1)
    assert torch.allclose(gaussian_log_prob(sample, mean, std), expected, atol=1e-5)


def test_log_prob_is_fp32_for_bf16_inputs():
    mean = torch.zeros(2, 8, dtype=torch.bfloat16)
    out = gaussian_log_prob(mean + 0.1, mean, torch.tensor([1.0, 2.0]))
    assert out.dtype == torch.float32


def test_merged_jump_variance_and_mean_are_frozen_at_the_start():
    sigmas = time_grid(16, 3.0)
    eta, i, l = 0.7, 3, 4
    x = torch.randn(1, 64, dtype=torch.float32)
    v = torch.randn(1, 64)
    mean, std = sde_distribution(x, v, sigmas[i : i + 1], sigmas[i + l : i + l + 1], eta, float(sigmas[1]))
    s = sigmas[i].item()
    g2 = eta**2 * s / (1 - s)
    dt = (sigmas[i + l] - sigmas[i]).item()
    assert std.item() ** 2 == pytest.approx(g2 * -dt, rel=1e-6)
    expected_mean = x + (v + g2 / (2 * s) * (x + (1 - s) * v)) * dt
    assert torch.allclose(mean, expected_mean, atol=1e-6)
    # Empirical variance of many draws matches the closed form.
    noise = torch.randn(20000, 64, generator=torch.Generator().manual_seed(2))
    xs, vs = x.expand(20000, 64), v.expand(20000, 64)
    draws = sde_step(xs, vs, sigmas[i].expand(20000), sigmas[i + l].expand(20000), eta, float(sigmas[1]), noise)
    assert draws.sample.var(0).mean().item() == pytest.approx(g2 * -dt, rel=0.02)


def test_sigma_one_uses_the_second_grid_point_in_the_denominator():
    sigmas = time_grid(16, 3.0)
    s1 = float(sigmas[1])
    std0 = flow_noise_std(torch.tensor(1.0, dtype=torch.float64), 0.7, s1)
    assert std0.item() == pytest.approx(0.7 * math.sqrt(1.0 / (1.0 - s1)))
    assert torch.isfinite(std0)


def test_single_step_entropy_matches_the_oracle_table():
    sigmas = time_grid(16, 3.0)
    values = [step_entropy(sigmas, i, 1, 0.7) for i in range(16)]
    assert values == pytest.approx(ORACLE_SINGLE_H, abs=5e-4)


def test_entropy_increases_with_merge_length():
    sigmas = time_grid(16, 3.0)
    for i in range(15):
        hs = [step_entropy(sigmas, i, l, 0.7) for l in range(1, 16 - i + 1)]
        assert all(b > a for a, b in zip(hs, hs[1:]))


def test_dance_noise_matches_the_score_form():
    """DanceGRPO: mean = x + v dt - 0.5 eta^2 score dt, score = -(x - (1 - s) x0_hat) / s^2, std = eta sqrt(-dt)."""
    gen = torch.Generator().manual_seed(3)
    x, v = torch.randn(4, 32, generator=gen), torch.randn(4, 32, generator=gen)
    sigmas = time_grid(16, 3.0)
    s_from, s_to = sigmas[[2, 5, 8, 12]], sigmas[[3, 6, 9, 13]]
    eta = 0.3
    mean, std = sde_distribution(x, v, s_from, s_to, eta, float(sigmas[1]), kind="dance")
    s = s_from.float()[:, None]
    dt = (s_to - s_from).float()[:, None]
    x0_hat = x - s * v
    score = -(x - (1 - s) * x0_hat) / s**2
    assert torch.allclose(mean, x + v * dt - 0.5 * eta**2 * score * dt, atol=1e-5)
    assert torch.allclose(std, eta * torch.sqrt(-dt.squeeze(1)), atol=1e-7)


def test_entropy_rejects_jumps_off_the_grid():
    with pytest.raises(ValueError, match="does not fit"):
        step_entropy(time_grid(16, 3.0), 14, 3, 0.7)
