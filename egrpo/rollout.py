"""The rollout engines: they turn prompts into trained transitions and final latents to score.

``rollout_branches`` is E-GRPO (docs/method.md section 4): per prompt ONE initial noise; the
deterministic ODE anchor over all T steps; then, for every active step i, G samples leave the anchor
latent x_i with one merged SDE jump i -> i + l_i (independent noise) and finish by ODE. All samples
of all prompts and all branches run in lock-step through one batched network call per grid step,
chunked to ``max_batch``; each sample carries its own grid position, so branches that land at
different steps share the same calls.

``rollout_trajectories`` (whole SDE/ODE trajectories per sample) and ``rollout_tree`` (BranchGRPO's
binary tree) serve the baselines. All three return the same :class:`Rollout`, so one update rule
trains them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from egrpo.planner import RolloutPlan
from egrpo.policy import Cond, Policy, select
from egrpo.stepmath import (
    NoiseKind,
    dpm_solver_2m_step,
    gaussian_log_prob,
    ode_step,
    per_sample,
    sde_step,
    shifted_grid_from,
)

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


@dataclass
class TrainStep:
    """The transitions of one trained denoising step: one optimizer step's worth of data.

    The policy is evaluated once per distinct input (``inputs``); transition m leaves input
    ``source[m]`` and lands on ``samples[m]``. Its reward comes from the final images ``leaves[m]``
    and its advantage is normalised within ``groups[m]``.
    """

    step: int
    landing: int
    inputs: torch.Tensor  # (N, *latent)
    cond_rows: torch.Tensor  # (N,) prompt row of each input
    source: torch.Tensor  # (M,) input row of each transition, sorted
    samples: torch.Tensor  # (M, *latent)
    log_probs: torch.Tensor  # (M,) log p_old, fp32, averaged over dimensions
    leaves: torch.Tensor  # (M, L) indices into Rollout.finals
    groups: torch.Tensor  # (M,)
    weight: float = 1.0


@dataclass
class Rollout:
    train_steps: list[TrainStep]
    finals: torch.Tensor  # (F, *latent) every final latent that gets a reward
    final_rows: torch.Tensor  # (F,) prompt row of each final latent
    network_calls: int  # latents pushed through the network (each sample-step counts one)
    reduce: str = "mean"
    """How a transition's leaves become its advantage: 'mean' (one reward, the mean of its leaves, then a
    group z-score) or 'sum_z' (a group z-score per leaf column, summed: G2RPO's multi-granularity)."""
    anchor_finals: torch.Tensor | None = None  # (P, *latent) the pure-ODE anchor images, when the method has one


AUTO_MAX_BATCH = 1024
"""Where ``train.max_batch: auto`` starts; a training rollout that runs out of memory halves it and retries."""


def network_batch(max_batch: int | str) -> int:
    """``train.max_batch`` as a number of latents per network call ('auto': its starting point)."""
    return AUTO_MAX_BATCH if max_batch == "auto" else max_batch


def chunked_velocity(policy: Policy, max_batch: int, completion: bool = False) -> VelocityFn:
    """Velocity over any batch, in chunks of at most ``max_batch`` latents (memory bound for big models).
    ``completion``: the calls never enter a log-probability, so they may take the policy's faster path."""
    call = policy.completion_velocity if completion else policy.velocity

    def velocity(x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        if x.shape[0] <= max_batch:
            return call(x, sigma, cond)
        outs = []
        for start in range(0, x.shape[0], max_batch):
            rows = slice(start, start + max_batch)  # a view: no gather of the chunk on the device
            outs.append(call(x[rows], sigma[rows], {k: v[rows] for k, v in cond.items()}))
        return torch.cat(outs)

    return velocity


ODE_SOLVERS = ("euler", "heun", "dpm2m")


@torch.no_grad()
def integrate_ode(
    velocity: VelocityFn,
    x: torch.Tensor,
    cond: Cond,
    sigmas: torch.Tensor,
    start: torch.Tensor | None = None,
    stride: torch.Tensor | int = 1,
    solver: str = "euler",
) -> tuple[torch.Tensor, int]:
    """ODE from grid position ``start`` (per sample, default 0) to sigma = 0, ``stride`` grid steps
    per network call (per sample; the last step is clamped to the grid's end), by ``solver`` (see
    :func:`solve_ode`). Returns (x_0, network calls)."""
    num_steps = len(sigmas) - 1
    start = torch.zeros(x.shape[0], dtype=torch.long) if start is None else start
    stride = torch.as_tensor(stride).expand(x.shape[0])
    longest = int(((num_steps - start + stride - 1) // stride).max()) if x.shape[0] else 0
    positions = torch.clamp(start[:, None] + stride[:, None] * torch.arange(longest + 1), max=num_steps)
    return solve_ode(velocity, x, cond, sigmas[positions], solver)


@torch.no_grad()
def solve_ode(
    velocity: VelocityFn, x: torch.Tensor, cond: Cond, grids: torch.Tensor, solver: str = "euler"
) -> tuple[torch.Tensor, int]:
    """The probability-flow ODE along each sample's own decreasing grid (``grids`` (B, S + 1), fp64; a grid
    that reaches 0 early repeats 0, and those steps cost nothing). All samples move in lock-step, one batched
    network call per grid column. Returns (x_0, network calls).

    ``solver``: ``euler``; ``heun`` (second order, a second call at the step's end unless it is sigma = 0);
    ``dpm2m`` (DPM-Solver++(2M): second order from the previous step's data prediction, no extra call;
    first order on a sample's first step and on the last step to sigma = 0).
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}: expected one of {', '.join(ODE_SOLVERS)}")
    x = x.clone()
    calls = 0
    x0_prev = torch.zeros_like(x) if solver == "dpm2m" else None
    has_prev = torch.zeros(x.shape[0], dtype=torch.bool)
    for k in range(grids.shape[1] - 1):
        s_all, t_all = grids[:, k], grids[:, k + 1]
        moving = torch.nonzero(s_all > t_all).squeeze(1)
        if moving.numel() == 0:
            break
        s, t, xm, cm = s_all[moving], t_all[moving], x[moving], select(cond, moving)
        v = velocity(xm, s.float(), cm)
        calls += moving.numel()
        nxt = ode_step(xm, v, s, t)
        if solver == "heun":
            inner = torch.nonzero(t > 0).squeeze(1)
            if inner.numel():
                v_end = velocity(nxt[inner], t[inner].float(), select(cm, inner))
                calls += inner.numel()
                nxt[inner] = ode_step(xm[inner], (v[inner].float() + v_end.float()) / 2, s[inner], t[inner])
        elif solver == "dpm2m":
            x0 = xm.float() - v.float() * per_sample(s, xm)
            second = torch.nonzero(has_prev[moving] & (t > 0)).squeeze(1)
            if second.numel():
                rows = moving[second]
                nxt[second] = dpm_solver_2m_step(
                    xm[second], x0[second], x0_prev[rows], grids[rows, k - 1], s[second], t[second]
                )
            x0_prev[moving] = x0.to(x0_prev.dtype)
            has_prev[moving] = True
        x[moving] = nxt
    return x, calls


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


def per_prompt_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Standard normal draws of ``shape`` for each prompt from that prompt's own generator, concatenated.

    Every random number a prompt's samples use comes from its generator, so a prompt's rollout is the
    same whichever batch, rank or world size it runs in (data-parallel runs match a single process).
    """
    return torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device)


def _expand(t: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat each row n times, consecutively: (N, ...) -> (N * n, ...), as views of the same row."""
    return t[:, None].expand(t.shape[0], n, *t.shape[1:]).reshape(t.shape[0] * n, *t.shape[1:])


@torch.no_grad()
def rollout_branches(
    policy: Policy,
    plan: RolloutPlan,
    cond: Cond,
    group_size: int,
    generators: list[torch.Generator],
    noise_kind: NoiseKind = "flow",
    max_batch: int = 1024,
    granularities: tuple[int, ...] = (1,),
    step_weights: dict[int, float] | None = None,
    completion_steps: int | None = None,
    solver: str = "euler",
) -> Rollout:
    """E-GRPO (and G2RPO, TempFlow-GRPO): shared noise, ODE anchor, G merged SDE jumps per active step.

    Each jump sample finishes by ODE once per granularity g (g grid steps per call; G2RPO uses {1, 2}),
    or, with ``completion_steps`` n, in n steps placed by the grid's time shift between its landing sigma
    and 0 (``shifted_grid_from``), whatever its landing. ``solver``: see :func:`solve_ode`.
    """
    # The anchor's velocities at the active steps enter the jumps' log-probabilities; the completions' never do.
    velocity, completion = chunked_velocity(policy, max_batch), chunked_velocity(policy, max_batch, completion=True)
    sigmas = plan.sigmas
    p = next(iter(cond.values())).shape[0]
    shape = tuple(policy.latent_shape)
    noise = per_prompt_noise(generators, (1, *shape), policy.device)
    anchor, anchor_v = anchor_trajectory(velocity, noise, cond, sigmas)

    steps = torch.tensor(plan.active_steps)
    landings = torch.tensor([b.landing for b in plan.branches])
    k, g, n_gran = len(steps), group_size, len(granularities)
    # Order (p, k, g): each group's G samples are views of ONE anchor latent and ONE velocity, so the
    # input is shared bit for bit.
    x_in = anchor[:, steps].reshape(p * k, *shape)
    x = _expand(x_in, g)
    v = _expand(anchor_v[:, steps].reshape(p * k, *shape), g)
    step_of = _expand(steps.repeat(p), g)
    land_of = _expand(landings.repeat(p), g)
    eps = per_prompt_noise(generators, (k * g, *shape), policy.device)
    jump = sde_step(x, v, sigmas[step_of], sigmas[land_of], plan.eta, float(sigmas[1]), eps, noise_kind)
    log_probs = gaussian_log_prob(jump.sample, jump.mean, jump.std)

    # Completions in order (p, k, g, granularity).
    prompt_of = torch.arange(p).repeat_interleave(k * g * n_gran)
    start = _expand(jump.sample.to(noise.dtype), n_gran)
    if completion_steps is None:
        stride = torch.tensor(granularities).repeat(p * k * g)
        final, calls = integrate_ode(
            completion, start, select(cond, prompt_of), sigmas, _expand(land_of, n_gran), stride, solver
        )
    else:
        grids = shifted_grid_from(sigmas[_expand(land_of, n_gran)], completion_steps, plan.shift)
        final, calls = solve_ode(completion, start, select(cond, prompt_of), grids, solver)

    train_steps = []
    transitions = torch.arange(p * k * g).reshape(p, k, g)
    for j, branch in enumerate(plan.branches):
        rows = transitions[:, j].reshape(-1)  # (p, g) of this step, in order
        train_steps.append(
            TrainStep(
                step=branch.step,
                landing=branch.landing,
                inputs=anchor[:, branch.step],
                cond_rows=torch.arange(p),
                source=torch.arange(p).repeat_interleave(g),
                samples=jump.sample[rows],
                log_probs=log_probs[rows],
                leaves=rows[:, None] * n_gran + torch.arange(n_gran)[None],
                groups=torch.arange(p).repeat_interleave(g),
                weight=(step_weights or {}).get(branch.step, 1.0),
            )
        )
    return Rollout(
        train_steps=train_steps,
        finals=final,
        final_rows=prompt_of,
        network_calls=calls + p * plan.num_steps,
        reduce="sum_z" if n_gran > 1 else "mean",
        anchor_finals=anchor[:, -1],
    )


@torch.no_grad()
def rollout_trajectories(
    policy: Policy,
    sigmas: torch.Tensor,
    cond: Cond,
    group_size: int,
    generators: list[torch.Generator],
    sde_steps: list[int],
    train_steps: list[int],
    eta: float,
    noise_kind: NoiseKind = "flow",
    shared_noise: bool = False,
    max_batch: int = 1024,
) -> Rollout:
    """Flow-GRPO, DanceGRPO, MixGRPO: G whole trajectories per prompt, SDE at ``sde_steps`` and ODE
    elsewhere; transitions at ``train_steps`` are trained; one group per prompt."""
    velocity, completion = chunked_velocity(policy, max_batch), chunked_velocity(policy, max_batch, completion=True)
    p, g = next(iter(cond.values())).shape[0], group_size
    shape = tuple(policy.latent_shape)
    if shared_noise:
        x = _expand(per_prompt_noise(generators, (1, *shape), policy.device), g)
    else:
        x = per_prompt_noise(generators, (g, *shape), policy.device)
    rows = torch.arange(p).repeat_interleave(g)
    cond_all = select(cond, rows)
    sde, trained = set(sde_steps), set(train_steps)
    records = []
    for i in range(len(sigmas) - 1):
        s_from, s_to = sigmas[i].expand(p * g), sigmas[i + 1].expand(p * g)
        v = (velocity if i in trained else completion)(x, s_from.float(), cond_all)
        if i in sde:
            eps = per_prompt_noise(generators, (g, *shape), policy.device)
            jump = sde_step(x, v, s_from, s_to, eta, float(sigmas[1]), eps, noise_kind)
            if i in trained:
                log_probs = gaussian_log_prob(jump.sample, jump.mean, jump.std)
                records.append((i, x, jump.sample, log_probs))
            x = jump.sample.to(x.dtype)
        else:
            x = ode_step(x, v, s_from, s_to)
    every = torch.arange(p * g)
    train = [
        TrainStep(step=i, landing=i + 1, inputs=x_in, cond_rows=rows, source=every, samples=sample,
                  log_probs=lp, leaves=every[:, None], groups=rows)
        for i, x_in, sample, lp in records
    ]
    return Rollout(train_steps=train, finals=x, final_rows=rows, network_calls=p * g * (len(sigmas) - 1))


@torch.no_grad()
def rollout_tree(
    policy: Policy,
    sigmas: torch.Tensor,
    cond: Cond,
    generators: list[torch.Generator],
    split_steps: list[int],
    branch_factor: int,
    eta: float,
    noise_kind: NoiseKind = "dance",
    max_batch: int = 1024,
) -> Rollout:
    """BranchGRPO: one shared noise per prompt; at each split step every node branches into
    ``branch_factor`` children with one SDE step, ODE elsewhere. A child's reward is the mean of its
    leaves; children are normalised among all nodes of the same depth of the prompt's tree."""
    velocity, completion = chunked_velocity(policy, max_batch), chunked_velocity(policy, max_batch, completion=True)
    p = next(iter(cond.values())).shape[0]
    shape = tuple(policy.latent_shape)
    x = per_prompt_noise(generators, (1, *shape), policy.device)
    rows = torch.arange(p)
    depth = len(split_steps)
    records, calls = [], 0
    for i in range(len(sigmas) - 1):
        n = x.shape[0]
        s_from, s_to = sigmas[i].expand(n), sigmas[i + 1].expand(n)
        v = (velocity if i in split_steps else completion)(x, s_from.float(), select(cond, rows))
        calls += n
        if i in split_steps:
            x_rep, v_rep = _expand(x, branch_factor), _expand(v, branch_factor)
            eps = per_prompt_noise(generators, (x_rep.shape[0] // p, *shape), policy.device)
            m = n * branch_factor
            jump = sde_step(
                x_rep, v_rep, s_from[:1].expand(m), s_to[:1].expand(m), eta, float(sigmas[1]), eps, noise_kind
            )
            d = len(records) + 1  # depth of the children
            span = branch_factor ** (depth - d)  # leaves under each child
            children = torch.arange(m)
            records.append(
                TrainStep(
                    step=i, landing=i + 1, inputs=x, cond_rows=rows,
                    source=torch.arange(n).repeat_interleave(branch_factor), samples=jump.sample,
                    log_probs=gaussian_log_prob(jump.sample, jump.mean, jump.std),
                    leaves=children[:, None] * span + torch.arange(span)[None],
                    groups=children // (m // p),
                )
            )
            x, rows = jump.sample.to(x.dtype), rows.repeat_interleave(branch_factor)
        else:
            x = ode_step(x, v, s_from, s_to)
    return Rollout(train_steps=records, finals=x, final_rows=rows, network_calls=calls)


@torch.no_grad()
def sample_images(
    policy: Policy, cond: Cond, noise: torch.Tensor, sigmas: torch.Tensor, max_batch: int = 1024
) -> torch.Tensor:
    """Deterministic ODE samples decoded to images: the evaluation and ``egrpo sample`` path."""
    final, _ = integrate_ode(chunked_velocity(policy, max_batch, completion=True), noise, cond, sigmas)
    return policy.decode(final)
