"""Wan 2.1 / 2.2 text-to-video on tiny random pipelines built offline: sampling equal to WanPipeline's own loop,
the umT5 embedding cache, frame rewards, LoRA and full training through `egrpo train`, resume and export."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_flux_sd3 import EVAL, TRAIN, t5_tokenizer

from egrpo import config as cfg
from egrpo.cli import main
from egrpo.errors import ConfigError
from egrpo.models.text_cache import EmbeddingCache
from egrpo.rollout import chunked_velocity, integrate_ode
from egrpo.tasks import build_task
from egrpo.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest.one_thread

NEGATIVE = "a blue painting"  # the unconditional branch's text, in the cache
FRAMES = 5  # 4k + 1: two latent frames


def tiny_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def tiny_vae():
    """Wan's causal video VAE, 3 base channels: 8x smaller frames, 4 frames after the first to a latent frame."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def save_tiny_wan(root: Path, two_experts: bool = False) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(0)
    tokenizer = t5_tokenizer()
    encoder = transformers.UMT5EncoderModel(
        transformers.UMT5Config(vocab_size=len(tokenizer), d_model=32, d_ff=32, d_kv=8, num_layers=1, num_heads=2)
    )
    extra = {"transformer_2": tiny_transformer(), "boundary_ratio": 0.7} if two_experts else {}
    WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny_vae(), transformer=tiny_transformer(),
                scheduler=FlowMatchEulerDiscreteScheduler(), **extra).save_pretrained(root)


def write_config(root: Path, **model) -> Path:
    """32x32 frames, 5 frames, 2 scored; 4 steps, G 2, 2 active steps."""
    (root / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "eval.txt").write_text("\n".join(EVAL) + "\n")
    config = {
        "reward": {"jpeg_compressibility": 1.0},
        "model": {
            "kind": "wan", "pretrained": str(root / "pipeline"), "embedding_cache": str(root / "cache.safetensors"),
            "height": 32, "width": 32, "frames": FRAMES, "reward_frames": 2, "max_sequence_length": 8,
            "negative_prompt": NEGATIVE, "device": "cpu", **model,
        },
        "sampling": {"num_steps": 4},
        "plan": {"active_steps": "first:2"},
        "train": {"iterations": 1, "prompts_per_iteration": 1, "group_size": 2, "lr": 1.0e-3},
        "prompts": {"train": str(root / "train.txt"), "eval": str(root / "eval.txt")},
        "eval": {"seeds_per_prompt": 1},
    }
    path = root / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def preprocess(root: Path) -> None:
    assert main(["preprocess", str(root / "config.yaml"), "--prompts", str(root / "train.txt"), "--prompts",
                 str(root / "eval.txt"), "--no-progress"]) == 0


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """The folder of a saved tiny Wan 2.1 pipeline, its config and its embedding cache."""
    root = tmp_path_factory.mktemp("wan")
    save_tiny_wan(root / "pipeline")
    write_config(root)
    preprocess(root)
    return root


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    """A tiny Wan 2.2 pipeline: two experts, switched at boundary_ratio 0.7."""
    root = tmp_path_factory.mktemp("wan22")
    save_tiny_wan(root / "pipeline", two_experts=True)
    write_config(root, guidance_2=3.0)
    preprocess(root)
    return root


def pipeline_loop(root: Path, noise: torch.Tensor, text: torch.Tensor, negative: torch.Tensor, steps: int,
                  output_type: str, **guidance):
    """WanPipeline's own call on precomputed embeddings and noise, Euler steps shifted by 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(root / "pipeline", text_encoder=None, tokenizer=None)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=text, negative_prompt_embeds=negative, latents=noise.clone(), height=32, width=32,
               num_frames=FRAMES, num_inference_steps=steps, output_type=output_type, return_dict=False, **guidance)
    return out[0], pipe.scheduler.sigmas.double()


def egrpo_loop(policy, noise: torch.Tensor, prompts: list[str], sigmas: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return integrate_ode(chunked_velocity(policy, 16), noise, policy.encode(prompts), sigmas)[0]


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_sampling_equals_the_wan_pipelines_own_loop(version, request):
    """Same transformer(s), noise, embeddings, guidance and sigmas (WanPipeline's scheduler places its own grid, so
    egrpo integrates on that grid here): the final latents agree to float rounding, and so do the decoded frames."""
    root = request.getfixturevalue("wan" if version == "2.1" else "wan22")
    policy = build_task(cfg.load(str(root / "config.yaml"))).policy
    assert policy.latent_shape == (16, 2, 4, 4)  # 5 frames -> 2 latent frames; 32 px / 8
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    text, negative = policy.cache.lookup(EVAL)["text"], policy.cache.unconditional()["text"].expand(2, -1, -1)
    guidance = {"guidance_scale": 5.0} if version == "2.1" else {"guidance_scale": 5.0, "guidance_scale_2": 3.0}
    steps = 6
    theirs, sigmas = pipeline_loop(root, noise, text, negative, steps, "latent", **guidance)
    if version == "2.2":  # both experts ran: the boundary 0.7 x 1000 falls inside the grid
        assert (sigmas[:-1] >= 0.7).any() and (sigmas[:-1] < 0.7).any()
    ours = egrpo_loop(policy, noise, EVAL, sigmas)
    scale = ours.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 1e-4 * max(scale, 1.0)  # the FLUX / SD3 peer's tolerance
    video, _ = pipeline_loop(root, noise, text, negative, steps, "pt", **guidance)  # (B, frames, C, H, W)
    frames = policy.decode(ours)
    assert policy.reward_frames == [0, FRAMES - 1] and frames.shape == (2, 2, 3, 32, 32)
    torch.testing.assert_close(frames, video[:, policy.reward_frames], rtol=0, atol=1e-4)
    # a velocity that ignored the guidance or the expert switch would not agree
    if version == "2.2":
        policy.guidance_2 = 1.0
        assert (egrpo_loop(policy, noise, EVAL, sigmas) - theirs).abs().max().item() > 1e-2


def test_preprocess_writes_what_the_pipelines_encode_prompt_returns(wan):
    from diffusers import WanPipeline

    cache = EmbeddingCache(wan / "cache.safetensors")
    assert cache.kind == "wan" and cache.prompts == TRAIN + EVAL and cache.negative_prompt == NEGATIVE
    assert cache.pooled_dim == 0 and cache.text_shape == (8, 32)
    pipe = WanPipeline.from_pretrained(wan / "pipeline", transformer=None, vae=None)
    with torch.no_grad():
        text, negative = pipe.encode_prompt(EVAL, [NEGATIVE] * 2, max_sequence_length=8, device="cpu")
    torch.testing.assert_close(cache.lookup(EVAL)["text"], text, rtol=0, atol=1e-6)
    torch.testing.assert_close(cache.unconditional()["text"], negative[:1], rtol=0, atol=1e-6)
    assert not torch.allclose(text[0], text[1])  # the prompts reached the encoder
    stored = load_file(str(wan / "cache.safetensors"))  # a plain safetensors file, the empty pooled rows included
    assert stored["pooled"].shape == (len(TRAIN + EVAL), 0)


def test_a_cache_of_another_negative_prompt_is_refused(wan):
    config = cfg.load(str(wan / "config.yaml"), ["model.negative_prompt=blurry"])
    with pytest.raises(ConfigError, match=r"negative_prompt='blurry'.*encoded 'a blue painting'.*egrpo preprocess"):
        build_task(config)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.frames=6", r"model.frames must be 4k \+ 1 .* got 6: use e.g. 5"),
        ("model.height=40", r"multiples of 16 for Wan"),
        ("model.reward_frames=9", r"model.reward_frames=9: a count of frames must be in 1..model.frames \(5\)"),
        ("model.reward_frames=[0,5]", r"frame indices must be distinct and in 0..4"),
        ("model.guidance_2=2.0", r"model.guidance_2=2.0 is the low-noise expert's scale of Wan 2.2"),
    ],
)
def test_bad_video_settings_are_refused_with_what_to_do(wan, override, message):
    with pytest.raises(ConfigError, match=message):
        build_task(cfg.load(str(wan / "config.yaml"), [override]))


def test_reward_frames_are_spread_from_the_first_to_the_last():
    from egrpo.models.wan import frame_indices

    def chosen(count, frames=81):
        return frame_indices(cfg.ModelConfig(frames=frames, reward_frames=count))

    assert chosen(4) == [0, 27, 53, 80] and chosen(1) == [0] and chosen(2, 5) == [0, 4]
    assert chosen([3, 1]) == [3, 1]


def test_a_video_is_scored_as_the_mean_of_its_frames_and_the_http_reward_gets_it_whole(tmp_path):
    """Any image reward scores videos (B, K, C, H, W) frame by frame, averaged per video; served over http, the
    server gets the clip (float and png alike) and answers the in-process score."""
    import threading

    from egrpo.rewards import WeightedReward
    from egrpo.rewards.compression import JpegCompressibility
    from egrpo.rewards.remote import HttpReward, RewardServer, decode_images, encode_images

    generator = torch.Generator().manual_seed(0)
    videos = torch.rand(3, 4, 3, 16, 16, generator=generator)
    videos[1, 2] = 0.5  # one flat frame: its video compresses better
    prompts = ["a", "b", "c"]
    jpeg = JpegCompressibility()
    per_frame = jpeg(videos.flatten(0, 1), [p for p in prompts for _ in range(4)]).view(3, 4)
    total, parts = WeightedReward({"jpeg_compressibility": (2.0, {})}).score(videos, prompts)
    torch.testing.assert_close(parts["jpeg_compressibility"], per_frame.mean(1))
    torch.testing.assert_close(total, 2 * per_frame.mean(1))
    assert per_frame.mean(1)[1] > per_frame.mean(1)[0]
    for encoding in ("float", "png"):
        field = encode_images(videos, encoding)
        back = decode_images(json.loads(json.dumps(field)))
        assert back.shape == videos.shape
        if encoding == "float":
            assert torch.equal(back, videos)

    seen = []

    def recording(images, names):
        seen.append(tuple(images.shape))
        return jpeg(images, names)

    server = RewardServer(recording, "jpeg_compressibility", {})
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        served = WeightedReward({"http": (1.0, {"url": server.url})})
        remote, _ = served.score(videos, prompts)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert isinstance(served.components["http"], HttpReward)
    assert seen == [(12, 3, 16, 16)]  # the server averaged the clip's frames, not the client
    torch.testing.assert_close(remote, per_frame.mean(1), rtol=0, atol=0)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_iteration_trains_with_first_ratio_exactly_one(wan, lora, tmp_path):
    overrides = [f"output_dir={tmp_path / 'run'}"]
    if lora:
        overrides += ["model.lora_rank=4", "model.lora_alpha=8", "model.gradient_checkpointing=true"]
    trainer = Trainer(cfg.load(str(wan / "config.yaml"), overrides), progress=False)
    model = trainer.policy.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    metrics = trainer.iteration(0)
    assert metrics["first_ratio_max_dev"] == 0.0  # rollout and update see the same guided velocity, bit for bit
    assert metrics["reward_std"] > 0 and torch.isfinite(torch.tensor(metrics["loss"]))
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert changed
    if lora:
        assert all("lora_" in name for name in changed)
        assert any(".attn2." in name for name in changed)  # cross-attention is adapted too
    else:
        assert any(name.startswith("blocks.") for name in changed)


def test_the_uncond_branch_gets_no_gradient(wan):
    """v = v_u + g (v_c - v_u) from one batched call, with the gradient of g v_c only."""
    from egrpo.models.wan import WanPolicy

    def policy(guidance):
        model = cfg.load(str(wan / "config.yaml"), [f"model.guidance={guidance}"]).model
        return WanPolicy.load(model, EmbeddingCache(model.embedding_cache))

    guided, plain = policy(5.0), policy(1.0)
    x, sigma, cond = torch.randn(1, *guided.latent_shape), torch.tensor([0.8]), guided.encode(TRAIN[:1])
    with torch.no_grad():
        v_cond = plain.velocity(x, sigma, cond)
        v_uncond = plain.velocity(x, sigma, guided.cache.unconditional())
    guided.velocity(x, sigma, cond).sum().backward()
    plain.velocity(x, sigma, cond).sum().backward()
    torch.testing.assert_close(guided.velocity(x, sigma, cond).detach(), v_uncond + 5.0 * (v_cond - v_uncond),
                               rtol=0, atol=1e-5)
    for a, b in zip(guided.model.parameters(), plain.model.parameters()):
        if a.grad is not None:
            assert (a.grad - 5.0 * b.grad).norm() <= 1e-4 * a.grad.norm() + 1e-8


def test_wan22_trains_the_high_noise_expert_and_keeps_the_low_noise_one(wan22, tmp_path):
    trainer = Trainer(cfg.load(str(wan22 / "config.yaml"), [f"output_dir={tmp_path / 'run'}"]), progress=False)
    policy = trainer.policy
    frozen = {n: p.detach().clone() for n, p in policy.transformer_2.named_parameters()}
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    metrics = trainer.iteration(0)
    assert metrics["first_ratio_max_dev"] == 0.0
    assert any(not torch.equal(before[n], p) for n, p in policy.model.named_parameters())
    assert all(torch.equal(frozen[n], p) for n, p in policy.transformer_2.named_parameters())
    assert not any(p.requires_grad for p in policy.transformer_2.parameters())
    assert trainer.policy.arch_config()["experts"]["boundary"] == pytest.approx(700.0)


def test_wan22_refuses_a_trained_step_below_the_boundary(wan22):
    with pytest.raises(ConfigError, match=r"low-noise expert.*frozen.*plan.active_steps"):
        build_task(cfg.load(str(wan22 / "config.yaml"), ["plan.active_steps=all"]))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_egrpo_train_resume_and_export_load_in_the_wan_pipeline(wan, lora, tmp_path):
    """`egrpo train CONFIG` with a Ctrl-C after the first of two iterations and `--resume` equals a straight run;
    its export loads with WanPipeline's own loaders and gives egrpo's trained velocity."""
    import diffusers

    tuning = ["model.lora_rank=4", "model.lora_alpha=8"] if lora else []
    common = [*tuning, "train.iterations=2", "checkpoint_every=1", "--no-progress"]
    straight = tmp_path / "straight"
    # LoRA's A matrices are drawn from torch's global generator, as a fresh process starts it: the same for both runs
    torch.manual_seed(0)
    assert main(["train", str(wan / "config.yaml"), f"output_dir={straight}", *common]) == 0

    resumed = tmp_path / "resumed"
    config = cfg.load(str(wan / "config.yaml"), [f"output_dir={resumed}", *common[:-1]])
    torch.manual_seed(0)
    interrupted = Trainer(config, progress=False)
    original = interrupted.iteration

    def iteration_then_ctrl_c(it):
        metrics = original(it)
        interrupted._request_stop(None, None)  # what the SIGINT handler does
        return metrics

    interrupted.iteration = iteration_then_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert main(["train", "--resume", str(resumed), "--no-progress"]) == 0
    a, b = (load_file(str(run / "model.safetensors")) for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all("lora_" in name for name in a) == lora

    out = tmp_path / "export"
    assert main(["export", str(straight), "--out", str(out)]) == 0
    policy = build_task(cfg.load(str(straight / "config.yaml"), [f"model.checkpoint={straight}"])).policy
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    sigma, cond = torch.tensor([0.7, 0.3]), policy.encode(EVAL)
    with torch.no_grad():
        expected = policy.velocity(x, sigma, cond)
    if lora:
        pipe = diffusers.WanPipeline.from_pretrained(wan / "pipeline")
        pipe.load_lora_weights(out)
        transformer = pipe.transformer
    else:
        transformer = diffusers.WanTransformer3DModel.from_pretrained(out, subfolder="transformer")
        pipe = diffusers.WanPipeline.from_pretrained(wan / "pipeline", transformer=transformer)
    negative = policy.cache.unconditional()["text"].expand(2, -1, -1)
    with torch.no_grad():  # WanPipeline's call of its transformer: timestep 1000 sigma, CFG 5 against the negative
        v_cond = transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond["text"],
                             return_dict=False)[0]
        v_uncond = transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=negative,
                               return_dict=False)[0]
    torch.testing.assert_close(v_uncond + 5.0 * (v_cond - v_uncond), expected, rtol=0, atol=1e-5)
    readme = (out / "README.md").read_text()
    assert "WanPipeline" in readme and f"num_frames={FRAMES}" in readme and "text-to-video" in readme
    if lora:
        return
    # egrpo sample and egrpo eval's grid show each video as the strip of its scored frames
    from PIL import Image

    sample = tmp_path / "sample.png"
    assert main(["sample", "--checkpoint", str(straight), "--prompt", EVAL[0], "--num", "2", "--out", str(sample)]) == 0
    assert Image.open(sample).size[0] > Image.open(sample).size[1]
    assert main(["eval", "base", str(straight), "--out", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(rows["base"]) >= {"jpeg_compressibility", "reward", "diversity"}


def test_the_policy_runs_on_the_meta_device(wan):
    """Device discipline: the adapter and a rollout and update of E-GRPO with everything on the meta device."""
    from egrpo.grpo import transition_advantages
    from egrpo.methods import build_method
    from egrpo.models.wan import WanPolicy
    from egrpo.trainer import chunk_loss, iteration_generator

    meta = torch.device("meta")
    with meta:
        transformer, vae = tiny_transformer(), tiny_vae()
    config = cfg.load(str(wan / "config.yaml"), ["model.device=meta", "model.lora_rank=4", "train.kl_coef=0.1",
                                                 "train.prompts_per_iteration=2"])
    policy = WanPolicy(config.model, transformer, vae, EmbeddingCache(config.model.embedding_cache))
    policy.freeze_reference()
    method = build_method(config)
    cond = policy.encode(TRAIN[:2])
    generators = [iteration_generator(config.seed, 0, s) for s in range(2)]
    ro = method.rollout(policy, cond, 0, iteration_generator(config.seed, 0), generators)
    assert ro.finals.device == meta
    rewards = torch.linspace(0.0, 1.0, ro.finals.shape[0])
    for ts in ro.train_steps:
        advantages = transition_advantages(rewards, ts.leaves, ts.groups, ro.reduce, 5.0)
        loss, stats = chunk_loss(policy, method, config, ts, 0, ts.inputs.shape[0], cond, advantages)
        assert loss.device == meta
        loss.backward()
    trained = [p for p in policy.model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.device == meta for p in trained)


def test_fsdp_reads_the_transformer_from_its_safetensors_block_by_block(wan):
    """What each FSDP rank does: the transformer built on meta (no memory), each Wan block its own FSDP unit, then
    filled from the pipeline's safetensors files: exactly the pretrained weights."""
    import diffusers

    from egrpo.distributed import transformer_blocks
    from egrpo.sharding import fill_from_safetensors

    task = build_task(cfg.load(str(wan / "config.yaml")), on_meta=True)
    model = task.policy.model
    assert all(p.is_meta for p in model.parameters())
    assert len(transformer_blocks(model)) == 2
    assert [f.name for f in task.weight_files] == ["diffusion_pytorch_model.safetensors"]
    fill_from_safetensors(model, task.weight_files, torch.device("cpu"))
    loaded = diffusers.WanTransformer3DModel.from_pretrained(wan / "pipeline", subfolder="transformer")
    expected = loaded.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    # the RoPE tables are computed, never saved: built on the CPU, they survive the fill
    assert torch.equal(model.rope.freqs_cos, loaded.rope.freqs_cos) and model.rope.freqs_cos.abs().sum() > 0


def test_lora_under_fsdp_on_two_ranks_trains_as_one_process(wan, tmp_path):
    """torchrun, 2 ranks: the Wan base sharded on meta and filled by rows, LoRA adapters over it, 5-D video latents;
    the trained adapters equal one process's with both prompts."""
    from test_distributed import _torchrun

    common = ["model.lora_rank=4", "model.lora_alpha=8", "train.iterations=1"]
    Trainer(cfg.load(str(wan / "config.yaml"), [*common, "train.prompts_per_iteration=2",
                                                 f"output_dir={tmp_path / 'one'}"]), progress=False).train()
    _torchrun([str(wan / "config.yaml"), *common, "train.prompts_per_iteration=1", "train.distributed=fsdp",
               f"output_dir={tmp_path / 'fsdp'}"], tmp_path)
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    sharded = load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    assert set(one) == set(sharded) and all(".lora_" in name for name in one)
    assert any(name.endswith("lora_B.default.weight") and one[name].abs().max() > 0 for name in one)  # trained
    assert all(torch.allclose(one[name], sharded[name], atol=1e-5) for name in one)


def test_flops_count_the_video_tokens_and_both_guidance_branches(wan):
    from egrpo.flops import policy_flops
    from egrpo.models.wan import WanPolicy

    def counted(*overrides):
        model = cfg.load(str(wan / "config.yaml"), list(overrides)).model
        return policy_flops(WanPolicy.load(model, EmbeddingCache(model.embedding_cache)), backward=False).forward

    guided, plain = counted(), counted("model.guidance=1.0")
    assert guided == 2 * plain > 0  # true CFG: the prompt and the negative prompt, one batched call
    assert counted("model.guidance=1.0", "model.frames=9") > plain  # 3 latent frames instead of 2


def test_shipped_configs_load_and_plan():
    from egrpo.planner import make_plan, plan_kwargs

    wan21 = cfg.load("wan21-t2v-1.3b-hps")
    model = wan21.model
    assert (model.kind, model.pretrained, model.height, model.width, model.frames) == (
        "wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 240, 416, 33)
    assert (model.guidance, model.lora_rank, model.lora_alpha, wan21.sampling.shift) == (4.5, 32, 64.0, 3.0)
    assert make_plan(**plan_kwargs(wan21)).merge_lengths == [1, 1, 2, 2, 2, 3, 3, 3]  # FLUX's: the same grid
    wan22 = cfg.load("wan22-t2v-a14b-hps")
    assert (wan22.model.guidance, wan22.model.guidance_2, wan22.sampling.shift) == (4.0, 3.0, 12.0)
    plan = make_plan(**plan_kwargs(wan22))
    # every trained step above Wan 2.2's boundary 0.875 (the frozen low-noise expert's side is below it)
    assert all(plan.sigmas[i] >= 0.875 for i in plan.active_steps) and plan.sigmas[11] < 0.875
    assert plan.merge_lengths == [1, 1, 1, 2, 2, 2, 2, 3]
    assert main(["plan", "wan21-t2v-1.3b-hps"]) == 0


def test_a_ti2v_pipeline_is_refused(wan, tmp_path):
    """Wan 2.2 TI2V gives each token its own timestep (expand_timesteps), which this adapter does not."""
    import shutil

    folder = tmp_path / "ti2v"
    shutil.copytree(wan / "pipeline", folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    with pytest.raises(ConfigError, match=r"Wan 2.2 TI2V pipeline \(expand_timesteps"):
        build_task(cfg.load(str(wan / "config.yaml"), [f"model.pretrained={folder}"]))


def test_wan_smoke_runs_tiny_on_cpu(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "wan_smoke.py"
    spec = importlib.util.spec_from_file_location("wan_smoke", path)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    out = tmp_path / "smoke.json"
    assert smoke.main(["--device", "cpu", "--tiny", "--iterations", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["first_ratio_max_dev"] == 0.0 and result["seconds_per_iteration"] > 0
    assert result["video"]["latent_shape"] == [16, 2, 4, 4] and result["video"]["reward_frames"] == [0, 1, 3, 4]
    assert 0 < result["trained_params"] < result["transformer_params"]  # LoRA rank 32, as the shipped config


def test_wan22_gradient_on_the_frozen_expert_is_refused_and_its_lora_export_loads(wan22, tmp_path):
    """A trained step the plan check cannot see (a moving window) stops at its first update with what to change;
    a LoRA run's export goes onto WanPipeline's high-noise `transformer`, giving egrpo's trained velocity there."""
    import diffusers

    policy = build_task(cfg.load(str(wan22 / "config.yaml"))).policy
    x, cond = torch.randn(2, *policy.latent_shape), policy.encode(EVAL)
    with pytest.raises(ConfigError, match="below Wan 2.2's expert boundary, on the frozen low-noise expert"):
        policy.velocity(x, torch.tensor([0.9, 0.5]), cond)
    with torch.no_grad():  # a rollout's call: both experts, as the pipeline routes them
        assert torch.isfinite(policy.velocity(x, torch.tensor([0.9, 0.5]), cond)).all()

    run = tmp_path / "run"
    assert main(["train", str(wan22 / "config.yaml"), f"output_dir={run}", "model.lora_rank=4", "model.lora_alpha=8",
                 "--no-progress"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    trained = build_task(cfg.load(str(run / "config.yaml"), [f"model.checkpoint={run}"])).policy
    high = torch.tensor([0.9, 0.8])
    with torch.no_grad():
        expected = trained.velocity(x, high, cond)
    pipe = diffusers.WanPipeline.from_pretrained(wan22 / "pipeline")
    pipe.load_lora_weights(tmp_path / "export")
    negative = trained.cache.unconditional()["text"].expand(2, -1, -1)
    with torch.no_grad():
        v_cond, v_uncond = (pipe.transformer(hidden_states=x, timestep=high * 1000, encoder_hidden_states=text,
                                             return_dict=False)[0] for text in (cond["text"], negative))
    torch.testing.assert_close(v_uncond + 5.0 * (v_cond - v_uncond), expected, rtol=0, atol=1e-5)
    assert not any("lora" in name for name, _ in pipe.transformer_2.named_parameters())
