"""Rollout masks, log-probs and reward/value reading on real tiny transformers models."""

import torch
from torch.testing import assert_close

from smolppo.algorithm.rollout import (
    build_rollout,
    generate_rollout,
    response_logprobs,
    response_mask_from_eos,
    sampling_config,
    selective_log_softmax,
)
from smolppo.algorithm.value import TokenScorer, token_values
from smolppo.data import left_pad
from smolppo.models import load_causal_lm, load_sequence_classifier

EOS = 2


def test_masks_come_from_first_eos_even_when_pad_equals_eos():
    responses = torch.tensor([[5, EOS, 7, EOS], [5, 6, 7, 8], [EOS, EOS, EOS, EOS]])
    lengths, ended = response_mask_from_eos(responses, [EOS])
    assert lengths.tolist() == [2, 4, 1]
    assert ended.tolist() == [True, False, True]


def test_build_rollout_layout():
    prompt_ids, prompt_mask = left_pad([[9, 8, 7], [6]], pad_id=EOS)
    rollout = build_rollout(prompt_ids, prompt_mask, torch.tensor([[5, EOS, 7], [4, 4, 4]]), [EOS], pad_id=EOS)
    assert rollout.context_length == 3
    assert rollout.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert rollout.responses.tolist() == [[5, EOS, EOS], [4, 4, 4]]  # after-EOS token replaced by pad
    assert rollout.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert rollout.position_ids.tolist()[1] == [0, 0, 0, 1, 2, 3]
    assert rollout.position_ids.tolist()[0][:5] == [0, 1, 2, 3, 4]


def test_multiple_eos_ids():
    lengths, ended = response_mask_from_eos(torch.tensor([[3, 4, 1, 0]]), [1, 4])
    assert lengths.tolist() == [2] and ended.tolist() == [True]


def test_selective_log_softmax_matches_full_log_softmax():
    logits = torch.randn(3, 5, 11)
    tokens = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert_close(selective_log_softmax(logits, tokens), expected)


def _rollout_for(prompts, responses, tokenizer):
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    width = max(len(r) for r in responses)
    resp = torch.full((len(responses), width), tokenizer.pad_token_id)
    for i, r in enumerate(responses):
        resp[i, : len(r)] = torch.tensor(r)
    return build_rollout(prompt_ids, prompt_mask, resp, [tokenizer.eos_token_id], tokenizer.pad_token_id)


def test_logprobs_do_not_depend_on_left_padding(smoke_paths, tokenizer):
    policy = load_causal_lm(smoke_paths["policy"]).eval()
    short, long = [10, 11, 12], [20, 21, 22, 23, 24, 25, 26]
    response = [30, 31, tokenizer.eos_token_id]
    batched = response_logprobs(policy, _rollout_for([short, long], [response, response], tokenizer), 0.7)
    alone = response_logprobs(policy, _rollout_for([short], [response], tokenizer), 0.7)
    assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)


def test_rollout_samples_only_with_temperature_whatever_the_model_generation_config_says(smoke_paths, tokenizer):
    """A checkpoint's repetition_penalty / min_p / no_repeat_ngram_size must not reshape what the rollout samples:
    the distribution generate() actually sampled from equals log_softmax(logits / T), the recorded log-probs."""
    from smolppo.algorithm.rollout import sample

    policy = load_causal_lm(smoke_paths["policy"]).eval()
    policy.generation_config.repetition_penalty = 3.0
    policy.generation_config.min_p = 0.3
    policy.generation_config.no_repeat_ngram_size = 2
    policy.generation_config.top_k = 5
    eos = [tokenizer.eos_token_id]
    config = sampling_config(tokenizer, eos, max_new_tokens=10, temperature=0.7)
    config.output_scores, config.return_dict_in_generate = True, True
    prompt_ids, prompt_mask = left_pad([[40, 41, 42, 40, 41], [50, 51]], tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        output = sample(policy, prompt_ids, prompt_mask, config)
        rollout = build_rollout(prompt_ids, prompt_mask, output.sequences[:, 5:], eos, tokenizer.pad_token_id)
        sampled_from = torch.log_softmax(torch.stack(output.scores, 1).float(), -1)
        sampled_from = sampled_from.gather(-1, rollout.responses[..., None]).squeeze(-1) * rollout.response_mask
        recorded = response_logprobs(policy, rollout, 0.7)
    assert rollout.response_mask.sum() >= 10
    assert_close(sampled_from, recorded, atol=1e-5, rtol=1e-5)
    assert policy.generation_config.repetition_penalty == 3.0  # the model's own config is left as it was


def test_values_cover_response_positions_only(smoke_paths, tokenizer):
    value_model = load_sequence_classifier(smoke_paths["reward"]).eval()
    rollout = _rollout_for([[40, 41], [50, 51, 52]], [[60, tokenizer.eos_token_id], [70, 71, 72]], tokenizer)
    with torch.no_grad():
        values = token_values(TokenScorer(value_model), rollout)
        full = TokenScorer(value_model)(rollout.input_ids, rollout.attention_mask, rollout.position_ids)
    assert values.shape == (2, 3)
    assert values[0, 2] == 0.0  # past the EOS
    assert_close(values[1], full[1, 2:5])  # states before each response token: columns P-1 .. P+R-2


def test_generated_rollout_is_consistent(smoke_paths, tokenizer):
    policy = load_causal_lm(smoke_paths["policy"]).eval()
    torch.manual_seed(0)
    config = sampling_config(tokenizer, [tokenizer.eos_token_id], max_new_tokens=6, temperature=1.0)
    assert config.top_k == 0 and config.top_p == 1.0
    rollout = generate_rollout(policy, [[40, 41, 42], [50]], tokenizer, [tokenizer.eos_token_id], config)
    assert rollout.responses.shape[1] <= 6
    for i in range(2):
        length = int(rollout.response_lengths[i])
        assert rollout.response_mask[i].sum() == length
        if rollout.ended_with_eos[i]:
            assert rollout.responses[i, length - 1] == tokenizer.eos_token_id
    logprobs = response_logprobs(policy, rollout, 1.0)
    assert (logprobs <= 0).all() and torch.isfinite(logprobs).all()


def test_building_smoke_models_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    from smolppo import smoke

    monkeypatch.setenv("SMOLPPO_SMOKE_DIR", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    smoke.materialise("policy")
    torch.testing.assert_close(torch.rand(3), expected)


def test_trimming_padding_columns_changes_no_real_output(smoke_paths, tokenizer):
    from smolppo.algorithm.rollout import pad_response_width, trim_padding

    policy = load_causal_lm(smoke_paths["policy"]).eval()
    eos = tokenizer.eos_token_id
    # The longest prompt of the batch is not in the sub-batch, and neither is the longest response.
    full = _rollout_for(
        [[1] * 12, [40, 41, 42], [50, 51, 52, 53]], [[30] * 6, [60, eos], [70, 71, 72, eos]], tokenizer
    )
    sub = full.select(torch.tensor([1, 2]))
    trimmed = trim_padding(sub)
    assert trimmed.input_ids.shape == (2, 4 + 4) and trimmed.context_length == 4
    with torch.no_grad():
        expected = response_logprobs(policy, sub, 0.7)
        got = pad_response_width(response_logprobs(policy, trimmed, 0.7), sub.responses.shape[1])
    assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- speed levers that must change no number
def test_frozen_body_in_bf16_is_bit_identical_under_autocast(smoke_paths, tokenizer):
    """`store_body_linears_in_bf16` only pre-does autocast's own cast: reference log-probs and reward-model scores
    are bit-identical, the body's Linear weights are bf16, embeddings / LM head / score head stay fp32."""
    import copy

    from smolppo.rewards.reader import RewardReader
    from smolppo.runtime import store_body_linears_in_bf16

    torch.manual_seed(0)
    policy = load_causal_lm(smoke_paths["policy"]).eval()
    prompt_ids, prompt_mask = left_pad([[5, 6, 7, 8, 9], [10, 11]], pad_id=EOS)
    rollout = build_rollout(prompt_ids, prompt_mask, torch.randint(3, 90, (2, 6)), [EOS], pad_id=EOS)
    classifier = load_sequence_classifier(smoke_paths["reward"]).eval()
    conversations, completions = [("", "What is 2+2?"), ("be brief", "Name a colour.")], ["Four.", "Blue, I think."]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = response_logprobs(policy, rollout, 0.7)
        scores_before = RewardReader(classifier, tokenizer).score(conversations, completions)
        frozen_policy = copy.deepcopy(policy).requires_grad_(False)
        frozen_reward = copy.deepcopy(classifier).requires_grad_(False)
        for model in (frozen_policy, frozen_reward):
            store_body_linears_in_bf16(model)
        after = response_logprobs(frozen_policy, rollout, 0.7)
        scores_after = RewardReader(frozen_reward, tokenizer).score(conversations, completions)
    assert torch.equal(before, after)
    assert torch.equal(scores_before, scores_after)
    assert frozen_policy.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert frozen_policy.get_input_embeddings().weight.dtype == torch.float32
    assert frozen_policy.get_output_embeddings().weight.dtype == torch.float32
    assert frozen_reward.score.weight.dtype == torch.float32
    assert frozen_reward.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_eager_attention_matches_sdpa_to_float_rounding(smoke_paths):
    """Eager (opt-in; evaluation's choice on CPU) computes what SDPA computes, left padding included."""
    from smolppo.runtime import attention_for, set_attention

    assert attention_for("auto") is None  # the model's own (SDPA)
    assert attention_for("eager") == "eager"
    assert attention_for("sdpa") == "sdpa"
    policy = load_causal_lm(smoke_paths["policy"]).eval()
    prompt_ids, prompt_mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13]], pad_id=EOS)
    rollout = build_rollout(prompt_ids, prompt_mask, torch.randint(3, 90, (2, 5)), [EOS], pad_id=EOS)
    with torch.no_grad():
        set_attention("sdpa", policy)
        sdpa = response_logprobs(policy, rollout, 1.0)
        set_attention("eager", policy)
        eager = response_logprobs(policy, rollout, 1.0)
    assert policy.config._attn_implementation == "eager"
    assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)
