"""Every method on the embedded task under the same budget, several seeds, interleaved.

All methods start from the same shipped base model, train on the same reward (the config's) with the
same prompts per iteration and group size, and each gets the same budget: seconds of training time
(evaluation excluded); with ``--budget-calls``, latents pushed through the network (``network_calls``),
a cost that machine load cannot distort; or with ``--budget-iterations``, iterations. The methods
advance one iteration at a time in rotation, so machine drift and other load hit them alike. Held-out
metrics are measured at fixed fractions of the budget; a run stops at the first iteration that reaches it.

Writes JSON, a markdown table and a PNG of held-out alignment against the budget's unit.

    python benchmarks/compare_methods.py                      # full: 90 s per method and seed, 3 seeds
    python benchmarks/compare_methods.py --quick              # reduced: 12 s per method and seed, 2 seeds (< 5 min)
    python benchmarks/compare_methods.py --budget-calls 60000 --level-of mixgrpo   # equal network calls
    python benchmarks/compare_methods.py --budget-iterations 20 --methods egrpo,egrpo-fast   # equal iterations
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from egrpo import config as cfg
from egrpo.methods import METHODS
from egrpo.trainer import Trainer


class Contender:
    """One (method, seed) run that advances an iteration at a time and keeps its own training clock."""

    def __init__(
        self, method: str, seed: int, root: Path, overrides: list[str], budget: float, evals: int, unit: str = "s"
    ):
        config = cfg.load("embedded", [f"method={method}", f"seed={seed}", f"output_dir={root / f'{method}-{seed}'}",
                                       "train.iterations=1000000", *overrides])
        self.method, self.seed, self.budget, self.unit = method, seed, budget, unit
        self.trainer = Trainer(config, progress=False)
        self.marks = [budget * (k + 1) / evals for k in range(evals)]
        self.clock = 0.0
        self.iterations = 0
        self.iteration_seconds: list[float] = []
        self.network_calls: list[int] = []
        base, _ = self.trainer.evaluate()
        self.curve = [(0.0, base)]

    @property
    def done(self) -> bool:
        return self.clock >= self.budget

    def step(self) -> None:
        start = time.perf_counter()
        metrics = self.trainer.iteration(self.iterations)
        self.clock += {"s": time.perf_counter() - start, "calls": metrics["network_calls"], "iterations": 1}[self.unit]
        self.iterations += 1
        self.iteration_seconds.append(metrics["seconds"])
        self.network_calls.append(metrics["network_calls"])
        while self.marks and (self.clock >= self.marks[0]):
            self.marks.pop(0)
            self.curve.append((self.clock, self.trainer.evaluate()[0]))


def cost_to_reach(curve: list[tuple[float, dict]], level: float) -> float | None:
    for cost, metrics in curve:
        if metrics["alignment"] >= level:
            return cost
    return None


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def level_of(contenders: list[Contender], method: str) -> float:
    """A method's final held-out alignment, mean over seeds: the level the others are timed to."""
    runs = [c for c in contenders if c.method == method]
    if not runs:
        raise SystemExit(f"--level-of {method}: that method is not among --methods")
    return statistics.fmean(c.curve[-1][1]["alignment"] for c in runs)


def summarise(contenders: list[Contender], level: float) -> dict:
    out = {}
    for method in dict.fromkeys(c.method for c in contenders):
        runs = [c for c in contenders if c.method == method]
        finals = [c.curve[-1][1] for c in runs]
        reach = [cost_to_reach(c.curve, level) for c in runs]
        out[method] = {
            "alignment": mean_std([f["alignment"] for f in finals]),
            "judge_accuracy": mean_std([f["judge_accuracy"] for f in finals]),
            "quality": mean_std([f["quality"] for f in finals]),
            "iterations": mean_std([c.iterations for c in runs]),
            "seconds_per_iteration": mean_std([statistics.fmean(c.iteration_seconds) for c in runs]),
            "network_calls_per_iteration": statistics.fmean(statistics.fmean(c.network_calls) for c in runs),
            "cost_to_level": reach,
            "final_cost": mean_std([c.curve[-1][0] for c in runs]),
            "base_alignment": runs[0].curve[0][1]["alignment"],
            "curves": [[(s, m["alignment"]) for s, m in c.curve] for c in runs],
        }
    return out


def markdown(summary: dict, budget: float, seeds: int, level: float, unit: str = "s", level_from: str = "") -> str:
    def pm(pair, digits=3):
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    spent = {"s": f"{budget:.0f} s of training", "calls": f"{budget:,.0f} network calls",
             "iterations": f"{budget:.0f} iterations"}[unit]
    target = f"{level:.3f} ({level_from}'s final)" if level_from else f"{level}"
    lines = [
        f"Embedded digits task, {spent} per method and seed, {seeds} seeds "
        f"(mean ± std over seeds); base alignment {next(iter(summary.values()))['base_alignment']:.3f}.",
        "",
        f"| method | held-out alignment | judge accuracy | quality (preference) | iterations | s / iteration "
        f"| network calls / iteration | {unit} to alignment {target} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, r in summary.items():
        reached = [s for s in r["cost_to_level"] if s is not None]
        reach = f"{statistics.fmean(reached):,.0f} ({len(reached)}/{seeds} seeds)" if reached else "not reached"
        lines.append(
            f"| {method} | {pm(r['alignment'])} | {pm(r['judge_accuracy'])} | {pm(r['quality'], 2)} "
            f"| {r['iterations'][0]:.0f} | {r['seconds_per_iteration'][0]:.2f} "
            f"| {r['network_calls_per_iteration']:.0f} | {reach} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, unit: str = "s") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, r in summary.items():
        curves = r["curves"]
        n = min(len(c) for c in curves)
        xs = [statistics.fmean(c[k][0] for c in curves) for k in range(n)]
        ys = [statistics.fmean(c[k][1] for c in curves) for k in range(n)]
        ax.plot(xs, ys, marker="o", markersize=3, label=method,
                linewidth=2.2 if method.startswith("egrpo") else 1.2)
    ax.set_xlabel({"s": "training seconds (evaluation excluded)", "calls": "network calls (latents, all prompts)",
                   "iterations": "iterations"}[unit])
    ax.set_ylabel("held-out alignment (mean over seeds)")
    kind = {"s": "wall-clock", "calls": "network-call", "iterations": "iteration"}[unit]
    ax.set_title(f"Methods under the same {kind} budget")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced budget: 12 s per method and seed, 2 seeds")
    parser.add_argument("--budget", type=float, help="training seconds per method and seed (default 90, quick 12)")
    parser.add_argument("--budget-calls", type=int, help="network calls per method and seed instead of seconds")
    parser.add_argument("--budget-iterations", type=int, help="iterations per method and seed instead of seconds")
    parser.add_argument("--seeds", type=int, help="seeds per method (default 3, quick 2)")
    parser.add_argument("--evals", type=int, default=6, help="held-out evaluations along the budget")
    parser.add_argument("--level", type=float, default=0.85, help="alignment level for the time-to-reach column")
    parser.add_argument("--level-of", help="time the others to this method's final alignment instead of --level")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="benchmarks/results/compare_methods")
    parser.add_argument("overrides", nargs="*", help="config overrides for every method, e.g. train.group_size=6")
    args = parser.parse_args(argv)
    if args.budget_calls and args.budget_iterations:
        parser.error("give one of --budget-calls and --budget-iterations")
    unit = "calls" if args.budget_calls else "iterations" if args.budget_iterations else "s"
    budget = float(args.budget_calls or args.budget_iterations or args.budget or (12.0 if args.quick else 90.0))
    seeds = args.seeds or (2 if args.quick else 3)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    overrides = ["eval.seeds_per_prompt=2", *args.overrides]

    torch.manual_seed(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        contenders = [
            Contender(m, s, Path(tmp), overrides, budget, args.evals, unit) for s in range(seeds) for m in methods
        ]
        while not all(c.done for c in contenders):
            for c in contenders:
                if not c.done:
                    c.step()
            done = sum(c.done for c in contenders)
            elapsed = time.perf_counter() - started
            print(f"\r{elapsed:6.0f} s: {done}/{len(contenders)} runs at budget", end="", flush=True)
    print()
    level = level_of(contenders, args.level_of) if args.level_of else args.level
    summary = summarise(contenders, level)
    table = markdown(summary, budget, seeds, level, unit, args.level_of or "")
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"budget": budget, "unit": unit, "seeds": seeds, "level": level, "level_of": args.level_of,
              "overrides": overrides,
              "torch_threads": torch.get_num_threads(), "wall_s": time.perf_counter() - started, "methods": summary}
    Path(f"{out}.json").write_text(json.dumps(record, indent=2))
    Path(f"{out}.md").write_text(table)
    plot(summary, Path(f"{out}.png"), unit)
    print(f"wrote {out}.json, {out}.md, {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
