"""Embedding diversity and the Vendi score: their closed forms, and the encoders they read."""

import pytest
import torch

from egrpo import diversity
from egrpo.errors import ConfigError


def test_closed_forms_all_alike_and_all_orthogonal():
    alike = torch.ones(2, 4, 8)
    orthogonal = torch.eye(4)[None].repeat(2, 1, 1)
    assert diversity.pairwise_cosine_distance(alike).tolist() == pytest.approx([0.0, 0.0])
    assert diversity.pairwise_cosine_distance(orthogonal).tolist() == pytest.approx([1.0, 1.0])
    assert diversity.vendi_score(alike).tolist() == pytest.approx([1.0, 1.0])
    assert diversity.vendi_score(orthogonal).tolist() == pytest.approx([4.0, 4.0])
    # two distinct samples, each twice: the effective number of samples is 2
    pairs = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    assert diversity.vendi_score(pairs).item() == pytest.approx(2.0)


def test_measure_groups_consecutive_samples_by_prompt():
    features = torch.cat([torch.ones(3, 5), torch.eye(5)[:3]])
    overall, per_prompt = diversity.measure(features, ["same"] * 3 + ["apart"] * 3, 3)
    assert per_prompt["same"]["vendi"] == pytest.approx(1.0) and per_prompt["apart"]["vendi"] == pytest.approx(3.0)
    assert overall["vendi"] == pytest.approx(2.0)


def test_the_encoder_setting_is_checked_against_the_runs_rewards():
    class Clip:
        def image_features(self, images):
            return images.flatten(1)

    assert diversity.encoder("none", {}, "flux") is None
    assert diversity.encoder("auto", {"jpeg_compressibility": object()}, "flux") is None
    name, encode = diversity.encoder("auto", {"hps": Clip(), "pickscore": Clip()}, "flux")
    assert name == "pickscore" and encode(torch.ones(2, 3, 2, 2)).shape == (2, 12)
    with pytest.raises(ConfigError, match=r"eval.diversity_encoder=hps: the run has no hps reward; add it with weight"):
        diversity.encoder("hps", {"clip": Clip()}, "flux")
    with pytest.raises(ConfigError, match="must be auto, none or one of clip, pickscore, hps, got 'dino'"):
        diversity.encoder("dino", {}, "flux")
