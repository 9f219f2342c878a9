"""Text embeddings computed once: ``egrpo preprocess`` runs a pipeline's text encoders over prompt files and
writes them to a safetensors file; the FLUX / SD3 / Wan policies read that file and never load a text encoder.

One safetensors file; row k of each ``text`` / ``pooled`` tensor belongs to prompt k of the ``prompts`` list
in the metadata:

=================  =========  ===========================  ===========================  =====================
tensor             shape      FLUX                         SD3 / SD3.5                  Wan 2.1 / 2.2
=================  =========  ===========================  ===========================  =====================
``text``           (N, L, D)  T5 sequence                  CLIP-L | CLIP-G, then T5     umT5 sequence
``pooled``         (N, P)     CLIP-L pooled                CLIP-L | CLIP-G pooled       none: P = 0
``uncond_text``    (1, L, D)  --                           the empty prompt (for CFG)   model.negative_prompt
``uncond_pooled``  (1, P)     --                           the empty prompt             none: P = 0
=================  =========  ===========================  ===========================  =====================

A Wan cache records its negative prompt in the metadata (``negative_prompt``), so a run whose
``model.negative_prompt`` differs from the one encoded is refused instead of guided by the wrong text.

A FLUX row is 4 MB in bf16 (512 x 4096), so a cache of tens of thousands of training prompts runs to
hundreds of GB: the file is written batch by batch into a memory map and read through one, never whole.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from egrpo.checkpoint import SAFETENSORS_DTYPES
from egrpo.config import ModelConfig
from egrpo.devices import resolve_device
from egrpo.errors import ConfigError
from egrpo.policy import Cond

KINDS = ("flux", "sd3", "wan")
DEFAULT_MAX_SEQUENCE_LENGTH = {"flux": 512, "sd3": 256, "wan": 512}  # Wan: WanPipeline.__call__'s default
ENCODE_BATCH = 8
_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}

Encoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def compute_dtype(model: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype networks compute in: ``model.dtype`` on a GPU, fp32 on the CPU (bf16 matmuls are slow there)."""
    choices = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    if model.dtype not in choices:
        raise ConfigError(f"model.dtype must be 'bfloat16' or 'float32', got {model.dtype!r}")
    return choices[model.dtype] if device.type == "cuda" else torch.float32


def max_sequence_length(model: ModelConfig) -> int:
    length = model.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[model.kind]
    if length < 1:
        raise ConfigError(f"model.max_sequence_length must be >= 1, got {length}")
    return length


def load_error(model: ModelConfig, what: str, exc: Exception) -> ConfigError:
    """A pipeline part that would not load; on an offline machine a missing download is the usual cause."""
    hint = ""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        hint = (
            f"; the hub is offline (HF_HUB_OFFLINE=1): download the model first "
            f"(huggingface-cli download {model.pretrained}) or run with HF_HUB_OFFLINE=0"
        )
    return ConfigError(f"model.pretrained={model.pretrained!r}: cannot load the {what} ({exc}){hint}")


def load_text_encoder(model: ModelConfig) -> Encoder:
    """The pipeline's own ``encode_prompt`` with only its tokenizers and text encoders loaded."""
    device = resolve_device(model.device)
    dtype = compute_dtype(model, device)
    length = max_sequence_length(model)
    if model.kind == "flux":
        from diffusers import FluxPipeline

        try:
            pipe = FluxPipeline.from_pretrained(model.pretrained, transformer=None, vae=None, torch_dtype=dtype)
        except OSError as exc:
            raise load_error(model, "FLUX text encoders", exc) from None
        pipe = pipe.to(device)

        def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            text, pooled, _ = pipe.encode_prompt(prompts, device=device, max_sequence_length=length)
            return text, pooled

        return encode
    if model.kind == "wan":
        return _wan_text_encoder(model, device, dtype, length)

    from diffusers import StableDiffusion3Pipeline

    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(model.pretrained, transformer=None, vae=None, torch_dtype=dtype)
    except OSError as exc:
        raise load_error(model, "SD3 text encoders", exc) from None
    pipe = pipe.to(device)

    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        text, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=False, max_sequence_length=length
        )
        return text, pooled

    return encode


def _wan_text_encoder(model: ModelConfig, device: torch.device, dtype: torch.dtype, length: int) -> Encoder:
    """WanPipeline's own ``encode_prompt`` (its prompt cleaning, umT5 padding and zeroed tail) over the tokenizer
    and the umT5 encoder alone. Wan's transformer takes no pooled embedding: the rows are 0 wide."""
    from diffusers import WanPipeline

    try:
        pipe = WanPipeline.from_pretrained(
            model.pretrained, transformer=None, transformer_2=None, vae=None, torch_dtype=dtype
        )
    except OSError as exc:
        raise load_error(model, "Wan umT5 text encoder", exc) from None
    pipe = pipe.to(device)

    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        text, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=length, device=device
        )
        return text, text.new_zeros(len(prompts), 0)

    return encode


def build_cache(model: ModelConfig, prompts: Sequence[str], out: Path, progress: bool = True) -> Path:
    """Encode every prompt (duplicates once) and write the cache to ``out`` atomically."""
    if model.kind not in KINDS:
        raise ConfigError(f"egrpo preprocess is for model.kind {' / '.join(KINDS)}; this config has {model.kind!r}")
    if not model.pretrained:
        raise ConfigError("model.pretrained is not set: name the diffusers pipeline (hub id or local folder)")
    prompts = list(dict.fromkeys(prompts))
    encode = load_text_encoder(model)
    with torch.no_grad():
        extra, metadata = {}, {}
        if model.kind in ("sd3", "wan"):
            # SD3 guides against the empty prompt as Flow-GRPO does; Wan against the configured negative prompt
            negative = model.negative_prompt if model.kind == "wan" else ""
            text, pooled = encode([negative])
            extra = {"uncond_text": text, "uncond_pooled": pooled}
            if model.kind == "wan":
                metadata["negative_prompt"] = negative
        starts = range(0, len(prompts), ENCODE_BATCH)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="text embeddings", unit="batch", dynamic_ncols=True)
        batches = (encode(prompts[s : s + ENCODE_BATCH]) for s in starts)
        write_cache(Path(out), model.kind, prompts, batches, extra, model.pretrained, metadata)
    return Path(out)


def write_cache(
    path: Path,
    kind: str,
    prompts: list[str],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    extra: dict[str, torch.Tensor] | None = None,
    pretrained: str = "",
    metadata: dict[str, str] | None = None,
) -> None:
    """Write (text, pooled) row batches of ``prompts`` in order, plus ``extra`` tensors and ``metadata`` strings,
    atomically.

    The file is laid out once the first batch gives the shapes, then filled through a memory map.
    """
    extra = extra or {}
    metadata = {**(metadata or {}), "kind": kind, "pretrained": str(pretrained), "prompts": json.dumps(prompts)}
    num_rows = len(prompts)
    batches = iter(batches)
    first = next(batches)
    dtype = first[0].dtype
    shapes = {"text": (num_rows, *first[0].shape[1:]), "pooled": (num_rows, *first[1].shape[1:])}
    shapes.update({name: tuple(t.shape) for name, t in extra.items()})
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, so every tensor can be viewed in place

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        f.truncate(8 + len(blob) + offset)
    _, tensors = _map(tmp, writable=True)
    row = 0
    for text, pooled in itertools.chain([first], batches):
        tensors["text"][row : row + len(text)] = text.to("cpu", dtype)
        tensors["pooled"][row : row + len(pooled)] = pooled.to("cpu", dtype)
        row += len(text)
    if row != num_rows:
        raise ValueError(f"the encoder returned {row} rows for {num_rows} prompts")
    for name, value in extra.items():
        tensors[name][:] = value.to("cpu", dtype)
    del tensors
    os.replace(tmp, path)


def _map(path: Path, writable: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header and tensors of a safetensors file, as views of one memory map (pages load when rows are read)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    size = path.stat().st_size
    storage = torch.from_file(str(path), shared=writable, size=size, dtype=torch.uint8)
    start = 8 + length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        tensors[name] = storage[start + begin : start + end].view(_TORCH_DTYPES[info["dtype"]]).view(info["shape"])
    return header, tensors


class EmbeddingCache:
    """Read side of the cache: rows by prompt, memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(
                f"model.embedding_cache: {self.path} does not exist; build it with: "
                f"egrpo preprocess CONFIG --out {self.path}"
            )
        try:
            header, self._tensors = _map(self.path)
            metadata = header["__metadata__"]
            self.kind = metadata["kind"]
            self.prompts: list[str] = json.loads(metadata["prompts"])
            self.metadata: dict[str, str] = metadata
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ConfigError(
                f"model.embedding_cache: {self.path} is not a cache written by egrpo preprocess ({exc})"
            ) from None
        self._row = {prompt: i for i, prompt in enumerate(self.prompts)}

    @property
    def text_shape(self) -> tuple[int, int]:
        """(tokens, width) of one prompt's sequence embedding."""
        return tuple(self._tensors["text"].shape[1:])

    @property
    def pooled_dim(self) -> int:
        return self._tensors["pooled"].shape[1]

    def missing(self, prompts: Sequence[str]) -> list[str]:
        return [p for p in dict.fromkeys(prompts) if p not in self._row]

    def lookup(self, prompts: Sequence[str]) -> Cond:
        """``text`` and ``pooled`` rows of ``prompts`` on the CPU; a contiguous run of rows stays a view of the map."""
        missing = self.missing(prompts)
        if missing:
            raise ConfigError(
                f"{len(missing)} prompt(s) are not in the embedding cache {self.path}, e.g. {missing[0]!r}; rebuild it "
                f"over all prompt files: egrpo preprocess CONFIG --prompts FILE [--prompts FILE ...] --out {self.path}"
            )
        rows = [self._row[p] for p in prompts]
        start = rows[0] if rows else 0
        if rows == list(range(start, start + len(rows))):
            return {name: self._tensors[name][start : start + len(rows)] for name in ("text", "pooled")}
        index = torch.tensor(rows)
        return {name: self._tensors[name][index] for name in ("text", "pooled")}

    def unconditional(self) -> Cond:
        """The unconditional branch's embeddings (SD3: the empty prompt; Wan: the negative prompt), batch size 1."""
        if "uncond_text" not in self._tensors:
            raise ConfigError(f"{self.path} holds no empty-prompt embedding; rebuild it with egrpo preprocess")
        return {"text": self._tensors["uncond_text"], "pooled": self._tensors["uncond_pooled"]}
