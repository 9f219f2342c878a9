"""Data and prompts of the embedded task: scikit-learn's bundled 8x8 handwritten digits.

Prompts are English sentences naming one digit. Training and held-out prompts use disjoint
templates, so the held-out evaluation measures whether alignment carries over to new phrasings.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN_TEMPLATES = (
    "a handwritten digit {}",
    "the number {}, written by hand",
    "a picture of the digit {}",
    "handwritten {}",
    "a scanned image of the numeral {}",
    "the digit {} drawn with a pen",
    "a small image of a handwritten {}",
    "someone wrote the number {}",
)

HELDOUT_TEMPLATES = (
    "a photo of a hand-drawn {}",
    "the numeral {} in handwriting",
    "a grayscale image showing the number {}",
    "digit: {}",
)

_WORD_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)


def train_prompts() -> list[str]:
    return [t.format(w) for t in TRAIN_TEMPLATES for w in DIGIT_WORDS]


def heldout_prompts() -> list[str]:
    return [t.format(w) for t in HELDOUT_TEMPLATES for w in DIGIT_WORDS]


def digit_of(prompt: str) -> int:
    """The digit a prompt asks for: exactly one digit word ('seven') or numeral ('7') must appear."""
    found = {m.group(1).lower() for m in _WORD_PATTERN.finditer(prompt)}
    digits = {int(w) if w.isdigit() else DIGIT_WORDS.index(w) for w in found}
    if len(digits) != 1:
        raise ValueError(
            f"prompt {prompt!r} must name exactly one digit (a word 'zero'..'nine' or a numeral 0-9) "
            f"for the digit rewards; it names {sorted(digits) or 'none'}"
        )
    return digits.pop()


def digits_of(prompts: Sequence[str]) -> torch.Tensor:
    return torch.tensor([digit_of(p) for p in prompts], dtype=torch.long)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 images as (N, 1, 8, 8) floats in [0, 1] and their labels."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target, dtype=torch.long)
