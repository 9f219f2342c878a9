"""Tasks: what a model kind brings to the trainer (its policy, default prompts, evaluation metrics).

Adding a model is one factory here plus its adapter module; the trainer never changes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from egrpo.config import Config
from egrpo.errors import ConfigError
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
    weight_files: list[Path] = field(default_factory=list)
    """Where the weights of a policy built on the meta device (``build_task(..., on_meta=True)``) are: safetensors
    files, a later one overriding an earlier one, or a sharded checkpoint directory (last). Empty otherwise."""


def read_prompt_file(path: str, what: str) -> list[str]:
    """One prompt a line; blank lines and lines starting with '#' are skipped, and a repeated prompt is kept
    once, with a warning (the trainer draws distinct prompts; and the FLUX / SD3 embedding lookup of the
    training set stays a view of the memory-mapped cache only when its rows are distinct)."""
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
    unique = list(dict.fromkeys(prompts))
    if len(unique) < len(prompts):
        first = next(p for i, p in enumerate(prompts) if p in prompts[:i])
        warnings.warn(
            f"{what}: prompt file {file} repeats {len(prompts) - len(unique)} line(s), e.g. {first!r}; "
            f"each prompt is used once ({len(unique)} distinct prompts)",
            stacklevel=2,
        )
    return unique


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


def _embedded(config: Config, on_meta: bool) -> Task:
    from egrpo.checkpoint import load_weights
    from egrpo.embedded import assets, digits

    files: list[Path] = []
    if on_meta:
        policy = assets.base_policy_on_meta()
        files = [assets.BASE_POLICY]
    else:
        policy = assets.load_base_policy()
    if config.model.checkpoint:
        path = weights_path(config.model.checkpoint)
        if on_meta:
            files.append(_checked_weights(path, policy))
        else:
            load_weights(path, policy.model, policy.arch_config())
    train = read_prompt_file(config.prompts.train, "prompts.train") if config.prompts.train else digits.train_prompts()
    held = read_prompt_file(config.prompts.eval, "prompts.eval") if config.prompts.eval else digits.heldout_prompts()
    for what, prompts in (("prompts.train", train), ("prompts.eval", held)):
        for p in prompts:
            try:
                digits.digit_of(p)
            except ValueError as exc:
                raise ConfigError(f"{what}: {exc}") from None
    return Task(policy=policy, train_prompts=train, eval_prompts=held, metrics=digits_metrics, weight_files=files)


def _checked_weights(path: Path, policy: Policy) -> Path:
    """``path`` after checking, from its header alone, that it fits the meta-built policy."""
    from egrpo.checkpoint import is_sharded
    from egrpo.sharding import check_weights_header

    if not is_sharded(path):  # a sharded checkpoint is checked when DCP reads it
        check_weights_header(path, policy.model, policy.arch_config())
    return path


def _pipeline_task(config: Config, load_policy: Callable, on_meta: bool) -> Task:
    """A diffusers pipeline (FLUX, SD3, Qwen-Image, Wan): prompt files and the embedding cache are checked before
    any weights load."""
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
    policy = load_policy(config.model, cache, on_meta=on_meta)
    files = policy.transformer_files() if on_meta else []
    if config.model.checkpoint:
        from egrpo.checkpoint import load_weights

        path = weights_path(config.model.checkpoint)
        if on_meta:
            files.append(_checked_weights(path, policy))
        else:
            load_weights(path, policy.model, policy.arch_config())
    return Task(policy=policy, train_prompts=train, eval_prompts=held, weight_files=files)


def _flux(config: Config, on_meta: bool) -> Task:
    from egrpo.models.flux import FluxPolicy

    return _pipeline_task(config, FluxPolicy.load, on_meta)


def _sd3(config: Config, on_meta: bool) -> Task:
    from egrpo.models.sd3 import SD3Policy

    return _pipeline_task(config, SD3Policy.load, on_meta)


def _qwen_image(config: Config, on_meta: bool) -> Task:
    from egrpo.models.qwen_image import QwenImagePolicy

    return _pipeline_task(config, QwenImagePolicy.load, on_meta)


def _wan(config: Config, on_meta: bool) -> Task:
    from egrpo.models.wan import WanPolicy, check_trained_steps

    check_trained_steps(config)
    return _pipeline_task(config, WanPolicy.load, on_meta)


TASKS: dict[str, Callable[[Config, bool], Task]] = {
    "embedded": _embedded, "flux": _flux, "sd3": _sd3, "qwen-image": _qwen_image, "wan": _wan,
}


def weights_path(checkpoint: str) -> Path:
    """A weights file, or a run directory (its final weights, else its latest checkpoint)."""
    path = Path(checkpoint)
    if path.is_dir():
        from egrpo.checkpoint import is_sharded, latest_checkpoint

        if (path / "model.safetensors").is_file():
            return path / "model.safetensors"
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest if is_sharded(latest) else latest / "model.safetensors"
        raise ConfigError(f"{path} holds neither model.safetensors nor a checkpoint")
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    return path


def build_task(config: Config, on_meta: bool = False) -> Task:
    """The task of ``config.model.kind``. ``on_meta``: build the policy's trained network on the meta device
    (no memory) and list where its weights are in ``Task.weight_files``, for FSDP to read shard by shard."""
    if config.model.kind not in TASKS:
        raise ConfigError(f"model.kind {config.model.kind!r} is not known; available: {', '.join(TASKS)}")
    return TASKS[config.model.kind](config, on_meta)
