"""GPU smoke test of the FLUX adapter: a few E-GRPO iterations through the real Trainer, no downloads.

Builds a mid-size FLUX-architecture transformer from config (8 double + 8 single blocks, 8 heads x 128
= 1024 wide, ~0.4B parameters), a small VAE with FLUX's 8x downsampling and 16 latent channels, and
random text embeddings of FLUX's shape (512 T5 tokens x 4096, CLIP pooled 768); saves them as a
diffusers-style folder and an embedding cache, then trains with the paper's rollout (720x720, T 16,
G 12, tau 2.2 over the first 8 steps) in bf16 with gradient checkpointing and full fine-tuning.
Prints seconds per iteration and peak GPU memory as JSON (also written to --out).

    python benchmarks/gpu_smoke.py --out smoke.json             # on a GPU
    python benchmarks/gpu_smoke.py --device cpu --tiny          # a tiny run that proves the path on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egrpo import config as cfg  # noqa: E402
from egrpo.models.text_cache import write_cache  # noqa: E402
from egrpo.trainer import Trainer  # noqa: E402

MID = dict(
    transformer=dict(num_layers=8, num_single_layers=8, num_attention_heads=8, attention_head_dim=128,
                     in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
    vae=dict(block_out_channels=(32, 32, 32, 32), latent_channels=16, norm_num_groups=8),
    text_tokens=512, resolution=720, num_steps=16, group_size=12, active_steps="first-half", max_batch=24,
)
TINY = dict(
    transformer=dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                     in_channels=16, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
    vae=dict(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4),
    text_tokens=8, resolution=32, num_steps=4, group_size=2, active_steps="first:2", max_batch=24,
)


def build_pipeline(root: Path, size: dict, prompts: list[str]) -> None:
    """A FLUX transformer and VAE from config, saved where FluxPolicy.load finds them, and random embeddings."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, guidance_embeds=True, **size["transformer"])
    transformer.save_pretrained(root / "transformer")
    blocks = len(size["vae"]["block_out_channels"])
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1,
        scaling_factor=0.3611,  # FLUX.1-dev's VAE constants
        shift_factor=0.1159,
        **size["vae"],
    ).save_pretrained(root / "vae")
    width, pooled = size["transformer"]["joint_attention_dim"], size["transformer"]["pooled_projection_dim"]
    rows = (torch.randn(len(prompts), size["text_tokens"], width), torch.randn(len(prompts), pooled))
    write_cache(root / "cache.safetensors", "flux", prompts, [tuple(t.to(torch.bfloat16) for t in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and 32x32 images (for CPU tests)")
    parser.add_argument("--iterations", type=int, default=3, help="E-GRPO iterations; the first is a warm-up")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (default 0: full fine-tuning)")
    parser.add_argument("--out", help="also write the JSON result here")
    args = parser.parse_args(argv)
    size = TINY if args.tiny else MID
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu --tiny")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = [f"smoke prompt {i}" for i in range(8)]
        held = ["held-out prompt"]
        build_pipeline(root, size, train + held)
        (root / "train.txt").write_text("\n".join(train) + "\n")
        (root / "eval.txt").write_text("\n".join(held) + "\n")
        config = cfg.load(None, [
            "reward={jpeg_compressibility: 1.0}",
            "model.kind=flux", f"model.pretrained={root}", f"model.embedding_cache={root / 'cache.safetensors'}",
            f"model.height={size['resolution']}", f"model.width={size['resolution']}", f"model.device={args.device}",
            "model.dtype=bfloat16", "model.gradient_checkpointing=true", f"model.lora_rank={args.lora_rank}",
            f"sampling.num_steps={size['num_steps']}", f"plan.active_steps={size['active_steps']}",
            f"train.group_size={size['group_size']}", "train.prompts_per_iteration=1",
            f"train.max_batch={size['max_batch']}", f"train.iterations={args.iterations}",
            f"prompts.train={root / 'train.txt'}", f"prompts.eval={root / 'eval.txt'}", f"output_dir={root / 'run'}",
        ])
        trainer = Trainer(config, progress=False)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        runs = []
        for it in range(args.iterations):
            runs.append(trainer.iteration(it))
            if cuda:
                torch.cuda.synchronize()

    timed = runs[1:] or runs  # the first iteration pays for kernel selection and allocator growth
    params = sum(p.numel() for p in trainer.model.parameters())
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "size": "tiny" if args.tiny else "mid",
        "transformer_params": params,
        "trained_params": sum(p.numel() for p in trainer.params),
        "resolution": size["resolution"],
        "image_tokens": trainer.policy.latent_shape[0],
        "text_tokens": size["text_tokens"],
        "iterations": args.iterations,
        "seconds_per_iteration": statistics.mean(m["seconds"] for m in timed),
        "seconds_first_iteration": runs[0]["seconds"],
        "seconds_split": {
            part: statistics.mean(m[f"seconds_{part}"] for m in timed) for part in ("rollout", "reward", "update")
        },
        "network_calls_per_iteration": runs[0]["network_calls"],
        "first_ratio_max_dev": runs[0]["first_ratio_max_dev"],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
