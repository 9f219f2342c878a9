"""``egrpo figures``: the paper's figures, one command each, as a PNG plus the plotted numbers as JSON.

- ``entropy``: per-step entropy H(i, l) for merge lengths 1..k, with tau and the planned jumps (Fig. 1b).
- ``spread``: the within-group reward spread when G samples branch at each step, single-step jump
  vs the planned merged jump (Fig. 1a, the paper's core observation).
- ``completion``: how much of that signal a cheap ODE completion keeps: within-group rank correlation and
  advantage sign agreement with the full completion, per branch step and completion setting (fast E-GRPO).
- ``curves``: training reward curves of several runs, one line per run (Fig. 4).
- ``grid``: the same held-out prompts and seeds, one column per checkpoint (Figs. 6-7).
- ``failures``: samples whose preference reward rose while a second reward fell, i.e. reward
  hacking (Fig. 8).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Sequence

import torch

from egrpo import config as cfg
from egrpo.planner import make_plan, resolve_active_steps
from egrpo.report import plt, show_image, wrapped
from egrpo.stepmath import step_entropy, time_grid


def _write(fig, out: Path, data: dict) -> dict:
    """Save the figure and, beside it, the numbers it plots (same name, .json)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    return data


def _hide_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


# ---- (a) entropy -------------------------------------------------------------------------------------
def entropy(config: cfg.Config, out: Path, max_length: int = 6) -> dict:
    """H(i, l) at every step i for l = 1..max_length, tau as a line, the plan's chosen (i, l_i) marked."""
    s, p = config.sampling, config.plan
    sigmas = time_grid(s.num_steps, s.shift, s.shift_terminal)
    plan = make_plan(**cfg.plan_kwargs(config))
    curves = {
        l: [step_entropy(sigmas, i, l, s.eta, s.noise) if i + l <= s.num_steps else None for i in range(s.num_steps)]
        for l in range(1, max_length + 1)
    }
    fig, ax = plt.subplots(figsize=(7.5, 4))
    colors = plt.cm.viridis([k / max(1, max_length - 1) for k in range(max_length)])
    for (l, values), color in zip(curves.items(), colors):
        steps = [i for i, v in enumerate(values) if v is not None]
        ax.plot(steps, [values[i] for i in steps], "o-", ms=3, lw=1.2, color=color, label=f"l = {l}")
    chosen = [(b.step, b.entropy_merged, b.length) for b in plan.branches]
    ax.scatter([c[0] for c in chosen], [c[1] for c in chosen], s=90, facecolors="none", edgecolors="#d1495b",
               linewidths=1.6, zorder=5, label="planned jump l_i")
    for step, value, length in chosen:
        ax.annotate(str(length), (step, value), xytext=(0, 7), textcoords="offset points", ha="center",
                    fontsize=7, color="#d1495b")
    if p.merge == "adaptive" and p.tau > 0:
        ax.axhline(p.tau, color="black", ls="--", lw=1, label=f"tau = {p.tau}")
    ax.set_xlabel("denoising step i (sigma 1 -> 0)")
    ax.set_ylabel("H(i, l): exp. entropy per dimension")
    ax.set_title(f"Entropy of a jump i -> i + l (T={s.num_steps}, shift={s.shift}, eta={s.eta})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _write(fig, out, {"tau": p.tau, "merge": p.merge, "entropy": {str(l): v for l, v in curves.items()},
                             "plan": plan.to_json()})


# ---- (b) spread -----------------------------------------------------------------------------------------
def _base_model(config: cfg.Config):
    """(task, reward) for measurements on the config's model, in eval mode."""
    from egrpo.rewards import WeightedReward
    from egrpo.tasks import build_task

    task = build_task(config)
    task.policy.model.eval()
    return task, WeightedReward(cfg.reward_specs(config))


def _same_draws(config: cfg.Config, task, batches: int):
    """Per batch: its prompts, their conditioning, and a function returning fresh per-prompt generators that
    start alike for every variant compared on the batch, so the variants see the same noises."""
    n_prompts = min(config.train.prompts_per_iteration, len(task.train_prompts))
    for b in range(batches):
        draw = torch.Generator().manual_seed(config.seed * 7919 + b)
        rows = torch.randperm(len(task.train_prompts), generator=draw)[:n_prompts]
        prompts = [task.train_prompts[int(r)] for r in rows]

        def generators(b=b):
            return [torch.Generator().manual_seed((config.seed * 1009 + b) * 101 + k) for k in range(n_prompts)]

        yield prompts, task.policy.encode(prompts), generators


def spread(config: cfg.Config, out: Path, batches: int = 2) -> dict:
    """Branch G samples from the ODE anchor at EVERY step, once with a single-step SDE jump and once with
    the configured merge rule, finish by ODE, and measure the std of the reward within each group.

    Both variants use the same prompts, initial noises and jump noises, so they differ only in the jump.
    """
    from egrpo.rollout import network_batch, rollout_branches

    task, reward = _base_model(config)
    policy = task.policy
    t, s, p = config.train, config.sampling, config.plan
    every_step = {**cfg.plan_kwargs(config), "active_steps": "all"}
    rule = f"tau = {p.tau}" if p.merge == "adaptive" else f"{p.merge} {p.merge_length}"
    variants = {
        "single-step jump": make_plan(**{**every_step, "merge": "fixed", "merge_length": 1}),
        f"merged jump ({rule})": make_plan(**every_step),
    }
    n_prompts, group = min(t.prompts_per_iteration, len(task.train_prompts)), t.group_size
    stds: dict[str, list[list[float]]] = {name: [[] for _ in range(s.num_steps)] for name in variants}
    for prompts, cond, generators in _same_draws(config, task, batches):
        for name, plan in variants.items():
            ro = rollout_branches(policy, plan, cond, group, generators(), s.noise, network_batch(t.max_batch))
            scores, _ = reward.score(policy.decode(ro.finals), [prompts[int(r)] for r in ro.final_rows])
            for ts in ro.train_steps:
                per_group = scores[ts.leaves[:, 0]].reshape(n_prompts, group).std(1, unbiased=False)
                stds[name][ts.step].extend(per_group.tolist())

    def summary(values: list[float]) -> tuple[float, float]:
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
        return mean, sd / math.sqrt(len(values))

    lengths = list(variants.values())[1].merge_lengths
    trained = resolve_active_steps(p.active_steps, s.num_steps)
    data = {
        "groups_per_step": n_prompts * batches,
        "group_size": group,
        "merge_lengths": lengths,
        "trained_steps": trained,
        "within_group_reward_std": {name: [summary(v) for v in per_step] for name, per_step in stds.items()},
    }
    fig, ax = plt.subplots(figsize=(7.5, 4))
    steps = list(range(s.num_steps))
    for (name, values), color in zip(data["within_group_reward_std"].items(), ("#6c757d", "#d1495b")):
        ax.errorbar(steps, [m for m, _ in values], yerr=[e for _, e in values], fmt="o-", ms=4, capsize=2,
                    color=color, label=name)
    for i in trained:
        label = "steps E-GRPO trains" if i == trained[0] else None
        ax.axvspan(i - 0.5, i + 0.5, color="#fde2e4", zorder=0, label=label)
    ax.set_xticks(steps, [f"{i}\n{length}" for i, length in zip(steps, lengths)], fontsize=7)
    ax.set_xlabel("step i where the group branches off the ODE anchor (below it: merged length l_i)")
    ax.set_ylabel("within-group reward std")
    ax.set_title(f"Reward signal per branching step ({n_prompts * batches} groups of {group} per step)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _write(fig, out, data)


# ---- completion signal (fast E-GRPO) --------------------------------------------------------------
COMPLETIONS: dict[str, dict] = {
    "every step, Euler": {},  # the reference: the paper's completion
    "stride 2, Euler": {"stride": 2},
    "stride 2, DPM++(2M)": {"stride": 2, "solver": "dpm2m"},
    "stride 4, Euler": {"stride": 4},
    "stride 4, DPM++(2M)": {"stride": 4, "solver": "dpm2m"},
    "stride 6, DPM++(2M)": {"stride": 6, "solver": "dpm2m"},
    "1 step": {"steps": 1},
    "2 steps, Euler": {"steps": 2},
    "2 steps, DPM++(2M)": {"steps": 2, "solver": "dpm2m"},
    "2 steps, Heun": {"steps": 2, "solver": "heun"},
    "3 steps, Euler": {"steps": 3},
    "3 steps, DPM++(2M)": {"steps": 3, "solver": "dpm2m"},
    "4 steps, Euler": {"steps": 4},
    "4 steps, DPM++(2M)": {"steps": 4, "solver": "dpm2m"},
}
"""Completion settings the ``completion`` figure compares with the first (name -> stride / steps / solver)."""


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(-1).argsort(-1).double()


def _row_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row pair; NaN where a row is constant."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def completion(config: cfg.Config, out: Path, batches: int = 2, settings: dict[str, dict] | None = None) -> dict:
    """Roll E-GRPO's planned branches out once per completion setting from the same prompts, anchors and SDE jumps
    (same generators), score every final image, and compare each group's (prompt, branch step) rewards under a
    cheap completion with those under the full one: Spearman rank correlation, and the share of samples whose
    advantage (the group z-score) keeps its sign. Also the completion's network calls per sample.
    """
    from egrpo.rollout import network_batch, rollout_branches

    settings = settings or COMPLETIONS
    task, reward = _base_model(config)
    policy = task.policy
    t, s = config.train, config.sampling
    plan = make_plan(**cfg.plan_kwargs(config))
    n_prompts, group, k = min(t.prompts_per_iteration, len(task.train_prompts)), t.group_size, len(plan.branches)
    rewards: dict[str, list[torch.Tensor]] = {name: [] for name in settings}
    calls: dict[str, float] = {}
    for prompts, cond, generators in _same_draws(config, task, batches):
        for name, spec in settings.items():
            ro = rollout_branches(
                policy, plan, cond, group, generators(), s.noise, network_batch(t.max_batch),
                granularities=(spec.get("stride", 1),), completion_steps=spec.get("steps"),
                solver=spec.get("solver", "euler"),
            )
            scores, _ = reward.score(policy.decode(ro.finals), [prompts[int(r)] for r in ro.final_rows])
            rewards[name].append(scores.double().reshape(n_prompts, k, group))
            calls[name] = (ro.network_calls - n_prompts * s.num_steps) / (n_prompts * k * group)
    full_name = next(iter(settings))
    full = torch.cat(rewards[full_name])  # (groups per step, k, G)

    def z(x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)

    def per_step(values: torch.Tensor) -> list[float]:
        return [float(v[~v.isnan()].mean()) for v in values.transpose(0, 1)]

    results = {}
    for name in settings:
        cheap = torch.cat(rewards[name])
        spearman = _row_corr(_ranks(cheap), _ranks(full))
        agree = (torch.sign(z(cheap)) == torch.sign(z(full))).double().mean(-1)
        agree[full.std(-1) == 0] = float("nan")
        results[name] = {
            "completion_calls_per_sample": calls[name],
            "spearman": float(spearman[~spearman.isnan()].mean()),
            "sign_agreement": float(agree[~agree.isnan()].mean()),
            "spearman_per_step": per_step(spearman),
            "sign_agreement_per_step": per_step(agree),
            "group_std_ratio": float(cheap.std(-1).mean() / full.std(-1).mean()),
        }
    data = {
        "reference": full_name,
        "branch_steps": plan.active_steps,
        "merge_lengths": plan.merge_lengths,
        "groups_per_step": n_prompts * batches,
        "group_size": group,
        "settings": {name: dict(spec) for name, spec in settings.items()},
        "results": results,
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"euler": "#2e4057", "dpm2m": "#d1495b", "heun": "#66a182"}
    for name, r in results.items():
        if name == full_name:
            continue
        color = colors[settings[name].get("solver", "euler")]
        marker = "s" if "stride" in settings[name] else "o"
        left.scatter(r["completion_calls_per_sample"], r["spearman"], color=color, marker=marker, zorder=3)
        left.annotate(name, (r["completion_calls_per_sample"], r["spearman"]), fontsize=7, xytext=(4, 2),
                      textcoords="offset points")
    left.axhline(1.0, color="#999999", lw=0.8)
    left.set_xlabel(f"completion network calls per sample ({full_name}: {calls[full_name]:.1f})")
    left.set_ylabel("within-group Spearman with the full completion")
    left.set_title("Signal kept by a cheap completion")
    for name, r in results.items():
        if name != full_name:
            right.plot(plan.active_steps, r["spearman_per_step"], marker="o", ms=3, lw=1, label=name,
                       color=colors[settings[name].get("solver", "euler")],
                       ls="--" if "stride" in settings[name] else "-", alpha=0.8)
    right.set_xticks(plan.active_steps, [f"{i}\n{n}" for i, n in zip(plan.active_steps, plan.merge_lengths)],
                     fontsize=7)
    right.set_xlabel("branch step i (below it: merged length l_i)")
    right.set_ylabel("Spearman")
    right.set_title(f"Per branch step ({n_prompts * batches} groups of {group} each)")
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _write(fig, out, data)


# ---- (c) curves ------------------------------------------------------------------------------------
def _run_label(run: Path) -> str:
    """The run's method, read from its config.yaml without validating it (a moved run's paths may be stale)."""
    import yaml

    method = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("method", {})
    return method.get("name", "egrpo") if isinstance(method, dict) else str(method)


def curves(runs: Sequence[Path], out: Path, labels: Sequence[str] | None = None) -> dict:
    """Rollout reward (and held-out reward where the run evaluated) against iteration and training seconds."""
    if labels and len(labels) != len(runs):
        raise cfg.ConfigError(f"--labels: {len(labels)} labels for {len(runs)} runs")
    data = {}
    for k, run in enumerate(runs):
        run = Path(run)
        metrics = run / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"{run}: no metrics.jsonl; is it a run directory of egrpo train?")
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if not records:
            raise cfg.ConfigError(f"{metrics} is empty: the run has not finished an iteration yet")
        label = labels[k] if labels else _run_label(run)
        if label in data:
            label = f"{label} ({run.name})"
        seconds = list(itertools.accumulate(r["seconds"] for r in records))
        summary_file = run / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
        held_out = [(r["iteration"], seconds[j], r["eval"].get("reward")) for j, r in enumerate(records) if "eval" in r]
        if summary:  # a finished run: its base and final evaluations bracket the curve
            held_out = [(0, 0.0, summary["base"].get("reward")), *held_out,
                        (records[-1]["iteration"], seconds[-1], summary["final"].get("reward"))]
        data[label] = {
            "iteration": [r["iteration"] for r in records],
            "seconds": seconds,
            "reward": [r["reward_mean"] for r in records],
            "held_out": [h for h in held_out if h[2] is not None],
        }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = plt.cm.tab10.colors
    for (label, d), color in zip(data.items(), colors * 4):
        for ax, x, h in ((axes[0], d["iteration"], 0), (axes[1], d["seconds"], 1)):
            # Rollout rewards swing with the prompts drawn each iteration: drawn faint, held-out bold.
            ax.plot(x, d["reward"], lw=0.8, color=color, alpha=0.35)
            if d["held_out"]:
                ax.plot([p[h] for p in d["held_out"]], [p[2] for p in d["held_out"]], "s-", ms=4, lw=1.8,
                        color=color, label=label)
            else:
                ax.plot([], [], color=color, label=label)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("training seconds (rollout + reward + update)")
    axes[0].set_ylabel("reward (bold: held-out prompts; faint: rollout mean)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Training reward per run")
    fig.tight_layout()
    return _write(fig, out, data)


# ---- (d) grid -----------------------------------------------------------------------------------------
def grid(
    checkpoints: Sequence[str], out: Path, overrides: Sequence[str] = (), labels: Sequence[str] | None = None,
    rows: int = 8,
) -> dict:
    """Rows: held-out (prompt, seed) pairs; columns: checkpoints; each cell captioned with its reward."""
    from egrpo.evaluation import generate, reference_run, same_samples
    from egrpo.rewards import WeightedReward

    if labels and len(labels) != len(checkpoints):
        raise cfg.ConfigError(f"--labels: {len(labels)} labels for {len(checkpoints)} checkpoints")
    columns, first = {}, None
    reference = reference_run(checkpoints)
    for k, checkpoint in enumerate(checkpoints):
        gen = generate(checkpoint, overrides, reference, limit=rows)
        if first is None:
            first = gen
            reward = WeightedReward(cfg.reward_specs(gen.config))
        elif not same_samples(first, gen):
            raise cfg.ConfigError(
                f"{checkpoint} evaluates other held-out samples (prompts, seeds or image size) than "
                f"{checkpoints[0]}; pass --prompts FILE (and --seeds N, key=value overrides) so every column sees "
                "the same"
            )
        label = labels[k] if labels else (checkpoint if checkpoint == "base" else _checkpoint_label(checkpoint))
        if label in columns:
            label = f"{label} ({k + 1})"
        scores, _ = reward.score(gen.images, gen.prompts)
        columns[label] = (gen.images, scores.tolist())
    prompts = first.prompts
    n = len(prompts)
    fig, axes = plt.subplots(n, len(columns), figsize=(1.25 * len(columns) + 1.6, 1.25 * n + 0.4), squeeze=False)
    for c, (label, (images, scores)) in enumerate(columns.items()):
        axes[0][c].set_title(label, fontsize=8)
        for r in range(n):
            ax = axes[r][c]
            show_image(ax, images[r])
            _hide_axes(ax)
            ax.set_xlabel(f"{scores[r]:.2f}", fontsize=6, labelpad=1)
    for r in range(n):
        axes[r][0].set_ylabel(wrapped(prompts[r]), rotation=0, ha="right", va="center", fontsize=6)
    terms = " + ".join(f"{w:g} {name}" for name, w in reward.weights.items() if w)
    fig.suptitle(f"same prompt and seed per row; below each image its reward ({terms})", fontsize=7)
    fig.tight_layout()
    return _write(fig, out, {"prompts": prompts, "rewards": {label: s for label, (_, s) in columns.items()}})


def _checkpoint_label(checkpoint: str) -> str:
    path = Path(checkpoint)
    if (path / "config.yaml").is_file():
        return f"{_run_label(path)}\n{path.name}"
    return path.stem


# ---- (e) failures ---------------------------------------------------------------------------------
def _reward_fn(name: str, configs: Sequence[cfg.Config]):
    """Build reward ``name`` with the options a config gives it (e.g. a checkpoint path), else defaults."""
    from egrpo.rewards import build

    for config in configs:
        specs = cfg.reward_specs(config)
        if name in specs:
            return build(name, **specs[name][1])
    return build(name)


def failures(
    base: str, tuned: str, out: Path, reward: str, check: str, overrides: Sequence[str] = (), top: int = 8
) -> dict:
    """Held-out samples (same prompt and seed) where ``reward`` rose from base to tuned but ``check`` fell.

    Ranked by how far ``check`` fell. The JSON holds every such sample and the share of all samples.
    """
    from egrpo.evaluation import generate, reference_run, same_samples
    from egrpo.video import score_frames

    reference = reference_run([tuned, base])
    before, after = generate(base, overrides, reference), generate(tuned, overrides, reference)
    if not same_samples(before, after):
        raise cfg.ConfigError(
            f"{base} and {tuned} evaluate different held-out samples (prompts, seeds or image size); pass "
            "--prompts FILE and eval.seeds_per_prompt=N (and key=value overrides) so the pairs match"
        )
    prompts = before.prompts
    score = {name: _reward_fn(name, [after.config, before.config]) for name in (reward, check)}
    with torch.no_grad():
        r0, r1 = (score_frames(score[reward], x, prompts).float() for x in (before.images, after.images))
        c0, c1 = (score_frames(score[check], x, prompts).float() for x in (before.images, after.images))
    hacked = ((r1 > r0) & (c1 < c0)).nonzero().flatten()
    hacked = hacked[torch.argsort(c1[hacked] - c0[hacked])]
    cases = [
        {"index": int(i), "prompt": prompts[i], f"{reward}_base": float(r0[i]), f"{reward}_tuned": float(r1[i]),
         f"{check}_base": float(c0[i]), f"{check}_tuned": float(c1[i])}
        for i in hacked.tolist()
    ]
    data = {
        "base": base, "tuned": tuned, "reward": reward, "check": check, "samples": len(prompts),
        "share_hacked": len(cases) / len(prompts),
        "mean_change": {reward: float((r1 - r0).mean()), check: float((c1 - c0).mean())},
        "cases": cases,
    }
    shown = cases[:top]
    cols = max(1, len(shown))
    fig, axes = plt.subplots(2, cols, figsize=(1.5 * cols + 1.2, 4.4), squeeze=False)
    for c, case in enumerate(shown):
        i = case["index"]
        for r, (images, rv, cv) in enumerate(((before.images, r0, c0), (after.images, r1, c1))):
            ax = axes[r][c]
            show_image(ax, images[i])
            _hide_axes(ax)
            ax.set_xlabel(f"{reward} {float(rv[i]):.2f}\n{check} {float(cv[i]):.2f}", fontsize=6, labelpad=1)
        axes[0][c].set_title(wrapped(case["prompt"], 22), fontsize=6)
    if not shown:
        _hide_axes(axes[0][0])
        _hide_axes(axes[1][0])
        axes[0][0].text(0.5, 0.5, f"no sample: {reward} up and {check} down", ha="center", va="center", fontsize=8)
    axes[0][0].set_ylabel("base", fontsize=8)
    axes[1][0].set_ylabel("tuned", fontsize=8)
    fig.suptitle(
        f"{reward} rose but {check} fell: {len(cases)} of {len(prompts)} held-out samples "
        f"(mean change {reward} {data['mean_change'][reward]:+.2f}, {check} {data['mean_change'][check]:+.2f})",
        fontsize=8,
    )
    fig.tight_layout()
    return _write(fig, out, data)
