import json

import pytest

from egrpo import config as cfg
from egrpo.cli import main
from egrpo.planner import make_plan, plan_kwargs, resolve_active_steps

ORACLE = {
    2.2: [1, 1, 2, 2, 2, 3, 3, 3],
    1.8: [1, 1, 1, 2, 2, 2, 2, 3],
    2.0: [1, 1, 1, 2, 2, 2, 3, 3],
    2.6: [1, 1, 2, 3, 3, 4, 4, 4],
    0.0: [1] * 8,
}


@pytest.mark.parametrize("tau", sorted(ORACLE))
def test_adaptive_merge_matches_the_paper_oracle(tau):
    plan = make_plan(num_steps=16, shift=3.0, eta=0.7, active_steps="first:8", tau=tau)
    assert plan.merge_lengths == ORACLE[tau]
    assert all(b.entropy_merged >= tau or b.landing == 16 for b in plan.branches)


@pytest.mark.parametrize("tau", sorted(ORACLE))
def test_plan_json_cli_matches_the_oracle(tau, capsys):
    args = ["plan", f"plan.tau={tau}", "sampling.num_steps=16", "plan.active_steps=[0,1,2,3,4,5,6,7]", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["merge_lengths"] == ORACLE[tau]
    assert len(out["steps"]) == 16


def test_plan_table_cli_prints_every_step(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "merge_lengths: [1, 1, 2, 2, 2, 3, 3, 3]" in out
    assert len([l for l in out.splitlines() if l.strip() and l.split()[0].isdigit()]) == 16


def test_merge_is_capped_at_the_end_of_the_grid():
    plan = make_plan(active_steps="all", tau=100.0)
    assert [b.landing for b in plan.branches] == [16] * 16


def test_fixed_and_list_strategies():
    assert make_plan(merge="fixed", merge_length=4).merge_lengths == [4] * 8
    plan = make_plan(merge="fixed", merge_length=6, active_steps="second-half")
    assert plan.merge_lengths == [6, 6, 6, 5, 4, 3, 2, 1]
    assert make_plan(merge="list", active_steps=[0, 3], merge_lengths=[2, 5]).merge_lengths == [2, 5]


@pytest.mark.parametrize(
    "spec, expected",
    [("first-half", list(range(8))), ("second-half", list(range(8, 16))), ("all", list(range(16))),
     ("first:4", [0, 1, 2, 3]), ("last:2", [14, 15]), ([5, 1], [1, 5])],
)
def test_active_step_specs(spec, expected):
    assert resolve_active_steps(spec, 16) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tau=-0.5), "tau must be >= 0"),
        (dict(active_steps=[3, 16]), "outside the grid"),
        (dict(active_steps="first:17"), "1..16"),
        (dict(active_steps="middle"), "not understood"),
        (dict(merge="list", merge_lengths=[1, 2]), "one entry per active step"),
        (dict(merge="list", active_steps=[15], merge_lengths=[2]), "leaves the grid"),
        (dict(merge="sometimes"), "not one of"),
    ],
)
def test_bad_plans_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_plan(**kwargs)


def test_the_plan_measures_the_entropy_of_the_sde_the_rollout_samples():
    """With DanceGRPO's constant noise, std_t is eta at every step, not Flow-GRPO's sqrt(sigma / (1 - sigma))."""
    import math

    dance = make_plan(noise="dance", eta=0.7, tau=0.5, active_steps="first:4")
    sig = dance.sigmas
    for row in dance.table()[:4]:
        i = row["step"]
        assert row["entropy"] == pytest.approx(math.sqrt(2 * math.pi * math.e * 0.49 * float(sig[i] - sig[i + 1])))
    assert dance.merge_lengths != make_plan(noise="flow", eta=0.7, tau=0.5, active_steps="first:4").merge_lengths
    assert cfg.load("embedded", ["sampling.noise=dance"]).sampling.noise == "dance"
    assert plan_kwargs(cfg.load("embedded", ["sampling.noise=dance"]))["noise"] == "dance"
