"""The GRPO objective (method.md sections 5-6): group-normalised advantages and the PPO-clip loss."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, clip: float, eps: float = 1e-8) -> torch.Tensor:
    """Z-score within each group along the last dimension, ``(R - mean) / (std + eps)``, clipped to [-clip, clip].

    ``rewards`` is (..., G): e.g. (P, K, G), one group per (prompt, merged step).
    """
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, unbiased=False)
    return ((rewards - mean) / (std + eps)).clamp(-clip, clip)


def ppo_clip_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))`` with ``r = exp(log p - log p_old)``."""
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "ratio_mean": ratio.mean().item(),
            "ratio_max_dev": (ratio - 1).abs().max().item(),
            "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean().item(),
        }
    return loss, stats


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's KL between the policy's and the reference's Gaussian steps, averaged over dimensions:
    ``mean((mu - mu_ref)^2) / (2 std^2)``."""
    per_sample = ((mean - ref_mean) ** 2).flatten(1).mean(1)
    return (per_sample / (2.0 * std**2)).mean()
