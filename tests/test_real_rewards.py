"""The pretrained rewards (hps, clip, pickscore, imagereward) on tiny random weights saved in each published format.

Each score is checked against a computation that does not go through the reward's code: a plain-torch
forward written against the checkpoint's own tensor names (HPS: open_clip; ImageReward: BLIP + BERT +
MLP head), or transformers' public feature API (clip, pickscore).
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from egrpo.cli import main
from egrpo.config import ConfigError
from egrpo.rewards import build
from egrpo.rewards.clip_family import CLIP_MEAN, CLIP_STD, clip_preprocess
from egrpo.rewards.loading import RewardWeightsError

PATCH, GRID, LAYERS = 8, 4, 2
IMAGE = PATCH * GRID
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "drawing", "##s"]
PROMPTS = ["a photo of a cat", "a red dog", "a blue drawing of dogs", "a photo of a cat"]


def _images(n, h=40, w=48, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# tokenizers from in-memory vocabularies -------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE in CLIP's layout: letters, letters ending a word, a few merges, then <|startoftext|>,
    <|endoftext|> as the last (highest) ids."""
    path = tmp_path_factory.mktemp("clip_tokenizer")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return path


@pytest.fixture(scope="module")
def bert_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert_tokenizer")
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return path


def _clip_tokenizer(path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))


# plain-torch building blocks for the reference forwards ---------------------------------------------------


def _ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _attend(q, k, v, heads, mask=None):
    b, lq, d = q.shape

    def split(t):
        return t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)

    weights = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        weights = weights + mask
    return (weights.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, lq, d)


class _Weights:
    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *shape, scale=None):
        scale = shape[-1] ** -0.5 if scale is None else scale
        return torch.randn(*shape, generator=self.generator) * scale

    def norm(self, sd, name, width):
        sd[name + ".weight"] = 1 + self(width, scale=0.1)
        sd[name + ".bias"] = self(width, scale=0.1)

    def linear(self, sd, name, n_in, n_out):
        sd[name + ".weight"] = self(n_out, n_in)
        sd[name + ".bias"] = self(n_out, scale=0.1)


# hps: open_clip checkpoint -> CLIPModel ---------------------------------------------------------------------

# two heads per tower at the head widths of open_clip ViT-H-14 (80 image, 64 text)
OC_VISION, OC_TEXT, OC_EMBED, OC_CONTEXT = 160, 128, 48, 16


def _open_clip_tower(w, sd, prefix, width):
    for i in range(LAYERS):
        p = f"{prefix}{i}."
        w.norm(sd, p + "ln_1", width)
        sd[p + "attn.in_proj_weight"] = w(3 * width, width)
        sd[p + "attn.in_proj_bias"] = w(3 * width, scale=0.1)
        w.linear(sd, p + "attn.out_proj", width, width)
        w.norm(sd, p + "ln_2", width)
        w.linear(sd, p + "mlp.c_fc", width, 4 * width)
        w.linear(sd, p + "mlp.c_proj", 4 * width, width)


def _open_clip_state_dict(vocab_size):
    w, sd = _Weights(1), {}
    sd["visual.conv1.weight"] = w(OC_VISION, 3, PATCH, PATCH, scale=0.2)
    sd["visual.class_embedding"] = w(OC_VISION, scale=0.5)
    sd["visual.positional_embedding"] = w(GRID * GRID + 1, OC_VISION, scale=0.5)
    w.norm(sd, "visual.ln_pre", OC_VISION)
    _open_clip_tower(w, sd, "visual.transformer.resblocks.", OC_VISION)
    w.norm(sd, "visual.ln_post", OC_VISION)
    sd["visual.proj"] = w(OC_VISION, OC_EMBED)
    sd["token_embedding.weight"] = w(vocab_size, OC_TEXT, scale=0.5)
    sd["positional_embedding"] = w(OC_CONTEXT, OC_TEXT, scale=0.5)
    _open_clip_tower(w, sd, "transformer.resblocks.", OC_TEXT)
    w.norm(sd, "ln_final", OC_TEXT)
    sd["text_projection"] = w(OC_TEXT, OC_EMBED)
    sd["logit_scale"] = torch.tensor(math.log(100.0))
    sd["attn_mask"] = torch.full((OC_CONTEXT, OC_CONTEXT), float("-inf")).triu(1)
    return sd


def _open_clip_blocks_forward(x, sd, prefix, heads, mask=None):
    for i in range(LAYERS):
        p = f"{prefix}{i}."
        h = _ln(x, sd, p + "ln_1", 1e-5)
        q, k, v = F.linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).chunk(3, -1)
        x = x + _lin(_attend(q, k, v, heads, mask), sd, p + "attn.out_proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, p + "ln_2", 1e-5), sd, p + "mlp.c_fc")), sd, p + "mlp.c_proj")
    return x


def _open_clip_score(sd, pixels, text):
    """open_clip's CLIP forward and hpsv2's score: cosine of normalised features, eot pooled at argmax(text)."""
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = _open_clip_blocks_forward(_ln(x, sd, "visual.ln_pre", 1e-5), sd, "visual.transformer.resblocks.", 2)
    image = _ln(x[:, 0], sd, "visual.ln_post", 1e-5) @ sd["visual.proj"]
    t = sd["token_embedding.weight"][text] + sd["positional_embedding"][: text.shape[1]]
    t = _open_clip_blocks_forward(t, sd, "transformer.resblocks.", 2, sd["attn_mask"][: text.shape[1], : text.shape[1]])
    t = _ln(t, sd, "ln_final", 1e-5)
    pooled = t[torch.arange(len(t)), text.argmax(-1)] @ sd["text_projection"]
    return (F.normalize(image, dim=-1) * F.normalize(pooled, dim=-1)).sum(-1)


def test_hps_scores_an_open_clip_checkpoint_as_open_clip_does(tmp_path, clip_tokenizer_dir):
    tokenizer = _clip_tokenizer(clip_tokenizer_dir)
    sd = _open_clip_state_dict(len(tokenizer))
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"epoch": 1, "state_dict": sd}, path)  # the layout hpsv2 reads: checkpoint['state_dict']

    reward = build("hps", checkpoint=str(tmp_path), tokenizer=str(clip_tokenizer_dir), device="cpu", batch_size=3)
    images = _images(len(PROMPTS))
    scores = reward(images, PROMPTS)

    # open_clip's tokenizer pads with 0 after <|endoftext|> to the context length
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=OC_CONTEXT, truncation=True, return_tensors="pt")
    pixels = clip_preprocess(images, IMAGE, fit="letterbox", pil=False)  # hpsv2 letterboxes the float tensor
    expected = _open_clip_score(sd, pixels, tokens["input_ids"] * tokens["attention_mask"])
    assert scores.shape == (len(PROMPTS),)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


# clip, pickscore: transformers CLIP folders ------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, clip_tokenizer_dir):
    from transformers import CLIPConfig, CLIPModel

    tokenizer = _clip_tokenizer(clip_tokenizer_dir)
    torch.manual_seed(0)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), max_position_embeddings=OC_CONTEXT, eos_token_id=tokenizer.eos_token_id, **sizes
        ),
        vision_config=dict(image_size=IMAGE, patch_size=PATCH, **sizes),
        projection_dim=32,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    path = tmp_path_factory.mktemp("clip_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 4 returns the tensor, 5 an output


@torch.no_grad()
def _transformers_cosine(model, tokenizer, images, prompts):
    image = _features(model.get_image_features(pixel_values=clip_preprocess(images, IMAGE)))
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=OC_CONTEXT, return_tensors="pt")
    text = _features(model.get_text_features(**tokens))
    return (image / image.norm(dim=-1, keepdim=True) * (text / text.norm(dim=-1, keepdim=True))).sum(-1)


def test_clip_is_the_raw_cosine_of_the_models_features(clip_folder):
    path, model, tokenizer = clip_folder
    reward = build("clip", checkpoint=str(path), device="cpu", batch_size=3)  # tokenizer from the same folder
    images = _images(len(PROMPTS), seed=1)
    scores = reward(images, PROMPTS)
    torch.testing.assert_close(scores, _transformers_cosine(model, tokenizer, images, PROMPTS), atol=1e-5, rtol=1e-5)
    assert scores.abs().max() <= 1.0
    assert not reward.model.training and not any(p.requires_grad for p in reward.model.parameters())
    assert not reward(images.requires_grad_(), PROMPTS).requires_grad

    gray = images[:, :1]
    torch.testing.assert_close(reward(gray, PROMPTS), reward(gray.repeat(1, 3, 1, 1), PROMPTS))


def test_eval_and_the_hacking_gallery_score_with_clip(clip_folder, tmp_path):
    """`egrpo eval` / `figures failures` with a configured real reward: its scores, per held-out sample."""
    path, model, tokenizer = clip_folder
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat seven\na red dog three\n")
    options = ["reward.clip=1", f"reward.clip.checkpoint={path}", "reward.clip.device=cpu", "reward.alignment=0"]
    assert main(["eval", "base", *options, "--prompts", str(prompts), "--seeds", "2", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "eval.json").read_text())["base"]
    from egrpo.evaluation import generate

    gen = generate("base", [*options, f"prompts.eval={prompts}", "eval.seeds_per_prompt=2"])
    expected = _transformers_cosine(model, tokenizer, gen.images.repeat(1, 3, 1, 1), gen.prompts)
    assert row["clip"] == pytest.approx(expected.mean().item(), abs=1e-5)
    out = tmp_path / "failures.png"
    args = ["figures", "failures", "base", "base", *options, "--reward", "clip", "--check", "alignment",
            "--prompts", str(prompts), "--out", str(out)]
    assert main(args) == 0
    assert json.loads(out.with_suffix(".json").read_text())["cases"] == []


def test_pickscore_is_logit_scale_times_the_cosine(clip_folder, clip_tokenizer_dir):
    path, model, tokenizer = clip_folder
    reward = build("pickscore", checkpoint=str(path), tokenizer=str(clip_tokenizer_dir), device="cpu")
    images = _images(3, h=64, w=36, seed=2)
    prompts = PROMPTS[:3]
    expected = 30.0 * _transformers_cosine(model, tokenizer, images, prompts)
    torch.testing.assert_close(reward(images, prompts), expected, atol=1e-4, rtol=1e-5)


# imagereward: ImageReward.pt -> BLIP + BERT + head ------------------------------------------------------------

IR_WIDTH, IR_TEXT, IR_POSITIONS, IR_HEAD = 128, 128, 40, [128, 32, 16, 8, 4, 1]
IR_LINEARS = [0, 2, 4, 6, 7]  # nn.Sequential indices of ImageReward's MLP Linears (Dropouts between)


def _imagereward_state_dict(vocab_size):
    w, sd = _Weights(2), {}
    v, b = "blip.visual_encoder.", "blip.text_encoder."
    sd[v + "patch_embed.proj.weight"] = w(IR_WIDTH, 3, PATCH, PATCH, scale=0.2)
    sd[v + "patch_embed.proj.bias"] = w(IR_WIDTH, scale=0.1)
    sd[v + "cls_token"] = w(1, 1, IR_WIDTH, scale=0.5)
    sd[v + "pos_embed"] = w(1, GRID * GRID + 1, IR_WIDTH, scale=0.5)
    for i in range(LAYERS):
        p = f"{v}blocks.{i}."
        w.norm(sd, p + "norm1", IR_WIDTH)
        w.linear(sd, p + "attn.qkv", IR_WIDTH, 3 * IR_WIDTH)
        w.linear(sd, p + "attn.proj", IR_WIDTH, IR_WIDTH)
        w.norm(sd, p + "norm2", IR_WIDTH)
        w.linear(sd, p + "mlp.fc1", IR_WIDTH, 4 * IR_WIDTH)
        w.linear(sd, p + "mlp.fc2", 4 * IR_WIDTH, IR_WIDTH)
    w.norm(sd, v + "norm", IR_WIDTH)
    sd[b + "embeddings.word_embeddings.weight"] = w(vocab_size, IR_TEXT, scale=0.5)
    sd[b + "embeddings.position_embeddings.weight"] = w(IR_POSITIONS, IR_TEXT, scale=0.5)
    sd[b + "embeddings.position_ids"] = torch.arange(IR_POSITIONS)[None]  # a persistent buffer in BLIP's med.py
    w.norm(sd, b + "embeddings.LayerNorm", IR_TEXT)
    for i in range(LAYERS):
        p = f"{b}encoder.layer.{i}."
        for block, kv_width in (("attention", IR_TEXT), ("crossattention", IR_WIDTH)):
            w.linear(sd, p + block + ".self.query", IR_TEXT, IR_TEXT)
            w.linear(sd, p + block + ".self.key", kv_width, IR_TEXT)
            w.linear(sd, p + block + ".self.value", kv_width, IR_TEXT)
            w.linear(sd, p + block + ".output.dense", IR_TEXT, IR_TEXT)
            w.norm(sd, p + block + ".output.LayerNorm", IR_TEXT)
        w.linear(sd, p + "intermediate.dense", IR_TEXT, 2 * IR_TEXT)
        w.linear(sd, p + "output.dense", 2 * IR_TEXT, IR_TEXT)
        w.norm(sd, p + "output.LayerNorm", IR_TEXT)
    for index, n_in, n_out in zip(IR_LINEARS, IR_HEAD, IR_HEAD[1:]):
        w.linear(sd, f"mlp.layers.{index}", n_in, n_out)
    w.linear(sd, "blip.vision_proj", IR_WIDTH, 16)  # unused by score(), present in the checkpoint
    w.linear(sd, "blip.text_proj", IR_TEXT, 16)
    return sd


def _imagereward_score(sd, pixels, ids, mask):
    """ImageReward.score(): BLIP ViT (LayerNorm eps 1e-6), BERT with cross-attention to every image token, MLP head."""
    v, b = "blip.visual_encoder.", "blip.text_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    for i in range(LAYERS):
        p = f"{v}blocks.{i}."
        q, k, val = _lin(_ln(x, sd, p + "norm1", 1e-6), sd, p + "attn.qkv").chunk(3, -1)
        x = x + _lin(_attend(q, k, val, 2), sd, p + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, p + "norm2", 1e-6), sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
    image = _ln(x, sd, v + "norm", 1e-6)

    t = sd[b + "embeddings.word_embeddings.weight"][ids]
    t = _ln(t + sd[b + "embeddings.position_embeddings.weight"][: ids.shape[1]], sd, b + "embeddings.LayerNorm", 1e-12)
    padding = (1.0 - mask[:, None, None, :].float()) * -10000.0  # BERT's extended attention mask
    for i in range(LAYERS):
        p = f"{b}encoder.layer.{i}."

        def attention(h, kv, block, m, p=p):
            a = _attend(_lin(h, sd, f"{p}{block}.self.query"), _lin(kv, sd, f"{p}{block}.self.key"),
                        _lin(kv, sd, f"{p}{block}.self.value"), 2, m)
            return _ln(_lin(a, sd, f"{p}{block}.output.dense") + h, sd, f"{p}{block}.output.LayerNorm", 1e-12)

        t = attention(attention(t, t, "attention", padding), image, "crossattention", None)
        hidden = F.gelu(_lin(t, sd, p + "intermediate.dense"))
        t = _ln(_lin(hidden, sd, p + "output.dense") + t, sd, p + "output.LayerNorm", 1e-12)
    raw = t[:, 0]
    for index in IR_LINEARS:
        raw = raw @ sd[f"mlp.layers.{index}.weight"].T + sd[f"mlp.layers.{index}.bias"]
    return (raw.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_scores_its_checkpoint_as_imagereward_does(tmp_path, bert_tokenizer_dir):
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(bert_tokenizer_dir))
    sd = _imagereward_state_dict(len(tokenizer))
    path = tmp_path / "ImageReward.pt"
    torch.save(sd, path)  # ImageReward.pt is a bare state dict

    reward = build("imagereward", checkpoint=str(path), tokenizer=str(bert_tokenizer_dir), device="cpu", batch_size=3)
    images = _images(len(PROMPTS), h=48, w=40, seed=3)
    scores = reward(images, PROMPTS)

    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    expected = _imagereward_score(sd, clip_preprocess(images, IMAGE), tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert not reward.model.training and not any(p.requires_grad for p in reward.model.parameters())


# shared preprocessing and errors ------------------------------------------------------------------------------


def _pil_preprocess(pixels: np.ndarray) -> torch.Tensor:
    """torchvision's Resize(n, BICUBIC) + CenterCrop(n) + ToTensor on a PIL image, in 8-bit levels."""
    h, w = pixels.shape[:2]
    size = (int(IMAGE * w / h), IMAGE) if h <= w else (IMAGE, int(IMAGE * h / w))  # PIL sizes are (width, height)
    resized = Image.fromarray(pixels).resize(size, Image.BICUBIC)
    left, top = int(round((resized.width - IMAGE) / 2.0)), int(round((resized.height - IMAGE) / 2.0))
    return torch.from_numpy(np.asarray(resized.crop((left, top, left + IMAGE, top + IMAGE)), dtype=np.float32))


def _our_levels(pixels: np.ndarray) -> torch.Tensor:
    normalised = clip_preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, IMAGE)[0]
    levels = normalised * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
    return levels.permute(1, 2, 0) * 255


def test_preprocessing_matches_the_authors_pil_pipeline():
    """PIL's levels exactly (tests/test_pil_resize.py holds the resize to PIL on many shapes); what is left is
    the float rounding of normalising and undoing it here."""
    y, x = np.mgrid[0:45, 0:70]
    smooth = 127 + 100 * np.sin(x / 7.0) * np.cos(y / 5.0)
    smooth = np.stack([smooth, smooth[::-1], 255 - smooth], axis=-1).astype(np.uint8)
    tall = smooth.transpose(1, 0, 2).copy()
    noise = np.random.default_rng(0).integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    for pixels in (smooth, tall, noise):
        assert (_our_levels(pixels) - _pil_preprocess(pixels)).abs().max() < 1e-3


@pytest.mark.parametrize(
    "name, expected",
    [
        ("hps", "HPS_v2.1_compressed.pt"),
        ("imagereward", "ImageReward.pt"),
        ("clip", "openai/clip-vit-large-patch14"),
        ("pickscore", "yuvalkirstain/PickScore_v1"),
    ],
)
def test_missing_weights_say_what_to_pass(tmp_path, name, expected):
    missing = tmp_path / "nowhere" / "weights"
    with pytest.raises(RewardWeightsError) as info:
        build(name, checkpoint=str(missing))
    message = str(info.value)
    assert message.startswith(f"{name}: ") and str(missing) in message
    assert f"reward.{name}.checkpoint=PATH" in message and expected in message


def test_a_foreign_file_a_corrupt_file_and_a_bad_dtype_are_named(tmp_path, clip_tokenizer_dir):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"mlp.layers.0.weight": torch.zeros(1, 1)}}, foreign)
    with pytest.raises(RewardWeightsError, match=r"hps: .*foreign.pt: not an open_clip ViT CLIP checkpoint: key"):
        build("hps", checkpoint=str(foreign), tokenizer=str(clip_tokenizer_dir))
    corrupt = tmp_path / "ImageReward.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(RewardWeightsError, match=r"imagereward: cannot read .*ImageReward.pt as a torch checkpoint"):
        build("imagereward", checkpoint=str(corrupt))
    with pytest.raises(ConfigError, match=r"reward.imagereward.dtype: expected one of float32, float16, bfloat16"):
        build("imagereward", checkpoint=str(corrupt), dtype="fp8")
    with pytest.raises(ConfigError, match=r"reward.hps.autocast: expected true or false, got 'yes'"):
        build("hps", checkpoint=str(foreign), autocast="yes")


def test_the_cli_prints_the_missing_weights_message(tmp_path, capsys):
    missing = tmp_path / "HPS_v2.1_compressed.pt"
    args = ["train", "reward={hps: 1.0}", f"reward.hps.checkpoint={missing}", f"output_dir={tmp_path / 'run'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"hps: weights not found at {missing}" in err and "Traceback" not in err


@pytest.mark.parametrize("height,width", [(224, 299), (299, 224), (448, 598)])
def test_clip_and_pickscore_crop_where_transformers_processor_crops(height, width):
    """transformers floors the centre-crop offset where torchvision rounds: on a 224 x 299 image the two crops
    are a pixel apart, which changes every input pixel. CLIP score and PickScore are defined through
    transformers' processor, so their crop must be its crop."""
    from egrpo.rewards.clip_family import ClipScoreReward, HPSReward, PickScoreReward

    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4: the PIL processor is the default one
        from transformers import CLIPImageProcessor as Processor

    processor = Processor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    image = (torch.rand(3, height, width, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    reference = processor(Image.fromarray(image.permute(1, 2, 0).numpy()), return_tensors="np")["pixel_values"]
    reference = torch.as_tensor(reference)
    floor = clip_preprocess(image[None].float() / 255, 224, floor_crop=True)
    rounded = clip_preprocess(image[None].float() / 255, 224)
    # the resize is PIL's bit for bit (egrpo/rewards/pil_resize.py), so the crop is all that could differ
    assert (floor - reference).abs().max() < 1e-6
    assert (rounded - reference).abs().mean() > 0.3
    assert ClipScoreReward.floor_crop and PickScoreReward.floor_crop and not HPSReward.floor_crop


def test_clip_image_features_are_the_normalised_features_the_score_uses(clip_folder):
    """What egrpo eval's embedding diversity reads: the score is their dot product with the text features."""
    path, _, _ = clip_folder
    reward = build("clip", checkpoint=str(path), device="cpu")
    images = _images(len(PROMPTS))
    features = reward.image_features(images)
    assert features.shape[0] == len(PROMPTS)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(len(PROMPTS)))
    text = reward._text_features(list(PROMPTS))
    torch.testing.assert_close((features * text).sum(-1), reward(images, PROMPTS), atol=1e-6, rtol=1e-6)
