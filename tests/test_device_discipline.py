"""Device discipline without a GPU: the engine runs with the policy's network on torch's ``meta`` device.

A meta tensor has a shape and no data, and torch refuses to mix a CPU tensor (other than a 0-dim scalar)
into an op on it ("Tensor on device cpu is not on the expected device meta"), as CUDA refuses to mix one
into a CUDA op. So every grid, index, mask, noise draw, advantage and coefficient the engine creates on the
host and forgets to move fails here as it would on a GPU: every method's rollout and update, every ODE
solver, evaluation sampling and the figures' rollouts, on the embedded model and on FLUX / SD3 / Qwen-Image
adapters.
Host tensors that only steer control flow (grids, indices) may stay on the CPU: indexing a device tensor
with them is allowed on CUDA and on meta alike.
"""

from __future__ import annotations

import pytest
import torch

from egrpo import config as cfg
from egrpo.embedded.model import DigitsPolicy, TinyFluxConfig, build_transformer
from egrpo.figures import COMPLETIONS
from egrpo.grpo import transition_advantages
from egrpo.methods import METHODS, build_method
from egrpo.planner import make_plan
from egrpo.policy import select
from egrpo.rollout import ODE_SOLVERS, integrate_ode, rollout_branches, sample_images, solve_ode
from egrpo.stepmath import shifted_grid_from
from egrpo.trainer import chunk_loss, iteration_generator

META = torch.device("meta")
PROMPTS = ["a photo of a hand-drawn three", "digit: seven"]


def embedded_on_meta() -> DigitsPolicy:
    # Meta kernels run in Python (0.1-0.2 s a forward of even this model): one block of each kind suffices.
    arch = TinyFluxConfig(num_layers=1, num_single_layers=1)
    with META:
        model = build_transformer(arch)
    return DigitsPolicy(arch, model=model, device=META)


def pipeline_on_meta(kind: str, tmp_path, lora_rank: int):
    """A FLUX, SD3 or Qwen-Image adapter over a tiny transformer and VAE built on the meta device, prompts from a
    real embedding cache file (read on the CPU, as in training)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    from egrpo.models.text_cache import EmbeddingCache, write_cache

    if kind == "qwen-image":
        return qwen_image_on_meta(tmp_path, lora_rank)
    with META:
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
            scaling_factor=0.5, shift_factor=0.1,
        )
        if kind == "flux":
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6),
            )
        else:
            transformer = SD3Transformer2DModel(
                sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                pos_embed_max_size=16,
            )
    pooled = 16 if kind == "flux" else 32
    rows = (torch.randn(len(PROMPTS), 8, 32), torch.randn(len(PROMPTS), pooled))
    # SD3's true CFG reads the empty prompt's embedding from the cache.
    extra = {"uncond_text": torch.randn(1, 8, 32), "uncond_pooled": torch.randn(1, pooled)} if kind == "sd3" else None
    write_cache(tmp_path / "cache.safetensors", kind, PROMPTS, [rows], extra)
    model = cfg.ModelConfig(
        kind=kind, pretrained="unused", embedding_cache=str(tmp_path / "cache.safetensors"), height=32, width=32,
        device="meta", lora_rank=lora_rank,
    )
    cache = EmbeddingCache(model.embedding_cache)
    if kind == "flux":
        from egrpo.models.flux import FluxPolicy

        return FluxPolicy(model, transformer, vae, cache)
    from egrpo.models.sd3 import SD3Policy

    return SD3Policy(model, transformer, vae, cache)


def qwen_image_on_meta(tmp_path, lora_rank: int):
    """Qwen-Image with true CFG: its text mask and the negative prompt's rows go to the device with the text."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from egrpo.models.qwen_image import QwenImagePolicy
    from egrpo.models.text_cache import EmbeddingCache, write_cache

    with META:
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                     temperal_downsample=[False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
        transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                                  axes_dims_rope=(4, 6, 6))
    mask = torch.tensor([[1.0] * 6 + [0.0] * 2, [1.0] * 8])
    extra = {"uncond_text": torch.randn(1, 8, 32), "uncond_text_mask": torch.tensor([[1.0] * 3 + [0.0] * 5])}
    write_cache(tmp_path / "cache.safetensors", "qwen-image", PROMPTS, [(torch.randn(2, 8, 32), mask)], extra,
                negative=" ")
    model = cfg.ModelConfig(
        kind="qwen-image", pretrained="unused", embedding_cache=str(tmp_path / "cache.safetensors"), height=32,
        width=32, device="meta", lora_rank=lora_rank,
    )
    return QwenImagePolicy(model, transformer, vae, EmbeddingCache(model.embedding_cache))


@pytest.fixture(scope="module", params=["embedded", "flux", "sd3-lora", "qwen-image"])
def shared_policy(request, tmp_path_factory):
    """Built once per module: the embedded policy's prompt encoder is a real sentence model (seconds a build)."""
    if request.param == "embedded":
        return embedded_on_meta()
    kind, lora = (request.param[:-5], True) if request.param.endswith("-lora") else (request.param, False)
    return pipeline_on_meta(kind, tmp_path_factory.mktemp(kind), lora_rank=4 if lora else 0)


@pytest.fixture
def policy(shared_policy):
    shared_policy.model.zero_grad(set_to_none=True)
    return shared_policy


def tiny_config(method: str, **extra) -> cfg.Config:
    overrides = {
        "sampling.num_steps": 4, "plan.active_steps": "first:2", "train.group_size": 2,
        "train.prompts_per_iteration": 2, "train.update_batch": 2, "train.max_batch": 5, "train.kl_coef": 0.1,
        "method.window": 2,  # MixGRPO's 4 would cover the whole 4-step grid, which is refused
        **extra,
    }
    return cfg.load("embedded", [f"method={method}", *(f"{k}={v}" for k, v in overrides.items())])


def on_meta(*tensors: torch.Tensor) -> bool:
    return all(t.device == META for t in tensors)


def test_meta_catches_a_host_grid_mixed_into_device_latents():
    """The guard itself: the old DPM-Solver++ completion multiplied the fp64 host grid into the latents."""
    x = torch.zeros(3, 4, device=META)
    host_grid_column = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64).float().reshape(-1, 1)
    with pytest.raises(RuntimeError, match="not on the expected device meta"):
        x * host_grid_column


# Every method on the embedded policy (the engine's own tensors); on the adapters, whose velocity does not depend on
# the method, one branching and one trajectory method, egrpo-fast covering the DPM-Solver++ completion.
METHOD_CASES = [("embedded", m) for m in sorted(METHODS)] + [
    (kind, m) for kind in ("flux", "sd3-lora", "qwen-image") for m in ("egrpo-fast", "flowgrpo")
]


@pytest.mark.parametrize("shared_policy, method", METHOD_CASES, indirect=["shared_policy"])
def test_every_method_rolls_out_and_updates_on_the_device(method, policy):
    config = tiny_config(method)
    m = build_method(config)
    if config.train.kl_coef > 0:
        policy.freeze_reference()
    cond = policy.encode(PROMPTS)
    gen = iteration_generator(config.seed, 0)
    ro = m.rollout(policy, cond, 0, gen, [iteration_generator(config.seed, 0, s) for s in range(len(PROMPTS))])
    assert ro.train_steps and on_meta(ro.finals)
    if ro.anchor_finals is not None:
        assert on_meta(ro.anchor_finals)
    # Rewards come from the reward's device (the CPU here); the update moves the advantages.
    rewards = torch.linspace(0.0, 1.0, ro.finals.shape[0])
    for ts in ro.train_steps:
        assert on_meta(ts.inputs, ts.samples, ts.log_probs)
        advantages = transition_advantages(rewards, ts.leaves, ts.groups, ro.reduce, 5.0)
        n = ts.inputs.shape[0]
        for a in range(0, n, config.train.update_batch):
            loss, stats = chunk_loss(policy, m, config, ts, a, min(a + config.train.update_batch, n), cond, advantages)
            assert on_meta(loss, *stats.values()) and set(stats) >= {"loss", "ratio_mean", "ratio_max_dev", "kl"}
            loss.backward()
    trained = [p for name, p in policy.model.named_parameters() if p.requires_grad and not dead_end(policy, name)]
    assert trained and all(p.grad is not None and on_meta(p.grad) for p in trained)


def dead_end(policy, name: str) -> bool:
    """Qwen-Image's last block's text-stream output feeds no later block and no image token: it gets no gradient."""
    if getattr(policy, "kind", None) != "qwen-image":
        return False
    last = f"transformer_blocks.{policy.transformer_config['num_layers'] - 1}."
    return last in name and ("attn.to_add_out" in name or "txt_mlp" in name)


@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_every_ode_solver_on_the_device(solver, policy):
    config = tiny_config("egrpo")
    sigmas = build_method(config).sigmas
    cond = select(policy.encode(PROMPTS), torch.tensor([0, 1, 1]))
    x = torch.randn(3, *policy.latent_shape).to(META)
    final, calls = integrate_ode(policy.velocity, x, cond, sigmas, torch.tensor([0, 1, 3]), torch.tensor([1, 2, 1]),
                                 solver)
    assert on_meta(final) and calls > 0
    grids = shifted_grid_from(sigmas[torch.tensor([1, 2, 4])], 3, 3.0)
    final, calls = solve_ode(policy.velocity, x, cond, grids, solver)
    assert on_meta(final) and calls > 0


@pytest.mark.parametrize("shared_policy", ["embedded"], indirect=True)
@pytest.mark.parametrize("setting", sorted(COMPLETIONS))
def test_the_completion_figure_rollouts_on_the_device(setting, policy):
    """figures completion (and spread, the first setting) roll out through rollout_branches with these settings."""
    spec = COMPLETIONS[setting]
    config = tiny_config("egrpo")
    plan = make_plan(**cfg.plan_kwargs(config))
    generators = [iteration_generator(0, 0, s) for s in range(len(PROMPTS))]
    ro = rollout_branches(
        policy, plan, policy.encode(PROMPTS), 2, generators, config.sampling.noise, 5,
        granularities=(spec.get("stride", 1),), completion_steps=spec.get("steps"), solver=spec.get("solver", "euler"),
    )
    assert on_meta(ro.finals, ro.anchor_finals)


def test_evaluation_sampling_on_the_device():
    """The embedded decode stays on the device; a pipeline's decode answers on the CPU by contract, which a meta
    tensor cannot be copied to, so the pipelines' sampling is covered up to its final latents above."""
    policy = embedded_on_meta()
    sigmas = build_method(tiny_config("egrpo")).sigmas
    noise = torch.randn(2, *policy.latent_shape).to(META)
    images = sample_images(policy, policy.encode(PROMPTS), noise, sigmas, max_batch=1)
    assert on_meta(images) and images.shape == (2, 1, 8, 8)
