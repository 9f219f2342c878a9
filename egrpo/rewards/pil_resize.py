"""Pillow's BICUBIC resize of an 8-bit image, bit for bit, with torch ops on the tensor's own device.

CLIP score, PickScore and ImageReward are defined by reference code that resizes an 8-bit PIL image
(transformers' ``CLIPImageProcessor``, torchvision's ``Resize`` on a PIL image). The rewards score tensors
that live on the reward's device, usually a GPU: calling Pillow would copy every batch to the host, wait for
it, resize image by image on the CPU and copy back. This module is hand-written to get Pillow's exact levels
without leaving the device. torch's antialiased bicubic (``F.interpolate(..., antialias=True)``) is a port of
the same filter but in floating point: it rounds exact halves to even where Pillow rounds them up (many ties on
upscales), and it knows nothing of Pillow's 8-bit intermediate image or of the order of its two passes.

What Pillow 13 does (``ImagingResampleInner`` and its helpers in libImaging/Resample.c), and this module with it:

- Weights, per axis: each output pixel reads a window of input pixels with bicubic (a = -0.5) weights,
  computed in double and stretched by the downscale factor (antialiasing); they are normalised to sum 1, then
  made integers with 22 fractional bits, rounding half away from zero.
- A pass sums level x weight from 2^21 (one half), shifts right by 22 bits (a floor) and clips to 0..255: each
  pass rounds to 8-bit levels, halves up.
- An axis whose size does not change is not filtered.
- The height is filtered first when it shrinks by more than twice as many pixels as the width does, the width
  first otherwise. Pillow 12 and earlier filter the width first (12.2 and 12.3: unless the image is over 100
  times taller than wide).

Arithmetic: the weights are integers below 2^23 in magnitude and the levels integers up to 255, so every
product and every partial sum is an integer far below 2^53 and a float64 matrix product computes Pillow's int32
sums exactly, whatever the summation order of the device's kernel (float64 has no TF32 mode). Each output pixel
reads only a few input pixels, so the matrix is a band: a pass multiplies blocks of ``BLOCK`` output pixels by the
input pixels their windows span. Gathering the taps one by one instead was slower on a CPU (12 images of
1024 x 1024 to 224 x 224 on 2 cores: 10 to 35 s against 0.9 s for whole-matrix products).
"""

from __future__ import annotations

import functools

import torch

PRECISION_BITS = 22  # Pillow: 32 bits - 8 for the result - 2 for the overshoot of negative lobes
BLOCK = 32  # output pixels per matrix product


def _bicubic(x: float) -> float:
    """Pillow's ``bicubic_filter`` (Keys, a = -0.5), with its operations in its order (Python floats are
    IEEE doubles, as C's)."""
    x = abs(x)
    if x < 1.0:
        return (1.5 * x - 2.5) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * -0.5
    return 0.0


@functools.lru_cache(maxsize=64)
def pil_taps(in_size: int, out_size: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """Pillow's integer bicubic weights resizing one axis of ``in_size`` pixels to ``out_size``: the first input
    pixel of each output pixel's window, and the window's weights, each the real weight times 2^22 rounded half
    away from zero. Host integers (they depend on the two sizes only), computed in double as Pillow's
    ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` compute them."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale  # the bicubic filter's support, 2, stretched when downscaling
    inv_filterscale = 1.0 / filterscale
    one = 1 << PRECISION_BITS
    firsts, windows = [], []
    for out in range(out_size):
        center = (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C's cast
        stop = min(int(center + support + 0.5), in_size)
        taps = [_bicubic((i - center + 0.5) * inv_filterscale) for i in range(first, stop)]
        total = 0.0
        for w in taps:  # one addition after another, as Pillow; sum() of floats compensates from Python 3.12
            total += w
        if total != 0.0:
            taps = [w / total for w in taps]
        firsts.append(first)
        windows.append(tuple(int(w * one - 0.5) if w < 0 else int(w * one + 0.5) for w in taps))
    return tuple(firsts), tuple(windows)


def _weight_matrix(in_size: int, out_size: int, like: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) float64 matrix of Pillow's integer weights, on ``like``'s device."""
    firsts, windows = pil_taps(in_size, out_size)
    width = max(len(w) for w in windows)
    device = like.device
    weights = torch.tensor([w + (0,) * (width - len(w)) for w in windows], dtype=torch.float64, device=device)
    # a window shorter than the longest is padded with zero weights on a pixel of the image: adding 0 is exact
    index = (torch.tensor(firsts, device=device)[:, None] + torch.arange(width, device=device)).clamp_(max=in_size - 1)
    return torch.zeros(out_size, in_size, dtype=torch.float64, device=device).scatter_add_(1, index, weights)


def _pass(levels: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """One of Pillow's 8-bit passes along ``dim`` (-1: width, -2: height) of float64 levels."""
    in_size = levels.shape[dim]
    matrix = _weight_matrix(in_size, size, levels)
    firsts, windows = pil_taps(in_size, size)
    parts = []
    # BLOCK output pixels at a time, each block times only the input pixels its windows read: the matrix is a band
    for start in range(0, size, BLOCK):
        stop = min(start + BLOCK, size)
        lo, hi = firsts[start], max(f + len(w) for f, w in zip(firsts[start:stop], windows[start:stop]))
        block, part = matrix[start:stop, lo:hi], levels.narrow(dim, lo, hi - lo)
        parts.append(part @ block.T if dim == -1 else block @ part)
    sums = torch.cat(parts, dim)
    # (sum + 2^21) >> 22, then clip to 8 bits: adding and dividing by powers of two is exact on these integers
    return sums.add_(1 << (PRECISION_BITS - 1)).div_(1 << PRECISION_BITS).floor_().clamp_(0, 255)


def pil_bicubic_resize(levels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``PIL.Image.resize((width, height), BICUBIC)`` of an 8-bit image, bit for bit (Pillow 13).

    ``levels``: (..., H, W) floats holding integer levels 0..255 (each channel is resized alone, as Pillow
    resizes each band). Returns (..., height, width) levels in ``levels``' dtype, on its device.
    """
    in_height, in_width = levels.shape[-2:]
    x = levels.double()
    shrink_h, shrink_w = in_height - height, in_width - width
    height_first = shrink_h > 0 and shrink_h > 2 * shrink_w
    for dim, size in ((-2, height), (-1, width)) if height_first else ((-1, width), (-2, height)):
        if x.shape[dim] != size:
            x = _pass(x, size, dim)
    return x.to(levels.dtype)
