"""E-GRPO and the paper's baselines as configurations of one engine (the README's methods table).

Each method answers two questions: which steps are stochastic (SDE) and trained, and how samples
are grouped for the advantage. The answer is a rollout engine call; the trainer, the advantage rule
and the PPO-clip update are shared. Authors' defaults are given for their own step counts and are
rescaled to the grid in use (``rescale``).

A method is one class registered under its name (``@register``): it owns its config defaults, its
rollout, the SDE noise level its samples and log-probs share, its ``describe``, and its ``check`` of the
``method.*`` values it reads against the grid and plan in use. The trainer and the CLI only call these;
adding a method is one class here.

| method         | engine       | SDE / trained steps                          | groups                          |
|----------------|--------------|----------------------------------------------|---------------------------------|
| egrpo          | branches     | active steps, merged jumps (entropy tau)     | (prompt, merged step)           |
| egrpo-fast     | branches     | 2 of egrpo's steps per iteration [3]         | (prompt, merged step)           |
| g2rpo          | branches     | active steps, single-step jumps              | (prompt, step) [1]              |
| tempflow       | branches     | every step, single-step jumps                | (prompt, step) [2]              |
| flowgrpo       | trajectories | every step                                   | prompt (whole trajectories)     |
| flowgrpo-fast  | trajectories | a random window of `window` steps            | prompt                          |
| dancegrpo      | trajectories | every step SDE (constant noise), 60% trained | prompt (shared initial noise)   |
| mixgrpo        | trajectories | a sliding window of `window` steps           | prompt (shared initial noise)   |
| branchgrpo     | tree         | split steps (binary tree)                    | (prompt, tree depth)            |

[1] z-scores summed over the ODE completion granularities. [2] the loss weighted by each step's noise level.
[3] drawn anew each iteration; completed at stride 4 of the grid by DPM-Solver++(2M) (docs/method.md section 7).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch

from egrpo.errors import ConfigError
from egrpo.planner import Branch, RolloutPlan, make_plan, plan_kwargs
from egrpo.policy import Cond, Policy
from egrpo.rollout import Rollout, network_batch, rollout_branches, rollout_trajectories, rollout_tree
from egrpo.stepmath import noise_std

if TYPE_CHECKING:  # the config loader reads each method's defaults from this registry
    from egrpo.config import Config


def _step_range(first: int, last: int) -> str:
    return f"steps {first}..{last}" if last > first else f"step {first}"


def rescale(steps: list[int], authors_steps: int, num_steps: int) -> list[int]:
    """Map step indices of the authors' grid onto ours, keeping them distinct and on the grid."""
    out = []
    for s in steps:
        i = min(round(s * num_steps / authors_steps), num_steps - 1)
        while i in out and i < num_steps - 1:
            i += 1
        out.append(i)
    return out


METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Make ``cls`` available as ``method.name: <cls.name>`` (its defaults go to the config loader)."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


class Method:
    """A method bound to a config: ``rollout`` is called once per iteration."""

    name: ClassVar[str]
    label: ClassVar[str]
    """Its name in the paper, for progress bars and plots."""
    defaults: ClassVar[dict] = {}
    """Config values the method changes from the E-GRPO defaults (dotted keys)."""
    uses_entropy_plan: ClassVar[bool] = False
    """Whether the E-GRPO merge plan (plan.png, summary's ``plan``) describes what the method does."""

    def __init__(self, config: Config):
        self.config = config
        self.plan: RolloutPlan = make_plan(**plan_kwargs(config))  # also the grid of every method

    @property
    def sigmas(self) -> torch.Tensor:
        return self.plan.sigmas

    def check(self) -> None:
        """Refuse a ``method.*`` value that does not fit the grid (``sampling.num_steps``) or the plan
        (``plan.active_steps``), naming the key, the value and the valid range, before any weights load.
        A value the engine would clamp or cut is refused too: it would quietly be another method."""

    def sde_eta(self) -> float:
        """The SDE noise level a of its stochastic steps; the update's log-probs use the same one."""
        return self.config.sampling.eta

    def rollout(
        self, policy: Policy, cond: Cond, iteration: int, generator: torch.Generator, prompt_generators: list,
        max_batch: int | None = None,
    ) -> Rollout:
        """``generator`` is shared by all ranks (step choices); ``prompt_generators`` feed each prompt's noise;
        ``max_batch`` latents at most per network call (default: train.max_batch, 'auto' as its start)."""
        raise NotImplementedError

    def max_batch(self, given: int | None) -> int:
        return network_batch(self.config.train.max_batch) if given is None else given

    def describe(self, iteration: int = 0) -> dict:
        """What an iteration does per prompt (group size G): SDE and trained steps, groups, and the one count of
        its cost, ``network_calls`` (latents through the network), of which ``update_calls`` in the update."""
        raise NotImplementedError


class BranchMethod(Method):
    """Branches off one ODE anchor per prompt at each active step (``rollout_branches``)."""

    def step_weights(self) -> dict[int, float] | None:
        return None

    def check(self) -> None:
        m, num_steps, planned = self.config.method, self.config.sampling.num_steps, self.plan.branches
        too_coarse = [g for g in m.granularities if g > num_steps]
        if too_coarse:
            raise ConfigError(
                f"method.granularities={m.granularities}: stride {too_coarse[0]} is longer than the {num_steps}-step "
                f"grid (sampling.num_steps), so it is a one-call completion, as {num_steps} is; use strides in "
                f"1..{num_steps}"
            )
        if len(set(m.granularities)) < len(m.granularities):
            raise ConfigError(
                f"method.granularities={m.granularities} repeats a stride, whose z-scores would count twice; "
                "list each stride once"
            )
        earliest = min(b.landing for b in planned)
        left = max(1, num_steps - earliest)  # the longest completion: from the earliest landing to sigma 0
        one_call = [g for g in m.granularities if g >= left]
        if len(one_call) > 1:
            raise ConfigError(
                f"method.granularities={m.granularities}: strides {one_call} all finish every branch in one call "
                f"(at most {num_steps - earliest} steps are left after the earliest landing, step {earliest}), so "
                f"the same completion would count {len(one_call)} times; keep one of them"
            )
        if m.branch_subsample is not None and m.branch_subsample > len(planned):
            raise ConfigError(
                f"method.branch_subsample={m.branch_subsample}: the plan has {len(planned)} branch steps "
                f"{self.plan.active_steps} (plan.active_steps={self.config.plan.active_steps!r} on {num_steps} steps), "
                f"so at most {len(planned)} can train per iteration; use 1..{len(planned)}, or null for all"
            )
        if m.subsample_weights != "uniform" and m.branch_subsample is None:
            raise ConfigError(
                f"method.subsample_weights={m.subsample_weights!r} weights the draw of method.branch_subsample "
                f"steps, but branch_subsample is null (every planned step trains, nothing is drawn); set "
                f"method.branch_subsample to 1..{len(planned)} or drop subsample_weights"
            )

    def branches(self, generator: torch.Generator) -> list[Branch]:
        """The branch steps this iteration trains: all planned ones, or ``method.branch_subsample`` of them drawn
        with the generator all ranks share (uniformly, or in proportion to each merged step's entropy)."""
        m, planned = self.config.method, self.plan.branches
        if m.branch_subsample is None or m.branch_subsample >= len(planned):
            return planned
        if m.subsample_weights == "entropy":
            weights = torch.tensor([b.entropy_merged for b in planned], dtype=torch.float64)
            chosen = torch.multinomial(weights, m.branch_subsample, replacement=False, generator=generator)
        else:
            chosen = torch.randperm(len(planned), generator=generator)[: m.branch_subsample]
        return [planned[int(i)] for i in sorted(chosen.tolist())]

    def rollout(self, policy, cond, iteration, generator, prompt_generators, max_batch=None):
        c, s, m = self.config.train, self.config.sampling, self.config.method
        plan = dataclasses.replace(self.plan, branches=self.branches(generator))
        return rollout_branches(
            policy, plan, cond, c.group_size, prompt_generators, s.noise, self.max_batch(max_batch),
            granularities=tuple(m.granularities), step_weights=self.step_weights(),
            completion_steps=m.completion_steps, solver=m.completion_solver,
        )

    def completion_calls(self, branch: Branch) -> int:
        """Network calls of one sample's completions after ``branch``'s jump (all granularities)."""
        m, num_steps = self.config.method, self.config.sampling.num_steps
        per_call = 2 if m.completion_solver == "heun" else 1  # heun's last step, to sigma = 0, has one call
        if m.completion_steps is not None:
            return per_call * m.completion_steps - (per_call - 1)
        return sum(per_call * -(-(num_steps - branch.landing) // gr) - (per_call - 1) for gr in m.granularities)

    def describe(self, iteration: int = 0) -> dict:
        g, num_steps = self.config.train.group_size, self.config.sampling.num_steps
        planned = self.plan.branches
        trained = len(planned) if self.config.method.branch_subsample is None else min(
            self.config.method.branch_subsample, len(planned)
        )
        # a subsampled iteration's cost depends on the draw where branches cost differently: count the mean
        costs = [self.completion_calls(b) for b in planned]
        completion = round(trained * g * sum(costs) / len(planned))
        update = trained  # one input per (prompt, branch): the group shares its anchor
        return {"sde_steps": self.plan.active_steps, "trained_steps": self.plan.active_steps,
                "trained_per_iteration": trained, "merge_lengths": self.plan.merge_lengths, "group": "prompt x step",
                "network_calls": num_steps + completion + update, "update_calls": update,
                "calls_are_mean": trained < len(planned) and len(set(costs)) > 1}


@register
class EGRPO(BranchMethod):
    name, label = "egrpo", "E-GRPO"
    uses_entropy_plan = True


@register
class EGRPOFast(BranchMethod):
    """E-GRPO for a budget of network calls: the same entropy plan, jumps and groups; each branch finished at a
    coarse stride of the grid by DPM-Solver++(2M), and 2 of the planned branch steps trained per iteration, so
    an iteration costs about a tenth of E-GRPO's. The evidence for these defaults is in docs/results.md."""

    name, label = "egrpo-fast", "E-GRPO-Fast"
    defaults = {"method.granularities": [4], "method.completion_solver": "dpm2m", "method.branch_subsample": 2}
    uses_entropy_plan = True


@register
class G2RPO(BranchMethod):
    name, label = "g2rpo", "G2RPO"
    defaults = {"plan.tau": 0.0, "method.granularities": [1, 2]}


@register
class TempFlowGRPO(BranchMethod):
    name, label = "tempflow", "TempFlow-GRPO"
    defaults = {"plan.tau": 0.0, "plan.active_steps": "all"}

    def step_weights(self) -> dict[int, float]:
        """Each step's loss weighted by its noise level std_t * sqrt(-dt), normalised to mean 1."""
        sig, eta = self.sigmas, self.config.sampling.eta
        level = {
            i: float(noise_std(sig[i], eta, float(sig[1]), self.config.sampling.noise) * (sig[i] - sig[i + 1]).sqrt())
            for i in self.plan.active_steps
        }
        mean = sum(level.values()) / len(level)
        return {i: v / mean for i, v in level.items()}


class TrajectoryMethod(Method):
    """Whole trajectories per sample, SDE on some steps (``rollout_trajectories``)."""

    shared_noise: ClassVar[bool] = False
    """Every sample of a prompt starts from the same initial noise."""

    def trajectory_steps(self, iteration: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """(SDE steps, trained steps) at this iteration."""
        raise NotImplementedError

    def rollout(self, policy, cond, iteration, generator, prompt_generators, max_batch=None):
        c, s = self.config.train, self.config.sampling
        sde, trained = self.trajectory_steps(iteration, generator)
        return rollout_trajectories(
            policy, self.sigmas, cond, c.group_size, prompt_generators, sde, trained, self.sde_eta(), s.noise,
            shared_noise=self.shared_noise, max_batch=self.max_batch(max_batch),
        )

    def describe(self, iteration: int = 0) -> dict:
        g, num_steps = self.config.train.group_size, self.config.sampling.num_steps
        sde, trained = self.trajectory_steps(iteration, torch.Generator().manual_seed(iteration))
        return {"sde_steps": sde, "trained_steps": trained, "group": "prompt",
                "network_calls": g * num_steps + g * len(trained), "update_calls": g * len(trained)}

    def _window(self, start: int) -> tuple[list[int], list[int]]:
        num_steps = self.config.sampling.num_steps
        steps = list(range(start, min(start + min(self.config.method.window, num_steps), num_steps)))
        return steps, steps


@register
class FlowGRPO(TrajectoryMethod):
    name, label = "flowgrpo", "Flow-GRPO"
    defaults = {"plan.active_steps": "all"}

    def trajectory_steps(self, iteration, generator):
        return self.plan.active_steps, self.plan.active_steps


@register
class FlowGRPOFast(TrajectoryMethod):
    name, label = "flowgrpo-fast", "Flow-GRPO-Fast"
    defaults = {"method.window": 2}

    def check(self) -> None:
        num_steps, window = self.config.sampling.num_steps, self.config.method.window
        half = num_steps // 2
        if window > half:
            raise ConfigError(
                f"method.window={window} does not fit flowgrpo-fast on the {num_steps}-step grid: its window is "
                f"drawn inside the first half ({_step_range(0, half - 1)}), so it is 1..{half}; lower method.window "
                "or raise sampling.num_steps"
            )

    def trajectory_steps(self, iteration, generator):
        # The window starts anywhere in the first half, where the paper finds the useful signal.
        num_steps = self.config.sampling.num_steps
        window = min(self.config.method.window, num_steps)
        return self._window(int(torch.randint(0, max(1, num_steps // 2 - window + 1), (1,), generator=generator)))


@register
class DanceGRPO(TrajectoryMethod):
    name, label = "dancegrpo", "DanceGRPO"
    defaults = {
        "sampling.noise": "dance", "sampling.eta": 0.3, "plan.active_steps": "all", "method.train_fraction": 0.6,
    }
    shared_noise = True

    def check(self) -> None:
        fraction, steps = self.config.method.train_fraction, self.plan.active_steps
        if round(fraction * len(steps)) < 1:
            raise ConfigError(
                f"method.train_fraction={fraction} trains round({fraction} x {len(steps)}) = 0 of the {len(steps)} "
                f"active steps (plan.active_steps={self.config.plan.active_steps!r}); use a fraction above "
                f"{0.5 / len(steps):g} (one step) and up to 1"
            )

    def trajectory_steps(self, iteration, generator):
        steps = self.plan.active_steps
        k = max(1, round(self.config.method.train_fraction * len(steps)))
        chosen = torch.randperm(len(steps), generator=generator)[:k]
        return list(range(self.config.sampling.num_steps)), sorted(steps[int(i)] for i in chosen)


@register
class MixGRPO(TrajectoryMethod):
    name, label = "mixgrpo", "MixGRPO"
    defaults = {"method.window": 4}
    shared_noise = True

    def check(self) -> None:
        num_steps, window = self.config.sampling.num_steps, self.config.method.window
        starts = num_steps // 2  # the window starts at steps 0 .. starts - 1 in turn
        # never cut by the grid's end, and never every step (that is Flow-GRPO with shared noise)
        longest = min(num_steps - starts + 1, num_steps - 1)
        if window > longest:
            raise ConfigError(
                f"method.window={window} does not fit mixgrpo on the {num_steps}-step grid: the window starts at "
                f"{_step_range(0, starts - 1)} in turn and must end on the grid and leave an ODE step, so it is "
                f"1..{longest}; lower method.window or raise sampling.num_steps"
            )

    def trajectory_steps(self, iteration, generator):
        # The window slides one step every `window_shift_every` iterations, wrapping around the first half.
        num_steps, m = self.config.sampling.num_steps, self.config.method
        every = m.window_shift_every or max(1, self.config.train.iterations // (num_steps // 2))
        return self._window((iteration // every) % (num_steps // 2))


@register
class BranchGRPO(Method):
    name, label = "branchgrpo", "BranchGRPO"
    defaults = {"sampling.noise": "dance", "sampling.eta": 0.3}

    def sde_eta(self) -> float:
        return self.config.sampling.eta * self.config.method.branch_noise_scale

    def split_steps(self) -> list[int]:
        m = self.config.method
        if m.split_steps is not None:
            return list(m.split_steps)
        return rescale([0, 3, 6, 9], 20, self.config.sampling.num_steps)

    def check(self) -> None:
        m, num_steps, splits = self.config.method, self.config.sampling.num_steps, self.split_steps()
        if not splits:
            raise ConfigError(
                f"method.split_steps=[] splits no node, so nothing trains; list steps of 0..{num_steps - 1}, or null "
                "for the authors' 0, 3, 6, 9 of 20 rescaled"
            )
        repeated = sorted({i for i in splits if splits.count(i) > 1})
        if repeated and m.split_steps is None:
            raise ConfigError(
                f"method.split_steps=null: the authors' splits (steps 0, 3, 6, 9 of 20) rescaled to the "
                f"{num_steps}-step grid repeat step {repeated[0]} ({splits}); set method.split_steps to distinct "
                f"steps of 0..{num_steps - 1} or raise sampling.num_steps to 4 or more"
            )
        if repeated:
            raise ConfigError(
                f"method.split_steps={splits} repeats step {repeated[0]}: a tree splits once per step; list each "
                "step once"
            )

    def rollout(self, policy, cond, iteration, generator, prompt_generators, max_batch=None):
        m = self.config.method
        return rollout_tree(
            policy, self.sigmas, cond, prompt_generators, self.split_steps(), m.branch_factor, self.sde_eta(),
            self.config.sampling.noise, self.max_batch(max_batch),
        )

    def describe(self, iteration: int = 0) -> dict:
        splits, bf = self.split_steps(), self.config.method.branch_factor
        calls, nodes = 0, 1
        for i in range(self.config.sampling.num_steps):
            calls += nodes
            if i in splits:
                nodes *= bf
        update = sum(bf**d for d in range(len(splits)))  # one input per tree node that splits
        return {"sde_steps": splits, "trained_steps": splits, "group": "prompt x depth",
                "leaves": nodes, "network_calls": calls + update, "update_calls": update}


def build_method(config: Config) -> Method:
    name = config.method.name
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is not known; available: {', '.join(METHODS)}")
    method = METHODS[name](config)
    method.check()
    return method
