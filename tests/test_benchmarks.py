"""The benchmark scripts run end to end and write what they promise (tiny budgets)."""

import importlib.util
import json
from pathlib import Path

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
