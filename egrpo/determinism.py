"""``train.deterministic``: the settings under which a run on one GPU repeats itself bit for bit.

egrpo draws every random number from generators seeded by (seed, iteration, prompt slot), so on the CPU a
resumed run already equals an uninterrupted one. On a GPU the same inputs can still give different bits:
cuBLAS splits reductions differently from call to call unless its workspace is fixed, cuDNN and the
memory-efficient attention kernel pick or run non-deterministic algorithms, and atomics in backward
kernels add in arrival order. These switches close each of those doors, at a cost in speed that the
README reports.
"""

from __future__ import annotations

import os

import torch

# cuBLAS reads this when a handle is created: set before the first matmul on the GPU, it fixes the
# workspace so that reductions split the same way every call (CUDA's documented setting).
CUBLAS_WORKSPACE = ":4096:8"


def make_deterministic() -> None:
    """Deterministic algorithms everywhere (an op without a deterministic kernel raises, naming itself, rather
    than silently differing), a fixed cuBLAS workspace, cuDNN without autotuning and only its deterministic
    algorithms, and scaled-dot-product attention limited to the kernels whose backward is deterministic
    (flash, and math as its fallback): the memory-efficient and cuDNN kernels are switched off."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
