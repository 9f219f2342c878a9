"""Wan 2.1 / 2.2 text-to-video policy (``WanTransformer3DModel`` pipelines), following diffusers' WanPipeline.

A latent is the video VAE's own (C, F, h, w): F = (frames - 1) / 4 + 1 latent frames (the first frame alone, then
4 frames each), h and w an eighth of the frame; the transformer patchifies it itself and takes the scheduler's
timestep, 1000 sigma, and the umT5 sequence alone (no pooled embedding). Guidance is true classifier-free
guidance against ``model.negative_prompt``, from ONE batched call over both branches (as the SD3 policy), so the
rollout and the update see the same guided velocity and the first update's ratio stays exactly 1.

Decoding de-normalises the latent with the VAE's per-channel ``latents_mean`` / ``latents_std`` as WanPipeline
does, decodes the whole video, and keeps the ``model.reward_frames`` frames: ``decode`` answers (B, K, C, H, W).
Rewards score each kept frame as an image and average them (:func:`egrpo.video.score_frames`).

Wan 2.2 A14B has two experts: ``transformer`` denoises the high-noise part of the grid (timesteps at or above
``boundary_ratio`` x 1000), ``transformer_2`` the rest, with its own guidance scale. Here the high-noise expert is
trained and the low-noise one is frozen, in the compute dtype: E-GRPO trains the high-entropy steps, the first
half of the grid, and on Wan 2.2's own grid (shift 12, boundary 0.875) the first 11 of 16 steps are the
high-noise expert's; a plan training a step on the frozen expert's side is refused before any weight loads.
Training one expert also keeps the checkpoint, the export (``transformer/`` or a LoRA file that
``WanPipeline.load_lora_weights`` puts on ``transformer``) and FSDP's sharding those of one network.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from egrpo.config import Config, ModelConfig
from egrpo.devices import resolve_device
from egrpo.errors import ConfigError
from egrpo.models.pipeline import PipelinePolicy
from egrpo.models.text_cache import EmbeddingCache, compute_dtype, load_error, negative_prompt
from egrpo.policy import Cond

DEFAULT_GUIDANCE = 5.0  # WanPipeline's guidance_scale
NUM_TRAIN_TIMESTEPS = 1000  # the scheduler's; the transformer takes sigma x this, and the expert boundary is on it
# The self- and cross-attention projections of every block (Wan's blocks have no joint attention).
WAN_LORA_TARGETS = [
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
]


def frame_indices(model: ModelConfig) -> list[int]:
    """The frames ``model.reward_frames`` keeps: a count spread evenly from the first frame to the last, or a list."""
    frames, chosen = model.frames, model.reward_frames
    if isinstance(chosen, int):
        if not 1 <= chosen <= frames:
            raise ConfigError(
                f"model.reward_frames={chosen}: a count of frames must be in 1..model.frames ({frames}), "
                "or give a list of frame indices"
            )
        if chosen == 1:
            return [0]
        return [round(i * (frames - 1) / (chosen - 1)) for i in range(chosen)]
    if not chosen or not all(type(i) is int for i in chosen):
        raise ConfigError(f"model.reward_frames must be a count or a non-empty list of frame indices, got {chosen!r}")
    wrong = [i for i in chosen if not 0 <= i < frames]
    if wrong or len(set(chosen)) < len(chosen):
        raise ConfigError(
            f"model.reward_frames={chosen}: frame indices must be distinct and in 0..{frames - 1} "
            f"(model.frames={frames}), got {wrong or 'a repeat'}"
        )
    return list(chosen)


class WanPolicy(PipelinePolicy):
    transformer_class = "WanTransformer3DModel"
    vae_class = "AutoencoderKLWan"
    kind = "wan"
    default_lora_targets = WAN_LORA_TARGETS

    def __init__(
        self,
        model: ModelConfig,
        transformer: nn.Module,
        vae: nn.Module,
        cache: EmbeddingCache,
        transformer_2: nn.Module | None = None,
        boundary_ratio: float | None = None,
    ):
        self.check_settings(model)
        super().__init__(model, transformer, vae, cache)
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError("a second expert (transformer_2) comes with its boundary_ratio, and only with it")
        temporal = vae.config.scale_factor_temporal
        if (model.frames - 1) % temporal:
            raise ConfigError(
                f"model.frames must be {temporal}k + 1 for this Wan VAE (it keeps the first frame and folds each next "
                f"{temporal} into one latent frame), got {model.frames}: use e.g. "
                f"{(model.frames - 1) // temporal * temporal + 1}"
            )
        _, patch_h, patch_w = self.transformer_config["patch_size"]
        factor_h, factor_w = self.vae_scale_factor * patch_h, self.vae_scale_factor * patch_w
        if model.height % factor_h or model.width % factor_w:
            raise ConfigError(
                f"model.height and model.width must be multiples of {factor_h} for Wan (VAE factor "
                f"{self.vae_scale_factor} x patch {patch_h}), got {model.height} x {model.width}"
            )
        latent_frames = (model.frames - 1) // temporal + 1
        rows, cols = model.height // self.vae_scale_factor, model.width // self.vae_scale_factor
        self.latent_shape = (self.transformer_config["in_channels"], latent_frames, rows, cols)
        self.reward_frames = frame_indices(model)
        # Video tokens attend to each other; the text enters through cross-attention, a shorter sequence.
        patch_t = self.transformer_config["patch_size"][0]
        self.choose_attention(latent_frames // patch_t * (rows // patch_h) * (cols // patch_w))
        self.guidance = DEFAULT_GUIDANCE if model.guidance is None else model.guidance
        self.guidance_2 = self.guidance if model.guidance_2 is None else model.guidance_2
        if transformer_2 is None and model.guidance_2 is not None:
            raise ConfigError(
                f"model.guidance_2={model.guidance_2} is the low-noise expert's scale of Wan 2.2, but "
                f"{model.pretrained} has one transformer; drop model.guidance_2"
            )
        # WanPipeline guides only above 1 (do_classifier_free_guidance: guidance_scale > 1)
        guided = self.guidance > 1.0 or (transformer_2 is not None and self.guidance_2 > 1.0)
        self._uncond = self.on_device(cache.unconditional()) if guided else None
        self.boundary = None if boundary_ratio is None else boundary_ratio * NUM_TRAIN_TIMESTEPS
        self.transformer_2 = None
        if transformer_2 is not None:
            # loaded in the compute dtype (never trained: no fp32 master weights); moved, not cast, so the modules
            # diffusers keeps in fp32 (norms, time embedding) stay so
            self.transformer_2 = transformer_2.to(self.device).eval().requires_grad_(False)
        latents_mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
        latents_std = torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)
        self._latents_mean = latents_mean.to(self.device)
        self._latents_std_inverse = (1.0 / latents_std).to(self.device)  # as WanPipeline divides by 1 / std

    @classmethod
    def check_settings(cls, model: ModelConfig) -> None:
        if model.frames < 1:
            raise ConfigError(f"model.frames must be >= 1 (4k + 1 for Wan, e.g. 81), got {model.frames}")
        if model.guidance_2 is not None and model.guidance_2 <= 0:
            raise ConfigError(f"model.guidance_2 must be > 0, got {model.guidance_2}")
        frame_indices(model)

    @classmethod
    def _build_computed_buffers(cls, transformer: nn.Module) -> None:
        """The RoPE tables (non-persistent buffers, a few kB) computed on the CPU, as diffusers builds them."""
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

        config = transformer.config
        transformer.rope = WanRotaryPosEmbed(config.attention_head_dim, config.patch_size, config.rope_max_seq_len)

    @classmethod
    def _other_parts(cls, model: ModelConfig) -> dict:
        """Wan 2.2's low-noise expert and the boundary between the experts, from the pipeline's model_index.json."""
        ratio = expert_boundary(model)
        if ratio is None:
            return {}
        import diffusers

        dtype = compute_dtype(model, resolve_device(model.device))
        transformer_2 = diffusers.WanTransformer3DModel.from_pretrained(
            model.pretrained, subfolder="transformer_2", torch_dtype=dtype
        )
        return {"transformer_2": transformer_2, "boundary_ratio": ratio}

    def _check_cache(self, transformer: nn.Module) -> None:
        if self.cache.kind != self.kind:
            raise ConfigError(
                f"model.embedding_cache {self.cache.path} was built for model.kind={self.cache.kind!r}, "
                f"not {self.kind!r}"
            )
        width = transformer.config.text_dim
        if self.cache.text_shape[1] != width or self.cache.pooled_dim != 0:
            raise ConfigError(
                f"model.embedding_cache {self.cache.path} holds embeddings of width {self.cache.text_shape[1]} "
                f"(pooled {self.cache.pooled_dim}), but the Wan transformer takes umT5 sequences of width {width} "
                "and no pooled embedding: it was built from another model; rebuild it with egrpo preprocess"
            )
        negative = negative_prompt(self.settings)
        if self.cache.negative_prompt != negative:
            raise ConfigError(
                f"model.negative_prompt={negative!r}, but the embedding cache {self.cache.path} encoded "
                f"{self.cache.negative_prompt!r}: rebuild it with egrpo preprocess, or set model.negative_prompt to "
                "that text"
            )

    @staticmethod
    def _spatial_factor(vae: nn.Module) -> int:
        return vae.config.scale_factor_spatial

    def arch_config(self) -> dict:
        arch = super().arch_config()
        if self.transformer_2 is not None:
            arch["experts"] = {"trained": "transformer", "frozen": "transformer_2", "boundary": self.boundary}
        return arch

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, reference: bool = False) -> torch.Tensor:
        x = x.to(self.device)
        timestep = sigma.to(self.device, torch.float32) * NUM_TRAIN_TIMESTEPS  # the scheduler's timestep
        cond = self.on_device(cond)
        if self.transformer_2 is None:
            return self._guided(*self.network(reference), self.guidance, x, timestep, cond["text"])
        # WanPipeline: the high-noise expert at timesteps >= the boundary, the low-noise one below it
        high = timestep >= self.boundary
        if bool(high.all()):
            return self._guided(*self.network(reference), self.guidance, x, timestep, cond["text"])
        low = ~high
        if torch.is_grad_enabled() and not reference:
            raise ConfigError(
                "a trained step lies below Wan 2.2's expert boundary, on the frozen low-noise expert: nothing there "
                "can learn; train steps above it (plan.active_steps, the method's window or split steps)"
            )
        out = torch.empty(x.shape, dtype=torch.float32, device=self.device)
        with torch.no_grad():  # the frozen expert: its own reference, and nothing to train
            out[low] = self._guided(self.transformer_2, None, self.guidance_2, x[low], timestep[low],
                                    cond["text"][low])
        if bool(high.any()):
            v = self._guided(*self.network(reference), self.guidance, x[high], timestep[high], cond["text"][high])
            out = out.index_put((high.nonzero()[:, 0],), v)  # out of place, so the gradient reaches v
        return out

    def _guided(self, net: nn.Module, context, scale: float, x: torch.Tensor, timestep: torch.Tensor,
                text: torch.Tensor) -> torch.Tensor:
        guided = self._uncond is not None and scale > 1.0
        if guided:
            x, timestep, rows = self.with_negative(x, timestep, {"text": text})
            text = rows["text"]
        with context or contextlib.nullcontext(), self.autocast(), self.attention():
            out = net(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0].float()
        if not guided:
            return out
        v_uncond, v_cond = out.chunk(2)
        # The update moves the prompt-conditioned prediction only: through the unconditional branch (weight
        # 1 - g = -4 at g = 5) the gradient would push the negative-prompt model against the reward.
        v_uncond = v_uncond.detach()
        return v_uncond + scale * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The ``model.reward_frames`` frames of each video, (B, K, C, H, W) in [0, 1] on the CPU, in fp32."""
        keep = torch.tensor(self.reward_frames)
        videos = []
        for chunk in latents.split(self.settings.decode_batch):
            z = chunk.to(self.device, torch.float32) / self._latents_std_inverse + self._latents_mean
            with self.autocast():
                pixels = self.vae.decode(z, return_dict=False)[0]  # (B, C, frames, H, W)
            frames = pixels.float()[:, :, keep.to(pixels.device)].transpose(1, 2)
            videos.append((frames / 2 + 0.5).clamp(0.0, 1.0).cpu())  # VideoProcessor's denormalisation
        return torch.cat(videos).contiguous()


def expert_boundary(model: ModelConfig) -> float | None:
    """Wan 2.2's boundary_ratio, from the pipeline's model_index.json alone: the high-noise expert denoises at
    timesteps at or above it x 1000, the low-noise one below. None for a one-transformer pipeline (Wan 2.1)."""
    index = _model_index(model)
    if index.get("expand_timesteps"):
        raise ConfigError(
            f"model.pretrained={model.pretrained!r} is a Wan 2.2 TI2V pipeline (expand_timesteps: a timestep per "
            "token, for image-to-video conditioning); egrpo trains the text-to-video pipelines, Wan 2.1 T2V and "
            "Wan 2.2 T2V A14B"
        )
    if not index.get("transformer_2") or index["transformer_2"][0] is None:
        return None
    if index.get("boundary_ratio") is None:
        raise ConfigError(
            f"model.pretrained={model.pretrained!r}: a second expert (transformer_2) needs the pipeline's "
            "boundary_ratio, which its model_index.json does not give"
        )
    return index["boundary_ratio"]


def check_trained_steps(config: Config) -> None:
    """Refuse, before any weight loads, a plan that trains a step the frozen low-noise expert of Wan 2.2 denoises."""
    from egrpo.planner import make_plan, plan_kwargs

    ratio = expert_boundary(config.model)
    if ratio is None:
        return
    plan = make_plan(**plan_kwargs(config))
    timesteps = plan.sigmas.float() * NUM_TRAIN_TIMESTEPS  # as ``velocity`` compares them
    low = [i for i in plan.active_steps if timesteps[i] < ratio * NUM_TRAIN_TIMESTEPS]
    if low:
        raise ConfigError(
            f"plan.active_steps={config.plan.active_steps!r} trains steps {low} of the {config.sampling.num_steps}-"
            f"step grid, below Wan 2.2's expert boundary (sigma < {ratio:g}), where the "
            "low-noise expert denoises; egrpo trains the high-noise expert and keeps that one frozen: choose earlier "
            "steps (e.g. plan.active_steps=first-half) or a larger sampling.shift"
        )


def _model_index(model: ModelConfig) -> dict:
    """The pipeline's model_index.json (a local folder, or the hub snapshot's)."""
    path = Path(model.pretrained) / "model_index.json"
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(model.pretrained, "model_index.json"))
        except Exception as exc:  # the hub client raises many types: offline, gated, not found
            raise load_error(model, "model_index.json", exc) from None
    return json.loads(path.read_text())
