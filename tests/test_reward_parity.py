"""egrpo's pretrained rewards against their authors' code: scores of hpsv2, PickScore's recipe, CLIP score and
ImageReward recorded by ``tools/reward_reference.py`` on tiny seeded weights, 21 images x 12 prompts each.

The fixtures hold tensor names, shapes and seeds; the weights are rebuilt here bit for bit, saved in each
published format and loaded through the rewards' normal options. The tolerances are the measured bounds stated
in docs/real-rewards.md.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from egrpo.rewards import build

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reward_reference", ROOT / "tools" / "reward_reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)
FIXTURES = reference.FIXTURES

# largest |egrpo - reference| allowed, per reward; see docs/real-rewards.md for what makes up each gap
TOLERANCE = {"hps": 1e-5, "clip": 3e-4, "pickscore": 0.03, "imagereward": 5e-4}


def _fixture(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _state(record):
    return {k: torch.from_numpy(v) for k, v in reference.weights(record["tensors"], record["seed"]).items()}


def _checkpoint(name, record, tmp_path):
    """The tiny model saved as its published checkpoint is saved: a pickle for hps and imagereward, a transformers
    folder for clip and pickscore."""
    if name == "hps":
        torch.save({"state_dict": _state(record)}, tmp_path / "HPS_v2.1_compressed.pt")
        return {"checkpoint": str(tmp_path), "tokenizer": str(FIXTURES / reference.CLIP_BPE)}
    if name == "imagereward":
        torch.save(_state(record), tmp_path / "ImageReward.pt")
        (tmp_path / "bert").mkdir()
        (tmp_path / "bert" / "vocab.txt").write_text((FIXTURES / reference.BERT_VOCAB).read_text())
        return {"checkpoint": str(tmp_path), "tokenizer": str(tmp_path / "bert")}
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(record["config"]))
    save_file(_state(record), tmp_path / "model.safetensors")
    return {"checkpoint": str(tmp_path), "tokenizer": str(FIXTURES / f"{name}_tokenizer")}


def _scores(reward, record):
    """egrpo's scores, (images, prompts), one batch per image with the image repeated once per prompt."""
    sizes = {name: (h, w, kind) for name, h, w, kind in reference.IMAGES}
    rows = []
    for name in record["images"]:
        pixels = torch.from_numpy(reference.image(*sizes[name])).permute(2, 0, 1).float().div(255)
        batch = pixels.unsqueeze(0).expand(len(record["prompts"]), -1, -1, -1)
        rows.append(reward(batch, record["prompts"]).tolist())
    return np.array(rows)


@pytest.mark.parametrize("name", ["hps", "pickscore", "clip", "imagereward", "hps-pad!"])
def test_scores_match_the_authors_code(name, tmp_path):
    """``hps-pad!``: HPS with a tokenizer folder whose pad token is '!' (as LAION's ViT-H-14 folder saves it),
    which open_clip's tokenizer, with no special token but its two ends, never splits out."""
    name, pad_folder = name.removesuffix("-pad!"), name.endswith("-pad!")
    record = _fixture(name)
    expected = np.array(record["scores"])
    # a fixture whose scores do not move with the image or the prompt could not catch a preprocessing or
    # tokenisation gap
    assert expected.std(axis=0).min() > 0 and expected.std(axis=1).min() > 0
    options = _checkpoint(name, record, tmp_path)
    if pad_folder:
        options["tokenizer"] = str(FIXTURES / "pickscore_tokenizer")
    reward = build(name, device="cpu", **options)
    got = _scores(reward, record)
    gap = np.abs(got - expected)
    worst = np.unravel_index(gap.argmax(), gap.shape)
    assert gap.max() <= TOLERANCE[name], (
        f"{name}: largest gap {gap.max():.3g} on image {record['images'][worst[0]]!r}, "
        f"prompt {record['prompts'][worst[1]]!r}; spread of the reference over images {expected.std(0).mean():.3g}"
    )
