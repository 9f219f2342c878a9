"""Fast E-GRPO: cheap ODE completions (coarse grids, second-order solvers), branch subsampling, the egrpo-fast
method, and the completion-signal figure."""

import json
import math

import pytest
import torch

from egrpo import config as cfg
from egrpo.cli import main
from egrpo.embedded.assets import load_base_policy
from egrpo.methods import build_method
from egrpo.planner import make_plan
from egrpo.rollout import rollout_branches, solve_ode
from egrpo.stepmath import shifted_grid_from, time_grid
from egrpo.trainer import Trainer

C = 0.3  # data ~ N(0, C^2): the probability-flow ODE has a closed form


def _gaussian_velocity(x, sigma, cond):
    s = sigma.double().view(-1, *([1] * (x.dim() - 1)))
    var = (1 - s) ** 2 * C * C + s * s
    return x * (s - (1 - s) * C * C) / var


def _ode_error(solver: str, steps: int, end: float = 0.0) -> float:
    """Largest error of ``steps`` uniform steps from sigma 0.8 to ``end`` against the exact flow (fp64)."""
    noise = torch.randn(256, 1, generator=torch.Generator().manual_seed(0)).double()
    exact = [noise * math.sqrt((1 - s) ** 2 * C * C + s * s) for s in (0.8, end)]
    grids = torch.linspace(0.8, end, steps + 1, dtype=torch.float64).expand(256, -1)
    out, _ = solve_ode(_gaussian_velocity, exact[0], {"c": torch.zeros(256, 1)}, grids, solver)
    return float((out - exact[1]).abs().max())


def test_the_completion_grid_from_a_grid_point_is_that_grids_tail():
    sigmas = time_grid(16, 3.0)
    for i in (1, 5, 12):
        assert torch.allclose(shifted_grid_from(sigmas[i : i + 1], 16 - i, 3.0)[0], sigmas[i:], atol=1e-14)


def test_second_order_solvers_converge_at_second_order():
    euler = [_ode_error("euler", n, end=0.05) for n in (32, 64)]
    assert 1.8 < euler[0] / euler[1] < 2.2  # first order: halving the step halves the error
    for solver in ("heun", "dpm2m"):
        errors = [_ode_error(solver, n, end=0.05) for n in (32, 64)]
        assert errors[0] / errors[1] > 3.5, (solver, errors)  # second order: a quarter
        # down to sigma = 0 the last step is first order, and still far closer than Euler at equal steps
        assert _ode_error(solver, 16) < 0.2 * _ode_error("euler", 16)


def _plan():
    return make_plan(num_steps=8, shift=3.0, eta=0.7, tau=2.2, active_steps=[0, 1, 2, 3])


def test_cheap_completions_keep_the_trained_transitions_and_cost_what_they_say():
    policy = load_base_policy()
    cond = policy.encode(["a handwritten digit four", "someone wrote the number nine"])
    plan, p, g = _plan(), 2, 3

    def run(**options):
        gens = [torch.Generator().manual_seed(k) for k in range(p)]
        return rollout_branches(policy, plan, cond, g, gens, **options)

    full = run()
    for options, per_sample in [
        ({"completion_steps": 2}, 2),
        ({"completion_steps": 3, "solver": "heun"}, 5),  # a second call per step but the last
        ({"completion_steps": 3, "solver": "dpm2m"}, 3),
    ]:
        cheap = run(**options)
        assert cheap.network_calls == p * plan.num_steps + p * len(plan.branches) * g * per_sample
        for a, b in zip(full.train_steps, cheap.train_steps):  # the jumps and their log-probs are untouched
            assert torch.equal(a.samples, b.samples) and torch.equal(a.log_probs, b.log_probs)
        assert not torch.equal(full.finals, cheap.finals)
    euler_stride = run(granularities=(2,))
    dpm_stride = run(granularities=(2,), solver="dpm2m")
    assert euler_stride.network_calls == dpm_stride.network_calls < full.network_calls


def _config(tmp_path, *overrides):
    return cfg.load("embedded", [f"output_dir={tmp_path / 'run'}", "train.prompts_per_iteration=2",
                                 "train.group_size=3", *overrides])


@pytest.mark.parametrize("overrides", [
    ["method=egrpo-fast", "method.branch_subsample=null"],
    ["method=egrpo-fast", "method.granularities=[1]", "method.completion_steps=2", "method.completion_solver=heun"],
    ["method=egrpo", "method.completion_steps=3", "method.branch_subsample=3"],
])
def test_described_calls_are_the_calls_an_iteration_makes(tmp_path, overrides):
    config = _config(tmp_path, *overrides)
    trainer = Trainer(config, progress=False)
    metrics = trainer.iteration(0)
    described = build_method(config).describe()
    assert metrics["network_calls"] == described["network_calls"] * config.train.prompts_per_iteration
    assert metrics["first_ratio_max_dev"] == 0.0
    assert metrics["optimizer_steps"] + metrics["skipped_steps"] == described["trained_per_iteration"]


def test_branch_subsampling_draws_k_steps_per_iteration_by_entropy(tmp_path):
    config = _config(tmp_path, "method.branch_subsample=2", "method.subsample_weights=entropy")
    method = build_method(config)
    planned = method.plan.branches
    draws = [method.branches(torch.Generator().manual_seed(i)) for i in range(3000)]
    assert all(len(d) == 2 and d == sorted(d, key=lambda b: b.step) for d in draws)
    assert len({tuple(b.step for b in d) for d in draws}) > 1
    # a step with higher merged entropy is drawn more often: ordered as the entropies are
    counts = {b.step: sum(b in d for d in draws) for b in planned}
    lowest, highest = min(planned, key=lambda b: b.entropy_merged), max(planned, key=lambda b: b.entropy_merged)
    assert counts[highest.step] > counts[lowest.step]
    config.method.subsample_weights = "uniform"
    uniform = build_method(config)
    counts = [sum(b in uniform.branches(torch.Generator().manual_seed(i)) for i in range(3000)) for b in planned]
    assert max(counts) - min(counts) < 0.1 * 3000 * 2 / len(planned) * 2


def test_egrpo_fast_trains_from_the_command_line(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--method", "egrpo-fast", f"output_dir={run}", "train.iterations=2",
                 "train.prompts_per_iteration=2", "train.group_size=3", "eval.seeds_per_prompt=1"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["optimizer_steps"] + line["skipped_steps"] == 2 for line in lines)
    written = cfg.load(str(run / "config.yaml"))
    assert written.method.granularities == [4] and written.method.completion_solver == "dpm2m"
    assert written.method.branch_subsample == 2


def test_the_completion_figure_compares_every_setting_with_the_full_completion(tmp_path):
    out = tmp_path / "completion.png"
    assert main(["figures", "completion", "train.prompts_per_iteration=2", "train.group_size=4",
                 "plan.active_steps=first:3", "--batches", "1", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    results, reference = data["results"], data["results"][data["reference"]]
    assert reference["spearman"] == pytest.approx(1.0) and reference["sign_agreement"] == 1.0
    assert data["branch_steps"] == [0, 1, 2] and len(reference["spearman_per_step"]) == 3
    for name, r in results.items():
        assert -1.0 <= r["spearman"] <= 1.0 and 0.0 <= r["sign_agreement"] <= 1.0
        if name != data["reference"]:
            assert r["completion_calls_per_sample"] < reference["completion_calls_per_sample"]
    assert out.stat().st_size > 1000
