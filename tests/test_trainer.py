import json

import pytest
import torch
from safetensors.torch import load_file

from egrpo import config as cfg
from egrpo.cli import main
from egrpo.trainer import Trainer


def _config(tmp_path, overrides, name="run", iterations=2, extra=()):
    return cfg.load("embedded", overrides + [f"output_dir={tmp_path / name}", f"train.iterations={iterations}", *extra])


def test_first_update_ratio_is_exactly_one(tmp_path, tiny_overrides):
    trainer = Trainer(_config(tmp_path, tiny_overrides, iterations=1), progress=False)
    metrics = trainer.iteration(0)
    assert metrics["first_ratio_max_dev"] == 0.0
    assert metrics["network_calls"] > 0
    assert set(metrics) >= {"reward_mean", "reward_std", "anchor_reward", "loss", "ratio_mean", "clip_fraction",
                            "grad_norm", "seconds_rollout", "seconds_reward", "seconds_update"}


@pytest.fixture
def restores_determinism(monkeypatch):
    """train.deterministic changes process-wide switches: put them back for the tests that follow."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.cudnn_sdp_enabled())
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]
    torch.backends.cuda.enable_mem_efficient_sdp(saved[3])
    torch.backends.cuda.enable_cudnn_sdp(saved[4])


def test_deterministic_switches_every_source_of_gpu_nondeterminism(tmp_path, tiny_overrides, restores_determinism):
    import os

    torch.backends.cuda.enable_mem_efficient_sdp(True)
    trainer = Trainer(_config(tmp_path, tiny_overrides, iterations=1, extra=["train.deterministic=true"]),
                      progress=False)
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.mem_efficient_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
    assert trainer.iteration(0)["first_ratio_max_dev"] == 0.0  # every op of an iteration has a deterministic kernel


# The KL schedule case: its weight is derived from the iteration, so the resumed half trains with the same weights.
@pytest.mark.parametrize("deterministic, schedule", [
    (False, []), (True, []), (False, ["train.kl_schedule=cosine", "train.kl_coef=2", "train.kl_coef_end=0.1"]),
])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_overrides, deterministic, schedule,
                                                                  restores_determinism):
    extra = ["checkpoint_every=3", f"train.deterministic={str(deterministic).lower()}", *schedule]
    straight = Trainer(_config(tmp_path, tiny_overrides, "straight", 4, extra), progress=False)
    straight.train()

    interrupted = Trainer(_config(tmp_path, tiny_overrides, "resumed", 4, extra), progress=False)
    original = interrupted.iteration

    def iteration_then_ctrl_c(it):
        metrics = original(it)
        if it == 1:
            interrupted._request_stop(None, None)  # what the SIGINT handler does
        return metrics

    interrupted.iteration = iteration_then_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text() == "iter-000002"

    resumed_config = cfg.load(str(tmp_path / "resumed" / "config.yaml"))
    Trainer(resumed_config, tmp_path / "resumed", resume=True, progress=False).train()

    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rewards = [[json.loads(l)["reward_mean"] for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
               for n in ("straight", "resumed")]
    assert rewards[0] == rewards[1] and len(rewards[0]) == 4
    if schedule:
        weights = [[json.loads(l)["kl_coef"] for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
                   for n in ("straight", "resumed")]
        assert weights[0] == weights[1] and weights[0][0] == 2.0 and weights[0][-1] == pytest.approx(0.1)


def test_resume_needs_a_run_directory(tmp_path, tiny_overrides):
    config = _config(tmp_path, tiny_overrides)
    with pytest.raises(cfg.ConfigError, match="holds no run to resume"):
        Trainer(config, tmp_path / "empty", resume=True, progress=False)


def test_a_new_run_refuses_to_overwrite_an_old_one(tmp_path, tiny_overrides):
    """Once an iteration was logged; a start that failed before that is taken over (tests/test_reliability.py)."""
    Trainer(_config(tmp_path, tiny_overrides, iterations=1), progress=False).train()
    with pytest.raises(cfg.ConfigError, match="already holds a run"):
        Trainer(_config(tmp_path, tiny_overrides), progress=False)


def test_kl_term_is_logged_and_zero_on_the_first_step(tmp_path, tiny_overrides):
    trainer = Trainer(_config(tmp_path, tiny_overrides, extra=["train.kl_coef=0.04"]), progress=False)
    metrics = trainer.iteration(0)
    assert metrics["kl"] > 0  # averaged over steps: the policy moves after the first optimizer step
    assert metrics["first_ratio_max_dev"] == 0.0


def test_per_reward_normalisation_equals_the_total_for_one_reward_and_differs_for_two(tmp_path, tiny_overrides):
    def weights_after_one_iteration(name, *extra):
        trainer = Trainer(_config(tmp_path, tiny_overrides, name, extra=list(extra)), progress=False)
        trainer.iteration(0)
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    per_reward = "train.reward_normalization=per_reward"
    assert same(weights_after_one_iteration("total"), weights_after_one_iteration("per", per_reward))
    two = "reward.quality=1"
    assert not same(weights_after_one_iteration("total2", two), weights_after_one_iteration("per2", two, per_reward))
    with pytest.raises(cfg.ConfigError, match="reward_normalization must be 'total' or 'per_reward'"):
        _config(tmp_path, tiny_overrides, "bad", extra=["train.reward_normalization=zscore"])


def test_cli_train_writes_the_run_directory_and_sample_reads_it(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "cli"
    assert main(["train", *tiny_overrides, f"output_dir={run}", "train.iterations=2", "--no-progress"]) == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "reward_curve.png",
                 "samples.png", "plan.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["seconds"] > 0
    for key in ("alignment", "accuracy", "quality"):
        assert key in summary["base"] and key in summary["final"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    out = tmp_path / "seven.png"
    args = ["sample", "--checkpoint", str(run), "--prompt", "a handwritten seven", "--num", "4", "--out", str(out)]
    assert main(args) == 0
    assert out.stat().st_size > 1000


def test_embedded_run_raises_held_out_alignment(tmp_path, eval_prompt_file):
    """A short real run: held-out alignment must rise clearly over the base model."""
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("\n".join(f"the numeral {w} in handwriting" for w in
                                 ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")))
    config = cfg.load("embedded", [f"output_dir={tmp_path / 'learn'}", "train.iterations=6",
                                   "train.prompts_per_iteration=6", "train.group_size=6", "plan.active_steps=first:4",
                                   "eval.seeds_per_prompt=3", f"prompts.eval={prompts}"])
    summary = Trainer(config, progress=False).train()
    assert summary["final"]["alignment"] > summary["base"]["alignment"] + 0.05
