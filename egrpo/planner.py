"""The entropy planner: which denoising steps branch, how far each merged SDE jump reaches, which group it forms.

E-GRPO (docs/method.md section 3): for each active step i, the merge length is the smallest l >= 1 whose
merged jump i -> i + l reaches the entropy threshold tau (capped at the end of the grid); tau = 0
means no merging. Fixed lengths (the paper's Table 2) and explicit lists are the other strategies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence, Union

import torch

from egrpo.stepmath import NoiseKind, step_entropy, time_grid

if TYPE_CHECKING:
    from egrpo.config import Config

ActiveSteps = Union[str, Sequence[int]]


@dataclass(frozen=True)
class Branch:
    """One active step: G samples leave the anchor at ``step`` with one SDE jump of ``length`` grid steps."""

    step: int
    length: int
    entropy_merged: float

    @property
    def landing(self) -> int:
        return self.step + self.length


@dataclass
class RolloutPlan:
    num_steps: int
    shift: float
    eta: float
    sigmas: torch.Tensor  # fp64, T + 1 values
    noise: NoiseKind = "flow"  # the SDE whose entropy the plan measured
    branches: list[Branch] = field(default_factory=list)
    shift_terminal: float | None = None  # the grid's stretch (time_grid's terminal), None = none

    @property
    def merge_lengths(self) -> list[int]:
        return [b.length for b in self.branches]

    @property
    def active_steps(self) -> list[int]:
        return [b.step for b in self.branches]

    def table(self) -> list[dict]:
        """One row per grid step, for ``egrpo plan`` and the plan figure."""
        by_step = {b.step: b for b in self.branches}
        rows = []
        for i in range(self.num_steps):
            branch = by_step.get(i)
            rows.append(
                {
                    "step": i,
                    "sigma": float(self.sigmas[i]),
                    "dt": float(self.sigmas[i + 1] - self.sigmas[i]),
                    "entropy": step_entropy(self.sigmas, i, 1, self.eta, self.noise),
                    "active": branch is not None,
                    "merge_length": branch.length if branch else None,
                    "merged_entropy": branch.entropy_merged if branch else None,
                }
            )
        return rows

    def to_json(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "shift": self.shift,
            "shift_terminal": self.shift_terminal,
            "eta": self.eta,
            "active_steps": self.active_steps,
            "merge_lengths": self.merge_lengths,
            "steps": self.table(),
        }


def resolve_active_steps(spec: ActiveSteps, num_steps: int) -> list[int]:
    """Active steps from 'first-half' (the paper), 'second-half', 'all', 'first:K', 'last:K' or a list."""
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name == "first-half":
            return list(range(num_steps // 2))
        if name == "second-half":
            return list(range(num_steps // 2, num_steps))
        if name == "all":
            return list(range(num_steps))
        for prefix in ("first:", "last:"):
            if name.startswith(prefix):
                try:
                    k = int(name[len(prefix) :])
                except ValueError:
                    k = -1
                if not 1 <= k <= num_steps:
                    raise ValueError(
                        f"active_steps {spec!r}: K must be an integer in 1..{num_steps} (the number of steps)"
                    )
                return list(range(k)) if prefix == "first:" else list(range(num_steps - k, num_steps))
        raise ValueError(
            f"active_steps {spec!r} is not understood: use 'first-half', 'second-half', 'all', "
            "'first:K', 'last:K' or a list of step indices"
        )
    steps = [int(s) for s in spec]
    bad = [s for s in steps if not 0 <= s < num_steps]
    if bad:
        raise ValueError(f"active_steps {bad} lie outside the grid: steps are 0..{num_steps - 1} for {num_steps} steps")
    if not steps:
        raise ValueError("active_steps is empty: train at least one step")
    if len(set(steps)) != len(steps):
        raise ValueError(f"active_steps {steps} repeats a step")
    return sorted(steps)


def adaptive_length(sigmas: torch.Tensor, step: int, eta: float, tau: float, noise: NoiseKind = "flow") -> int:
    """Smallest l >= 1 with H(step, l) >= tau, capped so the jump ends on the grid."""
    num_steps = len(sigmas) - 1
    length = 1
    while length < num_steps - step and step_entropy(sigmas, step, length, eta, noise) < tau:
        length += 1
    return length


def make_plan(
    num_steps: int = 16,
    shift: float = 3.0,
    eta: float = 0.7,
    active_steps: ActiveSteps = "first-half",
    merge: str = "adaptive",
    tau: float = 2.2,
    merge_length: int = 1,
    merge_lengths: Sequence[int] | None = None,
    noise: NoiseKind = "flow",
    shift_terminal: float | None = None,
) -> RolloutPlan:
    """Build the E-GRPO rollout plan. ``noise``: the SDE of the rollout (its std_t enters the entropy).

    merge: 'adaptive' (threshold ``tau``; 0 = no merging), 'fixed' (every jump ``merge_length`` steps,
    capped at the grid's end) or 'list' (``merge_lengths``, one per active step).
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0 (0 disables merging), got {tau}")
    sigmas = time_grid(num_steps, shift, shift_terminal)
    steps = resolve_active_steps(active_steps, num_steps)
    if merge == "adaptive":
        lengths = [adaptive_length(sigmas, i, eta, tau, noise) for i in steps]
    elif merge == "fixed":
        if merge_length < 1:
            raise ValueError(f"merge_length must be >= 1, got {merge_length}")
        lengths = [min(merge_length, num_steps - i) for i in steps]
    elif merge == "list":
        if merge_lengths is None or len(merge_lengths) != len(steps):
            raise ValueError(
                f"merge 'list' needs merge_lengths with one entry per active step ({len(steps)} steps: {steps}), "
                f"got {None if merge_lengths is None else list(merge_lengths)}"
            )
        lengths = [int(l) for l in merge_lengths]
        for i, l in zip(steps, lengths):
            if l < 1 or i + l > num_steps:
                raise ValueError(f"merge length {l} at step {i} leaves the grid of {num_steps} steps")
    else:
        raise ValueError(f"merge {merge!r} is not one of 'adaptive', 'fixed', 'list'")
    branches = [
        Branch(
            step=i,
            length=l,
            entropy_merged=step_entropy(sigmas, i, l, eta, noise),
        )
        for i, l in zip(steps, lengths)
    ]
    return RolloutPlan(num_steps=num_steps, shift=shift, eta=eta, sigmas=sigmas, branches=branches, noise=noise,
                       shift_terminal=shift_terminal)


def plan_kwargs(config: Config) -> dict:
    """:func:`make_plan`'s arguments from a config's ``sampling`` and ``plan`` sections."""
    s, p = config.sampling, config.plan
    return dict(
        num_steps=s.num_steps,
        shift=s.shift,
        eta=s.eta,
        active_steps=p.active_steps,
        merge=p.merge,
        tau=p.tau,
        merge_length=p.merge_length,
        merge_lengths=p.merge_lengths,
        noise=s.noise,
        shift_terminal=s.shift_terminal,
    )
