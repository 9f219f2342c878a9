"""What the FLUX, SD3 and Qwen-Image policies share: the transformer and VAE of a diffusers pipeline, LoRA or full
fine-tuning, the reference network, mixed precision, prompts from the embedding cache, and decoding.

Weights: full fine-tuning keeps fp32 master weights and computes under bf16 autocast on a GPU (the
paper's "bf16"); LoRA stores the frozen base in the compute dtype and its adapters in fp32. The VAE
is frozen and decodes under the same autocast. The step math outside stays fp32: ``velocity``
returns fp32.
"""

from __future__ import annotations

import contextlib
import copy
import os
import zlib
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from egrpo.config import ModelConfig
from egrpo.devices import resolve_device
from egrpo.errors import ConfigError
from egrpo.models.text_cache import EmbeddingCache, compute_dtype, load_error, negative_prompt
from egrpo.policy import Cond

# Flow-GRPO's LoRA targets: the q/k/v/out projections of both streams of the joint attention.
DEFAULT_LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]


def check_model_config(model: ModelConfig) -> None:
    """Field checks of a pipeline model that need no weights."""
    if not model.pretrained:
        raise ConfigError(
            f"model.pretrained is not set: model.kind={model.kind!r} needs a diffusers pipeline, "
            "a hub id (e.g. black-forest-labs/FLUX.1-dev) or a local folder"
        )
    if not model.embedding_cache:
        raise ConfigError(
            "model.embedding_cache is not set: name the text-embedding file, built once with "
            "egrpo preprocess CONFIG --out CACHE.safetensors"
        )
    checks = [
        (min(model.height, model.width) >= 1, f"model.height / width must be >= 1, got {model.height} x {model.width}"),
        (model.lora_rank >= 0, f"model.lora_rank must be >= 0 (0 = full fine-tuning), got {model.lora_rank}"),
        (model.lora_alpha > 0, f"model.lora_alpha must be > 0, got {model.lora_alpha}"),
        (model.decode_batch >= 1, f"model.decode_batch must be >= 1, got {model.decode_batch}"),
        (model.guidance is None or model.guidance > 0, f"model.guidance must be > 0, got {model.guidance}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def with_lora(transformer: nn.Module, rank: int, alpha: float, targets: list[str]) -> nn.Module:
    """``transformer`` wrapped by peft with the trained LoRA adapters (the parameter names of every LoRA
    checkpoint come from here: the trainer and ``egrpo export`` must build the same wrapper)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    wrapped = get_peft_model(transformer, lora)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            start = lora_initial_value(name, p.shape)
            if start is not None and not p.is_meta:  # on meta (FSDP) each rank fills its rows of it later
                p.copy_(start)
    return wrapped


def lora_initial_value(name: str, shape: torch.Size) -> torch.Tensor | None:
    """What LoRA parameter ``name`` starts from (None for any other tensor): peft's 'gaussian' init, A ~ N(0, 1/r^2)
    and B = 0, drawn from a generator seeded by the name. peft draws from torch's global generator in module order,
    so its start would depend on what ran before and on how the model is built; by name it is the same in every
    process, on every FSDP rank (each takes its rows of the same tensor) and under any sharding."""
    if ".lora_A." in name:
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return torch.randn(tuple(shape), generator=generator) / shape[0]  # shape (r, in): std 1 / r
    if ".lora_B." in name:
        return torch.zeros(tuple(shape))
    return None

def transformer_files(model: ModelConfig) -> list[Path]:
    """The safetensors files of the transformer of the pipeline ``model.pretrained`` (one, or the shards its
    index lists): what FSDP ranks read their rows from, and where an export finds the tensors a run did not train."""
    folder = Path(model.pretrained) / "transformer"
    if not folder.is_dir():  # a hub id: the files of its local snapshot (downloaded if need be)
        from huggingface_hub import snapshot_download

        try:
            root = snapshot_download(model.pretrained, allow_patterns=["transformer/*"])
        except Exception as exc:  # the hub client raises many types: offline, gated, not found
            raise load_error(model, "transformer weights", exc) from None
        folder = Path(root) / "transformer"
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"model.pretrained={model.pretrained!r}: {folder} holds no .safetensors weights; "
            "FSDP and egrpo export read the transformer from safetensors (convert it with save_pretrained)"
        )
    return files


class PipelinePolicy:
    """Base of the FLUX, SD3, Qwen-Image and Wan adapters (see :class:`egrpo.policy.Policy`); subclasses define the
    latent layout (``latent_shape``, ``_vae_latents``) and the network call (``velocity``)."""

    kind: str
    vae_class = "AutoencoderKL"  # the diffusers class of the pipeline's VAE
    default_lora_targets = DEFAULT_LORA_TARGETS

    def __init__(self, model: ModelConfig, transformer: nn.Module, vae: nn.Module, cache: EmbeddingCache):
        self.settings = model
        self.device = resolve_device(model.device)
        self.dtype = compute_dtype(model, self.device)
        self.cache = cache
        self._check_cache(transformer)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.vae_scale_factor = self._spatial_factor(vae)
        self.transformer_config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        if model.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.lora = model.lora_rank > 0
        if self.lora:
            self.lora_targets = list(model.lora_target_modules or self.default_lora_targets)
            transformer.requires_grad_(False)
            try:  # adapters in fp32 over the compute-dtype base
                transformer = with_lora(transformer, model.lora_rank, model.lora_alpha, self.lora_targets)
            except ValueError as exc:
                raise ConfigError(f"model.lora_target_modules: {exc}") from None
            # The trainer may replace self.model by a DDP wrapper, which hides disable_adapter().
            self._adapters = transformer
        else:
            transformer.requires_grad_(True)
        on_meta = any(p.is_meta for p in transformer.parameters())
        self.model = transformer if on_meta else transformer.to(self.device)  # FSDP fills meta shards later
        self._reference: nn.Module | None = None
        self._reference_frozen = False
        self._regional = None
        if model.compile:
            from egrpo.regional_compile import RegionalCompile

            self._regional = RegionalCompile(self.model)

    transformer_class: str  # the diffusers class of the pipeline's transformer

    @classmethod
    def load(cls, model: ModelConfig, cache: EmbeddingCache, on_meta: bool = False):
        """Only the transformer and the VAE of the pipeline ``model.pretrained``: no text encoders.

        ``on_meta``: the transformer is built from its config on the meta device and no weight is read;
        FSDP shards it and each rank reads its rows of :meth:`transformer_files`."""
        import diffusers

        check_model_config(model)
        cls.check_settings(model)
        transformer_class = getattr(diffusers, cls.transformer_class)
        try:
            if on_meta:
                config = transformer_class.load_config(model.pretrained, subfolder="transformer")
                with torch.device("meta"):
                    transformer = transformer_class.from_config(config).to(cls.weight_dtype(model))
                cls._build_computed_buffers(transformer)
            else:
                transformer = transformer_class.from_pretrained(
                    model.pretrained, subfolder="transformer", torch_dtype=cls.weight_dtype(model)
                )
            vae = getattr(diffusers, cls.vae_class).from_pretrained(model.pretrained, subfolder="vae")
            others = cls._other_parts(model)
        except OSError as exc:
            raise load_error(model, f"{cls.transformer_class} / VAE", exc) from None
        return cls(model, transformer, vae, cache, **others)

    @classmethod
    def check_settings(cls, model: ModelConfig) -> None:
        """Checks of the settings only this kind of model has, before any weight loads."""

    @classmethod
    def _build_computed_buffers(cls, transformer: nn.Module) -> None:
        """Give a transformer built on the meta device the tensors it computes and never saves (none here: Wan's
        RoPE buffers, Qwen-Image's RoPE attributes), which no weights file can fill."""

    @classmethod
    def _other_parts(cls, model: ModelConfig) -> dict:
        """Pipeline parts beyond the transformer and the VAE, as constructor keywords (none here)."""
        return {}

    @staticmethod
    def _spatial_factor(vae: nn.Module) -> int:
        """Pixels per latent row or column: each down block of an ``AutoencoderKL`` but the last halves the side."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def transformer_files(self) -> list[Path]:
        """The safetensors files of the pipeline's transformer (one, or the shards its index lists)."""
        return transformer_files(self.settings)

    @classmethod
    def weight_dtype(cls, model: ModelConfig) -> torch.dtype:
        """Storage dtype of the transformer: fp32 master weights when trained in full, the compute dtype under LoRA."""
        return compute_dtype(model, resolve_device(model.device)) if model.lora_rank > 0 else torch.float32

    def _check_cache(self, transformer: nn.Module) -> None:
        if self.cache.kind != self.kind:
            raise ConfigError(
                f"model.embedding_cache {self.cache.path} was built for model.kind={self.cache.kind!r}, "
                f"not {self.kind!r}"
            )
        config = transformer.config
        widths = (self.cache.text_shape[1], self.cache.pooled_dim)
        expected = (config.joint_attention_dim, config.get("pooled_projection_dim"))
        if widths != expected:
            def describe(text: int, pooled: int | None) -> str:
                return f"{text}" if pooled is None else f"{text} / {pooled}"

            raise ConfigError(
                f"model.embedding_cache {self.cache.path} holds embeddings of width {describe(*widths)}, but the "
                f"transformer expects {describe(*expected)}: it was built from another model; rebuild it with "
                "egrpo preprocess"
            )
        negative = negative_prompt(self.settings)
        if negative is not None and self.cache.negative_prompt != negative:
            raise ConfigError(
                f"model.negative_prompt is {negative!r}, but the embedding cache {self.cache.path} encodes "
                f"{self.cache.negative_prompt!r}; rebuild it with egrpo preprocess or set model.negative_prompt to that"
            )

    # ---- the Policy protocol --------------------------------------------------------------------
    def arch_config(self) -> dict:
        lora = None
        if self.lora:
            lora = {"rank": self.settings.lora_rank, "alpha": self.settings.lora_alpha, "targets": self.lora_targets}
        return {"kind": self.kind, "transformer": self.transformer_config, "lora": lora}

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Cached embeddings on the CPU: the cache of a large prompt set stays off the GPU, and ``velocity``
        moves the few rows of each call there."""
        return self.cache.lookup(prompts)

    def with_negative(
        self, x: torch.Tensor, timestep: torch.Tensor, rows: Cond
    ) -> tuple[torch.Tensor, torch.Tensor, Cond]:
        """Both branches of true classifier-free guidance as one batch: the negative prompt's rows before the
        prompts' (each of ``rows``' tensors), and the latents and timesteps twice."""
        b = x.shape[0]
        rows = {name: torch.cat([self._uncond[name].expand(b, *row.shape[1:]), row]) for name, row in rows.items()}
        return torch.cat([x, x]), torch.cat([timestep, timestep]), rows

    @property
    def true_cfg(self) -> bool:
        """Whether each velocity call also runs the negative prompt's branch (true classifier-free guidance)."""
        return getattr(self, "_uncond", None) is not None

    def completion_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """``velocity`` for forwards that never enter a log-probability; with model.compile, through the compiled
        blocks (egrpo/regional_compile.py), compiled on first use if :meth:`compile_completions` has not run."""
        if self._regional is None:
            return self.velocity(x, sigma, cond)
        if self._regional.seconds is None:
            self.compile_completions(cond)
        n = x.shape[0]
        if n == 1:  # torch specialises a size-1 dimension; two rows reuse the graphs compiled for any batch
            x, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
            cond = {k: torch.cat([v, v]) for k, v in cond.items()}
        with self._regional.active():
            return self.velocity(x, sigma, cond)[:n]

    def compile_completions(self, cond: Cond) -> float | None:
        """With model.compile, compile the blocks now on ``cond``'s first prompt; returns the seconds it took (None
        without model.compile). Later calls return the first one's time."""
        if self._regional is None or self._regional.seconds is not None:
            return None if self._regional is None else self._regional.seconds
        row = {k: v[:1] for k, v in cond.items()}
        noise = torch.Generator().manual_seed(0)  # not the run's generators: compiling changes no random draw

        def run(batch: int) -> None:
            x = torch.randn((batch, *self.latent_shape), generator=noise)
            sigma = torch.full((batch,), 0.5)
            with self._regional.active():
                self.velocity(x, sigma, {k: v.expand(batch, *v.shape[1:]).contiguous() for k, v in row.items()})

        training = self.model.training
        self.model.eval()  # the mode completions run in: a module's training flag is part of what torch.compile guards
        try:
            return self._regional.warm_up(run)
        finally:
            self.model.train(training)

    def freeze_reference(self) -> None:
        """With LoRA the reference is the base network with its adapters disabled (no copy); in full
        fine-tuning, a frozen copy of the current weights."""
        if not self.lora:
            self._reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self._reference_frozen = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images on the CPU, in fp32: the trainer saves and plots them, and each reward moves them to its device."""
        images = []
        for chunk in latents.split(self.settings.decode_batch):
            z = self._vae_latents(chunk.to(self.device, torch.float32))
            with self.autocast():
                pixels = self._vae_decode(z)
            images.append(((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu())
        return torch.cat(images).contiguous()  # the VAE may answer channels-last; safetensors wants contiguous

    # ---- helpers of the subclasses --------------------------------------------------------------
    def choose_attention(self, tokens: int, masked: bool = False) -> None:
        """Pick the attention kernel (model.attention_backend) at this model's shape: ``tokens`` image + text tokens
        of one sample. cuDNN's fused attention failed in the backward pass ("mha_graph.execute ... is_good()") on
        FLUX.1-dev's 2,537-token sequences once (torch 2.11 + CUDA 13, H100, 2026-11-27) and ran on an H200: 'auto'
        runs forward and backward at exactly these shapes before choosing, so a kernel that fails here is never used.
        ``masked``: the transformer passes a key mask (Qwen-Image's text padding), which some kernels cannot take."""
        from egrpo import attention

        config = self.transformer_config
        shape = (1, config["num_attention_heads"], tokens, config["attention_head_dim"])
        deterministic = torch.are_deterministic_algorithms_enabled()
        self.attention_backend, self.attention_choice = attention.choose(
            self.settings.attention_backend, shape, self.dtype, self.device, deterministic, masked
        )
        if int(os.environ.get("RANK", "0")) == 0 and self.attention_backend is not None:
            print(self.attention_choice, flush=True)

    def attention(self):
        from egrpo import attention

        return attention.kernel(self.attention_backend)

    def autocast(self):
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast(device_type="cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def network(self, reference: bool) -> tuple[nn.Module, contextlib.AbstractContextManager]:
        """The module to call and the context to call it in."""
        if not reference:
            return self.model, contextlib.nullcontext()
        if not self._reference_frozen:
            raise RuntimeError("velocity(reference=True) needs freeze_reference() first")
        if self.lora:
            return self.model, self._adapters.disable_adapter()
        return self._reference, contextlib.nullcontext()

    def on_device(self, cond: Cond) -> Cond:
        return {name: value.to(self.device, torch.float32) for name, value in cond.items()}

    def _vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, *latent_shape) -> the VAE's (B, C, h, w)."""
        raise NotImplementedError

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE's latents (``_vae_latents``) -> pixels in [-1, 1], undoing the pipeline's latent scaling."""
        config = self.vae.config
        return self.vae.decode(z / config.scaling_factor + (config.shift_factor or 0.0), return_dict=False)[0]
