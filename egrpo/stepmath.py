"""Step math of E-GRPO: every formula of docs/method.md sections 1-3, as pure tensor functions.

Conventions: flow time ``sigma`` runs from 1 (noise) to 0 (data), ``x_sigma = (1 - sigma) x0 + sigma eps``
and the network predicts the velocity ``v = eps - x0``. Step ``i`` goes from ``sigmas[i]`` to
``sigmas[i + 1]``; a merged step of length ``l`` goes from ``sigmas[i]`` to ``sigmas[i + l]`` in ONE jump
whose drift and noise are frozen at ``sigmas[i]``.

No model code lives here: the rollout engine and the trainer call these functions with the
velocities a policy returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

NoiseKind = Literal["flow", "dance"]
TWO_PI_E = 2.0 * math.pi * math.e


def time_grid(num_steps: int, shift: float, terminal: float | None = None) -> torch.Tensor:
    """Shifted grid ``sigma_i = s u / (1 + (s - 1) u)`` with ``u = 1 - i / T``, i = 0..T (fp64, T + 1 values).

    ``terminal`` (diffusers' ``shift_terminal``, Qwen-Image's 0.02): the points before the final 0 are stretched,
    ``sigma_i <- 1 - (1 - sigma_i) (1 - terminal) / (1 - sigma_{T-1})``, so that ``sigma_{T-1} = terminal``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    sigmas = shift * u / (1.0 + (shift - 1.0) * u)
    if terminal is not None:
        if not 0.0 < terminal < 1.0 or num_steps < 2:
            raise ValueError(f"terminal must be in (0, 1) on a grid of >= 2 steps, got {terminal} on {num_steps}")
        sigmas[:-1] = 1.0 - (1.0 - sigmas[:-1]) * (1.0 - terminal) / (1.0 - sigmas[-2])
    return sigmas


def flow_noise_std(sigma: torch.Tensor, eta: float, sigma_clamp: float) -> torch.Tensor:
    """Flow-GRPO noise scale ``eta * sqrt(sigma / (1 - sigma))``.

    At sigma = 1 the ratio is infinite; as in Flow-GRPO the denominator then uses ``sigma_clamp``
    (the grid's second point, ``sigmas[1]``) in place of sigma.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64) if not torch.is_tensor(sigma) else sigma
    denom_sigma = torch.where(sigma >= 1.0, torch.full_like(sigma, sigma_clamp), sigma)
    return eta * torch.sqrt(sigma / (1.0 - denom_sigma))


def noise_std(sigma: torch.Tensor, eta: float, sigma_clamp: float, kind: NoiseKind) -> torch.Tensor:
    """Diffusion coefficient g(sigma) of the SDE: Flow-GRPO's ``flow`` form or DanceGRPO's constant ``dance``."""
    if kind == "flow":
        return flow_noise_std(sigma, eta, sigma_clamp)
    if kind == "dance":
        return torch.full_like(torch.as_tensor(sigma, dtype=torch.float64), eta)
    raise ValueError(f"unknown noise kind {kind!r}: expected 'flow' or 'dance'")


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """Deterministic Euler step ``x + v * (sigma_to - sigma_from)``; sigmas broadcast per sample (shape (B,))."""
    dt = per_sample(sigma_to - sigma_from, x)
    return (x.float() + v.float() * dt).to(x.dtype)


def shifted_grid_from(sigma_start: torch.Tensor, num_steps: int, shift: float) -> torch.Tensor:
    """(B, num_steps + 1) grids from each ``sigma_start`` down to 0, placed as :func:`time_grid` places its
    points: uniform in ``u`` with ``sigma = s u / (1 + (s - 1) u)``, starting at the ``u`` of ``sigma_start``.
    The cheap ODE completions of docs/method.md section 7 run on these grids."""
    sigma_start = sigma_start.double()
    u_start = sigma_start / (shift - (shift - 1.0) * sigma_start)
    u = u_start[:, None] * (1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps)
    return shift * u / (1.0 + (shift - 1.0) * u)


def dpm_solver_2m_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    x0_prev: torch.Tensor,
    sigma_prev: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
) -> torch.Tensor:
    """DPM-Solver++(2M)'s second-order multistep update for the flow ``x = (1 - sigma) x0 + sigma eps``.

    With ``lambda = log((1 - sigma) / sigma)``, ``h = lambda_to - lambda_from``, ``r = (lambda_from -
    lambda_prev) / h`` and the data predictions ``x0 = x - sigma v`` of this step and the previous one:
    ``D = (1 + 1 / 2r) x0 - (1 / 2r) x0_prev`` and ``x' = (sigma_to / sigma_from) x - (1 - sigma_to)
    (exp(-h) - 1) D``. Its first-order form is the Euler step; ``sigma_to`` must be > 0 (the last step to
    sigma = 0 is first order). fp32 arithmetic, sigmas per sample (B,).
    """
    lam = [torch.log((1.0 - s.double()) / s.double()) for s in (sigma_prev, sigma_from, sigma_to)]
    h = lam[2] - lam[1]
    half_over_r = h / (2.0 * (lam[1] - lam[0]))
    d = x0.float() + per_sample(half_over_r, x) * (x0.float() - x0_prev.float())
    ratio = per_sample(sigma_to.double() / sigma_from.double(), x)
    scale = per_sample((1.0 - sigma_to.double()) * torch.expm1(-h), x)
    return (ratio * x.float() - scale * d).to(x.dtype)


@dataclass
class SdeStep:
    """One (possibly merged) SDE jump: the sample, its Gaussian mean and its per-sample std."""

    sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor  # shape (B,): std_t * sqrt(-dt), fp32


def sde_mean_std(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
    g: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the jump ``sigma_from -> sigma_to`` with drift and noise frozen at ``sigma_from``.

    mean = x + [v + g^2 / (2 sigma) * (x + (1 - sigma) v)] * dt,   std = g * sqrt(-dt).
    The score term ``-(x + (1 - sigma) v) / sigma`` is the same for Flow-GRPO and DanceGRPO; only g differs.
    All arithmetic is fp32 whatever the network's dtype.
    """
    x32, v32 = x.float(), v.float()
    dt = (sigma_to - sigma_from).float()
    sig = sigma_from.float()
    g = g.float()
    coef = g**2 / (2.0 * sig)
    mean = x32 + (v32 + per_sample(coef, x32) * (x32 + per_sample(1.0 - sig, x32) * v32)) * per_sample(dt, x32)
    std = g * torch.sqrt(-dt)
    return mean, std


def sde_distribution(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
    eta: float,
    sigma_clamp: float,
    kind: NoiseKind = "flow",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the jump for a noise kind; the rollout and the policy update both go through here,
    so the update's log-probs reproduce the rollout's bit for bit when the velocity is the same."""
    g = noise_std(sigma_from.double(), eta, sigma_clamp, kind)
    return sde_mean_std(x, v, sigma_from, sigma_to, g)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
    eta: float,
    sigma_clamp: float,
    noise: torch.Tensor,
    kind: NoiseKind = "flow",
) -> SdeStep:
    """Sample ``x' = mean + std * noise``. With ``eta = 0`` this is exactly :func:`ode_step`."""
    mean, std = sde_distribution(x, v, sigma_from, sigma_to, eta, sigma_clamp, kind)
    sample = mean + per_sample(std, mean) * noise.float()
    return SdeStep(sample=sample, mean=mean, std=std)


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, std^2 I), averaged (not summed) over all non-batch dimensions, in fp32.

    Averaging keeps ``exp(log p - log p_old)`` finite for latents with 10^5 dimensions.
    """
    s32, m32 = sample.float(), mean.float()
    std32 = per_sample(std.float(), s32)
    log_density = -((s32 - m32) ** 2) / (2.0 * std32**2) - torch.log(std32) - 0.5 * math.log(2.0 * math.pi)
    return log_density.flatten(1).mean(dim=1)


def step_entropy(sigmas: torch.Tensor, step: int, length: int, eta: float, kind: NoiseKind = "flow") -> float:
    """Per-dimension exponentiated entropy ``H(i, l) = sqrt(2 pi e * std_t(sigma_i)^2 * (sigma_i - sigma_{i+l}))``.

    The jump is Gaussian with covariance ``std_t^2 (-dt) I``; its differential entropy per dimension
    is ``0.5 log(2 pi e std_t^2 (-dt))`` and H is its exponential. This scale reproduces the paper's
    thresholds (tau = 1.8 .. 2.6) on the FLUX grid (T = 16, shift 3, eta 0.7). ``kind``: the SDE the
    rollout samples with, whose std_t the entropy must use.
    """
    num_steps = len(sigmas) - 1
    if not 0 <= step < num_steps or length < 1 or step + length > num_steps:
        raise ValueError(f"step {step} with length {length} does not fit a grid of {num_steps} steps")
    sigma_i = sigmas[step].double()
    std = noise_std(sigma_i, eta, float(sigmas[1]), kind)
    drop = sigma_i - sigmas[step + length].double()
    return float(torch.sqrt(TWO_PI_E * std**2 * drop))


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) or a scalar, in fp32 on ``like``'s device, shaped to broadcast against ``like`` (B, ...).

    Grids and sigmas stay on the host in fp64 (they steer the loops without a device sync); every
    coefficient reaches the latents through here, so none of them meets a latent on another device."""
    values = torch.as_tensor(values, device=like.device).to(torch.float32)
    if values.dim() == 0:
        return values
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))
