"""``model.compile``: regional compilation of a diffusers transformer's repeated blocks, used only by the forwards
that never enter a log-probability.

Which forwards: the ODE completions (96% of an E-GRPO iteration's network calls on FLUX.1-dev), the trajectory
methods' ODE steps that are not trained, and evaluation sampling. The rollout forward of a trained transition and
the update's forward stay eager: the old log-probability comes from the first and the new one from the second, and
inductor's inference graph agrees with eager only to about 1e-7, so a compiled rollout forward would start every
PPO ratio off 1. A completion only decides a reward, as egrpo-fast's coarser completions do.

Regional: one compiled function per block class (FLUX has two, SD3, Qwen-Image and Wan one), shared by every block
of that class, so a 57-block FLUX compiles two graphs, not 57. Nothing is compiled in place: inside :meth:`active`
each block's ``forward`` is the compiled one, outside it the module is untouched, so the update, checkpoints,
LoRA's ``disable_adapter`` and the DDP wrapper see the eager model.

Batch sizes: a rollout's completions shrink as samples reach sigma 0. :meth:`warm_up` runs batch 2, then batch 3,
and on the second shape torch's automatic dynamic shapes compile the batch dimension as symbolic, so every later
batch of 2 or more reuses the graphs; torch always specialises a dimension of size 1, so a single latent runs as
two rows. The warm-up's time is the compile time, reported apart from the iterations'.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable, Iterator

import torch
from torch import nn

from egrpo.errors import ConfigError

BACKEND = "inductor"
"""torch.compile's backend (tests swap in a backend that marks its outputs, to see which forwards it ran)."""


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Every block of the diffusers transformer inside ``model`` (bare, under peft or DDP) whose class the transformer
    lists as repeated (``_repeated_blocks``, else the ``_no_split_modules`` accelerate keeps whole)."""
    import diffusers

    transformer = next((m for m in model.modules() if isinstance(m, diffusers.ModelMixin)), None)
    names = set(getattr(transformer, "_repeated_blocks", None) or getattr(transformer, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        found = type(transformer).__name__ if transformer is not None else type(model).__name__
        raise ConfigError(
            f"model.compile: {found} names no repeated transformer blocks to compile; set model.compile=false"
        )
    return blocks


class RegionalCompile:
    """Compiled forwards of a transformer's repeated blocks, switched on for the duration of :meth:`active`."""

    def __init__(self, model: nn.Module):
        by_class: dict[type, Callable] = {}
        self.blocks: list[tuple[nn.Module, Callable]] = []
        for block in repeated_blocks(model):
            cls = type(block)
            if cls not in by_class:
                by_class[cls] = torch.compile(cls.forward, backend=BACKEND)
            self.blocks.append((block, by_class[cls]))
        self.seconds: float | None = None  # the warm-up's compile time, once run

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        for block, compiled in self.blocks:
            block.forward = functools.partial(compiled, block)
        try:
            yield
        finally:
            for block, _ in self.blocks:
                del block.forward  # the class's eager forward again

    def warm_up(self, run: Callable[[int], object]) -> float:
        """Compile now, with ``run(batch)`` (a completion forward of ``batch`` latents) at batch 2 and 3; returns
        and keeps the seconds it took."""
        started = time.perf_counter()
        with torch.no_grad():
            for batch in (2, 3):
                run(batch)
        self.seconds = time.perf_counter() - started
        return self.seconds
