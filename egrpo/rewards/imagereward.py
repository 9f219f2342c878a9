"""ImageReward v1.0 on transformers' BLIP classes, loaded from the published ``ImageReward.pt``.

ImageReward's ``score()``: a BLIP ViT-L encodes the image; a BERT-base whose every layer also
cross-attends to all image tokens reads the prompt ([CLS] ... [SEP], padded to 35 tokens); its [CLS]
state goes through a stack of Linear layers (no activations) to a raw reward, normalised as
(raw - 0.16717362830052426) / 1.0333394966054072. Images are preprocessed as CLIP's are.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from egrpo.devices import resolve_device
from egrpo.rewards.clip_family import as_rgb, clip_preprocess
from egrpo.rewards.loading import (
    RewardWeightsError,
    freeze,
    load_pretrained,
    locate_file,
    read_checkpoint,
    resolve_dtype,
    skip_weight_init,
)

RAW_MEAN = 0.16717362830052426
RAW_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35


class ImageRewardModel(nn.Module):
    """BLIP image encoder + BERT with cross-attention + linear head: the raw (unnormalised) reward."""

    def __init__(self, vision_config, text_config, head_sizes: list[tuple[int, int]]):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = nn.Sequential(*[nn.Linear(n_in, n_out) for n_in, n_out in head_sizes])

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long, device=image.device),
            is_decoder=False,
        ).last_hidden_state
        return self.head(text[:, 0].float()).squeeze(-1)


class ImageReward:
    """ImageReward v1.0; ``checkpoint`` is ImageReward.pt, a folder holding it, or a hub repo."""

    FILENAME = "ImageReward.pt"

    def __init__(
        self,
        checkpoint: str = "THUDM/ImageReward",
        tokenizer: str = "bert-base-uncased",
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 32,
    ):
        from transformers import BertTokenizer

        from egrpo.rewards.convert import CheckpointLayoutError, imagereward_to_blip

        self.device = resolve_device(device, "reward.imagereward.device")
        self.dtype = resolve_dtype("imagereward", dtype)
        self.batch_size = batch_size
        hint = (
            f"pass reward.imagereward.checkpoint=PATH ({self.FILENAME} from https://huggingface.co/THUDM/ImageReward, "
            "or that hub repo id)"
        )
        path = locate_file("imagereward", checkpoint, self.FILENAME, hint)
        raw = read_checkpoint("imagereward", path, hint)
        try:
            vision_config, text_config, head_sizes, state = imagereward_to_blip(raw)
            with skip_weight_init():
                model = ImageRewardModel(vision_config, text_config, head_sizes)
            model.load_state_dict(state)
        except (CheckpointLayoutError, RuntimeError, AttributeError) as exc:
            raise RewardWeightsError(f"imagereward: {path}: {exc}; {hint}") from None
        # ImageReward adds [DEC] and [ENC] to bert-base-uncased; score() uses neither, so the plain tokenizer
        # gives the same ids
        tokenizer_hint = "pass reward.imagereward.tokenizer=PATH (a BERT tokenizer: bert-base-uncased)"
        self.tokenizer = load_pretrained("imagereward", BertTokenizer, tokenizer, "tokenizer", tokenizer_hint)
        self.model = freeze(model, self.device, self.dtype)
        self.model.head.float()  # ImageReward runs its head on float32 features whatever the encoders' dtype
        self.image_size = vision_config.image_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        images = as_rgb(images, prompts)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        )
        raw = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            pixels = clip_preprocess(images[start:stop].to(self.device), self.image_size).to(self.dtype)
            raw.append(
                self.model(
                    pixels,
                    tokens["input_ids"][start:stop].to(self.device),
                    tokens["attention_mask"][start:stop].to(self.device),
                )
            )
        return ((torch.cat(raw) - RAW_MEAN) / RAW_STD).to(images.device)
