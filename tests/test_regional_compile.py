"""model.compile: which forwards run compiled, that the first PPO ratio stays exactly 1, and that the rollout's many
batch sizes reuse the graphs compiled at start.

Most tests swap torch.compile's backend for one that runs the captured graph and adds a constant to every output:
a forward that went through a compiled block then differs from the eager one by far more than rounding, so the tests see
exactly which calls were compiled, and torch's real tracing, guards and recompiles are all exercised. One slow test
runs inductor itself."""

import json

import pytest
import test_qwen_image
import test_wan
import torch
from test_flux_sd3 import save_tiny_flux, save_tiny_sd3, write_config

from egrpo import config as cfg
from egrpo import regional_compile
from egrpo.cli import main
from egrpo.errors import ConfigError
from egrpo.policy import select
from egrpo.rollout import chunked_velocity, integrate_ode
from egrpo.stepmath import time_grid
from egrpo.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest.one_thread

MARK = 1e-3


def marking_backend(gm, example_inputs):
    def mark(o):
        # a zero-mean ramp over the channels: the next block's LayerNorm would remove a constant
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            return o + MARK * torch.linspace(-1.0, 1.0, o.shape[-1])
        return o

    def run(*args):
        return [mark(o) for o in gm(*args)]

    return run


@pytest.fixture
def marking(monkeypatch):
    torch._dynamo.reset()  # graphs cached by an earlier test were compiled by another backend
    monkeypatch.setattr(regional_compile, "BACKEND", marking_backend)
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module", params=["flux", "sd3", "qwen-image", "wan"])
def pipeline(request, tmp_path_factory):
    """(kind, folder) of a tiny pipeline, its config.yaml and its embedding cache."""
    kind, root = request.param, tmp_path_factory.mktemp(request.param)
    if kind == "wan":
        test_wan.save_tiny_wan(root / "pipeline")
        config = test_wan.write_config(root)
    elif kind == "qwen-image":
        test_qwen_image.save_tiny_qwen_image(root / "pipeline")
        config = test_qwen_image.write_config(root)
    else:
        (save_tiny_flux if kind == "flux" else save_tiny_sd3)(root / "pipeline")
        config = write_config(root, kind)
    assert main(["preprocess", str(config), "--prompts", str(root / "train.txt"), "--prompts",
                 str(root / "eval.txt"), "--no-progress"]) == 0
    return kind, root


def frames_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_only_forwards_outside_log_probabilities_are_compiled_and_the_first_ratio_stays_one(
    pipeline, tmp_path, marking
):
    kind, root = pipeline
    overrides = [f"output_dir={tmp_path / 'run'}", "model.compile=true", "model.lora_rank=4", "model.lora_alpha=8",
                 "train.group_size=3"]
    trainer = Trainer(cfg.load(str(root / "config.yaml"), overrides), progress=False)
    policy = trainer.policy
    cond = select(trainer.train_cond, torch.tensor([0, 1, 2, 3, 0]))
    x = torch.randn(5, *policy.latent_shape)
    sigma = torch.full((5,), 0.6)
    with torch.no_grad():
        eager, compiled = policy.velocity(x, sigma, cond), policy.completion_velocity(x, sigma, cond)
        single = policy.completion_velocity(x[:1], sigma[:1], select(cond, torch.tensor([0])))
    # Every block's output gains the mark, so the compiled velocity is off the eager one by far more than rounding,
    # and one latent (run as two rows) answers what it answers in a batch.
    assert (compiled - eager).abs().max() > 1e-4
    assert torch.allclose(single, compiled[:1], atol=1e-6)
    assert torch.equal(policy.velocity(x, sigma, cond), eager)  # outside completion calls the blocks are eager again

    graphs = frames_compiled()
    metrics = trainer.iteration(0)  # completions of 2 active steps x 3 samples, shrinking batches
    assert metrics["first_ratio_max_dev"] == 0.0  # the trained transitions' forwards were not compiled
    assert frames_compiled() == graphs  # the warm-up's graphs served every batch size of the rollout



def rollout(trainer, it=0):
    gen, rows, prompt_gens = trainer._draws(it)
    return trainer.method.rollout(trainer.policy, select(trainer.train_cond, rows), it, gen, prompt_gens, 1024)


@pytest.mark.parametrize("method", ["egrpo", "flowgrpo-fast", "branchgrpo"])
def test_a_compiled_rollout_trains_the_eager_transitions_and_only_its_untrained_forwards_differ(
    pipeline, tmp_path, marking, method
):
    kind, root = pipeline
    overrides = [f"method.name={method}", "train.group_size=2"]
    if method == "branchgrpo":  # splits at the first two of 4 steps: the last two are untrained ODE steps
        overrides.append("method.split_steps=[0, 1]")
    runs = {}
    for compiled in (False, True):
        config = cfg.load(str(root / "config.yaml"), [*overrides, f"output_dir={tmp_path / str(compiled)}",
                                                      f"model.compile={str(compiled).lower()}"])
        runs[compiled] = rollout(Trainer(config, progress=False))
    eager, compiled = runs[False], runs[True]
    assert [ts.step for ts in eager.train_steps] == [ts.step for ts in compiled.train_steps]
    first = compiled.train_steps[0]
    # The first trained transition starts from the same noise by exact forwards in both runs.
    assert torch.equal(first.inputs, eager.train_steps[0].inputs)
    assert torch.equal(first.samples, eager.train_steps[0].samples)
    assert torch.equal(first.log_probs, eager.train_steps[0].log_probs)
    # What follows it passed through compiled forwards: the images that get the reward differ.
    assert not torch.allclose(compiled.finals, eager.finals, atol=1e-6)


def test_evaluation_sampling_runs_compiled(pipeline, tmp_path, marking):
    kind, root = pipeline
    config = cfg.load(str(root / "config.yaml"), [f"output_dir={tmp_path / 'run'}", "model.compile=true"])
    trainer = Trainer(config, progress=False)
    policy = trainer.policy
    sigmas = time_grid(4, 3.0)
    cond = select(trainer.train_cond, torch.tensor([0, 1]))
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    fast, _ = integrate_ode(chunked_velocity(policy, 8, completion=True), noise, cond, sigmas)
    exact, _ = integrate_ode(chunked_velocity(policy, 8), noise, cond, sigmas)
    assert not torch.allclose(fast, exact, atol=1e-6)


def test_the_compile_time_is_reported_apart(pipeline, tmp_path, marking):
    kind, root = pipeline
    run = tmp_path / "run"
    config = cfg.load(str(root / "config.yaml"), [f"output_dir={run}", "model.compile=true"])
    summary = Trainer(config, progress=False).train()
    assert summary["compile_seconds"] > 0
    assert json.loads((run / "summary.json").read_text())["compile_seconds"] == summary["compile_seconds"]


def test_compile_is_refused_where_it_does_not_apply(pipeline, tmp_path):
    with pytest.raises(ConfigError, match="model.compile applies to the diffusers pipelines"):
        cfg.load("embedded", ["model.compile=true"])


@pytest.mark.slow
def test_inductor_completions_agree_with_eager_and_the_first_ratio_stays_one(pipeline, tmp_path):
    """The real backend: compiled completions within float tolerance of eager, the first ratio exactly 1, and no
    recompilation after the warm-up (inductor's CPU compile takes about a minute on 2 cores)."""
    kind, root = pipeline
    torch._dynamo.reset()
    overrides = [f"output_dir={tmp_path / 'run'}", "model.compile=true", "train.group_size=3"]
    trainer = Trainer(cfg.load(str(root / "config.yaml"), overrides), progress=False)
    policy = trainer.policy
    cond = select(trainer.train_cond, torch.tensor([0, 1, 2]))
    x = torch.randn(3, *policy.latent_shape)
    sigma = torch.full((3,), 0.6)
    with torch.no_grad():
        assert torch.allclose(policy.completion_velocity(x, sigma, cond), policy.velocity(x, sigma, cond), atol=1e-4)
    graphs = frames_compiled()
    assert trainer.iteration(0)["first_ratio_max_dev"] == 0.0
    assert frames_compiled() == graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("flux_dev_size", [False, True], ids=["mid-path", "flux-dev-path"])
def test_gpu_smoke_measures_compiled_completions_beside_eager(tmp_path, marking, flux_dev_size):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("gpu_smoke", path)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    out = tmp_path / "smoke.json"
    args = ["--device", "cpu", "--tiny", "--compile", "--peer-repeats", "1", "--out", str(out)]
    assert smoke.main(args + (["--flux-dev-size"] if flux_dev_size else ["--iterations", "1"])) == 0
    result = json.loads(out.read_text())
    block = result["compile"]
    assert block["compile_seconds"] > 0 and block["speedup"] > 0
    assert block["velocity_max_abs_diff"] > 1e-4  # the marked (compiled) blocks answered the completions
    assert not result["peer"]["latents_agree"]  # egrpo's sampler ran compiled; diffusers' loop did not
