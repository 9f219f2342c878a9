"""GPU smoke test of the Wan adapter: E-GRPO iterations of the shipped wan21-t2v-1.3b-hps recipe through the real
Trainer, no downloads.

--wan21-size (default): Wan 2.1 T2V 1.3B's transformer (30 blocks, 12 heads x 128, 1.42B parameters) and video VAE
(127M) from their published configs with random weights, random umT5-shaped text embeddings (512 tokens x 4096),
saved as a diffusers folder and an embedding cache, then trained as the shipped config says (240x416, 33 frames,
T 16, G 12, tau 2.2 over the first 8 steps, CFG 4.5, LoRA rank 32, bf16, gradient checkpointing) on JPEG
compressibility scored on 4 frames (HPS would need its weights). Prints seconds per iteration, its split and peak
GPU memory as JSON (also written to --out): the measured row of the README's model table.

    python benchmarks/wan_smoke.py --out wan21.json                        # on a GPU
    python benchmarks/wan_smoke.py --active-steps first:2 --out wan21.json # a cheaper plan: 2 branch steps
    python benchmarks/wan_smoke.py --device cpu --tiny                     # a tiny Wan, on a CPU (tests)
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egrpo import config as cfg  # noqa: E402
from egrpo.models.text_cache import write_cache  # noqa: E402
from egrpo.trainer import Trainer  # noqa: E402

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers' transformer/config.json; its vae/config.json is AutoencoderKLWan's defaults.
WAN21 = dict(
    transformer=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096),
    vae={}, text_tokens=512, height=240, width=416, frames=33, num_steps=16, group_size=12,
)
TINY = dict(
    transformer=dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2, text_dim=32,
                     rope_max_seq_len=32),
    vae=dict(base_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
    text_tokens=8, height=32, width=32, frames=5, num_steps=4, group_size=2,
)
TRAIN_PROMPTS = [f"smoke prompt {i}" for i in range(8)]
EVAL_PROMPTS = ["held-out prompt"]


def save_pipeline(root: Path, size: dict, device: str) -> None:
    """A WanPipeline folder without text encoder: random transformer (bf16, built on ``device``) and VAE (fp32)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        transformer = WanTransformer3DModel(**size["transformer"]).to(torch.bfloat16)
        vae = AutoencoderKLWan(**size["vae"])
    WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)).save_pretrained(root / "pipeline")


def write_prompts(root: Path, size: dict) -> None:
    """Prompt files and random umT5-shaped embeddings (bf16, as ``egrpo preprocess`` writes them on a GPU); Wan's
    rows carry no pooled embedding, and the negative prompt is the empty one."""
    prompts = TRAIN_PROMPTS + EVAL_PROMPTS
    width = size["transformer"]["text_dim"]
    text = torch.randn(len(prompts), size["text_tokens"], width).to(torch.bfloat16)
    empty = torch.zeros(len(prompts), 0, dtype=torch.bfloat16)
    extra = {"uncond_text": torch.randn(1, size["text_tokens"], width).to(torch.bfloat16),
             "uncond_pooled": torch.zeros(1, 0, dtype=torch.bfloat16)}
    write_cache(root / "cache.safetensors", "wan", prompts, [(text, empty)], extra, str(root),
                negative="")
    (root / "train.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (root / "eval.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")


def overrides(root: Path, size: dict, args) -> list[str]:
    return [
        "reward={jpeg_compressibility: 1.0}",
        f"model.pretrained={root / 'pipeline'}", f"model.embedding_cache={root / 'cache.safetensors'}",
        f"model.height={size['height']}", f"model.width={size['width']}", f"model.frames={size['frames']}",
        f"model.device={args.device}", f"model.lora_rank={args.lora_rank}",
        f"sampling.num_steps={size['num_steps']}", f"plan.active_steps={args.active_steps}",
        f"train.group_size={size['group_size']}", f"train.iterations={args.iterations}",
        f"prompts.train={root / 'train.txt'}", f"prompts.eval={root / 'eval.txt'}", f"output_dir={root / 'run'}",
    ]


def run(args) -> dict:
    size = TINY if args.tiny else WAN21
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        save_pipeline(root, size, args.device)
        write_prompts(root, size)
        config = cfg.load("wan21-t2v-1.3b-hps", overrides(root, size, args))
        trainer = Trainer(config, progress=False)
        seconds_build = time.perf_counter() - start
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runs = []
        for it in range(args.iterations):
            runs.append(trainer.iteration(it))
            sync()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    timed = runs[1:] or runs  # the first iteration pays for kernel selection and allocator growth
    policy = trainer.policy
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "size": "tiny" if args.tiny else "wan2.1-t2v-1.3b",
        "transformer_params": sum(p.numel() for p in trainer.model.parameters()),
        "trained_params": sum(p.numel() for p in trainer.params),
        "video": {"height": size["height"], "width": size["width"], "frames": size["frames"],
                  "latent_shape": list(policy.latent_shape), "reward_frames": policy.reward_frames},
        "text_tokens": size["text_tokens"],
        "active_steps": args.active_steps,
        "iterations": args.iterations,
        "seconds_build": seconds_build,
        "seconds_per_iteration": statistics.mean(m["seconds"] for m in timed),
        "seconds_first_iteration": runs[0]["seconds"],
        "seconds_split": {
            part: statistics.mean(m[f"seconds_{part}"] for m in timed) for part in ("rollout", "reward", "update")
        },
        "network_calls_per_iteration": runs[0]["network_calls"],
        "first_ratio_max_dev": runs[0]["first_ratio_max_dev"],
        "peak_memory_gib": peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny Wan and 32x32 videos of 5 frames (CPU tests)")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations (the first one is not averaged)")
    parser.add_argument("--lora-rank", type=int, default=32, help="LoRA rank (0: full fine-tuning)")
    parser.add_argument("--active-steps", default="first-half",
                        help="plan.active_steps: first-half (the shipped plan) or e.g. first:2 for a cheaper run")
    parser.add_argument("--out", help="also write the JSON result here")
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
