"""Text embeddings computed once: ``egrpo preprocess`` runs a pipeline's text encoders over prompt files and
writes them to a safetensors file; the FLUX / SD3 / Qwen-Image / Wan policies read that file and never load a text
encoder.

One safetensors file; row k of each row tensor (``text`` and ``pooled``, or ``text`` and ``text_mask``) belongs to
prompt k of the ``prompts`` list in the metadata:

====================  =========  =============  ==========================  ===================  =============
tensor                shape      FLUX           SD3 / SD3.5                 Qwen-Image           Wan 2.1 / 2.2
====================  =========  =============  ==========================  ===================  =============
``text``              (N, L, D)  T5 sequence    CLIP-L | CLIP-G (padded to  Qwen2.5-VL, padded   umT5 sequence
                                                D), then T5                 with zeros
``pooled``            (N, P)     CLIP-L pooled  CLIP-L | CLIP-G pooled      --                   none: P = 0
``text_mask``         (N, L)     --             --                          1 token, 0 padding   --
``uncond_text``       (1, L, D)  --             the negative prompt (CFG)   the negative prompt  the negative
                                                                                                 prompt
``uncond_pooled``     (1, P)     --             the negative prompt         --                   none: P = 0
``uncond_text_mask``  (1, L)     --             --                          the negative         --
                                                                            prompt's
====================  =========  =============  ==========================  ===================  =============

A cache records its negative prompt in the metadata (``negative_prompt``), so a run whose ``model.negative_prompt``
differs from the one encoded is refused instead of guided by the wrong text.

Qwen-Image's prompts have as many tokens as their words take (QwenImagePipeline pads a batch to its longest
prompt and passes the mask): the cache pads every row to the longest prompt it holds (and the negative prompt),
at most ``model.max_sequence_length``, so a training batch of any prompts has one text length. The transformer
masks padding out of its attention, so the padding changes no image token, only the cost of a call.

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

KINDS = ("flux", "sd3", "qwen-image", "wan")
DEFAULT_MAX_SEQUENCE_LENGTH = {"flux": 512, "sd3": 256, "qwen-image": 512, "wan": 512}  # __call__ defaults
ROWS = {"flux": ("text", "pooled"), "sd3": ("text", "pooled"), "qwen-image": ("text", "text_mask"),
        "wan": ("text", "pooled")}
# The unconditional branch of true classifier-free guidance: the pipeline's default negative prompt (SD3 and Wan:
# empty), or for Qwen-Image the one its authors' example passes (QwenImagePipeline runs no CFG without one).
DEFAULT_NEGATIVE_PROMPT = {"sd3": "", "qwen-image": " ", "wan": ""}
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


def negative_prompt(model: ModelConfig) -> str | None:
    """The negative prompt of ``model.kind``'s classifier-free guidance; None for a kind that runs none."""
    if model.kind not in DEFAULT_NEGATIVE_PROMPT:
        return None
    return DEFAULT_NEGATIVE_PROMPT[model.kind] if model.negative_prompt is None else model.negative_prompt


def load_error(model: ModelConfig, what: str, exc: Exception) -> ConfigError:
    """A pipeline part that would not load; on an offline machine a missing download is the usual cause."""
    hint = ""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        hint = (
            f"; the hub is offline (HF_HUB_OFFLINE=1): download the model first "
            f"(huggingface-cli download {model.pretrained}) or run with HF_HUB_OFFLINE=0"
        )
    return ConfigError(f"model.pretrained={model.pretrained!r}: cannot load the {what} ({exc}){hint}")


def load_text_encoder(model: ModelConfig, prompts: Sequence[str] = ()) -> Encoder:
    """The pipeline's own ``encode_prompt`` with only its tokenizers and text encoders loaded. Qwen-Image's rows
    are padded to the longest of ``prompts`` (every prompt the cache will hold, the negative prompt included)."""
    device = resolve_device(model.device)
    dtype = compute_dtype(model, device)
    length = max_sequence_length(model)
    if model.kind == "qwen-image":
        return _qwen_image_encoder(model, prompts, device, dtype, length)
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


def _qwen_image_encoder(model: ModelConfig, prompts: Sequence[str], device: torch.device, dtype: torch.dtype,
                        length: int) -> Encoder:
    from diffusers import QwenImagePipeline

    try:
        pipe = QwenImagePipeline.from_pretrained(model.pretrained, transformer=None, vae=None, torch_dtype=dtype)
    except OSError as exc:
        raise load_error(model, "Qwen-Image text encoder", exc) from None
    pipe = pipe.to(device)
    # Tokens of each prompt after the template's system part, which _get_qwen_prompt_embeds drops, as it counts them.
    drop = pipe.prompt_template_encode_start_idx
    tokens = pipe.tokenizer(
        [pipe.prompt_template_encode.format(p) for p in prompts], max_length=pipe.tokenizer_max_length + drop,
        truncation=True,
    ).input_ids
    width = min(max(len(ids) - drop for ids in tokens), length)
    if width < 1:
        raise ConfigError(
            f"model.pretrained={model.pretrained!r}: its tokenizer leaves no prompt token after the prompt template's "
            f"first {drop} tokens; it is not a Qwen-Image tokenizer"
        )

    def encode(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        text, mask = pipe.encode_prompt(batch, device=device, max_sequence_length=length)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(text.shape[:2], dtype=torch.long, device=text.device)
        pad = width - text.shape[1]
        return torch.nn.functional.pad(text, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad)).to(text.dtype)

    return encode


def build_cache(model: ModelConfig, prompts: Sequence[str], out: Path, progress: bool = True) -> Path:
    """Encode every prompt (duplicates once) and write the cache to ``out`` atomically."""
    if model.kind not in KINDS:
        raise ConfigError(f"egrpo preprocess is for model.kind {' / '.join(KINDS)}; this config has {model.kind!r}")
    if not model.pretrained:
        raise ConfigError("model.pretrained is not set: name the diffusers pipeline (hub id or local folder)")
    prompts = list(dict.fromkeys(prompts))
    negative = negative_prompt(model)
    encode = load_text_encoder(model, prompts + ([negative] if negative is not None else []))
    with torch.no_grad():
        extra = {}
        if negative is not None:
            extra = {f"uncond_{name}": row for name, row in zip(ROWS[model.kind], encode([negative]))}
        starts = range(0, len(prompts), ENCODE_BATCH)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="text embeddings", unit="batch", dynamic_ncols=True)
        batches = (encode(prompts[s : s + ENCODE_BATCH]) for s in starts)
        write_cache(Path(out), model.kind, prompts, batches, extra, model.pretrained, negative)
    return Path(out)


def write_cache(
    path: Path,
    kind: str,
    prompts: list[str],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    extra: dict[str, torch.Tensor] | None = None,
    pretrained: str = "",
    negative: str | None = None,
) -> None:
    """Write row batches of ``prompts`` in order (tuples of ``ROWS[kind]``: (text, pooled) or (text, text_mask)),
    plus ``extra`` tensors, atomically; ``negative`` is the prompt the ``uncond_*`` tensors encode.

    The file is laid out once the first batch gives the shapes, then filled through a memory map.
    """
    extra = extra or {}
    names = ROWS[kind]
    metadata = {"kind": kind, "pretrained": str(pretrained), "prompts": json.dumps(prompts)}
    if negative is not None:
        metadata["negative_prompt"] = negative
    num_rows = len(prompts)
    batches = iter(batches)
    first = next(batches)
    dtype = first[0].dtype
    shapes = {name: (num_rows, *row.shape[1:]) for name, row in zip(names, first)}
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
    for batch in itertools.chain([first], batches):
        for name, value in zip(names, batch):
            tensors[name][row : row + len(value)] = value.to("cpu", dtype)
        row += len(batch[0])
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
            self.rows = ROWS[self.kind]
            self.negative_prompt: str | None = metadata.get("negative_prompt", DEFAULT_NEGATIVE_PROMPT.get(self.kind))
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
    def pooled_dim(self) -> int | None:
        return self._tensors["pooled"].shape[1] if "pooled" in self._tensors else None

    def missing(self, prompts: Sequence[str]) -> list[str]:
        return [p for p in dict.fromkeys(prompts) if p not in self._row]

    def lookup(self, prompts: Sequence[str]) -> Cond:
        """The row tensors of ``prompts`` on the CPU; a contiguous run of rows stays a view of the map."""
        missing = self.missing(prompts)
        if missing:
            raise ConfigError(
                f"{len(missing)} prompt(s) are not in the embedding cache {self.path}, e.g. {missing[0]!r}; rebuild it "
                f"over all prompt files: egrpo preprocess CONFIG --prompts FILE [--prompts FILE ...] --out {self.path}"
            )
        rows = [self._row[p] for p in prompts]
        start = rows[0] if rows else 0
        if rows == list(range(start, start + len(rows))):
            return {name: self._tensors[name][start : start + len(rows)] for name in self.rows}
        index = torch.tensor(rows)
        return {name: self._tensors[name][index] for name in self.rows}

    def unconditional(self) -> Cond:
        """The negative prompt's embeddings (SD3, Qwen-Image and Wan caches), batch dimension 1."""
        if "uncond_text" not in self._tensors:
            raise ConfigError(f"{self.path} holds no negative-prompt embedding; rebuild it with egrpo preprocess")
        return {name: self._tensors[f"uncond_{name}"] for name in self.rows}
