import json

import pytest
import torch

from egrpo.cli import main
from egrpo.evaluation import diversity, frechet_distance, markdown_table


def test_frechet_distance_closed_forms():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # A pure shift by d moves only the means: distance = |d|^2.
    assert frechet_distance(x, x + 0.5) == pytest.approx(8 * 0.25, rel=1e-6)
    # Scaling by 2: trace term = tr(C + 4C - 2*2C) = tr(C).
    trace = torch.cov(x.T.double()).trace().item()
    assert frechet_distance(x, 2 * (x - x.mean(0)) + x.mean(0)) == pytest.approx(trace, rel=1e-5)


def test_diversity_is_the_mean_pairwise_distance_within_a_prompt():
    same = torch.zeros(6, 1, 2, 2)
    assert diversity(same, 3) == 0.0
    two = torch.tensor([[0.0, 0.0], [3.0, 4.0]]).reshape(2, 1, 1, 2)
    assert diversity(two, 2) == pytest.approx(5.0)


def test_markdown_table_layout():
    table = markdown_table({"base": {"alignment": 0.5, "quality": -1.0}, "run": {"alignment": 0.75}})
    lines = table.splitlines()
    assert lines[0] == "| model | alignment | quality |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| base | 0.500 | -1.000 |" and lines[3] == "| run | 0.750 | - |"


def test_cli_eval_of_the_base_model_writes_json_and_table(tmp_path, eval_prompt_file, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "base", "--prompts", str(eval_prompt_file), "--seeds", "3", "--out", str(out)]) == 0
    rows = json.loads((out / "eval.json").read_text())
    assert set(rows["base"]) >= {"alignment", "accuracy", "judge_accuracy", "quality", "diversity", "frechet_distance"}
    assert 0.0 <= rows["base"]["alignment"] <= 1.0
    assert "| base |" in (out / "eval.md").read_text()
    # embedding diversity and Vendi in the judge's features, overall and for each prompt (2 prompts x 3 seeds)
    base = rows["base"]
    assert base["diversity_encoder"] == "judge" and 0 < base["embedding_diversity"] < 2 and 1 <= base["vendi"] <= 3
    assert list(base["per_prompt"]) == ["a photo of a hand-drawn three", "digit: seven"]
    means = [sum(p[k] for p in base["per_prompt"].values()) / 2 for k in ("embedding_diversity", "vendi")]
    assert means == pytest.approx([base["embedding_diversity"], base["vendi"]])
    assert "| digit: seven |" in (out / "eval_per_prompt.md").read_text()
    # Fixed seeds: a second evaluation gives the same numbers.
    args = ["eval", "base", "--prompts", str(eval_prompt_file), "--seeds", "3", "--out", str(tmp_path / "again")]
    assert main(args) == 0
    assert json.loads((tmp_path / "again" / "eval.json").read_text()) == rows
    assert main(["eval", "base", "--prompts", str(eval_prompt_file), "--seeds", "3", "--labels", "shipped",
                 "--out", str(tmp_path / "named")]) == 0
    assert json.loads((tmp_path / "named" / "eval.json").read_text()) == {"shipped": rows["base"]}
    assert main(["eval", "base", "--labels", "a,b", "--out", str(tmp_path / "bad")]) == 2


def test_ablate_writes_each_table(tmp_path, eval_prompt_file):
    out = tmp_path / "ablation"
    args = ["ablate", "--sweeps", "steps", "--seeds", "2", "--iterations", "1", "--out", str(out),
            "train.prompts_per_iteration=2", "train.group_size=3", "eval.seeds_per_prompt=1",
            f"prompts.eval={eval_prompt_file}"]
    assert main(args) == 0
    rows = json.loads((out / "steps.json").read_text())
    assert list(rows) == ["first 4", "first 8", "second 8", "all 16"]
    assert rows["first 8"]["paper_hps"] == 0.391
    mean, std = rows["all 16"]["alignment"]
    assert 0.0 <= mean <= 1.0 and std >= 0.0
    # cost column: latents per iteration, (T + completions + one update input per step) x prompts
    assert rows["first 4"]["network_calls"] < rows["first 8"]["network_calls"] < rows["all 16"]["network_calls"]
    table = (out / "steps.md").read_text().splitlines()
    assert table[2].startswith("| setting |") and len(table) == 8
    assert table[-1].endswith(f"| {rows['all 16']['network_calls']} | 0.366 |")
    from egrpo.ablation import ablate
    from egrpo.config import ConfigError

    with pytest.raises(ConfigError, match="unknown sweep"):
        ablate(["nope"], 1, 1, tmp_path)


def test_methods_table_marks_rows_the_paper_does_not_have():
    from egrpo.ablation import SWEEPS, markdown

    row = {"alignment": (0.9, 0.01), "judge_accuracy": (0.8, 0.02), "quality": (-4.0, 0.5), "network_calls": 100}
    rows = {label: {**row, "paper_hps": paper} for label, _, paper in SWEEPS["methods"]}
    lines = markdown("methods", rows, 20, 3).splitlines()
    assert lines[0].startswith("Table 1: methods")
    assert lines[4] == "| E-GRPO | 0.900 ± 0.010 | 0.800 ± 0.020 | -4.000 ± 0.500 | 100 | 0.391 |"
    assert lines[-1].startswith("| Flow-GRPO-Fast |") and lines[-1].endswith("| 100 | - |")
    # every method of the engine has a row
    from egrpo.methods import METHODS

    names = {cell[0].split("=")[1] if cell else "egrpo" for _, cell, _ in SWEEPS["methods"]}
    assert names == set(METHODS)


def test_reward_models_load_once_per_table(tmp_path, eval_prompt_file, monkeypatch):
    import egrpo.evaluation as evaluation

    built = []
    real = evaluation.WeightedReward

    def counting(specs):
        built.append(specs)
        return real(specs)

    monkeypatch.setattr(evaluation, "WeightedReward", counting)
    rows = evaluation.run(["base", "base"], [f"prompts.eval={eval_prompt_file}", "eval.seeds_per_prompt=1"],
                          tmp_path, labels=["first", "second"])
    assert len(built) == 1
    assert rows["first"] == rows["second"]
