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
    metrics: Metrics | None = None
    """Held-out metrics of a batch of images and their prompts (means over the batch); None = the mean of
    each configured reward component, scored by the trainer's own reward models (loaded once)."""


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


def _pipeline_task(config: Config, load_policy: Callable) -> Task:
    """A diffusers pipeline (FLUX, SD3): prompt files and the embedding cache are checked before any weights load."""
    from egrpo.models.text_cache import EmbeddingCache

    kind = config.model.kind
    for what, path in (("prompts.train", config.prompts.train), ("prompts.eval", config.prompts.eval)):
        if not path:
            raise ConfigError(f"{what} is required for model.kind={kind!r}: a text file, one prompt a line")
    train = read_prompt_file(config.prompts.train, "prompts.train")
    held = read_prompt_file(config.prompts.eval, "prompts.eval")
    if not config.model.embedding_cache:
        raise ConfigError(
            f"model.embedding_cache is not set: model.kind={kind!r} reads prompt embeddings from a cache built once "
            f"with: egrpo preprocess CONFIG --prompts {config.prompts.train} --prompts {config.prompts.eval} "
            "--out CACHE.safetensors"
        )
    cache = EmbeddingCache(config.model.embedding_cache)
    for what, prompts in (("prompts.train", train), ("prompts.eval", held)):
        missing = cache.missing(prompts)
        if missing:
            raise ConfigError(
                f"{what}: {len(missing)} of {len(set(prompts))} prompts are not in the embedding cache {cache.path}, "
                f"e.g. {missing[0]!r}; rebuild it: egrpo preprocess CONFIG --prompts {config.prompts.train} "
                f"--prompts {config.prompts.eval} --out {cache.path}"
            )
    policy = load_policy(config.model, cache)
    if config.model.checkpoint:
        from egrpo.checkpoint import load_weights

        load_weights(weights_path(config.model.checkpoint), policy.model, policy.arch_config())
    return Task(policy=policy, train_prompts=train, eval_prompts=held)


def _flux(config: Config) -> Task:
    from egrpo.models.flux import FluxPolicy

    return _pipeline_task(config, FluxPolicy.load)


def _sd3(config: Config) -> Task:
    from egrpo.models.sd3 import SD3Policy

    return _pipeline_task(config, SD3Policy.load)


TASKS: dict[str, Callable[[Config], Task]] = {"embedded": _embedded, "flux": _flux, "sd3": _sd3}


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
    return task
