"""Videos where the engine expects images: a video policy's ``decode`` answers (B, K, C, H, W), K frames a sample.

Image rewards and image encoders stay as they are: a video is scored as the mean of its frames' scores (as
DanceGRPO scores HPS on frames of Wan and HunyuanVideo), and described by the mean of its frames' features. A
reward that knows videos says so with ``takes_video = True`` and gets the clip whole (the http reward, which
sends it to a server that may score clips). Pictures of a video are strips of its K frames side by side.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def is_video(images: torch.Tensor) -> bool:
    return images.ndim == 5


def score_frames(reward: Callable, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """``reward(images, prompts)`` of a batch of images (B, C, H, W), or of videos (B, K, C, H, W): the mean of
    the K frames' scores, each frame scored with its video's prompt."""
    if not is_video(images) or getattr(reward, "takes_video", False):
        return reward(images, prompts)
    b, k = images.shape[:2]
    if len(prompts) != b:
        raise ValueError(f"expected B prompts for {b} videos, got {len(prompts)}")
    scores = reward(images.flatten(0, 1), [p for p in prompts for _ in range(k)])
    return scores.reshape(b, k).mean(1)


def frames_mean(encode: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode`` of images (N, C, H, W) -> (N, D), made to take videos too: a video's features are the mean of
    its frames'."""

    def features(images: torch.Tensor) -> torch.Tensor:
        if not is_video(images):
            return encode(images)
        b, k = images.shape[:2]
        return encode(images.flatten(0, 1)).reshape(b, k, -1).mean(1)

    return features


def strips(images: torch.Tensor) -> torch.Tensor:
    """Videos (B, K, C, H, W) -> their frames side by side (B, C, H, K W); images (B, C, H, W) unchanged."""
    return torch.cat(images.unbind(1), dim=-1) if is_video(images) else images


def still(sample: torch.Tensor) -> torch.Tensor:
    """One sample as a picture: an image (C, H, W) as it is, a video (K, C, H, W) as the strip of its frames."""
    return torch.cat(sample.unbind(0), dim=-1) if sample.ndim == 4 else sample
