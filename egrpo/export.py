"""``egrpo export``: a run's trained weights in diffusers' own formats, loadable without egrpo.

LoRA runs (FLUX, SD3, Qwen-Image) become the pipeline's LoRA file, ``pytorch_lora_weights.safetensors``, written by the
pipeline's own ``save_lora_weights`` with peft's keys and the adapter's rank, alpha and targets in its
metadata, so ``pipe.load_lora_weights(DIR)`` applies exactly the trained update. Full fine-tunes and the
embedded model become a transformer folder, ``DIR/transformer`` (config.json and safetensors shards with their
index), that ``from_pretrained(DIR, subfolder="transformer")`` takes.

The network is built on the meta device from the architecture the weights record, so nothing is loaded to
learn names and shapes; the folder is then streamed one shard at a time from the run's weights (its
``model.safetensors``, or the DCP shards of an FSDP checkpoint). Tensors a run does not train (SD3's
positional-embedding buffer) come from the base transformer's files. The export is written into a temporary
folder and renamed into place, with a README.md that says what was trained and how to load it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from egrpo import checkpoint as ckpt
from egrpo import config as cfg
from egrpo.errors import ConfigError

LORA_FILE = "pytorch_lora_weights.safetensors"
MAX_SHARD_BYTES = 10 * 10**9  # diffusers' save_pretrained default, "10GB"
EMBEDDED_KIND = "embedded-digits-flux"  # egrpo.embedded.model.DigitsPolicy.arch_config's kind
DIFFUSERS = {  # model.kind -> (pipeline, transformer) classes
    "flux": ("FluxPipeline", "FluxTransformer2DModel"),
    "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
    "qwen-image": ("QwenImagePipeline", "QwenImageTransformer2DModel"),
    "wan": ("WanPipeline", "WanTransformer3DModel"),
}
LABELS = {"flux": "FLUX", "sd3": "SD3", "qwen-image": "Qwen-Image", "wan": "Wan", EMBEDDED_KIND: "embedded digits"}
_DTYPES = {name: dtype for dtype, name in ckpt.SAFETENSORS_DTYPES.items()}
_PEFT_PREFIX = "base_model.model."  # peft's PeftModel wrapper; diffusers' loaders address the bare transformer


class _WeightsFile:
    """A safetensors file written by egrpo: its tensors' names, shapes and dtypes from the header alone."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with safe_open(str(path), framework="pt") as f:
                self.arch = ckpt.saved_arch(dict(f.metadata() or {}), path)
                self.layout = {}
                for name in f.keys():
                    info = f.get_slice(name)
                    self.layout[name] = (tuple(info.get_shape()), _DTYPES[info.get_dtype()])
        except (SafetensorError, OSError) as exc:
            raise ckpt.CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        with safe_open(str(self.path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}


class _ShardedCheckpoint:
    """The model part of a DCP checkpoint (an FSDP run's), read whole in this process, a group of tensors at a time."""

    def __init__(self, path: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.path = path
        self.arch = ckpt.read_json(path / "state.json", "checkpoint's trainer state").get("arch")
        metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        self.layout = {
            key.removeprefix("model."): (tuple(meta.size), meta.properties.dtype)
            for key, meta in metadata.items() if key.startswith("model.")
        }

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        tensors = {name: torch.empty(self.layout[name][0], dtype=self.layout[name][1]) for name in names}
        ckpt.load_sharded_checkpoint(self.path, {"model": tensors}, self.arch, whole=True)
        return tensors


def export(run: str | Path, out: str | Path, weights: str | None = None, overrides: Sequence[str] = (),
           replace: bool = False) -> str:
    """Write the weights of ``run`` (its final ones, else its latest checkpoint; or ``weights``) into the folder
    ``out``, which must not exist or be empty unless ``replace``. Returns a one-line description of the export."""
    run, out = Path(run), Path(out)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a run directory (no config.yaml there); name the output_dir of egrpo train")
    config = cfg.load(str(run / "config.yaml"), list(overrides))
    path = _weights(run, weights)
    source = _ShardedCheckpoint(path) if path.is_dir() else _WeightsFile(path)
    arch = _checked_arch(source, config, run)
    if out.exists() and not replace and (not out.is_dir() or any(out.iterdir())):
        what = "not empty" if out.is_dir() else "a file"
        raise ConfigError(f"--out {out} already exists and is {what}; name a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if arch.get("lora"):
            what = _export_lora(source, arch, tmp)
        else:
            what = _export_transformer(source, arch, config, tmp / "transformer")
        (tmp / "README.md").write_text(_card(what, arch, config, run, path, out))
        if replace and out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # an empty ``out`` is replaced too
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return what


def _weights(run: Path, weights: str | None) -> Path:
    """The weights file or sharded checkpoint to export, as ``egrpo sample`` resolves a run or a file."""
    from egrpo.tasks import weights_path

    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise ConfigError(f"--weights {path} does not exist; name a .safetensors file or a checkpoint directory")
        return path if path.is_dir() and ckpt.is_sharded(path) else weights_path(weights)
    if not (run / "model.safetensors").is_file() and ckpt.latest_checkpoint(run) is None:
        raise ConfigError(
            f"{run} holds no trained weights yet (neither model.safetensors nor a checkpoint): export it once "
            "egrpo train has written a checkpoint (checkpoint_every), or name a weights file with --weights FILE"
        )
    return weights_path(str(run))


def _checked_arch(source, config: cfg.Config, run: Path) -> dict:
    """The architecture the weights record, refused when it is not the run's kind of model."""
    arch = source.arch
    if arch is None:
        raise ckpt.CheckpointError(
            f"{source.path} records no architecture (no 'arch' metadata): egrpo export reads weights that egrpo "
            "train wrote"
        )
    kind = EMBEDDED_KIND if config.model.kind == "embedded" else config.model.kind
    lora = config.model.kind != "embedded" and config.model.lora_rank > 0
    if arch.get("kind") != kind or bool(arch.get("lora")) != lora:
        raise ckpt.CheckpointError(
            f"{source.path} holds {_label(arch)} weights, but {run} trains {kind}{' LoRA' if lora else ''}: "
            "name weights of this run with --weights"
        )
    return arch


def _label(arch: dict) -> str:
    kind = LABELS.get(arch.get("kind"), str(arch.get("kind")))
    return f"{kind} LoRA" if arch.get("lora") else kind


def network(arch: dict) -> nn.Module:
    """The trained network ``arch`` describes, on the meta device (names, shapes and config; no memory): the
    bare transformer, or for LoRA the same peft wrapper the trainer builds."""
    if arch["kind"] == EMBEDDED_KIND:
        from egrpo.embedded.model import TinyFluxConfig, build_transformer

        with torch.device("meta"):
            return build_transformer(TinyFluxConfig(**{k: v for k, v in arch.items() if k != "kind"}))
    import diffusers

    from egrpo.models.pipeline import with_lora

    with torch.device("meta"):
        transformer = getattr(diffusers, DIFFUSERS[arch["kind"]][1]).from_config(arch["transformer"])
    lora = arch.get("lora")
    if lora:
        transformer.requires_grad_(False)
        transformer = with_lora(transformer, lora["rank"], lora["alpha"], lora["targets"])
    return transformer


def _export_lora(source: _WeightsFile, arch: dict, out: Path) -> str:
    import diffusers
    from peft.utils import get_peft_model_state_dict

    model = network(arch)
    tensors = ckpt.read_weights(source.path, model, arch)  # the adapters only: small
    peft_state = get_peft_model_state_dict(model, state_dict=tensors)
    layers = {k.removeprefix(_PEFT_PREFIX): v.contiguous() for k, v in peft_state.items()}
    pipeline = getattr(diffusers, DIFFUSERS[arch["kind"]][0])
    # The adapter's config (rank, alpha, targets) goes into the file's metadata, as diffusers' training scripts
    # store it: without it the loader would guess alpha = rank and scale the update by 1 instead of alpha / rank.
    pipeline.save_lora_weights(
        out, transformer_lora_layers=layers, transformer_lora_adapter_metadata=model.peft_config["default"].to_dict()
    )
    lora = arch["lora"]
    return f"{_label(arch)} (rank {lora['rank']}, alpha {lora['alpha']:g}) for {pipeline.__name__}.load_lora_weights"


def _export_transformer(source, arch: dict, config: cfg.Config, folder: Path) -> str:
    """A diffusers model folder, streamed shard by shard: at most one shard's tensors are held at a time."""
    model = network(arch)
    state = model.state_dict()  # meta tensors: every name and shape the loader expects, buffers included
    trained = {name: tuple(p.shape) for name, p in model.named_parameters()}
    found = {name: shape for name, (shape, _) in source.layout.items()}
    if found != trained:
        wrong = sorted(k for k in trained if found.get(k) != trained[k])
        raise ckpt.CheckpointError(
            f"{source.path} does not fit the architecture it records: {len(wrong)} tensors missing or of other "
            f"shapes {wrong[:3]}, {len(set(found) - set(trained))} unexpected"
        )
    dtype = next(iter(source.layout.values()))[1]
    untrained = [name for name in state if name not in trained]
    base = _BaseTensors(_base_files(arch, config), untrained) if untrained else None
    layout = {name: (tuple(t.shape), source.layout[name][1] if name in trained else dtype) for name, t in state.items()}

    shards, size = [[]], 0
    for name, (shape, dtype_) in layout.items():
        nbytes = torch.Size(shape).numel() * dtype_.itemsize
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

    from egrpo.sharding import write_safetensors_stream

    folder.mkdir()
    stem = SAFETENSORS_WEIGHTS_NAME.removesuffix(".safetensors")
    weight_map = {}
    for i, names in enumerate(shards):
        file = SAFETENSORS_WEIGHTS_NAME if len(shards) == 1 else f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = source.read([n for n in names if n in trained])
        if base is not None:
            tensors.update(base.read([n for n in names if n not in trained]))
        for name, value in tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ckpt.CheckpointError(
                    f"{source.path}: {name} holds NaN or inf values; these weights come from a diverged run: "
                    "export an earlier checkpoint with --weights"
                )
        write_safetensors_stream(folder / file, {n: layout[n] for n in names}, tensors.pop, {"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    if len(shards) > 1:
        total = sum(torch.Size(shape).numel() * d.itemsize for shape, d in layout.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2))
    model.save_config(folder)
    return f"{_label(arch)} transformer ({type(model).__name__}, {len(shards)} shard{'s' * (len(shards) > 1)})"


def _base_files(arch: dict, config: cfg.Config) -> list[Path]:
    if arch["kind"] == EMBEDDED_KIND:
        from egrpo.embedded.assets import BASE_POLICY

        return [BASE_POLICY]
    from egrpo.models.pipeline import transformer_files

    return transformer_files(config.model)


class _BaseTensors:
    """Tensors the run did not train, from the base model's safetensors files."""

    def __init__(self, files: list[Path], names: list[str]):
        self.owner: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                self.owner.update({name: file for name in f.keys() if name in names})
        missing = [name for name in names if name not in self.owner]
        if missing:
            raise ckpt.CheckpointError(
                f"{missing[:3]} are neither trained nor in the base weights {[str(f) for f in files]}: is "
                "model.pretrained still the run's base model?"
            )

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in names:
            with safe_open(str(self.owner[name]), framework="pt") as f:
                tensors[name] = f.get_tensor(name)
        return tensors


def _iterations(path: Path, config: cfg.Config) -> int | None:
    """Iterations behind the weights: a checkpoint's own count, the run's for its final weights, else unknown."""
    folder = path if path.is_dir() else path.parent
    if (folder / "state.json").is_file():
        return ckpt.read_json(folder / "state.json", "checkpoint's trainer state").get("iteration")
    if path.name == "model.safetensors" and (folder / "config.yaml").is_file():
        return config.train.iterations
    return None


def _card(what: str, arch: dict, config: cfg.Config, run: Path, path: Path, out: Path) -> str:
    from egrpo import __version__

    iterations = _iterations(path, config)
    rewards = ", ".join(f"{name} (weight {spec[0]:g})" for name, spec in cfg.reward_specs(config).items())
    lines = ["---", "library_name: diffusers"]
    if config.model.pretrained:
        lines.append(f"base_model: {config.model.pretrained}")
    task = "text-to-video" if arch["kind"] == "wan" else "text-to-image"
    tags = dict.fromkeys(["egrpo", config.method.name, task, *(["lora"] if arch.get("lora") else [])])
    lines += [f"tags: [{', '.join(tags)}]", "---", ""]
    lines += [
        f"# {_label(arch)}, fine-tuned by egrpo",
        "",
        f"{what}.",
        "",
        f"Fine-tuned by egrpo {__version__} with the method `{config.method.name}` on the reward {rewards}, for "
        f"{'an unknown number of' if iterations is None else iterations} iteration{'' if iterations == 1 else 's'}"
        f"{f', from {config.model.pretrained}' if config.model.pretrained else ''}.",
        f"Run: `{run}`; weights: `{path}`.",
        "",
        "Loading it:",
        "",
        "```python",
        _snippet(arch, config, out),
        "```",
        "",
    ]
    return "\n".join(lines)


def _snippet(arch: dict, config: cfg.Config, out: Path) -> str:
    if arch["kind"] == EMBEDDED_KIND:
        tokens = arch["max_tokens"]
        return "\n".join([
            "import torch",
            "from diffusers import FluxTransformer2DModel",
            "from egrpo.embedded import model, text",
            "",
            f'transformer = FluxTransformer2DModel.from_pretrained("{out}", subfolder="transformer")',
            "# pixel space: an 8x8 image is 16 tokens of 2x2 patches; sigma 1 is noise, 0 the image",
            f'cond = text.encode_prompts(["a handwritten digit seven"], {tokens})',
            "velocity = transformer(hidden_states=torch.randn(1, 16, 4), timestep=torch.ones(1),",
            '                       encoder_hidden_states=cond["text"], pooled_projections=cond["pooled"],',
            f"                       img_ids=model.image_ids(), txt_ids=torch.zeros({tokens}, 3),",
            "                       return_dict=False)[0]",
        ])
    pipeline, transformer = DIFFUSERS[arch["kind"]]
    if arch["kind"] == "flux":
        from egrpo.models.flux import DEFAULT_GUIDANCE
    elif arch["kind"] == "qwen-image":
        from egrpo.models.qwen_image import DEFAULT_GUIDANCE
    elif arch["kind"] == "wan":
        from egrpo.models.wan import DEFAULT_GUIDANCE
    else:
        from egrpo.models.sd3 import DEFAULT_GUIDANCE
    guidance = DEFAULT_GUIDANCE if config.model.guidance is None else config.model.guidance
    lines = ["import torch"]
    if arch.get("lora"):
        lines += [
            f"from diffusers import {pipeline}",
            "",
            f'pipe = {pipeline}.from_pretrained("{config.model.pretrained}", torch_dtype=torch.bfloat16)',
            f'pipe.load_lora_weights("{out}")',
        ]
    else:
        lines += [
            f"from diffusers import {pipeline}, {transformer}",
            "",
            f'transformer = {transformer}.from_pretrained("{out}", subfolder="transformer",',
            f"{' ' * (len(transformer) + 31)}torch_dtype=torch.bfloat16)",
            f'pipe = {pipeline}.from_pretrained("{config.model.pretrained}", transformer=transformer, '
            "torch_dtype=torch.bfloat16)",
        ]
    call = f"guidance_scale={guidance:g}, height={config.model.height}, width={config.model.width}"  # as trained
    if arch["kind"] == "wan":
        from egrpo.models.text_cache import negative_prompt

        negative = negative_prompt(config.model)
        call += f", num_frames={config.model.frames}" + (f", negative_prompt={negative!r}" if negative else "")
        return "\n".join([*lines, f'video = pipe("a cat walking in the snow", {call}).frames[0]'])
    if arch["kind"] == "qwen-image":  # true CFG runs only with a negative prompt
        from egrpo.models.text_cache import negative_prompt

        call = (f"negative_prompt={negative_prompt(config.model)!r}, true_cfg_scale={guidance:g}, "
                f"height={config.model.height}, width={config.model.width}")
    return "\n".join([*lines, f'image = pipe("a photo of a cat", {call}).images[0]'])
