"""The rollout engines around the maths: the sampler correction against hand-computed weights, the sampler's
log-probs carried through every rollout operation, LoRA's merged weights as vLLM receives them, and the one-line
errors when vLLM is asked for where it cannot run. (vLLM itself: tests/test_vllm.py.)"""

import copy
import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch
from torch.testing import assert_close

from smolppo.algorithm import ppo_math
from smolppo.algorithm.rollout import build_rollout, concat_rollouts, trim_padding
from smolppo.algorithm.samplers import check_vllm_usable, policy_weights, version_tuple
from smolppo.errors import UserError
from tests.conftest import make_smoke_trainer, one_line_error, train_smoke

HAS_VLLM = importlib.util.find_spec("vllm") is not None


# ---------------------------------------------------------------------------------------------- the correction
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.1, -3.0]])
SAMPLER = torch.tensor([[-1.5, -1.0, -0.5], [-1.2, -0.1, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the last column is padding


def test_token_level_correction_truncates_or_masks_each_token():
    # log rho: row 0 [0.5, -1, pad], row 1 [1.0, 0, pad]
    e = torch.e
    truncated = ppo_math.sampler_correction(OLD, SAMPLER, MASK, "token_truncate", cap=1.5)
    assert_close(truncated, torch.tensor([[1.5, e**-1, 0.0], [1.5, 1.0, 0.0]]))
    masked = ppo_math.sampler_correction(OLD, SAMPLER, MASK, "token_mask", cap=2.0)
    assert_close(masked, torch.tensor([[e**0.5, e**-1, 0.0], [0.0, 1.0, 0.0]]))  # e^1 > 2: left out


def test_sequence_level_correction_uses_one_ratio_per_response():
    # per response: row 0 exp(0.5 - 1) = e^-0.5 on both tokens; row 1 exp(1.0) = e
    e = torch.e
    truncated = ppo_math.sampler_correction(OLD, SAMPLER, MASK, "sequence_truncate", cap=2.0)
    assert_close(truncated, torch.tensor([[e**-0.5, e**-0.5, 0.0], [2.0, 2.0, 0.0]]))
    masked = ppo_math.sampler_correction(OLD, SAMPLER, MASK, "sequence_mask", cap=3.0)
    assert_close(masked, torch.tensor([[e**-0.5, e**-0.5, 0.0], [e, e, 0.0]]))
    assert ppo_math.sampler_correction(OLD, SAMPLER, MASK, "sequence_mask", cap=2.0)[1].sum() == 0


def test_a_huge_ratio_is_cut_not_infinite():
    old, sampler, mask = torch.tensor([[0.0]]), torch.tensor([[-500.0]]), torch.ones(1, 1)
    assert ppo_math.sampler_correction(old, sampler, mask, "token_truncate", 3.0).item() == 3.0
    assert ppo_math.sampler_correction(old, sampler, mask, "token_mask", 3.0).item() == 0.0


def test_mismatch_is_measured_on_real_tokens_only():
    mean, largest = ppo_math.sampler_mismatch(OLD, SAMPLER, MASK)
    assert mean.item() == pytest.approx((0.5 + 1.0 + 1.0 + 0.0) / 4)
    assert largest.item() == pytest.approx(1.0)  # the padding's 3.0 gap is not counted


# ---------------------------------------------------------------------------------------------- the rollout carries it
def _rollout(prompt_width: int, response_rows: list[list[int]], eos: int = 9):
    prompts = torch.ones(len(response_rows), prompt_width, dtype=torch.long)
    width = max(map(len, response_rows))
    responses = torch.tensor([row + [0] * (width - len(row)) for row in response_rows])
    sampler = -torch.arange(1, responses.numel() + 1, dtype=torch.float32).view(responses.shape) / 10
    return build_rollout(prompts, torch.ones_like(prompts), responses, [eos], 0, sampler)


def test_sampler_logprobs_follow_the_rollout_through_select_trim_and_join():
    rollout = _rollout(2, [[5, 9, 7, 7], [5, 6, 9, 7]])  # EOS at 1 and 2: what follows is padding
    assert_close(rollout.sampler_logprobs, torch.tensor([[-0.1, -0.2, 0.0, 0.0], [-0.5, -0.6, -0.7, 0.0]]))
    one = rollout.select(torch.tensor([0]))
    assert_close(one.sampler_logprobs, rollout.sampler_logprobs[:1])
    assert trim_padding(one).sampler_logprobs.shape == (1, 2)  # the longest response in the sub-batch
    joined = concat_rollouts([rollout, _rollout(3, [[9]])], pad_id=0)
    assert_close(joined.sampler_logprobs[2], torch.tensor([-0.1, 0.0, 0.0, 0.0]))  # padded to the widest
    prompt = torch.ones(1, 2, dtype=torch.long)
    generated = build_rollout(prompt, prompt, rollout.responses[:1], [9], 0)  # transformers' generate: none
    assert generated.sampler_logprobs is None and "sampler_logprobs" not in generated.tensors()
    with pytest.raises(ValueError, match="with and without"):
        concat_rollouts([rollout, generated], pad_id=0)


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_the_correction_weights_each_tokens_policy_loss(tmp_path):
    trainer = make_smoke_trainer(tmp_path)
    exp = trainer.algorithm.make_experience(trainer.prompts, trainer.sampler.indices(0)).select(torch.arange(4))
    exp = exp.trimmed()
    plain = trainer.algorithm.micro_batch_loss(exp)
    exp.sampler_weights = 2.0 * exp.rollout.response_mask
    weighted = trainer.algorithm.micro_batch_loss(exp)
    assert_close(weighted.policy_stats.loss, 2.0 * plain.policy_stats.loss)
    assert_close(weighted.value_loss, plain.value_loss)  # the critic's targets are not the sampler's business


# ---------------------------------------------------------------------------------------------- LoRA's merged weights
@pytest.mark.parametrize("save_head", [False, True], ids=["lora-on-head", "head-in-modules-to-save"])
def test_lora_policy_weights_equal_peft_merge_under_checkpoint_names(smoke_cache, save_head):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from smolppo import smoke

    base = AutoModelForCausalLM.from_pretrained(smoke.materialise("policy"))
    names = set(base.state_dict())
    targets = ["q_proj", "v_proj"] if save_head else ["q_proj", "v_proj", "lm_head"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["lm_head"] if save_head else None)
    model = get_peft_model(base, config)
    torch.manual_seed(0)
    with torch.no_grad():  # adapters that change something (B starts at zero)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = dict(policy_weights(model))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(ours) == names == set(merged)
    for name in names:
        assert_close(ours[name], merged[name])
    plain = AutoModelForCausalLM.from_pretrained(smoke.materialise("policy")).state_dict()
    changed = {n.split(".")[-2] for n in names if not torch.equal(ours[n], plain[n])}
    assert changed == {"q_proj", "v_proj", "lm_head"}  # the adapters' layers (and the trained head) moved
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model itself untouched


# ---------------------------------------------------------------------------------------------- where vLLM cannot run
@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_asking_for_vllm_without_it_is_one_line(tmp_path, smoke_cache):
    result = train_smoke(tmp_path / "out", "--generation-backend", "vllm", "--max-updates", "1")
    one_line_error(result, "vLLM is not installed", "requirements-vllm", "--generation-backend hf")
    assert not (tmp_path / "out" / "run_summary.json").exists()


def test_vllm_is_refused_on_windows_and_across_processes(monkeypatch):
    with pytest.raises(UserError, match="one process"):
        check_vllm_usable(2)
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(UserError, match="needs Linux.*WSL2.*--generation-backend hf"):
        check_vllm_usable(1)


def test_an_old_vllm_is_named_with_the_version_needed(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.9.2"))
    with pytest.raises(UserError, match=r"needs vLLM >= 0\.11, found 0\.9\.2"):
        check_vllm_usable(1)


@pytest.mark.parametrize("chosen", [None, "INFO"])
def test_vllm_keeps_its_warnings_after_trl_is_imported(chosen):
    """trl sets vLLM's log level to ERROR on import where vLLM is installed (hiding a layer's failed weight load at a
    push): smolppo, which imports trl, keeps WARNING unless the user chose one. A fresh process: trl sets it once."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
    if chosen:
        env["VLLM_LOGGING_LEVEL"] = chosen
    code = "import os, smolppo.cli, trl; print(os.environ['VLLM_LOGGING_LEVEL'])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (chosen or "WARNING")


def test_version_tuple_reads_the_leading_numbers():
    assert version_tuple("0.32.0+cpu") == (0, 32, 0)
    assert version_tuple("0.11.0rc1") == (0, 11, 0)
    assert version_tuple("1.2.dev3") == (1, 2)


def test_an_unknown_backend_or_correction_is_refused(tmp_path, smoke_cache):
    result = train_smoke(tmp_path / "out", "--generation-backend", "sglang")
    one_line_error(result, "generation_backend must be one of hf, vllm")
    result = train_smoke(tmp_path / "out", "--vllm-importance-sampling-mode", "clip")
    one_line_error(result, "vllm_importance_sampling_mode must be one of token_truncate")
    result = train_smoke(tmp_path / "out", "--vllm-dtype", "fp8")
    one_line_error(result, "vllm_dtype must be one of auto, bfloat16, float16, float32")
