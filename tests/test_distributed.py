"""Data-parallel training with torchrun on CPU (gloo): DDP matches one process, FSDP2 saves loadable weights."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from egrpo import config as cfg
from egrpo.checkpoint import load_weights
from egrpo.embedded.model import DigitsPolicy
from egrpo.trainer import Trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "egrpo", "train", *args, "--no-progress"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _common(eval_prompt_file, prompts):
    return ["train.group_size=3", "plan.active_steps=first:3", "eval.seeds_per_prompt=1", "train.iterations=2",
            f"prompts.eval={eval_prompt_file}", f"train.prompts_per_iteration={prompts}"]


def test_ddp_keeps_ranks_identical_and_matches_one_process(tmp_path, eval_prompt_file):
    single = cfg.load("embedded", [*_common(eval_prompt_file, 4), f"output_dir={tmp_path / 'single'}"])
    Trainer(single, progress=False).train()

    _torchrun([*_common(eval_prompt_file, 2), f"output_dir={tmp_path / 'ddp'}"], tmp_path)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["rank_weight_checksums"][0] == summary["rank_weight_checksums"][1]

    a = load_file(str(tmp_path / "single" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    assert any(not torch.equal(a[k], DigitsPolicy().model.state_dict()[k]) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), "2 ranks x 2 prompts differ from 1 process x 4 prompts"
    # Only rank 0 wrote metrics: one line per iteration.
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2


def test_fsdp2_trains_and_saves_a_loadable_checkpoint(tmp_path, eval_prompt_file):
    run = tmp_path / "fsdp"
    _torchrun([*_common(eval_prompt_file, 2), f"output_dir={run}", "train.distributed=fsdp"], tmp_path)
    policy = DigitsPolicy()
    load_weights(run / "model.safetensors", policy.model, policy.arch_config())
    latest = (run / "checkpoints" / "latest").read_text()
    assert latest == "iter-000002"
    optimizer = load_file(str(run / "checkpoints" / latest / "optimizer.safetensors"))
    assert any(key.endswith("/exp_avg") for key in optimizer)
    summary = json.loads((run / "summary.json").read_text())
    assert len(set(summary["rank_weight_checksums"])) == 1
