"""The command line takes its documented commands: overrides anywhere, method defaults that hold on every
shipped config, and every command line in README.md and docs/ parses."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from egrpo import config as cfg
from egrpo.cli import BROKEN_PIPE_EXIT, build_parser, main, parse
from egrpo.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in cfg.CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("shipped", SHIPPED)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_method_on_a_shipped_config_is_that_method(shipped, method):
    """A shipped config's sampling and plan keys are E-GRPO's; --method dancegrpo must still mean DanceGRPO."""
    sources = {}
    config = cfg.load(shipped, [f"method.name={method}"], sources)
    flat = cfg.flat_values(config)
    for key, value in METHODS[method].defaults.items():
        assert flat[key] == value, f"{shipped} --method {method}: {key} is {flat[key]!r}, not {value!r}"
        assert sources[key] == f"method {method} defaults"


def test_the_command_line_beats_method_defaults_and_a_users_file_is_asked(tmp_path):
    assert cfg.load("flux-dev-hps", ["method=dancegrpo", "sampling.eta=0.5"]).sampling.eta == 0.5
    mine = tmp_path / "mine.yaml"
    mine.write_text("sampling:\n  eta: 0.7\n")
    with pytest.raises(cfg.ConfigError, match=r"sampling.eta=0.7 \(method dancegrpo: 0.3\)"):
        cfg.load(str(mine), ["method=dancegrpo"])
    assert cfg.load(str(mine), ["method=dancegrpo", "sampling.eta=0.6"]).sampling.eta == 0.6
    mine.write_text("method: dancegrpo\nsampling:\n  eta: 0.7\n")  # the file names the method: its value holds
    assert cfg.load(str(mine)).sampling.eta == 0.7


def test_config_prints_resolved_yaml_and_where_values_come_from(capsys):
    assert main(["config", "flux-dev-hps", "--method", "dancegrpo", "train.iterations=5", "tau=2.4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"#\s+plan.tau: 2.4\s+command line", out)  # a short key is recorded under its full name
    assert "noise: dance" in out and "eta: 0.3" in out
    assert re.search(r"#\s+sampling.eta: 0.3\s+method dancegrpo defaults", out)
    assert re.search(r"#\s+train.iterations: 5\s+command line", out)
    assert re.search(r"#\s+model.kind: flux\s+shipped config flux-dev-hps", out)


def test_overrides_anywhere_and_paths_with_equals_signs():
    parser = build_parser()
    args = parse(parser, ["plan", "flux-dev-hps", "--json", "sampling.num_steps=4"])
    assert args.config == "flux-dev-hps" and args.json and args.overrides == ["sampling.num_steps=4"]
    args = parse(parser, ["eval", "base", "runs/tau=2.2", "--seeds", "1", "model.height=1024", "--out", "e"])
    assert args.checkpoints == ["base", "runs/tau=2.2"] and args.overrides == ["model.height=1024"]
    args = parse(parser, ["eval", "base", "--prompts", "p=q.txt"])  # an option's value is never an override
    assert args.prompts == "p=q.txt" and args.overrides == []


def test_an_override_given_to_a_command_without_a_config_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["figures", "curves", "runs/a", "plan.tau=2"])
    assert exit_.value.code == 2 and "takes no key=value overrides" in capsys.readouterr().err


def _documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every egrpo command line in a fenced block of README.md and docs/*.md."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        # fences pair up whatever their language: a yaml block's closing fence must not open a block of prose
        for language, block in re.findall(r"```(\w*)\n(.*?)```", doc.read_text(), re.S):
            if language not in ("", "bash", "sh"):
                continue
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip().removeprefix("$ ")
                if re.match(r"(egrpo|torchrun|python3? -m egrpo)\b", line):
                    found.append((doc.name, os.path.expandvars(line)))
    return found


@pytest.mark.parametrize("doc,line", _documented_commands())
def test_every_documented_command_parses(doc, line):
    words = shlex.split(line)
    argv = words[1:] if words[0] == "egrpo" else words[words.index("-m") + 2 :]
    parse(build_parser(), argv)  # a usage error exits


def test_plan_shows_the_chosen_methods_schedule(capsys):
    assert main(["plan", "--method", "dancegrpo"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("method: DanceGRPO  SDE steps [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]")
    assert "merge_lengths" not in out  # no anchor to branch from: E-GRPO's merge table would be wrong here
    assert main(["plan", "--json", "method=branchgrpo"]) == 0
    assert '"group": "prompt x depth"' in capsys.readouterr().out


def test_sample_takes_base_or_a_runs_weights_file_and_creates_its_folder(tmp_path):
    from egrpo.checkpoint import save_weights, trainable_state
    from egrpo.embedded.assets import load_base_policy
    from egrpo.evaluation import load_config

    run = tmp_path / "run"
    run.mkdir()
    cfg.load("embedded", ["sampling.num_steps=4"]).dump(run / "config.yaml")
    policy = load_base_policy()
    save_weights(run / "model.safetensors", trainable_state(policy.model), policy.arch_config())
    config = load_config(str(run / "model.safetensors"))
    assert config.sampling.num_steps == 4  # the run's own config, not the embedded default
    assert config.model.checkpoint == str(run / "model.safetensors")

    out = tmp_path / "new" / "folder" / "seven.png"
    assert main(["sample", "--checkpoint", "base", "--prompt", "a handwritten digit seven", "--num", "2",
                 "--out", str(out), "sampling.num_steps=4"]) == 0
    assert out.stat().st_size > 0


@pytest.mark.parametrize("argv", [["ablate", "--seeds", "0"], ["ablate", "--iterations", "-1"],
                                  ["eval", "base", "--seeds", "0"], ["sample", "--checkpoint", "base", "--prompt",
                                                                     "a seven", "--num", "0"],
                                  ["pretrain", "--flow-steps", "0"]])
def test_counts_must_be_positive(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(build_parser(), argv)
    assert exit_.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """`egrpo plan | head -1`: no 'error: [Errno 32] Broken pipe', and the shell's status for a closed pipe."""
    proc = subprocess.Popen([sys.executable, "-m", "egrpo", "plan"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # as head does once it has its line; here before the first, so the write surely fails
    err = proc.stderr.read().decode()
    assert (proc.wait(timeout=60), err) == (BROKEN_PIPE_EXIT, "")
