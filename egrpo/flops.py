"""FLOPs of a diffusers transformer (FLUX, SD3, Wan) per latent: counted by torch on the meta device; FLUX by formula.

The count runs the configured transformer on the ``meta`` device under ``torch.utils.flop_counter.FlopCounterMode``:
shapes only, no memory and no weights, seconds on a CPU for FLUX.1-dev. The counter adds up the matrix products
(``mm``, ``addmm``, ``bmm``, convolutions, SDPA's fused kernels), 2 FLOPs a multiply-add; norms, softmax, RoPE and
other elementwise ops are not counted. Attention is in it: on the meta device SDPA runs torch's math path, whose two
``bmm`` (Q K^T and P V) the counter sees (``tests/test_flops.py`` checks that term alone against ``4 S^2 d`` a block).
Its backward counts the four products of the math path (dQ, dK, dV, dP), 2x the forward, not the fifth product a
flash kernel's backward recomputes: these are model FLOPs, the same on every attention backend.

The backward is counted as well, as the update runs it: under LoRA the frozen weights get no gradient (only the
activations do: about 1x the forward, not 2x), and with gradient checkpointing each block's forward runs again in
the backward. Measured on FLUX.1-dev at 720x720 with 512 text tokens (37.28 TFLOP forward): forward + backward is
3.00x the forward in full fine-tuning, 4.00x with checkpointing; under LoRA rank 32 on egrpo's default targets
(forward 37.47 TFLOP: the adapters add 0.19) it is 2.12x, 3.12x with checkpointing (116.9 TFLOP).

Every product scales with the batch (the time-embedding products run per sample too), so one latent's count
times the batch is the batch's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

TIMESTEP_CHANNELS = 256  # diffusers' sinusoidal timestep (and guidance) features, before TimestepEmbedding


@dataclass(frozen=True)
class TransformerFlops:
    """FLOPs of one call of the transformer on ``batch`` samples."""

    forward: int
    forward_backward: int | None  # forward + backward as trained (None when not counted)
    batch: int
    gradient_checkpointing: bool
    lora_rank: int


def count(module: nn.Module, inputs: Mapping[str, torch.Tensor], backward: bool = False) -> tuple[int, int | None]:
    """FLOPs of a diffusers model's forward ``module(**inputs, return_dict=False)`` and, with ``backward``, of
    that forward plus the backward of the mean squared output (the loss adds no product). On meta tensors
    nothing is computed."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = module(**inputs, return_dict=False)[0]
        forward = counter.get_total_flops()
        if backward:
            out.float().square().mean().backward()
    return forward, counter.get_total_flops() if backward else None


def transformer_inputs(transformer_class: str, config: Mapping, height: int, width: int, text_tokens: int,
                       batch: int = 1, vae_scale_factor: int = 8, latent_frames: int = 1) -> dict[str, torch.Tensor]:
    """Meta tensors of the shapes a FLUX, SD3, Qwen-Image or Wan pipeline passes its transformer for ``height`` x
    ``width`` images: FLUX's and Qwen-Image's latents packed into 2x2 patches (one token each), SD3's latent as an
    image it patchifies, Wan's video latent of ``latent_frames`` frames, which it patchifies, with the umT5 sequence
    alone."""
    b = batch
    if transformer_class == "WanTransformer3DModel":
        latent = (config["in_channels"], latent_frames, height // vae_scale_factor, width // vae_scale_factor)
        with torch.device("meta"):
            return {"hidden_states": torch.zeros(b, *latent), "timestep": torch.zeros(b),
                    "encoder_hidden_states": torch.zeros(b, text_tokens, config["text_dim"])}
    text, pooled = config["joint_attention_dim"], config.get("pooled_projection_dim")
    with torch.device("meta"):
        inputs = {"timestep": torch.zeros(b), "encoder_hidden_states": torch.zeros(b, text_tokens, text)}
        if pooled is not None:
            inputs["pooled_projections"] = torch.zeros(b, pooled)
        if transformer_class == "FluxTransformer2DModel":
            tokens = (height // (2 * vae_scale_factor)) * (width // (2 * vae_scale_factor))
            inputs.update(hidden_states=torch.zeros(b, tokens, config["in_channels"]),
                          img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text_tokens, 3))
            if config.get("guidance_embeds"):
                inputs["guidance"] = torch.zeros(b)
        elif transformer_class == "SD3Transformer2DModel":
            latent = (config["in_channels"], height // vae_scale_factor, width // vae_scale_factor)
            inputs["hidden_states"] = torch.zeros(b, *latent)
        elif transformer_class == "QwenImageTransformer2DModel":  # FLUX's packing; a text mask, no pooled text
            rows, cols = height // (2 * vae_scale_factor), width // (2 * vae_scale_factor)
            inputs.update(hidden_states=torch.zeros(b, rows * cols, config["in_channels"]),
                          encoder_hidden_states_mask=torch.ones(b, text_tokens, dtype=torch.bool),
                          img_shapes=[[(1, rows, cols)]] * b)
        else:
            raise ValueError(f"no inputs known for {transformer_class}: FLUX, SD3, Qwen-Image (images) and Wan "
                             "(videos) only")
    return inputs


def transformer_flops(transformer_class: str, config: Mapping, height: int, width: int, text_tokens: int,
                      batch: int = 1, vae_scale_factor: int = 8, lora_rank: int = 0,
                      lora_targets: Sequence[str] | None = None, gradient_checkpointing: bool = False,
                      backward: bool = True, latent_frames: int = 1) -> TransformerFlops:
    """The transformer ``transformer_class`` (a diffusers class name) built from ``config`` on the meta device,
    with LoRA adapters of ``lora_rank`` on ``lora_targets`` (egrpo's defaults when None) or every weight trained,
    counted on one call of ``batch`` samples: forward, and with ``backward`` forward + backward as trained."""
    import diffusers

    from egrpo.models.pipeline import DEFAULT_LORA_TARGETS, with_lora

    with torch.device("meta"):
        model = getattr(diffusers, transformer_class).from_config(dict(config))
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if lora_rank > 0:
        model.requires_grad_(False)
        model = with_lora(model, lora_rank, 1.0, list(lora_targets or DEFAULT_LORA_TARGETS))  # alpha only scales
    model.train(backward)
    inputs = transformer_inputs(transformer_class, config, height, width, text_tokens, batch, vae_scale_factor,
                                latent_frames)
    with contextlib.nullcontext() if backward else torch.no_grad():
        forward, both = count(model, inputs, backward)
    return TransformerFlops(forward, both, batch, gradient_checkpointing, lora_rank)


def policy_flops(policy, backward: bool = True) -> TransformerFlops:
    """FLOPs per latent of a pipeline policy's ``velocity`` (``batch`` 1), as configured: resolution (and Wan's
    frames), the embedding cache's text length, LoRA, gradient checkpointing. Under true classifier-free guidance
    (SD3, Qwen-Image, Wan) the transformer runs on two samples a latent (the prompt and the negative prompt), so the
    count is of batch 2."""
    settings = policy.settings
    samples = 2 if policy.true_cfg else 1
    latent_frames = policy.latent_shape[1] if policy.transformer_class == "WanTransformer3DModel" else 1
    counted = transformer_flops(
        policy.transformer_class, policy.transformer_config, settings.height, settings.width,
        policy.cache.text_shape[0], samples, policy.vae_scale_factor, settings.lora_rank,
        getattr(policy, "lora_targets", None), settings.gradient_checkpointing, backward, latent_frames,
    )
    return TransformerFlops(counted.forward, counted.forward_backward, 1, counted.gradient_checkpointing,
                            counted.lora_rank)


def flux_forward_flops(config: Mapping, image_tokens: int, text_tokens: int, batch: int = 1) -> int:
    """FLOPs of one forward of ``FluxTransformer2DModel(**config)`` (no LoRA), in closed form.

    With width ``d = heads x head_dim``, ``N`` image and ``T`` text tokens, ``S = N + T``, 4x MLPs, and 2 FLOPs a
    multiply-add, per sample:

    - each of the ``num_layers`` double blocks: ``24 S d^2`` (q, k, v, out of both streams: ``8 S d^2``; both MLPs:
      ``16 S d^2``) + ``4 S^2 d`` (Q K^T and P V) + ``24 d^2`` (the two AdaLN-Zero modulations, 6d outputs each);
    - each of the ``num_single_layers`` single blocks: ``24 S d^2`` (q, k, v: ``6 S d^2``; MLP in: ``8 S d^2``; the
      joint output projection from 5d: ``10 S d^2``) + ``4 S^2 d`` + ``6 d^2`` (a 3d modulation);
    - embeddings: image in ``2 N c_in d``, text in ``2 T c_text d``, timestep ``2 (256 d + d^2)`` (again for the
      guidance if ``guidance_embeds``), pooled text ``2 (c_pooled d + d^2)``;
    - output: ``4 d^2`` (the final modulation) + ``2 N d c_out`` (``c_out = patch^2 x out_channels``).
    """
    d = config.get("num_attention_heads", 24) * config.get("attention_head_dim", 128)
    n, t = image_tokens, text_tokens
    s = n + t
    c_in = config.get("in_channels", 64)
    c_out = config.get("patch_size", 1) ** 2 * (config.get("out_channels") or c_in)
    blocks = config.get("num_layers", 19) + config.get("num_single_layers", 38)
    per_token = blocks * (24 * s * d * d + 4 * s * s * d)
    modulation = config.get("num_layers", 19) * 24 * d * d + config.get("num_single_layers", 38) * 6 * d * d + 4 * d * d
    timesteps = 2 if config.get("guidance_embeds", False) else 1
    embeddings = (
        2 * n * c_in * d + 2 * t * config.get("joint_attention_dim", 4096) * d
        + timesteps * 2 * (TIMESTEP_CHANNELS * d + d * d)
        + 2 * (config.get("pooled_projection_dim", 768) * d + d * d)
    )
    return batch * (per_token + modulation + embeddings + 2 * n * d * c_out)


def flux_attention_flops(config: Mapping, image_tokens: int, text_tokens: int, batch: int = 1) -> int:
    """The attention products alone (Q K^T and P V of every block): ``blocks x 4 S^2 d`` a sample."""
    d = config.get("num_attention_heads", 24) * config.get("attention_head_dim", 128)
    s = image_tokens + text_tokens
    blocks = config.get("num_layers", 19) + config.get("num_single_layers", 38)
    return batch * blocks * 4 * s * s * d
