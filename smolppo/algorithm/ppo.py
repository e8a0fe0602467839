"""The algorithm: one update is ``make_experience`` (stages 1-5) then ``optimise`` (stage 6), read top to bottom.

1. ``rollout``: sample ``samples_per_prompt`` responses per prompt with the current policy;
2. ``rewards``: the reward sources (reward model and/or functions) score each decoded response;
3. ``logprobs``: per-token log-probs under the rollout policy and the frozen reference, and the KL estimate;
4. ``values``: the value model's prediction per response token (``gae`` only: the other estimators have no critic);
5. ``advantages``: the chosen estimator (``gae``, ``grpo``, ``rloo``, ``reinforce_pp``) turns rewards into per-token
   advantages; the KL to the reference is a per-token reward penalty, or a loss term with ``kl_in_loss``;
6. ``optimise``: ``ppo_epochs`` passes of the clipped surrogate (+ value loss with a critic) over mini-batches.

The ratio is new policy / rollout policy; the reference enters only through the KL. The formulas are in
`smolppo.algorithm.ppo_math`; the loop, checkpoints and logging around this are the job's (`smolppo.job.trainer`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from accelerate import Accelerator

from smolppo import zero
from smolppo.algorithm import dynamic_sampling, ppo_math, update_stats
from smolppo.algorithm import state as algorithm_state
from smolppo.algorithm.experience import Experience, MicroBatchLoss, PolicyAndValue
from smolppo.algorithm.optim import apply_configured_learning_rate, current_learning_rate, warm_started_scheduler
from smolppo.algorithm.rollout import (
    Rollout,
    TrimTable,
    check_logits_reproduced,
    pad_response_width,
    response_logprobs,
    response_texts,
    sampling_config,
    selective_log_softmax,
    trim_padding,
)
from smolppo.algorithm.samplers import HFSampler
from smolppo.algorithm.value import TokenScorer, token_values
from smolppo.configs.algorithm import AlgorithmSettings
from smolppo.configs.ppo_fields import GROUP_ESTIMATORS
from smolppo.configs.schedule import Schedule
from smolppo.data import PromptSet
from smolppo.devices import check_on_device
from smolppo.errors import UserError
from smolppo.models import eos_token_ids
from smolppo.rewards.sources import CombinedReward, RewardBatch
from smolppo.runtime import (
    attention_for,
    enable_gradient_checkpointing,
    eval_mode,
    observe_precision,
    reference_context,
    set_attention,
    store_body_linears_in_bf16,
)
from smolppo.tracking import StageTimer


class Algorithm:
    """Clipped policy optimisation of a causal LM with a pluggable reward and advantage estimator.

    `config` is the run's `AlgorithmSettings` (only what the algorithm reads) and `schedule` its derived counts.
    `policy` may be a PEFT model (LoRA); then `ref_policy` is None and the reference is the same network with its
    adapters disabled. `value_model` (a 1-output sequence classifier over the policy's tokens) is given exactly
    when the estimator is ``gae``. `sampler` samples the rollouts (`smolppo.algorithm.samplers`; default:
    transformers' `generate` on the policy).
    """

    def __init__(
        self,
        config: AlgorithmSettings,
        schedule: Schedule,
        tokenizer,
        policy,
        reward: CombinedReward,
        accelerator: Accelerator,
        ref_policy=None,
        value_model=None,
        sampler=None,
    ):
        self.config, self.schedule, self.tokenizer, self.reward = config, schedule, tokenizer, reward
        self.accelerator = acc = accelerator
        if (value_model is not None) != config.estimator.uses_value_model:
            raise ValueError(
                f"advantage_estimator {config.estimator.advantage_estimator} and the value model disagree"
            )
        if ref_policy is None and not hasattr(policy, "disable_adapter"):
            raise ValueError("ref_policy is required unless the policy is a PEFT (LoRA) model")
        self.eos_ids = eos_token_ids(tokenizer, policy)
        self.generation_config = sampling_config(
            tokenizer, self.eos_ids, config.sampling.max_new_tokens, config.sampling.temperature
        )
        self.sampler = sampler or HFSampler(tokenizer, self.eos_ids, self.generation_config)
        check_logits_reproduced(policy)
        for model in (policy, value_model):
            if model is not None:
                if config.precision.gradient_checkpointing:
                    enable_gradient_checkpointing(model)
                model.train()
        model = PolicyAndValue(policy, TokenScorer(value_model) if value_model is not None else None)
        self.trainable_params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            self.trainable_params,
            lr=config.learning_rate,
            weight_decay=config.optimizer.weight_decay,
            fused=acc.device.type in ("cuda", "cpu"),  # one kernel per step; 14x faster than foreach on CPU
        )
        self.lr_scheduler = warm_started_scheduler(
            config.optimizer.lr_scheduler_type,
            optimizer,
            schedule.warmup_steps,
            schedule.planned_optimizer_steps,
            config.optimizer.min_lr_ratio,
        )
        # One prepared module: DeepSpeed takes a single model, and DDP syncs policy and value together.
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if config.loss.dynamic_sampling_refills and self.zero_stage == 3:  # refills differ per process: no collectives
            raise UserError("--dynamic-sampling-refills cannot run under ZeRO-3 (each process refills on its own)")
        frozen = [m for m in (ref_policy, reward.reader.model if reward.reader is not None else None) if m is not None]
        for frozen_model in frozen:
            frozen_model.to(acc.device).eval().requires_grad_(False)
            if config.precision.bf16:
                store_body_linears_in_bf16(frozen_model)
        set_attention(attention_for(config.precision.attn_implementation), policy, value_model, *frozen)
        self.ref_policy = ref_policy
        self.kl_controller = ppo_math.kl_controller(config.kl, schedule.kl_horizon)
        self.timer = StageTimer(acc.device)
        self.observed: dict = {}

    @property
    def policy(self):
        """The policy network (a PEFT model with LoRA), outside any DDP/DeepSpeed wrapper."""
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def value_scorer(self) -> TokenScorer | None:
        return self.accelerator.unwrap_model(self.model).value

    # ------------------------------------------------------------------ stages 1-5
    def make_experience(self, prompts: PromptSet, indices: list[int]) -> Experience:
        """Stages 1-5 for the prompts at `indices`, each sampled `samples_per_prompt` times in a row. What each
        stage hands on is checked to live on the rollout's device (`smolppo.devices`)."""
        cfg = self.config
        indices = [i for i in indices for _ in range(cfg.estimator.samples_per_prompt)]
        rollout = self.rollout([prompts.input_ids[i] for i in indices])
        if not (cfg.loss.dynamic_sampling and cfg.loss.dynamic_sampling_refills):
            return self.experience_from(rollout, prompts, indices)
        rollout, indices, *rewards = dynamic_sampling.refill(
            rollout,
            indices,
            sample=lambda rows: self.rollout([prompts.input_ids[i] for i in rows]),
            score=lambda sampled, rows: self.rewards(sampled, prompts, rows),
            num_prompts=len(prompts.input_ids),
            group_size=cfg.estimator.samples_per_prompt,
            rounds=cfg.loss.dynamic_sampling_refills,
            seed=cfg.optimizer.seed,
            pad_id=self.tokenizer.pad_token_id,
        )
        return self.experience_from(rollout, prompts, indices, rewards)

    def experience_from(self, rollout: Rollout, prompts: PromptSet, indices: list[int], rewards=None) -> Experience:
        """Stages 2-5 for a sampled `rollout` of the prompts at `indices` (one entry per response); `rewards`
        (scores, parts) when they were computed already."""
        device = rollout.device
        check_on_device(self.accelerator.device, "rollout", **rollout.tensors())
        scores, parts = rewards or self.rewards(rollout, prompts, indices)
        check_on_device(device, "rewards", scores=scores, reward_parts=parts)
        old_logprobs, ref_logprobs, kl = self.logprobs(rollout)
        check_on_device(device, "logprobs", old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, kl=kl)
        values = self.values(rollout) if self.value_scorer is not None else None
        check_on_device(device, "values", values=values)
        advantages, unwhitened_advantages, returns = self.advantages(rollout, scores, kl, values)
        check_on_device(
            device, "advantages", advantages=advantages, unwhitened_advantages=unwhitened_advantages, returns=returns
        )
        trained = None
        if self.config.loss.dynamic_sampling:  # DAPO: a group whose rewards are all equal carries no signal
            trained = ppo_math.groups_with_signal(scores, self.config.estimator.samples_per_prompt).float()
        logprobs, credit = (old_logprobs, ref_logprobs, kl), (advantages, unwhitened_advantages, returns)
        weights = self.sampler_weights(rollout, old_logprobs)
        experience = Experience(rollout, scores, *logprobs, *credit, values, parts, trained, weights)
        experience.check_device(device)
        return experience

    def rollout(self, prompts: list[list[int]]) -> Rollout:
        """Stage 1: sampled responses from the full (temperature-scaled) distribution."""
        model = self.policy
        with self.timer.stage("rollout"), self.gathered(), eval_mode(model), self.autocast():
            return self.sampler.sample(model, prompts)

    def sampler_weights(self, rollout: Rollout, old_logprobs: torch.Tensor) -> torch.Tensor | None:
        """Per-token weights correcting for the sampling engine's log-probs differing from the trained model's
        (`ppo_math.sampler_correction`); None when the trained model sampled or the correction is off."""
        gen = self.config.generation
        if rollout.sampler_logprobs is None or not gen.vllm_importance_sampling_correction:
            return None
        return ppo_math.sampler_correction(
            old_logprobs,
            rollout.sampler_logprobs,
            rollout.response_mask,
            gen.vllm_importance_sampling_mode,
            gen.vllm_importance_sampling_cap,
        )

    @torch.no_grad()
    def rewards(self, rollout: Rollout, prompts: PromptSet, indices: list[int]):
        """Stage 2: ``(total [B], {source: [B]})`` for the decoded responses (missing-EOS rule on the total)."""
        with self.timer.stage("reward"), self.autocast():
            batch = RewardBatch(
                conversations=[prompts.conversations[i] for i in indices],
                prompts=[prompts.texts[i] for i in indices],
                completions=response_texts(self.tokenizer, rollout),
                rows=[prompts.rows[i] for i in indices] if prompts.rows else [{} for _ in indices],
            )
            scores, parts = self.reward.score(batch, rollout.device)
        if self.config.rewards.missing_eos_score is not None:
            scores = torch.where(
                rollout.ended_with_eos, scores, torch.full_like(scores, self.config.rewards.missing_eos_score)
            )
        if self.config.rewards.missing_eos_penalty is not None:
            scores = scores - self.config.rewards.missing_eos_penalty * (~rollout.ended_with_eos).to(scores.dtype)
        return scores, parts

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 3: ``(old_logprobs, ref_logprobs, kl)`` per response token."""
        policy = self.policy
        temperature = self.config.sampling.temperature
        with self.gathered(), eval_mode(policy), self.autocast():
            with self.timer.stage("policy_logprobs"):
                old_logprobs = self.in_chunks(lambda c: response_logprobs(policy, c, temperature), rollout)
            with self.timer.stage("reference_logprobs"):
                reference = self.ref_policy if self.ref_policy is not None else policy
                with reference_context(policy) if self.ref_policy is None else nullcontext():
                    ref_logprobs = self.in_chunks(lambda c: response_logprobs(reference, c, temperature), rollout)
        kl = ppo_math.kl_penalty(old_logprobs, ref_logprobs, self.config.kl.kl_estimator) * rollout.response_mask
        return old_logprobs, ref_logprobs, kl

    @torch.no_grad()
    def values(self, rollout: Rollout) -> torch.Tensor:
        """Stage 4 (gae): the value model's prediction before each response token ``[B, R]``."""
        scorer = self.value_scorer
        with self.timer.stage("values"), self.gathered(), eval_mode(scorer), self.autocast():
            return self.in_chunks(lambda chunk: token_values(scorer, chunk), rollout)

    @torch.no_grad()
    def advantages(self, rollout: Rollout, scores, kl, values):
        """Stage 5: ``(advantages, unwhitened_advantages, returns)`` by the configured estimator."""
        cfg, mask = self.config, rollout.response_mask
        kl_coef = 0.0 if cfg.kl.kl_in_loss else self.kl_controller.value
        with self.timer.stage("advantages"):
            if cfg.estimator.advantage_estimator == "gae":
                rewards = ppo_math.token_rewards(scores, kl, kl_coef, mask)
                if cfg.estimator.whiten_rewards:
                    rewards = ppo_math.masked_whiten(rewards, mask, shift_mean=False, all_reduce=self.all_reduce_sum)
                raw, returns = ppo_math.gae_advantages(rewards, values, mask, cfg.estimator.gamma, cfg.estimator.lam)
                return ppo_math.masked_whiten(raw, mask, all_reduce=self.all_reduce_sum), raw, returns
            # grpo / rloo: the baseline comes from the other responses to the same prompt
            if cfg.estimator.advantage_estimator in GROUP_ESTIMATORS:
                sequence = ppo_math.group_advantages(
                    scores,
                    cfg.estimator.samples_per_prompt,
                    cfg.estimator.advantage_estimator,
                    cfg.estimator.scale_rewards,
                )
                returns = ppo_math.discounted_returns(
                    ppo_math.token_rewards(sequence, kl, kl_coef, mask), mask, cfg.estimator.gamma
                )
                return returns, returns, returns
            # reinforce_pp: KL-shaped token rewards, discounted returns, whitened over the whole batch
            returns = ppo_math.discounted_returns(
                ppo_math.token_rewards(scores, kl, kl_coef, mask), mask, cfg.estimator.gamma
            )
            return ppo_math.masked_whiten(returns, mask, all_reduce=self.all_reduce_sum), returns, returns

    # ------------------------------------------------------------------ stage 6
    def optimise(self, exp: Experience, update: int) -> dict[str, float]:
        """Stage 6: clipped updates of the policy (and value model) over shuffled mini-batches. Each mini-batch's
        loss is defined once, over all its micro-batches and processes (`loss_norms`), so the gradient does not
        depend on the micro-batch size or the process count. The statistics stay on the device until the update
        ends: one copy to the host per update, not one read per micro-batch."""
        cfg, acc = self.config, self.accelerator
        size, mini, micro = len(exp.rollout), cfg.mini_batch_size, cfg.micro_batch_size
        generator = torch.Generator(device="cpu").manual_seed(cfg.optimizer.seed * 1_000_003 + update)
        steps: list[dict] = []
        with self.timer.stage("update"):
            trim = TrimTable(exp.rollout)
            trained = exp.trained.bool().tolist() if exp.trained is not None else [True] * size
            for _ in range(
                cfg.loss.ppo_epochs
            ):  # the order is drawn on the CPU (the same on every device), then moved
                order = torch.randperm(size, generator=generator, device="cpu")
                rows, order = order.tolist(), order.to(acc.device)
                norms = self.loss_norms([rows[s : s + mini] for s in range(0, size, mini)], trim.lengths, trained)
                for start in range(0, size, micro):
                    chunk = rows[start : start + micro]
                    batch = exp.select(order[start : start + micro]).trimmed(trim.bounds(chunk))
                    with acc.accumulate(self.model):
                        steps.append(self._train_micro_batch(batch, norms[start // mini]))
        self.sampler.weights_changed()
        return update_stats.summarise(update_stats.to_host(steps), acc.gradient_accumulation_steps)

    def loss_norms(self, mini_batches: list[list[int]], lengths: list[int], trained: list[bool]):
        """Each mini-batch's `LossNorm`: its response tokens and sequences (those in the loss), summed over every
        process (one all-reduce per epoch), and the response budget."""
        counts = [
            [float(sum(lengths[i] for i in rows if trained[i])), float(sum(trained[i] for i in rows))]
            for rows in mini_batches
        ]
        if self.accelerator.num_processes > 1:
            summed = torch.tensor(counts, dtype=torch.float64, device=self.accelerator.device)
            counts = self.accelerator.reduce(summed, reduction="sum").tolist()
        return [
            ppo_math.LossNorm(tokens, sequences, self.config.sampling.max_new_tokens) for tokens, sequences in counts
        ]

    def micro_batch_loss(self, batch: Experience, norm: ppo_math.LossNorm | None = None) -> MicroBatchLoss:
        """Forward one micro-batch and build its share of the mini-batch loss (no backward): clipped surrogate,
        + value, + in-loss KL, each aggregated by the loss type over `norm` (default: this batch as a whole)."""
        cfg, rollout = self.config, batch.rollout
        mask = rollout.response_mask if batch.trained is None else rollout.response_mask * batch.trained[:, None]
        norm = norm or ppo_math.whole_batch_norm(mask, cfg.sampling.max_new_tokens)

        def share(per_token: torch.Tensor) -> torch.Tensor:
            return ppo_math.aggregate(per_token, mask, cfg.loss.loss_type, norm)

        with self.autocast(), observe_precision(self.policy, self.observed):
            logits, values = self.model(rollout)
            logits = logits / cfg.sampling.temperature
        self.observed.setdefault("lm_head_dtype", str(logits.dtype))  # fp32 copies of a bf16 head fire no hook
        logprobs = selective_log_softmax(logits, rollout.responses)
        terms = ppo_math.policy_terms(
            logprobs,
            batch.old_logprobs,
            batch.advantages,
            mask,
            cfg.loss.cliprange,
            cfg.loss.epsilon_high,
            cfg.loss.dual_clip,
            cfg.loss.importance_sampling_level,
        )
        with torch.no_grad():
            clip_fraction, approx_kl = share(terms.clipped), share(0.5 * terms.log_ratio.pow(2))
            deviation = ppo_math.ratio_deviation(terms.log_ratio, mask)
            entropy = share(ppo_math.entropy_from_logits(logits.detach()))
        policy_loss = terms.loss if batch.sampler_weights is None else terms.loss * batch.sampler_weights
        policy_stats = ppo_math.PolicyLossStats(share(policy_loss), clip_fraction, approx_kl, deviation)
        parts = MicroBatchLoss(policy_stats.loss, policy_stats, logits, entropy=entropy)
        if values is not None:
            value_loss, clipped = ppo_math.value_terms(
                values, batch.old_values, batch.returns, cfg.loss.cliprange_value
            )
            parts.value_loss, parts.value_clip_fraction = share(value_loss), share(clipped).detach()
            parts.loss = parts.loss + cfg.loss.vf_coef * parts.value_loss
        if cfg.kl.kl_in_loss:
            parts.kl_loss = share(ppo_math.kl_penalty(logprobs, batch.ref_logprobs, "k3"))
            parts.loss = parts.loss + self.kl_controller.value * parts.kl_loss
        return parts

    def _train_micro_batch(self, batch: Experience, norm: ppo_math.LossNorm) -> dict:
        """Forward, backward and (at the end of an accumulation) the optimizer step of one micro-batch; its
        statistics as detached device tensors (shares of the mini-batch's, see `update_stats.summarise`)."""
        acc = self.accelerator
        parts = self.micro_batch_loss(batch, norm)
        # accelerate divides by the accumulation steps and DDP averages over processes: undone, so that the
        # mini-batch's gradient is the sum of the exact shares
        processes = acc.gradient_accumulation_steps * acc.num_processes
        acc.backward(parts.loss * processes)
        stats = {}
        if acc.sync_gradients:
            grad_norm = acc.clip_grad_norm_(self.trainable_params, self.config.optimizer.max_grad_norm)
            if grad_norm is not None:  # DeepSpeed clips inside its own step and reports the norm it saw
                stats["grad_norm"] = grad_norm
        # accelerate's prepared optimizer skips the step and the reset while gradients accumulate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:  # the schedule counts optimizer steps
            stats["learning_rate"] = current_learning_rate(self.optimizer)
            self.lr_scheduler.step()
        world = acc.num_processes  # the processes' shares are averaged with the metrics: each counts world times
        stats.update({key: value.detach() * world for key, value in update_stats.shares(parts).items()})
        stats["max_ratio_deviation"] = parts.policy_stats.max_ratio_deviation
        return stats

    # ------------------------------------------------------------------ end of update and state
    def end_update(self, observed_kl: float) -> None:
        """After an update's metrics are averaged across processes: the KL controller takes the global KL."""
        self.kl_controller.update(observed_kl, self.schedule.episodes_per_update)

    def kl_status(self) -> dict:
        """The KL coefficient for the next update, the target and whether the KL has reached it (adaptive only)."""
        controller = self.kl_controller
        return {
            "kl_coef": controller.value,
            "target": getattr(controller, "target", None),
            "engaged": getattr(controller, "engaged", None),
        }

    def save(self, directory: str) -> dict | None:
        """Everything resuming needs, into the existing `directory`: the models in Hugging Face format, AdamW's
        moments, the learning-rate schedule, the KL controller and the random streams (`smolppo.algorithm.state`).
        Every process calls it; the main process gets what the checkpoint holds (for its index)."""
        return algorithm_state.save(self, directory)

    def load(self, directory: str) -> None:
        """Restore what `save` wrote (or an earlier version's checkpoint); a damaged or unsafe file is one line."""
        algorithm_state.load(self, directory)
        self.sampler.weights_changed()

    def save_pretrained(self, open_directory) -> None:
        """The trained models (policy or adapter + tokenizer, value model beside it) in Hugging Face format. Every
        process calls it (ZeRO-3 gathers the weights); the main process writes into the directory that entering
        ``open_directory()`` yields (a staging directory published when the block ends)."""
        self.accelerator.wait_for_everyone()
        weights = algorithm_state.full_state_dicts(self)
        if self.accelerator.is_main_process:
            with open_directory() as directory:
                algorithm_state.write_models(self, directory, weights)

    def close(self) -> None:
        """Release the rollout engine (a vLLM engine's memory and threads); saving still works, sampling does not."""
        self.sampler.close()

    def checkpoint_bytes(self) -> dict[str, int]:
        """The size of one checkpoint: ``weights`` and ``optimizer`` (AdamW's moments or DeepSpeed's state)."""
        return algorithm_state.checkpoint_bytes(self)

    def restore_schedules(self, lr_scheduler: dict, kl_controller: dict) -> None:
        """Saved schedule states back in place. The learning-rate schedule keeps its position but takes this run's
        peak rate; a horizon given on the command line replaces the saved one."""
        self.lr_scheduler.load_state_dict(lr_scheduler)
        apply_configured_learning_rate(self.lr_scheduler, self.optimizer, self.config.learning_rate)
        self.kl_controller.load_state_dict(kl_controller)
        if self.config.kl.kl_horizon is not None and hasattr(self.kl_controller, "horizon"):
            self.kl_controller.horizon = self.schedule.kl_horizon

    # ------------------------------------------------------------------ metrics
    def metrics(self, exp: Experience, train_stats: dict[str, float]) -> dict[str, float]:
        """This update's scalars (before averaging across processes), with the seconds each stage took."""
        estimator = self.config.estimator
        signal = None
        if estimator.advantage_estimator in GROUP_ESTIMATORS:  # the penalty is added to group-relative scores
            signal = ppo_math.group_advantages(
                exp.scores, estimator.samples_per_prompt, estimator.advantage_estimator, estimator.scale_rewards
            )
        metrics = update_stats.update_metrics(exp, train_stats, self.kl_controller.value, signal)
        return {**metrics, **self.timer.pop()}

    # ------------------------------------------------------------------ helpers
    def in_chunks(self, forward, rollout: Rollout) -> torch.Tensor:
        """Apply a no-grad `forward` to the rollout in chunks of `inference_batch_size` and reassemble the result.

        Sequences are grouped by prompt length and each chunk loses its all-padding columns, so shorter
        prompts and responses cost less; per-token outputs are padded back to the full response width.
        """
        width, size = rollout.responses.shape[1], self.config.inference_batch_size
        order = torch.argsort(rollout.attention_mask[:, : rollout.context_length].sum(1), stable=True)
        trim, rows = TrimTable(rollout), order.tolist()  # the chunks' bounds come from the host
        outputs = []
        for start in range(0, len(rollout), size):
            chunk = trim_padding(rollout.select(order[start : start + size]), trim.bounds(rows[start : start + size]))
            out = forward(chunk)
            outputs.append(pad_response_width(out, width) if out.dim() == 2 else out)
        return torch.cat(outputs)[torch.argsort(order)]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum")

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage is not None

    @property
    def zero_stage(self) -> int | None:
        return zero.zero_stage(self.accelerator)

    def autocast(self):
        """bf16 autocast with --bf16 (also under DeepSpeed, which casts only the model it trains)."""
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.config.precision.bf16)

    def gathered(self, modifier_rank: int | None = None):
        """Under ZeRO-3, the partitioned policy and value weights made whole (see `smolppo.zero.gathered`)."""
        return zero.gathered(self.accelerator, self.accelerator.unwrap_model(self.model).parameters(), modifier_rank)
