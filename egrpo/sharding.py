"""An FSDP2 model that no rank ever holds whole: filled from safetensors files by each rank's own rows,
summed from its own shards, and exported one gathered tensor at a time.

``fully_shard`` splits every parameter along dim 0 into one contiguous run of rows per rank (a DTensor with
placement ``Shard(0)``). A model built on the meta device and sharded there costs no memory; each rank then
allocates its shards (``to_empty``) and reads exactly those rows from the weight files through safetensors'
sliced reads, so a 12B-parameter FLUX.1-dev loads at 1/world of its size per rank, host and GPU alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from egrpo.checkpoint import SAFETENSORS_DTYPES, CheckpointError, check_arch, saved_arch, trainable_state


def reshard(model: nn.Module) -> None:
    """Return every FSDP unit to its sharded parameters: after a forward pass the root unit keeps its
    gathered ones (FSDP2 expects the backward next), and only sharded parameters have rows to sum or gather."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def local_rows(tensor: torch.Tensor) -> tuple[int, int]:
    """(start, stop) of the dim-0 rows of the global tensor that this rank holds."""
    if not hasattr(tensor, "device_mesh"):
        return 0, tensor.shape[0] if tensor.dim() else 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if any(offset[1:]) or tuple(shape[1:]) != tuple(tensor.shape[1:]):
        raise ValueError(f"only dim-0 sharding is supported, got placements {tensor.placements}")
    return offset[0] if shape[0] else 0, offset[0] + shape[0] if shape[0] else 0


def stored_name(name: str) -> str:
    """The name a weight file gives the tensor ``name`` of a model that peft wrapped with LoRA adapters (peft's
    ``base_model.model.X.base_layer.weight`` is the file's ``X.weight``); other names are their own."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def fill_from_safetensors(
    model: nn.Module,
    files: list[Path],
    device: torch.device,
    fresh: Callable[[str, torch.Size], torch.Tensor | None] | None = None,
) -> None:
    """Allocate ``model``'s (sharded, meta) tensors on ``device`` and read each rank's rows from ``files``.

    A tensor named in several files is read from the last one, so a fine-tuned checkpoint listed after the
    base weights overrides them. Every parameter and buffer must be found with its exact shape, but buffers a
    model computes itself and never saves (non-persistent: Wan's RoPE tables), which keep the values they were
    built with, off the meta device, and tensors no file holds for which ``fresh(name, shape)`` gives a starting
    value (LoRA adapters over a base model's files; each rank takes its rows of it).
    """
    computed = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules() for name in module._non_persistent_buffers_set
    }
    kept = {name: b.detach().clone() for name, b in model.named_buffers() if name in computed}
    unbuilt = sorted(name for name, b in kept.items() if b.is_meta)
    if unbuilt:
        raise ValueError(f"{unbuilt[:3]} are computed, not saved, and were built on the meta device: build them first")
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in kept:
                buffer.copy_(kept[name])
    targets = dict(model.named_parameters())
    targets.update((name, b) for name, b in model.named_buffers() if name not in computed)
    # A base model's files name a LoRA-wrapped model's base weights their own way; a fine-tuned run's file names
    # its tensors as the model does.
    by_key = {**{stored_name(name): name for name in targets}, **{name: name for name in targets}}
    owner: dict[str, tuple[Path, str]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                owner.update({by_key[key]: (Path(file), key) for key in f.keys() if key in by_key})
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
    started = {}
    for name in set(targets) - set(owner):
        value = fresh(name, targets[name].shape) if fresh is not None else None
        if value is not None:
            started[name] = value
    missing = sorted(set(targets) - set(owner) - set(started))
    if missing:
        raise CheckpointError(
            f"{len(missing)} of the model's {len(targets)} tensors are in none of {[str(f) for f in files]}, "
            f"e.g. {missing[:3]}: the weights belong to another architecture"
        )
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, key) in owner.items():
        by_file.setdefault(file, []).append((name, key))
    with torch.no_grad():
        for name, value in started.items():
            start, stop = local_rows(targets[name])
            local_part(targets[name]).copy_(value[start:stop])
        for file, names in by_file.items():
            # pread, not a memory map: mapped pages a rank touched would stay resident while the file is open.
            with safe_open(str(file), framework="pt", backend="pread") as f:
                for name, key in names:
                    target = targets[name]
                    rows = f.get_slice(key)
                    if tuple(rows.get_shape()) != tuple(target.shape):
                        raise CheckpointError(
                            f"{file}: {name} has shape {tuple(rows.get_shape())}, "
                            f"the model expects {tuple(target.shape)}"
                        )
                    start, stop = local_rows(target)
                    if stop > start:
                        local_part(target).copy_(rows[start:stop])
                    elif target.dim() == 0:
                        local_part(target).copy_(f.get_tensor(key))


def check_weights_header(path: Path, module: nn.Module, arch: dict) -> None:
    """:func:`egrpo.checkpoint.read_weights`'s checks from the file's header alone (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    check_arch(saved_arch(meta, path), arch, path)
    expected = {name: tuple(p.shape) for name, p in trainable_state(module).items()}
    wrong = sorted(k for k in expected if shapes.get(k) != expected[k])
    if wrong or set(shapes) - set(expected):
        raise CheckpointError(
            f"{path} does not fit this model: {len(wrong)} tensors missing or of other shapes {wrong[:3]}, "
            f"{len(set(shapes) - set(expected))} unexpected"
        )


def shard_sums(model: nn.Module) -> torch.Tensor:
    """Sum of this rank's own part of every trained tensor, in float64 on the parameters' device."""
    reshard(model)
    parts = [local_part(p).detach().double().sum() for p in trainable_state(model).values()]
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64)


def shard_square_sum(model: nn.Module) -> torch.Tensor:
    """Sum of squares of this rank's own part of every trained tensor, in float64 on the parameters' device."""
    reshard(model)
    parts = [local_part(p).detach().double().square().sum() for p in trainable_state(model).values()]
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64)


def write_safetensors_stream(
    path: Path,
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
    tensor: Callable[[str], torch.Tensor | None],
    metadata: dict[str, str],
) -> None:
    """Write a safetensors file tensor by tensor: ``tensor(name)`` is asked for each name of ``layout`` in
    order and only one is held at a time; None means another process writes (every process must still
    call, since ``tensor`` may be a collective). Atomic: written to a temporary file, then renamed."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, (shape, dtype) in layout.items():
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]
        }
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    out = None
    try:
        for name, (shape, dtype) in layout.items():
            value = tensor(name)
            if value is None:
                continue
            if out is None:
                out = open(tmp, "wb")
                out.write(len(blob).to_bytes(8, "little"))
                out.write(blob)
            value = value.detach().to("cpu", dtype).contiguous()
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"{name}: got shape {tuple(value.shape)}, the layout says {tuple(shape)}")
            out.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            out = None
            os.replace(tmp, path)
    finally:
        if out is not None:
            out.close()
            tmp.unlink(missing_ok=True)


def export_trained_weights(model: nn.Module, path: Path, arch: dict, is_main: bool) -> None:
    """The trained tensors as one safetensors file on rank 0 (a collective: every rank calls). Each tensor
    is gathered from its shards on its own, so no rank ever holds more than one full tensor."""
    reshard(model)
    params = trainable_state(model)
    layout = {name: (tuple(p.shape), p.dtype) for name, p in params.items()}

    def gathered(name: str) -> torch.Tensor | None:
        p = params[name]
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        return full if is_main else None

    write_safetensors_stream(path, layout, gathered, {"arch": json.dumps(arch, sort_keys=True)})
