"""Engine overhead: per-iteration time split, and iteration time over pure network compute.

Runs E-GRPO iterations of a config (default: the embedded task), records every network call the
iteration makes (batch size, with or without gradient), then replays exactly those calls alone on
the same inputs' shapes: the replay is the pure model compute, and iteration / replay is what the
engine (step math, batching, rewards, optimizer, bookkeeping) costs on top. Both are measured in the
same process, interleaved per iteration, so machine drift hits them alike.

    python benchmarks/engine_overhead.py [--config embedded] [--iterations 5] [--out FILE] [key=value ...]
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
from egrpo.trainer import Trainer


class CallRecorder:
    """Wraps ``policy.velocity``: logs (batch size, grad enabled) of each call and its wall time."""

    def __init__(self, policy):
        self.policy = policy
        self.inner = policy.velocity
        self.calls: list[tuple[int, bool]] = []
        self.seconds = 0.0
        policy.velocity = self

    def __call__(self, x, sigma, cond, reference=False):
        start = time.perf_counter()
        out = self.inner(x, sigma, cond, reference=reference)
        self.seconds += time.perf_counter() - start
        self.calls.append((x.shape[0], torch.is_grad_enabled() and not reference))
        return out

    def reset(self) -> None:
        self.calls, self.seconds = [], 0.0


def replay(trainer: Trainer, recorder: CallRecorder, calls: list[tuple[int, bool]]) -> float:
    """The same network calls alone: forward for rollout calls, forward + backward for update calls."""
    policy = trainer.policy
    cond_all = trainer.train_cond
    start = time.perf_counter()
    for batch, grad in calls:
        rows = torch.arange(batch) % next(iter(cond_all.values())).shape[0]
        cond = {k: v[rows] for k, v in cond_all.items()}
        x = torch.randn((batch, *policy.latent_shape), device=policy.device)
        sigma = torch.rand(batch, device=policy.device)
        if grad:
            out = recorder.inner(x, sigma, cond)
            out.float().square().mean().backward()
        else:
            with torch.no_grad():
                recorder.inner(x, sigma, cond)
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="embedded")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations (after one warm-up)")
    parser.add_argument("--out", default="benchmarks/results/engine_overhead.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        config = cfg.load(args.config, [f"output_dir={tmp}/run", *args.overrides])
        trainer = Trainer(config, progress=False)
        recorder = CallRecorder(trainer.policy)
        rows = []
        for it in range(args.iterations + 1):
            recorder.reset()
            metrics = trainer.iteration(it)
            calls = list(recorder.calls)
            network_in_loop = recorder.seconds
            pure = replay(trainer, recorder, calls)
            if it == 0:
                continue  # warm-up: first-call allocations and kernel selection
            rows.append(
                {
                    "iteration_s": metrics["seconds"],
                    "rollout_s": metrics["seconds_rollout"],
                    "reward_s": metrics["seconds_reward"],
                    "update_s": metrics["seconds_update"],
                    "network_in_loop_s": network_in_loop,
                    "network_alone_s": pure,
                    "network_calls": len(calls),
                    "latents_through_network": sum(b for b, _ in calls),
                }
            )

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    summary = {
        "config": args.config,
        "overrides": args.overrides,
        "iterations": args.iterations,
        "torch_threads": torch.get_num_threads(),
        "device": str(trainer.policy.device),
        "median": {k: med(k) for k in rows[0]},
        "overhead_ratio": med("iteration_s") / med("network_alone_s"),
        "per_iteration": rows,
    }
    m = summary["median"]
    print(f"iteration {m['iteration_s']:.3f} s = rollout {m['rollout_s']:.3f} + reward {m['reward_s']:.3f} "
          f"+ update {m['update_s']:.3f}")
    print(f"network: {m['network_calls']:.0f} calls, {m['latents_through_network']:.0f} latents; "
          f"{m['network_in_loop_s']:.3f} s inside the loop, {m['network_alone_s']:.3f} s replayed alone")
    print(f"overhead ratio (iteration / pure network compute): {summary['overhead_ratio']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
