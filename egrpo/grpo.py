"""The GRPO objective (docs/method.md sections 5-6): group-normalised advantages and the PPO-clip loss."""

from __future__ import annotations

import math

import torch


def grouped_zscore(values: torch.Tensor, groups: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Z-score of each column of ``values`` (M, L) within the rows that share a label in ``groups`` (M,)."""
    _, inverse = torch.unique(groups, return_inverse=True)
    n = int(inverse.max()) + 1
    count = torch.zeros(n, 1, dtype=values.dtype).index_add_(0, inverse, torch.ones_like(values[:, :1]))
    mean = torch.zeros(n, values.shape[1], dtype=values.dtype).index_add_(0, inverse, values) / count
    centred = values - mean[inverse]
    var = torch.zeros_like(mean).index_add_(0, inverse, centred**2) / count
    return centred / (var.sqrt()[inverse] + eps)


def grouped_std(values: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean over groups of the within-group (population) std of ``values`` (M,): how much signal a group holds."""
    _, inverse = torch.unique(groups, return_inverse=True)
    stds = [values[inverse == k].std(unbiased=False) for k in range(int(inverse.max()) + 1)]
    return torch.stack(stds).mean().item()


def transition_advantages(
    final_rewards: torch.Tensor, leaves: torch.Tensor, groups: torch.Tensor, reduce: str, clip: float
) -> torch.Tensor:
    """Advantage of each transition from the rewards of the final images below it.

    reduce='mean': the transition's reward is the mean over its leaves (one leaf for E-GRPO, a subtree
    for BranchGRPO), z-scored within its group. reduce='sum_z': one z-score per leaf column (G2RPO's
    ODE granularities), summed. Clipped to [-clip, clip].
    """
    rewards = final_rewards[leaves]
    if reduce == "mean":
        rewards = rewards.mean(dim=1, keepdim=True)
    elif reduce != "sum_z":
        raise ValueError(f"unknown advantage reduction {reduce!r}")
    return grouped_zscore(rewards, groups).sum(dim=1).clamp(-clip, clip)


def per_reward_advantages(
    parts: dict[str, torch.Tensor], weights: dict[str, float], leaves: torch.Tensor, groups: torch.Tensor,
    reduce: str, clip: float,
) -> torch.Tensor:
    """``sum_k w_k z_k``, each reward k z-scored within the groups on its own, then clipped: a reward's
    scale no longer decides its share of the advantage (docs/method.md section 5, the optional variant)."""
    total = sum(
        weight * transition_advantages(parts[name], leaves, groups, reduce, float("inf"))
        for name, weight in weights.items()
        if weight
    )
    return total.clamp(-clip, clip)


def ppo_clip_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))`` with ``r = exp(log p - log p_old)``."""
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():  # tensors where the ratio is: the caller syncs them to the host once, when it must
        stats = {
            "ratio_mean": ratio.mean(),
            "ratio_max_dev": (ratio - 1).abs().max(),
            "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean(),
        }
    return loss, stats


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's KL between the policy's and the reference's Gaussian steps, averaged over dimensions:
    ``mean((mu - mu_ref)^2) / (2 std^2)``."""
    per_sample = ((mean - ref_mean) ** 2).flatten(1).mean(1)
    return (per_sample / (2.0 * std.to(per_sample.device) ** 2)).mean()


def kl_weight(schedule: str, start: float, end: float | None, iteration: int, iterations: int) -> float:
    """The KL weight at 0-based ``iteration`` of ``iterations``: ``start`` throughout ('constant'), or moving from
    ``start`` at the first iteration to ``end`` at the last, in a straight line ('linear') or along half a cosine
    ('cosine': flat at both ends, steepest midway). A pure function of the iteration, so a resumed run repeats it."""
    if schedule == "constant":
        return start
    if end is None:
        raise ValueError(f"kl schedule {schedule!r} needs an end weight")
    done = iteration / (iterations - 1) if iterations > 1 else 0.0  # a run of one iteration trains at its start
    if schedule == "linear":
        return start + (end - start) * done
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"unknown kl schedule {schedule!r}")


def uses_kl(schedule: str, start: float, end: float | None) -> bool:
    """Whether the KL weight is ever above 0, so the frozen reference is needed."""
    return start > 0 or (schedule != "constant" and end is not None and end > 0)
