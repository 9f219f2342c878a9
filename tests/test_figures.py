import json

import pytest
import torch

from egrpo import config as cfg
from egrpo.cli import main
from egrpo.planner import make_plan
from egrpo.stepmath import step_entropy, time_grid
from egrpo.trainer import Trainer

TINY = ["train.prompts_per_iteration=2", "train.group_size=3", "plan.active_steps=first:3", "eval.seeds_per_prompt=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs on the same held-out prompts: E-GRPO on alignment and MixGRPO on the quality reward."""
    root = tmp_path_factory.mktemp("runs")
    prompts = root / "eval_prompts.txt"
    prompts.write_text("a photo of a hand-drawn three\ndigit: seven\n")
    made = {}
    for name, extra in (("egrpo", []), ("mixgrpo", ["method=mixgrpo", "reward.alignment=0", "reward.quality=1"])):
        config = cfg.load("embedded", [*TINY, f"prompts.eval={prompts}", f"output_dir={root / name}",
                                       "train.iterations=3", "eval.every=2", "train.lr=1e-3", *extra])
        Trainer(config, progress=False).train()
        made[name] = root / name
    made["prompts"] = prompts
    return made


def _read(out):
    assert out.is_file() and out.stat().st_size > 0
    return json.loads(out.with_suffix(".json").read_text())


def test_entropy_figure_plots_h_of_every_merge_length_and_the_plan(tmp_path):
    out = tmp_path / "entropy.png"
    assert main(["figures", "entropy", "plan.tau=2.0", "--max-length", "4", "--out", str(out)]) == 0
    data = _read(out)
    sigmas = time_grid(16, 3.0)
    assert list(data["entropy"]) == ["1", "2", "3", "4"]
    assert data["entropy"]["3"][5] == pytest.approx(step_entropy(sigmas, 5, 3, 0.7))
    assert data["entropy"]["4"][13] is None  # 13 + 4 runs off the 16-step grid
    assert data["tau"] == 2.0 and data["plan"]["merge_lengths"] == make_plan(tau=2.0).merge_lengths


def test_spread_single_and_merged_jumps_agree_where_the_plan_does_not_merge(tmp_path):
    out = tmp_path / "spread.png"
    args = ["figures", "spread", *TINY, "sampling.num_steps=8", "--batches", "1", "--out", str(out)]
    assert main(args) == 0
    data = _read(out)
    single, merged = data["within_group_reward_std"].values()
    lengths = data["merge_lengths"]
    assert len(single) == len(merged) == len(lengths) == 8 and data["groups_per_step"] == 2
    # Same prompts, initial noises and jump noises: where l_i = 1 the two variants are the same rollout.
    for (s_mean, _), (m_mean, _), length in zip(single, merged, lengths):
        assert s_mean >= 0.0
        if length == 1:
            assert m_mean == pytest.approx(s_mean, abs=1e-6)
    assert any(l > 1 for l in lengths)
    assert any(m[0] != pytest.approx(s[0], abs=1e-6) for s, m, l in zip(single, merged, lengths) if l > 1)


def test_curves_read_each_runs_metrics(runs, tmp_path):
    out = tmp_path / "curves.png"
    assert main(["figures", "curves", str(runs["egrpo"]), str(runs["mixgrpo"]), "--out", str(out)]) == 0
    data = _read(out)
    assert list(data) == ["egrpo", "mixgrpo"]
    metrics = [json.loads(l) for l in (runs["egrpo"] / "metrics.jsonl").read_text().splitlines()]
    assert data["egrpo"]["iteration"] == [1, 2, 3]
    assert data["egrpo"]["reward"] == [m["reward_mean"] for m in metrics]
    summary = json.loads((runs["egrpo"] / "summary.json").read_text())
    # held-out: base, the eval at iteration 2, final
    assert [h[0] for h in data["egrpo"]["held_out"]] == [0, 2, 3]
    assert data["egrpo"]["held_out"][-1][2] == pytest.approx(summary["final"]["reward"])
    assert main(["figures", "curves", str(tmp_path), "--out", str(out)]) == 2


def test_grid_columns_share_prompts_and_seeds(runs, tmp_path):
    out = tmp_path / "grid.png"
    args = ["figures", "grid", "base", str(runs["egrpo"]), "--prompts", str(runs["prompts"]), "--seeds", "2",
            "--rows", "3", "--labels", "base,trained", "--out", str(out)]
    assert main(args) == 0
    data = _read(out)
    assert data["prompts"] == ["a photo of a hand-drawn three"] * 2 + ["digit: seven"]
    assert list(data["rewards"]) == ["base", "trained"]
    assert all(0.0 <= r <= 1.0 for col in data["rewards"].values() for r in col)
    assert data["rewards"]["base"] != data["rewards"]["trained"]


def test_failures_finds_exactly_the_samples_whose_reward_rose_and_check_fell(runs, tmp_path):
    out = tmp_path / "failures.png"
    args = ["figures", "failures", "base", str(runs["mixgrpo"]), "--reward", "quality", "--check", "alignment",
            "--prompts", str(runs["prompts"]), "--out", str(out)]
    assert main(args) == 0
    data = _read(out)
    assert data["samples"] == 4  # 2 prompts x 2 seeds
    for case in data["cases"]:
        assert case["quality_tuned"] > case["quality_base"] and case["alignment_tuned"] < case["alignment_base"]
    drops = [c["alignment_tuned"] - c["alignment_base"] for c in data["cases"]]
    assert drops == sorted(drops)
    assert data["share_hacked"] == len(data["cases"]) / 4
    # A model compared with itself changes nothing: no case.
    same = tmp_path / "same.png"
    assert main(["figures", "failures", "base", "base", "--reward", "quality", "--check", "alignment",
                 "--prompts", str(runs["prompts"]), "--out", str(same)]) == 0
    assert _read(same)["cases"] == []
    assert main(["figures", "failures", "base", "--reward", "quality", "--check", "alignment"]) == 2


def test_pairs_compare_only_when_prompts_seeds_and_shapes_agree():
    import torch

    from egrpo.evaluation import Generated, same_samples

    def gen(prompts, seed=1234, size=8):
        config = cfg.load("embedded", [f"eval.seed={seed}"])
        return Generated(config=config, task=None, prompts=prompts, images=torch.zeros(len(prompts), 1, size, size))

    a = gen(["digit: one", "digit: two"])
    assert same_samples(a, gen(["digit: one", "digit: two"]))
    assert not same_samples(a, gen(["digit: one", "digit: one"]))
    assert not same_samples(a, gen(["digit: one", "digit: two"], seed=7))
    assert not same_samples(a, gen(["digit: one", "digit: two"], size=16))


def test_row_labels_show_every_prompt_whole(tmp_path, monkeypatch):
    """samples.png cut its labels to 28 characters ('a photo of a hand-drawn thre'): three rows said the same."""
    from egrpo import report

    drawn = []
    monkeypatch.setattr(report.plt, "close", drawn.append)
    prompts = [f"a photo of a hand-drawn {word}" for word in ("three", "seven", "eight")]
    images = torch.rand(3, 1, 8, 8)
    report.plot_sample_grid(images, images, prompts, 1, tmp_path / "samples.png")
    labels = [ax.get_ylabel() for ax in drawn[0].axes if ax.get_ylabel()]
    assert [" ".join(label.split()) for label in labels] == prompts
    assert all(len(line) <= 24 for label in labels for line in label.splitlines())
