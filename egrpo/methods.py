"""E-GRPO and the paper's baselines as configurations of one engine (../shared/baselines.md).

Each method answers two questions: which steps are stochastic (SDE) and trained, and how samples
are grouped for the advantage. The answer is a rollout engine call; the trainer, the advantage rule
and the PPO-clip update are shared. Authors' defaults are given for their own step counts and are
rescaled to the grid in use (``rescale``).

| method         | engine       | SDE / trained steps                          | groups                          |
|----------------|--------------|----------------------------------------------|---------------------------------|
| egrpo          | branches     | active steps, merged jumps (entropy tau)     | (prompt, merged step)           |
| g2rpo          | branches     | active steps, single-step jumps              | (prompt, step), z summed over ODE granularities |
| tempflow       | branches     | every step, single-step jumps                | (prompt, step); loss weighted by noise level |
| flowgrpo       | trajectories | every step                                   | prompt (whole trajectories)     |
| flowgrpo-fast  | trajectories | a random window of `window` steps            | prompt                          |
| dancegrpo      | trajectories | every step SDE (constant noise), 60% trained | prompt (shared initial noise)   |
| mixgrpo        | trajectories | a sliding window of `window` steps           | prompt (shared initial noise)   |
| branchgrpo     | tree         | split steps (binary tree)                    | (prompt, tree depth)            |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from egrpo.config import Config, ConfigError, plan_kwargs
from egrpo.planner import RolloutPlan, make_plan
from egrpo.policy import Cond, Policy
from egrpo.rollout import Rollout, rollout_branches, rollout_trajectories, rollout_tree
from egrpo.stepmath import noise_std

METHODS = ("egrpo", "g2rpo", "tempflow", "flowgrpo", "flowgrpo-fast", "dancegrpo", "mixgrpo", "branchgrpo")

# Config values each method changes from the E-GRPO defaults; anything the user sets wins.
METHOD_DEFAULTS: dict[str, dict] = {
    "egrpo": {},
    "g2rpo": {"plan.tau": 0.0, "method.granularities": [1, 2]},
    "tempflow": {"plan.tau": 0.0, "plan.active_steps": "all"},
    "flowgrpo": {"plan.active_steps": "all"},
    "flowgrpo-fast": {"method.window": 2},
    "dancegrpo": {"sampling.noise": "dance", "sampling.eta": 0.3, "plan.active_steps": "all",
                  "method.train_fraction": 0.6},
    "mixgrpo": {"method.window": 4},
    "branchgrpo": {"sampling.noise": "dance", "sampling.eta": 0.3},
}


def rescale(steps: list[int], authors_steps: int, num_steps: int) -> list[int]:
    """Map step indices of the authors' grid onto ours, keeping them distinct and on the grid."""
    out = []
    for s in steps:
        i = min(round(s * num_steps / authors_steps), num_steps - 1)
        while i in out and i < num_steps - 1:
            i += 1
        out.append(i)
    return out


@dataclass
class MethodRun:
    """A method bound to a config: ``rollout`` is called once per iteration."""

    name: str
    config: Config
    plan: RolloutPlan  # the E-GRPO-style plan (branch methods) or the grid carrier (others)

    @property
    def sigmas(self) -> torch.Tensor:
        return self.plan.sigmas

    def rollout(
        self, policy: Policy, cond: Cond, iteration: int, generator: torch.Generator, prompt_generators: list
    ) -> Rollout:
        """``generator`` is shared by all ranks (step choices); ``prompt_generators`` feed each prompt's noise."""
        c, s, m = self.config.train, self.config.sampling, self.config.method
        if self.name in ("egrpo", "g2rpo", "tempflow"):
            return rollout_branches(
                policy, self.plan, cond, c.group_size, prompt_generators, s.noise, c.max_batch,
                granularities=tuple(m.granularities), step_weights=self.step_weights(),
            )
        if self.name == "branchgrpo":
            return rollout_tree(
                policy, self.sigmas, cond, prompt_generators, self.split_steps(), m.branch_factor,
                s.eta * m.branch_noise_scale, s.noise, c.max_batch,
            )
        sde, trained = self.trajectory_steps(iteration, generator)
        return rollout_trajectories(
            policy, self.sigmas, cond, c.group_size, prompt_generators, sde, trained, s.eta, s.noise,
            shared_noise=self.name in ("dancegrpo", "mixgrpo"), max_batch=c.max_batch,
        )

    def step_weights(self) -> dict[int, float] | None:
        """TempFlow-GRPO: each step's loss weighted by its noise level std_t * sqrt(-dt), normalised to mean 1."""
        if self.name != "tempflow":
            return None
        sig, eta = self.sigmas, self.config.sampling.eta
        steps = self.plan.active_steps
        level = {
            i: float(noise_std(sig[i], eta, float(sig[1]), self.config.sampling.noise) * (sig[i] - sig[i + 1]).sqrt())
            for i in steps
        }
        mean = sum(level.values()) / len(level)
        return {i: v / mean for i, v in level.items()}

    def split_steps(self) -> list[int]:
        m = self.config.method
        if m.split_steps is not None:
            return list(m.split_steps)
        return rescale([0, 3, 6, 9], 20, self.config.sampling.num_steps)

    def trajectory_steps(self, iteration: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """(SDE steps, trained steps) of a trajectory method at this iteration."""
        num_steps, m = self.config.sampling.num_steps, self.config.method
        if self.name == "flowgrpo":
            steps = self.plan.active_steps
            return steps, steps
        if self.name == "dancegrpo":
            steps = self.plan.active_steps
            k = max(1, round(m.train_fraction * len(steps)))
            chosen = torch.randperm(len(steps), generator=generator)[:k]
            return list(range(num_steps)), sorted(steps[int(i)] for i in chosen)
        window = min(m.window, num_steps)
        if self.name == "flowgrpo-fast":
            # The window starts anywhere in the first half, where the paper finds the useful signal.
            start = int(torch.randint(0, max(1, num_steps // 2 - window + 1), (1,), generator=generator))
        else:  # mixgrpo: the window slides one step every `window_shift_every` iterations, wrapping around
            every = m.window_shift_every or max(1, self.config.train.iterations // (num_steps // 2))
            start = (iteration // every) % (num_steps // 2)
        steps = list(range(start, min(start + window, num_steps)))
        return steps, steps

    def describe(self, iteration: int = 0) -> dict:
        """What an iteration does, for tests and the comparison table (group size G, P = 1 prompt)."""
        g = self.config.train.group_size
        num_steps = self.config.sampling.num_steps
        if self.name in ("egrpo", "g2rpo", "tempflow"):
            grans = self.config.method.granularities
            completion = sum(
                -(-(num_steps - b.landing) // gr) for b in self.plan.branches for gr in grans
            ) * g
            return {"sde_steps": self.plan.active_steps, "trained_steps": self.plan.active_steps,
                    "merge_lengths": self.plan.merge_lengths, "group": "prompt x step",
                    "network_calls": num_steps + completion + len(self.plan.branches)}
        if self.name == "branchgrpo":
            splits, bf = self.split_steps(), self.config.method.branch_factor
            calls, nodes = 0, 1
            for i in range(num_steps):
                calls += nodes
                if i in splits:
                    nodes *= bf
            return {"sde_steps": splits, "trained_steps": splits, "group": "prompt x depth",
                    "leaves": nodes, "network_calls": calls + sum(bf**d for d in range(len(splits)))}
        sde, trained = self.trajectory_steps(iteration, torch.Generator().manual_seed(iteration))
        return {"sde_steps": sde, "trained_steps": trained, "group": "prompt",
                "network_calls": g * num_steps + g * len(trained)}


def build_method(config: Config) -> MethodRun:
    name = config.method.name
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is not known; available: {', '.join(METHODS)}")
    return MethodRun(name=name, config=config, plan=make_plan(**plan_kwargs(config)))

