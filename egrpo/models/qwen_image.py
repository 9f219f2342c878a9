"""Qwen-Image policy (``QwenImageTransformer2DModel`` + ``AutoencoderKLQwenImage`` pipelines) with true
classifier-free guidance, as diffusers' QwenImagePipeline runs them.

Latents: the VAE's (C, 1, h, w) video-shaped latent of one frame, packed into 2x2 patches as FLUX packs its own:
a sequence of (h/2 * w/2) tokens of 4C channels; the transformer learns its positions from ``img_shapes``, one
(frame, rows, cols) per sample. Text: the cache's Qwen2.5-VL embeddings, zero-padded, and their mask, which the
transformer turns into a key mask of its joint attention (so padding changes no image token). Timestep: sigma
itself (the transformer scales it by 1000, as the pipeline passes ``t / 1000``). Decoding undoes the VAE's
per-channel normalisation, ``z * std + mean``, and keeps the one frame.

Guidance, as QwenImagePipeline computes it when ``true_cfg_scale > 1`` and a negative prompt is given:
``v = c * |v_c| / |c|`` with ``c = v_n + g (v_c - v_n)``, the norms per token over its channels (the rescale
keeps the guided velocity at the conditional one's size). The prompt and the negative prompt run in ONE batched
call; the rollout and the update see the same guided velocity, so the first update's ratio stays exactly 1.
"""

from __future__ import annotations

import torch
from torch import nn

from egrpo.config import ModelConfig
from egrpo.errors import ConfigError
from egrpo.models.pipeline import PipelinePolicy
from egrpo.models.text_cache import EmbeddingCache
from egrpo.policy import Cond

DEFAULT_GUIDANCE = 4.0  # QwenImagePipeline's true_cfg_scale default, the authors' example and Flow-GRPO's setting


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """QwenImagePipeline's true CFG: ``v_n + g (v_c - v_n)`` rescaled per token to the norm of ``v_c``."""
    combined = v_uncond + scale * (v_cond - v_uncond)
    return combined * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


class QwenImagePolicy(PipelinePolicy):
    transformer_class = "QwenImageTransformer2DModel"
    vae_class = "AutoencoderKLQwenImage"
    kind = "qwen-image"

    def __init__(self, model: ModelConfig, transformer: nn.Module, vae: nn.Module, cache: EmbeddingCache):
        from diffusers import QwenImagePipeline

        super().__init__(model, transformer, vae, cache)
        config = self.transformer_config
        for flag in ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope"):
            if config.get(flag):
                raise ConfigError(
                    f"model.pretrained: its transformer sets {flag}, which QwenImagePipeline's text-to-image call "
                    "does not run (an edit or layered Qwen-Image variant); name a text-to-image Qwen-Image pipeline"
                )
        packed = config["in_channels"]
        if packed != 4 * vae.config.z_dim or config["patch_size"] != 2:
            raise ConfigError(
                f"model.pretrained: the transformer takes {packed} channels in {config['patch_size']}x"
                f"{config['patch_size']} patches, not 4 x the VAE's {vae.config.z_dim} latent channels in 2x2 patches"
            )
        factor = 2 * self.vae_scale_factor
        if model.height % factor or model.width % factor:
            raise ConfigError(
                f"model.height and model.width must be multiples of {factor} for Qwen-Image (VAE factor "
                f"{self.vae_scale_factor} x 2x2 packing), got {model.height} x {model.width}"
            )
        self.guidance = DEFAULT_GUIDANCE if model.guidance is None else model.guidance
        if self.guidance < 1.0:
            raise ConfigError(
                f"model.guidance must be >= 1 for Qwen-Image (QwenImagePipeline's true_cfg_scale; 1 = no negative "
                f"branch), got {model.guidance}"
            )
        rows, cols = model.height // factor, model.width // factor
        self.latent_shape = (rows * cols, packed)
        self._img_shape = (1, rows, cols)
        self._unpack = QwenImagePipeline._unpack_latents
        self._uncond = self.on_device(cache.unconditional()) if self.guidance > 1.0 else None
        self.choose_attention(rows * cols + cache.text_shape[0], masked=True)

    @classmethod
    def _build_computed_buffers(cls, transformer: nn.Module) -> None:
        # QwenEmbedRope keeps its RoPE tables as plain attributes (a buffer would lose the imaginary part of the
        # complex tensors, diffusers notes), so they are in no state dict: built on meta they would stay empty.
        rope = transformer.pos_embed
        transformer.pos_embed = type(rope)(theta=rope.theta, axes_dim=rope.axes_dim, scale_rope=rope.scale_rope)

    @staticmethod
    def _spatial_factor(vae: nn.Module) -> int:
        return 2 ** len(vae.config.temperal_downsample)  # as QwenImagePipeline: the spatial halvings

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, reference: bool = False) -> torch.Tensor:
        net, context = self.network(reference)
        cond = self.on_device(cond)
        x = x.to(self.device)
        timestep = sigma.to(self.device, torch.float32)
        if self._uncond is not None:
            x, timestep, cond = self.with_negative(x, timestep, cond)
        with context, self.autocast(), self.attention():
            out = net(
                hidden_states=x,
                timestep=timestep,
                encoder_hidden_states=cond["text"],
                encoder_hidden_states_mask=cond["text_mask"].bool(),
                img_shapes=[[self._img_shape]] * x.shape[0],
                return_dict=False,
            )[0].float()
        if self._uncond is None:
            return out
        v_uncond, v_cond = out.chunk(2)
        # The update moves the prompt-conditioned prediction only: through the negative branch (weight 1 - g = -3
        # at g = 4, before the rescale) the gradient would push the negative prompt's prediction against the reward.
        return guided_velocity(v_cond, v_uncond.detach(), self.guidance)

    def _vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self._unpack(latents, self.settings.height, self.settings.width, self.vae_scale_factor)

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(z.device, z.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(z.device, z.dtype)
        return self.vae.decode(z / inverse_std + mean, return_dict=False)[0][:, :, 0]  # the pipeline's arithmetic
