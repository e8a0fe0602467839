"""Measure our PPO against trl 1.12's `PPOTrainer` (the last trl with PPO), stage by stage and end to end.

trl 1.12 lives in its own virtual environment (the project itself keeps the current trl):

    python benchmarks/compare_trl12.py setup        # .venv-trl12: this Python's packages + trl==1.12.0
    python benchmarks/compare_trl12.py diff         # one identical rollout through both, stage by stage
    python benchmarks/compare_trl12.py learn --seeds 0 1 2 3 --updates 40

The task is built here, offline: a tiny random Llama policy (the smoke tokenizer, with a pad token distinct
from EOS so that trl 1.12's pad-based masks are right), a reward model trained by trl's `RewardTrainer` to
prefer one kind of answer (words from one half of the vocabulary over the other; plain layout: prompt +
answer + EOS, read with ``--reward-template plain``), and the 128 smoke prompts. trl 1.12 runs as a black box:
for ``diff`` its generation is replaced by our sampled tokens, and the tensors of its first update are read
from its own frame at the first optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

VENV = os.path.join(REPO, ".venv-trl12")
HYPER = dict(  # identical on both sides (the settings)
    batch=16,
    ppo_epochs=4,
    response_length=16,
    learning_rate=1e-3,
    kl_coef=0.05,
    gamma=1.0,
    lam=0.95,
    cliprange=0.2,
    cliprange_value=0.2,
    vf_coef=0.1,
    temperature=0.7,
)


def venv_python() -> str:
    return os.path.join(VENV, "Scripts" if os.name == "nt" else "bin", "python")


def setup() -> None:
    """A venv that sees this interpreter's packages, with trl 1.12.0 installed over them."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", VENV], check=True)
    subprocess.run([venv_python(), "-m", "pip", "install", "-q", "--no-deps", "trl==1.12.0"], check=True)
    out = subprocess.run([venv_python(), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    print(f"trl {out.stdout.strip()} in {VENV}")


# ---------------------------------------------------------------------- the task (built with current trl)
def build_task(workdir: str) -> str:
    """Tokenizer, policy, reward model and prompts in `workdir`/task (built once)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from smolppo import smoke

    task = os.path.join(workdir, "task")
    if os.path.isfile(os.path.join(task, "done")):
        return task
    os.makedirs(task, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(smoke.TOKENIZER_DIR)
    tokenizer.pad_token = "<|endoftext|>"  # distinct from EOS (<|im_end|>)
    tokenizer.padding_side = "left"
    shape = dict(
        smoke.POLICY_SHAPE,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.save_pretrained(os.path.join(task, "policy"))
    tokenizer.save_pretrained(os.path.join(task, "policy"))
    reward_shape = dict(shape, hidden_size=32, intermediate_size=64)
    reward = LlamaForSequenceClassification(LlamaConfig(**reward_shape, num_labels=1))
    train_reward_model(reward, tokenizer, os.path.join(task, "reward"))
    rows = smoke.load_smoke_rows()
    with open(os.path.join(task, "prompts.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    open(os.path.join(task, "done"), "w", encoding="utf-8").close()
    return task


def lexical_pairs(tokenizer, prompts: list[str], seed: int = 0) -> list[dict]:
    """Pairs that prefer one kind of answer: chosen answers use one half of the vocabulary's words, rejected
    answers the other half, so the preference generalises to whatever a random policy samples."""
    import random

    words = sorted(t for t in tokenizer.get_vocab() if t.startswith("\u0120") and t[1:].isalpha())
    good, bad = words[0::2], words[1::2]
    rng = random.Random(seed)

    def answer(pool):
        return tokenizer.convert_tokens_to_string(rng.choices(pool, k=rng.randint(2, 14)))

    return [{"chosen": p + answer(good), "rejected": p + answer(bad)} for p in prompts for _ in range(4)]


def train_reward_model(model, tokenizer, out: str) -> None:
    """RewardTrainer on plain text pairs: prompt as the policy sees it + answer (+ EOS, added by RewardTrainer)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from smolppo.data import render_prompt
    from smolppo.smoke import load_smoke_rows

    prompts = [render_prompt(tokenizer, r["system"], r["question"]) for r in load_smoke_rows()]
    data = Dataset.from_list(lexical_pairs(tokenizer, prompts))
    args = RewardConfig(
        output_dir=os.path.join(out, "trainer"),
        per_device_train_batch_size=32,
        num_train_epochs=3,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_steps=50,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(out)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "reward_model_summary.json"), "w", encoding="utf-8") as f:
        json.dump({"reward_template": "plain"}, f)


# ---------------------------------------------------------------------- our side
def our_trainer(task: str, out: str, seed: int, updates: int, **overrides):
    from accelerate.state import AcceleratorState

    from smolppo.configs import PPOConfig
    from smolppo.job.build import build_ppo_trainer

    AcceleratorState._reset_state(reset_partial_state=True)
    h = dict(HYPER, **overrides)
    config = PPOConfig(
        policy_model=os.path.join(task, "policy"),
        reward_model=os.path.join(task, "reward"),
        dataset=os.path.join(task, "prompts.jsonl"),
        num_samples=128,
        reward_check_pairs=0,
        output_dir=out,
        seed=seed,
        rollout_batch_size=h["batch"],
        mini_batch_size=h["batch"],
        per_device_train_batch_size=h["batch"],
        ppo_epochs=h["ppo_epochs"],
        max_new_tokens=h["response_length"],
        learning_rate=h["learning_rate"],
        lr_scheduler_type="linear",
        warmup_ratio=0.0,
        init_kl_coef=h["kl_coef"],
        kl_target=h.get("target", 6.0),
        adaptive_kl=h.get("adaptive_kl", False),
        kl_horizon=h.get("horizon"),
        gamma=h["gamma"],
        lam=h["lam"],
        cliprange=h["cliprange"],
        cliprange_value=h["cliprange_value"],
        vf_coef=h["vf_coef"],
        temperature=h["temperature"],
        gradient_checkpointing=False,
        max_updates=updates,
        num_train_epochs=100,
        max_grad_norm=h.get("max_grad_norm", 1.0),
        num_logged_samples=0,
        max_prompt_length=512,
    )
    return build_ppo_trainer(config)


# ---------------------------------------------------------------------- trl 1.12 side (runs in the venv)
def trl_trainer(task: str, out: str, seed: int, updates: int, prompt_ids: list[list[int]] | None = None):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from smolppo.data import render_prompt

    h = HYPER
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(task, "policy"), padding_side="left")
    rows = [json.loads(line) for line in open(os.path.join(task, "prompts.jsonl"), encoding="utf-8")]
    ids = [
        tokenizer(render_prompt(tokenizer, r["system"], r["question"]), add_special_tokens=False)["input_ids"]
        for r in rows
    ]
    dataset = Dataset.from_dict({"input_ids": prompt_ids or ids})
    args = PPOConfig(
        output_dir=out,
        per_device_train_batch_size=h["batch"],
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=h["ppo_epochs"],
        response_length=h["response_length"],
        learning_rate=h["learning_rate"],
        lr_scheduler_type="linear",
        kl_coef=h["kl_coef"],
        gamma=h["gamma"],
        lam=h["lam"],
        cliprange=h["cliprange"],
        cliprange_value=h["cliprange_value"],
        vf_coef=h["vf_coef"],
        temperature=h["temperature"],
        total_episodes=h["batch"] * updates,
        stop_token="eos",
        report_to="none",
        use_cpu=True,
        seed=seed,
        num_sample_generations=0,
        save_strategy="no",
        logging_steps=1,
        local_rollout_forward_batch_size=h["batch"],
        per_device_eval_batch_size=1,
        bf16=False,
    )
    torch.manual_seed(seed)
    load = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(task, "policy"), **load)
    ref = AutoModelForCausalLM.from_pretrained(os.path.join(task, "policy"), **load)
    reward = AutoModelForSequenceClassification.from_pretrained(os.path.join(task, "reward"), **load)
    value = AutoModelForSequenceClassification.from_pretrained(os.path.join(task, "reward"), **load)
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(2)),
    )
    return trainer


def trl_diff_worker(task: str, work: str) -> None:
    """trl 1.12's first update on our rollout; saves its tensors at the first optimizer step and its grads."""
    import torch
    import trl.experimental.ppo.ppo_trainer as ppo_module

    rollout = torch.load(os.path.join(work, "rollout.pt"))
    trainer = trl_trainer(task, os.path.join(work, "trl_out"), seed=0, updates=1, prompt_ids=rollout["prompts"])
    by_prompt = {tuple(p): r for p, r in zip(rollout["prompts"], rollout["responses"])}
    pad = trainer.processing_class.pad_token_id

    def replay(model, queries, batch_size, pad_token_id, generation_config):
        responses = []
        for query in queries:
            prompt = tuple(t for t in query.tolist() if t != pad)
            responses.append(torch.tensor(by_prompt[prompt]))
        query_responses = torch.cat([queries, torch.stack(responses)], 1)
        out = ppo_module.forward(model, query_responses, pad_token_id)
        logits = out.logits[:, queries.shape[1] - 1 : -1] / (generation_config.temperature)
        return query_responses, logits

    ppo_module.batch_generation = replay
    captured = {}
    optimizer_step = trainer.optimizer.step
    names = [n for n, _ in trainer.model.named_parameters()]

    def step(*args, **kwargs):
        frame = sys._getframe(1)
        if not captured:
            keep = (
                "logprobs",
                "ref_logprobs",
                "scores",
                "values",
                "rewards",
                "advantages",
                "returns",
                "kl",
                "padding_mask",
                "padding_mask_p1",
                "responses",
                "query_responses",
                "pg_loss",
                "vf_loss",
                "loss",
                "micro_batch_inds",
                "sequence_lengths",
            )
            for key in keep:
                value = frame.f_locals.get(key)
                captured[key] = value.detach().clone() if torch.is_tensor(value) else value
            captured["grads"] = {
                n: (p.grad.detach().clone() if p.grad is not None else None)
                for n, p in zip(names, trainer.model.parameters())
            }
            captured["params_before"] = {n: p.detach().clone() for n, p in zip(names, trainer.model.parameters())}
        captured.setdefault("vf_losses", []).append(float(frame.f_locals["vf_loss"]))
        captured.setdefault("pg_clipfracs", []).append(
            float(((frame.f_locals["pg_losses2"] > frame.f_locals["pg_losses"]).float()).mean())
        )
        result = optimizer_step(*args, **kwargs)
        if len(captured["vf_losses"]) == 1:
            captured["params_after"] = {n: p.detach().clone() for n, p in zip(names, trainer.model.parameters())}
        return result

    trainer.optimizer.step = step
    trainer.train()
    torch.save(captured, os.path.join(work, "trl_capture.pt"))


def trl_learn_worker(task: str, work: str, seed: int, updates: int) -> None:
    trainer = trl_trainer(task, os.path.join(work, f"trl_seed{seed}"), seed=seed, updates=updates)
    started = time.time()
    trainer.train()
    elapsed = time.time() - started
    rewards = [e["objective/scores"] for e in trainer.state.log_history if "objective/scores" in e]
    trainer.save_model(os.path.join(work, f"trl_seed{seed}", "final"))
    with open(os.path.join(work, f"trl_seed{seed}.json"), "w", encoding="utf-8") as f:
        json.dump({"rewards": rewards, "seconds": elapsed}, f)


def run_in_venv(*args: str) -> None:
    if not os.path.exists(venv_python()):
        sys.exit("error: .venv-trl12 does not exist; run `python benchmarks/compare_trl12.py setup` first")
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONPATH": REPO}
    subprocess.run([venv_python(), os.path.abspath(__file__), *args], check=True, env=env)


# ---------------------------------------------------------------------- stage-by-stage comparison
def _max_diff(a, b, mask=None) -> float:

    a, b = a.double(), b.double()
    if mask is not None:
        a, b = a * mask, b * mask
    return float((a - b).abs().max()) if a.numel() else 0.0


def _grad_diffs(ours: dict, theirs: dict) -> tuple[float, str, int]:
    """Largest relative L2 difference over matching gradient tensors (name of the worst), and how many matched."""
    worst, worst_name, matched = 0.0, "", 0
    for name, grad in theirs.items():
        our_name = name.replace("value_model.", "value.classifier.", 1)
        if grad is None or our_name not in ours or ours[our_name] is None:
            continue
        matched += 1
        rel = float((ours[our_name] - grad).norm() / grad.norm().clamp(min=1e-12))
        if rel > worst:
            worst, worst_name = rel, name
    return worst, worst_name, matched


def diff(workdir: str) -> dict:
    import torch

    from smolppo.algorithm import ppo_math
    from smolppo.algorithm.experience import Experience

    task = build_task(workdir)
    work = os.path.join(workdir, "diff")
    os.makedirs(work, exist_ok=True)
    trainer = our_trainer(task, os.path.join(work, "ours"), seed=0, updates=1, max_grad_norm=1e9)
    algo = trainer.algorithm
    indices = trainer.sampler.indices(0)
    prompts = [trainer.prompts.input_ids[i] for i in indices]
    pad = algo.tokenizer.pad_token_id
    for sample_seed in range(100):  # a rollout where no response samples the pad token (trl would cut it there)
        torch.manual_seed(sample_seed)
        rollout = algo.rollout(prompts)
        if not ((rollout.responses == pad) & rollout.response_mask.bool()).any():
            break
    torch.save({"prompts": prompts, "responses": rollout.responses.tolist()}, os.path.join(work, "rollout.pt"))
    run_in_venv("_trl_diff", task, work)
    cap = torch.load(os.path.join(work, "trl_capture.pt"), weights_only=False)

    # trl's rows are in its dataloader's order: map each to ours by its prompt.
    width = rollout.context_length
    position = {tuple(p): i for i, p in enumerate(prompts)}
    order = [position[tuple(t for t in q[:width].tolist() if t != pad)] for q in cap["query_responses"]]
    inverse = torch.argsort(torch.tensor(order))

    def theirs(key):
        return cap[key][inverse]

    mask = rollout.response_mask
    old, ref, kl = algo.logprobs(rollout)
    our_scores, _ = algo.rewards(rollout, trainer.prompts, indices)
    trl_scores = theirs("scores")
    values = algo.values(rollout)
    advantages, raw, returns = algo.advantages(rollout, trl_scores, kl, values)  # their scores, for what follows
    exp = Experience(rollout, trl_scores, old, ref, kl, advantages, raw, returns, values)
    rewards = ppo_math.token_rewards(trl_scores, kl, algo.kl_controller.value, mask)
    report = {
        "rollout": {
            "sample_seed": sample_seed,
            "ended_with_eos": int(rollout.ended_with_eos.sum()),
            "lengths": rollout.response_lengths.tolist(),
        },
        "masks_equal": bool(((~theirs("padding_mask")).float() == mask).all()),
        "logprobs": _max_diff(old, theirs("logprobs"), mask),
        "ref_logprobs": _max_diff(ref, theirs("ref_logprobs"), mask),
        "kl": _max_diff(kl, theirs("kl"), mask),
        "scores (ours read as trained vs trl on ids)": _max_diff(our_scores, trl_scores),
        "values": _max_diff(exp.old_values, theirs("values"), mask),
        "rewards (same scores)": _max_diff(rewards, theirs("rewards")),
        "advantages (same scores)": _max_diff(exp.advantages, theirs("advantages"), mask),
        "returns (same scores)": _max_diff(exp.returns, theirs("returns"), mask),
    }
    # First optimizer step: our loss and gradients on the same batch.
    algo.model.train()
    parts = algo.micro_batch_loss(exp)
    algo.optimizer.zero_grad(set_to_none=True)
    parts.loss.backward()
    our_grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in algo.model.named_parameters()}
    report["loss"] = abs(float(parts.loss) - float(cap["loss"]))
    report["policy_loss"] = abs(float(parts.policy_stats.loss) - float(cap["pg_loss"]))
    report["value_loss"] = abs(float(parts.value_loss) - float(cap["vf_loss"]))
    worst, name, matched = _grad_diffs(our_grads, cap["grads"])
    report["gradients: worst relative L2 difference"] = worst
    report["gradients: worst tensor"] = name
    report["gradients: tensors compared"] = matched
    algo.optimizer.step()
    after = dict(algo.model.named_parameters())
    moved = [
        float((after[n.replace("value_model.", "value.classifier.", 1)].detach() - p).abs().max())
        for n, p in cap["params_after"].items()
        if n.replace("value_model.", "value.classifier.", 1) in after
    ]
    report["parameters after the first step: max abs difference"] = max(moved)
    with torch.no_grad():
        second = algo.micro_batch_loss(exp)
    report["value loss at the second step: ours"] = float(second.value)
    report["policy clip fraction at the second step: ours"] = float(second.policy.clip_fraction)
    report["trl value losses of the first update's steps"] = cap["vf_losses"]
    report["trl policy clip fractions"] = cap["pg_clipfracs"]
    return report


def quarter_gain(rewards: list[float]) -> float:
    """Mean of the last quarter of updates minus mean of the first quarter."""
    q = max(1, len(rewards) // 4)
    return sum(rewards[-q:]) / q - sum(rewards[:q]) / q


def common_reward(policy_dir: str, task: str, seed: int = 1234) -> float:
    """Mean reward of the policy at `policy_dir` on all task prompts, read by the reward model as it was
    trained (our `RewardReader`), the same yardstick for both engines."""
    import torch

    from smolppo.algorithm.rollout import generate_rollout, response_texts, sampling_config
    from smolppo.data import load_rows, row_conversation, row_prompt
    from smolppo.models import load_causal_lm, load_tokenizer
    from smolppo.rewards.reader import load_reward_reader

    tokenizer = load_tokenizer(os.path.join(task, "policy"))
    policy = load_causal_lm(policy_dir).eval()
    reader = load_reward_reader(os.path.join(task, "reward"), "plain", tokenizer, batch_size=64)
    rows = load_rows(os.path.join(task, "prompts.jsonl"))
    config = sampling_config(tokenizer, [tokenizer.eos_token_id], HYPER["response_length"], HYPER["temperature"])
    torch.manual_seed(seed)
    scores = []
    for _ in range(2):
        rollout = generate_rollout(
            policy, [row_prompt(tokenizer, r)[1] for r in rows], tokenizer, [tokenizer.eos_token_id], config
        )
        scores.append(reader.score([row_conversation(r) for r in rows], response_texts(tokenizer, rollout)))
    return float(torch.cat(scores).mean())


def learn(workdir: str, seeds: list[int], updates: int, **overrides) -> dict:
    """Both engines on the same task and hyper-parameters; mean reward gain and episodes/s per seed."""
    import statistics

    task = build_task(workdir)
    work = os.path.join(workdir, "learn")
    os.makedirs(work, exist_ok=True)
    rows = []
    for seed in seeds:
        trainer = our_trainer(task, os.path.join(work, f"ours_seed{seed}"), seed=seed, updates=updates, **overrides)
        started = time.time()
        history = [trainer.step() for _ in range(updates)]
        ours_seconds = time.time() - started
        run_in_venv("_trl_learn", task, work, str(seed), str(updates))
        with open(os.path.join(work, f"trl_seed{seed}.json"), encoding="utf-8") as f:
            trl = json.load(f)
        ours_rewards = [m["rewards/mean"] for m in history]
        ours_final = os.path.join(work, f"ours_seed{seed}", "final")
        trainer.policy.save_pretrained(ours_final)
        initial = common_reward(os.path.join(task, "policy"), task)
        rows.append(
            {
                "seed": seed,
                "ours_common_gain": common_reward(ours_final, task) - initial,
                "trl12_common_gain": common_reward(os.path.join(work, f"trl_seed{seed}", "final"), task) - initial,
                "ours_gain": quarter_gain(ours_rewards),
                "trl12_gain": quarter_gain(trl["rewards"]),
                "ours_episodes_per_s": HYPER["batch"] * updates / ours_seconds,
                "trl12_episodes_per_s": HYPER["batch"] * updates / trl["seconds"],
                "ours_kl_last_quarter": statistics.mean(m["kl_divergence"] for m in history[-max(1, updates // 4) :]),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    summary = {key: statistics.mean(r[key] for r in rows) for key in rows[0] if key != "seed"}
    return {"hyper_parameters": {**HYPER, **overrides}, "updates": updates, "runs": rows, "mean": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["setup", "diff", "learn", "_trl_diff", "_trl_learn"])
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=os.path.join(REPO, "compare_trl12_work"), help="Task and runs go here.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="Seeds for `learn`.")
    parser.add_argument("--updates", type=int, default=40, help="PPO updates per run for `learn`.")
    parser.add_argument("--output", default=None, help="JSON file for the results.")
    opts = parser.parse_args()
    if opts.command == "setup":
        return setup()
    if opts.command == "_trl_diff":
        return trl_diff_worker(*opts.args)
    if opts.command == "_trl_learn":
        return trl_learn_worker(opts.args[0], opts.args[1], int(opts.args[2]), int(opts.args[3]))
    if opts.command == "diff":
        result = diff(opts.workdir)
    else:
        result = learn(opts.workdir, opts.seeds, opts.updates)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if opts.output:
        with open(opts.output, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
