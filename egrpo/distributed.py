"""Data-parallel training through torch.distributed: DDP, or FSDP2 (``fully_shard``) for models that do
not fit on one device. Launched by torchrun; a single process is the world of size 1.

Every rank rolls out its own prompts (a prompt's group never leaves its rank), gradients are averaged
across ranks, metrics are reduced, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from egrpo.checkpoint import trainable_state


@dataclass
class World:
    size: int = 1
    rank: int = 0
    mode: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, mode: str) -> "World":
        """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR ...)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
        return cls(size=dist.get_world_size(), rank=dist.get_rank(), mode=mode)

    # ---- model ------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the policy should call: DDP's wrapper, or the model sharded in place by FSDP2."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
            return DistributedDataParallel(model, device_ids=device_ids)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # Shard each transformer block on its own, so only one block is gathered at a time.
            for name in ("transformer_blocks", "single_transformer_blocks"):
                for block in getattr(model, name, []):
                    fully_shard(block)
            fully_shard(model)
        return model

    def no_sync(self, wrapped: nn.Module, last_chunk: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
        if self.mode == "ddp" and not last_chunk:
            return wrapped.no_sync()
        if self.mode == "fsdp":
            wrapped.set_requires_gradient_sync(last_chunk)
        return contextlib.nullcontext()

    # ---- state --------------------------------------------------------------------------------------
    def model_tensors(self, model: nn.Module, on_every_rank: bool = False) -> dict[str, torch.Tensor]:
        """Full (unsharded) trained tensors on the CPU. A collective under FSDP: call it on every rank;
        only rank 0 receives them unless ``on_every_rank``."""
        if self.mode != "fsdp":
            return {k: v.detach().cpu() for k, v in trainable_state(model).items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=not on_every_rank)
        full = get_model_state_dict(model, options=options)
        return {k: full[k].cpu() for k in trainable_state(model) if k in full}

    def load_model_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        if self.mode != "fsdp":
            params = trainable_state(model)
            with torch.no_grad():
                for name, value in tensors.items():
                    params[name].copy_(value)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        if self.mode != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if self.mode != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    # ---- collectives --------------------------------------------------------------------------------
    def mean(self, metrics: dict) -> dict:
        """Average every float metric over ranks (a no-op in one process); counts stay per rank."""
        if self.size == 1:
            return metrics
        keys = [k for k, v in metrics.items() if isinstance(v, float)]
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        return {**metrics, **{k: (values[i] / self.size).item() for i, k in enumerate(keys)}}

    def checksums(self, model: nn.Module) -> list[float]:
        """Every rank's sum of its full trained weights (a collective): equal when the ranks are in sync."""
        total = sum(float(v.double().sum()) for v in self.model_tensors(model, on_every_rank=True).values())
        if self.size == 1:
            return [total]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, total)
        return gathered

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

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def shutdown(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
