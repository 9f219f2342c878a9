"""What the engine needs from a flow model: velocities, prompt conditioning, and images from latents.

The rollout engine and the trainer only talk to this protocol, so the embedded digits model and the
FLUX / SD3 / Qwen-Image / Wan adapters are interchangeable. Conditioning is a plain dict of tensors with a leading batch
dimension, so the engine can index and repeat it without knowing what is inside.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import nn

Cond = dict[str, torch.Tensor]


class Policy(Protocol):
    model: nn.Module
    """The trainable network; the trainer optimises its parameters and may wrap it (DDP, FSDP)."""

    latent_shape: tuple[int, ...]
    """Shape of one latent, without the batch dimension."""

    device: torch.device
    """Where latents and conditioning live; the engine draws noise on the CPU (reproducible) and moves it here."""

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Conditioning for a batch of prompts."""
        ...

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, reference: bool = False) -> torch.Tensor:
        """Predicted velocity ``eps - x0`` at latents ``x`` (B, ...) and flow times ``sigma`` (B,).

        ``reference=True`` asks for the frozen base model (the KL term): a full copy, or for LoRA the
        network with its adapters disabled. Gradients flow only through ``reference=False`` calls.
        """
        ...

    def completion_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """``velocity`` for the forwards whose output never enters a log-probability (ODE completions, untrained ODE
        steps, evaluation sampling): a policy may answer it faster and less exactly (``model.compile``). The forwards
        of trained transitions always go through ``velocity``, the path the update recomputes."""
        ...

    def freeze_reference(self) -> None:
        """Keep the current weights as the reference of ``velocity(..., reference=True)``; the trainer
        calls it once on the base model, before any update or resumed checkpoint is loaded."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] from final latents; a video model's K scored frames, (B, K, C, H, W)
        (rewards and pictures take either: egrpo.video)."""
        ...

    def arch_config(self) -> dict:
        """What identifies the architecture; stored with every checkpoint and checked on load."""
        ...


def select(cond: Cond, index: torch.Tensor) -> Cond:
    """Rows ``index`` of every tensor in ``cond``."""
    return {k: v[index] for k, v in cond.items()}
