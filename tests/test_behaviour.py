"""Behaviour scalars of a batch (diversity, repetition, truncation): hand-computed cases and the trainer's own."""

import pytest

from smolppo.behaviour import behaviour_metrics, distinct_n, is_degenerate, repeated_ngram_share


def test_distinct_n_by_hand():
    batch = [[1, 2, 3, 1, 2], [1, 2]]
    # unigrams: 1 2 3 1 2 1 2 -> 3 unique of 7; bigrams: (1,2) (2,3) (3,1) (1,2) (1,2) -> 3 unique of 5
    assert distinct_n(batch, 1) == pytest.approx(3 / 7)
    assert distinct_n(batch, 2) == pytest.approx(3 / 5)
    assert distinct_n([[7]], 2) == 0.0  # no bigram at all
    assert distinct_n([[1, 2, 3, 4]], 1) == 1.0


def test_repetition_and_degenerate_by_hand():
    looping = [5, 6, 5, 6, 5, 6, 5, 6, 5, 6]  # trigrams (5,6,5) x4 and (6,5,6) x4 -> 2 unique of 8
    assert repeated_ngram_share(looping) == pytest.approx(6 / 8)
    assert is_degenerate(looping)
    assert repeated_ngram_share([1, 2, 3, 4, 5]) == 0.0
    assert not is_degenerate([1, 2, 3, 1, 2, 3, 1, 2, 3])  # (1,2,3) three times: below 4
    assert is_degenerate([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3])
    assert repeated_ngram_share([1, 2]) == 0.0 and not is_degenerate([])


def test_batch_metrics_by_hand():
    metrics = behaviour_metrics([[5, 6, 5, 6, 5, 6, 5, 6, 5, 6], [1, 2, 3, 4]], truncated=[True, False])
    assert metrics["response/truncated_rate"] == 0.5
    assert metrics["response/degenerate_rate"] == 0.5
    assert metrics["response/repeated_3gram_share"] == pytest.approx((6 / 8 + 0) / 2)
    assert metrics["response/distinct_1"] == pytest.approx(6 / 14)


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_trainer_logs_them_for_its_own_responses(tmp_path):
    from conftest import make_smoke_trainer

    trainer = make_smoke_trainer(tmp_path)
    algo = trainer.algorithm
    exp = algo.make_experience(trainer.prompts, trainer.sampler.indices(0))
    metrics = algo.metrics(exp, algo.optimise(exp, 0))
    rollout = exp.rollout
    responses = []
    for row, length, ended in zip(rollout.responses.tolist(), rollout.response_lengths.tolist(),
                                  rollout.ended_with_eos.tolist()):  # fmt: skip
        responses.append(row[: length - 1] if ended else row[:length])
    assert all(algo.tokenizer.eos_token_id not in r for r in responses)
    unigrams = [t for r in responses for t in r]
    assert metrics["response/distinct_1"] == pytest.approx(len(set(unigrams)) / len(unigrams))
    assert metrics["response/truncated_rate"] == pytest.approx(1 - metrics["response/eos_rate"])
    assert 0.0 <= metrics["response/degenerate_rate"] <= 1.0
