"""Reading ORCA-style data from local files, rendering prompts, length filtering, prompt order."""

import json

import pandas as pd
import pytest

from smolppo.data import PromptSampler, build_prompts, load_rows, render_prompt
from smolppo.errors import UserError

ROWS = [
    {"system": "Be brief.", "question": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"system": "", "question": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_formats(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    frame = pd.DataFrame(ROWS)
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    rows = load_rows(str(path))
    assert [r["question"] for r in rows] == ["What is 2+2?", "Name a colour."]
    assert rows[1]["system"] == ""


def test_missing_columns_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}))
    with pytest.raises(UserError, match=r"lacks column\(s\) \['system', 'question'\]"):
        load_rows(str(path))


def test_missing_file_named():
    with pytest.raises(UserError, match="does not exist"):
        load_rows("./nowhere/rows.jsonl")


def test_chat_template_and_fallback(tokenizer):
    text = render_prompt(tokenizer, "Be brief.", "What is 2+2?")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert "system" not in render_prompt(tokenizer, "", "What?")

    class NoTemplate:
        chat_template = None

    assert render_prompt(NoTemplate(), "Sys", "Q?") == "Sys\n\nUser: Q?\nAssistant:"


def test_long_prompts_dropped_and_counted_never_cut(tokenizer):
    rows = [{"system": "", "question": "short"}, {"system": "", "question": "long " * 200}]
    prompts = build_prompts(rows, tokenizer, max_prompt_length=40)
    assert (len(prompts.input_ids), prompts.num_too_long, prompts.num_rows) == (1, 1, 2)
    assert tokenizer.decode(prompts.input_ids[0]) == prompts.texts[0]
    with pytest.raises(UserError, match="no prompt of dataset fits max_prompt_length=2"):
        build_prompts(rows, tokenizer, max_prompt_length=2)


def test_prompt_sampler_is_deterministic_and_partitions_processes():
    a = PromptSampler(20, global_batch=8, seed=3)
    b = PromptSampler(20, global_batch=8, seed=3)
    assert a.indices(0) == b.indices(0) and a.indices(3) == b.indices(3)
    epoch0 = a.indices(0) + a.indices(1)
    assert len(set(epoch0)) == 16
    assert a.indices(2) != a.indices(0)  # new epoch, new permutation
    ranks = [PromptSampler(20, 8, 3, process_index=r, num_processes=2).indices(1) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(a.indices(1)) and not set(ranks[0]) & set(ranks[1])
