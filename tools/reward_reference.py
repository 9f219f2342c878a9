"""Score fixed images and prompts with the reward authors' own code, on tiny random weights.

This writes the fixtures under ``tests/fixtures/reward_parity/`` that ``tests/test_reward_parity.py`` holds
egrpo's rewards to. The authors' packages cannot share a virtual environment with egrpo (their torch, torchvision
and transformers pins clash with egrpo's), so this script runs in two reference environments of its own:

    # hps: hpsv2 1.2.0 with its bundled open_clip
    python -m venv ref-openclip
    ref-openclip/bin/pip install torch==2.14.1 torchvision==0.29.1
    ref-openclip/bin/pip install open_clip_torch requests clint einops ftfy
    ref-openclip/bin/pip install --no-deps hpsv2==1.2.0
    # the hpsv2 wheel lacks the BPE vocabulary its tokenizer opens at import
    cp ref-openclip/lib/python3*/site-packages/open_clip/bpe_simple_vocab_16e6.txt.gz \\
       ref-openclip/lib/python3*/site-packages/hpsv2/src/open_clip/

    # pickscore, clip, imagereward: transformers 4 (PickScore's README recipe) and image-reward 1.5
    python -m venv ref-ir
    ref-ir/bin/pip install torch==2.14.1 torchvision==0.29.1
    ref-ir/bin/pip install transformers==4.36.2 timm==0.6.13 setuptools wheel
    ref-ir/bin/pip install --no-build-isolation fairscale==0.4.13
    ref-ir/bin/pip install --no-deps image-reward==1.5

    ref-openclip/bin/python tools/reward_reference.py hps          # first: it also writes the CLIP vocabulary
    ref-ir/bin/python tools/reward_reference.py pickscore clip imagereward

Nothing is downloaded: each reward's model is built at a tiny size with the authors' own classes, its weights are
drawn from a seeded numpy generator (``weights``) in the published checkpoint's tensor names, and its tokenizer
vocabulary is a prefix of the published one. The fixture stores the tensor names and shapes, not the weights:
``weights`` rebuilds them bit for bit in either environment. Images are 8-bit and rebuilt by ``image``.

The top of this module needs numpy only, so the tests import it for ``image``, ``weights`` and the file layout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reward_parity"
CLIP_BPE = "clip_bpe"  # vocab.json + merges.txt: the first CLIP_MERGES merges of CLIP's BPE
CLIP_MERGES = 3000
BERT_VOCAB = "bert_vocab.txt"

# name, height, width, kind: square and non-square, down- and upsampled, odd margins for the crop and the letterbox;
# then tall and wide (Pillow filters the height first when it shrinks by more than twice the width's pixels), small
# upscales (many exact halves, which Pillow rounds up), 1-pixel margins and odd crop margins, on diagonal stripes too
IMAGES = [
    ("smooth_224x224", 224, 224, "smooth"),
    ("sharp_224x224", 224, 224, "sharp"),
    ("smooth_224x299", 224, 299, "smooth"),
    ("sharp_299x224", 299, 224, "sharp"),
    ("smooth_384x512", 384, 512, "smooth"),
    ("sharp_300x200", 300, 200, "sharp"),
    ("smooth_64x96", 64, 96, "smooth"),
    ("sharp_480x640", 480, 640, "sharp"),
    ("smooth_1024x1024", 1024, 1024, "smooth"),
    ("stripes_900x225", 900, 225, "stripes"),
    ("sharp_1000x250", 1000, 250, "sharp"),
    ("lines_250x1000", 250, 1000, "lines"),
    ("smooth_333x517", 333, 517, "smooth"),
    ("sharp_517x333", 517, 333, "sharp"),
    ("lines_225x224", 225, 224, "lines"),
    ("sharp_224x225", 224, 225, "sharp"),
    ("sharp_128x128", 128, 128, "sharp"),
    ("stripes_128x96", 128, 96, "stripes"),
    ("smooth_768x1344", 768, 1344, "smooth"),
    ("stripes_450x602", 450, 602, "stripes"),
    ("lines_97x131", 97, 131, "lines"),
]

# plain, and every kind of text the prompt files of HPD and Pick-a-Pic hold that a cleaner changes
PROMPTS = [
    "a photo of a cat sitting on a red chair",
    "A BIG Red Balloon over the Harbour",
    "the sign says \u201copen\u201d and it\u2019s raining",
    "salt &amp; pepper &quot;shakers&quot; &lt;3",
    "rock &amp;amp; roll poster",
    "\uff26\uff35\uff2c\uff2c width text \uff21\uff22\uff23\uff11\uff12\uff13",
    "\ufb01ne \ufb02owers in the \ufb01eld",
    "caf\u00c3\u00a9 au lait on a table",
    "  lots   of\tspaces\n and newlines  ",
    "wow! a dog!! jumping",
    "Ein Caf\u00e9 in M\u00fcnchen, \u6771\u4eac\u306e\u591c",
    " ".join(["a very long prompt about a castle on a hill at sunset with dragons flying"] * 8),
]


def image(height: int, width: int, kind: str, seed: int = 0) -> np.ndarray:
    """An 8-bit RGB image (H, W, 3): ``smooth`` is low-frequency colour waves, ``sharp`` is per-pixel noise over
    hard-edged blocks, which is where resampling rules differ most; ``stripes`` are 3-pixel diagonal stripes
    (``((x + y) // 3) % 2 * 255`` in the first channel) and ``lines`` 1-pixel ones, black and white and their
    inverse in the other channels, where an 8-bit rounding between two passes moves levels furthest."""
    if kind in ("stripes", "lines"):
        y, x = np.mgrid[0:height, 0:width]
        a = ((x + y) // 3) % 2 * 255 if kind == "stripes" else (x + y) % 2 * 255
        b = ((x - y) // 3) % 2 * 255 if kind == "stripes" else (x + 2 * y) % 3 * 127
        return np.stack([a, 255 - a, b], -1).astype(np.uint8)
    rng = np.random.default_rng([seed, height, width, kind == "sharp"])
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    if kind == "smooth":
        phase = rng.uniform(0, 2 * np.pi, 3)
        freq = rng.uniform(1, 4, (3, 2))
        channels = [0.5 + 0.45 * np.sin(2 * np.pi * (f[0] * y + f[1] * x) + p) for f, p in zip(freq, phase)]
        out = np.stack(channels, -1)
    else:
        blocks = rng.uniform(0, 1, (8, 8, 3))[(y * 7.999).astype(int), (x * 7.999).astype(int)]
        out = 0.6 * blocks + 0.4 * rng.uniform(0, 1, (height, width, 3))
    return np.round(out * 255).clip(0, 255).astype(np.uint8)


def init(name: str, shape: list[int]) -> tuple[float, float]:
    """(mean, std) of a tensor: norms near 1, biases near 0, matrices scaled by fan-in so activations stay O(1)."""
    last = name.rsplit(".", 1)[-1]
    if name.endswith("logit_scale"):
        return math.log(100.0), 0.0
    if any(k in name.lower() for k in ("norm", "ln_")) and last == "weight":
        return 1.0, 0.1
    if last == "bias" or len(shape) < 2:
        return 0.0, 0.02
    if any(k in name for k in ("embedding", "embed", "cls_token", "class_")):
        return 0.0, 0.1
    if name.endswith(("visual.proj", "text_projection")) and len(shape) == 2:
        return 0.0, 1.0 / math.sqrt(shape[0])  # open_clip multiplies x @ proj: fan-in is the first axis
    return 0.0, 1.0 / math.sqrt(int(np.prod(shape[1:])))


def weights(tensors: list[list], seed: int) -> dict[str, np.ndarray]:
    """float32 arrays for ``[[name, shape], ...]``, drawn in that order from one seeded generator."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in tensors:
        mean, std = init(name, shape)
        out[name] = np.asarray(mean + std * rng.standard_normal(shape), dtype=np.float32)
    return out


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's and GPT-2's reversible map from bytes to printable characters: the BPE's alphabet."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1)]
    printable += range(ord("\u00ae"), ord("\u00ff") + 1)
    others = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + others, printable + [256 + i for i in range(len(others))])}


def clip_vocab(merges: list[str]) -> dict[str, int]:
    """CLIP's vocabulary layout: the 256 byte characters, the same ending a word, the merges, then the two
    special tokens with the highest ids."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges]
    return {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}


def _fixture(name: str) -> Path:
    return FIXTURES / name


def _write(name: str, record: dict) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    _fixture(f"{name}.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {_fixture(name + '.json')}: {len(record['scores'])} images x {len(record['scores'][0])} prompts")


def _pil_images():
    from PIL import Image

    return [(name, Image.fromarray(image(h, w, kind))) for name, h, w, kind in IMAGES]


def _load_into(module, tensors: dict[str, np.ndarray], scored: tuple[str, ...] = ("",)) -> None:
    """Load ``tensors``, requiring every tensor under the ``scored`` prefixes (the modules the score runs)."""
    import torch

    missing, unexpected = module.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    left = sorted(k for k in missing if k.startswith(scored) and not k.endswith("position_ids"))
    if left or unexpected:
        raise SystemExit(f"weights do not cover the module: missing {left[:5]}, unexpected {unexpected[:5]}")


def _versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in packages}


# hps: hpsv2.score() -------------------------------------------------------------------------------------------

HPS_TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 160, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 512 + CLIP_MERGES + 2, "width": 64, "heads": 1, "layers": 2},
}


def reference_hps(seed: int = 10) -> None:
    import gzip

    import hpsv2.img_score as img_score
    import torch
    from hpsv2.src.open_clip import factory, tokenizer

    # the first merges of CLIP's BPE, as the vocabulary of the tiny text tower and of egrpo's tokenizer folder
    lines = gzip.open(tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    header, merges = lines[0], lines[1 : CLIP_MERGES + 1]
    bpe = _fixture(CLIP_BPE)
    bpe.mkdir(parents=True, exist_ok=True)
    # transformers reads merges.txt with the header its hub folders carry
    (bpe / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    (bpe / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False))
    small = FIXTURES / "_merges.txt.gz"
    small.write_bytes(gzip.compress("\n".join([header, *merges]).encode()))
    tokenizer._tokenizer = tokenizer.SimpleTokenizer(str(small))
    small.unlink()

    # hpsv2.score() builds ViT-H-14 with its own arguments; keep every argument but the architecture
    factory._MODEL_CONFIGS["tiny-hps"] = HPS_TINY
    build = factory.create_model_and_transforms

    def tiny(model_name, pretrained=None, **kwargs):
        return build("tiny-hps", None, **kwargs)

    img_score.create_model_and_transforms = tiny
    img_score.initialize_model()
    model = img_score.model_dict["model"]
    names = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    checkpoint = FIXTURES / "_hps.pt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in weights(names, seed).items()}}, checkpoint)
    scores = []
    for _, pil in _pil_images():
        scores.append([float(img_score.score(pil, prompt, cp=str(checkpoint))[0]) for prompt in PROMPTS])
    checkpoint.unlink()
    _write(
        "hps",
        {
            "reference": "hpsv2.score(image, prompt, cp=...) with hpsv2's create_model_and_transforms arguments "
            "(light_augmentation=True, precision='amp'; autocast is off without CUDA)",
            "versions": _versions("hpsv2", "torch", "torchvision", "ftfy"),
            "checkpoint": "{'state_dict': ...} in open_clip names",
            "seed": seed,
            "tensors": names,
            "images": [i[0] for i in IMAGES],
            "prompts": PROMPTS,
            "scores": scores,
        },
    )


# pickscore and clip: the transformers recipe of PickScore's README -------------------------------------------


def _clip_tokenizer(pad_token: str):
    from transformers import CLIPTokenizerFast

    bpe = _fixture(CLIP_BPE)
    if not (bpe / "vocab.json").exists():
        raise SystemExit(f"{bpe} is missing: run `tools/reward_reference.py hps` in the open_clip environment first")
    return CLIPTokenizerFast(str(bpe / "vocab.json"), str(bpe / "merges.txt"), pad_token=pad_token)


def reference_clip_family(name: str, seed: int) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    # PickScore is tuned from LAION's ViT-H-14 (GELU, its tokenizer pads with '!'); CLIP score uses OpenAI's
    # ViT-L-14 (quick GELU, pads with <|endoftext|>)
    act, pad = ("gelu", "!") if name == "pickscore" else ("quick_gelu", "<|endoftext|>")
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, hidden_act=act)
    vocab = 512 + CLIP_MERGES + 2
    # the text is pooled at <|endoftext|>, the last id; the published configs name it by id as well
    special = dict(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=1)
    config = CLIPConfig(
        text_config=dict(tower, **special, vocab_size=vocab, max_position_embeddings=77),
        vision_config=dict(tower, image_size=224, patch_size=16),
        projection_dim=32,
    )
    model = CLIPModel(config).eval()
    names = [[k, list(v.shape)] for k, v in model.state_dict().items() if not k.endswith("position_ids")]
    _load_into(model, weights(names, seed))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=_clip_tokenizer(pad))
    tokenizer_dir = _fixture(f"{name}_tokenizer")
    processor.tokenizer.save_pretrained(tokenizer_dir, legacy_format=False)
    scores = []
    for _, pil in _pil_images():
        # PickScore's README: processor(images=...) and processor(text=..., padding, truncation, max_length=77)
        image_inputs = processor(images=[pil], return_tensors="pt")
        text_inputs = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            image_embs = model.get_image_features(**image_inputs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            cos = (text_embs @ image_embs.T)[:, 0]
            score = model.logit_scale.exp() * cos if name == "pickscore" else cos
        scores.append(score.tolist())
    _write(
        name,
        {
            "reference": "PickScore's README recipe: CLIPProcessor + CLIPModel.get_image_features / "
            "get_text_features, " + ("logit_scale.exp() * cosine" if name == "pickscore" else "the cosine"),
            "versions": _versions("transformers", "torch", "Pillow"),
            "config": config.to_dict(),
            "seed": seed,
            "tensors": names,
            "images": [i[0] for i in IMAGES],
            "prompts": PROMPTS,
            "scores": scores,
        },
    )


# imagereward: ImageReward.score() -----------------------------------------------------------------------------


def _bert_vocab() -> list[str]:
    """A small uncased WordPiece vocabulary that covers the prompts: whole words for some, pieces for the rest."""
    from transformers.models.bert.tokenization_bert import BasicTokenizer

    words = sorted({w for p in PROMPTS for w in BasicTokenizer(do_lower_case=True).tokenize(p)})
    chars = sorted({c for w in words for c in w})
    whole = [w for w in words if len(w) > 1 and len(w) % 2]  # the others are spelled from pieces
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *[f"##{c}" for c in chars], *whole]


def reference_imagereward(seed: int = 40) -> None:
    import importlib.util
    import types

    import torch
    from transformers import BertTokenizer

    # import ImageReward's model modules without its package __init__, which imports diffusers, datasets and clip
    root = Path(importlib.util.find_spec("ImageReward").origin).parent
    for package, folder in (("ImageReward", root), ("ImageReward.models", root / "models")):
        module = types.ModuleType(package)
        module.__path__ = [str(folder)]
        sys.modules[package] = module
    from ImageReward import ImageReward as ir_module
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    vocab = _fixture(BERT_VOCAB)
    vocab.write_text("\n".join(_bert_vocab()) + "\n")

    def tiny_vit(vit, image_size, *args):
        return VisionTransformer(img_size=image_size, patch_size=16, embed_dim=64, depth=2, num_heads=1), 64

    def tokenizer():
        # blip.init_tokenizer() on a local vocabulary instead of bert-base-uncased
        tok = BertTokenizer(str(vocab))
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.additional_special_tokens_ids[0]
        return tok

    blip_pretrain.create_vit = tiny_vit
    blip_pretrain.init_tokenizer = tokenizer
    med = {
        "architectures": ["BertModel"],
        "hidden_act": "gelu",
        "hidden_size": 768,  # ImageReward's head is MLP(768)
        "intermediate_size": 128,
        "num_attention_heads": 12,
        "num_hidden_layers": 2,
        "max_position_embeddings": 64,
        "layer_norm_eps": 1e-12,
        "type_vocab_size": 2,
        "pad_token_id": 0,
        "vocab_size": len(vocab.read_text().split()) + 2,
        "encoder_width": 64,
        "add_cross_attention": True,
        "model_type": "bert",
    }
    med_path = FIXTURES / "_med_config.json"
    med_path.write_text(json.dumps(med))
    model = ir_module.ImageReward(med_config=str(med_path), device="cpu").eval()
    med_path.unlink()
    # the tensors ImageReward's score() runs, in ImageReward.pt's names
    scored = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")
    names = [
        [k, list(v.shape)]
        for k, v in model.state_dict().items()
        if k.startswith(scored) and not k.endswith("position_ids")
    ]
    _load_into(model, weights(names, seed), scored)
    scores = []
    with torch.no_grad():
        for _, pil in _pil_images():
            scores.append([float(model.score(prompt, pil)) for prompt in PROMPTS])
    _write(
        "imagereward",
        {
            "reference": "ImageReward.ImageReward(med_config).score(prompt, image), BLIP ViT and BERT at tiny sizes",
            "versions": _versions("image-reward", "transformers", "timm", "torch", "torchvision", "Pillow"),
            "seed": seed,
            "tensors": names,
            "images": [i[0] for i in IMAGES],
            "prompts": PROMPTS,
            "scores": scores,
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rewards", nargs="+", choices=["hps", "pickscore", "clip", "imagereward"])
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the fixtures do not depend on the thread count, but the machine's load should not
    for name in args.rewards:
        if name == "hps":
            reference_hps()
        elif name == "imagereward":
            reference_imagereward()
        else:
            reference_clip_family(name, seed={"pickscore": 20, "clip": 30}[name])


if __name__ == "__main__":
    main()
