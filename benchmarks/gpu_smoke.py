"""GPU smoke test of the FLUX adapter: E-GRPO iterations through the real Trainer, no downloads.

Default (mid size): builds a FLUX-architecture transformer from config (8 double + 8 single blocks,
8 heads x 128 = 1024 wide, ~0.4B parameters), a small VAE with FLUX's 8x downsampling and 16 latent
channels, and random text embeddings of FLUX's shape (512 T5 tokens x 4096, CLIP pooled 768); saves
them as a diffusers-style folder and an embedding cache, then trains with the paper's rollout
(720x720, T 16, G 12, tau 2.2 over the first 8 steps) in bf16 with gradient checkpointing and full
fine-tuning. Prints seconds per iteration and peak GPU memory as JSON (also written to --out).

--flux-dev-size: the true FLUX.1-dev transformer (19 double + 38 single blocks, 24 heads x 128,
11.9B parameters) and VAE (83.8M), random weights built directly on the GPU in bf16 (no save and
reload of 24 GB), trained with LoRA (rank 32) and gradient checkpointing, 720x720, T 16, G 12, one
prompt. A full iteration of the paper's plan pushes 1,020 latents through the network, so this mode
times ONE iteration of a reduced plan (the first 2 steps branch) after a one-call warm-up, replays
the same network calls alone (no-grad forwards for the rollout, forward + backward for the update;
iteration / replay is the engine's overhead), and extrapolates the full plan's seconds per network
call (the reward per decoded image) from the planner's counts. Under 5 minutes on one H100, before the peer below.

Both modes report utilisation (``utilisation`` in the JSON): the transformer's FLOPs per latent, counted by
torch's FlopCounterMode on the meta device (egrpo/flops.py; the update's forward + backward as trained, LoRA and
the forward that gradient checkpointing recomputes included), times the latents of the network calls one
iteration made, over the seconds of those calls replayed alone: achieved TFLOP/s per phase (rollout forwards at
their real batch sizes, each batch size apart and the largest alone; the update's forward + backward), and as a
fraction of a square matmul timed in the same run (bf16 8192^3 on a GPU; fp32 512^3 on a CPU, where it only
exercises the code).

Both modes also time a peer side by side (``peer`` in the JSON): on the trained transformer (eval mode, no gradients),
at the run's resolution and T, the largest batch of the rollout's network calls and the same initial noise, egrpo's
deterministic sampler (``integrate_ode`` over ``chunked_velocity``, as ``sample_images`` runs it before the decode)
against diffusers' own FluxPipeline denoising loop (prompt embeddings passed in, ``output_type='latent'``, its
scheduler on egrpo's grid, the guidance egrpo's FLUX policy uses: model.guidance, 3.5 unset); seconds per latent
forward of each, the ratio egrpo / diffusers (at most 1.00: egrpo's loop costs nothing over diffusers'), and the
largest difference of the two final latents. Each repeat runs both loops once; at FLUX.1-dev size one loop is
16 x 24 latent forwards, about 40 s at the 0.11 s measured on an H200, so the default 3 repeats add about 4 minutes
there (--peer-repeats 1: under 2).

    python benchmarks/gpu_smoke.py --out smoke.json                          # mid size, on a GPU
    python benchmarks/gpu_smoke.py --flux-dev-size --out flux_dev.json       # FLUX.1-dev size, on a GPU
    python benchmarks/gpu_smoke.py --device cpu --tiny [--flux-dev-size]     # a tiny model: either path on a CPU

--qwen-image-size: the same reduced-plan run on the true Qwen-Image transformer (60 blocks, 24 heads x 128,
20.4B parameters: 40.9 GB in bf16) and VAE (127M), LoRA rank 32, at qwen-image-hps's rollout (512x512, T 16,
G 12, shift 1.7138 and terminal 0.02, true CFG 4: two rows a latent), prompts of 51 to 128 text tokens with
their masks; its peer is QwenImagePipeline's loop (embeddings, masks and the negative prompt's passed in).
Not yet run on a GPU.

    python benchmarks/gpu_smoke.py --qwen-image-size --out qwen_image.json   # Qwen-Image size, on a GPU
    python benchmarks/gpu_smoke.py --device cpu --tiny --qwen-image-size     # its tiny twin on a CPU

On an offline GPU machine without diffusers, install its pure-Python wheel (pip download --no-deps
diffusers==0.42.1; it imports huggingface_hub >= 1.32, so bring that wheel too where the machine's is older):

    pip install --no-index --no-deps --target /tmp/site WHEELS
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_smoke.py --flux-dev-size --out flux_dev.json
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
from egrpo.flops import TransformerFlops, policy_flops  # noqa: E402
from egrpo.methods import build_method  # noqa: E402
from egrpo.models.flux import DEFAULT_GUIDANCE  # noqa: E402
from egrpo.models.text_cache import write_cache  # noqa: E402
from egrpo.policy import select  # noqa: E402
from egrpo.rollout import chunked_velocity, integrate_ode  # noqa: E402
from egrpo.stepmath import time_grid  # noqa: E402
from egrpo.trainer import Trainer  # noqa: E402

MID = dict(
    transformer=dict(num_layers=8, num_single_layers=8, num_attention_heads=8, attention_head_dim=128,
                     in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
    vae=dict(block_out_channels=(32, 32, 32, 32), latent_channels=16, norm_num_groups=8, layers_per_block=1),
    text_tokens=512, resolution=720, num_steps=16, group_size=12, active_steps="first-half", max_batch=24,
)
# FLUX.1-dev's published transformer/config.json and vae/config.json.
FLUX_DEV = dict(
    transformer=dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128,
                     in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
    vae=dict(block_out_channels=(128, 256, 512, 512), latent_channels=16, norm_num_groups=32, layers_per_block=2,
             use_quant_conv=False, use_post_quant_conv=False),
    text_tokens=512, resolution=720, num_steps=16, group_size=12, active_steps="first-half", max_batch=24,
    measured_steps="first:2",
)
TINY = dict(
    transformer=dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                     in_channels=16, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
    vae=dict(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1),
    text_tokens=8, resolution=32, num_steps=4, group_size=2, active_steps="first:2", max_batch=24,
    measured_steps="first:1",
)
# Qwen-Image's published transformer/config.json and vae/config.json (the diffusers classes' defaults).
QWEN_IMAGE = dict(
    kind="qwen-image",
    transformer=dict(num_layers=60, num_attention_heads=24, attention_head_dim=128, in_channels=64, out_channels=16,
                     joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
    vae=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]),
    text_tokens=128, resolution=512, num_steps=16, group_size=12, active_steps="first-half", max_batch=24,
    measured_steps="first:2", shift=1.7138, shift_terminal=0.02, guidance=4.0,
)
QWEN_TINY = dict(
    kind="qwen-image",
    transformer=dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=4,
                     joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
    vae=dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
             latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]),
    text_tokens=8, resolution=32, num_steps=4, group_size=2, active_steps="first:2", max_batch=24,
    measured_steps="first:1", shift=1.6328, shift_terminal=0.02, guidance=4.0,
)
TRAIN_PROMPTS = [f"smoke prompt {i}" for i in range(8)]
EVAL_PROMPTS = ["held-out prompt"]


def build_modules(size: dict, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A FLUX (or, ``size["kind"]``, Qwen-Image) transformer (weights in ``dtype``) and VAE (fp32, as the policies
    load it) from config with random weights, created on ``device``: a 12B transformer never exists in fp32 or on
    the CPU."""
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage, FluxTransformer2DModel, QwenImageTransformer2DModel

    torch.manual_seed(0)
    if size.get("kind") == "qwen-image":
        with torch.device(device):
            vae = AutoencoderKLQwenImage(**size["vae"])  # its default latents_mean / std are Qwen-Image's
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                transformer = QwenImageTransformer2DModel(**size["transformer"])
            finally:
                torch.set_default_dtype(previous)
        return transformer, vae
    blocks = len(size["vae"]["block_out_channels"])
    with torch.device(device):
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            scaling_factor=0.3611,  # FLUX.1-dev's VAE constants
            shift_factor=0.1159,
            **size["vae"],
        )
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            transformer = FluxTransformer2DModel(patch_size=1, guidance_embeds=True, **size["transformer"])
        finally:
            torch.set_default_dtype(previous)
    return transformer, vae


def write_prompts(root: Path, size: dict) -> None:
    """Prompt files and their random text embeddings (bf16, as ``egrpo preprocess`` writes them on a GPU)."""
    prompts = TRAIN_PROMPTS + EVAL_PROMPTS
    (root / "train.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (root / "eval.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    if size.get("kind") == "qwen-image":  # padded rows with masks: prompts from 40% of the longest to all of it
        tokens, width = size["text_tokens"], size["transformer"]["joint_attention_dim"]
        lengths = torch.linspace(0.4 * tokens, tokens, len(prompts)).round().long()
        mask = (torch.arange(tokens) < lengths[:, None]).float()
        text = torch.randn(len(prompts), tokens, width) * mask[..., None]
        negative = (torch.arange(tokens) < 2).float()[None]  # " " after the template: a couple of tokens
        extra = {"uncond_text": (torch.randn(1, tokens, width) * negative[..., None]).bfloat16(),
                 "uncond_text_mask": negative.bfloat16()}
        write_cache(root / "cache.safetensors", "qwen-image", prompts, [(text.bfloat16(), mask.bfloat16())], extra,
                    negative=" ")
        return
    width, pooled = size["transformer"]["joint_attention_dim"], size["transformer"]["pooled_projection_dim"]
    rows = (torch.randn(len(prompts), size["text_tokens"], width), torch.randn(len(prompts), pooled))
    write_cache(root / "cache.safetensors", "flux", prompts, [tuple(t.to(torch.bfloat16) for t in rows)])


def overrides(
    root: Path, size: dict, device: str, lora_rank: int, active_steps: str, iterations: int, compile: bool = False
) -> list[str]:
    return [f"model.compile={str(compile).lower()}",
        "reward={jpeg_compressibility: 1.0}",
        f"model.kind={size.get('kind', 'flux')}", f"model.pretrained={root}",
        f"model.embedding_cache={root / 'cache.safetensors'}", f"sampling.shift={size.get('shift', 3.0)}",
        *([f"model.guidance={size['guidance']}"] if "guidance" in size else []),
        *([f"sampling.shift_terminal={size['shift_terminal']}"] if "shift_terminal" in size else []),
        f"model.height={size['resolution']}", f"model.width={size['resolution']}", f"model.device={device}",
        "model.dtype=bfloat16", "model.gradient_checkpointing=true", f"model.lora_rank={lora_rank}",
        f"sampling.num_steps={size['num_steps']}", f"plan.active_steps={active_steps}",
        f"train.group_size={size['group_size']}", "train.prompts_per_iteration=1",
        f"train.max_batch={size['max_batch']}", f"train.iterations={iterations}",
        f"prompts.train={root / 'train.txt'}", f"prompts.eval={root / 'eval.txt'}", f"output_dir={root / 'run'}",
    ]


def synchronizer(cuda: bool):
    return torch.cuda.synchronize if cuda else (lambda: None)


class CallRecorder:
    """Wraps ``policy.velocity`` and logs (batch size, with gradient, a completion) of each call; a completion is a
    call made through ``policy.completion_velocity`` (compiled under --compile). It waits for each call's GPU work,
    so the trainer's phase clocks charge it to the phase that queued it (the launch queue runs ahead)."""

    def __init__(self, policy, sync):
        self.policy = policy
        self.inner, self.inner_completion = policy.velocity, policy.completion_velocity
        self.sync = sync
        self.calls: list[tuple[int, bool, bool]] = []
        self._completing = False
        policy.velocity, policy.completion_velocity = self, self.completion

    def __call__(self, x, sigma, cond, reference=False):
        out = self.inner(x, sigma, cond, reference=reference)
        self.sync()
        self.calls.append((x.shape[0], torch.is_grad_enabled() and not reference, self._completing))
        return out

    def completion(self, x, sigma, cond):
        self._completing = True  # the policy's completion path calls velocity (above) inside
        try:
            return self.inner_completion(x, sigma, cond)
        finally:
            self._completing = False

    def stop(self) -> None:
        """Calls go straight to the policy again."""
        self.policy.velocity, self.policy.completion_velocity = self.inner, self.inner_completion


def replay(trainer: Trainer, calls: list[tuple[int, bool, bool]], sync) -> tuple[dict[str, float], list]:
    """The recorded calls alone on random inputs of the same shapes: rollout calls as no-grad forwards (completions
    through the policy's completion path, as the rollout ran them), update calls as forward + backward. Seconds of
    each part, only the calls on the clock, and (batch, with gradient, seconds) of each call."""
    policy, cond_all = trainer.policy, trainer.train_cond
    available = next(iter(cond_all.values())).shape[0]
    seconds = {"rollout": 0.0, "update": 0.0}
    timed = []
    for batch, grad, completion in calls:
        velocity = policy.completion_velocity if completion else policy.velocity
        cond = select(cond_all, torch.arange(batch) % available)
        x = torch.randn((batch, *policy.latent_shape), device=policy.device)
        sigma = torch.rand(batch, device=policy.device)
        trainer.model.train(grad)  # as the trainer: eval in the rollout, train in the update
        sync()
        start = time.perf_counter()
        if grad:
            velocity(x, sigma, cond).square().mean().backward()
        else:
            with torch.no_grad():
                velocity(x, sigma, cond)
        sync()
        elapsed = time.perf_counter() - start
        seconds["update" if grad else "rollout"] += elapsed
        timed.append((batch, grad, elapsed))
    trainer.optimizer.zero_grad(set_to_none=True)
    return seconds, timed


def matmul_rate(device: str, cuda: bool, rounds: int = 5) -> dict:
    """The best TFLOP/s of ``rounds`` rounds of square matmuls: bf16 8192^3 on a GPU (the rate a transformer's
    products could reach there), fp32 512^3 on a CPU (there only so the code path runs)."""
    n, dtype, repeats = (8192, torch.bfloat16, 10) if cuda else (512, torch.float32, 3)
    sync = synchronizer(cuda)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):  # kernel selection, clocks up
        torch.matmul(a, b, out=out)
    sync()
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b, out=out)
        sync()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": best / 1e12}


def utilisation(flops: TransformerFlops, timed: list[tuple[int, bool, float]], matmul: dict) -> dict:
    """Achieved TFLOP/s of the replayed calls per phase, and as a fraction of the same run's matmul rate."""

    def phase(rows: list, flop_per_latent: int) -> dict:
        latents, seconds = sum(r[0] for r in rows), sum(r[2] for r in rows)
        tflops = latents * flop_per_latent / seconds / 1e12
        return {"calls": len(rows), "latents": latents, "seconds": seconds, "tflops": tflops,
                "fraction_of_matmul": tflops / matmul["tflops"]}

    rollout, update = [r for r in timed if not r[1]], [r for r in timed if r[1]]
    batches = sorted({r[0] for r in rollout})
    by_batch = {b: phase([r for r in rollout if r[0] == b], flops.forward) for b in batches}
    return {
        "matmul": matmul,
        "tflop_per_latent": {"forward": flops.forward / 1e12, "forward_backward": flops.forward_backward / 1e12},
        "flops_counted_by": "torch FlopCounterMode on the meta device (egrpo/flops.py)",
        "gradient_checkpointing": flops.gradient_checkpointing,
        "lora_rank": flops.lora_rank,
        "rollout": phase(rollout, flops.forward),
        "rollout_largest_batch": {"batch": batches[-1], **by_batch[batches[-1]]},
        "rollout_by_batch": {str(b): by_batch[b] for b in batches},
        "update": phase(update, flops.forward_backward),
    }


# ---- the peer: diffusers' own FluxPipeline loop on the same transformer -------------------------------------
def flux_pipeline(trainer: Trainer):
    """A FluxPipeline around the trainer's own transformer (its LoRA adapters included) and VAE, without text
    encoders, whose FlowMatchEulerDiscreteScheduler shifts by egrpo's static ``sampling.shift`` (no resolution-
    dependent shift), so the pipeline's default grid of T steps is egrpo's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    policy = trainer.policy
    transformer = trainer.model.get_base_model() if policy.lora else trainer.model
    scheduler = FlowMatchEulerDiscreteScheduler(shift=trainer.config.sampling.shift, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=policy.vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_image_pipeline(trainer: Trainer):
    """A QwenImagePipeline around the trainer's transformer and VAE, without its text encoder, whose scheduler
    shifts by egrpo's static ``sampling.shift`` (the pipeline's mu is then ignored) and stretches to its
    ``sampling.shift_terminal``, so its grid is egrpo's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    policy = trainer.policy
    transformer = trainer.model.get_base_model() if policy.lora else trainer.model
    sampling = trainer.config.sampling
    scheduler = FlowMatchEulerDiscreteScheduler(shift=sampling.shift, shift_terminal=sampling.shift_terminal,
                                                use_dynamic_shifting=False)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=policy.vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def largest_rollout_batch(calls: list[tuple[int, bool, bool]]) -> int:
    return max(batch for batch, grad, _ in calls if not grad)


def peer(trainer: Trainer, batch: int, sync, repeats: int) -> dict:
    """egrpo's deterministic sampler (``sample_images`` without the decode: ``integrate_ode`` over
    ``chunked_velocity``) against diffusers' FluxPipeline denoising loop (``output_type='latent'``: no decode), on
    the same transformer in eval mode without gradients, the same ``batch`` of initial noises and prompts, T steps
    on the same grid, the same guidance, autocast and attention kernel. Each is warmed up once by a 2-step run of
    the same batch, then the two alternate ``repeats`` times; each median over its T x ``batch`` latent forwards.

    egrpo keeps the prompts' embeddings on the CPU and moves each call's rows (as in training); the pipeline gets
    them on the device, as a diffusers user holds them. The final latents are compared in FLUX's packed layout,
    which both loops integrate in. With fp32 compute they agree to float rounding; under bf16 autocast diffusers'
    scheduler casts each step's latents back to the network output's dtype, and its timesteps with them, where egrpo
    keeps fp32 latents, so they differ by more (``tolerance`` there is a guess, not yet checked on a GPU)."""
    policy, plan, model = trainer.policy, trainer.plan, trainer.config.model
    available = next(iter(trainer.train_cond.values())).shape[0]
    cond = select(trainer.train_cond, torch.arange(batch) % available)
    embeddings = policy.on_device(cond)
    noise = torch.randn((batch, *policy.latent_shape), generator=torch.Generator().manual_seed(0)).to(policy.device)
    qwen = policy.kind == "qwen-image"
    pipe = qwen_image_pipeline(trainer) if qwen else flux_pipeline(trainer)
    velocity = chunked_velocity(policy, trainer.max_batch, completion=True)  # as sample_images (compiled: --compile)
    if qwen:
        guidance = policy.guidance
        negative = {name: row.expand(batch, *row.shape[1:]) for name, row in policy.on_device(
            policy.cache.unconditional()).items()}
        # the pipeline's own arguments: true CFG from the negative prompt's embeddings, each with its mask
        conditioning = dict(prompt_embeds=embeddings["text"], prompt_embeds_mask=embeddings["text_mask"].long(),
                            negative_prompt_embeds=negative["text"],
                            negative_prompt_embeds_mask=negative["text_mask"].long(), true_cfg_scale=guidance)
    else:
        guidance = DEFAULT_GUIDANCE if model.guidance is None else model.guidance
        conditioning = dict(prompt_embeds=embeddings["text"], pooled_prompt_embeds=embeddings["pooled"],
                            guidance_scale=guidance)
    warm = min(2, plan.num_steps)

    def egrpo(sigmas: torch.Tensor) -> torch.Tensor:
        return integrate_ode(velocity, noise, cond, sigmas)[0]

    def diffusers(steps: int) -> torch.Tensor:
        with policy.autocast(), policy.attention():
            return pipe(latents=noise, height=model.height, width=model.width, num_inference_steps=steps,
                        output_type="latent", return_dict=False, **conditioning)[0]

    def clocked(run, *args) -> tuple[float, torch.Tensor]:
        sync()
        start = time.perf_counter()
        out = run(*args)
        sync()
        return time.perf_counter() - start, out

    trainer.model.eval()
    with torch.no_grad():
        egrpo(time_grid(warm, plan.shift))
        diffusers(warm)
        seconds = {"egrpo": [], "diffusers": []}
        for _ in range(repeats):
            elapsed, ours = clocked(egrpo, plan.sigmas)
            seconds["egrpo"].append(elapsed)
            elapsed, theirs = clocked(diffusers, plan.num_steps)
            seconds["diffusers"].append(elapsed)
    latents = batch * plan.num_steps
    per_latent = {name: statistics.median(s) / latents for name, s in seconds.items()}
    difference = (ours.float() - theirs.float()).abs().max().item()
    scale = ours.abs().max().item()
    tolerance = (1e-4 if policy.dtype == torch.float32 else 2**-5) * max(scale, 1.0)
    return {
        "batch": batch,
        "batch_is": "the largest batch of the rollout's network calls (train.max_batch where a grid step has as many)",
        "num_steps": plan.num_steps,
        "guidance": guidance,
        "compute_dtype": str(policy.dtype).removeprefix("torch."),
        "repeats": repeats,
        "seconds": seconds,
        "seconds_per_latent_forward": per_latent,
        "ratio": per_latent["egrpo"] / per_latent["diffusers"],
        "ratio_is": "egrpo / diffusers seconds per latent forward (at most 1: egrpo's loop adds nothing)",
        "grid_max_abs_diff": (pipe.scheduler.sigmas.cpu().double() - plan.sigmas).abs().max().item(),
        "latents_max_abs_diff": difference,
        "latents_max_abs": scale,
        "tolerance": tolerance,
        "tolerance_is": "1e-4 x max |latent| in fp32 compute; 2^-5 x under bf16 autocast (a guess, unchecked on a GPU)",
        "latents_agree": difference <= tolerance,
    }


def mid_run(args, size: dict, cuda: bool) -> dict:
    """Iterations of the plan in full, from a pipeline saved to disk and loaded as a user's would be; the network
    calls of the first (untimed) iteration are replayed alone at the end for the utilisation."""
    iterations = 3 if args.iterations is None else args.iterations
    sync = synchronizer(cuda)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        transformer, vae = build_modules(size)
        transformer.save_pretrained(root / "transformer")
        vae.save_pretrained(root / "vae")
        del transformer, vae
        write_prompts(root, size)
        lora = args.lora_rank or 0
        steps = size["active_steps"]
        config = cfg.load(None, overrides(root, size, args.device, lora, steps, iterations, args.compile))
        trainer = Trainer(config, progress=False)
        compile_seconds = trainer.policy.compile_completions(trainer.train_cond)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        recorder = CallRecorder(trainer.policy, sync)
        runs = []
        for it in range(iterations):
            runs.append(trainer.iteration(it))
            if it == 0:
                recorder.stop()
            sync()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        _, timed = replay(trainer, recorder.calls, sync)
        side_by_side = peer(trainer, largest_rollout_batch(recorder.calls), sync, args.peer_repeats)
        compiled = compile_side_by_side(trainer, largest_rollout_batch(recorder.calls), sync, args.peer_repeats,
                                        compile_seconds)
    matmul = matmul_rate(args.device, cuda)

    timed_runs = runs[1:] or runs  # the first iteration pays for kernel selection and allocator growth
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "size": "tiny" if args.tiny else "mid",
        "transformer_params": sum(p.numel() for p in trainer.model.parameters()),
        "trained_params": sum(p.numel() for p in trainer.params),
        "resolution": size["resolution"],
        "image_tokens": trainer.policy.latent_shape[0],
        "text_tokens": size["text_tokens"],
        "iterations": iterations,
        "seconds_per_iteration": statistics.mean(m["seconds"] for m in timed_runs),
        "seconds_first_iteration": runs[0]["seconds"],
        "seconds_split": {
            part: statistics.mean(m[f"seconds_{part}"] for m in timed_runs) for part in ("rollout", "reward", "update")
        },
        "network_calls_per_iteration": runs[0]["network_calls"],
        "first_ratio_max_dev": runs[0]["first_ratio_max_dev"],
        "peak_memory_gib": peak,
        "utilisation": utilisation(policy_flops(trainer.policy), timed, matmul),
        "peer": side_by_side,
        "compile": compiled,
    }


# ---- --flux-dev-size ------------------------------------------------------------------------------
def warm_up(trainer: Trainer) -> None:
    """One forward + backward, one no-grad forward and one decode at batch 1: CUDA context, kernels, allocator."""
    policy = trainer.policy
    cond = select(trainer.train_cond, torch.zeros(1, dtype=torch.long))
    x = torch.randn((1, *policy.latent_shape), device=policy.device)
    sigma = torch.full((1,), 0.5, device=policy.device)
    trainer.model.train()
    policy.velocity(x, sigma, cond).square().mean().backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.eval()
    with torch.no_grad():
        policy.decode(policy.velocity(x, sigma, cond))


def plan_counts(config: cfg.Config) -> dict:
    """What an E-GRPO iteration of ``config`` does, counted by its method without running it."""
    method = build_method(config)
    plan, calls = method.plan, method.describe()
    p, g = config.train.prompts_per_iteration, config.train.group_size
    rollout = calls["network_calls"] - calls["update_calls"]
    return {
        "active_steps": plan.active_steps,
        "merge_lengths": plan.merge_lengths,
        "network_calls": {"rollout": p * rollout, "update": p * calls["update_calls"]},
        "decoded_images": p * (len(plan.branches) * g + 1),  # every branch sample, and the anchor
    }


def flux_dev_run(args, size: dict, cuda: bool) -> dict:
    """One timed iteration of a reduced plan on a policy assembled in memory, extrapolated to the full plan."""
    from egrpo.devices import resolve_device
    from egrpo.models.flux import FluxPolicy
    from egrpo.models.qwen_image import QwenImagePolicy
    from egrpo.models.text_cache import EmbeddingCache
    from egrpo.tasks import Task

    policy_class = QwenImagePolicy if size.get("kind") == "qwen-image" else FluxPolicy

    sync = synchronizer(cuda)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_prompts(root, size)
        lora = 32 if args.lora_rank is None else args.lora_rank
        config = cfg.load(None, overrides(root, size, args.device, lora, size["measured_steps"], 1, args.compile))
        full = cfg.load(None, overrides(root, size, args.device, lora, size["active_steps"], 1, args.compile))
        transformer, vae = build_modules(size, resolve_device(args.device), policy_class.weight_dtype(config.model))
        policy = policy_class(config.model, transformer, vae, EmbeddingCache(root / "cache.safetensors"))
        task = Task(policy=policy, train_prompts=TRAIN_PROMPTS, eval_prompts=EVAL_PROMPTS)
        trainer = Trainer(config, task=task, progress=False)
        sync()
        built = time.perf_counter()
        warm_up(trainer)
        sync()
        warmed = time.perf_counter()
        compile_seconds = policy.compile_completions(trainer.train_cond)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        recorder = CallRecorder(policy, sync)
        metrics = trainer.iteration(0)
        recorder.stop()
        peak = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30) if cuda else None
        replayed, timed = replay(trainer, recorder.calls, sync)
        side_by_side = peer(trainer, largest_rollout_batch(recorder.calls), sync, args.peer_repeats)
        compiled = compile_side_by_side(trainer, largest_rollout_batch(recorder.calls), sync, args.peer_repeats,
                                        compile_seconds)
    finished = time.perf_counter()
    matmul = matmul_rate(args.device, cuda)

    measured, planned = plan_counts(config), plan_counts(full)
    seconds = {part: metrics[f"seconds_{part}"] for part in ("rollout", "reward", "update")}
    # Each phase scales with what it repeats: network calls (rollout, update) or decoded images (reward).
    scale = {
        "rollout": planned["network_calls"]["rollout"] / measured["network_calls"]["rollout"],
        "reward": planned["decoded_images"] / measured["decoded_images"],
        "update": planned["network_calls"]["update"] / measured["network_calls"]["update"],
    }
    extrapolated = {part: seconds[part] * scale[part] for part in seconds}
    network_alone = {part: replayed[part] * scale[part] for part in replayed}
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "size": "tiny" if args.tiny else ("qwen-image" if policy_class is QwenImagePolicy else "flux-dev"),
        "model": policy.kind,
        "transformer_params": sum(p.numel() for p in trainer.model.parameters()),
        "trained_params": sum(p.numel() for p in trainer.params),
        "lora_rank": lora,
        "resolution": size["resolution"],
        "image_tokens": policy.latent_shape[0],
        "text_tokens": size["text_tokens"],
        "group_size": size["group_size"],
        "seconds_build": built - started,
        "seconds_warmup": warmed - built,
        "seconds_total": finished - started,  # after imports: build, warm-up, the iteration, its replay
        "extrapolated": True,
        "measured_plan": {
            **measured,
            "trainer_network_calls": metrics["network_calls"],
            "seconds": {**seconds, "iteration": metrics["seconds"]},
            "network_alone_seconds": replayed,
        },
        "full_plan": {
            **planned,
            "seconds": {**extrapolated, "iteration": sum(extrapolated.values())},
            "network_alone_seconds": network_alone,
        },
        "latents_per_second": measured["network_calls"]["rollout"] / seconds["rollout"],
        "seconds_per_latent_forward": replayed["rollout"] / measured["network_calls"]["rollout"],
        "iteration_over_network": metrics["seconds"] / sum(replayed.values()),
        "peak_memory_allocated_gib": peak[0] if peak else None,
        "peak_memory_reserved_gib": peak[1] if peak else None,
        "utilisation": utilisation(policy_flops(policy), timed, matmul),
        "peer": side_by_side,
        "compile": compiled,
    }


def compile_side_by_side(
    trainer: Trainer, batch: int, sync, repeats: int, compile_seconds: float | None
) -> dict | None:
    """With --compile (model.compile): one latent forward of the rollout's largest ``batch`` through the eager
    network (what trained transitions and the update run) against the compiled blocks (what completions run), the two
    alternating ``repeats`` times after one call each, each the median over 10 calls; and the compile time. None
    without --compile."""
    if compile_seconds is None:
        return None
    policy = trainer.policy
    available = next(iter(trainer.train_cond.values())).shape[0]
    cond = select(trainer.train_cond, torch.arange(batch) % available)
    x = torch.randn((batch, *policy.latent_shape), generator=torch.Generator().manual_seed(0)).to(policy.device)
    sigma = torch.full((batch,), 0.5, device=policy.device)
    runs = {"eager": policy.velocity, "compiled": policy.completion_velocity}
    seconds = {name: [] for name in runs}
    trainer.model.eval()
    with torch.no_grad():
        out = {name: run(x, sigma, cond) for name, run in runs.items()}
        for _ in range(repeats):
            for name, run in runs.items():
                sync()
                start = time.perf_counter()
                for _ in range(10):
                    run(x, sigma, cond)
                sync()
                seconds[name].append((time.perf_counter() - start) / 10)
    per_latent = {name: statistics.median(s) / batch for name, s in seconds.items()}
    return {
        "compile_seconds": compile_seconds,
        "compile_is": "regional torch.compile of the repeated blocks, at batch 2 and 3 (egrpo/regional_compile.py)",
        "batch": batch,
        "seconds_per_latent_forward": per_latent,
        "speedup": per_latent["eager"] / per_latent["compiled"],
        "velocity_max_abs_diff": (out["eager"] - out["compiled"]).abs().max().item(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and 32x32 images (for CPU tests)")
    parser.add_argument("--flux-dev-size", action="store_true",
                        help="FLUX.1-dev's transformer and VAE, LoRA, one timed iteration of a reduced plan")
    parser.add_argument("--qwen-image-size", action="store_true",
                        help="Qwen-Image's transformer and VAE, LoRA, one timed iteration of a reduced plan")
    parser.add_argument("--iterations", type=int,
                        help="E-GRPO iterations of the mid size (default 3; the first is a warm-up)")
    parser.add_argument("--lora-rank", type=int,
                        help="LoRA rank (default 0, full fine-tuning; 32 with --flux-dev-size)")
    parser.add_argument("--peer-repeats", type=int, default=3,
                        help="timed runs of each sampler in the side by side with diffusers' FluxPipeline (default 3)")
    parser.add_argument("--compile", action="store_true",
                        help="model.compile: completions through the compiled blocks, and their speed-up measured")
    parser.add_argument("--out", help="also write the JSON result here")
    args = parser.parse_args(argv)
    if args.peer_repeats < 1:
        parser.error(f"--peer-repeats must be >= 1, got {args.peer_repeats}")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu --tiny")
    if args.flux_dev_size and args.qwen_image_size:
        parser.error("--flux-dev-size or --qwen-image-size: one model a run")
    if args.flux_dev_size or args.qwen_image_size:
        flag, params, state = ("--qwen-image-size", "20.4B", "327") if args.qwen_image_size else ("--flux-dev-size",
                                                                                                 "12B", "190")
        if args.iterations is not None:
            parser.error(f"{flag} times one iteration of a reduced plan; --iterations is for the mid size")
        if args.lora_rank == 0 and not args.tiny:
            parser.error(f"{flag} needs LoRA: full fine-tuning of {params} parameters (fp32 weights, gradients "
                         f"and Adam moments, ~{state} GB) does not fit one GPU")
        if not cuda and not args.tiny:
            parser.error(f"{flag} on a CPU needs --tiny")
        if args.qwen_image_size:
            result = flux_dev_run(args, QWEN_TINY if args.tiny else QWEN_IMAGE, cuda)
        else:
            result = flux_dev_run(args, TINY if args.tiny else FLUX_DEV, cuda)
    else:
        result = mid_run(args, TINY if args.tiny else MID, cuda)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
