"""Command line: ``egrpo train | plan | sample | export | eval | ablate | figures | preprocess | pretrain |
serve-reward``, thin shells over the library."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

# A config override: a dotted key, then '='. A path never matches ('/' is not a key character), so a run
# directory named tau=2.2 is still a path when written as runs/tau=2.2 or ./tau=2.2.
OVERRIDE = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*=")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def cmd_train(args: argparse.Namespace) -> int:
    from egrpo import config as cfg
    from egrpo.trainer import Trainer

    if args.method:
        args.overrides = [f"method.name={args.method}", *args.overrides]
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise cfg.ConfigError(f"--resume {run_dir}: no config.yaml there; is it a run directory?")
        if args.config:
            raise cfg.ConfigError(
                "--resume takes the run's own config.yaml; pass overrides as key=value, not a config file"
            )
        config = cfg.load(str(run_dir / "config.yaml"), args.overrides)
        cfg.check_paths(config)
        trainer = Trainer(config, run_dir, resume=True, progress=not args.no_progress)
    else:
        config = cfg.load(args.config or "embedded", args.overrides)
        cfg.check_paths(config)
        trainer = Trainer(config, progress=not args.no_progress)
    try:
        summary = trainer.train()
    except KeyboardInterrupt:
        if trainer.world.is_main:
            print(f"Stopped. Continue with: egrpo train --resume {trainer.run_dir}", file=sys.stderr)
        return 130
    finally:
        trainer.world.shutdown()
    if not trainer.world.is_main:
        return 0
    base, final = summary["base"], summary["final"]
    print(f"run: {trainer.run_dir}")
    print(f"{'held-out':<16}{'base':>9}{'trained':>9}")
    for key in base:
        print(f"{key:<16}{base[key]:>9.3f}{final[key]:>9.3f}")
    print(f"{summary['iterations']} iterations in {summary['seconds']:.0f} s")
    if config.train.export_diffusers:
        print(f"diffusers export: {trainer.run_dir / 'diffusers'} (its README.md says how to load it)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from egrpo import config as cfg

    if args.method:
        args.overrides = [f"method.name={args.method}", *args.overrides]
    sources: dict[str, str] = {}
    config = cfg.load(args.config or "embedded", args.overrides, sources)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    defaults = cfg.flat_values(cfg.Config())
    changed = {k: v for k, v in cfg.flat_values(config).items() if defaults.get(k) != v}
    if changed:
        print("# values that differ from egrpo's defaults, and where each comes from:")
        width = max(len(f"{k}: {v}") for k, v in changed.items())
        for key, value in changed.items():
            origin = next((sources[k] for k in (key, *_prefixes(key)) if k in sources), "?")
            print(f"#   {f'{key}: {value}':<{width}}  {cfg.describe_source(origin)}")
    return 0


def _prefixes(key: str) -> list[str]:
    """'reward.hps.checkpoint' -> ['reward.hps', 'reward']: a value set through a parent key."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def cmd_plan(args: argparse.Namespace) -> int:
    if args.method:
        args.overrides = [f"method.name={args.method}", *args.overrides]
    from egrpo import config as cfg
    from egrpo.methods import BranchMethod, build_method

    config = cfg.load(args.config or "embedded", args.overrides)
    method = build_method(config)
    plan, described = method.plan, method.describe()
    if args.json:
        print(json.dumps({**plan.to_json(), "method": {"name": method.name, **described}}, indent=2))
        return 0
    trained = described["trained_steps"]
    if described.get("trained_per_iteration", len(trained)) < len(trained):
        trained = f"{described['trained_per_iteration']} of {trained} per iteration"
    print(
        f"method: {method.label}  SDE steps {described['sde_steps']}  trained steps {trained}  "
        f"groups: {described['group']}  network calls per prompt: {described['network_calls']}"
    )
    if not isinstance(method, BranchMethod):  # no anchor to branch from: the merge table does not apply
        return 0
    p = config.plan
    rule = f"tau = {p.tau}" if p.merge == "adaptive" else p.merge
    shift = f"{plan.shift} (terminal {plan.shift_terminal})" if plan.shift_terminal is not None else f"{plan.shift}"
    print(f"T={plan.num_steps} shift={shift} eta={plan.eta} merge: {rule}  (H = exp. entropy per dimension)")
    print(f"{'step':>4} {'sigma':>7} {'dt':>8} {'H(i,1)':>7} {'l':>3} {'H(i,l)':>7}")
    for row in plan.table():
        merged = f"{row['merge_length']:>3} {row['merged_entropy']:>7.3f}" if row["active"] else f"{'-':>3} {'-':>7}"
        print(f"{row['step']:>4} {row['sigma']:>7.4f} {row['dt']:>8.4f} {row['entropy']:>7.3f} {merged}")
    print(f"merge_lengths: {plan.merge_lengths}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from egrpo import config as cfg
    from egrpo.evaluation import load_config
    from egrpo.planner import make_plan
    from egrpo.report import save_image_grid
    from egrpo.rollout import network_batch, sample_images
    from egrpo.tasks import build_task

    config = load_config(args.checkpoint, args.overrides)  # a run, one of its weights files, or 'base'
    task = build_task(config)
    plan = make_plan(**cfg.plan_kwargs(config))
    noise = torch.randn((args.num, *task.policy.latent_shape), generator=torch.Generator().manual_seed(args.seed))
    noise = noise.to(task.policy.device)
    cond = task.policy.encode([args.prompt] * args.num)
    images = sample_images(task.policy, cond, noise, plan.sigmas, network_batch(config.train.max_batch))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(images, out, title=args.prompt)
    print(f"wrote {out} ({args.num} samples, seed {args.seed})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from egrpo.export import export

    what = export(args.run, args.out, args.weights, args.overrides)
    print(f"wrote {args.out}: {what} (its README.md says how to load it)")
    return 0


def _checkpoints_and_overrides(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The CHECKPOINT arguments and the key=value overrides; --prompts / --seeds are overrides too."""
    checkpoints, overrides = list(args.checkpoints), list(args.overrides)
    if args.prompts:
        overrides.append(f"prompts.eval={args.prompts}")
    if getattr(args, "seeds", None):
        overrides.append(f"eval.seeds_per_prompt={args.seeds}")
    return checkpoints, overrides


def _labels(args: argparse.Namespace) -> list[str] | None:
    text = getattr(args, "labels", None)
    return [label.strip() for label in text.split(",")] if text else None


def cmd_eval(args: argparse.Namespace) -> int:
    from egrpo.evaluation import run

    checkpoints, overrides = _checkpoints_and_overrides(args)
    rows = run(checkpoints, overrides, Path(args.out), _labels(args))
    from egrpo.evaluation import markdown_table

    print(markdown_table(rows), end="")
    written = [Path(args.out) / name for name in ("eval.json", "eval.md", "eval_per_prompt.md")]
    print("wrote " + ", ".join(str(path) for path in written if path.exists()))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from egrpo.ablation import ablate

    seeds = args.seeds or (2 if args.quick else 3)
    iterations = args.iterations or (6 if args.quick else 20)
    sweeps = [s.strip() for s in args.sweeps.split(",") if s.strip()]
    out = Path(args.out)
    ablate(sweeps, seeds, iterations, out, args.overrides)
    for sweep in sweeps:
        print((out / f"{sweep}.md").read_text())
    print(f"wrote {', '.join(str(out / f'{s}.json') for s in sweeps)} and the .md tables beside them")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_figures(args: argparse.Namespace) -> int:
    from egrpo import config as cfg
    from egrpo import figures

    out = Path(args.out or f"figures/{args.figure}.png")
    labels = _labels(args)
    if args.figure in ("entropy", "spread", "completion"):
        config = cfg.load(args.config or "embedded", args.overrides)
        if args.figure == "entropy":
            figures.entropy(config, out, args.max_length)
        else:
            if args.checkpoint:
                config.model.checkpoint = args.checkpoint
            (figures.spread if args.figure == "spread" else figures.completion)(config, out, args.batches)
    elif args.figure == "curves":
        figures.curves([Path(r) for r in args.runs], out, labels)
    else:
        names, overrides = _checkpoints_and_overrides(args)
        if args.figure == "grid":
            figures.grid(names, out, overrides, labels, args.rows)
        else:
            if len(names) != 2:
                raise cfg.ConfigError(f"failures compares two checkpoints (BASE TUNED), got {len(names)}: {names}")
            data = figures.failures(*names, out, args.reward, args.check, overrides, args.top)
            print(f"{len(data['cases'])} of {data['samples']} held-out samples: {args.reward} up, {args.check} down")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from egrpo.embedded.pretrain import pretrain

    paths = pretrain(Path(args.out), flow_steps=args.flow_steps, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from egrpo import config as cfg
    from egrpo.models.text_cache import KINDS, build_cache
    from egrpo.tasks import read_prompt_file

    if not args.config:
        raise cfg.ConfigError("preprocess needs the training config, e.g. egrpo preprocess flux-dev-hps")
    config = cfg.load(args.config, args.overrides)
    if config.model.kind not in KINDS:
        kinds = " or ".join(KINDS)
        raise cfg.ConfigError(f"preprocess is for model.kind {kinds}; {args.config} has {config.model.kind!r}")
    files = args.prompts or [f for f in (config.prompts.train, config.prompts.eval) if f]
    if not files:
        raise cfg.ConfigError("no prompt files: pass --prompts FILE or set prompts.train / prompts.eval in the config")
    out = args.out or config.model.embedding_cache
    if not out:
        raise cfg.ConfigError("no output file: pass --out CACHE.safetensors or set model.embedding_cache in the config")
    prompts = [p for f in files for p in read_prompt_file(f, f"--prompts {f}")]
    path = build_cache(config.model, prompts, Path(out), progress=not args.no_progress)
    print(f"wrote {path} ({len(set(prompts))} prompts from {', '.join(files)})")
    return 0


def _served_options(name: str, overrides: list[str]) -> dict:
    """``OPTION=value`` or ``reward.NAME.OPTION=value`` (as in a config) -> the reward's options (YAML values)."""
    from egrpo import config as cfg

    options = {}
    for key, value in cfg.parse_overrides(overrides).items():
        option = key.removeprefix(f"reward.{name}.")
        if "." in option or option == "weight":
            raise cfg.ConfigError(
                f"serve-reward {name}: {key}= is not an option of the reward; pass its options as OPTION=value or "
                f"reward.{name}.OPTION=value (e.g. checkpoint=PATH device=cuda:1); weights belong to the training "
                "config"
            )
        options[option] = value
    return options


def cmd_serve_reward(args: argparse.Namespace) -> int:
    from egrpo.rewards import build
    from egrpo.rewards.remote import PROTOCOL, RewardServer

    options = _served_options(args.name, args.overrides)
    reward = build(args.name, **options)
    try:
        server = RewardServer(reward, args.name, options, args.host, args.port)
    except OSError as exc:
        raise OSError(
            f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); pass another --port (0 picks a free "
            "one) or --host"
        ) from None
    # one line, flushed: scripts and tests read the address from it (with --port 0 it is the only place it shows)
    print(f"serving reward {args.name} at {server.url} (protocol {PROTOCOL}); Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (0: a free port), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from egrpo import __version__

    parser = argparse.ArgumentParser(prog="egrpo", description="E-GRPO for flow-matching text-to-image models")
    parser.add_argument("--version", action="version", version=f"egrpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    overrides_help = "config overrides as section.key=value (e.g. plan.tau=2.0 train.iterations=20)"
    train = sub.add_parser("train", help="run E-GRPO (default: the embedded digits task)")
    train.add_argument("config", nargs="?", help="config file or shipped config name (default: embedded)")
    train.add_argument("overrides", nargs="*", help=overrides_help)
    train.add_argument("--resume", metavar="RUN", help="continue the run in this directory from its last checkpoint")
    train.add_argument(
        "--method", help="egrpo (default), g2rpo, tempflow, flowgrpo, flowgrpo-fast, dancegrpo, mixgrpo, branchgrpo"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    conf = sub.add_parser("config", help="print the resolved config as YAML, with where each non-default value "
                                         "comes from")
    conf.add_argument("config", nargs="?", help="config file or shipped config name (default: embedded)")
    conf.add_argument("overrides", nargs="*", help=overrides_help)
    conf.add_argument("--method", help="a method's defaults, as egrpo train --method")
    conf.set_defaults(func=cmd_config)

    plan = sub.add_parser("plan", help="print the method's SDE and trained steps, and the entropy plan: merge "
                                       "length per active step")
    plan.add_argument("config", nargs="?", help="config file or shipped config name (default: embedded)")
    plan.add_argument("overrides", nargs="*", help=overrides_help)
    plan.add_argument("--json", action="store_true", help="print JSON (with the keys merge_lengths and method)")
    plan.add_argument("--method", help="a method's defaults and schedule, as egrpo train --method")
    plan.set_defaults(func=cmd_plan)

    sample = sub.add_parser("sample", help="write an image grid for a prompt")
    sample.add_argument("--checkpoint", required=True,
                        help="a run directory, a .safetensors weights file (a run's config is found beside it) "
                             "or 'base'")
    sample.add_argument("--prompt", required=True)
    sample.add_argument("--num", type=_positive, default=16, help="number of samples (default 16)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    sample.add_argument("overrides", nargs="*", help=overrides_help)
    sample.set_defaults(func=cmd_sample)

    exp = sub.add_parser("export", help="a run's weights for diffusers: a LoRA file for pipe.load_lora_weights, or "
                                         "a transformer folder for from_pretrained")
    exp.add_argument("run", metavar="RUN", help="a run directory of egrpo train")
    exp.add_argument("--out", required=True, metavar="DIR", help="output folder, new or empty")
    exp.add_argument("--weights", metavar="FILE",
                     help="weights of the run to export: a .safetensors file or a checkpoint directory (default: "
                          "RUN/model.safetensors, else the latest checkpoint)")
    exp.add_argument("overrides", nargs="*",
                     help="config overrides, e.g. model.pretrained=PATH when the base pipeline has moved")
    exp.set_defaults(func=cmd_export)

    prep = sub.add_parser("preprocess",
                          help="encode prompt files once into the text-embedding cache (FLUX, SD3, Qwen-Image)")
    prep.add_argument("config", nargs="?", help="the training config (its model.kind and model.pretrained)")
    prep.add_argument("overrides", nargs="*", help=overrides_help)
    prep.add_argument(
        "--prompts", action="append", metavar="FILE",
        help="prompt file, one prompt a line; repeat for several (default: prompts.train and prompts.eval)",
    )
    prep.add_argument("--out", metavar="CACHE", help="output .safetensors file (default: model.embedding_cache)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=cmd_preprocess)

    ev = sub.add_parser("eval", help="held-out metrics of checkpoints with fixed seeds: JSON and a markdown table")
    ev.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                    help="run directories, .safetensors files or 'base' (the shipped base model); "
                         "key=value overrides too")
    ev.add_argument("--prompts", help="held-out prompt file, one prompt a line (default: the config's prompts.eval)")
    ev.add_argument("--seeds", type=_positive,
                    help="samples per prompt, each from a fixed seed (default: eval.seeds_per_prompt)")
    ev.add_argument("--labels", help="comma-separated row names, one per checkpoint (default: as given)")
    ev.add_argument("--out", default="eval", help="output directory (default: ./eval)")
    ev.set_defaults(func=cmd_eval)

    abl = sub.add_parser("ablate",
                         help="the paper's ablations (tau, merge strategy, trained steps) on the embedded task")
    abl.add_argument("overrides", nargs="*", help=overrides_help)
    abl.add_argument("--sweeps", default="tau,merge,steps",
                     help="comma-separated: tau, merge, steps (default), methods (Table 1: every method)")
    abl.add_argument("--seeds", type=_positive, help="seeds per cell (default 3, quick 2)")
    abl.add_argument("--iterations", type=_positive, help="iterations per cell (default 20, quick 6)")
    abl.add_argument("--quick", action="store_true", help="reduced budget: 6 iterations x 2 seeds per cell")
    abl.add_argument("--out", default="ablation", help="output directory (default: ./ablation)")
    abl.set_defaults(func=cmd_ablate)

    fig = sub.add_parser("figures", help="the paper's figures as PNG (+ JSON of the numbers): entropy, spread, "
                                         "completion, curves, grid, failures")
    figs = fig.add_subparsers(dest="figure", required=True)
    out_help = "output PNG; the plotted numbers go beside it as .json (default: figures/NAME.png)"
    ent = figs.add_parser("entropy", help="H(i, l) per step for merge lengths 1..k, tau and the plan (Fig. 1b)")
    ent.add_argument("config", nargs="?", help="config file or shipped config name (default: embedded)")
    ent.add_argument("overrides", nargs="*", help=overrides_help)
    ent.add_argument("--max-length", type=_positive, default=6, help="longest merge length drawn (default 6)")
    spr = figs.add_parser("spread", help="within-group reward std when branching at each step, single vs merged "
                                         "jump (Fig. 1a)")
    com = figs.add_parser("completion", help="signal a cheap ODE completion keeps: rank correlation and advantage "
                                             "sign agreement with the full one, per branch step (fast E-GRPO)")
    for sp in (spr, com):  # both branch the config's model over batches of prompts
        sp.add_argument("config", nargs="?", help="config file or shipped config name (default: embedded)")
        sp.add_argument("overrides", nargs="*", help=overrides_help)
        sp.add_argument("--checkpoint", help="weights to branch from (default: the config's model)")
        sp.add_argument("--batches", type=_positive, default=2,
                        help="batches of train.prompts_per_iteration prompts, groups of train.group_size (default 2)")
    cur = figs.add_parser("curves", help="training reward curves of runs, one line each (Fig. 4)")
    cur.add_argument("runs", nargs="+", metavar="RUN", help="run directories of egrpo train")
    cur.add_argument("--labels", help="comma-separated line labels (default: each run's method)")
    grd = figs.add_parser("grid", help="same prompts and seeds, one column per checkpoint (Figs. 6-7)")
    grd.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                     help="run directories, .safetensors files or 'base'; key=value overrides too")
    grd.add_argument("--labels", help="comma-separated column labels (default: method and run name)")
    grd.add_argument("--prompts", help="held-out prompt file (default: the config's prompts.eval)")
    grd.add_argument("--seeds", type=_positive, default=1, help="samples per prompt (default 1)")
    grd.add_argument("--rows", type=_positive, default=8, help="rows: the first N (prompt, seed) pairs (default 8)")
    fail = figs.add_parser("failures", help="samples where the reward rose but a check reward fell: reward hacking "
                                            "(Fig. 8)")
    fail.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                      help="BASE TUNED: two run directories, .safetensors files or 'base'; key=value overrides too")
    fail.add_argument("--reward", required=True, help="the reward that was optimised, e.g. quality or hps")
    fail.add_argument("--check", required=True, help="the reward that should not fall, e.g. alignment or clip")
    fail.add_argument("--prompts", help="held-out prompt file (default: the config's prompts.eval)")
    fail.add_argument("--top", type=_positive, default=8, help="pairs shown (default 8); the JSON lists all")
    for sp in (ent, spr, com, cur, grd, fail):
        sp.add_argument("--out", help=out_help)
    fig.set_defaults(func=cmd_figures)

    pre = sub.add_parser("pretrain", help="rebuild the embedded base model and reward networks")
    pre.add_argument("--out", default="pretrained", help="output directory (default: ./pretrained)")
    pre.add_argument("--flow-steps", type=_positive, default=200, help="flow-matching steps of the base model")
    pre.add_argument("--seed", type=int, default=0)
    pre.set_defaults(func=cmd_pretrain)

    serve = sub.add_parser("serve-reward", help="serve a reward over HTTP, for reward.http.url (another GPU or "
                                                "machine; protocol in egrpo/rewards/remote.py)")
    serve.add_argument("name", help="a registered reward, e.g. hps, clip, alignment")
    serve.add_argument("overrides", nargs="*", metavar="OPTION=VALUE",
                       help="the reward's options, spelt as the config's reward.NAME.OPTION (e.g. checkpoint=PATH "
                            "device=cuda:1); reward.NAME.OPTION=VALUE works too")
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to listen on (default 127.0.0.1; 0.0.0.0 for every one: no authentication)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.set_defaults(func=cmd_serve_reward)
    return parser


def _value_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string, in any subcommand, that takes a value (its next word is that value, not an override)."""
    options = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options |= _value_options(sub)
        elif action.option_strings and action.nargs != 0:
            options.update(action.option_strings)
    return options


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with key=value overrides allowed anywhere on the line (argparse would take one after an
    option for an unrecognized argument): they are pulled out first and handed to the command as overrides."""
    values = _value_options(parser)
    overrides = [w for i, w in enumerate(argv) if OVERRIDE.match(w) and not (i and argv[i - 1] in values)]
    rest = [w for i, w in enumerate(argv) if not (OVERRIDE.match(w) and not (i and argv[i - 1] in values))]
    args = parser.parse_args(rest)
    if overrides and not hasattr(args, "overrides") and not hasattr(args, "checkpoints"):
        name = " ".join(filter(None, (args.command, getattr(args, "figure", None))))
        parser.error(f"egrpo {name} takes no key=value overrides, got {' '.join(overrides)}")
    args.overrides = overrides + list(getattr(args, "overrides", None) or [])
    return args


# What a shell reports for a tool that a closed pipe ended (128 + SIGPIPE), as `seq 1 100000 | head -1` does.
BROKEN_PIPE_EXIT = 141


def _reader_left() -> int:
    """The reader of stdout closed it (``egrpo plan | head -1``): end quietly, as other command-line tools do.
    stdout is pointed at /dev/null so that the interpreter's last flush of what is left does not fail again
    (Python's documented recipe, docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests): nothing to redirect
        pass
    return BROKEN_PIPE_EXIT


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, sys.argv[1:] if argv is None else list(argv))
    _quiet_libraries()
    from egrpo.checkpoint import CheckpointError
    from egrpo.errors import ConfigError, TrainingStopped

    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that left early is met here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _reader_left()
    except (ConfigError, CheckpointError, OSError) as exc:
        print(f"egrpo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"egrpo {args.command}: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before a run existed (loading, start-up): nothing to resume, nothing lost
        print(f"egrpo {args.command}: interrupted", file=sys.stderr)
        return 130
