"""`egrpo export` and `train.export_diffusers`: every export loads with diffusers' own loaders and gives, on a fixed
input, the velocity of egrpo's trained policy, bit for bit. Runs are real one-iteration `egrpo train` runs of the
tiny offline FLUX and SD3 pipelines of test_flux_sd3 (LoRA and full fine-tuning) and of the embedded model."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_flux_sd3 import EVAL, save_tiny_flux, save_tiny_sd3, write_config

from egrpo import checkpoint as ckpt
from egrpo import export as export_module
from egrpo.cli import main
from egrpo.evaluation import load_config
from egrpo.tasks import build_task

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest.one_thread


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """{kind: folder} of the tiny pipelines with their embedding caches."""
    roots = {}
    for kind, save in (("flux", save_tiny_flux), ("sd3", save_tiny_sd3)):
        root = tmp_path_factory.mktemp(kind)
        save(root / "pipeline")
        config = write_config(root, kind)
        assert main(["preprocess", str(config), "--prompts", str(root / "train.txt"), "--prompts",
                     str(root / "eval.txt"), "--no-progress"]) == 0
        roots[kind] = root
    return roots


def train(tmp_path, *args):
    """A one-iteration run that also exports for diffusers at its end; its directory."""
    run = tmp_path / "run"
    assert main(["train", *args, f"output_dir={run}", "train.iterations=1", "train.export_diffusers=true",
                 "--no-progress"]) == 0
    return run


def exported(run, out):
    """`egrpo export RUN --out OUT`, checked to write what the end of training wrote into RUN/diffusers."""
    assert main(["export", str(run), "--out", str(out)]) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(run / "diffusers").as_posix() for p in (run / "diffusers").rglob("*")
                           if p.is_file())
    for name in files:
        if name.endswith(".safetensors"):
            a, b = load_file(str(out / name)), load_file(str(run / "diffusers" / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "```python" in (out / "README.md").read_text()
    return out


def run_snippet(out) -> dict:
    """Run the loading snippet of the export's README.md as a user would paste it; its variables."""
    snippet = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    scope = {}
    exec(snippet.replace("torch.bfloat16", "torch.float32"), scope)  # bf16 on a CPU: slow and beside the point
    return scope


def policy_of(run):
    """egrpo's own policy with the run's trained weights, as `egrpo sample` builds it."""
    return build_task(load_config(str(run))).policy


def inputs(policy):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, *policy.latent_shape), generator=generator)
    return x, torch.tensor([0.7, 0.3]), policy.encode(EVAL)


def diffusers_velocity(kind, transformer, policy, x, sigma, cond):
    """The velocity egrpo's adapters compute, from a diffusers transformer called as its pipeline calls it."""
    from diffusers import FluxPipeline

    with torch.no_grad():
        if kind == "flux":
            rows, cols = 8, 8  # 32 px / VAE factor 2 / 2x2 packing
            return transformer(
                hidden_states=x, timestep=sigma, guidance=torch.full((len(x),), 3.5),
                pooled_projections=cond["pooled"], encoder_hidden_states=cond["text"],
                txt_ids=torch.zeros(cond["text"].shape[1], 3),
                img_ids=FluxPipeline._prepare_latent_image_ids(1, rows, cols, torch.device("cpu"), torch.float32),
                return_dict=False,
            )[0]
        # SD3: classifier-free guidance 4.5 over the empty prompt, timesteps 1000 sigma
        empty, b = policy.cache.unconditional(), len(x)
        out = transformer(
            hidden_states=torch.cat([x, x]), timestep=torch.cat([sigma, sigma]) * 1000.0,
            encoder_hidden_states=torch.cat([empty["text"].expand(b, -1, -1), cond["text"]]),
            pooled_projections=torch.cat([empty["pooled"].expand(b, -1), cond["pooled"]]), return_dict=False,
        )[0]
        v_uncond, v_cond = out.chunk(2)
        return v_uncond + 4.5 * (v_cond - v_uncond)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_lora_export_loads_with_the_pipelines_load_lora_weights(kind, pipelines, tmp_path):
    import diffusers

    root = pipelines[kind]
    run = train(tmp_path, str(root / "config.yaml"), "model.lora_rank=4", "model.lora_alpha=8")
    out = exported(run, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors"]
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (adapter["transformer.r"], adapter["transformer.lora_alpha"]) == (4, 8)

    policy = policy_of(run)
    x, sigma, cond = inputs(policy)
    with torch.no_grad():
        expected = policy.velocity(x, sigma, cond)
    pipe = getattr(diffusers, export_module.DIFFUSERS[kind][0]).from_pretrained(root / "pipeline")
    pipe.load_lora_weights(out)
    # alpha 8 over rank 4 scales the update by 2; without the metadata diffusers would take alpha = rank (scale 1)
    (adapter_config,) = pipe.transformer.peft_config.values()
    assert (adapter_config.r, adapter_config.lora_alpha) == (4, 8)
    got = diffusers_velocity(kind, pipe.transformer, policy, x, sigma, cond)
    assert torch.equal(got, expected)  # measured max |difference|: 0.0
    pipe.unload_lora_weights()
    assert not torch.equal(diffusers_velocity(kind, pipe.transformer, policy, x, sigma, cond), expected)
    assert run_snippet(out)["image"].size == (32, 32)  # the pipeline, the LoRA, an image at the trained size


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_full_fine_tune_exports_a_transformer_folder(kind, pipelines, tmp_path, monkeypatch):
    import diffusers
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME

    # shards of at most 20 kB: the tiny transformers need several, with their index, as FLUX.1-dev (48 GB) does
    monkeypatch.setattr(export_module, "MAX_SHARD_BYTES", 20_000)
    run = train(tmp_path, str(pipelines[kind] / "config.yaml"))
    out = exported(run, tmp_path / "export")
    index = json.loads((out / "transformer" / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2

    policy = policy_of(run)
    x, sigma, cond = inputs(policy)
    with torch.no_grad():
        expected = policy.velocity(x, sigma, cond)
    cls = getattr(diffusers, export_module.DIFFUSERS[kind][1])
    transformer = cls.from_pretrained(out, subfolder="transformer")
    assert torch.equal(diffusers_velocity(kind, transformer, policy, x, sigma, cond), expected)  # max diff 0.0
    base = cls.from_pretrained(pipelines[kind] / "pipeline", subfolder="transformer")
    assert not torch.equal(diffusers_velocity(kind, base, policy, x, sigma, cond), expected)
    assert run_snippet(out)["image"].size == (32, 32)


# DCP writes the checkpoint in one process here (no process group), and says so
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_an_fsdp_runs_sharded_checkpoint_exports_the_same_folder(pipelines, tmp_path):
    """A DCP checkpoint (an FSDP run stopped before its final model.safetensors) is read a shard at a time; SD3's
    positional-embedding buffer, never trained, comes from the base pipeline."""
    run = train(tmp_path, str(pipelines["sd3"] / "config.yaml"))
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.yaml").write_text((run / "config.yaml").read_text())
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        arch = json.loads(f.metadata()["arch"])
    ckpt.save_sharded_checkpoint(stopped, 1, {"model": load_file(str(run / "model.safetensors"))}, arch,
                                 {"elapsed": 0.0}, True, lambda: None)
    assert ckpt.is_sharded(ckpt.latest_checkpoint(stopped))
    out = tmp_path / "export"
    assert main(["export", str(stopped), "--out", str(out)]) == 0
    name = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(out / name)), load_file(str(run / "diffusers" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "pos_embed.pos_embed" in a and "pos_embed.pos_embed" not in load_file(str(run / "model.safetensors"))
    assert "for 1 iteration," in (out / "README.md").read_text()  # the checkpoint's own count


def test_embedded_model_exports_a_flux_transformer(tmp_path, tiny_overrides):
    from diffusers import FluxTransformer2DModel

    from egrpo.embedded.model import image_ids

    run = train(tmp_path, *tiny_overrides)
    out = exported(run, tmp_path / "export")
    transformer = FluxTransformer2DModel.from_pretrained(out, subfolder="transformer")
    policy = policy_of(run)
    x, sigma, cond = inputs(policy)
    with torch.no_grad():
        expected = policy.velocity(x, sigma, cond)
        got = transformer(hidden_states=x, timestep=sigma, encoder_hidden_states=cond["text"],
                          pooled_projections=cond["pooled"], img_ids=image_ids(),
                          txt_ids=torch.zeros(cond["text"].shape[1], 3), return_dict=False)[0]
    assert torch.equal(got, expected)  # max diff 0.0
    assert run_snippet(out)["velocity"].shape == (1, 16, 4)
    base = build_task(load_config("base", reference=str(run))).policy  # the shipped base model
    with torch.no_grad():
        assert not torch.equal(base.velocity(x, sigma, cond), expected)
