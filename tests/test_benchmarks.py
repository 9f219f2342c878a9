"""The benchmark scripts run end to end and write what they promise (tiny budgets)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_overhead_reports_split_and_ratio(tmp_path, tiny_overrides):
    out = tmp_path / "overhead.json"
    assert _load("engine_overhead").main(["--iterations", "1", "--out", str(out), *tiny_overrides]) == 0
    result = json.loads(out.read_text())
    median = result["median"]
    assert median["network_calls"] > 0 and median["network_alone_s"] > 0
    assert abs(median["rollout_s"] + median["reward_s"] + median["update_s"] - median["iteration_s"]) < 0.05
    assert result["overhead_ratio"] > 0


def test_compare_methods_writes_json_table_and_plot(tmp_path, eval_prompt_file):
    out = tmp_path / "cmp"
    args = ["--budget", "0.5", "--seeds", "1", "--evals", "1", "--methods", "egrpo,flowgrpo", "--out", str(out),
            "train.prompts_per_iteration=2", "train.group_size=3", f"prompts.eval={eval_prompt_file}"]
    assert _load("compare_methods").main(args) == 0
    result = json.loads(Path(f"{out}.json").read_text())
    assert set(result["methods"]) == {"egrpo", "flowgrpo"}
    for r in result["methods"].values():
        assert r["iterations"][0] >= 1 and len(r["curves"][0]) == 2
    table = Path(f"{out}.md").read_text()
    assert "| egrpo |" in table and "| flowgrpo |" in table
    assert Path(f"{out}.png").stat().st_size > 1000


def test_compare_methods_budgets_network_calls(tmp_path, eval_prompt_file):
    out = tmp_path / "cmp"
    args = ["--budget-calls", "400", "--seeds", "1", "--evals", "1", "--methods", "egrpo-fast,mixgrpo",
            "--level-of", "mixgrpo", "--out", str(out), "train.prompts_per_iteration=2", "train.group_size=3",
            f"prompts.eval={eval_prompt_file}"]
    assert _load("compare_methods").main(args) == 0
    result = json.loads(Path(f"{out}.json").read_text())
    assert result["unit"] == "calls" and result["level"] == result["methods"]["mixgrpo"]["alignment"][0]
    for r in result["methods"].values():
        calls_per_iteration = r["network_calls_per_iteration"]
        # a run stops at the first iteration that reaches the budget
        assert 400 <= r["final_cost"][0] < 400 + calls_per_iteration
        assert r["final_cost"][0] == r["iterations"][0] * calls_per_iteration
    assert "network calls per method and seed" in Path(f"{out}.md").read_text()


def test_completion_signal_measures_both_models(tmp_path):
    out = tmp_path / "signal"
    assert _load("completion_signal").main(["--quick", "--out", str(out)]) == 0
    summary = json.loads(Path(f"{out}_summary.json").read_text())
    for model in ("embedded", "tiny_flux"):
        full = summary[model]["every step, Euler"]
        assert full["spearman"] == 1.0 and full["completion_calls_per_sample"] > 4
    assert Path(f"{out}_tiny_flux.png").stat().st_size > 1000
    assert "| stride 4, DPM++(2M) |" in Path(f"{out}.md").read_text()


@pytest.mark.parametrize("flag,kind", [("--flux-dev-size", "flux"), ("--qwen-image-size", "qwen-image")])
def test_gpu_smoke_true_size_path_extrapolates_a_reduced_plan(tmp_path, flag, kind):
    """The FLUX.1-dev and Qwen-Image modes, each on its tiny twin: Qwen-Image's peer is QwenImagePipeline's loop with
    the text masks and true CFG over the negative prompt's embeddings."""
    out = tmp_path / "true_size.json"
    assert _load("gpu_smoke").main([flag, "--device", "cpu", "--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    measured, full = result["measured_plan"], result["full_plan"]
    assert result["extrapolated"] and result["size"] == "tiny" and result["device"] == "cpu"
    assert result["model"] == kind
    assert 0 < result["trained_params"] < result["transformer_params"]  # LoRA adapters only
    assert measured["trainer_network_calls"] == sum(measured["network_calls"].values())
    assert len(full["active_steps"]) > len(measured["active_steps"])
    for part in ("rollout", "update"):
        assert full["network_calls"][part] > measured["network_calls"][part]
        assert full["network_alone_seconds"][part] >= measured["network_alone_seconds"][part] > 0
    assert full["decoded_images"] > measured["decoded_images"]
    for part in ("rollout", "reward", "update", "iteration"):
        assert full["seconds"][part] >= measured["seconds"][part] > 0
    assert abs(sum(full["seconds"][p] for p in ("rollout", "reward", "update")) - full["seconds"]["iteration"]) < 1e-9
    assert result["iteration_over_network"] > 0 and result["latents_per_second"] > 0
    assert result["seconds_total"] > result["seconds_build"] + result["seconds_warmup"] > 0
    assert result["peak_memory_allocated_gib"] is None  # CPU
    use = result["utilisation"]  # the measured plan's calls as replayed, against a CPU matmul's rate
    assert use["matmul"] == {"n": 512, "dtype": "float32", "tflops": use["matmul"]["tflops"]} and use["lora_rank"] == 32
    for part in ("rollout", "update"):
        assert use[part]["latents"] == measured["network_calls"][part]  # latents through the network
        assert use[part]["seconds"] == pytest.approx(measured["network_alone_seconds"][part])
    for part in ("rollout", "rollout_largest_batch", "update"):
        assert use[part]["tflops"] > 0
        assert use[part]["fraction_of_matmul"] == pytest.approx(use[part]["tflops"] / use["matmul"]["tflops"])
    assert sum(b["latents"] for b in use["rollout_by_batch"].values()) == use["rollout"]["latents"]
    peer = result["peer"]  # under LoRA the pipeline gets the transformer out of peft's wrapper, adapters in place
    assert peer["batch"] == use["rollout_largest_batch"]["batch"]
    assert min(peer["seconds_per_latent_forward"].values()) > 0
    assert peer["latents_agree"] and peer["latents_max_abs_diff"] <= 1e-4 * peer["latents_max_abs"]


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_fsdp_memory_writes_per_rank_peaks_for_every_phase(tmp_path, lora_rank):
    out = tmp_path / "fsdp_memory.json"
    argv = ["--world-sizes", "2", "--small", "--iterations", "1", "--lora-rank", str(lora_rank), "--out", str(out)]
    assert _load("fsdp_memory").main(argv) == 0
    result = json.loads(out.read_text())
    assert result["lora_rank"] == lora_rank
    for runs in (result["runs"], result["runs_glibc_default_malloc"]):
        (run,) = runs
        assert run["world_size"] == 2 and len(run["ranks"]) == 2 and run["model_bytes"] > 0
        assert set(run["phases"]) == {"load", "train", "checkpoint", "resume", "export"}
        assert all(run["phases"][p] == max(r[p] for r in run["ranks"]) for p in run["phases"])
        # Training holds at least this rank's half of the fp32 weights, gradients and AdamW moments (under LoRA,
        # of the frozen weights alone)
        assert run["phases"]["train"] >= run["model_bytes"] * (1 if lora_rank else 4) / 2 * 0.9


def test_diversity_pareto_keeps_the_share_of_base_diversity_and_checks_the_target():
    pareto = _load("diversity_pareto")
    base = {"alignment": 0.5, "judge_accuracy": 0.5, "embedding_diversity": 0.2, "vendi": 1.5, "diversity": 2.0,
            "frechet_distance": 1.0}

    def run(alignment, embedding_diversity):
        return {**base, "alignment": alignment, "embedding_diversity": embedding_diversity, "iterations": 60,
                "train_seconds": 100.0}

    result = pareto.summarise(base, {"plain": {0: run(0.98, 0.02), 1: run(0.96, 0.04)},
                                     "novelty 1": {0: run(0.96, 0.15), 1: run(0.94, 0.15)}})
    plain, novelty = result["settings"]
    assert [plain["label"], novelty["label"]] == ["plain", "novelty 1"]  # SETTINGS' order, not the dict's
    assert plain["mean"]["kept"] == pytest.approx(0.15) and plain["std"]["kept"] == pytest.approx(0.0707107)
    assert not plain["reaches_target"]  # aligned but not diverse
    assert novelty["mean"]["alignment"] == pytest.approx(0.95) and novelty["reaches_target"]
    table = pareto.markdown(result)
    assert "60 iterations), 2 seeds" in table and "| novelty 1 | 2 | 0.950 ± 0.014 |" in table and "75% ± 0" in table


def test_diversity_pareto_trains_evaluates_and_keeps_finished_runs(tmp_path, eval_prompt_file):
    pareto = _load("diversity_pareto")
    args = ["--seeds", "0", "--settings", "KL warm-up 0->1", "--root", str(tmp_path / "runs"), "--threads", "1",
            "--out", str(tmp_path / "pareto"), "--figure", str(tmp_path / "pareto.png"), "train.iterations=1",
            "train.prompts_per_iteration=2", "train.group_size=3", "plan.active_steps=first:2",
            f"prompts.eval={eval_prompt_file}"]
    assert pareto.main(args) == 0
    run = tmp_path / "runs" / "kl-warm-up-0-1-seed0"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["kl_coef"] for m in metrics] == [0.0]  # the setting's schedule reached the run
    result = json.loads((tmp_path / "pareto.json").read_text())
    (setting,) = result["settings"]
    assert setting["seeds"]["0"]["iterations"] == 1 and 0 < setting["mean"]["kept"]
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    finished = (run / "summary.json").stat().st_mtime_ns
    assert pareto.main(args) == 0  # a second call reports the finished run without training it again
    assert (run / "summary.json").stat().st_mtime_ns == finished
