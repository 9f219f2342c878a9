"""Rewards of the embedded digits task (the networks behind them are in :mod:`egrpo.embedded.networks`).

- ``alignment`` (the CLIP-score analogue): the probability, under a CNN trained on real digits, that
  the image shows the digit the prompt names.
- ``quality`` (the HPS analogue): how much the image looks like a real handwritten digit of any
  class, the log-likelihood of a Gaussian mixture fitted to the real digits, as a z-score against
  real digits (0 = a typical real digit, negative = less digit-like), floored at -10.

A second CNN, the judge, is trained on the other half of the digits; evaluation reports its accuracy
too, so a policy that fools the reward classifier without drawing the digit shows up.
"""

from __future__ import annotations

from typing import Sequence

import torch

from egrpo.embedded import assets
from egrpo.embedded.digits import digits_of
from egrpo.embedded.networks import DigitClassifier, DigitDensity


class AlignmentReward:
    def __init__(self, classifier: DigitClassifier | None = None):
        self.classifier = classifier if classifier is not None else assets.load_reward_models().classifier

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        probs = self.classifier(images).softmax(-1)
        return probs.gather(1, digits_of(prompts)[:, None].to(probs.device)).squeeze(1)


class QualityReward:
    def __init__(self, density: DigitDensity | None = None):
        self.density = density if density is not None else assets.load_reward_models().density

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.density(images)
