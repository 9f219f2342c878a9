"""train.novelty_bonus: a sample's reward gains its novelty among its prompt's samples, in image features."""

import json

import pytest
import torch

from egrpo import config as cfg
from egrpo.diversity import novelty
from egrpo.errors import ConfigError
from egrpo.trainer import Trainer


def test_novelty_is_the_mean_cosine_distance_to_the_other_samples_of_the_prompt():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    rows = torch.tensor([0, 0, 0, 1, 2])
    # prompt 0: two alike and one orthogonal; prompt 1 and 2: one sample each
    assert novelty(features, rows).tolist() == pytest.approx([0.5, 0.5, 1.0, 0.0, 0.0])


def test_the_bonus_enters_the_trained_reward_and_is_logged(tmp_path, tiny_overrides):
    config = cfg.load("embedded", [*tiny_overrides, "train.novelty_bonus=2.0", "train.iterations=1",
                                   f"output_dir={tmp_path / 'run'}"])
    metrics = Trainer(config, progress=False).iteration(0)
    assert metrics["reward_novelty"] > 0
    assert metrics["reward_mean"] == pytest.approx(metrics["reward_alignment"] + 2.0 * metrics["reward_novelty"])
    assert metrics["first_ratio_max_dev"] == 0.0
    json.dumps(metrics)


def test_a_bonus_without_image_features_is_refused(tmp_path, tiny_overrides):
    config = cfg.load("embedded", [*tiny_overrides, "train.novelty_bonus=1.0", "eval.diversity_encoder=none",
                                   f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="train.novelty_bonus needs image features"):
        Trainer(config, progress=False)
