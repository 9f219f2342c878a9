"""FLUX policy (FLUX.1-dev and any ``FluxTransformer2DModel`` pipeline).

Latents follow diffusers' FluxPipeline exactly: the VAE's (C, h, w) latent is packed into 2x2 patches,
a sequence of (h/2 * w/2) tokens of 4C channels, image tokens carry (0, row, col) position ids, text
tokens zero ids, and guidance-distilled transformers (FLUX.1-dev) take the embedded guidance scale.
"""

from __future__ import annotations

import torch
from torch import nn

from egrpo.config import ModelConfig
from egrpo.errors import ConfigError
from egrpo.models.pipeline import PipelinePolicy
from egrpo.models.text_cache import EmbeddingCache
from egrpo.policy import Cond

DEFAULT_GUIDANCE = 3.5


class FluxPolicy(PipelinePolicy):
    transformer_class = "FluxTransformer2DModel"
    kind = "flux"

    def __init__(self, model: ModelConfig, transformer: nn.Module, vae: nn.Module, cache: EmbeddingCache):
        from diffusers import FluxPipeline

        super().__init__(model, transformer, vae, cache)
        packed_channels = self.transformer_config["in_channels"]
        if packed_channels != 4 * vae.config.latent_channels:
            raise ConfigError(
                f"model.pretrained: the transformer takes {packed_channels} channels, not 4 x the VAE's "
                f"{vae.config.latent_channels} latent channels of a 2x2-packed FLUX latent"
            )
        factor = 2 * self.vae_scale_factor
        if model.height % factor or model.width % factor:
            raise ConfigError(
                f"model.height and model.width must be multiples of {factor} for FLUX (VAE factor "
                f"{self.vae_scale_factor} x 2x2 packing), got {model.height} x {model.width}"
            )
        rows, cols = model.height // factor, model.width // factor
        self.latent_shape = (rows * cols, packed_channels)
        self._unpack = FluxPipeline._unpack_latents
        self._img_ids = FluxPipeline._prepare_latent_image_ids(1, rows, cols, self.device, torch.float32)
        self._txt_ids = torch.zeros(cache.text_shape[0], 3, device=self.device)
        scale = DEFAULT_GUIDANCE if model.guidance is None else model.guidance
        self._guidance = scale if self.transformer_config.get("guidance_embeds") else None
        self.choose_attention(rows * cols + cache.text_shape[0])

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, reference: bool = False) -> torch.Tensor:
        net, context = self.network(reference)
        cond = self.on_device(cond)
        guidance = None
        if self._guidance is not None:
            guidance = torch.full((x.shape[0],), self._guidance, device=self.device)
        with context, self.autocast(), self.attention():
            v = net(
                hidden_states=x.to(self.device),
                timestep=sigma.to(self.device, torch.float32),  # FLUX takes sigma and scales it by 1000 itself
                guidance=guidance,
                pooled_projections=cond["pooled"],
                encoder_hidden_states=cond["text"],
                txt_ids=self._txt_ids,
                img_ids=self._img_ids,
                return_dict=False,
            )[0]
        return v.float()

    def _vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self._unpack(latents, self.settings.height, self.settings.width, self.vae_scale_factor)
