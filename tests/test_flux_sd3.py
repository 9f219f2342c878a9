"""FLUX and SD3 adapters end to end on tiny random pipelines built offline: preprocess the text
embeddings, then one full E-GRPO iteration through the same Trainer as the embedded model."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from egrpo import config as cfg
from egrpo.cli import main
from egrpo.methods import build_method
from egrpo.models.text_cache import EmbeddingCache
from egrpo.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest.one_thread

ROOT = Path(__file__).resolve().parents[1]
WORDS = "a an the photo painting of cat dog red blue green car tree house on in with under sky".split()
TRAIN = ["a photo of a red car", "a painting of a dog", "the blue sky over a house", "a cat under a tree"]
EVAL = ["a green car in the sky", "a dog with a cat"]
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "CLIPTokenizer", "T5Tokenizer")


def clip_tokenizer():
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in sorted(set("".join(WORDS))) + [c + "</w>" for c in sorted(set("".join(WORDS)))]:
        vocab.setdefault(piece, len(vocab))
    for word in WORDS:
        vocab.setdefault(word + "</w>", len(vocab))
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def clip_encoder(with_projection: bool, vocab_size: int):
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls(config)


def t5_encoder(vocab_size: int):
    return transformers.T5EncoderModel(
        transformers.T5Config(vocab_size=vocab_size, d_model=32, d_ff=32, d_kv=8, num_layers=1, num_heads=2)
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        scaling_factor=0.5, shift_factor=0.1,
    )


def save_tiny_flux(root: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), transformer=transformer,
        text_encoder=clip_encoder(False, len(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=t5_encoder(len(tokenizer_2)), tokenizer_2=tokenizer_2,
    ).save_pretrained(root)


def save_tiny_sd3(root: Path, **transformer_options) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tokenizer, tokenizer_3 = clip_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16, **transformer_options,
    )
    StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), transformer=transformer,
        text_encoder=clip_encoder(True, len(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=clip_encoder(True, len(tokenizer)), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(len(tokenizer_3)), tokenizer_3=tokenizer_3,
    ).save_pretrained(root)


def write_config(root: Path, kind: str) -> Path:
    """A shipped-style YAML config of the tiny pipeline: 32x32 images, 4 steps, G 2, 2 active steps."""
    (root / "train.txt").write_text("# tiny prompts\n" + "\n".join(TRAIN) + "\n")
    (root / "eval.txt").write_text("\n".join(EVAL) + "\n")
    config = {
        "reward": {"jpeg_compressibility": 1.0},
        "model": {
            "kind": kind, "pretrained": str(root / "pipeline"), "embedding_cache": str(root / "cache.safetensors"),
            "height": 32, "width": 32, "max_sequence_length": 8, "device": "cpu",
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


@pytest.fixture(scope="module", params=["flux", "sd3"])
def pipeline(request, tmp_path_factory):
    """(kind, folder) of a saved tiny pipeline with its embedding cache built by `egrpo preprocess`."""
    root = tmp_path_factory.mktemp(request.param)
    (save_tiny_flux if request.param == "flux" else save_tiny_sd3)(root / "pipeline")
    config = write_config(root, request.param)
    assert main(["preprocess", str(config), "--prompts", str(root / "train.txt"), "--prompts",
                 str(root / "eval.txt"), "--no-progress"]) == 0
    return request.param, root


@pytest.fixture
def no_text_encoders(monkeypatch):
    """Constructing any tokenizer or text encoder fails from here on."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} was constructed during training")

    for name in TEXT_ENCODERS:
        monkeypatch.setattr(getattr(transformers, name), "__init__", refuse)


def test_preprocess_writes_what_the_pipelines_encode_prompt_returns(pipeline):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    kind, root = pipeline
    cache_file = root / "cache.safetensors"
    stored = load_file(str(cache_file))  # a plain safetensors file
    cache = EmbeddingCache(cache_file)
    assert cache.kind == kind and cache.prompts == TRAIN + EVAL
    with torch.no_grad():
        if kind == "flux":
            pipe = FluxPipeline.from_pretrained(root / "pipeline", transformer=None, vae=None)
            text, pooled, _ = pipe.encode_prompt(EVAL, max_sequence_length=8)
        else:
            pipe = StableDiffusion3Pipeline.from_pretrained(root / "pipeline", transformer=None, vae=None)
            text, uncond_text, pooled, uncond_pooled = pipe.encode_prompt(EVAL, None, None, max_sequence_length=8)
            # the pipeline encodes "" once per prompt, the cache once: equal up to batch-size rounding
            assert torch.allclose(stored["uncond_text"], uncond_text[:1], atol=1e-6)
            assert torch.allclose(stored["uncond_pooled"], uncond_pooled[:1], atol=1e-6)
            assert text.shape[1] == 77 + 8  # CLIP-L|G tokens, then T5
    rows = cache.lookup(EVAL)
    # preprocess encodes all 6 prompts in one batch, the pipeline here 2: a CPU's matmul may round a row
    # differently in another batch size (SD3's pooled projection did, by 1e-7)
    for ours, theirs in ((rows["text"], text), (rows["pooled"], pooled), (stored["text"][len(TRAIN):], text)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_missing_prompt_names_it_and_the_command(pipeline):
    kind, root = pipeline
    config = cfg.load(str(root / "config.yaml"))
    (root / "more.txt").write_text("a tree in the sky\n")
    config.prompts.eval = str(root / "more.txt")
    with pytest.raises(cfg.ConfigError, match=r"'a tree in the sky'.*egrpo preprocess"):
        Trainer(config, root / "never", progress=False)


def test_repeated_training_prompts_warn_and_the_lookup_stays_a_view_of_the_cache(pipeline, tmp_path):
    """A repeated line would turn the training set's embedding lookup into a copy of every row, on every rank."""
    kind, root = pipeline
    repeated = tmp_path / "train.txt"
    repeated.write_text("\n".join(TRAIN + [TRAIN[1]]) + "\n")
    config = cfg.load(str(root / "config.yaml"), [f"prompts.train={repeated}", f"output_dir={tmp_path / 'run'}"])
    with pytest.warns(UserWarning, match=r"repeats 1 line\(s\), e.g. 'a painting of a dog'"):
        trainer = Trainer(config, progress=False)
    assert trainer.task.train_prompts == TRAIN
    mapped = trainer.policy.cache._tensors["text"].untyped_storage().data_ptr()
    assert trainer.train_cond["text"].untyped_storage().data_ptr() == mapped


def test_meta_build_reads_exactly_the_pretrained_weights(pipeline):
    """What FSDP does per rank, in one process: the transformer built on meta, then filled from its files."""
    import diffusers

    from egrpo.sharding import fill_from_safetensors
    from egrpo.tasks import build_task

    kind, root = pipeline
    task = build_task(cfg.load(str(root / "config.yaml")), on_meta=True)
    assert all(p.is_meta for p in task.policy.model.parameters())
    assert [f.name for f in task.weight_files] == ["diffusion_pytorch_model.safetensors"]
    fill_from_safetensors(task.policy.model, task.weight_files, torch.device("cpu"))
    name = "FluxTransformer2DModel" if kind == "flux" else "SD3Transformer2DModel"
    loaded = getattr(diffusers, name).from_pretrained(root / "pipeline", subfolder="transformer")
    expected = loaded.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in task.policy.model.state_dict().items())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_egrpo_iteration_through_the_trainer(pipeline, lora, tmp_path, no_text_encoders):
    kind, root = pipeline
    overrides = [f"output_dir={tmp_path / 'run'}"]
    if lora:
        overrides += ["model.lora_rank=4", "model.lora_alpha=8", "model.gradient_checkpointing=true"]
    trainer = Trainer(cfg.load(str(root / "config.yaml"), overrides), progress=False)
    model = trainer.policy.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    metrics = trainer.iteration(0)
    assert metrics["first_ratio_max_dev"] == 0.0  # rollout and update see the same velocity, bit for bit
    assert metrics["reward_std"] > 0 and torch.isfinite(torch.tensor(metrics["loss"]))
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert changed
    if lora:
        assert all("lora_" in name for name in changed)
        assert {name for name, p in model.named_parameters() if p.requires_grad} >= changed
    else:
        assert any(name.startswith("transformer_blocks") for name in changed)

    summary = Trainer(cfg.load(str(root / "config.yaml"), [f"output_dir={tmp_path / 'full_run'}", *overrides[1:]]),
                      progress=False).train()
    assert set(summary["final"]) == {"jpeg_compressibility", "reward"}
    saved = load_file(str(tmp_path / "full_run" / "model.safetensors"))
    assert all("lora_" in name for name in saved) == lora
    # the run's weights load back into a fresh policy (same architecture record) and sample
    out = tmp_path / "sample.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "full_run"), "--prompt", EVAL[0], "--num", "2",
                 "--out", str(out)]) == 0
    assert out.is_file()
    if not lora:
        return
    # eval and the comparison grid: 'base' beside the run is this pipeline's base model, not the digits model
    run = str(tmp_path / "full_run")
    assert main(["eval", "base", run, "--out", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(rows["base"]) == {"jpeg_compressibility", "reward", "diversity"}
    for name, key in (("base", "base"), (run, "final")):  # the trainer's own held-out numbers, same seeds
        assert rows[name]["reward"] == pytest.approx(summary[key]["reward"], abs=1e-5)
    grid = tmp_path / "grid.png"
    assert main(["figures", "grid", "base", run, "--rows", "2", "--out", str(grid)]) == 0
    assert json.loads(grid.with_suffix(".json").read_text())["prompts"] == EVAL


def test_egrpo_fast_trains_on_the_pipeline(pipeline, tmp_path, no_text_encoders):
    kind, root = pipeline
    run = tmp_path / "run"
    assert main(["train", str(root / "config.yaml"), "--method", "egrpo-fast", f"output_dir={run}"]) == 0
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    config = cfg.load(str(run / "config.yaml"))
    assert config.method.name == "egrpo-fast" and config.method.completion_solver == "dpm2m"
    assert metrics["first_ratio_max_dev"] == 0.0 and metrics["reward_std"] > 0
    assert metrics["network_calls"] == build_method(config).describe()["network_calls"]


def test_reference_is_the_base_model(pipeline, tmp_path):
    """KL runs on both kinds: the LoRA reference disables the adapters, the full one is a frozen copy."""
    kind, root = pipeline
    for lora in (0, 4):
        config = cfg.load(str(root / "config.yaml"), [f"output_dir={tmp_path / str(lora)}", f"model.lora_rank={lora}",
                                                      "train.kl_coef=0.1"])
        trainer = Trainer(config, progress=False)
        policy = trainer.policy
        x = torch.randn(1, *policy.latent_shape)
        sigma, cond = torch.tensor([0.7]), policy.encode(TRAIN[:1])
        # Equal up to float rounding: a full copy's weights sit at other addresses, and on some CPUs the matmul
        # kernel's vector path depends on alignment (5e-7 apart here); LoRA's reference is the same network, exact.
        torch.testing.assert_close(policy.velocity(x, sigma, cond, reference=True), policy.velocity(x, sigma, cond),
                                   rtol=0, atol=0 if lora else 1e-5)
        metrics = trainer.iteration(0)
        assert metrics["first_ratio_max_dev"] == 0.0 and metrics["kl"] > 0
        with torch.no_grad():
            assert not torch.equal(policy.velocity(x, sigma, cond, reference=True), policy.velocity(x, sigma, cond))


def test_guidance(pipeline):
    """SD3: v = v_u + g (v_c - v_u) from one batched call, gradients through v_c only. FLUX: the embedded
    guidance scale reaches the transformer."""
    from egrpo.models.flux import FluxPolicy
    from egrpo.models.sd3 import SD3Policy

    kind, root = pipeline
    load = FluxPolicy.load if kind == "flux" else SD3Policy.load

    def policy(guidance):
        model = cfg.load(str(root / "config.yaml"), [f"model.guidance={guidance}"]).model
        return load(model, EmbeddingCache(model.embedding_cache))

    guided, plain = policy(4.5), policy(1.0)
    x, sigma, cond = torch.randn(1, *guided.latent_shape), torch.tensor([0.8]), guided.encode(TRAIN[:1])
    if kind == "flux":
        with torch.no_grad():
            assert not torch.allclose(guided.velocity(x, sigma, cond), plain.velocity(x, sigma, cond))
        return
    with torch.no_grad():
        v_cond = plain.velocity(x, sigma, cond)
        v_uncond = plain.velocity(x, sigma, guided.cache.unconditional())
    guided.velocity(x, sigma, cond).sum().backward()
    plain.velocity(x, sigma, cond).sum().backward()
    assert torch.allclose(guided.velocity(x, sigma, cond), v_uncond + 4.5 * (v_cond - v_uncond), atol=1e-5)
    for a, b in zip(guided.model.parameters(), plain.model.parameters()):
        # equal up to float rounding: the two calls batch different rows
        assert (a.grad - 4.5 * b.grad).norm() <= 1e-4 * a.grad.norm() + 1e-8


def test_decode_unpacks_and_scales_like_the_pipeline(pipeline, tmp_path):
    from diffusers import FluxPipeline

    kind, root = pipeline
    policy = Trainer(cfg.load(str(root / "config.yaml"), [f"output_dir={tmp_path}"]), progress=False).policy
    latents = torch.randn(3, *policy.latent_shape)
    if kind == "flux":
        assert policy.latent_shape == (64, 16)  # 32 px / VAE 2 / 2x2 patches = 8 x 8 tokens of 4 x 4 channels
        spatial = FluxPipeline._unpack_latents(latents, 32, 32, 2)
        assert torch.equal(FluxPipeline._pack_latents(spatial, 3, 4, 16, 16), latents)
    else:
        assert policy.latent_shape == (4, 16, 16)
        spatial = latents
    vae = policy.vae
    with torch.no_grad():
        expected = vae.decode(spatial / vae.config.scaling_factor + vae.config.shift_factor).sample
    images = policy.decode(latents)
    assert images.shape == (3, 3, 32, 32)
    assert torch.allclose(images, ((expected + 1) / 2).clamp(0, 1))


def test_text_encoder_guard_is_effective(no_text_encoders):
    with pytest.raises(AssertionError, match="constructed during training"):
        t5_tokenizer()


def test_shipped_configs_load():
    flux = cfg.load("flux-dev-hps")
    assert (flux.model.kind, flux.model.pretrained, flux.model.height, flux.model.lora_rank) == (
        "flux", "black-forest-labs/FLUX.1-dev", 720, 0)
    assert (flux.train.group_size, flux.plan.tau, flux.train.lr, flux.train.clip_range) == (12, 2.2, 2e-6, 1e-4)
    assert cfg.reward_specs(cfg.load("flux-dev-hps-clip")) == {"hps": (0.7, {}), "clip": (0.3, {})}
    sd35 = cfg.load("sd35-medium-hps")
    assert (sd35.model.kind, sd35.model.lora_rank, sd35.model.lora_alpha, sd35.model.guidance) == ("sd3", 32, 64.0, 4.5)
    large = cfg.load("sd35-large-hps")
    assert (large.model.pretrained, large.model.height, large.model.guidance, large.sampling.shift) == (
        "stabilityai/stable-diffusion-3.5-large", 1024, 3.5, 3.0)


def test_gpu_smoke_runs_tiny_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "benchmarks" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    out = tmp_path / "smoke.json"
    assert smoke.main(["--device", "cpu", "--tiny", "--iterations", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["iterations"] == 2 and result["seconds_per_iteration"] > 0
    assert result["first_ratio_max_dev"] == 0.0
    use = result["utilisation"]  # the first iteration's network calls, replayed, against a CPU matmul's rate
    per_latent = use["tflop_per_latent"]
    assert use["matmul"]["tflops"] > 0 and per_latent["forward_backward"] > per_latent["forward"] > 0
    assert use["rollout"]["latents"] + use["update"]["latents"] == result["network_calls_per_iteration"]
    for part in ("rollout", "rollout_largest_batch", "update"):
        assert use[part]["tflops"] > 0 and use[part]["fraction_of_matmul"] > 0
    assert use["rollout_largest_batch"]["batch"] == max(map(int, use["rollout_by_batch"]))
    # egrpo's sampler beside diffusers' FluxPipeline loop: same transformer, noise, prompts and grid, fp32 on a CPU
    peer = result["peer"]
    assert peer["batch"] == use["rollout_largest_batch"]["batch"] and peer["num_steps"] == 4
    assert peer["repeats"] == 3 and all(t > 0 for times in peer["seconds"].values() for t in times)
    per_latent = peer["seconds_per_latent_forward"]
    assert peer["ratio"] == pytest.approx(per_latent["egrpo"] / per_latent["diffusers"]) and peer["ratio"] > 0
    assert peer["grid_max_abs_diff"] < 1e-6  # the scheduler's static shift places egrpo's grid
    assert peer["latents_agree"] and peer["latents_max_abs_diff"] <= 1e-4 * peer["latents_max_abs"]


def test_a_named_attention_kernel_is_used_and_one_that_cannot_run_is_refused_before_training(
    pipeline, tmp_path, capsys
):
    kind, root = pipeline
    config = cfg.load(str(root / "config.yaml"), [f"output_dir={tmp_path / 'math'}", "model.attention_backend=math"])
    trainer = Trainer(config, progress=False)
    assert trainer.policy.attention_backend == "math"
    assert trainer.iteration(0)["first_ratio_max_dev"] == 0.0
    capsys.readouterr()
    assert main(["train", str(root / "config.yaml"), "model.attention_backend=cudnn", "--no-progress",
                 f"output_dir={tmp_path / 'cudnn'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.attention_backend=cudnn cannot run at 2 heads x" in err


@pytest.mark.parametrize("shape", ["sd35-large", "sd35-medium"])
def test_sd3_adapter_samples_as_the_pipeline_on_sd35_shaped_transformers(shape, tmp_path):
    """SD3.5 Large's transformer has RMS q/k norms and no dual-attention blocks, Medium's both (the tiny SD3 above has
    neither): egrpo's sampler equals StableDiffusion3Pipeline's loop on each, and LoRA adapts every joint block."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from egrpo.models.sd3 import SD3Policy
    from egrpo.models.text_cache import write_cache
    from egrpo.rollout import integrate_ode
    from egrpo.stepmath import time_grid

    torch.manual_seed(0)
    dual = (0,) if shape == "sd35-medium" else ()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=dual,
    )
    vae = tiny_vae()
    rows = (torch.randn(2, 8, 32), torch.randn(2, 32))
    negative = {"uncond_text": torch.randn(1, 8, 32), "uncond_pooled": torch.randn(1, 32)}
    write_cache(tmp_path / "cache.safetensors", "sd3", EVAL, [rows], negative, negative="")
    model = cfg.ModelConfig(kind="sd3", pretrained="unused", embedding_cache=str(tmp_path / "cache.safetensors"),
                            height=32, width=32, device="cpu", guidance=3.5)
    policy = SD3Policy(model, transformer, vae, EmbeddingCache(model.embedding_cache))
    noise = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ours, _ = integrate_ode(policy.velocity, noise, policy.encode(EVAL), time_grid(4, 3.0))
        theirs = pipe(prompt_embeds=rows[0], pooled_prompt_embeds=rows[1],
                      negative_prompt_embeds=negative["uncond_text"].expand(2, -1, -1),
                      negative_pooled_prompt_embeds=negative["uncond_pooled"].expand(2, -1), guidance_scale=3.5,
                      latents=noise, height=32, width=32, sigmas=list(np.linspace(1.0, 1 / 4, 4)),
                      output_type="latent").images
    assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()

    lora = SD3Policy(cfg.ModelConfig(**{**vars(model), "lora_rank": 4}), transformer, vae, policy.cache)
    adapted = {name.split(".lora_A")[0] for name, _ in lora.model.named_parameters() if ".lora_A" in name}
    for block in range(2):
        expected = {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"}
        expected |= {"to_add_out"} if block == 0 else set()  # the last block's text stream has no output projection
        prefix = f"transformer_blocks.{block}.attn."
        assert {name.split(prefix)[1] for name in adapted if prefix in name} == expected


def test_the_shipped_sd35_large_recipe_trains_a_tiny_sd35_large_shaped_pipeline(tmp_path):
    """`egrpo preprocess` and `egrpo train sd35-large-hps` (LoRA, true CFG 3.5) on a pipeline whose transformer has
    SD3.5 Large's RMS q/k norms: one iteration with the first ratio exactly 1, then its LoRA export."""
    root = tmp_path / "large"
    save_tiny_sd3(root / "pipeline", qk_norm="rms_norm")
    (root / "prompts.txt").write_text("\n".join(TRAIN + EVAL) + "\n")
    overrides = ["reward={jpeg_compressibility: 1.0}", f"model.pretrained={root / 'pipeline'}",
                 f"model.embedding_cache={root / 'cache.safetensors'}", "model.height=32", "model.width=32",
                 "model.max_sequence_length=8", "model.device=cpu", "model.lora_rank=4", "sampling.num_steps=4",
                 "plan.active_steps=first:2", "train.iterations=1", "train.group_size=2",
                 "train.prompts_per_iteration=1", f"prompts.train={root / 'prompts.txt'}",
                 f"prompts.eval={root / 'prompts.txt'}", "eval.seeds_per_prompt=1", f"output_dir={root / 'run'}"]
    assert main(["preprocess", "sd35-large-hps", *overrides, "--out", str(root / "cache.safetensors"),
                 "--no-progress"]) == 0
    assert main(["train", "sd35-large-hps", *overrides, "--no-progress"]) == 0
    first = json.loads((root / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["first_ratio_max_dev"] == 0.0
    config = cfg.load(str(root / "run" / "config.yaml"))
    assert config.model.guidance == 3.5 and config.model.lora_rank == 4
    assert main(["export", str(root / "run"), "--out", str(root / "export")]) == 0
    assert (root / "export" / "pytorch_lora_weights.safetensors").is_file()
