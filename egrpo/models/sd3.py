"""SD3 / SD3.5 policy (``SD3Transformer2DModel`` pipelines) with true classifier-free guidance.

Latents are the VAE's own (C, h, w); the transformer patchifies them itself. As in Flow-GRPO, the
guided velocity ``v_uncond + g (v_cond - v_uncond)`` comes from ONE batched call over the prompt and
the empty prompt, and both the rollout and the update see the same guided velocity, so the first
update's ratio stays exactly 1.
"""

from __future__ import annotations

import torch
from torch import nn

from egrpo.config import ModelConfig
from egrpo.errors import ConfigError
from egrpo.models.pipeline import PipelinePolicy
from egrpo.models.text_cache import EmbeddingCache
from egrpo.policy import Cond

DEFAULT_GUIDANCE = 4.5  # Flow-GRPO's SD3.5 setting


class SD3Policy(PipelinePolicy):
    transformer_class = "SD3Transformer2DModel"
    kind = "sd3"

    def __init__(self, model: ModelConfig, transformer: nn.Module, vae: nn.Module, cache: EmbeddingCache):
        super().__init__(model, transformer, vae, cache)
        patch = self.transformer_config["patch_size"]
        factor = self.vae_scale_factor * patch
        if model.height % factor or model.width % factor:
            raise ConfigError(
                f"model.height and model.width must be multiples of {factor} for SD3 (VAE factor "
                f"{self.vae_scale_factor} x patch {patch}), got {model.height} x {model.width}"
            )
        most = self.transformer_config.get("pos_embed_max_size")
        if most is not None and max(model.height, model.width) // factor > most:
            raise ConfigError(
                f"model.height / model.width: at most {most * factor} pixels a side for this transformer "
                f"(pos_embed_max_size {most}), got {model.height} x {model.width}"
            )
        self.latent_shape = (
            self.transformer_config["in_channels"],
            model.height // self.vae_scale_factor,
            model.width // self.vae_scale_factor,
        )
        self.choose_attention((model.height // factor) * (model.width // factor) + cache.text_shape[0])
        self.guidance = DEFAULT_GUIDANCE if model.guidance is None else model.guidance
        self._uncond = self.on_device(cache.unconditional()) if self.guidance != 1.0 else None

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, reference: bool = False) -> torch.Tensor:
        net, context = self.network(reference)
        cond = self.on_device(cond)
        x = x.to(self.device)
        timestep = sigma.to(self.device, torch.float32) * 1000.0  # SD3 takes the scheduler's timestep, 1000 sigma
        if self._uncond is not None:
            x, timestep, cond = self.with_negative(x, timestep, cond)
        with context, self.autocast(), self.attention():
            out = net(
                hidden_states=x,
                timestep=timestep,
                encoder_hidden_states=cond["text"],
                pooled_projections=cond["pooled"],
                return_dict=False,
            )[0].float()
        if self._uncond is None:
            return out
        v_uncond, v_cond = out.chunk(2)
        # The update moves the prompt-conditioned prediction only: through the unconditional branch
        # (weight 1 - g = -3.5 at g = 4.5) the gradient would push the unconditional model against the reward.
        v_uncond = v_uncond.detach()
        return v_uncond + self.guidance * (v_cond - v_uncond)

    def _vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents
