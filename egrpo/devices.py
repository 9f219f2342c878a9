"""Where a network runs: one rule for the policy and every reward model."""

from __future__ import annotations

import os

import torch

from egrpo.errors import ConfigError


def resolve_device(name: str | None, key: str = "model.device") -> torch.device:
    """The device config ``key`` names; None picks a GPU when there is one. A GPU without an index is this
    process's: torchrun's LOCAL_RANK, since models load before the trainer joins the process group."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}: {name!r} is not a device (e.g. 'cuda', 'cuda:1', 'cpu')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r}, but torch sees no CUDA device (set {key}=cpu)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
