"""Experiment configuration: typed dataclasses, one YAML file per experiment, ``section.key=value`` overrides.

Defaults are the paper's values where the paper gives one (FLUX.1-dev: T = 16, shift 3, eta 0.7,
G = 12, tau 2.2 over the first 8 steps, AdamW lr 2e-6, weight decay 1e-4, clip 1e-4, advantage clip 5,
300 iterations). The embedded default experiment (``configs/embedded.yaml``) rescales what a 0.5M-
parameter model on 2 CPU cores needs and says why beside each value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from egrpo.errors import ConfigError
from egrpo.methods import METHODS, build_method
from egrpo.planner import make_plan, plan_kwargs
from egrpo.rewards import available
from egrpo.rewards import factory as reward_factory
from egrpo.rollout import ODE_SOLVERS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MODEL_KINDS = ("embedded", "flux", "sd3", "qwen-image", "wan")  # egrpo.tasks.TASKS has one factory for each (tested)
# the kinds with true classifier-free guidance: egrpo.models.text_cache.DEFAULT_NEGATIVE_PROMPT's keys (tested)
NEGATIVE_PROMPT_KINDS = ("sd3", "qwen-image", "wan")
KL_SCHEDULES = ("constant", "linear", "cosine")  # egrpo.grpo.kl_weight computes each


@dataclass
class ModelConfig:
    kind: str = "embedded"
    """Policy adapter: 'embedded' (tiny FLUX-architecture model on the digits), 'flux', 'sd3', 'qwen-image' or 'wan'
    (diffusers; 'wan' is Wan 2.1 / 2.2 text-to-video)."""
    checkpoint: Optional[str] = None
    """Base weights (a .safetensors file or a run directory); None = the shipped base model."""
    pretrained: Optional[str] = None
    """Diffusers pipeline of a pipeline kind: a hub id (black-forest-labs/FLUX.1-dev) or a local folder. Training
    loads only its transformer and VAE; the text encoders run once, in ``egrpo preprocess``."""
    embedding_cache: Optional[str] = None
    """Text embeddings of every prompt for a pipeline (a .safetensors file written by ``egrpo preprocess``)."""
    height: int = 720
    """Image (or video frame) height in pixels of a pipeline (the authors' FLUX code: 720)."""
    width: int = 720
    """Image (or video frame) width in pixels of a pipeline."""
    frames: int = 81
    """'wan': frames of a video, 4k + 1 (the VAE keeps the first frame and folds each next 4 into one latent frame;
    Wan 2.1's default: 81, 5 s at 16 fps). Other kinds make images and ignore it."""
    reward_frames: Union[int, list] = 4
    """'wan': the frames every reward scores, the video's reward being their mean: a count, spread evenly from the
    first frame to the last (as DanceGRPO scores HPS on frames), or a list of frame indices. Only these frames are
    kept after decoding, and they are what sample grids and evaluations show, as a strip per sample."""
    guidance: Optional[float] = None
    """FLUX: embedded guidance (None = 3.5; ignored by transformers without guidance embeddings).
    SD3: true classifier-free guidance scale (None = 4.5 as in Flow-GRPO; 1 = no unconditional branch).
    Qwen-Image: QwenImagePipeline's ``true_cfg_scale`` with its norm rescale (None = 4 as its authors and Flow-GRPO;
    1 = no negative branch).
    Wan: true classifier-free guidance against model.negative_prompt (None = 5 as WanPipeline; <= 1 = none)."""
    guidance_2: Optional[float] = None
    """'wan' 2.2 with two experts: the guidance scale of the low-noise expert (None = model.guidance, as
    WanPipeline's guidance_scale_2)."""
    negative_prompt: Optional[str] = None
    """The negative prompt of true classifier-free guidance (SD3, Qwen-Image, Wan), encoded by ``egrpo preprocess``
    into the cache; None = SD3's and Wan's empty prompt, Qwen-Image's " " (its authors' example)."""
    max_sequence_length: Optional[int] = None
    """Most text tokens per prompt in the embedding cache (T5; Qwen-Image: Qwen2.5-VL, after its template; Wan:
    umT5); None = the pipeline's default (FLUX 512, SD3 256, Qwen-Image 512, Wan 512)."""
    device: Optional[str] = None
    """Where a pipeline runs ('cuda', 'cuda:1', 'cpu'); None = the first GPU if there is one, else the CPU."""
    attention_backend: str = "auto"
    """Scaled-dot-product-attention kernel of a pipeline: 'auto' (on a GPU, the fastest of cudnn, flash,
    efficient and math whose forward and backward run at the model's attention shape, probed once at start and
    printed; on the CPU, torch's choice) or one of them by name (egrpo/attention.py)."""
    compile: bool = False
    """Regional torch.compile of the transformer's repeated blocks for the forwards that never enter a log-probability:
    ODE completions, untrained ODE steps and evaluation sampling (egrpo/regional_compile.py); the trained transitions'
    forwards and the update stay eager, so the first PPO ratio stays exactly 1. Compiles once at start (reported)."""
    dtype: str = "bfloat16"
    """Compute dtype of a pipeline on a GPU, 'bfloat16' (autocast; fp32 master weights) or 'float32';
    on the CPU everything runs in fp32."""
    gradient_checkpointing: bool = False
    """Recompute transformer blocks in the backward pass instead of storing their activations."""
    lora_rank: int = 0
    """LoRA rank of a pipeline's transformer (peft); 0 = full fine-tuning."""
    lora_alpha: float = 64.0
    """LoRA scaling numerator (the update is scaled by alpha / rank; Flow-GRPO: rank 32, alpha 64)."""
    lora_target_modules: Optional[list] = None
    """Module names LoRA adapts; None = the attention projections of the joint blocks (Flow-GRPO's list; Wan: the
    self- and cross-attention projections of every block)."""
    decode_batch: int = 4
    """Most latents the VAE decodes at once (a memory bound: an iteration decodes every branch sample)."""


@dataclass
class SamplingConfig:
    num_steps: int = 16
    """T, the denoising steps of a rollout (paper: 16)."""
    shift: float = 3.0
    """Time-grid shift s (paper: 3)."""
    shift_terminal: Optional[float] = None
    """Stretch the shifted grid so that its last point before 0 is this sigma, as diffusers' scheduler does with
    ``shift_terminal`` (Qwen-Image's: 0.02); None = no stretch (FLUX, SD3)."""
    eta: float = 0.7
    """SDE noise level a of std_t = a sqrt(sigma / (1 - sigma)) (paper: 0.7)."""
    noise: str = "flow"
    """SDE form: 'flow' (Flow-GRPO, the paper) or 'dance' (DanceGRPO's constant noise)."""


@dataclass
class PlanConfig:
    active_steps: Union[str, list] = "first-half"
    """Steps that branch and train: 'first-half' (paper), 'second-half', 'all', 'first:K', 'last:K' or a list."""
    merge: str = "adaptive"
    """'adaptive' (entropy threshold tau), 'fixed' (merge_length) or 'list' (merge_lengths)."""
    tau: float = 2.2
    """Entropy threshold of the adaptive merge (paper: 2.2; 0 = no merging)."""
    merge_length: int = 2
    """Jump length for merge='fixed' (the paper's Table 2 uses 2, 4, 6)."""
    merge_lengths: Optional[list] = None
    """One jump length per active step for merge='list'."""


@dataclass
class TrainConfig:
    iterations: int = 300
    """Optimizer iterations (each: one rollout per prompt, then one update per trained step; paper: 300)."""
    prompts_per_iteration: int = 8
    """Prompts per iteration (paper: 1 per GPU on 8 GPUs)."""
    group_size: int = 12
    """G, samples per (prompt, active step) group (paper code: 12)."""
    lr: float = 2e-6
    """AdamW learning rate (paper: 2e-6 for full fine-tuning of FLUX; LoRA needs far more, e.g. 1e-4)."""
    weight_decay: float = 1e-4
    """AdamW weight decay (paper: 1e-4)."""
    clip_range: float = 1e-4
    """PPO clip epsilon (paper: 1e-4)."""
    adv_clip: float = 5.0
    """Advantages (group z-scores) are clipped to [-adv_clip, adv_clip] (paper code: 5)."""
    reward_normalization: str = "total"
    """'total': z-score the weighted sum of the rewards within each group (the paper). 'per_reward': z-score
    each reward within the group, then take the weighted sum, so rewards on different scales (a z-score
    beside a probability, HPS beside CLIP) weigh as their weights say."""
    max_grad_norm: float = 1.0
    """Gradient norm clip of each optimizer step."""
    kl_coef: float = 0.0
    """Weight of the KL to the frozen base model (paper: 0, no KL); with a kl_schedule, its weight at iteration 1."""
    kl_schedule: str = "constant"
    """How the KL weight moves over the run: 'constant' (kl_coef throughout), or 'linear' / 'cosine' from kl_coef
    at the first iteration to kl_coef_end at the last (a decay when kl_coef_end is smaller, a warm-up when it is
    larger). The weight is a function of the iteration alone, so a resumed run repeats it exactly; logged as
    kl_coef in metrics.jsonl."""
    kl_coef_end: Optional[float] = None
    """The KL weight at the last iteration under a 'linear' or 'cosine' kl_schedule (required there)."""
    max_batch: Union[int, str] = 1024
    """Most latents per network call during rollouts and evaluation (a memory bound). 'auto': start at 1024 and,
    when a training rollout runs out of GPU memory, halve it and roll the same samples out again."""
    distributed: str = "ddp"
    """Under torchrun: 'ddp' (a full copy per rank) or 'fsdp' (FSDP2 fully_shard, per transformer block: the
    model loads shard by shard, never whole, and checkpoints are sharded; see docs/flux-sd3.md)."""
    fsdp_param_dtype: Optional[str] = None
    """FSDP: dtype blocks are all-gathered and computed in, 'bfloat16' or 'float32' (sharded master weights and
    the gradient reduce-scatter stay fp32); None = model.dtype on a GPU (bf16 gathers: half the traffic and
    memory of fp32), float32 on the CPU."""
    update_batch: int = 64
    """Most distinct inputs per forward-backward in the update; larger steps accumulate gradients over chunks."""
    max_skipped_steps: int = 10
    """An optimizer step whose rewards or gradient norm are not finite is skipped (and counted in metrics.jsonl);
    this many skipped in a row stop the run, leaving its last checkpoint untouched."""
    novelty_bonus: float = 0.0
    """Diversity-aware reward (egrpo/diversity.py): each sample's reward gains this weight times its novelty, the
    mean cosine distance of its image features (eval.diversity_encoder) to the iteration's other samples of the
    same prompt, before the group z-score; logged as reward_novelty. 0 = off (the paper)."""
    max_weight_growth: float = 10.0
    """Divergence guard: the run stops (exit 1, ``diverged`` in summary.json, its last checkpoint kept as the result)
    when the trained weights' L2 norm exceeds this multiple of the base model's, or when the weights, the policy's
    samples or the held-out reward turn NaN or inf (a non-finite reward or gradient alone skips its step, see
    max_skipped_steps). 0 turns the norm test off; the non-finite tests stay."""
    deterministic: bool = False
    """Deterministic GPU kernels (egrpo/determinism.py: deterministic algorithms, a fixed cuBLAS workspace, cuDNN
    without autotuning, flash or math attention only), so that a run on one GPU and its resume repeat each other bit
    for bit; slower. On the CPU runs are deterministic either way."""
    export_diffusers: bool = False
    """At the end of training, also write the final weights in diffusers' format to RUN/diffusers, as
    ``egrpo export RUN --out RUN/diffusers`` does: a LoRA file for ``pipe.load_lora_weights``, or a transformer
    folder for ``from_pretrained`` (see docs/flux-sd3.md, Loading the result in diffusers)."""


@dataclass
class PromptsConfig:
    train: Optional[str] = None
    """Training prompts: a text file, one prompt a line; None = the task's built-in training prompts."""
    eval: Optional[str] = None
    """Held-out prompts, never trained on; None = the task's built-in held-out prompts."""


@dataclass
class EvalConfig:
    seeds_per_prompt: int = 4
    """Samples per held-out prompt, each from a fixed seed (same seeds for base and trained model)."""
    seed: int = 1234
    """Seed of the held-out initial noises (the same for every checkpoint compared)."""
    every: int = 0
    """Also evaluate every N iterations during training (0 = only base and final)."""
    check: dict = field(default_factory=dict)
    """The hacking watch: rewards scored at every evaluation and never trained on, as the reward section names
    them without weights, e.g. {alignment: {}} or {clip: {checkpoint: PATH}}. Logged as eval/check_NAME."""
    hack_margin: float = 0.1
    """The watch calls it reward hacking when the trained reward rose above the base model's while a check fell by
    more than this fraction of its base value; it logs a line and writes the evaluation's samples to
    RUN/hacking/. The evaluation with the highest reward and no check fallen is kept as RUN/best/."""
    stop_on_hack: bool = False
    """Stop the run (exit code 1) when the watch sees reward hacking; RUN/best/ holds the best weights before it."""
    diversity_encoder: str = "auto"
    """Image encoder of ``egrpo eval``'s embedding diversity and Vendi score (egrpo/diversity.py): 'auto' (the
    embedded task's judge classifier; on real models the first configured clip, pickscore or hps reward's image
    tower, none without one), one of those rewards by name, or 'none'."""


@dataclass
class MethodConfig:
    name: str = "egrpo"
    """egrpo, g2rpo, tempflow, flowgrpo, flowgrpo-fast, dancegrpo, mixgrpo or branchgrpo (see egrpo/methods.py)."""
    granularities: list = field(default_factory=lambda: [1])
    """Branch methods: ODE completion strides after the jump; G2RPO sums the z-scores over {1, 2}. Each in
    1..sampling.num_steps, none repeated (each method's ``check`` in egrpo/methods.py gives every option's range)."""
    completion_steps: Optional[int] = None
    """Branch methods: network calls per ODE completion, on a grid placed by sampling.shift between the landing
    sigma and 0 (null = every remaining grid step, at the `granularities` strides)."""
    completion_solver: str = "euler"
    """Branch methods: ODE solver of the completions: euler, heun (2 calls per step) or dpm2m (DPM-Solver++(2M))."""
    branch_subsample: Optional[int] = None
    """Branch methods: train this many of the planned branch steps per iteration, drawn anew (null = all); at most
    the number of planned steps."""
    subsample_weights: str = "uniform"
    """Branch methods: how `branch_subsample` draws: uniform, or entropy (in proportion to each merged step's H)."""
    window: int = 4
    """MixGRPO / Flow-GRPO-Fast: consecutive SDE (and trained) steps. Flow-GRPO-Fast: 1..T/2 (drawn inside the first
    half); MixGRPO: a window that never reaches past the grid's end nor covers every step."""
    window_shift_every: int = 0
    """MixGRPO: iterations between window moves (0 = iterations / (T/2), so the window sweeps the first half once)."""
    train_fraction: float = 0.6
    """DanceGRPO: fraction of the steps trained each iteration, drawn at random (at least one step's worth)."""
    split_steps: Optional[list] = None
    """BranchGRPO: distinct split steps (None = the authors' 0, 3, 6, 9 of 20 rescaled to num_steps, which needs
    4 steps or more)."""
    branch_factor: int = 2
    """BranchGRPO: children per node at each split."""
    branch_noise_scale: float = 4.0
    """BranchGRPO: factor on the SDE noise at splits (the log-prob uses the same std)."""


WANDB_MODES = ("online", "offline")


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    """Also write each iteration's metrics.jsonl numbers, the held-out evaluations and their sample grid as
    TensorBoard events in RUN/tensorboard/ (``tensorboard --logdir RUN/tensorboard``; pip install
    'egrpo[tensorboard]')."""
    wandb: bool = False
    """Also log them to Weights & Biases (pip install 'egrpo[wandb]'); the run's id is kept in RUN/wandb_run_id,
    so ``--resume`` continues the same W&B run."""
    wandb_project: str = "egrpo"
    """W&B project the run is logged to (the run is named after its directory)."""
    wandb_mode: str = "online"
    """'online' (stream to the W&B server; needs ``wandb login``) or 'offline' (only files in RUN/wandb/, no
    network; upload later with ``wandb sync RUN/wandb/offline-run-*``)."""


@dataclass
class Config:
    seed: int = 0
    """Seed of every iteration's prompt choice and noises (an iteration's generator is seeded by (seed, iteration))."""
    output_dir: Optional[str] = None
    """Run directory; None = runs/<method>-<timestamp>."""
    checkpoint_every: int = 10
    """Iterations between checkpoints (also written at the end and on Ctrl-C)."""
    reward: dict = field(default_factory=lambda: {"alignment": 1.0})
    """Reward name -> weight, or name -> {weight: w, <option>: value} for rewards that take options
    (e.g. ``reward.hps.checkpoint=PATH``); the training reward is the weighted sum."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = tuple(name for name, hint in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(hint))


def known_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the config and its type annotation."""
    hints = typing.get_type_hints(cls)
    keys = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys.update(known_keys(hint, prefix + f.name + "."))
        else:
            keys[prefix + f.name] = hint
    return keys


def _suggest(key: str, candidates: list[str]) -> str:
    leaf_matches = [c for c in candidates if c.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    close = leaf_matches or difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check_type(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        names = " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; every user writes it that way
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool, list, dict) and isinstance(value, hint):
        return value
    target = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key}: expected {target}, got {value!r} ({type(value).__name__})")


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if isinstance(value, dict) and dotted != "reward":
            flat.update(_flatten(value, dotted + "."))
        elif dotted == "method" and isinstance(value, str):
            flat["method.name"] = value
        else:
            flat[dotted] = value
    return flat


def apply(
    config: Config, values: dict[str, Any], source: str, sources: dict[str, str] | None = None, from_file: bool = False
) -> Config:
    """Set dotted keys on ``config`` after checking each key and type; ``source`` names where they came from
    (recorded per key in ``sources`` when given; ``from_file``: it is a file, which every error names)."""
    keys = known_keys()
    where = f"{source}: " if from_file else ""
    for key, value in values.items():
        if key.startswith("reward.") and key != "reward":
            try:
                _set_reward_option(config, key, value)
            except ConfigError as exc:
                raise ConfigError(f"{where}{exc}") from None
            if sources is not None:
                sources[key] = source
            continue
        if key in SECTIONS:
            raise ConfigError(
                f"{source}: {key!r} is a section, not a value: write its keys under it, e.g. "
                f"{key}: {{{next(k for k in keys if k.startswith(key + '.')).split('.', 1)[1]}: ...}}"
            )
        if key not in keys:
            short = [k for k in keys if k.rsplit(".", 1)[-1] == key]
            if len(short) == 1:
                key = short[0]
            else:
                raise ConfigError(f"{source}: unknown config key {key!r}.{_suggest(key, list(keys))}")
        try:
            value = _check_type(key, value, keys[key])
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None
        if sources is not None:  # under the full key, which is what `egrpo config` looks values up by
            sources[key] = source
        target = config
        *parents, leaf = key.split(".")
        for name in parents:
            target = getattr(target, name)
        setattr(target, leaf, value)
    return config


def _set_reward_option(config: Config, key: str, value: Any) -> None:
    """``reward.NAME=w`` sets a weight; ``reward.NAME.OPTION=v`` sets an option (turning a bare weight into a
    mapping)."""
    parts = key.split(".")
    if len(parts) == 2:
        entry = config.reward.get(parts[1])
        if isinstance(entry, dict):
            entry["weight"] = value
        else:
            config.reward[parts[1]] = value
        return
    if len(parts) != 3:
        raise ConfigError(f"{key}: expected reward.NAME=weight or reward.NAME.OPTION=value")
    entry = config.reward.get(parts[1], {"weight": 1.0})
    if not isinstance(entry, dict):
        entry = {"weight": entry}
    entry[parts[2]] = value
    config.reward[parts[1]] = entry


def reward_specs(config: Config) -> dict[str, tuple[float, dict]]:
    """name -> (weight, options) from the ``reward`` section."""
    specs = {}
    for name, entry in config.reward.items():
        if isinstance(entry, dict):
            options = dict(entry)
            specs[name] = (options.pop("weight", 1.0), options)
        else:
            specs[name] = (entry, {})
    return specs


def flat_values(config: Config) -> dict[str, Any]:
    """Dotted key -> value of every field (the reward section as one value)."""
    return _flatten(config.to_dict())


def describe_source(source: str) -> str:
    """A source recorded by :func:`load`, with a shipped config named by its name, not its install path."""
    path = Path(source)
    if path.suffix == ".yaml" and path.resolve().parent == CONFIG_DIR.resolve():
        return f"shipped config {path.stem}"
    return source


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``['plan.tau=2.0', 'train.iterations=5']`` -> dict; values are read as YAML scalars or lists."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. plan.tau=2.0)")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
    return out


def resolve_path(name_or_path: str) -> Path:
    """A config file path, or the name of one shipped in egrpo/configs (e.g. 'embedded')."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a shipped config; shipped: {', '.join(names)}")


def load(
    name_or_path: str | None = "embedded", overrides: list[str] | None = None, sources: dict[str, str] | None = None
) -> Config:
    """Defaults, then the chosen method's defaults and the file, then the command line.

    A method's defaults (e.g. DanceGRPO's eta 0.3 and its noise) beat a shipped config, whose sampling and
    plan keys are E-GRPO's; the user's own file beats them when it names the method itself, and is refused
    when the method comes from the command line and the file sets one of its keys to another value (which
    of the two was meant is not knowable). ``sources``, when given, receives where each set key came from.
    """
    file_values, source, shipped = {}, "defaults", False
    if name_or_path:
        path = resolve_path(name_or_path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a YAML config (not UTF-8 text); give a .yaml file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
        file_values, source = _flatten(data), str(path)
        shipped = path.resolve().parent == CONFIG_DIR.resolve()
    cli_values = parse_overrides(overrides or [])
    cli_values = {("method.name" if k == "method" else k): v for k, v in cli_values.items()}
    method = cli_values.get("method.name", file_values.get("method.name", MethodConfig.name))
    if method not in METHODS:
        where = f"{source}: " if "method.name" not in cli_values and "method.name" in file_values else ""
        raise ConfigError(
            f"{where}method {method!r} is not known; available: {', '.join(METHODS)}."
            + _suggest(str(method), list(METHODS))
        )
    defaults, default_source = METHODS[method].defaults, f"method {method} defaults"
    if name_or_path and not shipped and "method.name" in cli_values:
        conflicts = [
            f"{k}={file_values[k]!r} (method {method}: {v!r})"
            for k, v in defaults.items()
            if k in file_values and file_values[k] != v and k not in cli_values
        ]
        if conflicts:
            raise ConfigError(
                f"{source} sets {', '.join(conflicts)}, which the command line's method {method} sets otherwise; "
                f"name the value on the command line (e.g. {conflicts[0].split(' ')[0]}) or the method in the file"
            )
    layers = [(source, file_values), (default_source, defaults)]
    if not shipped:
        layers.reverse()
    config = Config()
    sources = {} if sources is None else sources
    for layer_source, values in layers:
        apply(config, values, layer_source, sources, from_file=bool(name_or_path) and layer_source == source)
    apply(config, cli_values, "command line", sources)
    try:
        validate(config)
    except ConfigError as exc:
        if name_or_path and _about_the_file(str(exc), sources, source):
            raise ConfigError(f"{describe_source(source)}: {exc}") from None
        raise
    return config


def _about_the_file(message: str, sources: dict[str, str], file: str) -> bool:
    """Whether a validation error is about a value ``file`` set: the first key the message names that the user set
    (the value that is wrong; later ones say what it must fit; a method's default is not the user's), or for the
    planner's own words, any plan or sampling key."""
    if message.startswith("plan: "):
        return any(v == file for k, v in sources.items() if k.startswith(("plan.", "sampling.")))
    found = []
    for key in sources:  # whole keys only: seed is not the seed in eval.seed, nor method.window in window_shift_every
        match = re.search(rf"(?<![\w.-]){re.escape(key)}(?![\w-])", message)
        if match and not sources[key].startswith("method "):
            found.append((match.start(), -len(key), key))
    return bool(found) and sources[min(found)[2]] == file


def check_url(key: str, url: Any) -> None:
    """An http or https address with a host and, where it names one, a port in 1..65535; refused here, not after
    a reward server was tried and retried at start-up."""
    example = f"e.g. {key}=http://127.0.0.1:8000"
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"{key}: expected a server's address, {example}, got {url!r}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{key}={url}: the scheme must be http:// or https://, {example}")
    if any(c.isspace() for c in url):
        raise ConfigError(f"{key}={url!r} holds a space; {example}")
    if not parts.hostname:
        raise ConfigError(f"{key}={url} names no host; {example}")
    try:
        port = parts.port
    except ValueError:  # not a number, or over 65535
        port = -1
    if port is not None and not 1 <= port <= 65535:
        written = parts.netloc.rpartition("]")[2].rpartition(":")[2]
        raise ConfigError(f"{key}={url}: the port {written!r} is not a number in 1..65535; {example}")


def check_paths(config: Config) -> None:
    """The files and folders a training run reads or writes, checked before any weights load: prompt files that
    exist, a model.checkpoint that exists, an output_dir that is not a file nor under one. Not part of
    ``validate``: a run's config.yaml still loads (for ``egrpo sample``, ``eval``, ``export``) after its prompt
    files have moved."""
    for key, value in (("prompts.train", config.prompts.train), ("prompts.eval", config.prompts.eval)):
        if value and not Path(value).exists():
            raise ConfigError(f"{key}: prompt file {value} does not exist")
        if value and Path(value).is_dir():
            raise ConfigError(f"{key}: {value} is a folder; give a text file, one prompt a line")
    checkpoint = config.model.checkpoint
    if checkpoint and not Path(checkpoint).exists():
        raise ConfigError(
            f"model.checkpoint: {checkpoint} does not exist; give a .safetensors file or a run directory of egrpo train"
        )
    if config.output_dir:
        run_dir = Path(config.output_dir)
        blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise ConfigError(
                f"output_dir={run_dir}: {blocker} is a file, so the run directory cannot be made there; move the "
                "file away or pick another output_dir"
            )


def validate(config: Config) -> None:
    """Range checks that need no model; prompt files and the plan are checked where they are loaded."""
    s, p, t = config.sampling, config.plan, config.train
    checks = [
        (s.num_steps >= 2, f"sampling.num_steps must be >= 2 (a step to branch and one to finish), got {s.num_steps}"),
        (s.shift > 0, "sampling.shift must be > 0"),
        (s.shift_terminal is None or 0 < s.shift_terminal < 1,
         f"sampling.shift_terminal must be in (0, 1) or null, got {s.shift_terminal}"),
        (s.eta >= 0, "sampling.eta must be >= 0"),
        (s.noise in ("flow", "dance"), f"sampling.noise must be 'flow' or 'dance', got {s.noise!r}"),
        (p.tau >= 0, f"plan.tau must be >= 0 (0 disables merging), got {p.tau}"),
        (p.merge in ("adaptive", "fixed", "list"), f"plan.merge must be adaptive, fixed or list, got {p.merge!r}"),
        (t.iterations >= 0, "train.iterations must be >= 0"),
        (t.prompts_per_iteration >= 1, "train.prompts_per_iteration must be >= 1"),
        (t.group_size >= 2, "train.group_size must be >= 2: the advantage is a z-score within a group"),
        (t.lr > 0, "train.lr must be > 0"),
        (t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}"),
        (0 <= config.seed < 2**32, f"seed must be in [0, 2**32), got {config.seed}"),
        (0 <= config.eval.seed < 2**32, f"eval.seed must be in [0, 2**32), got {config.eval.seed}"),
        (config.model.kind in MODEL_KINDS,
         f"model.kind must be one of {', '.join(MODEL_KINDS)}, got {config.model.kind!r}"),
        (not config.model.compile or config.model.kind != "embedded",
         "model.compile applies to the diffusers pipelines (model.kind flux, sd3, ...); the embedded digits model is "
         "too small to gain from it: set model.compile=false"),
        (config.model.negative_prompt is None or config.model.kind in NEGATIVE_PROMPT_KINDS,
         f"model.negative_prompt is for the true classifier-free guidance of model.kind "
         f"{', '.join(NEGATIVE_PROMPT_KINDS)}; model.kind={config.model.kind!r} runs none: remove it"),
        (p.merge_lengths is None or all(type(n) is int for n in p.merge_lengths),
         f"plan.merge_lengths must be whole numbers of steps, got {p.merge_lengths}"),
        (isinstance(p.active_steps, str) or all(type(n) is int for n in p.active_steps),
         f"plan.active_steps must be a name (first-half, all, first:K, ...) or a list of step indices, "
         f"got {p.active_steps}"),
        (t.clip_range > 0, "train.clip_range must be > 0"),
        (t.adv_clip > 0, "train.adv_clip must be > 0"),
        (t.reward_normalization in ("total", "per_reward"),
         f"train.reward_normalization must be 'total' or 'per_reward', got {t.reward_normalization!r}"),
        (t.max_grad_norm > 0, "train.max_grad_norm must be > 0"),
        (t.novelty_bonus >= 0, f"train.novelty_bonus must be >= 0 (0 = off), got {t.novelty_bonus}"),
        (t.kl_coef >= 0, "train.kl_coef must be >= 0"),
        (t.kl_schedule in KL_SCHEDULES,
         f"train.kl_schedule must be one of {', '.join(KL_SCHEDULES)}, got {t.kl_schedule!r}"),
        (t.kl_schedule == "constant" or t.kl_coef_end is not None,
         f"train.kl_schedule={t.kl_schedule} moves the KL weight from train.kl_coef to train.kl_coef_end: set "
         "train.kl_coef_end (the weight at the last iteration)"),
        (t.kl_schedule != "constant" or t.kl_coef_end is None,
         "train.kl_coef_end is the end of a KL schedule, but train.kl_schedule is constant: set "
         "train.kl_schedule=linear or cosine, or drop train.kl_coef_end"),
        (t.kl_coef_end is None or t.kl_coef_end >= 0, f"train.kl_coef_end must be >= 0, got {t.kl_coef_end}"),
        (t.max_batch == "auto" or (isinstance(t.max_batch, int) and t.max_batch >= 1),
         f"train.max_batch must be a number >= 1 or 'auto', got {t.max_batch!r}"),
        (t.max_weight_growth == 0 or t.max_weight_growth > 1,
         "train.max_weight_growth must be > 1 (a multiple of the base model's weight norm), or 0 to turn it off"),
        (t.update_batch >= 1, "train.update_batch must be >= 1"),
        (t.max_skipped_steps >= 1, "train.max_skipped_steps must be >= 1"),
        (t.distributed in ("ddp", "fsdp"), f"train.distributed must be 'ddp' or 'fsdp', got {t.distributed!r}"),
        (
            t.fsdp_param_dtype in (None, "bfloat16", "float32"),
            f"train.fsdp_param_dtype must be 'bfloat16', 'float32' or null, got {t.fsdp_param_dtype!r}",
        ),
        (config.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
        (config.eval.seeds_per_prompt >= 1, "eval.seeds_per_prompt must be >= 1"),
        (config.eval.hack_margin > 0, f"eval.hack_margin must be > 0 (a fraction of a check's base value), got "
                                      f"{config.eval.hack_margin}"),
        (all(o is None or isinstance(o, dict) for o in config.eval.check.values()),
         "eval.check maps reward names to their options, e.g. {clip: {checkpoint: PATH}} or {alignment: {}}"),
        (config.eval.every >= 0, "eval.every must be >= 0"),
        (config.logging.wandb_mode in WANDB_MODES,
         f"logging.wandb_mode must be 'online' or 'offline', got {config.logging.wandb_mode!r}"),
        (bool(config.logging.wandb_project.strip()), "logging.wandb_project must name a W&B project"),
        (bool(config.reward), "reward must name at least one reward, e.g. {alignment: 1.0}"),
        (all(isinstance(g, int) and g >= 1 for g in config.method.granularities) and config.method.granularities,
         f"method.granularities must be a list of integers >= 1, got {config.method.granularities}"),
        (config.method.completion_steps is None
         or (type(config.method.completion_steps) is int and config.method.completion_steps >= 1),
         f"method.completion_steps must be an integer >= 1 or null, got {config.method.completion_steps!r}"),
        (config.method.completion_steps is None or config.method.granularities == [1],
         f"method.completion_steps places its own completion grid: it cannot be combined with "
         f"method.granularities={config.method.granularities}; drop one of them"),
        (config.method.completion_solver in ODE_SOLVERS,
         f"method.completion_solver must be one of {', '.join(ODE_SOLVERS)}, got {config.method.completion_solver!r}"),
        (config.method.branch_subsample is None
         or (type(config.method.branch_subsample) is int and config.method.branch_subsample >= 1),
         f"method.branch_subsample must be an integer >= 1 or null, got {config.method.branch_subsample!r}"),
        (config.method.subsample_weights in ("uniform", "entropy"),
         f"method.subsample_weights must be 'uniform' or 'entropy', got {config.method.subsample_weights!r}"),
        (config.method.window >= 1, "method.window must be >= 1"),
        (config.method.window_shift_every >= 0, "method.window_shift_every must be >= 0"),
        (0 < config.method.train_fraction <= 1, "method.train_fraction must be in (0, 1]"),
        (config.method.branch_factor >= 2, "method.branch_factor must be >= 2"),
        (config.method.branch_noise_scale > 0, "method.branch_noise_scale must be > 0"),
        (config.method.split_steps is None
         or all(isinstance(i, int) and 0 <= i < s.num_steps for i in config.method.split_steps),
         f"method.split_steps must lie on the grid 0..{s.num_steps - 1}, got {config.method.split_steps}"),
    ]
    for key, value in flat_values(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for name, (weight, _) in reward_specs(config).items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise ConfigError(f"reward.{name}: the weight must be a finite number, got {weight!r}")
    unknown = [n for n in [*config.reward, *config.eval.check] if reward_factory(n) is None]
    if unknown:
        raise ConfigError(
            f"reward: unknown reward {unknown[0]!r}; available: {', '.join(available())}, or http-LABEL for "
            "another served reward."
            + _suggest(unknown[0], available())
        )
    served = reward_factory("http")
    for name, (_, options) in reward_specs(config).items():
        if reward_factory(name) is served and "url" not in options:
            raise ConfigError(
                f"reward.{name}.url is not set: give the address egrpo serve-reward printed, e.g. "
                f"reward.{name}.url=http://127.0.0.1:8000"
            )
        for option, value in options.items():
            if option == "url" or option.endswith("_url"):
                check_url(f"reward.{name}.{option}", value)
    try:
        plan = make_plan(**plan_kwargs(config))
    except ValueError as exc:
        raise ConfigError(f"plan: {exc}") from None
    if not plan.branches:
        raise ConfigError(
            f"plan.active_steps={p.active_steps!r} selects no step of the {s.num_steps}-step grid: nothing would train"
        )
    build_method(config)  # the method checks its own options against this grid and plan
