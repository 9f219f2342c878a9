"""Data-parallel training through torch.distributed: DDP, or FSDP2 (``fully_shard``) for models that do
not fit on one device. Launched by torchrun; a single process is the world of size 1.

Every rank rolls out its own prompts (a prompt's group never leaves its rank), gradients are averaged
across ranks, metrics are reduced, and only rank 0 writes files.

Backends: the trainer's own collectives (metrics, stop flags, checksums, objects) reduce small CPU
tensors, and NCCL has no CPU path; so on GPUs the process group carries both, gloo for CPU tensors and
NCCL for CUDA ones (``CUDA_BACKEND``), while FSDP's gathers of model shards stay on NCCL.

Under FSDP nothing ever holds the whole model: the trainer builds it on the meta device, shards it,
and each rank reads only its rows of the weights (:mod:`egrpo.sharding`); checkpoints are DCP shards
written and read by every rank; the final ``model.safetensors`` is streamed one gathered tensor at a time.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from egrpo.checkpoint import trainable_state

CUDA_BACKEND = "cpu:gloo,cuda:nccl"
CPU_BACKEND = "gloo"


def process_group_backend(cuda: bool) -> str:
    """The backend string ``init_process_group`` gets: CPU and CUDA collectives alike on GPU machines."""
    return CUDA_BACKEND if cuda else CPU_BACKEND


def backend_devices(backend: str) -> set[str]:
    """Device types whose tensors a process group of ``backend`` can reduce (torch's own parsing)."""
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    return set(BackendConfig(Backend(backend)).get_device_backend_map())


@dataclass
class World:
    size: int = 1
    rank: int = 0
    mode: str = "none"  # none | ddp | fsdp
    backend: str = CPU_BACKEND

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, mode: str) -> "World":
        """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR ...)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        cuda = torch.cuda.is_available()
        backend = process_group_backend(cuda)
        if not dist.is_initialized():
            if cuda:
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
                dist.init_process_group(backend, device_id=device)
            else:
                dist.init_process_group(backend)
        return cls(size=dist.get_world_size(), rank=dist.get_rank(), mode=mode, backend=backend)

    # ---- model ------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
        """The module the policy should call: DDP's wrapper, or the model sharded in place by FSDP2.

        ``param_dtype`` (FSDP): the dtype blocks are gathered and computed in (bf16 halves the traffic and
        the memory of a gathered block); sharded master weights and the gradient reduction stay fp32."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
            return DistributedDataParallel(model, device_ids=device_ids)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
            # Shard each transformer block on its own, so only one block is gathered at a time.
            for block in transformer_blocks(model):
                fully_shard(block, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
        return model

    def no_sync(self, wrapped: nn.Module, last_chunk: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
        if self.mode == "ddp" and not last_chunk:
            return wrapped.no_sync()
        if self.mode == "fsdp":
            wrapped.set_requires_gradient_sync(last_chunk)
        return contextlib.nullcontext()

    # ---- state --------------------------------------------------------------------------------------
    def sharded_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The trained tensors and the optimizer state as this rank's shards (FSDP), for DCP; no gather."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        trained = trainable_state(model)
        tensors = {k: v for k, v in get_model_state_dict(model).items() if k in trained}
        _create_adamw_state(optimizer)
        return {"model": tensors, "optimizer": get_optimizer_state_dict(model, optimizer)}

    def load_sharded_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, shards: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(model, shards["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(model, optimizer, shards["optimizer"])

    # ---- collectives --------------------------------------------------------------------------------
    def mean(self, metrics: dict) -> dict:
        """Average every float metric over ranks (a no-op in one process); counts stay per rank."""
        if self.size == 1:
            return metrics
        keys = [k for k, v in metrics.items() if isinstance(v, float)]
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)  # CPU: gloo's half of the group
        dist.all_reduce(values)
        return {**metrics, **{k: (values[i] / self.size).item() for i, k in enumerate(keys)}}

    def checksums(self, model: nn.Module) -> tuple[float, list[float]]:
        """(sum of every trained weight, each rank's own sum), a collective with no gather of weights.

        Under FSDP a rank sums its shards and the total is their all-reduced sum; under DDP every rank
        sums its full replica, and the ranks' sums are equal when they are in sync."""
        from egrpo.sharding import shard_sums

        own = shard_sums(model)
        if self.size == 1:
            return float(own), [float(own)]
        per_rank = [None] * self.size
        dist.all_gather_object(per_rank, float(own))
        if self.mode != "fsdp":
            return per_rank[0], per_rank
        total = own.clone()
        dist.all_reduce(total)
        return float(total), per_rank

    def weight_norm(self, model: nn.Module) -> float:
        """L2 norm of every trained weight: a collective under FSDP (the shards' squares are all-reduced), with
        no gather of weights; under DDP each rank's replica gives it alone."""
        from egrpo.sharding import shard_square_sum

        squares = shard_square_sum(model)
        if self.size > 1 and self.mode == "fsdp":
            squares = squares.clone()
            dist.all_reduce(squares)
        return math.sqrt(float(squares))

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (e.g. a Ctrl-C that reached one rank first)."""
        if self.size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, obj):
        """Rank 0's value of ``obj`` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere); pickled through gloo on the CPU."""
        if self.size == 1:
            return [obj]
        box = [None] * self.size if self.is_main else None
        dist.gather_object(obj, box, dst=0)
        return box

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def shutdown(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The FLUX / SD3 / Qwen-Image / Wan blocks, each its own FSDP unit; found under a LoRA (peft) wrapper too."""
    names = ("transformer_blocks", "single_transformer_blocks", "blocks")
    return [block for name, module in model.named_modules() if name.split(".")[-1] in names for block in module]


def _create_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's state as its first step would create it (zero moments, step 0), for DCP to load into.

    Before a step the state is empty, and torch's state-dict helper then creates it by running a step on
    zero gradients: a full set of gradient shards allocated on top of everything else at resume. AdamW's
    state is known, so it is created directly."""
    if not isinstance(optimizer, torch.optim.AdamW) or optimizer.state:
        return
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("capturable") or group.get("fused"):
            return  # other layouts: leave it to torch's helper
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {
                "step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
