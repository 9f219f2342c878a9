"""Held-out evaluation: the trainer's (``Evaluation``, every ``eval.every`` iterations) and ``egrpo eval``'s
(checkpoints side by side, as JSON and a markdown table), from the same fixed prompts and per-sample noises.

Every checkpoint sees the same prompts and the same initial noises (seeded per prompt and sample,
as the trainer's evaluation), so rows of the table differ only by the weights. The embedded task
adds two sample statistics: the Fréchet distance between generated and real digits in pixel space
(a small-image analogue of FID) and the diversity among the samples of one prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from egrpo import config as cfg
from egrpo.diversity import encoder as diversity_encoder
from egrpo.diversity import measure
from egrpo.planner import make_plan
from egrpo.policy import Cond, select
from egrpo.rewards import WeightedReward
from egrpo.rollout import network_batch, sample_images
from egrpo.tasks import Task, build_task

BASE = "base"  # names the task's shipped base model instead of a checkpoint


@dataclass
class Evaluation:
    """Fixed held-out prompts and noises, so base and trained models see exactly the same inputs.

    Samples are dealt out to ranks in turn: this rank holds samples ``rows`` of ``prompts`` (all of them in
    one process) and only their noises and embeddings."""

    prompts: list[str]
    rows: list[int]
    noise: torch.Tensor
    cond: Cond = field(repr=False, default=None)


def make_evaluation(task: Task, config: cfg.Config, rank: int = 0, world_size: int = 1) -> Evaluation:
    seeds = config.eval.seeds_per_prompt
    prompts = [p for p in task.eval_prompts for _ in range(seeds)]
    rows = list(range(rank, len(prompts), world_size))
    noise = [
        torch.randn(task.policy.latent_shape, generator=torch.Generator().manual_seed(config.eval.seed + 7919 * j + s))
        for j in range(len(task.eval_prompts))
        for s in range(seeds)
    ]
    noise = torch.stack([noise[r] for r in rows]) if rows else torch.empty(0, *task.policy.latent_shape)
    cond = task.policy.encode([prompts[r] for r in rows]) if rows else None
    return Evaluation(prompts=prompts, rows=rows, noise=noise.to(task.policy.device), cond=cond)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of flattened samples (rows)."""
    from scipy import linalg

    x, y = a.flatten(1).double().numpy(), b.flatten(1).double().numpy()
    mu_x, mu_y = x.mean(0), y.mean(0)
    # A small ridge keeps the product's square root defined: some pixels (the digits' corners) never vary.
    ridge = 1e-6 * np.eye(x.shape[1])
    cov_x, cov_y = np.cov(x, rowvar=False) + ridge, np.cov(y, rowvar=False) + ridge
    root = linalg.sqrtm(cov_x @ cov_y)
    trace = np.trace(cov_x + cov_y - 2.0 * np.real(root))
    return float(((mu_x - mu_y) ** 2).sum() + trace)


def diversity(images: torch.Tensor, seeds: int) -> float:
    """Mean pairwise L2 distance between the ``seeds`` consecutive samples of each prompt."""
    groups = images.flatten(1).reshape(-1, seeds, images[0].numel())
    dists = torch.cdist(groups, groups)
    pairs = seeds * (seeds - 1)
    return float(dists.sum() / (groups.shape[0] * pairs)) if pairs else 0.0


@dataclass
class Generated:
    """One checkpoint's held-out samples: the same prompts and initial noises for every checkpoint."""

    config: cfg.Config
    task: Task
    prompts: list[str]
    images: torch.Tensor


def same_samples(a: Generated, b: Generated) -> bool:
    """Whether two checkpoints were sampled from the same prompts and initial noises (so pairs compare)."""
    return (a.prompts == b.prompts and a.config.eval.seed == b.config.eval.seed
            and a.images.shape == b.images.shape)


def reference_run(checkpoints: Sequence[str]) -> str | None:
    """The first run directory among ``checkpoints``: 'base' takes its config (model, sampling, prompts)."""
    return next((c for c in checkpoints if (Path(c) / "config.yaml").is_file()), None)


def run_of(checkpoint: str) -> Path | None:
    """The run directory a checkpoint belongs to: itself, or the run holding a weights file or checkpoint
    (``RUN/model.safetensors``, ``RUN/checkpoints/iter-N[/model.safetensors]``); None for 'base' or a loose file."""
    path = Path(checkpoint)
    if checkpoint == BASE:
        return None
    for folder in [path, *path.parents][:4]:
        if (folder / "config.yaml").is_file():
            return folder
    return None


def load_config(checkpoint: str, overrides: Sequence[str] = (), reference: str | None = None) -> cfg.Config:
    """The config of the run ``checkpoint`` belongs to, with ``model.checkpoint`` pointing at it. 'base' and
    loose weights files take the ``reference`` run's config (so FLUX's base is compared with FLUX runs), else
    the embedded default."""
    run = run_of(checkpoint) or reference
    config = cfg.load(str(Path(run) / "config.yaml") if run else "embedded", list(overrides))
    config.model.checkpoint = None if checkpoint == BASE else checkpoint
    return config


def generate(
    checkpoint: str, overrides: Sequence[str] = (), reference: str | None = None, limit: int | None = None
) -> Generated:
    """ODE samples of the held-out prompts, ``eval.seeds_per_prompt`` fixed seeds each (only the first
    ``limit`` (prompt, seed) pairs when given: a figure's few rows need not sample 400 FLUX prompts)."""
    config = load_config(checkpoint, overrides, reference)
    task = build_task(config)
    ev = make_evaluation(task, config)
    rows = torch.arange(len(ev.prompts) if limit is None else min(limit, len(ev.prompts)))
    plan = make_plan(**cfg.plan_kwargs(config))
    task.policy.model.eval()
    batch = network_batch(config.train.max_batch)
    images = sample_images(task.policy, select(ev.cond, rows), ev.noise[rows], plan.sigmas, batch)
    return Generated(config=config, task=task, prompts=ev.prompts[: len(rows)], images=images)


def evaluate(
    checkpoint: str, overrides: Sequence[str] = (), reference: str | None = None,
    rewards: dict[str, WeightedReward] | None = None,
) -> dict[str, float]:
    """Held-out metrics of one checkpoint (a run directory, a weights file, or 'base').

    ``rewards`` caches reward models by their config across calls: HPS or ImageReward load once for a
    whole table, not once per checkpoint.
    """
    gen = generate(checkpoint, overrides, reference)
    config, images = gen.config, gen.images
    specs = cfg.reward_specs(config)
    key = json.dumps(specs, sort_keys=True, default=str)
    cache = {} if rewards is None else rewards
    if key not in cache:
        cache[key] = WeightedReward(specs)
    total, parts = cache[key].score(images, gen.prompts)
    metrics = {name: values.mean().item() for name, values in parts.items()}
    if gen.task.metrics is not None:
        metrics.update(gen.task.metrics(images, gen.prompts))
    metrics["reward"] = total.mean().item()
    metrics["diversity"] = diversity(images, config.eval.seeds_per_prompt)
    chosen = diversity_encoder(config.eval.diversity_encoder, cache[key].components, config.model.kind)
    if chosen is not None:
        name, encode = chosen
        overall, per_prompt = measure(encode(images), gen.prompts, config.eval.seeds_per_prompt)
        metrics.update(overall)
        metrics["per_prompt"] = per_prompt
        metrics["diversity_encoder"] = name
    if config.model.kind == "embedded":
        from egrpo.embedded.digits import load_digits

        metrics["frechet_distance"] = frechet_distance(images, load_digits()[0])
    return metrics


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """One row per checkpoint, one column per metric (the paper's Table 1 layout)."""
    columns = list(dict.fromkeys(k for metrics in rows.values() for k, v in metrics.items() if _is_number(v)))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:.3f}" if c in metrics else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(
    checkpoints: Sequence[str], overrides: Sequence[str], out: Path, labels: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """Evaluate every checkpoint; rows are named by ``labels`` (default: the checkpoint as given)."""
    if labels and len(labels) != len(checkpoints):
        raise cfg.ConfigError(f"--labels: {len(labels)} labels for {len(checkpoints)} checkpoints")
    reference = reference_run(checkpoints)
    rewards: dict[str, WeightedReward] = {}
    rows = {
        label: evaluate(name, overrides, reference, rewards) for name, label in zip(checkpoints, labels or checkpoints)
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(rows, indent=2))
    (out / "eval.md").write_text(markdown_table(rows))
    per_prompt = per_prompt_table(rows)
    if per_prompt:
        (out / "eval_per_prompt.md").write_text(per_prompt)
    return rows


def per_prompt_table(rows: dict[str, dict]) -> str:
    """Embedding diversity and Vendi score per held-out prompt, a column pair per checkpoint ('' without them)."""
    labels = [label for label, metrics in rows.items() if "per_prompt" in metrics]
    if not labels:
        return ""
    encoder_names = sorted({rows[label]["diversity_encoder"] for label in labels})
    prompts = list(rows[labels[0]]["per_prompt"])
    header = "| prompt | " + " | ".join(f"{label}: diversity | {label}: Vendi" for label in labels) + " |"
    lines = [f"Per prompt, in the image features of {', '.join(encoder_names)}:", "", header,
             "|---" * (2 * len(labels) + 1) + "|"]
    for prompt in prompts:
        cells = []
        for label in labels:
            values = rows[label]["per_prompt"].get(prompt, {})
            cells += [f"{values[k]:.3f}" if k in values else "-" for k in ("embedding_diversity", "vendi")]
        lines.append(f"| {prompt} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
