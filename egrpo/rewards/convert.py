"""Key converters from the published reward checkpoints to transformers' module names.

- ``open_clip_to_clip``: an open_clip ViT CLIP state dict (HPSv2.1's ``HPS_v2.1_compressed.pt``) ->
  ``transformers.CLIPModel``.
- ``imagereward_to_blip``: ImageReward's ``ImageReward.pt`` (BLIP ViT + BERT with cross-attention + MLP
  head) -> ``egrpo.rewards.imagereward.ImageRewardModel`` (``BlipVisionModel`` + ``BlipTextModel`` + head).

Sizes are read from tensor shapes. Head counts are not stored in a checkpoint, so they come from the
head width of the published architecture (open_clip ViT-H-14: 80 in the image tower, 64 in the text
tower; BLIP ViT-L and BERT-base: 64).
"""

from __future__ import annotations

import functools
import math
import re

OPEN_CLIP_VISION_HEAD_WIDTH = 80
OPEN_CLIP_TEXT_HEAD_WIDTH = 64
BLIP_HEAD_WIDTH = 64


class CheckpointLayoutError(ValueError):
    """The state dict is not laid out like the published checkpoint the converter reads."""


def _layout(what: str):
    """A missing or unexpected key means the file is not the checkpoint the converter reads: say so."""

    def wrap(convert):
        @functools.wraps(convert)
        def checked(*args, **kwargs):
            try:
                return convert(*args, **kwargs)
            except KeyError as exc:
                raise CheckpointLayoutError(f"not {what}: key {exc.args[0]!r} is missing") from None
            except CheckpointLayoutError as exc:
                raise CheckpointLayoutError(f"not {what}: {exc}") from None

        return checked

    return wrap


def _heads(width: int, head_width: int, tower: str) -> int:
    if width % head_width:
        raise CheckpointLayoutError(f"{tower} width {width} is not a multiple of the head width {head_width}")
    return width // head_width


def _num_layers(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if not found:
        raise CheckpointLayoutError(f"no layers under {prefix!r}")
    return max(found) + 1


def _check_all_used(sd: dict, used: set, prefixes: tuple[str, ...] = ("",)) -> None:
    unknown = sorted(k for k in set(sd) - used if k.startswith(prefixes))
    if unknown:
        raise CheckpointLayoutError(f"unexpected keys {unknown[:5]}")


# open_clip -> CLIPModel ------------------------------------------------------------------------------------

_OPEN_CLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _open_clip_blocks(sd: dict, src: str, dst: str, out: dict, used: set) -> int:
    layers = _num_layers(sd, src)
    for i in range(layers):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for p in ("weight", "bias"):
            for a, b in _OPEN_CLIP_BLOCK.items():
                out[f"{d}{b}.{p}"] = sd[f"{s}{a}.{p}"]
                used.add(f"{s}{a}.{p}")
            # nn.MultiheadAttention packs q, k and v into one projection, in that order
            q, k, v = sd[f"{s}attn.in_proj_{p}"].chunk(3, dim=0)
            out[f"{d}self_attn.q_proj.{p}"], out[f"{d}self_attn.k_proj.{p}"], out[f"{d}self_attn.v_proj.{p}"] = q, k, v
            used.add(f"{s}attn.in_proj_{p}")
    return layers


@_layout("an open_clip ViT CLIP checkpoint")
def open_clip_to_clip(sd: dict):
    """(CLIPConfig, CLIPModel state dict) of an open_clip ViT CLIP: standard text tower, class-token
    pooling, GELU, no layer scale (ViT-H-14 and its kin)."""
    from transformers import CLIPConfig

    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # saved from DistributedDataParallel
    renamed = {
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "logit_scale": "logit_scale",
    }
    for a, b in [
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
        ("ln_final", "text_model.final_layer_norm"),
    ]:
        renamed[f"{a}.weight"], renamed[f"{a}.bias"] = f"{b}.weight", f"{b}.bias"
    out = {b: sd[a] for a, b in renamed.items()}
    # open_clip multiplies by (width, dim) matrices; nn.Linear stores the transpose
    out["visual_projection.weight"] = sd["visual.proj"].t()
    out["text_projection.weight"] = sd["text_projection"].t()
    used = set(renamed) | {"visual.proj", "text_projection", "attn_mask"}  # attn_mask: rebuilt by transformers
    vision_layers = _open_clip_blocks(sd, "visual.transformer.resblocks.", "vision_model.encoder.layers.", out, used)
    text_layers = _open_clip_blocks(sd, "transformer.resblocks.", "text_model.encoder.layers.", out, used)
    _check_all_used(sd, used)

    vision_width, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
    vocab, text_width = sd["token_embedding.weight"].shape
    vision = dict(
        hidden_size=vision_width,
        intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=vision_layers,
        num_attention_heads=_heads(vision_width, OPEN_CLIP_VISION_HEAD_WIDTH, "image tower"),
        image_size=math.isqrt(sd["visual.positional_embedding"].shape[0] - 1) * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    text = dict(
        vocab_size=vocab,
        hidden_size=text_width,
        intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=text_layers,
        num_attention_heads=_heads(text_width, OPEN_CLIP_TEXT_HEAD_WIDTH, "text tower"),
        max_position_embeddings=sd["positional_embedding"].shape[0],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        # open_clip pools the text at the highest token id, <|endoftext|>: the last id of CLIP's vocabulary,
        # after <|startoftext|>
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sd["visual.proj"].shape[1]), out


# ImageReward -> BlipVisionModel + BlipTextModel + head -----------------------------------------------------

_BLIP_VIT_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",  # timm and transformers both split qkv as (3, heads, head_dim)
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_BLIP_VIT_TOP = {
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}


@_layout("an ImageReward checkpoint")
def imagereward_to_blip(sd: dict):
    """(BlipVisionConfig, BlipTextConfig, head sizes [(in, out), ...], ImageRewardModel state dict).

    Only the modules ImageReward's ``score()`` runs are read (``blip.visual_encoder``,
    ``blip.text_encoder``, ``mlp``); the contrastive projections it never runs are ignored, as
    ImageReward's own non-strict load ignores what it does not need.
    """
    from transformers import BlipTextConfig, BlipVisionConfig

    vit, bert = "blip.visual_encoder.", "blip.text_encoder."
    out = {f"vision_model.{b}": sd[vit + a] for a, b in _BLIP_VIT_TOP.items()}
    used = {vit + a for a in _BLIP_VIT_TOP}
    vision_layers = _num_layers(sd, vit + "blocks.")
    for i in range(vision_layers):
        for a, b in _BLIP_VIT_BLOCK.items():
            for p in ("weight", "bias"):
                out[f"vision_model.encoder.layers.{i}.{b}.{p}"] = sd[f"{vit}blocks.{i}.{a}.{p}"]
                used.add(f"{vit}blocks.{i}.{a}.{p}")
    # BLIP's text encoder is a BERT (with cross-attention) whose module names BlipTextModel kept;
    # position_ids is a buffer BLIP saved and transformers rebuilds
    for k, v in sd.items():
        if k.startswith(bert):
            used.add(k)
            if not k.endswith("position_ids"):
                out["text_encoder." + k.removeprefix(bert)] = v
    # the head is an nn.Sequential of Linear and Dropout layers, with no activation between the Linears
    linears = sorted({int(m.group(1)) for k in sd if (m := re.match(r"mlp\.layers\.(\d+)\.weight$", k))})
    if not linears:
        raise KeyError("mlp.layers.0.weight")
    sizes = []
    for j, i in enumerate(linears):
        weight = sd[f"mlp.layers.{i}.weight"]
        sizes.append((weight.shape[1], weight.shape[0]))
        out[f"head.{j}.weight"], out[f"head.{j}.bias"] = weight, sd[f"mlp.layers.{i}.bias"]
        used |= {f"mlp.layers.{i}.weight", f"mlp.layers.{i}.bias"}
    _check_all_used(sd, used, (vit, "mlp."))

    conv = sd[vit + "patch_embed.proj.weight"]
    vision_width, patch = conv.shape[0], conv.shape[-1]
    vocab, text_width = sd[bert + "embeddings.word_embeddings.weight"].shape
    vision_config = BlipVisionConfig(
        hidden_size=vision_width,
        intermediate_size=sd[vit + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=vision_layers,
        num_attention_heads=_heads(vision_width, BLIP_HEAD_WIDTH, "image encoder"),
        image_size=math.isqrt(sd[vit + "pos_embed"].shape[1] - 1) * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's ViT (timm) uses 1e-6, not transformers' default 1e-5
    )
    text_config = BlipTextConfig(
        vocab_size=vocab,
        hidden_size=text_width,
        encoder_hidden_size=sd[bert + "encoder.layer.0.crossattention.self.key.weight"].shape[1],
        intermediate_size=sd[bert + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_num_layers(sd, bert + "encoder.layer."),
        num_attention_heads=_heads(text_width, BLIP_HEAD_WIDTH, "text encoder"),
        max_position_embeddings=sd[bert + "embeddings.position_embeddings.weight"].shape[0],
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        is_decoder=True,  # builds the cross-attention layers; the forward still runs bidirectionally
    )
    return vision_config, text_config, sizes, out
