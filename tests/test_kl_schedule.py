"""train.kl_schedule: the KL weight moves from train.kl_coef to train.kl_coef_end over the run, by iteration."""

import json

import pytest
import torch

from egrpo import config as cfg
from egrpo.errors import ConfigError
from egrpo.grpo import kl_weight
from egrpo.trainer import Trainer


def test_the_schedules_run_from_the_first_weight_to_the_last():
    assert [kl_weight("constant", 0.3, None, i, 5) for i in range(5)] == [0.3] * 5
    assert [kl_weight("linear", 1.0, 0.2, i, 5) for i in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    cosine = [kl_weight("cosine", 1.0, 0.0, i, 5) for i in range(5)]
    assert cosine == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0])
    # a warm-up is the same schedule upwards
    assert [kl_weight("linear", 0.0, 2.0, i, 3) for i in range(3)] == pytest.approx([0.0, 1.0, 2.0])
    assert kl_weight("cosine", 1.0, 0.5, 0, 1) == 1.0  # one iteration: train.kl_coef, the weight of the first


@pytest.mark.parametrize("overrides, message", [
    (["train.kl_schedule=exponential"], "train.kl_schedule must be one of constant, linear, cosine"),
    (["train.kl_schedule=linear", "train.kl_coef=0.1"], "set train.kl_coef_end"),
    (["train.kl_coef=0.1", "train.kl_coef_end=0.0"], "train.kl_schedule is constant"),
    (["train.kl_schedule=cosine", "train.kl_coef_end=-1"], "train.kl_coef_end must be >= 0"),
])
def test_a_schedule_that_cannot_run_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg.load("embedded", overrides)


def _trainer(tmp_path, tiny_overrides, name, *extra):
    config = cfg.load("embedded", [*tiny_overrides, "train.iterations=2", f"output_dir={tmp_path / name}", *extra])
    return Trainer(config, progress=False)


def _weights(trainer):
    return [p.detach().clone() for p in trainer.params]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_scheduled_weight_is_the_one_each_iteration_trains_with(tmp_path, tiny_overrides):
    """A warm-up 0 -> 5 trains its first iteration exactly as a run without KL and its last one with a KL; a decay
    5 -> 0 trains its first iteration exactly as a constant KL of 5 and its last one without."""
    plain, warm = _trainer(tmp_path, tiny_overrides, "plain"), _trainer(
        tmp_path, tiny_overrides, "warm", "train.kl_schedule=linear", "train.kl_coef=0", "train.kl_coef_end=5")
    constant, decay = _trainer(tmp_path, tiny_overrides, "constant", "train.kl_coef=5"), _trainer(
        tmp_path, tiny_overrides, "decay", "train.kl_schedule=cosine", "train.kl_coef=5", "train.kl_coef_end=0")
    logged = {}
    for it in range(2):
        for name, trainer in (("plain", plain), ("warm", warm), ("constant", constant), ("decay", decay)):
            logged.setdefault(name, []).append(trainer.iteration(it))
        if it == 0:
            assert _same(_weights(warm), _weights(plain)) and _same(_weights(decay), _weights(constant))
        else:
            assert not _same(_weights(warm), _weights(plain)) and not _same(_weights(decay), _weights(constant))
    assert [m["kl_coef"] for m in logged["warm"]] == [0.0, 5.0]
    assert [m["kl_coef"] for m in logged["decay"]] == pytest.approx([5.0, 0.0])
    assert all(m["kl"] > 0 for m in logged["warm"])  # reported at weight 0 too, to watch the drift it lets happen
    assert "kl_coef" not in logged["plain"][0] and "kl" not in logged["plain"][0]
    json.dumps(logged)


def test_a_scheduled_run_cannot_change_its_length_on_resume(tmp_path, tiny_overrides):
    config = cfg.load("embedded", [*tiny_overrides, "train.iterations=1", f"output_dir={tmp_path / 'run'}",
                                   "train.kl_schedule=linear", "train.kl_coef=1", "train.kl_coef_end=0"])
    Trainer(config, progress=False).train()
    longer = cfg.load(str(tmp_path / "run" / "config.yaml"), ["train.iterations=3"])
    with pytest.raises(ConfigError, match="cannot change train.iterations .* under train.kl_schedule=linear"):
        Trainer(longer, tmp_path / "run", resume=True, progress=False)
