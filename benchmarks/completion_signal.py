"""What a cheap ODE completion costs in training signal, on the embedded task and on a tiny FLUX pipeline.

For the base model, E-GRPO's planned branches are rolled out once per completion setting from the same
anchors and SDE jumps, and each group's rewards are compared with those of the full completion (every grid
step, Euler): within-group Spearman and advantage sign agreement (``egrpo figures completion``). The
embedded task has a trained model and a meaningful reward. The tiny FLUX pipeline is random (a 2 + 2 block
transformer, 64 x 64 images through a random VAE, JPEG compressibility), so it tests only whether a
latent-space model's flow keeps the group's order under a coarse completion as the digits model's does,
not whether rewards are meaningful.

    python benchmarks/completion_signal.py            # both, under 10 minutes on 2 cores
    python benchmarks/completion_signal.py --quick    # fewer groups (a test runs this)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

from egrpo import config as cfg
from egrpo import figures

HERE = Path(__file__).resolve().parent
SMALL_FLUX = dict(
    transformer=dict(num_layers=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=32,
                     in_channels=16, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(8, 12, 12)),
    vae=dict(block_out_channels=(8, 8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1),
    text_tokens=8, resolution=64,
)


def _gpu_smoke():
    """The tiny-FLUX builders of gpu_smoke.py (random transformer and VAE, random text embeddings)."""
    spec = importlib.util.spec_from_file_location("gpu_smoke", HERE / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


QUICK = ("every step, Euler", "stride 4, DPM++(2M)", "2 steps, Euler")


def tiny_flux(out: Path, batches: int, prompts: int, group: int, settings: dict | None = None) -> dict:
    smoke = _gpu_smoke()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        transformer, vae = smoke.build_modules(SMALL_FLUX)
        transformer.save_pretrained(root / "transformer")
        vae.save_pretrained(root / "vae")
        smoke.write_prompts(root, SMALL_FLUX)
        size = {**SMALL_FLUX, "num_steps": 16, "group_size": group, "max_batch": 1024}
        overrides = smoke.overrides(root, size, "cpu", 0, "first-half", 1)
        overrides += ["model.dtype=float32", f"train.prompts_per_iteration={prompts}"]
        return figures.completion(cfg.load(None, overrides), out, batches, settings)


def summary(data: dict) -> dict:
    return {
        name: {k: round(r[k], 3) for k in ("completion_calls_per_sample", "spearman", "sign_agreement")}
        for name, r in data["results"].items()
    }


def table(record: dict) -> str:
    """Markdown: one row per completion setting, both models side by side."""
    lines = [
        "| completion | embedded: calls / sample | Spearman | sign agreement | tiny FLUX: calls / sample | Spearman "
        "| sign agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in record["embedded"].items():
        f = record["tiny_flux"][name]
        lines.append(
            f"| {name} | {e['completion_calls_per_sample']:.2f} | {e['spearman']:.3f} | {e['sign_agreement']:.3f} "
            f"| {f['completion_calls_per_sample']:.2f} | {f['spearman']:.3f} | {f['sign_agreement']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 settings, 1 batch of 2 prompts a model (smoke test)")
    parser.add_argument("--out", default=str(HERE / "results" / "completion_signal"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {name: figures.COMPLETIONS[name] for name in QUICK} if args.quick else None
    embedded_overrides = ["train.prompts_per_iteration=2"] if args.quick else []
    embedded = figures.completion(
        cfg.load("embedded", embedded_overrides), Path(f"{out}.png"), 1 if args.quick else 4, settings
    )
    flux = tiny_flux(Path(f"{out}_tiny_flux.png"), 1 if args.quick else 4, 2 if args.quick else 8, 8, settings)
    record = {"embedded": summary(embedded), "tiny_flux": summary(flux)}
    print(json.dumps(record, indent=1))
    Path(f"{out}_summary.json").write_text(json.dumps(record, indent=1) + "\n")
    Path(f"{out}.md").write_text(table(record))
    print(f"wrote {out}.png/.json/.md, {out}_tiny_flux.png/.json, {out}_summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
