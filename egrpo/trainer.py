"""The E-GRPO trainer: composes plan, rollout, rewards, advantages and the PPO-clip update; owns no formula.

One iteration (docs/method.md sections 4-6): pick prompts; roll out the plan (anchor ODE, one merged
SDE jump per active step and group member, ODE completion); score every final image; z-score the
rewards within each (prompt, step) group; then, for each active step, evaluate the policy ONCE per
prompt on the shared anchor latent, compute the G log-probs from that output and take one
optimizer step.

Every iteration draws its randomness from a generator seeded by (seed, iteration), so a resumed
run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from egrpo import checkpoint as ckpt
from egrpo.config import Config, reward_specs
from egrpo.determinism import make_deterministic
from egrpo.distributed import World
from egrpo.errors import ConfigError, TrainingStopped
from egrpo.evaluation import make_evaluation
from egrpo.grpo import (
    grouped_std,
    kl_to_reference,
    kl_weight,
    per_reward_advantages,
    ppo_clip_loss,
    transition_advantages,
    uses_kl,
)
from egrpo.methods import Method, build_method
from egrpo.planner import RolloutPlan
from egrpo.policy import Cond, Policy, select
from egrpo.rewards import WeightedReward
from egrpo.rollout import Rollout, TrainStep, network_batch, sample_images
from egrpo.stepmath import gaussian_log_prob, sde_distribution
from egrpo.tasks import Task, build_task
from egrpo.tracking import MetricsLog, check_available


def iteration_generator(seed: int, iteration: int, slot: int = -1) -> torch.Generator:
    """The iteration's shared generator (slot -1), or prompt slot ``slot``'s own noise generator."""
    return torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 4099 + slot + 1)


class Diverged(TrainingStopped):
    """The divergence guard stopped the run; ``summary`` is what its summary.json says."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def chunk_loss(
    policy: Policy, method: Method, config: Config, ts: TrainStep, a: int, b: int, cond: Cond, advantages: torch.Tensor,
    kl_coef: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of inputs ``a:b`` of trained step ``ts`` and of the transitions that leave them (docs/method.md
    section 6), weighted so that the chunks of a step add up to the step's loss, and its statistics as detached
    device tensors, each already weighted by the chunk's share of the step (``ratio_max_dev`` is a maximum).

    The policy runs once per input; its G transitions' log-probs come from that one output. Everything new here is
    made on the policy's device: the rollout's samples and log-probs are there already, the advantages (scored
    wherever the rewards ran) are moved. ``kl_coef``: this iteration's KL weight (train.kl_schedule's value; None =
    train.kl_coef). Whenever the schedule ever weighs the KL, it is computed and reported, even at weight 0."""
    train, noise = config.train, config.sampling.noise
    sigmas, eta = method.sigmas, method.sde_eta()  # the noise level the rollout sampled with
    n, m = ts.inputs.shape[0], ts.source.shape[0]
    lo, hi = (int(i) for i in torch.searchsorted(ts.source, torch.tensor([a, b])))
    sigma_from, sigma_to = sigmas[ts.step].expand(b - a), sigmas[ts.landing].expand(b - a)
    x_in, chunk_cond = ts.inputs[a:b], select(cond, ts.cond_rows[a:b])
    v = policy.velocity(x_in, sigma_from.float(), chunk_cond)
    mean, std = sde_distribution(x_in, v, sigma_from, sigma_to, eta, float(sigmas[1]), noise)
    src = ts.source[lo:hi] - a
    log_probs = gaussian_log_prob(ts.samples[lo:hi], mean[src], std[src])
    old, adv = ts.log_probs[lo:hi], advantages[lo:hi].to(log_probs.device)
    loss, stats = ppo_clip_loss(log_probs, old, adv, train.clip_range)
    share = (hi - lo) / m
    stats = {name: value if name == "ratio_max_dev" else value * share for name, value in stats.items()}
    loss = loss * ts.weight * share
    if uses_kl(train.kl_schedule, train.kl_coef, train.kl_coef_end):
        with torch.no_grad():
            v_ref = policy.velocity(x_in, sigma_from.float(), chunk_cond, reference=True)
            ref_mean, _ = sde_distribution(x_in, v_ref, sigma_from, sigma_to, eta, float(sigmas[1]), noise)
        kl = kl_to_reference(mean, ref_mean, std)
        loss = loss + (train.kl_coef if kl_coef is None else kl_coef) * kl * (b - a) / n
        stats["kl"] = kl.detach() * share
    stats["loss"] = loss.detach()
    return loss, stats


class Trainer:
    def __init__(
        self,
        config: Config,
        run_dir: Path | None = None,
        resume: bool = False,
        progress: bool = True,
        task: Task | None = None,
    ):
        """``task``: a task built by the caller (e.g. a policy assembled in memory) instead of
        ``build_task(config)``."""
        self.config = config
        self.progress = progress
        if config.train.deterministic:  # before any CUDA work: cuBLAS reads its workspace setting once
            make_deterministic()
        # A resumed run's changed settings are refused or accepted before any weights load.
        chosen_dir = Path(run_dir) if run_dir else default_run_dir(config)
        self._config_changes = resume_changes(config, chosen_dir) if resume else {}
        # Join the process group first: it pins this rank's CUDA device before any weights load.
        self.world = World.from_env(config.train.distributed)
        if self.world.is_main:  # a missing TensorBoard or W&B is refused before the weights load, not after
            check_available(config.logging, chosen_dir)
        self._log: MetricsLog | None = None  # metrics.jsonl and the dashboards: rank 0 opens it when training starts
        self._lock = ckpt.RunLock(chosen_dir) if resume and self.world.is_main else None  # before loading
        fsdp = self.world.mode == "fsdp"
        if fsdp:
            _check_fsdp_supported(config)
        # Under FSDP the model is built on the meta device and each rank later reads only its shards.
        self.task = task if task is not None else build_task(config, on_meta=fsdp)
        self.policy = self.task.policy
        self.method = build_method(config)
        self.plan: RolloutPlan = self.method.plan
        self.reward = WeightedReward(reward_specs(config))
        checks = config.eval.check
        self.check_reward = WeightedReward({n: (1.0, dict(o or {})) for n, o in checks.items()}) if checks else None
        self._best_reward = -math.inf  # the watch's best evaluation so far, kept in RUN/best/
        self.novelty_encoder = None
        if config.train.novelty_bonus > 0:
            from egrpo import diversity

            chosen = diversity.encoder(config.eval.diversity_encoder, self.reward.components, config.model.kind)
            if chosen is None:
                raise ConfigError(
                    "train.novelty_bonus needs image features: configure a clip, pickscore or hps reward (weight 0 "
                    "is fine) or name one in eval.diversity_encoder"
                )
            self.novelty_encoder = chosen[1]
        self.run_dir = Path(self.world.broadcast(str(chosen_dir)))
        needed = config.train.prompts_per_iteration * self.world.size
        if needed > len(self.task.train_prompts):
            raise ConfigError(
                f"train.prompts_per_iteration={config.train.prompts_per_iteration} on {self.world.size} ranks needs "
                f"{needed} distinct prompts per iteration; there are {len(self.task.train_prompts)}"
            )
        self.uses_kl = uses_kl(config.train.kl_schedule, config.train.kl_coef, config.train.kl_coef_end)
        if self.uses_kl:
            self.policy.freeze_reference()
        self.model = self.policy.model  # unwrapped: what checkpoints hold
        # What the policy calls: DDP's wrapper, or the model sharded in place.
        self.policy.model = self.world.wrap(self.model, self._fsdp_param_dtype() if fsdp else None)
        if any(p.is_meta for p in self.model.parameters()):
            self._fill_shards()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.train.lr, weight_decay=config.train.weight_decay)
        self.train_cond = self.policy.encode(self.task.train_prompts)
        self.evaluation = make_evaluation(self.task, config, self.world.rank, self.world.size)
        self.start_iteration = 0
        self._stop_requested = False
        self._skip_streak = 0  # optimizer steps skipped in a row for non-finite values
        self.max_batch = network_batch(config.train.max_batch)  # 'auto' halves it on an out-of-memory
        self._base_norm: float | None = None  # the divergence guard's yardstick: the base model's weight norm
        self._samples_finite = True
        if resume:
            self._resume()
        else:
            self._start_new_run()
        if self._base_norm is None:
            self._base_norm = self.world.weight_norm(self.model)

    def _fsdp_param_dtype(self) -> torch.dtype | None:
        """FSDP's gather / compute dtype: train.fsdp_param_dtype, else the policy's compute dtype."""
        name = self.config.train.fsdp_param_dtype
        dtype = getattr(torch, name) if name else getattr(self.policy, "dtype", torch.float32)
        return None if dtype == torch.float32 else dtype

    def _fill_shards(self) -> None:
        """Allocate this rank's shards of the meta-built model and read them: from the weight files, then
        (a fine-tuned start) from a sharded checkpoint."""
        from egrpo.models.pipeline import lora_initial_value
        from egrpo.sharding import fill_from_safetensors

        files = [f for f in self.task.weight_files if not ckpt.is_sharded(f)]
        # LoRA adapters are in no base file: each rank starts its rows of them as one process would
        fill_from_safetensors(self.model, files, self.policy.device, fresh=lora_initial_value)
        for directory in (f for f in self.task.weight_files if ckpt.is_sharded(f)):
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            trained = ckpt.trainable_state(self.model)
            shards = {k: v for k, v in get_model_state_dict(self.model).items() if k in trained}
            ckpt.load_sharded_checkpoint(directory, {"model": shards}, self.policy.arch_config())

    # ---- run directory --------------------------------------------------------------------------
    def _start_new_run(self) -> None:
        # A start that failed before its first iteration left config.yaml and an empty metrics.jsonl: nothing to
        # resume there, so a new start takes the directory over (and evaluates the base model again, for its config).
        metrics = self.run_dir / "metrics.jsonl"
        started = (metrics.exists() and metrics.stat().st_size > 0) or ckpt.latest_checkpoint(self.run_dir) is not None
        if self.world.broadcast(started):
            raise ConfigError(
                f"{self.run_dir} already holds a run; resume it with --resume {self.run_dir} or pick another output_dir"
            )
        self.config.output_dir = str(self.run_dir)
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock = ckpt.RunLock(self.run_dir)
            for stale in ("eval_base.json", "eval_base_images.safetensors"):
                (self.run_dir / stale).unlink(missing_ok=True)
            self.config.dump(self.run_dir / "config.yaml")
            metrics.touch()
        self.world.barrier()

    def _resume(self) -> None:
        if self.world.is_main:
            if self._config_changes:  # recorded, and the run's config.yaml says what it now trains with
                with open(self.run_dir / "config_changes.jsonl", "a") as f:
                    f.write(json.dumps({"at": datetime.now().isoformat(timespec="seconds"),
                                        "changes": self._config_changes}) + "\n")
                self.config.dump(self.run_dir / "config.yaml")
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None:  # stopped before its first checkpoint: start the same config again, in place
            if self.world.is_main:
                ckpt.atomic_write_text(self.run_dir / "metrics.jsonl", "")
            self.world.barrier()
            return
        sharded = ckpt.is_sharded(latest)
        if sharded != (self.world.mode == "fsdp"):
            written = "train.distributed=fsdp" if sharded else "train.distributed=ddp or one process"
            raise ConfigError(
                f"{latest} was written by a run with {written}; resume it the same way "
                f"(the world size may differ under FSDP)"
            )
        arch = self.policy.arch_config()
        if sharded:
            shards = self.world.sharded_state(self.model, self.optimizer)
            state = ckpt.load_sharded_checkpoint(latest, shards, arch)
            self.world.load_sharded_state(self.model, self.optimizer, shards)
        else:
            tensors, optimizer_state, state = ckpt.load_checkpoint(latest, self.model, arch)
            params = ckpt.trainable_state(self.model)
            with torch.no_grad():
                for name, value in tensors.items():
                    params[name].copy_(value)
            self.optimizer.load_state_dict(optimizer_state)
        self.start_iteration = state["iteration"]
        self._base_norm = state.get("base_weight_norm")
        best = self.run_dir / "best" / "best.json"
        if best.is_file():  # the watch's best evaluation so far: a resumed run keeps it unless it does better
            self._best_reward = ckpt.read_json(best, "hacking watch's best evaluation")["reward"]
        if self.world.is_main:
            metrics = self.run_dir / "metrics.jsonl"
            lines = metrics.read_text().splitlines()
            try:
                kept = [l for l in lines if l and json.loads(l)["iteration"] <= self.start_iteration]
            except (ValueError, KeyError, TypeError):
                raise ckpt.CheckpointError(
                    f"{metrics} is damaged (a line is not an iteration's JSON record); repair or remove that line "
                    "and resume again"
                ) from None
            ckpt.atomic_write_text(metrics, "".join(l + "\n" for l in kept))
        self.world.barrier()

    # ---- one iteration ----------------------------------------------------------------------------
    def iteration(self, it: int) -> dict:
        gen, rows, prompt_gens = self._draws(it)
        prompts = [self.task.train_prompts[int(r)] for r in rows]
        cond = select(self.train_cond, rows)

        t0 = time.perf_counter()
        self.model.eval()
        ro = self._rollout(it, gen, cond, prompt_gens)
        self._samples_finite = not self.world.any(not bool(torch.isfinite(ro.finals).all()))
        t1 = time.perf_counter()
        rewards, anchor_rewards, parts = self._score(ro, prompts)
        t2 = time.perf_counter()
        # A non-finite reward on any rank skips every rank's update (DDP / FSDP need all ranks in the backward).
        if self.world.any(not bool(torch.isfinite(rewards).all())):
            update = self._skip(len(ro.train_steps), it, "rewards")
        else:
            knobs = "train.update_batch, or turn on model.gradient_checkpointing"
            with self._memory_guard("update", f"{self.config.train.update_batch} inputs a forward-backward", knobs):
                update = self._update(ro, cond, self._advantages(ro, rewards, parts), it)
        t3 = time.perf_counter()

        group_std = [grouped_std(rewards[ts.leaves].mean(1), ts.groups) for ts in ro.train_steps]
        metrics = {
            "iteration": it + 1,
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            "group_reward_std": sum(group_std) / max(1, len(group_std)),
            **({"anchor_reward": anchor_rewards.mean().item()} if anchor_rewards is not None else {}),
            **{f"reward_{k}": v.mean().item() for k, v in parts.items()},
            **update,
            **({"kl_coef": self._kl_coef(it)} if self.uses_kl else {}),
            "optimizer_steps": len(ro.train_steps) - update["skipped_steps"],
            "network_calls": ro.network_calls + sum(ts.inputs.shape[0] for ts in ro.train_steps),
            "max_batch": self.max_batch,
            "seconds_rollout": t1 - t0,
            "seconds_reward": t2 - t1,
            "seconds_update": t3 - t2,
            "seconds": t3 - t0,
        }
        return self.world.mean(metrics)

    def _rollout(self, it: int, gen: torch.Generator, cond: Cond, prompt_gens: list[torch.Generator]) -> Rollout:
        """The method's rollout at ``self.max_batch`` latents a network call. Under train.max_batch=auto an
        out-of-memory halves it and rolls out again from generators drawn anew, so the samples are the same
        (rows are independent: only the batching, and with it the GPU's rounding, changes)."""
        while True:
            try:
                return self.method.rollout(self.policy, cond, it, gen, prompt_gens, self.max_batch)
            except torch.OutOfMemoryError:
                if self.config.train.max_batch != "auto" or self.max_batch == 1:
                    raise self._out_of_memory("rollout", f"batches of {self.max_batch} latents", "train.max_batch "
                                              "(or set it to auto)") from None
            # Out of the except block, the failed attempt's tensors are free.
            if self.policy.device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"iteration {it + 1}: out of GPU memory in the rollout at {self.max_batch} latents a call; "
                  f"train.max_batch=auto retries it at {self.max_batch // 2}", file=sys.stderr, flush=True)
            self.max_batch //= 2
            gen, _, prompt_gens = self._draws(it)

    def _draws(self, it: int) -> tuple[torch.Generator, torch.Tensor, list[torch.Generator]]:
        """Iteration ``it``'s shared generator (after its prompt draw), this rank's prompt rows and their noise
        generators: the same every time they are drawn. All ranks draw the same global prompt choice and take
        their own slice; each prompt slot has its own noise generator, so the world size does not change what a
        prompt's samples are."""
        p, first = self.config.train.prompts_per_iteration, self.world.rank * self.config.train.prompts_per_iteration
        gen = iteration_generator(self.config.seed, it)
        rows = torch.randperm(len(self.task.train_prompts), generator=gen)[: p * self.world.size][first : first + p]
        return gen, rows, [iteration_generator(self.config.seed, it, slot) for slot in range(first, first + p)]

    @contextlib.contextmanager
    def _memory_guard(self, phase: str, batch: str, knobs: str):
        """An out-of-memory in ``phase`` becomes one line naming it, the batch at the time and what cuts memory."""
        try:
            yield
        except torch.OutOfMemoryError:
            raise self._out_of_memory(phase, batch, knobs) from None

    def _out_of_memory(self, phase: str, batch: str, knobs: str) -> TrainingStopped:
        return TrainingStopped(
            f"out of GPU memory in the {phase} ({batch} at the time): lower {knobs}; LoRA (model.lora_rank), "
            f"gradient checkpointing (model.gradient_checkpointing=true) and FSDP (train.distributed=fsdp) cut "
            f"memory too; {self._checkpoint_kept()}"
        )

    def _checkpoint_kept(self) -> str:
        """What a stopped run leaves: its last checkpoint, untouched, or none."""
        latest = ckpt.latest_checkpoint(self.run_dir)
        return f"the last checkpoint, {latest}, is untouched" if latest else "no checkpoint was written yet"

    def _advantages(self, ro: Rollout, rewards: torch.Tensor, parts: dict) -> list[torch.Tensor]:
        """Group z-scores of each trained step's transitions (of the total reward, or of each reward)."""
        cfg = self.config.train
        if cfg.reward_normalization == "per_reward":
            return [
                per_reward_advantages(parts, self._reward_weights(), ts.leaves, ts.groups, ro.reduce, cfg.adv_clip)
                for ts in ro.train_steps
            ]
        return [transition_advantages(rewards, ts.leaves, ts.groups, ro.reduce, cfg.adv_clip) for ts in ro.train_steps]

    def _reward_weights(self) -> dict[str, float]:
        """Each reward's weight in the advantage; the novelty bonus counts as one more when it is on."""
        bonus = self.config.train.novelty_bonus
        return {**self.reward.weights, **({"novelty": bonus} if self.novelty_encoder is not None else {})}

    def _score(self, ro: Rollout, prompts: list[str]):
        """One reward call for every final latent (and the anchors); rewards (F,), anchors (P,) or None."""
        latents, names = ro.finals, [prompts[int(r)] for r in ro.final_rows]
        if ro.anchor_finals is not None:
            latents, names = torch.cat([latents, ro.anchor_finals]), names + prompts
        decode_batch = self.config.model.decode_batch
        with self._memory_guard("decode", f"{decode_batch} latents a VAE call", "model.decode_batch"):
            images = self.policy.decode(latents)
        with self._memory_guard("reward", f"{len(names)} images", "the reward's batch_size (reward.NAME.batch_size), "
                                "or move it to another GPU (reward.NAME.device) or server (reward http)"):
            total, parts = self.reward.score(images, names)
        n = ro.finals.shape[0]
        if self.novelty_encoder is not None:  # the bonus is for the trained samples, not the anchors
            from egrpo.diversity import novelty

            parts["novelty"] = torch.zeros_like(total)
            parts["novelty"][:n] = novelty(self.novelty_encoder(images[:n]), ro.final_rows).to(total.device)
            total = total + self.config.train.novelty_bonus * parts["novelty"]
        anchors = total[n:] if ro.anchor_finals is not None else None
        return total[:n], anchors, {name: v[:n] for name, v in parts.items()}

    def _update(self, ro: Rollout, cond: Cond, advantages: list[torch.Tensor], it: int) -> dict:
        """One optimizer step per trained step. The policy runs once per distinct input (the G members of
        an E-GRPO group share theirs); inputs are chunked to ``update_batch`` with gradients accumulated.
        A step whose gradient norm is not finite is skipped (see :meth:`_skip`). Statistics stay on the
        device until the step ends: one host sync per optimizer step, not one per chunk and statistic."""
        cfg = self.config.train
        kl_coef = self._kl_coef(it)
        self.model.train()
        stats: dict[str, list[float]] = {}
        skipped = 0
        for j, ts in enumerate(ro.train_steps):
            n = ts.inputs.shape[0]
            totals: dict[str, torch.Tensor] = {}
            self.optimizer.zero_grad(set_to_none=True)
            for a in range(0, n, cfg.update_batch):
                b = min(a + cfg.update_batch, n)
                loss, chunk_stats = chunk_loss(self.policy, self.method, self.config, ts, a, b, cond, advantages[j],
                                               kl_coef)
                with self.world.no_sync(self.policy.model, last_chunk=b == n):
                    loss.backward()
                for name, value in chunk_stats.items():
                    known = totals.get(name)
                    totals[name] = value if known is None else (
                        torch.maximum(known, value) if name == "ratio_max_dev" else known + value
                    )
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            if isinstance(grad_norm, DTensor):  # FSDP: a norm over shards, whole once reduced
                grad_norm = grad_norm.full_tensor()
            step_stats = dict(zip([*totals, "grad_norm"], torch.stack([*totals.values(), grad_norm.float()]).tolist()))
            # The norm is of the reduced gradients, the same on every rank, so every rank decides alike.
            if math.isfinite(step_stats["grad_norm"]):
                self.optimizer.step()
                self._skip_streak = 0
            else:
                self.optimizer.zero_grad(set_to_none=True)
                skipped += self._skip(1, it, "gradient norm")["skipped_steps"]
            if j == 0:
                step_stats["first_ratio_max_dev"] = step_stats["ratio_max_dev"]
            for name, value in step_stats.items():
                stats.setdefault(name, []).append(value)
        return {**{name: sum(values) / len(values) for name, values in stats.items()}, "skipped_steps": skipped}

    def _kl_coef(self, it: int) -> float:
        """Iteration ``it``'s KL weight under train.kl_schedule, over the run's train.iterations."""
        cfg = self.config.train
        return kl_weight(cfg.kl_schedule, cfg.kl_coef, cfg.kl_coef_end, it, cfg.iterations)

    def _skip(self, steps: int, it: int, what: str) -> dict:
        """Count ``steps`` optimizer steps skipped for a non-finite ``what``; too many in a row stop the run."""
        self._skip_streak += steps
        limit = self.config.train.max_skipped_steps
        if self._skip_streak >= limit:
            raise TrainingStopped(
                f"iteration {it + 1}: {self._skip_streak} optimizer steps in a row were skipped for non-finite "
                f"values (last: {what}; train.max_skipped_steps={limit}); {self._checkpoint_kept()}. Fix the cause "
                f"(the reward models' outputs, train.lr), then: egrpo train --resume {self.run_dir}"
            )
        return {"skipped_steps": steps}

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluate(self) -> tuple[dict, torch.Tensor | None]:
        """Held-out metrics (on every rank) and the images they were computed on (rank 0 only; None elsewhere).

        Each rank samples and scores its share of the held-out samples; the metrics, means over a share,
        are combined by sample counts."""
        self.model.eval()
        ev = self.evaluation
        metrics, images = {}, None
        if ev.rows:
            prompts = [ev.prompts[r] for r in ev.rows]
            with self._memory_guard("held-out evaluation", f"batches of {self.max_batch} latents",
                                    "train.max_batch, model.decode_batch"):
                images = sample_images(self.policy, ev.cond, ev.noise, self.plan.sigmas, self.max_batch)
                total, parts = self.reward.score(images, prompts)
            if self.task.metrics is not None:
                metrics = self.task.metrics(images, prompts)
            else:
                metrics = {name: values.mean().item() for name, values in parts.items()}
            metrics["reward"] = total.mean().item()
            if self.check_reward is not None:
                _, checks = self.check_reward.score(images, prompts)
                metrics.update({f"check_{name}": values.mean().item() for name, values in checks.items()})
        shares = self.world.gather((len(ev.rows), metrics, images))
        combined = None
        if self.world.is_main:
            count = sum(n for n, _, _ in shares)
            names = next(m for n, m, _ in shares if n)
            combined = {k: sum(n * m[k] for n, m, _ in shares if n) / count for k in names}
            images = torch.empty(count, *next(i for n, _, i in shares if n).shape[1:])
            for rank, (_, _, part) in enumerate(shares):
                if part is not None:
                    images[rank :: self.world.size] = part
        return self.world.broadcast(combined), images

    # ---- the run ------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Base evaluation, the iterations (checkpointed), final evaluation and weights; ``summary.json``."""
        failed = True
        try:
            summary = self._train()
            failed = False
            return summary
        except Diverged as exc:
            if self.world.is_main:
                ckpt.atomic_write_text(self.run_dir / "summary.json", json.dumps(exc.summary, indent=2))
            raise
        finally:
            if self._log is not None:
                self._log.close(failed)
                self._log = None
            if self._lock is not None:
                self._lock.release()

    def _train(self) -> dict:
        from egrpo import report

        cfg = self.config
        main = self.world.is_main
        if main:
            self._log = MetricsLog(self.run_dir, cfg, self.start_iteration)
        compile_seconds = None
        if cfg.model.compile:  # compiled before any clock starts: the iterations' seconds are the steady state
            compile_seconds = self.policy.compile_completions(self.train_cond)
            if main:
                print(f"model.compile: the transformer's blocks compiled in {compile_seconds:.1f} s", flush=True)
        base_file, base_images_file = self.run_dir / "eval_base.json", self.run_dir / "eval_base_images.safetensors"
        if not self.world.broadcast(base_file.exists()):
            base_metrics, base_images = self.evaluate()
            if main:
                save_file({"images": base_images}, str(base_images_file))
                ckpt.atomic_write_text(base_file, json.dumps(base_metrics))
                self._log.evaluation(0, base_metrics, base_images)
        self.world.barrier()
        base = json.loads(base_file.read_text())
        if main and self.method.uses_entropy_plan:
            tau = cfg.plan.tau if cfg.plan.merge == "adaptive" else None
            report.plot_plan(self.plan, tau, self.run_dir / "plan.png")

        started = time.perf_counter()
        elapsed_before = self._elapsed_before()
        previous = signal.signal(signal.SIGINT, self._request_stop)
        bar = _progress(self.start_iteration, cfg.train.iterations, self.progress and main, self.method.label)
        try:
            for it in range(self.start_iteration, cfg.train.iterations):
                metrics, eval_images = self.iteration(it), None
                metrics["weight_norm"] = self.world.weight_norm(self.model)
                if cfg.eval.every and (it + 1) % cfg.eval.every == 0 and it + 1 < cfg.train.iterations:
                    metrics["eval"], eval_images = self.evaluate()
                metrics["elapsed"] = elapsed_before + time.perf_counter() - started
                if main:
                    self._log.iteration(metrics, eval_images)
                self._stop_if_diverged(it, metrics)
                if "eval" in metrics:
                    self._watch(it, base, metrics["eval"], eval_images)
                done = it + 1
                self._stop_requested = self.world.any(self._stop_requested)
                if done % cfg.checkpoint_every == 0 or done == cfg.train.iterations or self._stop_requested:
                    self._checkpoint(done, metrics["elapsed"])
                if bar is not None:
                    bar.update(1)
                    shown = {"reward": metrics["reward_mean"], "anchor": metrics.get("anchor_reward")}
                    bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None})
                if self._stop_requested:
                    raise KeyboardInterrupt
        finally:
            signal.signal(signal.SIGINT, previous)
            if bar is not None:
                bar.close()

        final, final_images = self.evaluate()
        self._stop_if_diverged(cfg.train.iterations - 1, {"eval": final})
        self._watch(cfg.train.iterations - 1, base, final, final_images)
        checksum, checksums = self.world.checksums(self.model)
        summary = {
            "base": base,
            "final": final,
            "iterations": cfg.train.iterations,
            "seconds": self._elapsed_before(),
            "method": self.method.name,
            "plan": self.method.describe(),
            "world_size": self.world.size,
            "weight_checksum": checksum,
            "rank_weight_checksums": checksums,
            **({"compile_seconds": compile_seconds} if compile_seconds is not None else {}),
        }
        if self.world.mode != "fsdp" and len(set(checksums)) > 1:
            raise RuntimeError(f"ranks ended with different weights (checksums {checksums}): data-parallel sync failed")
        self._export(self.run_dir / "model.safetensors")
        if not main:
            return summary
        if cfg.train.export_diffusers:  # from the file just written, streamed: the model is not held twice
            from egrpo.export import export

            export(self.run_dir, self.run_dir / "diffusers", replace=True)
        ckpt.atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        self._log.evaluation(cfg.train.iterations, final, final_images)
        report.plot_rewards(self.run_dir / "metrics.jsonl", self.run_dir / "reward_curve.png")
        report.plot_sample_grid(
            load_file(str(base_images_file))["images"],
            final_images,
            self.evaluation.prompts,
            self.config.eval.seeds_per_prompt,
            self.run_dir / "samples.png",
        )
        return summary

    def _watch(self, it: int, base: dict, now: dict, images: torch.Tensor | None) -> None:
        """The hacking watch after the evaluation of iteration ``it`` (egrpo/watch.py): on hacking, a line on
        stderr, the evaluation's samples in RUN/hacking/ and, with eval.stop_on_hack, the stop; otherwise a new
        best evaluation's weights in RUN/best/ (a collective under FSDP)."""
        from egrpo import report, watch

        if self.check_reward is None:
            return
        settings = self.config.eval
        fallen = watch.fallen_checks(base, now, list(settings.check), settings.hack_margin)
        if watch.hacked(base, now, fallen):
            line = watch.describe(it + 1, base, now, fallen, settings.hack_margin)
            if self.world.is_main:
                if not settings.stop_on_hack:  # else the stop says it, once
                    print(line, file=sys.stderr, flush=True)
                grid = self.run_dir / "hacking" / f"iter-{it + 1:06d}.png"
                grid.parent.mkdir(exist_ok=True)
                report.save_image_grid(images, grid, title=f"iteration {it + 1}: {', '.join(fallen)} fell")
            if settings.stop_on_hack:
                best = self.run_dir / "best"
                kept = f"the best weights before it are in {best}" if best.is_dir() else "no earlier evaluation passed"
                raise TrainingStopped(f"{line}; eval.stop_on_hack: stopped, {kept}")
            return
        if fallen or now["reward"] <= self._best_reward:
            return
        self._best_reward = now["reward"]
        best = self.run_dir / "best"
        if self.world.is_main:
            best.mkdir(exist_ok=True)
        self.world.barrier()
        self._export(best / "model.safetensors")
        if self.world.is_main:
            ckpt.atomic_write_text(best / "best.json", json.dumps({"iteration": it + 1, **now}, indent=2))

    def _stop_if_diverged(self, it: int, metrics: dict) -> None:
        """The divergence guard (train.max_weight_growth): after iteration ``it``, stop the run when the policy's
        samples held NaN or inf, the trained weights' norm left its range, or the held-out reward is not finite.
        The weights are then never published; the last checkpoint, written before, is the run's result."""
        growth = self.config.train.max_weight_growth
        norm = metrics.get("weight_norm")
        held_out = metrics.get("eval", {}).get("reward")
        reason = None
        if not self._samples_finite:
            reason = "the policy's samples held NaN or inf"
        elif norm is not None and not math.isfinite(norm):
            reason = "the trained weights hold NaN or inf"
        elif norm is not None and growth and norm > growth * self._base_norm:
            reason = (f"the trained weights' norm grew to {norm / self._base_norm:.3g}x the base model's "
                      f"(train.max_weight_growth={growth:g})")
        elif held_out is not None and not math.isfinite(held_out):
            reason = f"the held-out reward is {held_out}"
        if reason is None:
            return
        latest = ckpt.latest_checkpoint(self.run_dir)
        result = str(latest) if latest else "the base model (no checkpoint was written)"
        raise Diverged(
            f"iteration {it + 1}: the run diverged: {reason}. Its weights were not written; its result is {result}. "
            f"Lower train.lr (now {self.config.train.lr:g}) and start again",
            {"diverged": {"iteration": it + 1, "reason": reason}, "result": str(latest) if latest else "base",
             "method": self.method.name, "iterations": it + 1},
        )

    def _refuse_nonfinite_weights(self, what: str) -> None:
        """A collective: weights with a NaN or inf are never written (the sum of all weights is then not finite)."""
        total, _ = self.world.checksums(self.model)
        if not math.isfinite(total):
            latest = ckpt.latest_checkpoint(self.run_dir)
            raise TrainingStopped(
                f"the trained weights hold non-finite values, so no {what} was written"
                + (f"; the last checkpoint, {latest}, is untouched" if latest else "")
            )

    def _checkpoint(self, done: int, elapsed: float) -> None:
        self._refuse_nonfinite_weights("checkpoint")
        arch = self.policy.arch_config()
        if self.world.mode == "fsdp":
            shards = self.world.sharded_state(self.model, self.optimizer)
            ckpt.save_sharded_checkpoint(
                self.run_dir, done, shards, arch, {"elapsed": elapsed, "base_weight_norm": self._base_norm},
                self.world.is_main, self.world.barrier,
            )
            return
        if self.world.is_main:
            tensors = {k: v.detach().cpu() for k, v in ckpt.trainable_state(self.model).items()}
            state = {"elapsed": elapsed, "base_weight_norm": self._base_norm}
            ckpt.save_checkpoint(self.run_dir, done, tensors, arch, self.optimizer.state_dict(), state)
        self.world.barrier()

    def _export(self, path: Path) -> None:
        """The final trained weights as one safetensors file (a collective under FSDP, streamed tensor by tensor)."""
        self._refuse_nonfinite_weights(path.name)
        arch = self.policy.arch_config()
        if self.world.mode == "fsdp":
            from egrpo.sharding import export_trained_weights

            export_trained_weights(self.model, path, arch, self.world.is_main)
        elif self.world.is_main:
            ckpt.save_weights(path, ckpt.trainable_state(self.model), arch)

    def _elapsed_before(self) -> float:
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None:
            return 0.0
        return float(ckpt.read_json(latest / "state.json", "checkpoint's trainer state").get("elapsed", 0.0))

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        print(
            f"\nInterrupted: finishing this iteration and writing a checkpoint to {self.run_dir} "
            "(Ctrl-C again aborts at once; the last checkpoint stays valid).",
            flush=True,
        )


# Settings a resumed run may change: how long it runs, how often it evaluates and checkpoints, how it batches
# (memory, not results), whether it also exports for diffusers, where it is watched. Anything else would make the
# run's config.yaml describe a run that did not happen.
RESUMABLE_CHANGES = (
    "train.iterations", "eval.every", "checkpoint_every", "train.max_skipped_steps", "train.max_batch",
    "model.decode_batch", "train.export_diffusers", "logging.tensorboard", "logging.wandb", "logging.wandb_project",
    "logging.wandb_mode",
)


def resume_changes(config: Config, run_dir: Path) -> dict[str, list]:
    """{key: [saved, new]} of the settings ``config`` changes from the run's config.yaml; other changes refused."""
    from egrpo.config import flat_values, load

    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"{run_dir} holds no run to resume (no config.yaml); start one there with output_dir={run_dir}"
        )
    try:
        saved = flat_values(load(str(run_dir / "config.yaml")))
    except ConfigError as exc:
        raise ConfigError(f"--resume {run_dir}: its config.yaml does not load ({exc})") from None
    new = flat_values(config)
    changed = {k: [saved.get(k), v] for k, v in new.items() if saved.get(k) != v}
    if "train.iterations" in changed and new.get("train.kl_schedule", "constant") != "constant":
        # The schedule runs from the first iteration to the last: a new last iteration would bend the part still
        # to come, and the run would match neither the one started nor one started with the new length.
        raise ConfigError(
            f"--resume {run_dir} cannot change train.iterations ({changed['train.iterations'][0]} -> "
            f"{changed['train.iterations'][1]}) under train.kl_schedule={new['train.kl_schedule']}: the KL weight's "
            f"schedule spans the run's iterations. To train on, start a new run with model.checkpoint={run_dir}"
        )
    same_scores = "reward" in changed and _scoring(saved["reward"]) == _scoring(new["reward"])
    refused = [k for k in changed if k not in RESUMABLE_CHANGES and not (k == "reward" and same_scores)]
    if refused:
        key = refused[0]
        raise ConfigError(
            f"--resume {run_dir} cannot change {', '.join(refused)} (e.g. {key}: {changed[key][0]!r} -> "
            f"{changed[key][1]!r}); a resumed run may change only {', '.join(RESUMABLE_CHANGES)} and a reward's "
            f"{', '.join(REWARD_PLACEMENT_OPTIONS)}. To go on from "
            f"its weights with other settings, start a new run with model.checkpoint={run_dir}"
        )
    return changed


# Reward options that say where and how a reward runs, not what it scores: a resumed run may move its reward
# server or its reward model's device.
REWARD_PLACEMENT_OPTIONS = ("url", "timeout", "retries", "device", "batch_size")


def _scoring(reward: dict) -> dict:
    """The reward section without placement options, each reward as a mapping (a bare number is its weight)."""
    specs = {name: spec if isinstance(spec, dict) else {"weight": spec} for name, spec in reward.items()}
    return {name: {k: v for k, v in spec.items() if k not in REWARD_PLACEMENT_OPTIONS} for name, spec in specs.items()}


def _check_fsdp_supported(config: Config) -> None:
    if config.model.compile:
        raise ConfigError(
            "model.compile with train.distributed=fsdp: compiling blocks that FSDP unshards in their forward hooks is "
            "not tested yet; use train.distributed=ddp (with LoRA) or model.compile=false"
        )
    if uses_kl(config.train.kl_schedule, config.train.kl_coef, config.train.kl_coef_end):
        raise ConfigError(
            "train.kl_coef > 0 with train.distributed=fsdp: the frozen reference would be a second unsharded "
            "model on every rank; train without the KL term (the paper's setting) or with train.distributed=ddp"
        )


def default_run_dir(config: Config) -> Path:
    if config.output_dir:
        return Path(config.output_dir)
    return Path("runs") / f"{config.method.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _progress(start: int, total: int, enabled: bool, label: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=label, unit="it", dynamic_ncols=True)
