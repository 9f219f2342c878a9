"""Nothing lost, nothing silent: non-finite rewards and gradients skip steps, too many stop the run with its
last checkpoint untouched, and non-finite values never enter a config or a weights file."""

import json

import pytest
import torch

from egrpo import config as cfg
from egrpo import rewards
from egrpo.checkpoint import CheckpointError, load_weights, save_weights, trainable_state
from egrpo.cli import main
from egrpo.embedded.model import DigitsPolicy
from egrpo.errors import TrainingStopped
from egrpo.trainer import Trainer, resume_changes

TINY = ["train.prompts_per_iteration=2", "train.group_size=3", "plan.active_steps=first:2", "eval.seeds_per_prompt=1"]


class NaNFrom:
    """The alignment reward, but NaN for every image from its ``first_bad``-th call on (calls ``last_bad`` and
    later are fine again when given)."""

    calls = 0

    def __init__(self, first_bad: int, last_bad: int | None = None):
        from egrpo.rewards.digits import AlignmentReward

        self.inner, self.first_bad, self.last_bad = AlignmentReward(), first_bad, last_bad

    def __call__(self, images, prompts):
        NaNFrom.calls += 1
        values = self.inner(images, prompts)
        bad = NaNFrom.calls >= self.first_bad and (self.last_bad is None or NaNFrom.calls < self.last_bad)
        return torch.full_like(values, float("nan")) if bad else values


@pytest.fixture
def nan_reward(monkeypatch):
    rewards.available()  # the built-in registry first, so the probe is added to it, not instead of it
    NaNFrom.calls = 0
    monkeypatch.setitem(rewards._REGISTRY, "nan_probe", NaNFrom)
    return "nan_probe"


def test_a_nan_reward_once_skips_that_iterations_steps_and_training_goes_on(tmp_path, eval_prompt_file, nan_reward):
    # call 1 is the base evaluation, calls 2-4 the three iterations: iteration 2 sees NaN
    config = cfg.load("embedded", [*TINY, f"prompts.eval={eval_prompt_file}", "train.iterations=3",
                                   f"reward={{{nan_reward}: {{weight: 1.0, first_bad: 3, last_bad: 4}}}}",
                                   f"output_dir={tmp_path / 'run'}"])
    Trainer(config, progress=False).train()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in lines] == [0, 2, 0]
    weights = load_file_weights(tmp_path / "run" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_nan_rewards_that_persist_stop_the_run_and_keep_the_last_checkpoint(tmp_path, eval_prompt_file, nan_reward):
    run = tmp_path / "run"
    config = cfg.load("embedded", [*TINY, f"prompts.eval={eval_prompt_file}", "train.iterations=6",
                                   "checkpoint_every=1", "train.max_skipped_steps=3",
                                   f"reward={{{nan_reward}: {{weight: 1.0, first_bad: 4}}}}", f"output_dir={run}"])
    # Iteration 3 skips its 2 steps (its checkpoint holds iteration 2's weights); iteration 4 reaches the limit.
    with pytest.raises(TrainingStopped, match=r"4 optimizer steps in a row were skipped .*iter-000003"):
        Trainer(config, progress=False).train()
    assert (run / "checkpoints" / "latest").read_text() == "iter-000003"
    assert not (run / "model.safetensors").exists()


def load_file_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("override", ["train.lr=.nan", "sampling.eta=.inf", "train.kl_coef=.inf",
                                      "plan.tau=-.inf", "reward.alignment=.nan"])
def test_non_finite_config_values_are_refused(override, capsys):
    assert main(["plan", override]) == 2
    err = capsys.readouterr().err
    assert "finite" in err and override.split("=")[0].split(".")[-1] in err and "Traceback" not in err


def test_weights_with_nan_are_refused_on_load(tmp_path):
    policy = DigitsPolicy()
    tensors = {k: v.detach().clone() for k, v in trainable_state(policy.model).items()}
    next(iter(tensors.values()))[0] = float("nan")
    save_weights(tmp_path / "bad.safetensors", tensors, policy.arch_config())
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_weights(tmp_path / "bad.safetensors", policy.model, policy.arch_config())


def test_a_run_stopped_before_its_first_checkpoint_resumes_as_a_fresh_start(tmp_path, eval_prompt_file):
    run = tmp_path / "run"
    config = cfg.load("embedded", [*TINY, f"prompts.eval={eval_prompt_file}", "train.iterations=2",
                                   f"output_dir={run}"])
    Trainer(config, progress=False)  # config.yaml and metrics.jsonl written, then "killed" before training
    assert not (run / "checkpoints").exists()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2 and (run / "model.safetensors").is_file()


def test_a_second_writer_of_a_run_directory_is_refused(tmp_path, eval_prompt_file, capsys):
    run = tmp_path / "run"
    config = cfg.load("embedded", [*TINY, f"prompts.eval={eval_prompt_file}", "train.iterations=1",
                                   f"output_dir={run}"])
    first = Trainer(config, progress=False)  # holds the lock until its train() ends
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert f"{run} is in use by process" in capsys.readouterr().err
    first.train()
    assert main(["train", "--resume", str(run), "--no-progress", "train.iterations=2"]) == 0


def test_resume_accepts_only_safe_changes_and_records_them(tmp_path, eval_prompt_file, capsys):
    run = tmp_path / "run"
    config = cfg.load("embedded", [*TINY, f"prompts.eval={eval_prompt_file}", "train.iterations=1",
                                   f"output_dir={run}"])
    Trainer(config, progress=False).train()
    assert main(["train", "--resume", str(run), "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "cannot change train.lr" in err and "model.checkpoint=" in err
    assert main(["train", "--resume", str(run), "--no-progress", "train.iterations=2", "eval.every=1"]) == 0
    (record,) = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert record["changes"] == {"train.iterations": [1, 2], "eval.every": [0, 1]}
    assert cfg.load(str(run / "config.yaml")).train.iterations == 2
    # where a reward runs may move (a reward server's URL, a device); what it scores may not
    assert main(["train", "--resume", str(run), "reward.alignment.weight=0.5"]) == 2
    assert "cannot change reward" in capsys.readouterr().err
    moved = cfg.load(str(run / "config.yaml"), ["reward.alignment.device=cpu", "reward.alignment.batch_size=16"])
    assert set(resume_changes(moved, run)) == {"reward"}


def test_a_diverging_run_stops_with_exit_1_and_publishes_no_weights(tmp_path, eval_prompt_file, capsys):
    """lr 1e6: the first update blows the weights up (finite, but 1e7 times the base's norm)."""
    run = tmp_path / "run"
    code = main(["train", "--no-progress", *TINY, f"prompts.eval={eval_prompt_file}", "train.lr=1e6",
                 "train.iterations=3", f"output_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "iteration 1: the run diverged: the trained weights' norm grew" in err and "train.lr" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diverged"]["iteration"] == 1 and summary["result"] == "base"
    assert not (run / "model.safetensors").exists() and not (run / "checkpoints").exists()


def test_divergence_after_a_checkpoint_keeps_that_checkpoint_as_the_result(tmp_path, eval_prompt_file, monkeypatch):
    """Healthy for 2 iterations (checkpointed), then the policy's samples turn NaN."""
    config = cfg.load("embedded", [*TINY, f"prompts.eval={eval_prompt_file}", "train.iterations=4",
                                   "checkpoint_every=2", f"output_dir={tmp_path / 'run'}"])
    trainer = Trainer(config, progress=False)
    healthy, iteration, broken = trainer.policy.velocity, trainer.iteration, []

    def velocity(x, sigma, cond, reference=False):
        v = healthy(x, sigma, cond, reference)
        return v * float("nan") if broken else v

    def iteration_breaking_at_the_third(it):
        if it == 2:
            broken.append(it)
        return iteration(it)

    monkeypatch.setattr(trainer.policy, "velocity", velocity)
    monkeypatch.setattr(trainer, "iteration", iteration_breaking_at_the_third)
    with pytest.raises(TrainingStopped, match="iteration 3: the run diverged: the policy's samples held NaN"):
        trainer.train()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["result"].endswith("iter-000002") and summary["diverged"]["iteration"] == 3
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "iter-000002"


@pytest.fixture
def memory_limit(monkeypatch):
    """The embedded policy's velocity raising CUDA's out-of-memory error for more than ``limit["latents"]`` latents
    (in the rollout; in the update when ``limit["update"]``), as a GPU does when a batch does not fit."""
    limit = {"latents": 8, "update": False}
    velocity = DigitsPolicy.velocity

    def limited(self, x, sigma, cond, reference=False):
        if x.shape[0] > limit["latents"] and torch.is_grad_enabled() == limit["update"]:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} latents")
        return velocity(self, x, sigma, cond, reference)

    monkeypatch.setattr(DigitsPolicy, "velocity", limited)
    return limit


@pytest.mark.parametrize("update, expected", [
    (False, "out of GPU memory in the rollout (batches of 64 latents at the time): lower train.max_batch"),
    (True, "out of GPU memory in the update (1024 inputs a forward-backward at the time): lower train.update_batch"),
])
def test_out_of_memory_is_one_line_naming_the_phase_the_batch_and_the_knobs(
    update, expected, tmp_path, eval_prompt_file, memory_limit, capsys
):
    memory_limit["update"], memory_limit["latents"] = update, 8 if not update else 1
    code = main(["train", "--no-progress", *TINY, f"prompts.eval={eval_prompt_file}", "train.max_batch=64",
                 "train.update_batch=1024", "train.iterations=1", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert expected in err and "model.gradient_checkpointing=true" in err and "no checkpoint was written yet" in err


def test_max_batch_auto_halves_on_out_of_memory_and_rolls_out_the_same_samples(
    tmp_path, eval_prompt_file, memory_limit, capsys
):
    """12 latents a rollout call, 8 fit: auto goes 1024 -> ... -> 8 and then trains as max_batch=8 does."""
    runs = {}
    for name, max_batch in (("auto", "auto"), ("eight", "8")):
        config = cfg.load("embedded", [*TINY, f"prompts.eval={eval_prompt_file}", f"train.max_batch={max_batch}",
                                       "train.iterations=1", f"output_dir={tmp_path / name}"])
        trainer = Trainer(config, progress=False)
        runs[name] = trainer.iteration(0), {k: v.clone() for k, v in trainable_state(trainer.model).items()}
    assert "out of GPU memory in the rollout at 16 latents a call; train.max_batch=auto retries it at 8" in \
        capsys.readouterr().err
    (auto, auto_weights), (eight, eight_weights) = runs["auto"], runs["eight"]
    assert auto["max_batch"] == eight["max_batch"] == 8
    assert auto["reward_mean"] == eight["reward_mean"] and auto["loss"] == eight["loss"]
    assert all(torch.equal(auto_weights[k], eight_weights[k]) for k in auto_weights)


def test_a_start_that_failed_before_its_first_iteration_leaves_a_directory_a_rerun_takes_over(
    tmp_path, eval_prompt_file, monkeypatch, capsys
):
    run, common = tmp_path / "run", ["train", "--no-progress", *TINY, f"prompts.eval={eval_prompt_file}",
                                     "train.iterations=1", f"output_dir={tmp_path / 'run'}"]
    evaluate = Trainer.evaluate

    def reward_server_gone(self):  # what a reward server that stops answering does to the base evaluation
        raise OSError("reward http: http://127.0.0.1:9/score: cannot connect")

    monkeypatch.setattr(Trainer, "evaluate", reward_server_gone)
    assert main(common) == 2
    assert (run / "config.yaml").exists() and (run / "metrics.jsonl").read_text() == ""
    capsys.readouterr()
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    assert main(common) == 0, capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["iterations"] == 1


def test_a_file_where_the_tensorboard_folder_goes_is_refused_before_the_weights_load(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").write_text("not a folder")
    assert main(["train", "--no-progress", "logging.tensorboard=true", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"egrpo train: error: logging.tensorboard: {tmp_path / 'run' / 'tensorboard'} is a file, where "
                   "the run writes that folder; move it away or pick another output_dir")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["tensorboard"]
