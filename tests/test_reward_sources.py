"""Reward sources: functions loaded from files and modules, weights, None, and one-line failures naming the
function; a reward model's NaN is never hidden."""

import math
import textwrap

import pytest
import torch
from torch.testing import assert_close

from smolppo.errors import UserError
from smolppo.rewards.sources import (
    CombinedReward,
    RewardBatch,
    RewardFunctionSource,
    build_reward,
    load_reward_function,
)
from tests.conftest import run_script

BATCH = RewardBatch(
    conversations=[("", "Name a colour"), ("sys", "Count to three")],
    prompts=["<prompt 1>", "<prompt 2>"],
    completions=["red", "one two three"],
    rows=[
        {"system": "", "question": "Name a colour", "id": 7},
        {"system": "sys", "question": "Count to three", "id": 8},
    ],
)


def write(tmp_path, body: str) -> str:
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_functions_get_trl_arguments_and_are_weighted(tmp_path):
    path = write(
        tmp_path,
        """
        seen = {}
        def n_words(prompts, completions, question, id, **kwargs):
            seen.update(prompts=prompts, question=question, id=id, extra=sorted(kwargs))
            return [len(c.split()) for c in completions]
        def only_long(completions, **kwargs):
            return [1.0 if len(c) > 5 else None for c in completions]
        """,
    )
    reward = build_reward(None, [f"{path}:n_words", f"{path}:only_long"], [2.0, 0.5])
    total, parts = reward.score(BATCH, "cpu")
    assert_close(parts["n_words"], torch.tensor([1.0, 3.0]))
    assert math.isnan(parts["only_long"][0]) and parts["only_long"][1] == 1.0  # None = does not apply
    assert_close(total, torch.tensor([2.0, 6.5]))
    seen = reward.sources[0].function.__globals__["seen"]
    assert seen == {
        "prompts": ["<prompt 1>", "<prompt 2>"],
        "question": ["Name a colour", "Count to three"],
        "id": [7, 8],
        "extra": ["system"],
    }


def test_a_module_function_and_a_reward_model_together(smoke_paths, tokenizer):
    from smolppo.rewards.reader import load_reward_reader

    reader = load_reward_reader(smoke_paths["reward"], None, tokenizer)
    reward = build_reward(reader, ["examples.reward_functions:readable_text"], [1.0, 3.0])
    total, parts = reward.score(BATCH, "cpu")
    assert reward.names == ["reward_model", "readable_text"]
    assert_close(parts["reward_model"], reader.score(BATCH.conversations, BATCH.completions))
    assert_close(total, parts["reward_model"] + 3.0 * torch.tensor([1.0, 1.0]))


def test_a_reward_models_nan_is_not_hidden(smoke_paths, tokenizer):
    class Broken:
        name = "reward_model"

        def __call__(self, batch):
            return torch.tensor([float("nan"), 1.0])

    total, _ = CombinedReward([Broken()]).score(BATCH, "cpu")
    assert math.isnan(total[0])  # the divergence check stops the run on it


def test_no_applicable_source_gives_zero(tmp_path, caplog):
    path = write(tmp_path, "def never(completions, **kw):\n    return [None] * len(completions)\n")
    total, _ = build_reward(None, [f"{path}:never"], None).score(BATCH, "cpu")
    assert_close(total, torch.zeros(2))
    assert "returned None for 2 responses" in caplog.text


@pytest.mark.parametrize(
    "body, message",
    [
        ("def f(completions, **kw):\n    return [1.0]\n", "returned 1 values for 2 completions"),
        ("def f(completions, **kw):\n    raise KeyError('answer')\n", "raised KeyError: 'answer'"),
        ("def f(completions, **kw):\n    return ['high', 'low']\n", r"returned 'high' \(str\); each reward must be"),
        ("def f(completions, **kw):\n    return ['0.5', '1']\n", r"returned '0.5' \(str\)"),
        ("def f(completions, **kw):\n    return [True, False]\n", r"returned True \(bool\).*not bool or str"),
        ("def f(completions, **kw):\n    return {0: 1.0, 1: 2.0}\n", "returned a dict for 2 completions"),
        ("def f(completions, **kw):\n    return [float('inf'), 0]\n", "rewards must be finite"),
        ("def f(completions, **kw):\n    return 3\n", "returned a int"),
        ("def f(completions, **kw):\n    raise SystemExit(0)\n", "raised SystemExit: 0"),
        ("def f(completions, **kw):\n    completions.clear()\n    return []\n", "returned 0 values for 2"),
    ],
)
def test_bad_function_output_is_one_line_naming_it(tmp_path, body, message):
    path = write(tmp_path, body)
    with pytest.raises(UserError, match=message) as info:
        RewardFunctionSource(load_reward_function(f"{path}:f"), f"{path}:f")(BATCH)
    assert f"{path}:f" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing_file.py:f", "reward function file 'missing_file.py' does not exist"),
        ("examples.reward_functions:nope", "has no function 'nope'"),
        ("no_such_module_xyz:f", "could not import module 'no_such_module_xyz'"),
        (":readable_text", "must name a file or module and a function"),
        (".examples:readable_text", "a relative module cannot be imported.*examples:readable_text"),
    ],
)
def test_unloadable_function_is_one_line(spec, message):
    with pytest.raises(UserError, match=message):
        load_reward_function(spec)


def test_functions_get_copies_of_their_inputs(tmp_path):
    import numpy as np

    path = write(
        tmp_path,
        """
        def vandal(prompts, completions, question, **kw):
            completions[0] = "changed"
            question.clear()
            return [1, np.float32(0.5)]
        def reader(completions, question, **kw):
            return [float(c == "red") + len(question) for c in completions]
        import numpy as np
    """,
    )
    reward = build_reward(None, [f"{path}:vandal", f"{path}:reader"], None)
    total, parts = reward.score(BATCH, "cpu")
    assert_close(parts["vandal"], torch.tensor([1.0, 0.5]))
    assert_close(parts["reader"], torch.tensor([3.0, 2.0]))  # saw "red" and both questions, untouched
    assert BATCH.completions == ["red", "one two three"] and BATCH.rows[0]["question"] == "Name a colour"
    assert np.isfinite(total.numpy()).all()


def test_a_raising_function_stops_the_run_with_one_line(tmp_path, smoke_cache):
    path = write(tmp_path, "def boom(completions, **kw):\n    raise RuntimeError('no answer key')\n")
    out = tmp_path / "run"
    result = run_script(
        *"train_ppo.py --preset smoke --reward-model none --reward-funcs".split(),
        f"{path}:boom",
        "--output-dir",
        str(out),
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last == f"error: reward function {path}:boom raised RuntimeError: no answer key; fix it or drop it from "
        "--reward-funcs"
    )
    assert "Traceback" not in result.stderr
    assert not (out / "checkpoint-1").exists()


def test_weights_must_match_the_sources(tmp_path):
    path = write(tmp_path, "def f(completions, **kw):\n    return [1.0] * len(completions)\n")
    with pytest.raises(UserError, match=r"--reward-weights has 2 values for 1 reward sources"):
        build_reward(None, [f"{path}:f"], [1.0, 2.0])
