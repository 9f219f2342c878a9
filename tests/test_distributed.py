"""Data-parallel training with torchrun on CPU (gloo): DDP matches one process; FSDP2 never holds the whole
model, uses collectives the CUDA process group can take, and resumes from sharded checkpoints bit for bit."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from egrpo import config as cfg
from egrpo.checkpoint import is_sharded, load_weights
from egrpo.distributed import CUDA_BACKEND, backend_devices, process_group_backend
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
    alone = Trainer(single, progress=False).train()

    _torchrun([*_common(eval_prompt_file, 2), f"output_dir={tmp_path / 'ddp'}"], tmp_path)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["rank_weight_checksums"][0] == summary["rank_weight_checksums"][1]
    # Each rank sampled half of the held-out set; combined, the metrics are the one-process ones.
    assert summary["base"] == pytest.approx(alone["base"], rel=1e-5)

    a = load_file(str(tmp_path / "single" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    assert any(not torch.equal(a[k], DigitsPolicy().model.state_dict()[k]) for k in a)
    same = all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert same, "2 ranks x 2 prompts differ from 1 process x 4 prompts"
    # Only rank 0 wrote metrics: one line per iteration.
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2


def _fsdp_args(run, eval_prompt_file, iterations):
    return [*_common(eval_prompt_file, 2), f"output_dir={run}", "train.distributed=fsdp",
            f"train.iterations={iterations}", "checkpoint_every=2"]


def _worker(args, tmp_path, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(Path(__file__).parent / "fsdp_worker.py"), *args]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_cuda_process_group_takes_every_collective_the_trainer_makes(tmp_path, eval_prompt_file):
    """On GPUs NCCL alone has no CPU path: the CUDA backend string must cover the device of every tensor egrpo
    hands a collective (here the CPU: metrics, flags, checksums), and FSDP's own tensors (the model's device)."""
    assert backend_devices(process_group_backend(cuda=True)) >= {"cpu", "cuda"}
    assert backend_devices("nccl") == {"cuda"}  # what the check below would reject
    run = tmp_path / "fsdp"
    _worker(["--record", str(tmp_path / "probe"), "train", *_fsdp_args(run, eval_prompt_file, 2), "--no-progress"],
            tmp_path)
    for rank in range(2):
        report = json.loads((tmp_path / f"probe.{rank}.json").read_text())
        ops = {c["op"] for c in report["collectives"]}
        assert {"all_reduce", "broadcast_object_list", "gather_object", "barrier"} <= ops
        for call in report["collectives"]:
            assert set(call["devices"]) <= backend_devices(CUDA_BACKEND), call
        # No rank held the unsharded model: it was built on meta and each rank filled only its rows.
        assert report["meta_before_fill"]
        assert report["local_elements"] <= report["model_elements"] / 2 + 4096


def test_fsdp2_sharded_checkpoint_survives_a_kill_and_resumes_bit_for_bit(tmp_path, eval_prompt_file):
    straight = tmp_path / "straight"
    _worker(["train", *_fsdp_args(straight, eval_prompt_file, 4), "--no-progress"], tmp_path)
    latest = straight / "checkpoints" / (straight / "checkpoints" / "latest").read_text()
    assert latest.name == "iter-000004" and is_sharded(latest)
    shard_files = sorted(p.name for p in latest.glob("*.distcp"))
    assert len(shard_files) == 2, shard_files  # each rank wrote its own shards

    # Killed after both ranks wrote checkpoint 4's shards, before it was published: checkpoint 2 stays whole.
    killed = tmp_path / "killed"
    result = _worker(["--die-at-save", "4", "train", *_fsdp_args(killed, eval_prompt_file, 4), "--no-progress"],
                     tmp_path, check=False)
    assert result.returncode != 0
    assert (killed / "checkpoints" / "latest").read_text() == "iter-000002"
    assert (killed / "checkpoints" / ".iter-000004.tmp").is_dir() and not (killed / "model.safetensors").exists()
    _worker(["train", "--resume", str(killed), "--no-progress"], tmp_path)

    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume is not bit-identical"

    # The streamed export loads in one process, and the checksum from shards matches it without a gather.
    policy = DigitsPolicy()
    load_weights(straight / "model.safetensors", policy.model, policy.arch_config())
    summary = json.loads((straight / "summary.json").read_text())
    total = sum(float(v.double().sum()) for v in a.values())
    assert summary["weight_checksum"] == pytest.approx(total, rel=1e-12)
    assert sum(summary["rank_weight_checksums"]) == pytest.approx(total, rel=1e-12)
    # A sharded checkpoint reads whole into one process too (egrpo eval / sample on a stopped run).
    load_weights(latest, policy.model, policy.arch_config())
    assert all(torch.equal(policy.model.state_dict()[k], a[k]) for k in a)


def test_lora_under_fsdp_trains_as_one_process_does(tmp_path):
    """A tiny FLUX pipeline with LoRA: 2 FSDP ranks (the frozen base built on meta, each rank reading its rows of the
    base files and starting its rows of the adapters) train the same adapters as one process with both prompts; a
    sharded run stopped and resumed equals the straight one bit for bit, and exports diffusers' LoRA file."""
    from test_flux_sd3 import save_tiny_flux, write_config

    from egrpo.cli import main

    root = tmp_path / "flux"
    save_tiny_flux(root / "pipeline")
    config = write_config(root, "flux")
    assert main(["preprocess", str(config), "--prompts", str(root / "train.txt"), "--prompts",
                 str(root / "eval.txt"), "--no-progress"]) == 0
    common = ["model.lora_rank=4", "model.lora_alpha=8", "train.iterations=2", "train.group_size=2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank: the same arithmetic, bit for bit
    try:
        Trainer(cfg.load(str(config), [*common, "train.prompts_per_iteration=2", f"output_dir={tmp_path / 'one'}"]),
                progress=False).train()
    finally:
        torch.set_num_threads(threads)
    sharded_args = [str(config), *common, "train.prompts_per_iteration=1", "train.distributed=fsdp"]
    _torchrun([*sharded_args, f"output_dir={tmp_path / 'fsdp'}"], tmp_path)
    _torchrun([*sharded_args, "train.iterations=1", "checkpoint_every=1", f"output_dir={tmp_path / 'resumed'}"],
              tmp_path)
    assert is_sharded(tmp_path / "resumed" / "checkpoints" / "iter-000001")
    _torchrun(["--resume", str(tmp_path / "resumed"), "train.iterations=2"], tmp_path)

    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    sharded = load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    assert set(one) == set(sharded) and all(".lora_" in name for name in one)
    assert any(name.endswith("lora_B.default.weight") and one[name].abs().max() > 0 for name in one)  # trained
    for name in one:
        assert torch.allclose(one[name], sharded[name], atol=1e-5), name
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(resumed[name], sharded[name]) for name in sharded)
    assert main(["export", str(tmp_path / "resumed"), "--out", str(tmp_path / "export")]) == 0
    assert len(load_file(str(tmp_path / "export" / "pytorch_lora_weights.safetensors"))) == len(sharded)
