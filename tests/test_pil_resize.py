"""egrpo's torch port of Pillow's BICUBIC resize against ``PIL.Image.resize`` itself: equal levels on every shape.

Pillow is the ground truth here: CLIP score, PickScore and ImageReward resize an 8-bit PIL image in their authors'
code, so the rewards' resize must give Pillow's levels, not levels close to them.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from egrpo.rewards.clip_family import _resize_shorter
from egrpo.rewards.pil_resize import pil_bicubic_resize, pil_taps

# (H, W): tall, wide, 1-pixel margins, small upscales, odd sizes, and the shapes that first showed a gap
SHAPES = [
    (333, 517), (517, 333), (225, 224), (224, 225), (1000, 250), (250, 1000), (128, 128), (128, 96),
    (768, 1344), (450, 602), (224, 224), (97, 131), (900, 225), (450, 225), (600, 300),
]  # fmt: skip


def content(height: int, width: int, kind: str, seed: int = 0) -> np.ndarray:
    """8-bit RGB (H, W, 3): ``smooth`` waves, ``noise``, ``stripes`` (3-pixel diagonal stripes, the issue's
    repro, with other phases in the other channels) and ``diagonal`` (1-pixel diagonal stripes)."""
    y, x = np.mgrid[0:height, 0:width]
    if kind == "stripes":
        a = ((x + y) // 3) % 2 * 255
        return np.stack([a, 255 - a, ((x - y) // 3) % 2 * 255], -1).astype(np.uint8)
    if kind == "diagonal":
        a = (x + y) % 2 * 255
        return np.stack([a, 255 - a, (x + 2 * y) % 3 * 127], -1).astype(np.uint8)
    rng = np.random.default_rng([seed, height, width])
    if kind == "noise":
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    yy, xx = y / max(height - 1, 1), x / max(width - 1, 1)
    waves = [127.5 + 120 * np.sin(2 * np.pi * (f * yy + g * xx) + p) for f, g, p in rng.uniform(0.5, 4, (3, 3))]
    return np.stack(waves, -1).round().astype(np.uint8)


def pil(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.BICUBIC))


def ours(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    levels = torch.from_numpy(pixels).permute(2, 0, 1).float()
    return pil_bicubic_resize(levels, height, width).permute(1, 2, 0).numpy().astype(np.uint8)


def shorter_side(height: int, width: int, size: int = 224) -> tuple[int, int]:
    return (size, int(size * width / height)) if height <= width else (int(size * height / width), size)


@pytest.mark.parametrize("kind", ["smooth", "noise", "stripes", "diagonal"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{h}x{w}" for h, w in SHAPES])
def test_shorter_side_to_224_equals_pillow(shape, kind):
    """The rewards' resize (shorter side to 224, as CLIP, PickScore and ImageReward do) on every shape kind."""
    pixels = content(*shape, kind)
    size = shorter_side(*shape)
    assert np.array_equal(ours(pixels, *size), pil(pixels, *size))


def test_the_issue_repro_tall_stripes():
    """900 x 225 -> 896 x 224: Pillow 13 filters the height first here (it shrinks by 4 pixels, the width by
    1); filtering the width first, as egrpo did, is up to 17 levels off."""
    y, x = np.mgrid[0:900, 0:225]
    gray = (((x + y) // 3) % 2 * 255).astype(np.uint8)
    pixels = np.stack([gray] * 3, -1)
    assert np.array_equal(ours(pixels, 896, 224), pil(pixels, 896, 224))
    levels = torch.from_numpy(pixels).permute(2, 0, 1).float()
    width_first = pil_bicubic_resize(pil_bicubic_resize(levels, 900, 224), 896, 224)
    assert (width_first.permute(1, 2, 0).numpy() - pil(pixels, 896, 224)).__abs__().max() == 17


def test_upscale_rounds_exact_halves_up():
    """128 x 128 -> 224 x 224 makes many sums that are exact halves: Pillow rounds them up, as its fixed point
    does, where torch.round would round them to even."""
    pixels = content(128, 128, "noise")
    assert np.array_equal(ours(pixels, 224, 224), pil(pixels, 224, 224))


def test_random_shapes_and_targets_equal_pillow():
    """Any size to any size, up or down on each axis, so both pass orders and one-axis resizes are met."""
    rng = np.random.default_rng(0)
    for i in range(60):
        height, width, new_height, new_width = (int(v) for v in rng.integers(1, 200, 4))
        pixels = content(height, width, ["smooth", "noise", "stripes", "diagonal"][i % 4], seed=i)
        assert np.array_equal(ours(pixels, new_height, new_width), pil(pixels, new_height, new_width)), (
            f"{height}x{width} -> {new_height}x{new_width}"
        )


def test_grayscale_band_equals_pillow():
    pixels = content(300, 170, "noise")[..., 0]
    levels = torch.from_numpy(pixels).float()[None]
    got = pil_bicubic_resize(levels, 224, 126)[0].numpy().astype(np.uint8)
    assert np.array_equal(got, np.asarray(Image.fromarray(pixels).resize((126, 224), Image.BICUBIC)))


def test_weights_are_pillows_fixed_point():
    """Each output pixel's integer weights sum to 2^22 within the rounding of each weight, and an identity
    resize would keep every level (no filter on an axis whose size does not change)."""
    for in_size, out_size in ((517, 224), (96, 224), (900, 896), (1000, 7)):
        _, windows = pil_taps(in_size, out_size)
        assert all(abs(sum(w) - (1 << 22)) <= len(w) for w in windows)
    pixels = content(40, 50, "noise")
    assert np.array_equal(ours(pixels, 40, 50), pixels)


def test_resize_follows_the_device_and_the_batch():
    """Every tensor the resize makes is made on the input's device: on torch's meta device (no data) a CPU
    tensor mixed in would fail. A batch resizes as its images do one by one."""
    out = pil_bicubic_resize(torch.empty(2, 3, 900, 225, device="meta"), 896, 224)
    assert out.device.type == "meta" and out.shape == (2, 3, 896, 224) and out.dtype == torch.float32
    batch = torch.from_numpy(np.stack([content(97, 131, k) for k in ("smooth", "noise")])).permute(0, 3, 1, 2)
    together = pil_bicubic_resize(batch.float(), 224, 302)
    alone = torch.cat([pil_bicubic_resize(b.float(), 224, 302) for b in batch.split(1)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("shape", [(900, 225), (128, 96), (97, 131)])
def test_reward_preprocessing_resize_is_pillows(shape):
    """The rewards' shorter-side resize (clip_family) on [0, 1] images gives Pillow's levels / 255."""
    pixels = content(*shape, "stripes")
    images = torch.from_numpy(pixels).permute(2, 0, 1)[None].float().div(255)
    got = _resize_shorter(images, 224, pil=True)[0].mul(255).round().permute(1, 2, 0).numpy().astype(np.uint8)
    assert np.array_equal(got, pil(pixels, *shorter_side(*shape)))
