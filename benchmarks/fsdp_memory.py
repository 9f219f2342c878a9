"""Per-rank memory of FSDP2 training against model size, on the CPU with gloo, for world sizes 1, 2 and 4.

Builds a FLUX-architecture transformer (diffusers ``FluxTransformer2DModel``, 8 double + 16 single blocks,
512 wide: about 560 MB of fp32 weights) as a diffusers folder, then trains it with ``egrpo``'s Trainer
under torchrun (``train.distributed=fsdp``; one rank is the unsharded baseline) and records each rank's
peak resident memory above its own starting point in every phase:

    load        Trainer construction: the model built and its weights read
    train       a few E-GRPO iterations (weights, gradients and AdamW state)
    checkpoint  a checkpoint (DCP shards under FSDP)
    resume      a new process resuming from that checkpoint
    export      the final model.safetensors and the weight checksums

The peak of a phase is the kernel's high-water mark of the resident set (VmHWM), reset at the start of
the phase by writing 5 to /proc/self/clear_refs (Linux). torch threads are pinned to 1 per rank so four
ranks share two cores sanely. Writes benchmarks/results/fsdp_memory.json (and the README's table, .md):
``{"runs": [{"world_size": N, "model_bytes": B, "phases": {phase: bytes, ...}, "ranks": [...]}]}``,
each phase the largest peak over ranks.

    python benchmarks/fsdp_memory.py                      # world sizes 1, 2, 4 (a few minutes on 2 cores)
    python benchmarks/fsdp_memory.py --world-sizes 1,2 --small --out /tmp/m.json   # the quick test
    python benchmarks/fsdp_memory.py --lora-rank 32 --out benchmarks/results/fsdp_memory_lora.json   # LoRA
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("load", "train", "checkpoint", "resume", "export")
SIZES = {
    # FLUX.1-dev has 57 blocks, each under 3% of the model; FSDP gathers one or two at a time. Many thin
    # blocks keep that proportion: 8 double + 16 single blocks, 512 wide, ~140M parameters, 560 MB in fp32.
    "default": dict(num_layers=8, num_single_layers=16, num_attention_heads=4, attention_head_dim=128),
    "small": dict(num_layers=2, num_single_layers=4, num_attention_heads=2, attention_head_dim=64),
}
TEXT_TOKENS, RESOLUTION = 8, 16
# glibc raises its mmap threshold to the size of each freed mmapped block (up to 32 MB), after which FSDP's
# freed gather buffers stay in the heap and a rank's resident set ratchets up to a gathered copy of every
# block. A GPU's caching allocator reuses those buffers instead; a fixed threshold (64 KB) makes the CPU
# return them too, so the headline runs measure what FSDP holds, and the glibc default is reported beside.
RELEASE_THRESHOLD = 65536


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_pipeline(root: Path, size: str, prompts: list[str]) -> int:
    """A diffusers folder (transformer + small VAE) and an embedding cache; returns the transformer's bytes."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from egrpo.models.text_cache import write_cache

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56) if SIZES[size]["attention_head_dim"] == 128 else (8, 28, 28), **SIZES[size],
    )
    transformer.save_pretrained(root / "transformer")
    model_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    del transformer
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=4,
    ).save_pretrained(root / "vae")
    rows = (torch.randn(len(prompts), TEXT_TOKENS, 4096), torch.randn(len(prompts), 768))
    write_cache(root / "cache.safetensors", "flux", prompts, [rows])
    return model_bytes


def overrides(root: Path, run: Path, iterations: int, lora_rank: int) -> list[str]:
    return [f"model.lora_rank={lora_rank}",
        "reward={jpeg_compressibility: 1.0}", "model.kind=flux", f"model.pretrained={root}",
        f"model.embedding_cache={root / 'cache.safetensors'}", f"model.height={RESOLUTION}",
        f"model.width={RESOLUTION}", "model.device=cpu", "train.distributed=fsdp", "sampling.num_steps=4",
        "plan.active_steps=first:1", "train.group_size=2", "train.prompts_per_iteration=1",
        f"train.iterations={iterations}", "eval.seeds_per_prompt=1",
        f"prompts.train={root / 'train.txt'}", f"prompts.eval={root / 'eval.txt'}", f"output_dir={run}",
    ]


def worker(args: argparse.Namespace) -> None:
    """One rank: the phases of one process (``--part first``: load, train, checkpoint; ``resume``: the rest)."""
    import torch

    torch.set_num_threads(1)
    # Libraries the Trainer imports lazily load before the starting point, so no phase counts their code.
    import diffusers  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    from diffusers import AutoencoderKL, FluxTransformer2DModel  # noqa: F401

    from egrpo import config as cfg
    from egrpo.trainer import Trainer

    root, run = Path(args.root), Path(args.run_dir)
    config = cfg.load(None, overrides(root, run, args.iterations, int(args.lora_rank)))
    start = rss_bytes("VmRSS")
    peaks: dict[str, int] = {}

    def measure(phase, action):
        reset_peak()
        result = action()
        peaks[phase] = rss_bytes("VmHWM") - start
        return result

    if args.part == "first":
        trainer = measure("load", lambda: Trainer(config, progress=False))
        measure("train", lambda: [trainer.iteration(it) for it in range(args.iterations)])
        measure("checkpoint", lambda: trainer._checkpoint(args.iterations, 0.0))
    else:
        trainer = measure("resume", lambda: Trainer(config, resume=True, progress=False))

        def export():
            trainer.world.checksums(trainer.model)
            trainer._export(run / "model.safetensors")

        measure("export", export)
    trainer.world.shutdown()
    Path(f"{args.report}.{trainer.world.rank}.json").write_text(json.dumps(peaks))


def launch(
    world_size: int, root: Path, run: Path, part: str, report: Path, iterations: int, release: bool, lora_rank: int
) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
        "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--worker", "--part", part,
        "--root", str(root), "--run-dir", str(run), "--report", str(report), "--iterations", str(iterations),
        "--lora-rank", str(lora_rank),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if release:
        env["MALLOC_MMAP_THRESHOLD_"] = str(RELEASE_THRESHOLD)
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{world_size} ranks, part {part} failed:\n{result.stderr[-4000:]}")
    return [json.loads(Path(f"{report}.{rank}.json").read_text()) for rank in range(world_size)]


def markdown(result: dict) -> str:
    """The README table: per-rank peak MiB per phase, each world size against one rank."""
    lines = [
        "| ranks | malloc | " + " | ".join(PHASES) + " | train vs 1 rank |",
        "|---|---|" + "---|" * (len(PHASES) + 1),
    ]
    for key, malloc in (("runs", "64 KB mmap threshold"), ("runs_glibc_default_malloc", "glibc default")):
        runs = result[key]
        single = next((r["phases"]["train"] for r in runs if r["world_size"] == 1), None)
        for run in runs:
            cells = [str(round(run["phases"][p] / 2**20)) for p in PHASES]
            ratio = f"{run['phases']['train'] / single:.2f}" if single else "-"
            lines.append(f"| {run['world_size']} | {malloc} | " + " | ".join(cells) + f" | {ratio} |")
    model = result["runs"][0]["model_bytes"] / 2**20
    lines.append("")
    if result.get("lora_rank"):
        lines.append(f"Model: {model:.0f} MiB of fp32 weights, frozen under LoRA rank {result['lora_rank']}; one "
                     "process holds them once, plus the adapters' weights, gradients and AdamW moments.")
    else:
        lines.append(f"Model: {model:.0f} MiB of fp32 weights; one process holds 4x that in training (weights, "
                     "gradients, two AdamW moments).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", default="1,2,4")
    parser.add_argument("--iterations", type=int, default=2, help="E-GRPO iterations in the train phase")
    parser.add_argument("--small", action="store_true", help="a ~10 MB transformer (for the test)")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA over the sharded frozen base (default 0: full)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fsdp_memory.json"))
    for hidden in ("--worker", "--part", "--root", "--run-dir", "--report"):
        parser.add_argument(hidden, action="store_true" if hidden == "--worker" else "store", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    sizes = [int(n) for n in args.world_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prompts = [f"benchmark prompt {i}" for i in range(8)]
        (root / "train.txt").write_text("\n".join(prompts[:-1]) + "\n")
        (root / "eval.txt").write_text(prompts[-1] + "\n")
        model_bytes = build_pipeline(root, "small" if args.small else "default", prompts)
        runs, default_malloc = [], []
        for release, out in ((True, runs), (False, default_malloc)):
            for n in sizes:
                name = f"{n}-{'release' if release else 'default'}"
                run = root / f"run-{name}"
                ranks = launch(n, root, run, "first", root / f"first-{name}", args.iterations, release, args.lora_rank)
                resumed = launch(n, root, run, "resume", root / f"resume-{name}", args.iterations, release,
                                 args.lora_rank)
                ranks = [{**a, **b} for a, b in zip(ranks, resumed)]
                phases = {phase: max(r[phase] for r in ranks) for phase in PHASES}
                out.append({"world_size": n, "model_bytes": model_bytes, "phases": phases, "ranks": ranks})
                mib = {phase: round(b / 2**20) for phase, b in phases.items()}
                malloc = f"MALLOC_MMAP_THRESHOLD_={RELEASE_THRESHOLD}" if release else "glibc default malloc"
                print(f"world size {n} ({malloc}): model {model_bytes / 2**20:.0f} MiB, per-rank peak MiB {mib}",
                      flush=True)
    result = {
        "lora_rank": args.lora_rank,
        "runs": runs,
        "runs_glibc_default_malloc": default_malloc,
        "unit": "bytes: the peak resident set in the phase minus the rank's resident set when its process started",
        "malloc": f"runs: MALLOC_MMAP_THRESHOLD_={RELEASE_THRESHOLD} (freed buffers go back to the OS)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
