"""A catalogue of user mistakes: each is answered with exit code 2 and one line naming what was wrong, never a
traceback and never silent acceptance."""

import pytest

from egrpo.cli import main

# (command line, text the error must contain). `plan` resolves and checks a config without loading weights.
CONFIG_MISTAKES = [
    (["plan", "train.lr=-1"], "train.lr"),
    (["plan", "train.lr=abc"], "train.lr"),
    (["plan", "train.lr=.nan"], "train.lr"),
    (["plan", "train.weight_decay=-1"], "train.weight_decay"),
    (["plan", "train.clip_range=0"], "train.clip_range"),
    (["plan", "train.adv_clip=0"], "train.adv_clip"),
    (["plan", "train.max_grad_norm=0"], "train.max_grad_norm"),
    (["plan", "train.kl_coef=-0.1"], "train.kl_coef"),
    (["plan", "train.kl_coef=.inf"], "train.kl_coef"),
    (["plan", "train.group_size=1"], "train.group_size"),
    (["plan", "train.prompts_per_iteration=0"], "train.prompts_per_iteration"),
    (["plan", "train.iterations=-3"], "train.iterations"),
    (["plan", "train.max_batch=0"], "train.max_batch"),
    (["plan", "train.update_batch=0"], "train.update_batch"),
    (["plan", "train.max_skipped_steps=0"], "train.max_skipped_steps"),
    (["plan", "train.distributed=horovod"], "train.distributed"),
    (["plan", "train.fsdp_param_dtype=fp8"], "train.fsdp_param_dtype"),
    (["plan", "train.reward_normalization=rank"], "train.reward_normalization"),
    (["plan", "train.lrr=1"], "train.lrr"),
    (["plan", "sampling.num_steps=0"], "sampling.num_steps"),
    (["plan", "sampling.num_steps=1"], "sampling.num_steps"),
    (["plan", "sampling.num_steps=2.5"], "sampling.num_steps"),
    (["plan", "sampling.shift=0"], "sampling.shift"),
    (["plan", "sampling.eta=-1"], "sampling.eta"),
    (["plan", "sampling.eta=.inf"], "sampling.eta"),
    (["plan", "sampling.noise=brownian"], "sampling.noise"),
    (["plan", "plan.tau=-1"], "plan.tau"),
    (["plan", "plan.tau=.nan"], "plan.tau"),
    (["plan", "plan.merge=greedy"], "plan.merge"),
    (["plan", "plan.merge=fixed", "plan.merge_length=0"], "merge_length"),
    (["plan", "plan.merge=list"], "merge_lengths"),
    (["plan", "plan.merge=list", "plan.merge_lengths=[1,2]"], "merge_lengths"),
    (["plan", "plan.merge=list", "plan.merge_lengths=[1.9,1,1,1,1,1,1,1]"], "merge_lengths"),
    (["plan", "plan.active_steps=[[1]]"], "plan.active_steps"),
    (["plan", "plan.active_steps=[99]"], "active"),
    (["plan", "plan.active_steps=first:0"], "active"),
    (["plan", "plan.active_steps=middle"], "active"),
    (["plan", "seed=123456789012345678901"], "seed"),
    (["plan", "seed=-1"], "seed"),
    (["plan", "checkpoint_every=0"], "checkpoint_every"),
    (["plan", "eval.seeds_per_prompt=0"], "eval.seeds_per_prompt"),
    (["plan", "eval.every=-1"], "eval.every"),
    (["plan", "reward={}"], "reward"),
    (["plan", "reward={alignmnt: 1.0}"], "alignmnt"),
    (["plan", "reward.alignment=.nan"], "reward.alignment"),
    (["plan", "reward.alignment=yes"], "reward.alignment"),
    (["plan", "method=egrpoo"], "egrpoo"),
    (["plan", "method.window=0"], "method.window"),
    (["plan", "method.train_fraction=1.5"], "method.train_fraction"),
    (["plan", "method.branch_factor=1"], "method.branch_factor"),
    (["plan", "method.granularities=[0]"], "method.granularities"),
    (["plan", "method.completion_steps=0"], "method.completion_steps"),
    (["plan", "method.completion_steps=2", "method.granularities=[2]"], "method.completion_steps"),
    (["plan", "method.completion_solver=rk4"], "method.completion_solver"),
    (["plan", "method.branch_subsample=0"], "method.branch_subsample"),
    (["plan", "method.subsample_weights=reward"], "method.subsample_weights"),
    (["plan", "method.split_steps=[40]"], "method.split_steps"),
    # a method option that does not fit the grid or plan: refused with the range, not clamped into another method
    (["plan", "method=mixgrpo", "method.window=99", "sampling.num_steps=4"], "method.window=99"),
    (["plan", "method=mixgrpo", "sampling.num_steps=4"], "so it is 1..3"),  # its default window covers all 4
    (["plan", "method=flowgrpo-fast", "method.window=9"], "1..8"),
    (["plan", "method=egrpo-fast", "method.branch_subsample=99"], "use 1..8"),
    (["plan", "method=egrpo-fast", "plan.active_steps=first:1"], "method.branch_subsample=2"),
    (["plan", "method.granularities=[99]"], "1..16"),
    (["plan", "method.granularities=[1,1]"], "repeats a stride"),
    (["plan", "method=g2rpo", "method.granularities=[15,16]"], "one call"),
    (["plan", "method.subsample_weights=entropy"], "method.subsample_weights"),
    (["plan", "method=dancegrpo", "method.train_fraction=0.01"], "method.train_fraction=0.01"),
    (["plan", "method=branchgrpo", "sampling.num_steps=3"], "method.split_steps=null"),
    (["plan", "method=branchgrpo", "method.split_steps=[1,1]"], "repeats step 1"),
    (["plan", "method=branchgrpo", "method.split_steps=[]"], "method.split_steps=[]"),
    (["plan", "model.kind=dalle"], "model.kind"),
    # a served reward's address, refused before a server is tried (and retried) at start-up
    (["plan", "reward={http: 1.0}", "reward.http.url=http://localhost:8OOO"],
     "reward.http.url=http://localhost:8OOO: the port '8OOO' is not a number in 1..65535"),
    (["plan", "reward={http: 1.0}", "reward.http.url=http://localhost:70000"], "'70000' is not a number in 1..65535"),
    (["plan", "reward={http: 1.0}", "reward.http.url=http://localhost:0"], "'0' is not a number in 1..65535"),
    (["plan", "reward={http: 1.0}", "reward.http.url=ftp://localhost:8000"], "scheme must be http:// or https://"),
    (["plan", "reward={http: 1.0}", "reward.http.url=localhost:8000"], "scheme must be http:// or https://"),
    (["plan", "reward={http: 1.0}", "reward.http.url=http://:8000"], "reward.http.url=http://:8000 names no host"),
    (["plan", "reward={http-hps: 1.0}", "reward.http-hps.url=http://a b:1"], "reward.http-hps.url"),
    (["plan", "reward={http: 1.0}"], "reward.http.url is not set"),
    (["plan", "nonsense"], "nonsense"),
    (["plan", "no_such_config"], "no_such_config"),
]

CLI_MISTAKES = [
    (["train", "--method", "dancegrpoo"], "dancegrpoo"),
    (["train", "--resume", "definitely/not/a/run"], "definitely/not/a/run"),
    (["eval", "base", "--seeds", "0"], "--seeds"),
    (["ablate", "--seeds", "0"], "--seeds"),
    (["ablate", "--iterations", "0"], "--iterations"),
    (["ablate", "--sweeps", "colours"], "colours"),
    (["pretrain", "--flow-steps", "-5"], "--flow-steps"),
    (["sample", "--checkpoint", "base", "--prompt", "a seven", "--num", "0"], "--num"),
    (["sample", "--checkpoint", "missing.safetensors", "--prompt", "a seven"], "missing.safetensors"),
    (["figures", "curves", "not/a/run"], "not/a/run"),
    (["figures", "curves", "runs/x", "plan.tau=2"], "overrides"),
    (["figures", "entropy", "--max-length", "0"], "--max-length"),
    (["preprocess"], "preprocess"),
    (["preprocess", "embedded"], "model.kind"),
    (["config", "train.lr=-1"], "train.lr"),
    (["export", "no/such/run", "--out", "exported"], "no/such/run"),
    (["export", "no/such/run"], "--out"),
]


@pytest.mark.parametrize("argv,named", CONFIG_MISTAKES + CLI_MISTAKES,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_mistake_gets_one_line_and_exit_code_2(argv, named, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}: {out[-300:]} {err[-300:]}"
    assert "Traceback" not in err and named in err, err


def _answers_in_one_line(argv, named, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and named in err, (code, err)


def test_a_section_written_as_a_value_is_not_silently_remapped(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("eval: held_out.txt\n")  # meant prompts.eval; must not become it silently
    _answers_in_one_line(["plan", str(config)], "'eval' is a section", capsys)


@pytest.mark.parametrize("text,named", [
    ("plan:\n  tau: high\n", "plan.tau: expected float"),
    ("plan:\n  tau: -1\n", "plan.tau must be >= 0"),
    ("plan:\n  tau: .nan\n", "plan.tau must be a finite number"),
    ("plan:\n  active_steps: [99]\n", "plan: active_steps [99] lie outside the grid"),
    ("method: egrpoo\n", "method 'egrpoo' is not known"),
    ("sampling:\n  num_steps: 4\nmethod:\n  name: mixgrpo\n", "method.window=4 does not fit mixgrpo"),
    ("reward:\n  http:\n    url: http://localhost:8OOO\n", "reward.http.url=http://localhost:8OOO: the port"),
    ("reward:\n  alignmnt: 1.0\n", "reward: unknown reward 'alignmnt'"),
    ("reward:\n  alignment: [1]\n", "reward.alignment: the weight"),
])
def test_a_mistake_in_a_config_file_names_the_file(text, named, tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text(text)
    _answers_in_one_line(["plan", str(config)], f"{config}: {named}", capsys)


def test_a_config_file_that_is_not_text_names_the_file(tmp_path, capsys):
    config = tmp_path / "weights.yaml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    _answers_in_one_line(["plan", str(config)], f"{config}: not a YAML config", capsys)


def test_a_mistake_on_the_command_line_does_not_blame_the_file(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("sampling:\n  num_steps: 4\n")
    _answers_in_one_line(["plan", str(config), "method=mixgrpo", "method.window=99"], "method.window=99", capsys)
    assert str(config) not in capsys.readouterr().err


@pytest.mark.parametrize("line,named", [("  tau: 2.2", "plan.tau: expected float, got 'high'"),
                                        ("  num_steps: 16", "sampling.num_steps must be >= 2")])
def test_resuming_a_run_whose_config_yaml_holds_a_bad_value_names_that_file(line, named, tmp_path, capsys):
    from egrpo import config as cfg

    run = tmp_path / "run"
    run.mkdir()
    cfg.Config().dump(run / "config.yaml")
    text = (run / "config.yaml").read_text()
    assert line in text
    (run / "config.yaml").write_text(text.replace(line, line.split(":")[0] + (": high" if "tau" in line else ": 1")))
    _answers_in_one_line(["train", "--resume", str(run), "--no-progress"], f"{run / 'config.yaml'}: {named}", capsys)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # refused before the run was touched


def test_a_weights_file_whose_metadata_is_not_json(tmp_path, capsys):
    from safetensors.torch import save_file

    from egrpo.checkpoint import trainable_state
    from egrpo.embedded.model import DigitsPolicy

    path = tmp_path / "odd.safetensors"
    tensors = {k: v.detach().contiguous() for k, v in trainable_state(DigitsPolicy().model).items()}
    save_file(tensors, str(path), metadata={"arch": "{not json"})
    _answers_in_one_line(["sample", "--checkpoint", str(path), "--prompt", "a seven", "--out",
                          str(tmp_path / "s.png")], "not JSON", capsys)


def test_an_output_dir_under_a_file(tmp_path, eval_prompt_file, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _answers_in_one_line(["train", f"output_dir={blocker / 'run'}", f"prompts.eval={eval_prompt_file}",
                          "train.iterations=1", "--no-progress"], "a_file", capsys)


@pytest.mark.parametrize("overrides,named", [
    (["prompts.train={tmp}/missing.txt"], "prompts.train: prompt file {tmp}/missing.txt does not exist"),
    (["prompts.eval={tmp}"], "prompts.eval: {tmp} is a folder"),
    (["model.checkpoint={tmp}/gone.safetensors"], "model.checkpoint: {tmp}/gone.safetensors does not exist"),
    (["output_dir={tmp}/a_file/run"], "{tmp}/a_file is a file"),
    (["reward={{http: 1.0}}", "reward.http.url=http://localhost:8OOO"], "port '8OOO' is not a number in 1..65535"),
    (["method=egrpo-fast", "method.branch_subsample=99"], "method.branch_subsample=99"),
])
def test_train_refuses_a_path_url_or_option_mistake_before_any_weights_load(overrides, named, tmp_path, monkeypatch,
                                                                            capsys):
    import egrpo.trainer

    def load_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the mistake was refused")

    monkeypatch.setattr(egrpo.trainer, "build_task", load_weights)
    (tmp_path / "a_file").write_text("")
    argv = ["train", f"output_dir={tmp_path / 'run'}", *(o.format(tmp=tmp_path) for o in overrides), "--no-progress"]
    _answers_in_one_line(argv, named.format(tmp=tmp_path), capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damaged", ["state.json", "metrics.jsonl"])
def test_a_damaged_run_file_on_resume(damaged, tmp_path, eval_prompt_file, capsys):
    run = tmp_path / "run"
    args = ["train", f"output_dir={run}", f"prompts.eval={eval_prompt_file}", "train.iterations=1",
            "train.prompts_per_iteration=2", "train.group_size=3", "plan.active_steps=first:2",
            "eval.seeds_per_prompt=1", "--no-progress"]
    assert main(args) == 0
    target = run / "checkpoints" / "iter-000001" / "state.json" if damaged == "state.json" else run / "metrics.jsonl"
    target.write_text("{half a record")
    _answers_in_one_line(["train", "--resume", str(run), "--no-progress", "train.iterations=2"], damaged, capsys)


def test_export_mistakes(tmp_path, capsys):
    """A run with no weights yet, weights that are missing or of another kind, an output folder in use."""
    import shutil

    from egrpo import config as cfg
    from egrpo.embedded.assets import BASE_POLICY

    empty = tmp_path / "empty"
    empty.mkdir()
    cfg.Config().dump(empty / "config.yaml")
    _answers_in_one_line(["export", str(empty), "--out", str(tmp_path / "x")], "no trained weights yet", capsys)
    run = tmp_path / "run"  # an embedded run whose final weights are the shipped base model's
    run.mkdir()
    cfg.Config().dump(run / "config.yaml")
    shutil.copy(BASE_POLICY, run / "model.safetensors")
    _answers_in_one_line(["export", str(run), "--out", str(tmp_path / "x"), "--weights", "gone.safetensors"],
                         "gone.safetensors", capsys)
    flux = tmp_path / "flux"
    flux.mkdir()
    cfg.load("flux-dev-hps").dump(flux / "config.yaml")
    _answers_in_one_line(["export", str(flux), "--out", str(tmp_path / "x"), "--weights",
                          str(run / "model.safetensors")], "embedded digits weights", capsys)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    _answers_in_one_line(["export", str(run), "--out", str(taken)], "not empty", capsys)
    assert (taken / "notes.txt").read_text() == "mine"


def test_the_config_knows_every_model_kind_the_tasks_build():
    from egrpo.config import MODEL_KINDS, NEGATIVE_PROMPT_KINDS
    from egrpo.models.text_cache import DEFAULT_NEGATIVE_PROMPT, KINDS
    from egrpo.tasks import TASKS

    assert set(MODEL_KINDS) == set(TASKS) == {"embedded", *KINDS}
    assert set(NEGATIVE_PROMPT_KINDS) == set(DEFAULT_NEGATIVE_PROMPT)
