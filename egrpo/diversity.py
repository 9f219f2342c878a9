"""How different the samples of one prompt are, in an image encoder's feature space.

RL on a reward narrows what a prompt's samples look like; pixel distances miss it on real images (two
photos of different dogs are far apart in pixels, two crops of one dog too). Two measures of the S samples
of each prompt, from L2-normalised image features:

- mean pairwise cosine distance, ``1 - mean_{i != j} cos(f_i, f_j)``: 0 when all samples are alike;
- the Vendi score (Friedman and Dieng, 2023), ``exp(-sum_k lambda_k log lambda_k)`` over the eigenvalues of the
  samples' cosine-similarity matrix divided by S: the effective number of distinct samples, from 1 (all alike)
  to S (all orthogonal).

The features come from the CLIP image tower of a configured clip-family reward (clip, pickscore or hps) on
real models, and from the independent judge classifier's last hidden layer on the embedded digits task.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from egrpo.errors import ConfigError

Encoder = Callable[[torch.Tensor], torch.Tensor]
CLIP_FAMILY = ("clip", "pickscore", "hps")


def pairwise_cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """(P, S, D) features of S samples of P prompts -> (P,) mean cosine distance between a prompt's samples."""
    f = F.normalize(features.double(), dim=-1)
    s = f.shape[1]
    if s < 2:
        return torch.zeros(f.shape[0], dtype=torch.float64)
    similarity = f @ f.transpose(1, 2)
    off_diagonal = similarity.sum((1, 2)) - similarity.diagonal(dim1=1, dim2=2).sum(1)
    return 1.0 - off_diagonal / (s * (s - 1))


def vendi_score(features: torch.Tensor) -> torch.Tensor:
    """(P, S, D) -> (P,) Vendi score of each prompt's samples (cosine-similarity kernel)."""
    f = F.normalize(features.double(), dim=-1)
    kernel = f @ f.transpose(1, 2) / f.shape[1]  # trace 1: the eigenvalues are a distribution
    eigenvalues = torch.linalg.eigvalsh(kernel).clamp(min=0.0)
    entropy = -torch.special.xlogy(eigenvalues, eigenvalues).sum(-1)
    return entropy.exp()


def encoder(setting: str, components: dict, kind: str) -> tuple[str, Encoder] | None:
    """(name, features of images) of ``eval.diversity_encoder`` (``components``: the run's built rewards by name);
    None when there is none to use ('none', or 'auto' with no clip-family reward on a real model). A video's
    features are the mean of its frames'."""
    if setting == "none":
        return None
    if kind == "embedded" and setting == "auto":
        from egrpo.embedded.assets import load_reward_models

        judge = load_reward_models().judge
        return "judge", lambda images: judge.features(images.to(next(judge.parameters()).device))
    from egrpo.video import frames_mean

    if setting == "auto":
        name = next((n for n in CLIP_FAMILY if n in components), None)
        return (name, frames_mean(components[name].image_features)) if name else None
    if setting not in CLIP_FAMILY:
        raise ConfigError(f"eval.diversity_encoder must be auto, none or one of {', '.join(CLIP_FAMILY)}, got "
                          f"{setting!r}")
    if setting not in components:
        raise ConfigError(f"eval.diversity_encoder={setting}: the run has no {setting} reward; add it with weight 0 "
                          f"(reward.{setting}.weight=0 and its checkpoint) to use its image tower")
    return setting, frames_mean(components[setting].image_features)


def novelty(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(N,) mean cosine distance of each sample's features (N, D) to the other samples of its prompt (``rows``,
    (N,) prompt indices); 0 for a prompt's only sample."""
    f = F.normalize(features.double(), dim=-1)
    same = rows[:, None] == rows[None, :]
    others = same.sum(1) - 1
    distance = ((1.0 - f @ f.T) * same).sum(1)
    return torch.where(others > 0, distance / others.clamp(min=1), torch.zeros_like(distance)).float()


def measure(features: torch.Tensor, prompts: list[str], seeds: int) -> tuple[dict[str, float], dict[str, dict]]:
    """Overall means and per-prompt values of both measures, from (P * seeds, D) features in prompt order."""
    grouped = features.reshape(len(prompts) // seeds, seeds, -1)
    distance, vendi = pairwise_cosine_distance(grouped), vendi_score(grouped)
    per_prompt = {
        prompts[i * seeds]: {"embedding_diversity": float(distance[i]), "vendi": float(vendi[i])}
        for i in range(grouped.shape[0])
    }
    return {"embedding_diversity": float(distance.mean()), "vendi": float(vendi.mean())}, per_prompt
