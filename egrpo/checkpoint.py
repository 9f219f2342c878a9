"""Atomic checkpoints: model and optimizer in safetensors (one process, DDP) or as
``torch.distributed.checkpoint`` shards that each FSDP rank writes and reads by itself; trainer state in JSON.

A checkpoint is written into a temporary directory and renamed into place, then the ``latest``
pointer is replaced atomically: a crash or Ctrl-C at any moment leaves the previous checkpoint whole.
This module knows nothing about the model: it stores the state dicts it is handed.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}
"""torch dtype -> its name in a safetensors header (for files written by hand, tensor by tensor)."""


class CheckpointError(RuntimeError):
    pass


def read_json(path: Path, what: str):
    """A JSON file the run wrote; a damaged one is a CheckpointError that names it, not a traceback."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: the {what} cannot be read ({exc}); the file is damaged or missing") from None


def saved_arch(meta: dict, path: Path) -> dict | None:
    """The architecture stored in a weights file's metadata (None when it has none)."""
    if "arch" not in meta:
        return None
    try:
        return json.loads(meta["arch"])
    except ValueError:
        raise CheckpointError(f"{path}: its 'arch' metadata is not JSON; it was not written by egrpo") from None


def check_arch(saved: dict | None, arch: dict, path: Path) -> None:
    """Refuse weights saved for another architecture than ``arch`` (None: the file records none)."""
    if saved is None or saved == json.loads(json.dumps(arch)):
        return
    diff = {k: (saved.get(k), arch.get(k)) for k in set(saved) | set(arch) if saved.get(k) != arch.get(k)}
    raise CheckpointError(
        f"{path} was saved for another architecture; differing fields (checkpoint, config): {diff}. "
        "Use a checkpoint of this model, or set the model config to match it."
    )


def fsync(path: Path) -> None:
    """Flush a file's, or a directory's entries', data to disk: a rename is durable only once its directory is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors: every parameter with requires_grad (all of them in full fine-tuning, the
    adapters under LoRA, so a LoRA checkpoint of a 12B model stays small)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def save_weights(path: Path, tensors: dict[str, torch.Tensor], arch: dict) -> None:
    """Trained weights (see :func:`trainable_state`) with the architecture in the metadata, written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"arch": json.dumps(arch, sort_keys=True)})
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)


def read_weights(path: Path, module: torch.nn.Module, arch: dict) -> dict[str, torch.Tensor]:
    """Tensors saved by :func:`save_weights` (or the model of a sharded checkpoint directory, read whole in
    this process), checked against ``module``: another architecture is refused."""
    path = Path(path)
    if path.is_dir() and is_sharded(path):
        tensors = {k: torch.empty_like(v, device="cpu") for k, v in trainable_state(module).items()}
        load_sharded_checkpoint(path, {"model": tensors}, arch, whole=True)
        return tensors
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    check_arch(saved_arch(meta, path), arch, path)
    nonfinite = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if nonfinite:
        raise CheckpointError(
            f"{path}: {len(nonfinite)} tensors hold NaN or inf values (e.g. {nonfinite[0]}); these weights come "
            "from a diverged run: use an earlier checkpoint"
        )
    expected = trainable_state(module)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path} does not fit this model's architecture: {len(missing)} missing tensors {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} with other shapes {shapes[:3]}"
        )
    return tensors


def load_weights(path: Path, module: torch.nn.Module, arch: dict) -> None:
    """Copy weights saved by :func:`save_weights` into ``module`` (one process, unsharded)."""
    params = trainable_state(module)
    with torch.no_grad():
        for name, value in read_weights(path, module, arch).items():
            params[name].copy_(value)


_SLOT = "/"  # parameter keys may be indices or dotted names; "/" separates them from the state slot


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {}
    for key, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"{key}{_SLOT}{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
    return tensors, {"param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: dict) -> dict:
    state: dict = {}
    for flat, value in tensors.items():
        key, name = flat.rsplit(_SLOT, 1)
        state.setdefault(int(key) if key.isdigit() else key, {})[name] = value
    return {"state": state, "param_groups": groups["param_groups"]}


def _paths(run_dir: Path, iteration: int) -> tuple[Path, Path, Path]:
    root = Path(run_dir) / "checkpoints"
    return root, root / f"iter-{iteration:06d}", root / f".iter-{iteration:06d}.tmp"


def _publish(root: Path, tmp: Path, final: Path) -> Path:
    """Rename the finished temporary directory into place, point ``latest`` at it, drop older checkpoints.
    Everything is on disk before the old checkpoint goes: a power loss, not only a kill, leaves one whole."""
    for file in tmp.iterdir():
        fsync(file)
    fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync(root)
    atomic_write_text(root / "latest", final.name)
    for old in root.glob("iter-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(
    run_dir: Path, iteration: int, tensors: dict[str, torch.Tensor], arch: dict, optimizer_state: dict, state: dict
) -> Path:
    root, final, tmp = _paths(run_dir, iteration)
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(tmp / "model.safetensors", tensors, arch)
    opt_tensors, groups = _flatten_optimizer(optimizer_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration, "optimizer": groups, **state}))
    return _publish(root, tmp, final)


SHARDED_FORMAT = "dcp"


def save_sharded_checkpoint(
    run_dir: Path, iteration: int, shards: dict, arch: dict, state: dict, is_main: bool, barrier
) -> Path:
    """Every rank writes its own shards of ``shards`` ({"model": ..., "optimizer": ...}, sharded state dicts)
    with DCP; a collective. Rank 0 then adds the trainer state and publishes the directory."""
    import torch.distributed.checkpoint as dcp

    root, final, tmp = _paths(run_dir, iteration)
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    dcp.save(shards, checkpoint_id=str(tmp))
    barrier()
    if is_main:
        meta = {"iteration": iteration, "format": SHARDED_FORMAT, "arch": arch, **state}
        (tmp / "state.json").write_text(json.dumps(meta))
        _publish(root, tmp, final)
    barrier()
    return final


def is_sharded(path: Path) -> bool:
    return (Path(path) / ".metadata").is_file()


def load_sharded_checkpoint(path: Path, shards: dict, arch: dict, whole: bool = False) -> dict:
    """Read a sharded checkpoint into ``shards`` in place (each rank its own parts; any world size, since DCP
    reshards); returns the trainer state. Checked against ``arch`` before any tensor is read. ``whole``: this
    process reads full tensors by itself, with no collective (one process, or every DDP rank alike)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    state = read_json(path / "state.json", "checkpoint's trainer state")
    check_arch(state.pop("arch", None), arch, path)
    try:
        with warnings.catch_warnings():
            # DCP warns that it assumes one process when no process group is up, which is what whole means.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(shards, checkpoint_id=str(path), no_dist=whole)
    except Exception as exc:  # DCP wraps every reader failure (missing key, shape) in its own types
        raise CheckpointError(f"{path}: the sharded checkpoint does not fit this model and optimizer ({exc})") from None
    state.pop("format", None)
    return state


class RunLock:
    """An advisory lock on a run directory for the life of the process that trains in it, so a second
    ``egrpo train`` (or ``--resume``) of the same directory is refused instead of interleaving writes."""

    def __init__(self, run_dir: Path):
        import fcntl

        self.path = Path(run_dir) / "lock"
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise CheckpointError(
                f"{run_dir} is in use by {holder} (lock {self.path}); wait for that run to end or stop it, "
                "or pick another output_dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"process {os.getpid()}")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing drops the flock


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, module: torch.nn.Module, arch: dict) -> tuple[dict, dict, dict]:
    """(model tensors, optimizer state dict, trainer state) of a checkpoint directory, checked against ``module``."""
    state = read_json(path / "state.json", "checkpoint's trainer state")
    tensors = read_weights(path / "model.safetensors", module, arch)
    optimizer = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
    return tensors, optimizer, state
