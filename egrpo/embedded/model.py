"""The embedded policy: a tiny FluxTransformer2DModel in pixel space on 8x8 digits.

Like FLUX, the latent is a sequence of 2x2-packed patches (here 16 tokens of 4 channels), image
tokens carry (0, row, col) position ids, the text stream carries zero ids, and the pooled
sentence embedding enters through the pooled-projection path.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from egrpo.embedded import text
from egrpo.policy import Cond

IMAGE_SIZE = 8
PATCH = 2
TOKENS = (IMAGE_SIZE // PATCH) ** 2
CHANNELS = PATCH * PATCH


@dataclass(frozen=True)
class TinyFluxConfig:
    num_layers: int = 2
    num_single_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    max_tokens: int = 12  # prompt tokens fed to the text stream (the task's prompts fit in 12)


def build_transformer(config: TinyFluxConfig) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    head = config.attention_head_dim
    rope = (head - 2 * (3 * head // 8), 3 * head // 8, 3 * head // 8)  # sums to the head dim, as FLUX's (16, 56, 56)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=head,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=text.EMBED_DIM,
        pooled_projection_dim=text.EMBED_DIM,
        guidance_embeds=False,
        axes_dims_rope=rope,
    )


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, 8, 8) images in [0, 1] -> (B, 16, 4) latents in [-1, 1]."""
    b = images.shape[0]
    x = images * 2.0 - 1.0
    x = x.reshape(b, 1, IMAGE_SIZE // PATCH, PATCH, IMAGE_SIZE // PATCH, PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, TOKENS, CHANNELS)


def unpack(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack` (without the clamp)."""
    b = latents.shape[0]
    side = IMAGE_SIZE // PATCH
    x = latents.reshape(b, side, side, 1, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return (x.reshape(b, 1, IMAGE_SIZE, IMAGE_SIZE) + 1.0) / 2.0


def image_ids() -> torch.Tensor:
    side = IMAGE_SIZE // PATCH
    ids = torch.zeros(TOKENS, 3)
    ids[:, 1] = torch.arange(TOKENS) // side
    ids[:, 2] = torch.arange(TOKENS) % side
    return ids


class DigitsPolicy:
    """Policy adapter of the embedded task (see :class:`egrpo.policy.Policy`)."""

    latent_shape = (TOKENS, CHANNELS)

    def __init__(
        self, config: TinyFluxConfig | None = None, model: nn.Module | None = None, device: torch.device | str = "cpu"
    ):
        """``device``: where the network runs and latents live (a network built on the meta device stays there
        until FSDP fills its shards)."""
        self.config = config or TinyFluxConfig()
        self.device = torch.device(device)
        model = model if model is not None else build_transformer(self.config)
        self.model = model if any(p.is_meta for p in model.parameters()) else model.to(self.device)
        self._img_ids = image_ids().to(self.device)
        self._txt_ids = torch.zeros(self.config.max_tokens, 3, device=self.device)
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._reference: nn.Module | None = None

    def arch_config(self) -> dict:
        return {"kind": "embedded-digits-flux", **asdict(self.config)}

    def encode(self, prompts: Sequence[str]) -> Cond:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            enc = text.encode_prompts(missing, self.config.max_tokens)
            for i, p in enumerate(missing):
                self._prompt_cache[p] = (enc["text"][i], enc["pooled"][i])
        rows = [self._prompt_cache[p] for p in prompts]
        return {"text": torch.stack([r[0] for r in rows]), "pooled": torch.stack([r[1] for r in rows])}

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, reference: bool = False) -> torch.Tensor:
        if reference and self._reference is None:
            raise RuntimeError("velocity(reference=True) needs freeze_reference() first")
        net = self._reference if reference else self.model
        cond = {name: value.to(self.device) for name, value in cond.items()}  # encode() answers on the CPU
        return net(
            hidden_states=x,
            encoder_hidden_states=cond["text"],
            pooled_projections=cond["pooled"],
            timestep=sigma.to(self.device, x.dtype),
            img_ids=self._img_ids,
            txt_ids=self._txt_ids,
            return_dict=False,
        )[0]

    def completion_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.velocity(x, sigma, cond)  # a 1.9M-parameter network gains nothing from compilation

    def freeze_reference(self) -> None:
        self._reference = copy.deepcopy(self.model).eval().requires_grad_(False)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return unpack(latents.float()).clamp(0.0, 1.0)
