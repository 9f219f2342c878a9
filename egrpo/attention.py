"""``model.attention_backend``: which scaled-dot-product-attention kernel the FLUX / SD3 transformers run.

At FLUX.1-dev's attention shape on an H200, cuDNN's kernel ran forward + backward 2.2x faster than flash
(machine-notes), but its backward failed once on an H100 at the same shapes; which kernels run, and which is
fastest, depends on the GPU, the dtype and the shape. So 'auto' asks the GPU: it runs a forward and a backward
of every candidate once at the model's own shape (heads, tokens, head width, compute dtype), times them, and
keeps the fastest that ran; a kernel that raises there is never used. On the CPU 'auto' leaves the choice to
torch (the probe would cost more than it saves, and the tests compare with torch's own choice bit for bit).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from egrpo.errors import ConfigError

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# Kernels whose backward is deterministic under torch.use_deterministic_algorithms (train.deterministic).
DETERMINISTIC = ("flash", "math")
CHOICES = ("auto", *BACKENDS)


def probe(name: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
          repeats: int = 3, masked: bool = False) -> float | str:
    """Seconds of one forward + backward of backend ``name`` at ``shape`` (batch, heads, tokens, head width), after
    a warm-up call; or, when it cannot run there, the first line of its error. ``masked``: with a boolean key mask
    (batch, 1, 1, tokens), as Qwen-Image masks its text padding (flash attention takes no mask)."""
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(shape[0], 1, 1, shape[2], dtype=torch.bool, device=device) if masked else None
    if mask is not None:
        mask[..., : shape[2] // 4] = False  # a mask of ones alone could be dropped by a kernel's fast path
    try:
        with sdpa_kernel(BACKENDS[name]):
            for i in range(repeats + 1):
                if i == 1:
                    _synchronize(device)
                    started = time.perf_counter()
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                out.backward(torch.ones_like(out))
            _synchronize(device)
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (time.perf_counter() - started) / repeats


def fastest(candidates: tuple[str, ...], shape, dtype, device, masked: bool = False
            ) -> tuple[str, dict[str, float | str]]:
    """The candidate with the shortest forward + backward that ran, and every candidate's probe result."""
    results = {name: probe(name, shape, dtype, device, masked=masked) for name in candidates}
    ran = {name: seconds for name, seconds in results.items() if isinstance(seconds, float)}
    if not ran:
        raise ConfigError(
            f"model.attention_backend=auto: no attention kernel ran at {_describe(shape, dtype)} on {device} "
            f"({'; '.join(f'{n}: {r}' for n, r in results.items())})"
        )
    return min(ran, key=ran.get), results


def choose(setting: str, shape, dtype, device: torch.device, deterministic: bool, masked: bool = False
           ) -> tuple[str | None, str]:
    """(backend name, or None for torch's own choice; a line saying what was chosen and why)."""
    if setting not in CHOICES:
        raise ConfigError(f"model.attention_backend must be one of {', '.join(CHOICES)}, got {setting!r}")
    if deterministic and setting not in ("auto", *DETERMINISTIC):
        raise ConfigError(
            f"model.attention_backend={setting} with train.deterministic=true: only {' or '.join(DETERMINISTIC)} "
            "attention has a deterministic backward; pick one of them or auto"
        )
    if setting != "auto":
        result = probe(setting, shape, dtype, device, repeats=1, masked=masked)
        if isinstance(result, str):
            raise ConfigError(
                f"model.attention_backend={setting} cannot run at {_describe(shape, dtype)} on {device} ({result}); "
                "use auto or another kernel"
            )
        return setting, f"attention: {setting} (as configured)"
    if device.type != "cuda":
        return None, "attention: torch's choice (auto on the CPU)"
    candidates = DETERMINISTIC if deterministic else tuple(BACKENDS)
    name, results = fastest(candidates, shape, dtype, device, masked)
    timings = ", ".join(f"{n} {r * 1e3:.2f} ms" if isinstance(r, float) else f"{n} failed ({r})"
                        for n, r in results.items())
    return name, f"attention: {name}, the fastest forward + backward at {_describe(shape, dtype)} ({timings})"


def kernel(name: str | None):
    """The context the transformer runs in: the chosen kernel only, or torch's choice."""
    return sdpa_kernel(BACKENDS[name]) if name else contextlib.nullcontext()


def _describe(shape, dtype) -> str:
    batch, heads, tokens, width = shape
    return f"{heads} heads x {tokens:,} tokens x {width} ({str(dtype).removeprefix('torch.')})"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
