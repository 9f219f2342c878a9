"""The embedded task's shipped weights: the base policy and the reward networks (safetensors, in the package).

Both files are produced by ``egrpo pretrain`` (see :mod:`egrpo.embedded.pretrain`); the package
ships them so every user starts RL from the same base model and scores with the same rewards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open

from egrpo.embedded.model import DigitsPolicy, TinyFluxConfig, build_transformer
from egrpo.embedded.networks import DigitClassifier, DigitDensity

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
BASE_POLICY = ASSET_DIR / "digits_base.safetensors"
REWARD_MODELS = ASSET_DIR / "digits_rewards.safetensors"


@dataclass
class RewardModels:
    classifier: DigitClassifier
    judge: DigitClassifier
    density: DigitDensity


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall egrpo or rebuild it with `egrpo pretrain`")
    return path


def read_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _base_arch(path: Path) -> TinyFluxConfig:
    arch = json.loads(read_metadata(path)["arch"])
    arch.pop("kind", None)
    return TinyFluxConfig(**arch)


def load_base_policy(path: Path | None = None) -> DigitsPolicy:
    path = _require(Path(path) if path else BASE_POLICY)
    policy = DigitsPolicy(_base_arch(path))
    policy.model.load_state_dict(load_file(str(path)))
    return policy


def base_policy_on_meta() -> DigitsPolicy:
    """The base policy's architecture with its network on the meta device (no weights read): for FSDP,
    which shards it first and then reads each rank's rows of :data:`BASE_POLICY`."""
    arch = _base_arch(_require(BASE_POLICY))
    with torch.device("meta"):
        model = build_transformer(arch)
    return DigitsPolicy(arch, model=model)


@lru_cache(maxsize=None)
def load_reward_models(path: Path | None = None) -> RewardModels:
    tensors = load_file(str(_require(Path(path) if path else REWARD_MODELS)))
    parts = {}
    for name, module in (("classifier", DigitClassifier()), ("judge", DigitClassifier()), ("density", DigitDensity())):
        module.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
        parts[name] = module.eval().requires_grad_(False)
    return RewardModels(**parts)
