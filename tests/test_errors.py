"""Bad input is refused early with a message that says what, where and what to do."""

import pytest
import torch

from egrpo import config as cfg
from egrpo.checkpoint import CheckpointError, load_weights, save_weights, trainable_state
from egrpo.cli import main
from egrpo.embedded.model import DigitsPolicy, TinyFluxConfig
from egrpo.tasks import build_task


def _cli_error(args, capsys):
    assert main(args) == 2
    return capsys.readouterr().err


def test_unknown_key_suggests_the_closest(capsys):
    err = _cli_error(["plan", "plan.tua=2.0"], capsys)
    assert "unknown config key 'plan.tua'" in err and "plan.tau" in err
    err = _cli_error(["plan", "train.group_sise=4"], capsys)
    assert "train.group_size" in err


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("plan:\n  tau: 2.0\ntrain:\n  itertions: 3\n")
    with pytest.raises(cfg.ConfigError, match=r"exp.yaml: unknown config key 'train.itertions'.*train.iterations"):
        cfg.load(str(path))


def test_a_bare_leaf_key_is_accepted_when_unique():
    assert cfg.load("embedded", ["tau=1.8"]).plan.tau == 1.8


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # YAML 1.1 reads "1e-4" as a string; a learning rate written that way must still work.
    assert cfg.load("embedded", ["train.lr=1e-3"]).train.lr == 1e-3
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 5e-6\n")
    assert cfg.load(str(path)).train.lr == 5e-6
    with pytest.raises(cfg.ConfigError, match="expected float"):
        cfg.load("embedded", ["train.lr=1e-3x"])


def test_negative_tau(capsys):
    assert "tau must be >= 0" in _cli_error(["plan", "plan.tau=-1"], capsys)


def test_active_steps_outside_the_grid(capsys):
    err = _cli_error(["plan", "plan.active_steps=[0,20]"], capsys)
    assert "outside the grid" in err and "0..15" in err


def test_wrong_types(capsys):
    assert "expected int" in _cli_error(["plan", "train.group_size=many"], capsys)
    assert "expected float" in _cli_error(["plan", "plan.tau=high"], capsys)


def test_unknown_reward_suggests(capsys):
    err = _cli_error(["plan", "reward={alignmnt: 1.0}"], capsys)
    assert "unknown reward 'alignmnt'" in err and "'alignment'" in err


def test_empty_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n  \n# only a comment\n")
    with pytest.raises(cfg.ConfigError, match="holds no prompts"):
        build_task(cfg.load("embedded", [f"prompts.train={path}"]))


def test_missing_and_unreadable_prompt_files(tmp_path):
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        build_task(cfg.load("embedded", [f"prompts.train={tmp_path / 'nope.txt'}"]))
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(cfg.ConfigError, match="cannot be read as UTF-8"):
        build_task(cfg.load("embedded", [f"prompts.eval={binary}"]))


def test_prompt_without_a_digit_is_refused(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a handwritten digit four\na cat on a sofa\n")
    with pytest.raises(cfg.ConfigError, match="'a cat on a sofa' must name exactly one digit"):
        build_task(cfg.load("embedded", [f"prompts.train={path}"]))


def test_checkpoint_from_another_architecture(tmp_path):
    other = DigitsPolicy(TinyFluxConfig(num_layers=1))
    path = tmp_path / "other.safetensors"
    save_weights(path, trainable_state(other.model), other.arch_config())
    policy = DigitsPolicy()
    with pytest.raises(CheckpointError, match="another architecture.*num_layers"):
        load_weights(path, policy.model, policy.arch_config())
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        build_task(cfg.load("embedded", [f"model.checkpoint={tmp_path / 'missing.safetensors'}"]))


def test_checkpoint_without_metadata_but_wrong_tensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    policy = DigitsPolicy()
    with pytest.raises(CheckpointError, match="does not fit"):
        load_weights(path, policy.model, policy.arch_config())


def test_not_a_safetensors_file(tmp_path, capsys):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not safetensors at all")
    args = ["sample", "--checkpoint", str(path), "--prompt", "a seven", "--num", "1", "--out", str(tmp_path / "x.png")]
    err = _cli_error(args, capsys)
    assert "not a readable safetensors file" in err


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert "no config.yaml" in _cli_error(["train", "--resume", str(tmp_path)], capsys)


def test_reward_options_from_the_command_line():
    config = cfg.load("embedded", ["reward.quality=0.5", "reward.alignment.weight=0.7"])
    assert cfg.reward_specs(config) == {"alignment": (0.7, {}), "quality": (0.5, {})}
    with pytest.raises(cfg.ConfigError, match="reward.alignment"):
        cfg.load("embedded", ["reward.alignment=heavy"])
