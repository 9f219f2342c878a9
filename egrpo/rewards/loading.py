"""Finding and loading the weights of the pretrained rewards, with errors a user can act on.

A ``checkpoint`` option is a local path or, on a machine that reaches the Hugging Face Hub, a hub
repository id. Every failure to find or read weights is a ``RewardWeightsError``, a
``FileNotFoundError``, so the CLI prints its one-line message instead of a traceback.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

import torch

from egrpo.errors import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RewardWeightsError(FileNotFoundError):
    """The weights (or tokenizer) of a pretrained reward are missing or unreadable."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not a local path: only such a name is looked up on the hub."""
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def locate_file(reward: str, checkpoint: str, filename: str, hint: str) -> str:
    """The local file for ``checkpoint``: a file, a folder holding ``filename``, or a hub repo holding it."""
    path = os.path.expanduser(checkpoint)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, filename)):
        return os.path.join(path, filename)
    if is_hub_id(checkpoint):
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(checkpoint, filename)
        except (OSError, ValueError) as exc:
            raise RewardWeightsError(
                f"{reward}: cannot fetch {filename} from the hub repo {checkpoint!r} ({_first_line(exc)}); {hint}"
            ) from None
    raise RewardWeightsError(f"{reward}: weights not found at {checkpoint}; {hint}")


def read_checkpoint(reward: str, path: str, hint: str) -> dict:
    """A torch pickle of tensors, read without executing code (``weights_only``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file fails in many ways; all mean the same to the user
        raise RewardWeightsError(
            f"{reward}: cannot read {path} as a torch checkpoint of tensors ({_first_line(exc)}); {hint}"
        ) from None


def load_pretrained(reward: str, cls, name: str, what: str, hint: str):
    """``cls.from_pretrained(name)`` with a missing folder or an unreachable hub id reported in one line."""
    if not os.path.exists(os.path.expanduser(name)) and not is_hub_id(name):
        raise RewardWeightsError(f"{reward}: {what} not found at {name}; {hint}")
    try:
        return cls.from_pretrained(os.path.expanduser(name))
    except (OSError, ValueError) as exc:
        raise RewardWeightsError(
            f"{reward}: cannot load the {what} from {name!r} ({_first_line(exc)}); {hint}"
        ) from None


def resolve_dtype(reward: str, dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ConfigError(f"reward.{reward}.dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


@contextmanager
def skip_weight_init():
    """Build a model whose weights are about to be overwritten without paying for a random init (seconds at 1B
    parameters); the context manager moved between transformers 4 and 5."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


def freeze(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
