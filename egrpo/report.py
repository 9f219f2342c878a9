"""Figures of a run: the reward curve, base-vs-trained samples, and the entropy plan."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from egrpo.planner import RolloutPlan  # noqa: E402


def wrapped(label: str, width: int = 24) -> str:
    """A label whole, over as many lines of about ``width`` characters as it needs: a figure's row or column
    label that is cut ("a photo of a hand-drawn thre") no longer says which prompt the row is."""
    return textwrap.fill(label, width, break_long_words=False, break_on_hyphens=False)


def show_image(ax, image: torch.Tensor) -> None:
    """Draw one (C, H, W) image in [0, 1], or a video's (K, C, H, W) frames as a strip: grayscale for one
    channel, RGB for three."""
    from egrpo.video import still

    pixels = still(image).detach().float().cpu().clamp(0, 1).permute(1, 2, 0)
    if pixels.shape[-1] == 1:
        ax.imshow(pixels.squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(pixels.numpy())


def plot_plan(plan: RolloutPlan, tau: float | None, path: Path) -> None:
    rows = plan.table()
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(steps, [r["entropy"] for r in rows], color="#b0b7c3", label="H(i, 1): single step")
    active = [r for r in rows if r["active"]]
    ax.bar(
        [r["step"] for r in active],
        [r["merged_entropy"] for r in active],
        width=0.45,
        color="#d1495b",
        label="H(i, l_i): planned merged jump",
    )
    for r in active:
        ax.annotate(f"l={r['merge_length']}", (r["step"], r["merged_entropy"]), ha="center", va="bottom", fontsize=7)
    if tau:
        ax.axhline(tau, color="black", linestyle="--", linewidth=1, label=f"tau = {tau}")
    ax.set_xlabel("denoising step i (sigma 1 -> 0)")
    ax.set_ylabel("exp. entropy per dim")
    ax.set_title(f"Entropy plan: T={plan.num_steps}, shift={plan.shift}, eta={plan.eta}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rewards(metrics_file: Path, path: Path) -> None:
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line]
    if not records:
        return
    its = [r["iteration"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(its, [r["reward_mean"] for r in records], label="rollout samples")
    if "anchor_reward" in records[0]:
        ax.plot(its, [r["anchor_reward"] for r in records], label="anchor (pure ODE)")
    evals = [(r["iteration"], r["eval"]["reward"]) for r in records if "eval" in r]
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out prompts")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.set_title("Training reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sample_grid(
    base: torch.Tensor, trained: torch.Tensor, prompts: Sequence[str], seeds: int, path: Path, rows: int = 10
) -> None:
    """Rows: the first ``rows`` held-out prompts; columns: the same seeds, base model left, trained right."""
    rows = min(rows, len(prompts) // seeds)
    fig, axes = plt.subplots(rows, 2 * seeds + 1, figsize=(0.9 * (2 * seeds + 1), 0.9 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for s in range(seeds):
            for col, images in ((s, base), (seeds + 1 + s, trained)):
                show_image(axes[r][col], images[r * seeds + s])
        axes[r][0].set_ylabel(wrapped(prompts[r * seeds]), rotation=0, ha="right", va="center", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    axes[0][seeds // 2].set_title("base", fontsize=9)
    axes[0][seeds + 1 + seeds // 2].set_title("trained", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_image_grid(images: torch.Tensor, path: Path, title: str = "", columns: int = 8) -> None:
    n = images.shape[0]
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(1.1 * columns, 1.1 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            show_image(ax, images[i])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
