"""Held-out alignment against the diversity kept, for the options that should keep diversity (issue 21).

Trains the main job (``egrpo train``, the embedded default) once per setting and seed, evaluates each run with
``egrpo eval`` (the same held-out prompts and fixed seeds for every run and for the base model), and writes

- ``benchmarks/results/diversity_pareto.json``: every run's metrics, and per setting the mean and std over seeds;
- ``benchmarks/results/diversity_pareto.md``: the table docs/results.md shows (tools/sync_readme.py copies it);
- ``docs/results/pareto/pareto.png``: alignment against embedding diversity kept, and against the Fréchet distance.

Runs go one at a time, in a subprocess each, seed by seed (all settings of seed 0 first), so a partial grid is
already a complete comparison at fewer seeds. A run directory that holds a finished run is not trained again, and
one that was stopped is resumed (bit for bit the same), so the script can be stopped and started again. Every run
uses the same thread count (``--threads``, OMP_NUM_THREADS): CPU runs are reproducible bit for bit only at one.

    python benchmarks/diversity_pareto.py                          # the grid: 7 settings x 3 seeds, 70-110 min
    python benchmarks/diversity_pareto.py --seeds 0 --settings plain,"KL 1"   # a part of it
    python benchmarks/diversity_pareto.py --report-only            # table and figure from the runs there are
    python benchmarks/diversity_pareto.py train.iterations=20      # key=value: every run and evaluation takes it
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, overrides of the main job). KL weights: at the policy 10 iterations into a run, the KL's gradient at
# weight 1 is 10-25% of the policy gradient's and grows as the policy drifts; on seed 0, weight 1 held alignment
# at 0.75, so 0.25 is the light hold and 1 the firm one. The schedule warms the weight up from 0 to 1 over the
# run: the early, learning iterations run free and the late ones, where diversity collapses, are held (the decay
# is the opposite). Novelty 1 is the one-seed measurement's best strength (3 bought no more).
SETTINGS: list[tuple[str, list[str]]] = [
    ("plain", []),
    ("KL 0.25", ["train.kl_coef=0.25"]),
    ("KL 1", ["train.kl_coef=1"]),
    ("KL warm-up 0->1", ["train.kl_schedule=linear", "train.kl_coef=0", "train.kl_coef_end=1"]),
    ("KL decay 1->0", ["train.kl_schedule=linear", "train.kl_coef=1", "train.kl_coef_end=0"]),
    ("novelty 1", ["train.novelty_bonus=1"]),
    ("novelty 1 + KL 0.25", ["train.novelty_bonus=1", "train.kl_coef=0.25"]),
]
METRICS = ("alignment", "judge_accuracy", "embedding_diversity", "vendi", "diversity", "frechet_distance")
# The target: alignment >= 0.95 with >= 70% of the base model's embedding diversity.
TARGET_ALIGNMENT, TARGET_KEPT = 0.95, 0.70


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


def egrpo(args: list[str], threads: int, log: Path) -> None:
    """``python -m egrpo ARGS`` from the repository root (this checkout's egrpo), its output appended to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "a") as out:
        subprocess.run([sys.executable, "-m", "egrpo", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                       check=True)


def run_one(run: Path, seed: int, overrides: list[str], threads: int, common: list[str] = ()) -> dict:
    """Train (or resume, or keep) one run and evaluate it; its metrics, with the training seconds. ``common``:
    overrides of every run (the setting's come after them)."""
    evaluated = run / "eval" / "eval.json"
    if not (run / "summary.json").is_file():
        if (run / "config.yaml").is_file():
            egrpo(["train", "--resume", str(run)], threads, run / "train.log")
        else:
            run.mkdir(parents=True, exist_ok=True)
            egrpo(["train", f"seed={seed}", f"output_dir={run}", *common, *overrides], threads, run / "train.log")
    if not evaluated.is_file():
        egrpo(["eval", str(run), "--labels", "run", "--out", str(run / "eval")], threads, run / "eval.log")
    return read_run(run)


def read_run(run: Path) -> dict:
    """A finished run's held-out metrics, iterations and training seconds."""
    metrics = json.loads((run / "eval" / "eval.json").read_text())["run"]
    summary = json.loads((run / "summary.json").read_text())
    return {**{k: metrics[k] for k in METRICS}, "iterations": summary["iterations"],
            "train_seconds": summary["seconds"]}


def base_metrics(root: Path, threads: int, common: list[str] = ()) -> dict:
    evaluated = root / "base" / "eval.json"
    if not evaluated.is_file():
        (root / "base").mkdir(parents=True, exist_ok=True)
        egrpo(["eval", "base", "--out", str(root / "base"), *common], threads, root / "base" / "eval.log")
    return {k: json.loads(evaluated.read_text())["base"][k] for k in METRICS}


def summarise(base: dict, runs: dict[str, dict[int, dict]]) -> dict:
    """Per setting: each seed's metrics with the embedding diversity kept (a fraction of the base's), the mean and
    std over seeds (std 0 for one seed), and whether the mean reaches the target."""
    settings = []
    for label, overrides in SETTINGS:
        seeds = runs.get(label, {})
        if not seeds:
            continue
        for m in seeds.values():
            m["kept"] = m["embedding_diversity"] / base["embedding_diversity"]
        names = [*METRICS, "kept", "train_seconds"]
        values = {k: [seeds[s][k] for s in sorted(seeds)] for k in names}
        mean = {k: statistics.fmean(v) for k, v in values.items()}
        std = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()}
        settings.append({
            "label": label, "overrides": overrides, "seeds": {str(s): seeds[s] for s in sorted(seeds)},
            "mean": mean, "std": std,
            "reaches_target": mean["alignment"] >= TARGET_ALIGNMENT and mean["kept"] >= TARGET_KEPT,
        })
    return {"base": base, "target": {"alignment": TARGET_ALIGNMENT, "kept": TARGET_KEPT}, "settings": settings}


def markdown(result: dict) -> str:
    base = result["base"]
    counts = sorted({len(s["seeds"]) for s in result["settings"]})
    iterations = sorted({m["iterations"] for s in result["settings"] for m in s["seeds"].values()})
    lines = [
        f"Main job (embedded task, {' or '.join(map(str, iterations))} iterations), {' or '.join(map(str, counts))} "
        f"seed{'s' if counts != [1] else ''} per setting, mean ± std; held-out prompts and seeds of `egrpo eval`",
        "",
        "| setting | seeds | alignment | judge accuracy | embedding diversity | kept of base | Vendi | pixel diversity "
        "| Fréchet distance |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| base | - | {base['alignment']:.3f} | {base['judge_accuracy']:.3f} | {base['embedding_diversity']:.3f} "
        f"| 100% | {base['vendi']:.2f} | {base['diversity']:.2f} | {base['frechet_distance']:.2f} |",
    ]
    for s in result["settings"]:
        m, d = s["mean"], s["std"]
        lines.append(
            f"| {s['label']} | {len(s['seeds'])} | {m['alignment']:.3f} ± {d['alignment']:.3f} "
            f"| {m['judge_accuracy']:.3f} ± {d['judge_accuracy']:.3f} "
            f"| {m['embedding_diversity']:.3f} ± {d['embedding_diversity']:.3f} | {100 * m['kept']:.0f}% ± "
            f"{100 * d['kept']:.0f} | {m['vendi']:.2f} ± {d['vendi']:.2f} "
            f"| {m['diversity']:.2f} ± {d['diversity']:.2f} "
            f"| {m['frechet_distance']:.2f} ± {d['frechet_distance']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["base"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    kept_axis, frechet_axis = axes
    # the target: the corner right of 70% kept and above alignment 0.95
    kept_axis.fill_between([100 * TARGET_KEPT, 105], TARGET_ALIGNMENT, 1.0, color="0.9", zorder=0)
    kept_axis.text(100 * TARGET_KEPT + 1, TARGET_ALIGNMENT + 0.005, "target", fontsize=8, color="0.35")
    for axis, x_base in ((kept_axis, 100.0), (frechet_axis, base["frechet_distance"])):
        axis.plot([x_base], [base["alignment"]], "k*", ms=11, label="base")
    order = [label for label, _ in SETTINGS]
    for s in result["settings"]:
        m, d = s["mean"], s["std"]
        colour = f"C{order.index(s['label'])}"  # a setting keeps its colour whichever settings are shown
        count = len(s["seeds"])
        kept_axis.errorbar(100 * m["kept"], m["alignment"], xerr=100 * d["kept"], yerr=d["alignment"], fmt="o",
                           color=colour, capsize=3, label=f"{s['label']} ({count} seed{'s' if count > 1 else ''})")
        frechet_axis.errorbar(m["frechet_distance"], m["alignment"], xerr=d["frechet_distance"], yerr=d["alignment"],
                              fmt="o", color=colour, capsize=3)
        for seed in s["seeds"].values():  # each seed faintly, so the spread behind the bars is visible
            kept_axis.plot(100 * seed["kept"], seed["alignment"], ".", color=colour, alpha=0.35)
            frechet_axis.plot(seed["frechet_distance"], seed["alignment"], ".", color=colour, alpha=0.35)
    kept_axis.set(xlabel="embedding diversity kept (% of the base model's)", ylabel="held-out alignment",
                  title="alignment vs diversity kept (right and up is better)")
    frechet_axis.set(xlabel="Fréchet distance to real digits (lower is better)", ylabel="held-out alignment",
                     title="alignment vs Fréchet distance")
    kept_axis.set_xlim(0, 105)
    kept_axis.set_ylim(top=1.0)
    fig.legend(*kept_axis.get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--settings", help="comma-separated labels of SETTINGS to run (default: all)")
    parser.add_argument("--root", default="runs/pareto", help="run directories (default runs/pareto)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run (default 1)")
    parser.add_argument("--out", default="benchmarks/results/diversity_pareto", help="JSON and markdown, no suffix")
    parser.add_argument("--figure", default="docs/results/pareto/pareto.png")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of every run and of the base evaluation")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    known = [label for label, _ in SETTINGS]
    chosen = [s.strip() for s in args.settings.split(",")] if args.settings else known
    unknown = [s for s in chosen if s not in known]
    if unknown:
        parser.error(f"unknown setting {unknown[0]!r}; settings: {', '.join(known)}")
    root, out = ROOT / args.root, ROOT / args.out
    base = base_metrics(root, args.threads, args.overrides)

    def report() -> dict:
        runs: dict[str, dict[int, dict]] = {}
        for label, _ in SETTINGS:
            for seed in seeds:
                run = root / f"{slug(label)}-seed{seed}"
                if (run / "eval" / "eval.json").is_file():
                    runs.setdefault(label, {})[seed] = read_run(run)
        result = summarise(base, runs)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        figure(result, ROOT / args.figure)
        return result

    if not args.report_only:
        for seed in seeds:
            for label, overrides in SETTINGS:
                if label not in chosen:
                    continue
                started = time.perf_counter()
                metrics = run_one(root / f"{slug(label)}-seed{seed}", seed, overrides, args.threads, args.overrides)
                print(f"seed {seed} {label}: alignment {metrics['alignment']:.3f}, embedding diversity "
                      f"{metrics['embedding_diversity']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
                report()  # after every run, so the files always hold what is finished
    result = report()
    print(markdown(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
