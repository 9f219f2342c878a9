"""Rewards: a small protocol, a registry by name, and weighted combinations.

A reward scores a batch of images (B, C, H, W) in [0, 1] against their prompts and returns a
float tensor (B,). Videos (B, K, C, H, W) are scored as the mean over their K frames (:mod:`egrpo.video`),
so no reward needs to know about them. Adding one is one class plus one ``register`` line. ``http`` scores with a reward
served by another process or machine (``egrpo serve-reward``, :mod:`egrpo.rewards.remote`); ``http-LABEL``
is another one, so several served rewards can be weighed together.
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol, Sequence

import torch

from egrpo.errors import ConfigError


class Reward(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[..., Reward]] = {}
REMOTE_PREFIX = "http-"


def register(name: str, factory: Callable[..., Reward]) -> None:
    """``factory(**options)`` builds the reward; options come from the config (``reward.NAME.OPTION=value``)."""
    _REGISTRY[name] = factory


def available() -> list[str]:
    _register_builtin()
    return sorted(_REGISTRY)


def factory(name: str) -> Callable[..., Reward] | None:
    """What builds reward ``name``: its registered factory, or for ``http-LABEL`` the ``http`` reward's, so that
    several served rewards (``http-hps``, ``http-clip``) take their own weights, options and metric names."""
    _register_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(REMOTE_PREFIX) and len(name) > len(REMOTE_PREFIX):
        return _REGISTRY["http"]
    return None


def build(name: str, **options) -> Reward:
    make = factory(name)
    if make is None:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown reward {name!r}; available: {', '.join(sorted(_REGISTRY))}, or {REMOTE_PREFIX}LABEL for "
            f"another served reward.{hint}"
        )
    try:
        return make(**options)
    except TypeError as exc:
        raise ConfigError(f"reward {name!r}: bad options {sorted(options)} ({exc})") from None


class WeightedReward:
    """``sum_k w_k * reward_k``; each component is also returned so it can be logged on its own."""

    def __init__(self, specs: Mapping[str, tuple[float, dict]]):
        if not specs:
            raise ValueError("reward weights are empty: give at least one reward, e.g. {alignment: 1.0}")
        self.weights = {name: float(weight) for name, (weight, _) in specs.items()}
        self.components = {name: build(name, **options) for name, (_, options) in specs.items()}

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from egrpo.video import score_frames

        parts = {name: score_frames(fn, images, prompts).float() for name, fn in self.components.items()}
        total = sum(self.weights[name] * parts[name] for name in parts)
        return total, parts


def _register_builtin() -> None:
    if _REGISTRY:
        return
    from egrpo.rewards import compression, digits, remote

    register("alignment", digits.AlignmentReward)
    register("quality", digits.QualityReward)
    register("jpeg_compressibility", compression.JpegCompressibility)
    register("http", remote.HttpReward)

    # modules of the pretrained rewards import transformers and weights only when a reward is built
    from egrpo.rewards import clip_family, imagereward

    register("hps", clip_family.HPSReward)
    register("clip", clip_family.ClipScoreReward)
    register("pickscore", clip_family.PickScoreReward)
    register("imagereward", imagereward.ImageReward)
