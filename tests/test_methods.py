"""Each baseline is a configuration of the one engine: its plan, groups and network calls, and one real iteration."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from egrpo import config as cfg
from egrpo.methods import METHODS, build_method
from egrpo.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.prompts_per_iteration=2", "train.group_size=3", "eval.seeds_per_prompt=1"]


def _method(name, *overrides):
    return build_method(cfg.load("embedded", [f"method={name}", *overrides]))


def test_egrpo_plan():
    d = _method("egrpo").describe()
    assert d["trained_steps"] == list(range(8)) and d["merge_lengths"] == [1, 1, 2, 2, 2, 3, 3, 3]
    assert d["group"] == "prompt x step"
    # 16 anchor calls, completions (15+14+12+11+10+8+7+6) x G=8, 8 update calls.
    assert d["network_calls"] == 16 + 83 * 8 + 8


def test_g2rpo_plan_single_steps_and_two_granularities():
    m = _method("g2rpo")
    d = m.describe()
    assert d["merge_lengths"] == [1] * 8 and m.config.method.granularities == [1, 2]
    fine = sum(16 - (i + 1) for i in range(8))
    coarse = sum(-(-(16 - (i + 1)) // 2) for i in range(8))
    assert d["network_calls"] == 16 + (fine + coarse) * 8 + 8


def test_tempflow_branches_at_every_step_with_noise_level_weights():
    m = _method("tempflow")
    assert m.describe()["trained_steps"] == list(range(16))
    weights = m.step_weights()
    assert sum(weights.values()) / 16 == pytest.approx(1.0)
    assert weights[0] > weights[8] > weights[15]


def test_flowgrpo_trains_every_step_of_whole_trajectories():
    d = _method("flowgrpo").describe()
    assert d["sde_steps"] == d["trained_steps"] == list(range(16)) and d["group"] == "prompt"
    assert d["network_calls"] == 8 * 16 * 2


def test_flowgrpo_fast_window_lies_in_the_first_half():
    m = _method("flowgrpo-fast")
    for it in range(20):
        sde, trained = m.trajectory_steps(it, torch.Generator().manual_seed(it))
        assert sde == trained and len(sde) == 2 and sde[-1] < 8


def test_dancegrpo_all_sde_with_a_random_60_percent_trained():
    m = _method("dancegrpo")
    assert m.config.sampling.noise == "dance" and m.config.sampling.eta == 0.3
    sde, trained = m.trajectory_steps(0, torch.Generator().manual_seed(0))
    assert sde == list(range(16)) and len(trained) == 10 and set(trained) <= set(sde)
    other = m.trajectory_steps(0, torch.Generator().manual_seed(1))[1]
    assert other != trained


def test_egrpo_network_calls_per_prompt():
    d = _method("egrpo", "plan.tau=0", "plan.active_steps=first:2", "train.group_size=3").describe()
    # anchor 16; branch from step 0 lands at 1 (15 ODE steps left), from step 1 at 2 (14 left); G = 3; 2 updates
    assert (d["network_calls"], d["update_calls"]) == (16 + (15 + 14) * 3 + 2, 2)


def test_user_values_beat_method_defaults():
    assert _method("dancegrpo", "sampling.eta=0.5").config.sampling.eta == 0.5


def test_mixgrpo_window_slides_and_wraps():
    m = _method("mixgrpo", "train.iterations=16", "method.window_shift_every=2")
    starts = [m.trajectory_steps(it, torch.Generator())[0][0] for it in range(0, 18, 2)]
    assert starts == [0, 1, 2, 3, 4, 5, 6, 7, 0]
    assert len(m.trajectory_steps(0, torch.Generator())[0]) == 4


@pytest.mark.parametrize("name,half_only", [("mixgrpo", False), ("flowgrpo-fast", True)])
def test_a_window_the_method_accepts_is_the_window_it_trains(name, half_only):
    """Every window either is refused or gives, at every iteration, exactly that many consecutive steps on the
    grid: never cut by the grid's end, never every step (MixGRPO), always in the first half (Flow-GRPO-Fast)."""
    config = cfg.load("embedded", [f"method={name}", "train.iterations=40", "method.window_shift_every=1"])
    for num_steps in range(2, 17):
        accepted = []
        for window in range(1, num_steps + 2):
            config.sampling.num_steps, config.method.window = num_steps, window
            try:
                cfg.validate(config)
            except cfg.ConfigError as exc:
                assert f"method.window={window}" in str(exc) and f"1..{max(accepted, default=0)}" in str(exc)
                continue
            accepted.append(window)
            m = build_method(config)
            for it in range(num_steps):
                sde, trained = m.trajectory_steps(it, torch.Generator().manual_seed(it))
                assert sde == trained == list(range(sde[0], sde[0] + window)) and len(sde) < num_steps
                assert sde[-1] < num_steps // 2 if half_only else sde[-1] < num_steps
        assert accepted == list(range(1, len(accepted) + 1)) and accepted, (num_steps, accepted)


def test_a_branch_subsample_the_method_accepts_is_what_each_iteration_trains():
    config = cfg.load("embedded", ["method=egrpo-fast", "plan.active_steps=first:3"])
    for k in (1, 2, 3):
        config.method.branch_subsample = k
        cfg.validate(config)
        assert len(build_method(config).branches(torch.Generator().manual_seed(k))) == k
    config.method.branch_subsample = 4
    with pytest.raises(cfg.ConfigError, match=r"method.branch_subsample=4: the plan has 3 branch steps .* use 1..3"):
        cfg.validate(config)


def test_dancegrpo_refuses_a_fraction_that_trains_no_step():
    config = cfg.load("embedded", ["method=dancegrpo", "plan.active_steps=first:4"])
    config.method.train_fraction = 0.126  # 0.504 of a step: rounds to the one step it trains
    cfg.validate(config)
    assert len(build_method(config).trajectory_steps(0, torch.Generator())[1]) == 1
    config.method.train_fraction = 0.125
    with pytest.raises(cfg.ConfigError, match=r"train_fraction=0.125 trains .* = 0 of the 4 .* above 0.125"):
        cfg.validate(config)


def test_branchgrpo_default_splits_are_distinct_on_every_grid_they_fit():
    config = cfg.load("embedded", ["method=branchgrpo"])
    for num_steps in range(2, 41):
        config.sampling.num_steps = num_steps
        try:
            cfg.validate(config)
        except cfg.ConfigError as exc:
            assert num_steps < 4 and "method.split_steps=null" in str(exc)
            continue
        splits = build_method(config).split_steps()
        assert len(set(splits)) == 4 and all(0 <= i < num_steps for i in splits)


def test_every_method_s_defaults_fit_every_grid_of_5_steps_or_more():
    for name in METHODS:
        for num_steps in range(5, 33, 3):
            cfg.load("embedded", [f"method={name}", f"sampling.num_steps={num_steps}"])


def test_branchgrpo_tree():
    m = _method("branchgrpo")
    d = m.describe()
    assert d["sde_steps"] == [0, 2, 5, 7]  # the authors' 0, 3, 6, 9 of 20 on 16 steps
    assert d["leaves"] == 16 and d["group"] == "prompt x depth"
    # nodes per step: 2 at steps 1-2, 4 at 3-5, 8 at 6-7, 16 at 8-15 (1 at step 0) + updates 1+2+4+8
    assert d["network_calls"] == 1 + 2 * 2 + 4 * 3 + 8 * 2 + 16 * 8 + 15


def test_unknown_method_suggests():
    with pytest.raises(cfg.ConfigError, match="'dancegrpo'"):
        cfg.load("embedded", ["method=dancegrp"])


@pytest.mark.parametrize("name", METHODS)
def test_one_real_iteration_of_each_method(name, tmp_path, eval_prompt_file):
    config = cfg.load("embedded", [f"method={name}", *TINY, f"output_dir={tmp_path / name}",
                                   f"prompts.eval={eval_prompt_file}"])
    trainer = Trainer(config, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.iteration(0)
    # The sampling std and the log-prob's std agree (BranchGRPO's scaled noise included): ratio 1 at first.
    assert metrics["first_ratio_max_dev"] == 0.0
    # describe() counts one prompt; this iteration ran two (which steps DanceGRPO and Flow-GRPO-Fast draw
    # varies, how many does not).
    described = trainer.method.describe(0)
    if described.get("calls_are_mean"):  # egrpo-fast: the branches it draws finish in different numbers of calls
        assert 0.5 < metrics["network_calls"] / (2 * described["network_calls"]) < 1.5
    else:
        assert metrics["network_calls"] == 2 * described["network_calls"]
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("name", ["egrpo", "flowgrpo", "branchgrpo"])
def test_chunked_updates_accumulate_to_the_same_step(name, tmp_path, eval_prompt_file):
    weights = []
    for chunk in (64, 2):
        config = cfg.load("embedded", [f"method={name}", *TINY, f"output_dir={tmp_path / str(chunk)}",
                                       f"prompts.eval={eval_prompt_file}", f"train.update_batch={chunk}"])
        trainer = Trainer(config, progress=False)
        trainer.iteration(0)
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])


def test_egrpo_without_merging_equals_single_granularity_g2rpo(tmp_path, eval_prompt_file):
    common = [*TINY, "train.iterations=2", f"prompts.eval={eval_prompt_file}"]
    runs = {}
    for name, extra in (("egrpo", ["plan.tau=0"]), ("g2rpo", ["method.granularities=[1]"])):
        config = cfg.load("embedded", [f"method={name}", *common, *extra, f"output_dir={tmp_path / name}"])
        Trainer(config, progress=False).train()
        runs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    assert all(torch.equal(runs["egrpo"][k], runs["g2rpo"][k]) for k in runs["egrpo"])


def test_a_new_method_is_one_class_and_trains_through_the_unchanged_trainer(tmp_path, eval_prompt_file, monkeypatch):
    from egrpo.methods import TrajectoryMethod

    class LastStep(TrajectoryMethod):
        name, label = "last-step", "last step only"
        defaults = {"train.group_size": 3}

        def trajectory_steps(self, iteration, generator):
            last = self.config.sampling.num_steps - 1
            return [last], [last]

    monkeypatch.setitem(METHODS, LastStep.name, LastStep)
    config = cfg.load("embedded", ["method=last-step", "train.prompts_per_iteration=2", "eval.seeds_per_prompt=1",
                                   f"prompts.eval={eval_prompt_file}", f"output_dir={tmp_path / 'run'}"])
    assert config.train.group_size == 3
    trainer = Trainer(config, progress=False)
    metrics = trainer.iteration(0)
    assert metrics["first_ratio_max_dev"] == 0.0
    assert metrics["network_calls"] == 2 * trainer.method.describe()["network_calls"]


def test_no_code_outside_the_registry_tests_a_method_name():
    names = "|".join(re.escape(n) for n in METHODS)
    compare = re.compile(rf"""(==|!=|\bin)\s*[(\[{{]?[^)\]}}\n]*["']({names})["']""")
    offenders = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in sorted((ROOT / "egrpo").rglob("*.py")) if path.name != "methods.py"
        for i, line in enumerate(path.read_text().splitlines(), 1) if compare.search(line)
    ]
    assert offenders == []
