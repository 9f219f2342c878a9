"""The ``logging`` section: TensorBoard and W&B receive exactly the numbers metrics.jsonl holds (plus the held-out
evaluations and their sample grid), continue a resumed run at the right step, and a missing package is refused
before any work."""

import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from egrpo import config as cfg
from egrpo.cli import main
from egrpo.tracking import image_grid
from egrpo.trainer import Trainer, resume_changes


def _config(tmp_path, overrides, *extra):
    return cfg.load("embedded", [*overrides, f"output_dir={tmp_path / 'run'}", *extra])


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _expected(run: Path, iterations: int) -> dict[str, dict[int, float]]:
    """tag -> {step: value}: each metrics.jsonl number at its iteration, base and final evaluations at 0 and N."""
    expected: dict[str, dict[int, float]] = {}
    evaluations = [(0, json.loads((run / "eval_base.json").read_text()))]
    for record in _records(run):
        for key, value in record.items():
            if key == "eval":
                evaluations.append((record["iteration"], value))
            elif key != "iteration":
                expected.setdefault(key, {})[record["iteration"]] = value
    evaluations.append((iterations, json.loads((run / "summary.json").read_text())["final"]))
    for step, metrics in evaluations:
        for key, value in metrics.items():
            expected.setdefault(f"eval/{key}", {})[step] = value
    return expected


def test_tensorboard_holds_the_metrics_file_and_a_resumed_run_replaces_the_steps_after_its_checkpoint(
    tmp_path, tiny_overrides
):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(tmp_path, tiny_overrides, "train.iterations=4", "checkpoint_every=2", "eval.every=3",
                     "logging.tensorboard=true")
    run = tmp_path / "run"
    crashing = Trainer(config, progress=False)
    original = crashing.iteration

    def crash_in_the_fourth_iteration(it):
        if it == 3:  # iteration 3 is logged, but the last checkpoint is iteration 2's
            raise RuntimeError("killed")
        return original(it)

    crashing.iteration = crash_in_the_fourth_iteration
    with pytest.raises(RuntimeError, match="killed"):
        crashing.train()
    crashed_seconds = _records(run)[2]["seconds"]
    Trainer(cfg.load(str(run / "config.yaml")), run, resume=True, progress=False).train()

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    expected = _expected(run, 4)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, values in expected.items():
        logged = {e.step: e.value for e in events.Scalars(tag)}
        assert list(logged) == sorted(values), tag  # each step once: the crashed run's iteration 3 was purged
        assert logged == {step: pytest.approx(v, rel=1e-6, abs=1e-30) for step, v in values.items()}, tag
    assert expected["seconds"][3] != crashed_seconds  # so the value shown is the resumed run's
    assert expected["eval/reward"].keys() == {0, 3, 4}

    images = events.Images("samples")
    assert [image.step for image in images] == [0, 3, 4]
    base = load_file(str(run / "eval_base_images.safetensors"))["images"]
    decoded = np.asarray(Image.open(io.BytesIO(images[0].encoded_image_string)).convert("RGB"))
    assert np.array_equal(decoded, image_grid(base, config.eval.seeds_per_prompt).numpy())


def _wandb_history(run_file: Path) -> tuple[list[dict], list[int]]:
    """The history rows ({key: value}, with _step) and exit codes of an offline W&B run file: a LevelDB-style log
    (32 KiB blocks of records with a 7-byte header; a record may span blocks) after a 7-byte W&B header."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    rows, exits, pos, pending = [], [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            elif record.WhichOneof("record_type") == "exit":
                exits.append(record.exit.exit_code)
    return rows, exits


def test_wandb_offline_logs_the_metrics_file_and_resume_continues_the_same_run(tmp_path, tiny_overrides,
                                                                               monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written outside tmp_path
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = _config(tmp_path, tiny_overrides, "train.iterations=2", "logging.wandb=true",
                     "logging.wandb_mode=offline")
    run = tmp_path / "run"
    first_final = Trainer(config, progress=False).train()["final"]  # summary.json keeps only the resumed one's
    resumed = cfg.load(str(run / "config.yaml"), ["train.iterations=3"])
    Trainer(resumed, run, resume=True, progress=False).train()

    run_id = (run / "wandb_run_id").read_text().strip()
    files = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # the first process and the resumed one, both logging to the same W&B run
    logged: dict[str, dict[int, float]] = {}
    for file in files:
        rows, exits = _wandb_history(file)
        assert exits == [0]
        for row in rows:
            for key, value in row.items():
                if not key.startswith(("_", "samples/")) and isinstance(value, (int, float)):
                    logged.setdefault(key, {})[row["_step"]] = value
    expected = _expected(run, 3)
    for key, value in first_final.items():
        expected[f"eval/{key}"][2] = value
    assert logged == expected
    assert any("samples/path" in row for file in files for row in _wandb_history(file)[0])


@pytest.mark.parametrize("key,blocked", [("logging.wandb", ["wandb"]),
                                         ("logging.tensorboard", ["tensorboard", "torch.utils.tensorboard"])])
def test_a_missing_package_is_one_line_and_exit_code_2_before_any_work(key, blocked, tmp_path, tiny_overrides,
                                                                       monkeypatch, capsys):
    for module in blocked:  # what `import` meets when the package is not installed
        monkeypatch.setitem(sys.modules, module, None)
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides, f"output_dir={run}", f"{key}=true", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{key}=true needs the" in err and "pip install 'egrpo[" in err and f"{key}=false" in err
    assert not run.exists()


@pytest.mark.parametrize("override,named", [
    ("logging.wandb_mode=disabled", "logging.wandb_mode"),
    ("logging.wandb_project=' '", "logging.wandb_project"),
    ("logging.tensorbord=true", "Did you mean 'logging.tensorboard'"),
    ("logging.tensorboard=maybe", "logging.tensorboard"),
])
def test_a_wrong_logging_value_is_refused(override, named, capsys):
    assert main(["plan", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


def test_resume_may_turn_the_dashboards_on_but_not_change_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg.load("embedded").dump(run / "config.yaml")
    watched = cfg.load("embedded", ["logging.tensorboard=true", "logging.wandb=true", "logging.wandb_mode=offline"])
    assert resume_changes(watched, run) == {"logging.tensorboard": [False, True], "logging.wandb": [False, True],
                                            "logging.wandb_mode": ["online", "offline"]}
    with pytest.raises(cfg.ConfigError, match="cannot change train.lr"):
        resume_changes(cfg.load("embedded", ["logging.tensorboard=true", "train.lr=0.5"]), run)


def test_image_grid_puts_a_prompt_per_row_and_a_seed_per_column():
    images = torch.stack([torch.full((1, 2, 2), v) for v in (0.0, 0.25, 0.75, 1.0, 0.5, 0.5)])  # 3 prompts x 2
    grid = image_grid(images, columns=2, rows=2)
    assert grid.shape == (8, 8, 3) and grid.dtype == torch.uint8
    tiles = [[grid[r * 4 + 1 : r * 4 + 3, c * 4 + 1 : c * 4 + 3] for c in range(2)] for r in range(2)]
    assert [[int(t.unique()) for t in row] for row in tiles] == [[0, 64], [191, 255]]
    assert int(grid[0, 0, 0]) == 128  # the border between tiles
    large = image_grid(torch.rand(2, 3, 720, 512), columns=1)
    assert large.shape == (2 * 258, 184, 3)
