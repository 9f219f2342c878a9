"""The Qwen-Image adapter end to end on a tiny random QwenImagePipeline built offline (a Qwen2.5-VL text encoder
and a byte-level BPE Qwen2 tokenizer over a few words, AutoencoderKLQwenImage, QwenImageTransformer2DModel):
preprocess, sampling against the pipeline's own loop, training (full and LoRA), resume, and export."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from egrpo import config as cfg
from egrpo.cli import main
from egrpo.models.text_cache import EmbeddingCache
from egrpo.rollout import integrate_ode
from egrpo.stepmath import time_grid
from egrpo.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest.one_thread

WORDS = "a an the photo painting of cat dog red blue green car tree house on over in with under sky".split()
# the words of QwenImagePipeline's prompt template: with one token each, its system part is the 34 tokens the
# pipeline drops (prompt_template_encode_start_idx), as with the real tokenizer
TEMPLATE = ("system user assistant Describe the image by detailing color shape size texture quantity text spatial "
            "relationships of objects and background").split()
TRAIN = ["a photo of a red car", "a painting of a dog", "the blue sky over a house", "a cat under a tree"]
EVAL = ["a green car in the sky", "a dog with a cat"]
SIZE = 32  # pixels a side: VAE factor 2, 2x2 packing -> 8 x 8 tokens


def qwen_tokenizer() -> transformers.Qwen2Tokenizer:
    """Qwen2's byte-level BPE with one token per word (with and without its leading space), merges found by
    splitting each word and merging its first two pieces until every word is one token."""
    pieces = [w for word in WORDS + TEMPLATE for w in (word, "\u0120" + word)]
    vocab = {c: i for i, c in enumerate(sorted(set("".join(pieces)) | set(":,\u010a")))}
    merges = []
    while True:
        tokenizer = transformers.Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges))
        split = [[t.value for t in tokenizer._tokenizer.model.tokenize(p)] for p in pieces]
        unmerged = [parts for parts in split if len(parts) > 1]
        if not unmerged:
            break
        for parts in unmerged:
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
                vocab.setdefault(parts[0] + parts[1], len(vocab))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def qwen_text_encoder(vocab_size: int) -> transformers.Qwen2_5_VLForConditionalGeneration:
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, bos_token_id=None,
                         eos_token_id=None, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                           patch_size=2, spatial_merge_size=1, temporal_patch_size=1, fullatt_block_indexes=[0]),
    )
    return transformers.Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwen_vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                  latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])


def tiny_qwen_transformer():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       axes_dims_rope=(4, 6, 6))


def save_tiny_qwen_image(root: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(0)
    tokenizer = qwen_tokenizer()
    # Qwen-Image's scheduler config: a shift exp(mu) that grows with the image's tokens (calculate_shift), the
    # grid stretched to end at 0.02 before 0
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )
    QwenImagePipeline(
        scheduler=scheduler, vae=tiny_qwen_vae(), text_encoder=qwen_text_encoder(len(tokenizer)), tokenizer=tokenizer,
        transformer=tiny_qwen_transformer(),
    ).save_pretrained(root)


def pipeline_shift(pipe, height: int = SIZE, width: int = SIZE) -> float:
    """exp(mu): the static shift of egrpo's grid that places QwenImagePipeline's dynamic one at this size."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    tokens = (height // (2 * pipe.vae_scale_factor)) * (width // (2 * pipe.vae_scale_factor))
    c = pipe.scheduler.config
    return math.exp(calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))


def write_config(root: Path) -> Path:
    (root / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "eval.txt").write_text("\n".join(EVAL) + "\n")
    config = {
        "reward": {"jpeg_compressibility": 1.0},
        "model": {
            "kind": "qwen-image", "pretrained": str(root / "pipeline"),
            "embedding_cache": str(root / "cache.safetensors"), "height": SIZE, "width": SIZE, "device": "cpu",
        },
        "sampling": {"num_steps": 4, "shift": 1.6, "shift_terminal": 0.02},
        "plan": {"active_steps": "first:2"},
        "train": {"iterations": 1, "prompts_per_iteration": 1, "group_size": 2, "lr": 1.0e-3},
        "prompts": {"train": str(root / "train.txt"), "eval": str(root / "eval.txt")},
        "eval": {"seeds_per_prompt": 1},
    }
    path = root / "config.yaml"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A saved tiny Qwen-Image pipeline with its embedding cache built by `egrpo preprocess`."""
    root = tmp_path_factory.mktemp("qwen-image")
    save_tiny_qwen_image(root / "pipeline")
    config = write_config(root)
    assert main(["preprocess", str(config), "--prompts", str(root / "train.txt"), "--prompts",
                 str(root / "eval.txt"), "--no-progress"]) == 0
    return root


@pytest.fixture(scope="module")
def pipe(root):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(root / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def policy_of(root, *overrides):
    from egrpo.models.qwen_image import QwenImagePolicy

    model = cfg.load(str(root / "config.yaml"), list(overrides)).model
    return QwenImagePolicy.load(model, EmbeddingCache(model.embedding_cache))


def test_preprocess_writes_the_pipelines_embeddings_and_masks_padded_to_the_longest_prompt(root, pipe):
    stored = load_file(str(root / "cache.safetensors"))
    cache = EmbeddingCache(root / "cache.safetensors")
    assert cache.kind == "qwen-image" and cache.prompts == TRAIN + EVAL and cache.negative_prompt == " "
    assert set(stored) == {"text", "text_mask", "uncond_text", "uncond_text_mask"}
    lengths = stored["text_mask"].sum(1).tolist()
    # each prompt's words, then the template's 5 closing tokens (<|im_end|> \n <|im_start|> assistant \n)
    assert lengths == [len(p.split()) + 5 for p in TRAIN + EVAL]
    assert cache.text_shape == (max(lengths), 32)
    with torch.no_grad():
        text, mask = pipe.encode_prompt(EVAL)
        negative, negative_mask = pipe.encode_prompt([" "])
    rows = cache.lookup(EVAL)
    width = text.shape[1]
    assert torch.equal(rows["text_mask"][:, :width], mask.float()) and not rows["text_mask"][:, width:].any()
    # preprocess encodes all 6 prompts in one batch, the pipeline here 2: a CPU's matmul may round a row
    # differently in another batch size
    torch.testing.assert_close(rows["text"][:, :width], text, rtol=0, atol=1e-6)
    assert not rows["text"][:, width:].any() and not (rows["text"] * (1 - rows["text_mask"][..., None])).any()
    assert negative_mask is None  # all ones: the pipeline drops it
    n = negative.shape[1]
    torch.testing.assert_close(stored["uncond_text"][:, :n], negative, rtol=0, atol=1e-6)
    assert stored["uncond_text_mask"].sum() == n


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_sampling_equals_the_pipelines_own_loop(root, pipe, guidance):
    """egrpo's deterministic sampler (its Euler ODE on its time grid) and decode against QwenImagePipeline called with
    the prompt strings (it encodes them itself) and the negative prompt, at the same sigmas, noise and guidance."""
    shift = pipeline_shift(pipe)
    policy = policy_of(root, f"model.guidance={guidance}")
    sigmas = time_grid(4, shift, terminal=0.02)
    noise = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    cfg_args = {"negative_prompt": " ", "true_cfg_scale": guidance} if guidance > 1 else {"true_cfg_scale": 1.0}
    with torch.no_grad():
        ours, calls = integrate_ode(policy.velocity, noise, policy.encode(EVAL), sigmas)
        theirs = pipe(EVAL, latents=noise, height=SIZE, width=SIZE, num_inference_steps=4, output_type="latent",
                      **cfg_args).images
        images = pipe(EVAL, latents=noise, height=SIZE, width=SIZE, num_inference_steps=4, output_type="pt",
                      **cfg_args).images
    assert calls == 2 * 4  # latent evaluations: 2 samples x 4 steps
    torch.testing.assert_close(pipe.scheduler.sigmas.double(), sigmas, rtol=0, atol=1e-6)
    assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()  # the FLUX / SD3 tolerance
    torch.testing.assert_close(policy.decode(ours), images, rtol=0, atol=1e-4)
    assert images.shape == (2, 3, SIZE, SIZE)


def test_guidance_rescales_like_the_pipeline_and_trains_the_conditional_branch_only(root):
    from egrpo.models.qwen_image import guided_velocity

    guided, plain = policy_of(root, "model.guidance=4.0"), policy_of(root, "model.guidance=1.0")
    x, sigma, cond = torch.randn(2, *guided.latent_shape), torch.tensor([0.8, 0.4]), guided.encode(TRAIN[:2])
    v_cond = plain.velocity(x, sigma, cond)
    with torch.no_grad():
        negative = {name: row.expand(2, *row.shape[1:]) for name, row in guided.cache.unconditional().items()}
        v_uncond = plain.velocity(x, sigma, negative)
    expected = guided_velocity(v_cond, v_uncond, 4.0)
    assert torch.allclose(expected.norm(dim=-1), v_cond.norm(dim=-1), rtol=1e-5)  # per token, as the pipeline
    expected.square().sum().backward()
    got = guided.velocity(x, sigma, cond)
    got.square().sum().backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    reached = 0
    for a, b in zip(guided.model.parameters(), plain.model.parameters()):
        assert (a.grad is None) == (b.grad is None)  # the last block's text stream reaches no image token
        if a.grad is not None:  # equal up to float rounding: the two calls batch different rows
            assert (a.grad - b.grad).norm() <= 1e-4 * b.grad.norm() + 1e-8
            reached += 1
    assert reached > 10


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_training_from_the_config_with_the_first_ratio_exactly_1(root, lora, tmp_path):
    overrides = [f"output_dir={tmp_path / 'run'}", "train.iterations=2"]
    if lora:
        overrides += ["model.lora_rank=4", "model.lora_alpha=8", "model.gradient_checkpointing=true"]
    trainer = Trainer(cfg.load(str(root / "config.yaml"), overrides), progress=False)
    model = trainer.policy.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    metrics = trainer.iteration(0)
    assert metrics["first_ratio_max_dev"] == 0.0  # rollout and update see the same guided velocity, bit for bit
    assert metrics["reward_std"] > 0 and math.isfinite(metrics["loss"])
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert changed and any(name.startswith(("transformer_blocks", "base_model.model.transformer_blocks"))
                           for name in changed)
    if lora:
        assert all("lora_" in name for name in changed)

    run = tmp_path / "cli"
    assert main(["train", str(root / "config.yaml"), *overrides[1:], f"output_dir={run}", "--no-progress"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["first_ratio_max_dev"] == 0.0 for line in lines)
    saved = load_file(str(run / "model.safetensors"))
    assert all("lora_" in name for name in saved) == lora
    out = tmp_path / "sample.png"
    assert main(["sample", "--checkpoint", str(run), "--prompt", EVAL[0], "--num", "2", "--out", str(out)]) == 0
    assert out.is_file()
    if lora:  # egrpo eval: 'base' beside the run is this pipeline's base, scored on the trainer's own seeds
        summary = json.loads((run / "summary.json").read_text())
        assert main(["eval", "base", str(run), "--out", str(tmp_path / "eval")]) == 0
        rows = json.loads((tmp_path / "eval" / "eval.json").read_text())
        for name, key in (("base", "base"), (str(run), "final")):
            assert rows[name]["reward"] == pytest.approx(summary[key]["reward"], abs=1e-5)


def test_an_interrupted_run_resumes_to_the_same_weights(root, tmp_path):
    overrides = ["model.lora_rank=4", "train.iterations=2", "checkpoint_every=1", "--no-progress"]
    assert main(["train", str(root / "config.yaml"), *overrides, f"output_dir={tmp_path / 'straight'}"]) == 0
    stopped = Trainer(cfg.load(str(root / "config.yaml"), [*overrides[:3], f"output_dir={tmp_path / 'resumed'}"]),
                      progress=False)
    original = stopped.iteration

    def iteration_then_ctrl_c(it):
        metrics = original(it)
        stopped._request_stop(None, None)  # what the SIGINT handler does
        return metrics

    stopped.iteration = iteration_then_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--no-progress"]) == 0
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def diffusers_velocity(transformer, policy, x, sigma, cond):
    """QwenImagePipeline's guided velocity at 4, from a diffusers transformer called as the pipeline calls it."""
    from egrpo.models.qwen_image import guided_velocity

    negative = policy.cache.unconditional()
    shape = [[(1, SIZE // 4, SIZE // 4)]] * len(x)
    with torch.no_grad():
        v = [transformer(hidden_states=x, timestep=sigma, encoder_hidden_states=c["text"].expand(len(x), -1, -1),
                         encoder_hidden_states_mask=c["text_mask"].expand(len(x), -1).bool(), img_shapes=shape,
                         return_dict=False)[0] for c in (cond, negative)]
    return guided_velocity(v[0], v[1], 4.0)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_export_loads_in_qwen_image_pipeline(root, lora, tmp_path):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from egrpo.evaluation import load_config
    from egrpo.tasks import build_task

    run = tmp_path / "run"
    extra = ["model.lora_rank=4", "model.lora_alpha=8"] if lora else []
    assert main(["train", str(root / "config.yaml"), *extra, f"output_dir={run}", "--no-progress"]) == 0
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    policy = build_task(load_config(str(run))).policy
    x = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    sigma, cond = torch.tensor([0.7, 0.3]), policy.encode(EVAL)
    with torch.no_grad():
        expected = policy.velocity(x, sigma, cond)
    if lora:
        pipe = QwenImagePipeline.from_pretrained(root / "pipeline")
        pipe.load_lora_weights(out)
        transformer = pipe.transformer
    else:
        transformer = QwenImageTransformer2DModel.from_pretrained(out, subfolder="transformer")
    # the pipeline runs prompt and negative prompt in two calls, egrpo in one: equal up to float rounding
    torch.testing.assert_close(diffusers_velocity(transformer, policy, x, sigma, cond), expected, rtol=0, atol=1e-5)
    base = QwenImageTransformer2DModel.from_pretrained(root / "pipeline", subfolder="transformer")
    assert (diffusers_velocity(base, policy, x, sigma, cond) - expected).abs().max() > 1e-3
    card = (out / "README.md").read_text()
    assert "QwenImagePipeline" in card and "true_cfg_scale=4" in card and "negative_prompt=' '" in card
    # the card's loading snippet, run as a user pastes it (fp32: bf16 on a CPU is slow and beside the point)
    scope = {}
    exec(card.split("```python\n")[1].split("```")[0].replace("torch.bfloat16", "torch.float32"), scope)
    assert scope["image"].size == (SIZE, SIZE)


def test_meta_build_reads_exactly_the_pretrained_weights(root):
    """What FSDP does per rank, in one process: the transformer built on meta, then filled from its files."""
    from diffusers import QwenImageTransformer2DModel

    from egrpo.sharding import fill_from_safetensors
    from egrpo.tasks import build_task

    task = build_task(cfg.load(str(root / "config.yaml")), on_meta=True)
    assert all(p.is_meta for p in task.policy.model.parameters())
    fill_from_safetensors(task.policy.model, task.weight_files, torch.device("cpu"))
    loaded = QwenImageTransformer2DModel.from_pretrained(root / "pipeline", subfolder="transformer")
    expected = loaded.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in task.policy.model.state_dict().items())
    # the RoPE tables live outside the state dict: the meta build makes its own, off the meta device
    policy = task.policy
    x, sigma, cond = torch.randn(2, *policy.latent_shape), torch.tensor([0.9, 0.2]), policy.encode(EVAL)
    with torch.no_grad():
        got = policy.velocity(x, sigma, cond)
        policy.model = loaded
        assert torch.equal(got, policy.velocity(x, sigma, cond))


def test_fsdp_reads_only_each_ranks_rows_and_trains(root, tmp_path):
    """torchrun, 2 CPU ranks (gloo), FSDP2 full fine-tuning: each rank builds the transformer on meta and fills its
    own shard from the pipeline's safetensors (tests/fsdp_worker.py records it); the run trains and saves."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here.parent)}  # this checkout's egrpo
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(here / "fsdp_worker.py"), "--record", str(tmp_path / "probe"),
               "train", str(root / "config.yaml"), "train.distributed=fsdp", f"output_dir={run}", "--no-progress"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"probe.{rank}.json").read_text())
        assert report["meta_before_fill"]
        assert report["local_elements"] <= report["model_elements"] / 2 + 4096
    (line,) = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line)["first_ratio_max_dev"] == 0.0
    trained = load_file(str(run / "model.safetensors"))
    base = load_file(str(root / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)


def test_flops_count_both_branches_of_the_guidance(root):
    from egrpo.flops import policy_flops

    guided, plain = policy_flops(policy_of(root, "model.guidance=4.0")), policy_flops(policy_of(root,
                                                                                               "model.guidance=1.0"))
    assert guided.forward == 2 * plain.forward > 0 and guided.forward_backward > guided.forward


@pytest.mark.parametrize("overrides,message", [
    (["model.guidance=0.5"], r"model.guidance must be >= 1 for Qwen-Image"),
    (["model.negative_prompt=blurry"], r"model.negative_prompt is 'blurry', but the embedding cache .* encodes ' '"),
    (["model.height=34"], r"multiples of 4 for Qwen-Image"),
])
def test_bad_settings_are_refused_with_what_to_do(root, overrides, message):
    with pytest.raises(cfg.ConfigError, match=message):
        policy_of(root, *overrides)


def test_a_negative_prompt_without_true_cfg_is_refused():
    with pytest.raises(cfg.ConfigError, match=r"model.negative_prompt is for .* model.kind='flux' runs none"):
        cfg.load("flux-dev-hps", ["model.negative_prompt=blurry"])


def test_shipped_config_uses_qwen_images_own_shift_at_its_resolution():
    """qwen-image-hps's static shift is exp(mu) of Qwen-Image's scheduler (base 256 tokens / 0.5, max 8192 / 0.9, the
    values of Qwen/Qwen-Image's scheduler_config.json) at the config's resolution."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    config = cfg.load("qwen-image-hps")
    model = config.model
    assert (model.kind, model.pretrained, model.guidance, model.negative_prompt) == ("qwen-image", "Qwen/Qwen-Image",
                                                                                     4.0, " ")
    assert (model.lora_rank, model.lora_alpha, config.train.lr) == (32, 64.0, 3e-4)
    tokens = (model.height // 16) * (model.width // 16)  # VAE factor 8, 2x2 packing
    assert config.sampling.shift == pytest.approx(math.exp(calculate_shift(tokens, 256, 8192, 0.5, 0.9)), abs=1e-4)

    assert config.sampling.shift_terminal == 0.02


@pytest.mark.parametrize("steps,size", [(16, 512), (10, 512), (50, 1328), (4, 1024)])
def test_the_grid_is_qwen_images_scheduler_grid(steps, size):
    """egrpo's grid with the shift exp(mu) and the terminal stretch equals Qwen-Image's scheduler's sigmas (its
    scheduler_config.json) as QwenImagePipeline sets them, at the steps of egrpo, Flow-GRPO and the authors."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                                max_shift=0.9, shift=1.0, shift_terminal=0.02,
                                                time_shift_type="exponential", use_dynamic_shifting=True)
    mu = calculate_shift((size // 16) ** 2, 256, 8192, 0.5, 0.9)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    torch.testing.assert_close(scheduler.sigmas.double(), time_grid(steps, math.exp(mu), terminal=0.02),
                               rtol=0, atol=1e-6)
    assert not torch.allclose(scheduler.sigmas.double(), time_grid(steps, math.exp(mu)), atol=1e-3)


def test_a_cache_of_another_width_is_refused(root, tmp_path):
    from egrpo.models.text_cache import write_cache

    other = tmp_path / "other.safetensors"
    rows = (torch.randn(len(TRAIN), 4, 16), torch.ones(len(TRAIN), 4))
    write_cache(other, "qwen-image", TRAIN, [rows], {"uncond_text": torch.zeros(1, 4, 16),
                                                       "uncond_text_mask": torch.ones(1, 4)}, negative=" ")
    with pytest.raises(cfg.ConfigError, match=r"holds embeddings of width 16, but the transformer expects 32: .* "
                                              r"rebuild it with egrpo preprocess"):
        policy_of(root, f"model.embedding_cache={other}")


def test_a_terminal_outside_the_unit_interval_is_refused():
    with pytest.raises(cfg.ConfigError, match=r"sampling.shift_terminal must be in \(0, 1\) or null, got 1.5"):
        cfg.load("qwen-image-hps", ["sampling.shift_terminal=1.5"])
