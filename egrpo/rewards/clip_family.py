"""The CLIP-based rewards of the paper: HPSv2.1, CLIP score and PickScore, on transformers' ``CLIPModel``.

All three score an image against its prompt by the cosine of the normalised image and text features;
they differ in weights and scale:

- ``hps``: HPSv2.1, an open_clip ViT-H-14 fine-tuned on human preferences, published as an open_clip
  checkpoint (converted on load); the score is the cosine, as ``hpsv2.score()`` returns it.
- ``clip``: ``openai/clip-vit-large-patch14``; the score is the raw cosine in [-1, 1] (neither x100
  nor clamped at 0, unlike torchmetrics' CLIPScore = 100 * max(cos, 0)).
- ``pickscore``: PickScore_v1, a ViT-H-14 CLIP fine-tuned on Pick-a-Pic; the score is
  ``logit_scale.exp() * cos`` (about 100x the cosine), as its authors' README computes it.

Each reward prepares its inputs as its reference code does (``clip_preprocess``), on tensors on the reward's
device: hpsv2 letterboxes the float image and cleans the prompt as open_clip does (``open_clip_clean``); CLIP
score and PickScore resize the shorter side of an 8-bit image and crop as transformers' image processor does.
Prompts are cut to the model's 77 tokens, keeping <|endoftext|>. ``tests/test_reward_parity.py`` holds each score
to the authors' own code.
"""

from __future__ import annotations

import html
import re
from typing import Sequence

import torch
import torch.nn.functional as F

from egrpo.devices import resolve_device
from egrpo.errors import ConfigError
from egrpo.rewards.loading import (
    RewardWeightsError,
    freeze,
    load_pretrained,
    locate_file,
    read_checkpoint,
    resolve_dtype,
    skip_weight_init,
)
from egrpo.rewards.pil_resize import pil_bicubic_resize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LAION_VIT_H_14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def as_rgb(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 3, H, W) or (B, 1, H, W) in [0, 1], got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _pil_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL's bicubic resize of an 8-bit image, bit for bit, on a float tensor holding levels / 255, on x's device
    (egrpo/rewards/pil_resize.py says how and why it is not Pillow itself)."""
    return pil_bicubic_resize(x.mul(255).round(), height, width).div_(255)


def _resize_shorter(images: torch.Tensor, size: int, pil: bool) -> torch.Tensor:
    h, w = images.shape[-2:]
    # int(), not round(): torchvision's and transformers' shorter-side rule
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (new_h, new_w) == (h, w):
        return images
    if pil:
        return _pil_resize(images, new_h, new_w)
    return F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)


def _center_crop(images: torch.Tensor, size: int, floor: bool) -> torch.Tensor:
    h, w = images.shape[-2:]
    if floor:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def _letterbox(images: torch.Tensor, size: int) -> torch.Tensor:
    """open_clip's ``ResizeMaxSize`` on a float tensor: the longer side to ``size`` (Python's round for the
    shorter), bicubic without clamping, then zero padding split as ``pad // 2`` before and the rest after."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    x = images
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    mean = pixels.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = pixels.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def clip_preprocess(images: torch.Tensor, size: int, fit: str = "crop", pil: bool = True, floor_crop: bool = False):
    """[0, 1] images -> the model's normalised (B, 3, size, size) input, as the reward's reference prepares it.

    ``fit``: ``crop`` is torchvision's / transformers' ``Resize(size)`` (shorter side, bicubic) and centre crop;
    ``letterbox`` is open_clip's ``ResizeMaxSize`` (hpsv2). ``pil``: the reference resizes an 8-bit PIL image
    (CLIP, PickScore, ImageReward) rather than the float tensor (hpsv2 resizes after ``ToTensor``).
    ``floor_crop``: the crop offset as transformers' image processors compute it, ``(extent - size) // 2``,
    where torchvision's CenterCrop rounds; they differ by a pixel when the extent exceeds ``size`` by an odd
    number (a 224 x 299 image), which moves every pixel of the crop.
    """
    x = images.float().mul(255).round().div(255)  # the references receive 8-bit images
    if fit == "letterbox":
        x = _letterbox(x, size)
    else:
        x = _center_crop(_resize_shorter(x, size, pil), size, floor_crop)
    return normalize(x)


def open_clip_clean(text: str) -> str:
    """open_clip's text cleaning before its BPE: ftfy's repairs (mojibake, curly quotes, full-width letters,
    ligatures), HTML entities unescaped twice, whitespace runs collapsed, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class ClipFamilyReward:
    """``cos(image features, text features)``, times ``logit_scale.exp()`` where the reward says so, with a
    frozen ``CLIPModel``. Options: ``device`` (default cuda if available), ``dtype`` (float32, float16,
    bfloat16), ``autocast`` (fp16 autocast on CUDA, as hpsv2 scores; no effect elsewhere) and ``batch_size``
    (images per forward)."""

    name: str
    checkpoint_source: str  # what to pass as checkpoint, for error messages
    tokenizer_source: str
    use_logit_scale = False
    # how the reference prepares its inputs; see clip_preprocess and open_clip_clean
    fit = "crop"
    pil = True
    floor_crop = False
    clean_text = False
    autocast_default = False

    def __init__(
        self,
        checkpoint: str,
        tokenizer: str,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 32,
        autocast: bool | None = None,
    ):
        from transformers import CLIPTokenizer

        self.device, self.dtype = resolve_device(device, f"reward.{self.name}.device"), resolve_dtype(self.name, dtype)
        self.batch_size = batch_size
        self.autocast = self.autocast_default if autocast is None else autocast
        if not isinstance(self.autocast, bool):
            raise ConfigError(f"reward.{self.name}.autocast: expected true or false, got {autocast!r}")
        self.hint = f"pass reward.{self.name}.checkpoint=PATH ({self.checkpoint_source})"
        model = self._load_model(checkpoint)
        tokenizer_hint = f"pass reward.{self.name}.tokenizer=PATH (a CLIP tokenizer: {self.tokenizer_source})"
        self.tokenizer = load_pretrained(self.name, CLIPTokenizer, tokenizer, "tokenizer", tokenizer_hint)
        self.model = freeze(model, self.device, self.dtype)
        self.image_size = model.config.vision_config.image_size
        self.max_length = model.config.text_config.max_position_embeddings

    def _load_model(self, checkpoint: str):
        from transformers import CLIPModel

        return load_pretrained(self.name, CLIPModel, checkpoint, "weights", self.hint)

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        options = {}
        if self.clean_text:
            prompts = [open_clip_clean(p) for p in prompts]
            # open_clip's vocabulary has no special token but its two ends: a folder whose pad token is '!' must
            # not turn every '!' of a prompt into that pad token
            options["split_special_tokens"] = True
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt", **options
        )
        out = self.model.text_model(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        )
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images.to(self.device), self.image_size, self.fit, self.pil, self.floor_crop)
        pixels = pixels.to(self.dtype)
        out = self.model.vision_model(pixel_values=pixels)
        return F.normalize(self.model.visual_projection(out.pooler_output).float(), dim=-1)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, D), fp32 on the CPU, computed as the score computes them: what the
        diversity measures of ``egrpo eval`` read."""
        images = as_rgb(images, [""] * images.shape[0])
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast and self.device.type == "cuda"):
            features = [self._image_features(chunk) for chunk in images.split(self.batch_size)]
        return torch.cat(features).float().cpu()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        images = as_rgb(images, prompts)
        # a GRPO batch repeats each prompt once per sample: encode each distinct prompt once
        unique = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast and self.device.type == "cuda"):
            text = self._text_features(list(unique))[torch.tensor([unique[p] for p in prompts], device=self.device)]
            image = torch.cat([self._image_features(chunk) for chunk in images.split(self.batch_size)])
        score = (image * text).sum(-1)
        if self.use_logit_scale:
            score = self.model.logit_scale.float().exp() * score
        return score.to(images.device)


class HPSReward(ClipFamilyReward):
    """HPSv2.1 from its open_clip checkpoint: the .pt file, a folder holding it, or its hub repo."""

    name = "hps"
    filename = "HPS_v2.1_compressed.pt"
    checkpoint_source = f"{filename} from the HPSv2 release, https://huggingface.co/xswu/HPSv2, or that hub repo id"
    tokenizer_source = LAION_VIT_H_14
    fit = "letterbox"
    pil = False  # hpsv2 resizes the float tensor after ToTensor(), keeping the bicubic overshoot
    clean_text = True
    autocast_default = True  # hpsv2.score() runs under torch.cuda.amp.autocast()

    def __init__(self, checkpoint: str = "xswu/HPSv2", tokenizer: str = LAION_VIT_H_14, **options):
        super().__init__(checkpoint, tokenizer, **options)

    def _load_model(self, checkpoint: str):
        from transformers import CLIPModel

        from egrpo.rewards.convert import CheckpointLayoutError, open_clip_to_clip

        path = locate_file(self.name, checkpoint, self.filename, self.hint)
        raw = read_checkpoint(self.name, path, self.hint)
        try:
            # open_clip training checkpoints keep the weights under 'state_dict', beside the epoch and optimizer
            config, state = open_clip_to_clip(raw.get("state_dict", raw))
            with skip_weight_init():
                model = CLIPModel(config)
            model.load_state_dict(state)
        except (CheckpointLayoutError, RuntimeError, AttributeError) as exc:
            raise RewardWeightsError(f"{self.name}: {path}: {exc}; {self.hint}") from None
        return model


class ClipScoreReward(ClipFamilyReward):
    """CLIP score, the raw cosine, of a transformers CLIP model; ``tokenizer`` defaults to ``checkpoint``."""

    name = "clip"
    checkpoint_source = "a transformers CLIP folder or hub id: openai/clip-vit-large-patch14"
    tokenizer_source = "openai/clip-vit-large-patch14"
    floor_crop = True  # CLIP score is computed with transformers' CLIPProcessor

    def __init__(self, checkpoint: str = "openai/clip-vit-large-patch14", tokenizer: str | None = None, **options):
        super().__init__(checkpoint, tokenizer or checkpoint, **options)


class PickScoreReward(ClipFamilyReward):
    """PickScore_v1: ``logit_scale.exp() * cos``, with the tokenizer of the LAION ViT-H-14 it was tuned from."""

    name = "pickscore"
    checkpoint_source = "a transformers CLIP folder or hub id: yuvalkirstain/PickScore_v1"
    tokenizer_source = LAION_VIT_H_14
    use_logit_scale = True
    floor_crop = True  # the PickScore recipe preprocesses with transformers' AutoProcessor

    def __init__(self, checkpoint: str = "yuvalkirstain/PickScore_v1", tokenizer: str = LAION_VIT_H_14, **options):
        super().__init__(checkpoint, tokenizer, **options)
