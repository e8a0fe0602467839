"""The job around the algorithm: the update loop, progress and logging, checkpoints and resume, signals, the
divergence stop and the run summary. One update is `Trainer.step`: the algorithm's ``make_experience`` for this
update's prompts, then its ``optimise`` (see `smolppo.algorithm.ppo`), then the schedules move on.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict

import torch

from smolppo import files, zero
from smolppo.algorithm.behaviour import BehaviourWatch
from smolppo.algorithm.experience import Experience
from smolppo.algorithm.ppo import Algorithm
from smolppo.data import PromptSampler, PromptSet
from smolppo.distributed import cpu_has_fast_bf16
from smolppo.errors import UserError
from smolppo.rewards.reader import PairwiseCheck
from smolppo.rewards.sources import CombinedReward
from smolppo.runs import checkpointing, hub, output_dir
from smolppo.signals import GracefulStop
from smolppo.tracking import MetricsWriter, peak_memory_bytes, run_environment

logger = logging.getLogger(__name__)

SUMMARY_FILE = files.RUN_SUMMARY_FILE
FINITE_METRICS = ("rewards/mean", "kl_divergence", "loss", "loss/value")


class TrainingDiverged(UserError):
    """A loss, reward or KL became NaN or infinite; the last good checkpoint is left untouched."""


class Trainer:
    """Runs an `Algorithm` over the prompts for the schedule's updates, and keeps everything needed to resume."""

    def __init__(
        self,
        config,
        algorithm: Algorithm,
        prompts: PromptSet,
        reward: CombinedReward,
        reward_check: PairwiseCheck | None = None,
    ):
        self.config = config
        self.algorithm = algorithm
        self.accelerator = acc = algorithm.accelerator
        self.schedule = algorithm.schedule
        self.prompts = prompts
        self.reward_check = reward_check
        batch = self.schedule.global_rollout_batch
        self.sampler = PromptSampler(len(prompts.input_ids), batch, config.seed, acc.process_index, acc.num_processes)
        self.reward = reward  # the sources the algorithm scores with: named in the summary and watched
        reader = reward.reader
        self.resolved_paths = {
            "policy_model": _absolute(self.policy.name_or_path),
            "reward_model": _absolute(reader.model.name_or_path) if reader is not None else None,
        }
        self.update = 0
        self.episodes = 0
        self.last_metrics: dict = {}
        self.config_changes: list = []  # settings changed on resume with --allow-config-change
        self.last_samples: list[dict] = []
        self._signals = GracefulStop("")
        self._stop_signal: str | None = None  # the signal that stopped the run, on any process
        self.writer: MetricsWriter | None = None
        self.final_model_saved = False  # what a full disk at the last checkpoint leaves the user
        self.watch = BehaviourWatch(dict(zip(reward.names, reward.weights)))

    @property
    def policy(self):
        return self.algorithm.policy

    @property
    def observed(self) -> dict:
        return self.algorithm.observed

    # ------------------------------------------------------------------ one update
    def step(self) -> dict[str, float]:
        """One update: experience for this update's prompts, the optimisation, then the KL and LR schedules."""
        algo = self.algorithm
        exp = algo.make_experience(self.prompts, self.sampler.indices(self.update))
        train_stats = algo.optimise(exp, self.update)
        metrics = self._reduce_metrics(algo.metrics(exp, train_stats))
        self._check_finite(metrics)
        algo.end_update(metrics["kl_divergence"])
        self.update += 1
        self.episodes += self.schedule.episodes_per_update
        metrics["episodes"] = float(self.episodes)
        self.last_metrics = metrics
        self._remember_samples(exp)
        for warning in self.watch.observe(metrics, self.update):
            if self.accelerator.is_main_process:
                logger.warning("update %d: %s", self.update, warning["message"])
                if self.writer:
                    self.writer.text("warnings", warning["message"], self.update)
        return metrics

    # ------------------------------------------------------------------ the loop
    def train(self, resume_from: str | None = None) -> dict:
        """Train until the schedule's last update; returns the run summary (also written as JSON). A full disk, at
        any point, is one line naming the directory and the space a checkpoint needs."""
        try:
            return self._train(resume_from)
        except Exception as exc:
            size = self.algorithm.checkpoint_bytes()
            needed = size["weights"] + size["optimizer"]
            # torch.save reports a short write on a full disk as "unexpected pos": judge by the space left too
            short_of_space = (
                isinstance(exc, (OSError, RuntimeError)) and output_dir.free_bytes(self.config.output_dir) < needed
            )
            if not (output_dir.is_disk_full(exc) or short_of_space):
                raise
            last = checkpointing.latest_checkpoint(self.config.output_dir)
            raise output_dir.disk_full_error(
                self.config.output_dir, f"update {self.update}'s outputs", needed, last, self.final_model_saved
            ) from exc
        finally:
            self.algorithm.close()  # the rollout engine (vLLM) goes before the script tears its process group down

    def _train(self, resume_from: str | None) -> dict:
        cfg, acc = self.config, self.accelerator
        if resume_from:
            self.load_checkpoint(resume_from)
        started = time.time()
        self._signals = GracefulStop("finishing this update, then saving a checkpoint").install()
        if acc.is_main_process:
            self._open_logs()
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        progress = tqdm(
            total=self.schedule.total_updates,
            initial=self.update,
            desc=cfg.advantage_estimator.upper() if cfg.advantage_estimator != "gae" else "PPO",
            unit="update",
            disable=not acc.is_main_process,
        )
        try:
            with logging_redirect_tqdm():  # log lines go above the progress bar, not into its line
                status, metrics = self._run_updates(progress)
        finally:
            progress.close()
            self._signals.restore()
        if status == "interrupted":
            path = self.save_checkpoint()
            logger.warning(
                "stopped by %s after update %d; checkpoint saved to %s. Resume with: "
                "python train_ppo.py <same flags> --resume-from-checkpoint latest",
                self._stop_signal,
                self.update,
                path,
            )
        else:  # the model first: a disk too full for the last checkpoint still gets the run's product
            self.save_model()
            self.final_model_saved = True
        self._explain_kl(metrics)
        summary = self._summary(status, metrics, time.time() - started)
        penalty = summary["kl_penalty_outweighs_score"]
        if penalty and acc.is_main_process:  # a stall or a missed target warns; a target held as asked is a finding
            held = penalty["kind"] == "holding_target"
            logger.log(logging.INFO if held else logging.WARNING, "%s", penalty["message"])
        if acc.is_main_process:
            output_dir.write_json_atomically(os.path.join(cfg.output_dir, SUMMARY_FILE), summary)
            if status == "finished":
                with output_dir.publishing(cfg.output_dir, "card") as staging:
                    with open(os.path.join(staging, files.CARD_FILE), "w", encoding="utf-8") as f:
                        f.write(hub.model_card(summary))
            if self.writer:
                self.writer.samples(self.last_samples, self.update)
                self.writer.close()
        if status == "finished":
            self.save_checkpoint()
        return summary

    def _run_updates(self, progress) -> tuple[str, dict]:
        """Updates until the schedule ends or a signal arrives: ``(status, last metrics)``."""
        cfg = self.config
        metrics: dict = dict(self.last_metrics)
        while self.update < self.schedule.total_updates:
            metrics = self.step()
            if self.writer and (self.update % cfg.logging_steps == 0 or self.update == 1):
                self.writer.scalars(metrics, self.update)
            if self.writer and self.update % cfg.sample_logging_steps == 0:
                self.writer.samples(self.last_samples, self.update)
            progress.update(1)
            progress.set_postfix(
                reward=f"{metrics['rewards/mean']:.3f}",
                kl=_fixed(metrics["kl_divergence"], 2),
                kl_coef=f"{metrics['objective/kl_coef']:.3g}",
                penalty_to_score=_fixed(metrics.get("objective/kl_penalty_to_score", 0.0), 2),
            )
            if self._stop_requested():
                return "interrupted", metrics
            if self.update % cfg.save_steps == 0 and self.update < self.schedule.total_updates:
                self.save_checkpoint()  # the last update's is written after the final model
        return "finished", metrics

    def _open_logs(self) -> None:
        cfg = self.config
        os.makedirs(cfg.output_dir, exist_ok=True)
        output_dir.remove_leftovers(cfg.output_dir)
        run_name = os.path.basename(os.path.abspath(cfg.output_dir))
        logs = os.path.join(cfg.output_dir, files.LOGS_DIR)
        self.writer = MetricsWriter(logs, self.update + 1, cfg.report_to, run_name, cfg.recorded())
        self._log_plan()
        if self.reward_check is not None and self.update == 0:
            check = self.reward_check
            self.writer.scalars(
                {"reward_model/pairwise_accuracy": check.pairwise_accuracy, "reward_model/margin": check.margin}, 0
            )

    def _log_plan(self) -> None:
        """The schedule, the size of what each checkpoint writes, and the bf16 hint for CPUs that have it."""
        cfg, s = self.config, self.schedule
        logger.info(
            "%s: %d updates (%d per epoch), %d prompts x %d samples = %d episodes per update, %d optimizer steps "
            "per update; learning rate %s over the %d planned updates, %d warm-up steps; KL target %.3g, horizon "
            "%d episodes%s",
            cfg.advantage_estimator,
            s.total_updates,
            s.updates_per_epoch,
            s.global_rollout_batch,
            cfg.samples_per_prompt,
            s.episodes_per_update,
            s.optimizer_steps_per_update,
            cfg.lr_scheduler_type + (f" (floor {cfg.min_lr_ratio:g} x peak)" if cfg.min_lr_ratio else ""),
            s.planned_updates,
            s.warmup_steps,
            cfg.kl_target,
            s.kl_horizon,
            f"; resuming at update {self.update}" if self.update else "",
        )
        size = self.algorithm.checkpoint_bytes()
        updates = range(self.update + 1, s.total_updates + 1)
        checkpoints = sum(1 for u in updates if u % cfg.save_steps == 0 or u == s.total_updates)
        logger.info(
            "each checkpoint writes %s (models %s, optimizer state %s); checkpoints in this run: %d, at most %d kept "
            "(--save-steps, --save-total-limit)",
            output_dir.human_bytes(size["weights"] + size["optimizer"]),
            output_dir.human_bytes(size["weights"]),
            output_dir.human_bytes(size["optimizer"]),
            checkpoints,
            cfg.save_total_limit,
        )
        if self.accelerator.device.type == "cpu" and not cfg.bf16 and cpu_has_fast_bf16():
            logger.info("this CPU computes bf16 natively: --bf16 makes each update about 1.7x cheaper")

    def _explain_kl(self, metrics: dict) -> None:
        """Say when the adaptive controller never acted: the KL stayed below its target all run."""
        kl = self.algorithm.kl_status()
        if kl["engaged"] in (True, None) or not metrics or not self.accelerator.is_main_process:
            return
        logger.info(
            "the KL never reached its target %.3g (last update: %.3g nats), so the adaptive controller held the "
            "coefficient at %.3g; lower --kl-target to steer a run this short, or keep it: the penalty acted anyway",
            kl["target"],
            metrics.get("kl_divergence", float("nan")),
            kl["kl_coef"],
        )

    # ------------------------------------------------------------------ saving and resuming
    def save_model(self, target: str | None = None) -> None:
        """Final policy (full weights or LoRA adapter) + tokenizer in `target`, value model (gae) beside it: staged,
        then moved in, never over the user's files."""
        self.algorithm.save_pretrained(lambda: output_dir.publishing(target or self.config.output_dir))

    def save_checkpoint(self) -> str | None:
        """``checkpoint-<update>``: the algorithm's state (`Algorithm.save`) and this job's counters, written into a
        staging directory that is renamed in only when complete; the path (None on the other processes)."""
        cfg, acc = self.config, self.accelerator
        if acc.is_main_process:
            checkpointing.fresh_staging_dir(cfg.output_dir, self.update)
        acc.wait_for_everyone()  # every process writes into it (under DeepSpeed, its shard of the state)
        staging = checkpointing.staging_dir(cfg.output_dir, self.update)
        try:
            holds = self.algorithm.save(staging)
            if acc.is_main_process:
                counters = {"update": self.update, "episodes": self.episodes, "last_metrics": self.last_metrics}
                index = {**holds, **counters, "watch": self.watch.state_dict(), "config": cfg.recorded()}
                output_dir.write_json_atomically(os.path.join(staging, files.STATE_FILE), index)
        except BaseException:
            checkpointing.discard_staging(cfg.output_dir, self.update)
            raise
        if not acc.is_main_process:
            return None
        path = checkpointing.publish_checkpoint(cfg.output_dir, self.update, cfg.save_total_limit)
        if cfg.save_optimizer_state == "latest":
            checkpointing.drop_optimizer_state(cfg.output_dir, keep=path)
        return path

    def load_checkpoint(self, path: str) -> None:
        """Restore everything `save_checkpoint` wrote; a damaged file is one line naming it."""
        state = checkpointing.read_index(path)
        self.algorithm.load(path)
        self.update, self.episodes = state["update"], state["episodes"]
        self.last_metrics = state.get("last_metrics", {})
        self.watch.load_state_dict(state.get("watch", {}))
        logger.info("resumed from %s at update %d (%d episodes)", path, self.update, self.episodes)

    # ------------------------------------------------------------------ helpers
    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        reduced = self.accelerator.reduce(values, reduction="mean").tolist()
        return dict(zip(keys, reduced))

    def _stop_requested(self) -> bool:
        """True when any process got SIGINT/SIGTERM, so that all processes stop after the same update."""
        self._stop_signal = self._stop_signal or self._signals.signal_name
        if self.accelerator.num_processes == 1:
            return self._stop_signal is not None
        flag = torch.tensor([1.0 if self._stop_signal else 0.0], device=self.accelerator.device)
        stop = self.accelerator.reduce(flag, reduction="sum").item() > 0  # one read per update
        if stop and not self._stop_signal:
            self._stop_signal = "a signal on another process"
        return stop

    def _check_finite(self, metrics: dict[str, float]) -> None:
        for name in FINITE_METRICS:
            if name in metrics and not math.isfinite(metrics[name]):
                raise TrainingDiverged(
                    f"{name} became {metrics[name]} at update {self.update + 1}; nothing from this update was saved. "
                    "Lower --learning-rate, raise --init-kl-coef, or resume from the last checkpoint",
                    exit_code=3,
                )

    def _remember_samples(self, exp: Experience) -> None:
        count = min(self.config.num_logged_samples, len(exp.rollout))
        rollout, context = exp.rollout, exp.rollout.context_length
        self.last_samples = [
            {
                "prompt": self.algorithm.tokenizer.decode(
                    rollout.input_ids[i, :context][rollout.attention_mask[i, :context].bool()]
                ),
                "response": self.algorithm.tokenizer.decode(rollout.responses[i, : int(rollout.response_lengths[i])]),
                "reward": float(exp.scores[i]),
            }
            for i in range(count)
        ]

    def _summary(self, status: str, metrics: dict, wall_time: float) -> dict:
        reward, kl = self.reward, self.algorithm.kl_status()
        return {
            "status": status,
            "stopped_by": self._stop_signal,
            "updates": self.update,
            "episodes": self.episodes,
            "schedule": asdict(self.schedule),
            "config": self.config.recorded(),
            "resolved_paths": self.resolved_paths,
            "num_prompts": len(self.prompts.input_ids),
            "prompts_dropped_too_long": self.prompts.num_too_long,
            "wall_time_s": round(wall_time, 2),
            "peak_memory_bytes": peak_memory_bytes(self.accelerator.device),
            "final_metrics": metrics,
            "reward_model_check": asdict(self.reward_check) if self.reward_check else None,
            "config_changes_on_resume": [
                {"field": key, "checkpoint": old, "now": new} for key, old, new in self.config_changes
            ],
            "reward_sources": [{"name": n, "weight": w} for n, w in zip(reward.names, reward.weights)],
            "reward_template": reward.reader.template_name if reward.reader is not None else None,
            "kl_coef_next_update": kl["kl_coef"],  # final_metrics' objective/kl_coef: the last update's
            "kl_target_reached": kl["engaged"],
            # None, or the figures and what to do (which depends on where the KL ended against a steered target)
            "kl_penalty_outweighs_score": self.watch.penalty_report(kl["target"]),
            "warnings": self.watch.warnings,  # what the behaviour watch saw (BehaviourWatch)
            "observed": self.observed,
            "environment": run_environment(),
            "num_processes": self.accelerator.num_processes,
            "distributed": zero.describe(self.accelerator, self.algorithm.model),
        }


def _absolute(path: str) -> str:
    return os.path.abspath(path) if os.path.isdir(path) else path


def _fixed(value: float, digits: int) -> str:
    """`value` to `digits` decimals for the progress bar, never "-0.00" (a tiny negative estimate reads as 0); "n/a"
    for a figure undefined in this update (nan)."""
    return f"{round(value, digits) + 0.0:.{digits}f}" if math.isfinite(value) else "n/a"
