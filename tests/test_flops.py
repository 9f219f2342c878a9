"""egrpo.flops: torch's FLOP counter on the meta device against FLUX's closed form (attention included), the
backward as trained (LoRA, gradient checkpointing), and FLUX.1-dev's 37.3 TFLOP per latent at 720x720.

Tolerance of the closed form: none. At diffusers 0.42.1 it equals the counter's total to the FLOP on every config
here; a diffusers release that adds or reshapes a product fails these tests, which is what they are for."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from egrpo import flops

FLUX = "FluxTransformer2DModel"
# gpu_smoke's --tiny transformer (guidance-distilled, as FLUX.1-dev).
TINY = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, in_channels=16,
            joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6), guidance_embeds=True)
# Odd sizes everywhere: 3 heads of 8, more single than double blocks, out_channels != in_channels, no guidance.
ODD = dict(num_layers=2, num_single_layers=3, num_attention_heads=3, attention_head_dim=8, in_channels=8,
           out_channels=4, joint_attention_dim=20, pooled_projection_dim=12, axes_dims_rope=(2, 2, 4))
# FLUX.1-dev's published transformer/config.json.
FLUX_DEV = dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128, in_channels=64,
                joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56), guidance_embeds=True)


def forward_by_op(config: dict, side: int, text_tokens: int, batch: int = 1) -> dict[str, int]:
    """The counter's forward FLOPs of a FLUX transformer built on meta, by aten op."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**flops.transformer_inputs(FLUX, config, side, side, text_tokens, batch), return_dict=False)
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def image_tokens(side: int) -> int:
    return (side // 16) ** 2  # VAE factor 8, 2x2 packing


@pytest.mark.parametrize("config, side, text_tokens, batch", [(TINY, 32, 8, 1), (ODD, 48, 5, 3)], ids=["tiny", "odd"])
def test_flux_formula_equals_the_counter_and_attention_is_counted(config, side, text_tokens, batch):
    by_op = forward_by_op(config, side, text_tokens, batch)
    n = image_tokens(side)
    assert sum(by_op.values()) == flops.flux_forward_flops(config, n, text_tokens, batch)
    # SDPA on meta runs the math path: its Q K^T and P V are the only batched products.
    assert by_op["aten.bmm"] == flops.flux_attention_flops(config, n, text_tokens, batch) > 0
    assert flops.transformer_flops(FLUX, config, side, side, text_tokens, batch, backward=False).forward == sum(
        by_op.values())


def test_flux_dev_forward_is_37_3_tflop_per_latent_at_720():
    """FLUX.1-dev at 720x720: 2,025 image + 512 text tokens; on meta this takes a second or two."""
    by_op = forward_by_op(FLUX_DEV, 720, 512)
    total = sum(by_op.values())
    assert total == flops.flux_forward_flops(FLUX_DEV, 2025, 512) == 37_282_012_311_552
    assert by_op["aten.bmm"] == flops.flux_attention_flops(FLUX_DEV, 2025, 512)  # 4.51 TFLOP of it


def test_backward_as_trained_lora_and_checkpointing():
    def counted(**kw):
        return flops.transformer_flops(FLUX, TINY, 32, 32, 8, **kw)

    full, full_ckpt = counted(), counted(gradient_checkpointing=True)
    lora, lora_ckpt = counted(lora_rank=4), counted(lora_rank=4, gradient_checkpointing=True)
    blocks = full.forward - flops.flux_forward_flops(dict(TINY, num_layers=0, num_single_layers=0), 4, 8)
    lora_blocks = blocks + lora.forward - full.forward  # the adapters sit inside the blocks
    # Checkpointing adds exactly one more forward of the blocks (recomputed in the backward).
    assert full_ckpt.forward_backward - full.forward_backward == blocks
    assert lora_ckpt.forward_backward - lora.forward_backward == lora_blocks
    # Full fine-tuning: weight and input gradients, a backward of at most 2x the forward (the inputs need none).
    assert 2.5 * full.forward < full.forward_backward <= 3 * full.forward
    # LoRA: frozen weights get no gradient, so its backward is cheaper although its forward costs more.
    assert lora.forward > full.forward and lora.forward_backward < full.forward_backward
    # Every product scales with the batch.
    three = flops.transformer_flops(FLUX, TINY, 32, 32, 8, batch=3, lora_rank=4, gradient_checkpointing=True)
    assert (three.forward, three.forward_backward) == (3 * lora_ckpt.forward, 3 * lora_ckpt.forward_backward)


def test_sd3_counts_and_policy_flops_count_cfg_as_two_samples():
    sd3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
               joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
               pos_embed_max_size=16)
    one = flops.transformer_flops("SD3Transformer2DModel", sd3, 64, 64, 10, gradient_checkpointing=True)
    assert 0 < one.forward < one.forward_backward

    def policy(guidance):
        settings = SimpleNamespace(height=64, width=64, lora_rank=0, gradient_checkpointing=True)
        return SimpleNamespace(kind="sd3", true_cfg=guidance != 1.0, settings=settings, vae_scale_factor=8,
                               transformer_class="SD3Transformer2DModel", transformer_config=sd3,
                               cache=SimpleNamespace(text_shape=(10, 32)), latent_shape=(4, 8, 8))

    assert flops.policy_flops(policy(1.0)) == one
    guided = flops.policy_flops(policy(4.5))
    assert (guided.batch, guided.forward, guided.forward_backward) == (1, 2 * one.forward, 2 * one.forward_backward)
    with pytest.raises(ValueError, match="FLUX, SD3, Qwen-Image"):
        flops.transformer_inputs("UNet2DConditionModel", sd3, 64, 64, 10)
