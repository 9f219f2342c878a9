"""The hacking watch: a run trained on the embedded quality reward alone games it (alignment falls while
quality rises); with alignment as a check the watch catches it, keeps the best weights before, and stops."""

import json

from safetensors.torch import load_file

from egrpo import watch
from egrpo.cli import main


def test_hacking_is_a_risen_reward_with_a_check_fallen_beyond_the_margin():
    base = {"reward": 1.0, "check_clip": 0.30, "check_alignment": 0.5}
    rose_clip_fell = {"reward": 1.2, "check_clip": 0.26, "check_alignment": 0.5}
    assert watch.fallen_checks(base, rose_clip_fell, ["clip", "alignment"], 0.1) == ["clip"]
    assert watch.hacked(base, rose_clip_fell, ["clip"])
    within_margin = {"reward": 1.2, "check_clip": 0.28, "check_alignment": 0.5}
    assert watch.fallen_checks(base, within_margin, ["clip"], 0.1) == []
    assert not watch.hacked(base, within_margin, [])
    reward_fell_too = {"reward": 0.9, "check_clip": 0.10}
    assert watch.fallen_checks(base, reward_fell_too, ["clip"], 0.1) == ["clip"]
    assert not watch.hacked(base, reward_fell_too, ["clip"])


def test_a_quality_only_run_is_caught_stopped_and_its_best_weights_kept(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--no-progress", "reward={quality: 1.0}", "eval.check={alignment: {}}",
                 "eval.stop_on_hack=true", "eval.every=1", "train.iterations=10", "train.prompts_per_iteration=4",
                 "eval.seeds_per_prompt=2", "train.lr=3e-4", f"output_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "reward hacking: the trained reward rose" in err and "alignment" in err and str(run / "best") in err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    base, caught = json.loads((run / "eval_base.json").read_text()), records[-1]
    assert caught["eval"]["reward"] > base["reward"]
    assert caught["eval"]["check_alignment"] < 0.9 * base["check_alignment"]
    assert (run / "hacking" / f"iter-{caught['iteration']:06d}.png").is_file()
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["iteration"] < caught["iteration"] and best["check_alignment"] >= 0.9 * base["check_alignment"]
    assert load_file(str(run / "best" / "model.safetensors")) and not (run / "model.safetensors").exists()
