"""``egrpo ablate``: the paper's ablations on the embedded task, several seeds per cell, same budget per cell.

Sweeps (each a table of the paper): ``tau`` (Table 4), ``merge`` (fixed jump lengths 2 / 4 / 6 vs
adaptive, Table 2), ``steps`` (which steps are trained, Table 3) and ``methods`` (E-GRPO and the
baselines at the same iterations, Table 1). Every cell trains from the same base model for the same
number of iterations with each seed, then evaluates on the held-out prompts; cells shared by several
sweeps (tau 2.2 = adaptive = first 8) are trained once. The paper's HPS for the same setting on
FLUX is printed beside each row for reference.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

from egrpo import config as cfg
from egrpo.methods import build_method
from egrpo.trainer import Trainer

# (row label, config overrides, the paper's HPS for that row, None where the paper has no such row)
SWEEPS: dict[str, list[tuple[str, list[str], float | None]]] = {
    "tau": [
        ("tau 0", ["plan.tau=0"], 0.384),
        ("tau 1.8", ["plan.tau=1.8"], 0.383),
        ("tau 2.0", ["plan.tau=2.0"], 0.384),
        ("tau 2.2", [], 0.391),
        ("tau 2.6", ["plan.tau=2.6"], 0.388),
    ],
    "merge": [
        ("2-step", ["plan.merge=fixed", "plan.merge_length=2"], 0.382),
        ("4-step", ["plan.merge=fixed", "plan.merge_length=4"], 0.374),
        ("6-step", ["plan.merge=fixed", "plan.merge_length=6"], 0.337),
        ("adaptive (tau 2.2)", [], 0.391),
    ],
    "steps": [
        ("first 4", ["plan.active_steps=first:4"], 0.370),
        ("first 8", [], 0.391),
        ("second 8", ["plan.active_steps=second-half"], 0.357),
        ("all 16", ["plan.active_steps=all"], 0.366),
    ],
    # Table 1 (trained on HPS); the paper does not run Flow-GRPO or Flow-GRPO-Fast.
    "methods": [
        ("E-GRPO", [], 0.391),
        ("G2RPO", ["method=g2rpo"], 0.385),
        ("TempFlow-GRPO", ["method=tempflow"], 0.382),
        ("MixGRPO", ["method=mixgrpo"], 0.378),
        ("BranchGRPO", ["method=branchgrpo"], 0.358),
        ("DanceGRPO", ["method=dancegrpo"], 0.353),
        ("E-GRPO-Fast", ["method=egrpo-fast"], None),
        ("Flow-GRPO", ["method=flowgrpo"], None),
        ("Flow-GRPO-Fast", ["method=flowgrpo-fast"], None),
    ],
}
TABLE_NAMES = {"tau": "Table 4: entropy threshold tau", "merge": "Table 2: merge strategy",
               "steps": "Table 3: trained steps", "methods": "Table 1: methods, same iterations"}
REPORTED = ("alignment", "judge_accuracy", "quality")


def train_cell(overrides: Sequence[str], seed: int, iterations: int, root: Path) -> dict:
    run_dir = root / f"cell-{abs(hash((tuple(overrides), seed)))}"
    config = cfg.load("embedded", [*overrides, f"seed={seed}", f"train.iterations={iterations}",
                                   f"output_dir={run_dir}", "checkpoint_every=1000000"])
    start = time.perf_counter()
    summary = Trainer(config, progress=False).train()
    return {**{k: summary["final"][k] for k in REPORTED}, "seconds": time.perf_counter() - start}


def network_calls(overrides: Sequence[str]) -> int:
    """Latents through the network per iteration (rollout and update): the cell's cost, free of machine load."""
    config = cfg.load("embedded", list(overrides))
    return build_method(config).describe()["network_calls"] * config.train.prompts_per_iteration


def markdown(sweep: str, rows: dict[str, dict], iterations: int, seeds: int) -> str:
    lines = [
        f"{TABLE_NAMES[sweep]} (embedded task, {iterations} iterations per cell, {seeds} seeds, mean ± std)",
        "",
        "| setting | held-out alignment | judge accuracy | quality | network calls / iteration | paper HPS (FLUX) |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        cells = [f"{r[k][0]:.3f} ± {r[k][1]:.3f}" for k in REPORTED]
        paper = "-" if r["paper_hps"] is None else f"{r['paper_hps']:.3f}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['network_calls']} | {paper} |")
    return "\n".join(lines) + "\n"


def ablate(sweeps: Sequence[str], seeds: int, iterations: int, out: Path, overrides: Sequence[str] = ()) -> dict:
    unknown = [s for s in sweeps if s not in SWEEPS]
    if unknown:
        raise cfg.ConfigError(f"unknown sweep {unknown[0]!r}; available: {', '.join(SWEEPS)}")
    out.mkdir(parents=True, exist_ok=True)
    cache: dict[tuple, list[dict]] = {}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for sweep in sweeps:
            rows = {}
            for label, cell, paper in SWEEPS[sweep]:
                key = tuple([*overrides, *cell])
                if key not in cache:
                    cache[key] = [train_cell(key, seed, iterations, Path(tmp)) for seed in range(seeds)]
                runs = cache[key]
                rows[label] = {
                    k: (
                        statistics.fmean(r[k] for r in runs),
                        statistics.stdev(r[k] for r in runs) if seeds > 1 else 0.0,
                    )
                    for k in (*REPORTED, "seconds")
                }
                rows[label]["paper_hps"] = paper
                rows[label]["network_calls"] = network_calls(key)
            (out / f"{sweep}.json").write_text(json.dumps(rows, indent=2))
            (out / f"{sweep}.md").write_text(markdown(sweep, rows, iterations, seeds))
            results[sweep] = rows
    return results
