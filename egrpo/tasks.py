"""Tasks: what a model kind brings to the trainer (its policy, default prompts, evaluation metrics).

Adding a model is one factory here plus its adapter module; the trainer never changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from egrpo.config import Config, ConfigError
from egrpo.policy import Policy

Metrics = Callable[[torch.Tensor, Sequence[str]], dict[str, float]]


@dataclass
class Task:
    policy: Policy
    train_prompts: list[str]
    eval_prompts: list[str]
    metrics: Metrics
    """Held-out metrics of a batch of images and their prompts (means over the batch)."""


def read_prompt_file(path: str, what: str) -> list[str]:
    """One prompt a line; blank lines and lines starting with '#' are skipped."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{what}: prompt file {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: prompt file {file} cannot be read as UTF-8 text ({exc})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"{what}: prompt file {file} holds no prompts (one prompt a line is expected)")
    return prompts


def digits_metrics(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    from egrpo.embedded.assets import load_reward_models
    from egrpo.embedded.digits import digits_of

    models = load_reward_models()
    target = digits_of(prompts)
    with torch.no_grad():
        probs = models.classifier(images).softmax(-1)
        judge = models.judge(images).argmax(-1)
        quality = models.density(images)
    return {
        "alignment": probs.gather(1, target[:, None]).mean().item(),
        "accuracy": (probs.argmax(-1) == target).float().mean().item(),
        "judge_accuracy": (judge == target).float().mean().item(),
        "quality": quality.mean().item(),
    }


def _embedded(config: Config) -> Task:
    from egrpo.checkpoint import load_weights
    from egrpo.embedded import assets, digits

    policy = assets.load_base_policy()
    if config.model.checkpoint:
        load_weights(weights_path(config.model.checkpoint), policy.model, policy.arch_config())
    train = read_prompt_file(config.prompts.train, "prompts.train") if config.prompts.train else digits.train_prompts()
    held = read_prompt_file(config.prompts.eval, "prompts.eval") if config.prompts.eval else digits.heldout_prompts()
    for what, prompts in (("prompts.train", train), ("prompts.eval", held)):
        for p in prompts:
            try:
                digits.digit_of(p)
            except ValueError as exc:
                raise ConfigError(f"{what}: {exc}") from None
    return Task(policy=policy, train_prompts=train, eval_prompts=held, metrics=digits_metrics)


TASKS: dict[str, Callable[[Config], Task]] = {"embedded": _embedded}


def weights_path(checkpoint: str) -> Path:
    """A weights file, or a run directory (its final weights, else its latest checkpoint)."""
    path = Path(checkpoint)
    if path.is_dir():
        from egrpo.checkpoint import latest_checkpoint

        if (path / "model.safetensors").is_file():
            return path / "model.safetensors"
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest / "model.safetensors"
        raise ConfigError(f"{path} holds neither model.safetensors nor a checkpoint")
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    return path


def build_task(config: Config) -> Task:
    if config.model.kind not in TASKS:
        raise ConfigError(f"model.kind {config.model.kind!r} is not known; available: {', '.join(TASKS)}")
    task = TASKS[config.model.kind](config)
    if config.train.prompts_per_iteration > len(task.train_prompts):
        raise ConfigError(
            f"train.prompts_per_iteration={config.train.prompts_per_iteration} exceeds the "
            f"{len(task.train_prompts)} training prompts"
        )
    return task
