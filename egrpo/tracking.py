"""Where a run's numbers go: ``metrics.jsonl`` always, and TensorBoard and Weights & Biases when the ``logging``
section asks for them.

The trainer hands every record to :class:`MetricsLog` alone, which writes ``metrics.jsonl`` (the run's record, read
by ``--resume``, the figures and the reward curve) and passes the same record to each sink, so a dashboard never
shows a number the file lacks. Scalars keep their ``metrics.jsonl`` names (a nested evaluation's as
``eval/NAME``) at the step ``iteration``; the held-out evaluations before training (step 0) and after it (step
``train.iterations``), whose files are ``eval_base.json`` and ``summary.json``, go to the sinks with their sample
grid. Both packages are optional and imported only when asked for; only rank 0 logs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from egrpo.config import Config, LoggingConfig
from egrpo.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
GRID_ROWS = 10  # held-out prompts shown in a sample grid, as in samples.png
TILE_SIDE = 256  # larger samples (FLUX: 720 px) are shrunk: a full-size grid would be tens of MB per evaluation


def _import_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "logging.tensorboard=true needs the tensorboard package, which is not installed: "
            "pip install 'egrpo[tensorboard]' (or tensorboard), or set logging.tensorboard=false"
        ) from None
    return SummaryWriter


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "logging.wandb=true needs the wandb package, which is not installed: "
            "pip install 'egrpo[wandb]' (or wandb), or set logging.wandb=false"
        ) from None
    return wandb


def check_available(config: LoggingConfig, run_dir: Path) -> None:
    """Refuse, before any weights load, a sink whose package is missing or whose folder in ``run_dir`` is a file."""
    if config.tensorboard:
        _import_tensorboard()
    if config.wandb:
        _import_wandb()
    for enabled, key, name in ((config.tensorboard, "logging.tensorboard", TENSORBOARD_DIR),
                               (config.wandb, "logging.wandb", "wandb")):
        folder = run_dir / name
        if enabled and folder.exists() and not folder.is_dir():
            raise ConfigError(f"{key}: {folder} is a file, where the run writes that folder; move it away or "
                              "pick another output_dir")


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a ``metrics.jsonl`` record by name, nested records as ``outer/inner``; ``iteration`` is the
    step, not a scalar."""
    out = {}
    for key, value in record.items():
        if key == "iteration" and not prefix:
            continue
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out


def image_grid(images: torch.Tensor, columns: int, rows: int = GRID_ROWS, side: int = TILE_SIDE) -> torch.Tensor:
    """Held-out samples (N, C, H, W) in [0, 1], ordered prompt by prompt, as one (H', W', 3) uint8 image: a row per
    prompt (the first ``rows``), a column per seed, tiles at most ``side`` pixels and 2 pixels apart."""
    from egrpo.video import strips

    images = strips(images[: min(rows, images.shape[0] // columns) * columns]).detach().float().cpu().clamp(0, 1)
    scale = side / max(images.shape[-2:])
    if scale < 1:
        images = F.interpolate(images, scale_factor=scale, mode="bilinear", antialias=True).clamp(0, 1)
    images = F.pad(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images, (1, 1, 1, 1), value=0.5)
    n, c, h, w = images.shape
    rows = n // columns
    grid = images.reshape(rows, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c)
    return (grid * 255).round().to(torch.uint8)


class TensorBoardSink:
    """Event files in RUN/tensorboard/. Steps from ``purge_from`` on that an earlier process logged (a stopped run
    goes on past its last checkpoint) are purged, so TensorBoard shows each step once, as ``metrics.jsonl`` does."""

    def __init__(self, run_dir: Path, purge_from: int):
        SummaryWriter = _import_tensorboard()
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge_from)

    def log(self, step: int, values: dict[str, float], images: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        for name, image in images.items():
            self.writer.add_image(name, image.numpy(), step, dataformats="HWC")
        self.writer.flush()  # a run watched live shows each iteration as it ends

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run whose id is stored in RUN/wandb_run_id, so that ``--resume`` continues it (W&B ignores steps it
    already has: those the stopped run logged after its checkpoint keep their first values)."""

    def __init__(self, run_dir: Path, config: Config):
        wandb = _import_wandb()
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None  # None: W&B draws a new one
        settings = config.logging
        try:
            self.run = wandb.init(
                project=settings.wandb_project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                mode=settings.wandb_mode, config=config.to_dict(),
            )
        except wandb.errors.Error as exc:
            raise ConfigError(
                f"logging.wandb: W&B did not start ({exc}); log in with `wandb login`, or set "
                "logging.wandb_mode=offline and upload later with `wandb sync`"
            ) from None
        id_file.write_text(self.run.id + "\n")
        self.image_type = wandb.Image

    def log(self, step: int, values: dict[str, float], images: dict[str, torch.Tensor]) -> None:
        self.run.log({**values, **{k: self.image_type(v.numpy()) for k, v in images.items()}}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MetricsLog:
    """``metrics.jsonl`` and the sinks ``config.logging`` asks for (rank 0 only), for a process that trains from
    iteration ``start_iteration`` (a resumed run's checkpoint; 0 for a new run)."""

    def __init__(self, run_dir: Path, config: Config, start_iteration: int):
        self.metrics_file = run_dir / "metrics.jsonl"
        self.seeds = config.eval.seeds_per_prompt
        self.sinks = []
        try:
            if config.logging.tensorboard:
                self.sinks.append(TensorBoardSink(run_dir, start_iteration + 1))
            if config.logging.wandb:
                self.sinks.append(WandbSink(run_dir, config))
        except BaseException:
            self.close(failed=True)
            raise

    def iteration(self, metrics: dict, images: torch.Tensor | None = None) -> None:
        """One iteration's record (with ``eval`` when it evaluated, and then its held-out ``images``)."""
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self._send(metrics["iteration"], scalars(metrics), images)

    def evaluation(self, step: int, metrics: dict, images: torch.Tensor) -> None:
        """The held-out evaluation before training (step 0) or after it (step ``train.iterations``)."""
        self._send(step, scalars({"eval": metrics}), images)

    def _send(self, step: int, values: dict[str, float], images: torch.Tensor | None) -> None:
        if not self.sinks:
            return
        grids = {"samples": image_grid(images, self.seeds)} if images is not None else {}
        for sink in self.sinks:
            sink.log(step, values, grids)

    def close(self, failed: bool = False) -> None:
        for sink in self.sinks:
            sink.close(failed)
        self.sinks = []
