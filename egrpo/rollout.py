"""The rollout engine: executes a :class:`~egrpo.planner.RolloutPlan` for a batch of prompts.

Per prompt (method.md section 4): ONE initial noise; the deterministic ODE anchor over all T steps;
then, for every active step i, G samples leave the anchor latent x_i with one merged SDE jump
i -> i + l_i (independent noise) and finish by ODE. All samples of all prompts and all branches run
in lock-step through one batched network call per grid step, chunked to ``max_batch``; each sample
carries its own grid position, so branches that land at different steps share the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from egrpo.planner import RolloutPlan
from egrpo.policy import Cond, Policy, select
from egrpo.stepmath import NoiseKind, gaussian_log_prob, ode_step, sde_step

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


@dataclass
class RolloutBatch:
    """What the trainer needs from one rollout: P prompts, K branches, G samples per branch."""

    anchor: torch.Tensor  # (P, T + 1, *latent) the ODE anchor trajectory, anchor[:, 0] = shared noise
    branch_inputs: torch.Tensor  # (P, K, *latent) anchor latent x_i each group leaves from
    samples: torch.Tensor  # (P, K, G, *latent) x' after the merged jump
    log_probs: torch.Tensor  # (P, K, G) log p_old(x' | x_i), fp32, averaged over dimensions
    final: torch.Tensor  # (P, K, G, *latent) branch latents after the ODE completion
    network_calls: int  # latents pushed through the network (each sample-step counts one)

    @property
    def anchor_final(self) -> torch.Tensor:
        return self.anchor[:, -1]


def chunked_velocity(policy: Policy, max_batch: int) -> VelocityFn:
    """Velocity over any batch, in chunks of at most ``max_batch`` latents (memory bound for big models)."""

    def velocity(x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        if x.shape[0] <= max_batch:
            return policy.velocity(x, sigma, cond)
        outs = []
        for start in range(0, x.shape[0], max_batch):
            rows = torch.arange(start, min(start + max_batch, x.shape[0]))
            outs.append(policy.velocity(x[rows], sigma[rows], select(cond, rows)))
        return torch.cat(outs)

    return velocity


@torch.no_grad()
def integrate_ode(
    velocity: VelocityFn,
    x: torch.Tensor,
    cond: Cond,
    sigmas: torch.Tensor,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Euler ODE from grid position ``start`` (per sample, default 0) to sigma = 0; returns (x_0, network calls)."""
    num_steps = len(sigmas) - 1
    position = torch.zeros(x.shape[0], dtype=torch.long) if start is None else start.clone()
    x = x.clone()
    calls = 0
    sig = sigmas.to(torch.float32)
    while True:
        moving = torch.nonzero(position < num_steps).squeeze(1)
        if moving.numel() == 0:
            return x, calls
        pos = position[moving]
        v = velocity(x[moving], sig[pos], select(cond, moving))
        x[moving] = ode_step(x[moving], v, sigmas[pos], sigmas[pos + 1])
        position[moving] += 1
        calls += moving.numel()


@torch.no_grad()
def anchor_trajectory(
    velocity: VelocityFn, noise: torch.Tensor, cond: Cond, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ODE anchor: latents (P, T + 1, ...) and the velocities (P, T, ...) at each step."""
    num_steps = len(sigmas) - 1
    p = noise.shape[0]
    xs, vs = [noise], []
    for i in range(num_steps):
        v = velocity(xs[-1], sigmas[i].float().expand(p), cond)
        vs.append(v)
        xs.append(ode_step(xs[-1], v, sigmas[i].expand(p), sigmas[i + 1].expand(p)))
    return torch.stack(xs, 1), torch.stack(vs, 1)


@torch.no_grad()
def rollout(
    policy: Policy,
    plan: RolloutPlan,
    cond: Cond,
    group_size: int,
    generator: torch.Generator,
    noise_kind: NoiseKind = "flow",
    max_batch: int = 1024,
) -> RolloutBatch:
    velocity = chunked_velocity(policy, max_batch)
    sigmas = plan.sigmas
    num_prompts = next(iter(cond.values())).shape[0]
    shape = tuple(policy.latent_shape)
    noise = torch.randn((num_prompts, *shape), generator=generator).to(policy.device)
    anchor, anchor_v = anchor_trajectory(velocity, noise, cond, sigmas)

    steps = torch.tensor(plan.active_steps)
    landings = torch.tensor([b.landing for b in plan.branches])
    k, g = len(steps), group_size
    # Each group's samples are views of ONE anchor latent and ONE velocity: the input is shared bit for bit.
    x_in = anchor[:, steps]
    x = x_in[:, :, None].expand(num_prompts, k, g, *shape).reshape(-1, *shape)
    v = anchor_v[:, steps][:, :, None].expand(num_prompts, k, g, *shape).reshape(-1, *shape)
    step_of = steps[None, :, None].expand(num_prompts, k, g).reshape(-1)
    land_of = landings[None, :, None].expand(num_prompts, k, g).reshape(-1)
    eps = torch.randn(x.shape, generator=generator).to(policy.device)
    jump = sde_step(x, v, sigmas[step_of], sigmas[land_of], plan.eta, float(sigmas[1]), eps, noise_kind)
    log_probs = gaussian_log_prob(jump.sample, jump.mean, jump.std)

    prompt_of = torch.arange(num_prompts)[:, None, None].expand(num_prompts, k, g).reshape(-1)
    final, calls = integrate_ode(velocity, jump.sample.to(noise.dtype), select(cond, prompt_of), sigmas, land_of)
    return RolloutBatch(
        anchor=anchor,
        branch_inputs=x_in,
        samples=jump.sample.reshape(num_prompts, k, g, *shape),
        log_probs=log_probs.reshape(num_prompts, k, g),
        final=final.reshape(num_prompts, k, g, *shape),
        network_calls=calls + num_prompts * plan.num_steps,
    )


@torch.no_grad()
def sample_images(
    policy: Policy, cond: Cond, noise: torch.Tensor, sigmas: torch.Tensor, max_batch: int = 1024
) -> torch.Tensor:
    """Deterministic ODE samples decoded to images: the evaluation and ``egrpo sample`` path."""
    final, _ = integrate_ode(chunked_velocity(policy, max_batch), noise, cond, sigmas)
    return policy.decode(final)
