"""The embedded task's reward networks: a digit classifier (the alignment reward and, trained on the other half
of the digits, the judge) and a Gaussian mixture over pixels (the quality reward). Trained by
:mod:`egrpo.embedded.pretrain`, shipped in ``egrpo/assets/digits_rewards.safetensors``."""

from __future__ import annotations

import math

import torch
from torch import nn

QUALITY_FLOOR = -10.0


class DigitClassifier(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 16, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2.0 - 1.0)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The last hidden layer (64 wide): the image embedding the embedded task's diversity measures use."""
        return self.net[:-1](images * 2.0 - 1.0)


class DigitDensity(nn.Module):
    """Full-covariance Gaussian mixture over the 64 pixels, scored in torch (parameters from scikit-learn)."""

    def __init__(self, components: int = 10, dim: int = 64):
        super().__init__()
        self.register_buffer("log_weights", torch.zeros(components))
        self.register_buffer("means", torch.zeros(components, dim))
        self.register_buffer("precision_chol", torch.eye(dim).repeat(components, 1, 1))
        self.register_buffer("real_mean", torch.zeros(()))
        self.register_buffer("real_std", torch.ones(()))

    def log_likelihood(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flatten(1).double()
        diff = x[:, None, :] - self.means.double()[None]
        y = torch.einsum("bkd,kde->bke", diff, self.precision_chol.double())
        log_det = torch.log(torch.diagonal(self.precision_chol.double(), dim1=-2, dim2=-1)).sum(-1)
        log_prob = -0.5 * (y**2).sum(-1) - 0.5 * x.shape[1] * math.log(2 * math.pi) + log_det
        return torch.logsumexp(log_prob + self.log_weights.double(), dim=1).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = (self.log_likelihood(images) - self.real_mean) / self.real_std
        return z.clamp(min=QUALITY_FLOOR)
