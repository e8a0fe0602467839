"""Round 3 of "nothing lost": the mistakes a newcomer makes with the newer features, each one line that names the
cause and the fix (in-process where the process boundary adds nothing), and the disk-full case on a real full
filesystem (soak)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from smolppo import files, smoke
from smolppo.cli import parse_config
from smolppo.configs import PPOConfig
from smolppo.configs.parts import resume_rules
from smolppo.errors import UserError
from smolppo.job.build import held_out_pairs
from smolppo.models import load_causal_lm, resolve_model_path
from smolppo.rewards.reader import RewardReader, check_reward_model
from smolppo.runs import checkpointing, output_dir
from tests.conftest import REPO, run_script


def parse(*args):
    return parse_config(PPOConfig, list(args), recipes="train_ppo")


def yaml_file(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------------- configuration
def test_an_alias_and_its_field_together_in_yaml_is_one_line(tmp_path):
    path = yaml_file(tmp_path, "use_peft: true\nuse_lora: false\n")
    with pytest.raises(UserError, match=r"sets use_lora twice \('use_peft' and 'use_lora'"):
        parse("--config", path)


def test_a_preset_inside_a_yaml_works_like_the_flag(tmp_path):
    cfg = parse("--config", yaml_file(tmp_path, "preset: smoke\nmax_updates: 3\n"))
    assert (cfg.policy_model, cfg.max_new_tokens, cfg.max_updates) == (smoke.resolve("smoke:policy"), 12, 3)
    flag = parse("--preset", "smoke", "--config", yaml_file(tmp_path, "max_new_tokens: 20\n"))
    assert flag.max_new_tokens == 20  # the YAML still wins over the preset
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        parse("--config", yaml_file(tmp_path, "preset: nope\n"))


FUNC = ["--reward-funcs", "examples/reward_functions.py:readable_text"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--min-reward-accuracy", "0.999", "--reward-check-pairs", "0"],
            "cannot be checked: reward_check_pairs is 0",
        ),
        (["--min-reward-accuracy", "0.9", "--reward-model", "none", *FUNC], "cannot be checked: there is no reward"),
        (["--reward-model", "none", *FUNC, "--reward-weights", "nan"], "reward_weights must hold finite numbers"),
        (["--reward-weights", "1", "inf", *FUNC], "reward_weights must hold finite numbers"),
        (["--seed", "-1"], r"seed must be an integer in \[0, 2\*\*32\)"),
    ],
)
def test_settings_that_cannot_work_are_one_line(args, message):
    with pytest.raises(UserError, match=message):
        parse(*args)


def test_a_scalar_for_a_list_in_yaml_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"reward_weights must be a list, e.g. reward_weights: \[10\]"):
        parse("--config", yaml_file(tmp_path, "reward_weights: 10\n"))


def test_a_broken_reward_template_is_one_line(smoke_paths, tokenizer):
    from smolppo.models import load_sequence_classifier

    model = load_sequence_classifier(smoke_paths["reward"])
    with pytest.raises(UserError, match="--reward-template is not a valid Jinja template"):
        RewardReader(model, tokenizer, "{% for m in messages %}{{ m.content ")


# ---------------------------------------------------------------------------------------------- resume
PPO_RULES = resume_rules(PPOConfig)


def test_resume_rules_come_from_the_fields_themselves():
    free, fixed = PPO_RULES
    assert {"save_steps", "max_updates", "output_dir", "report_to"} <= free and not {"learning_rate", "seed"} & free
    assert fixed == {"use_lora", "lora_r", "lora_target_modules"}


def test_a_setting_renamed_since_the_checkpoint_is_still_compared(tmp_path):
    path = _checkpoint(tmp_path, target=6.0, horizon=None)  # an earlier version's names
    with pytest.raises(UserError, match="kl_target: 6.0 -> 3.0"):
        checkpointing.check_resume_config(path, {"kl_target": 3.0, "kl_horizon": None}, PPO_RULES, allow_changes=False)


def _checkpoint(tmp_path, **config):
    path = tmp_path / "checkpoint-2"
    path.mkdir()
    (path / files.STATE_FILE).write_text(json.dumps({"update": 2, "config": config}))
    return str(path)


def test_switching_estimator_on_resume_names_the_switch_not_damage(tmp_path):
    path = _checkpoint(tmp_path, advantage_estimator="grpo")
    with pytest.raises(UserError) as info:
        checkpointing.check_resume_config(path, {"advantage_estimator": "gae"}, PPO_RULES, allow_changes=True)
    assert "(advantage_estimator grpo) as gae" in str(info.value) and "checkpoint itself is fine" in str(info.value)
    assert "damaged" not in str(info.value)
    # grpo -> rloo keeps the same models: an allowed change
    assert checkpointing.check_resume_config(path, {"advantage_estimator": "rloo"}, PPO_RULES, allow_changes=True)


def test_a_reward_function_by_absolute_or_relative_path_is_the_same_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    relative = "examples/reward_functions.py:readable_text"
    absolute = os.path.join(REPO, "examples", "reward_functions.py") + ":readable_text"
    assert checkpointing.config_changes({"reward_funcs": [relative]}, {"reward_funcs": [absolute]}, frozenset()) == []
    other = os.path.join(REPO, "examples", "other.py") + ":readable_text"
    assert checkpointing.config_changes({"reward_funcs": [relative]}, {"reward_funcs": [other]}, frozenset())
    # a checkpoint from before --kl-controller existed ran the adaptive rule: today's default (pid) is a change
    assert checkpointing.config_changes(
        {"kl_target": 6.0}, {"kl_target": 6.0, "kl_controller": "pid"}, frozenset()
    ) == [("kl_controller", "adaptive", "pid")]
    # and one from before the floor and the integral gain were settings ran without a floor, at a gain of 0.1
    assert checkpointing.config_changes(
        {"kl_controller": "pid"}, {"kl_controller": "pid", "min_lr_ratio": 0.3, "kl_integral_gain": 0.6}, frozenset()
    ) == [("kl_integral_gain", 0.1, 0.6), ("min_lr_ratio", 0.0, 0.3)]


# ---------------------------------------------------------------------------------------------- damaged models
def test_a_truncated_weights_file_in_a_local_policy_is_named(smoke_paths, tmp_path):
    policy = tmp_path / "policy"
    shutil.copytree(smoke_paths["policy"], policy)
    weights = policy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(UserError) as info:
        load_causal_lm(str(policy))
    message = str(info.value)
    assert "model.safetensors is damaged or truncated" in message and "local directory" not in message


def test_a_half_written_model_folder_is_one_line(smoke_paths, tmp_path):
    half = tmp_path / "rm"
    shutil.copytree(smoke_paths["reward"], half)
    (half / "config.json").unlink()
    with pytest.raises(UserError, match=r"holds no model \(no config.json or adapter_config.json: an interrupted"):
        resolve_model_path(str(half), "reward-model")


# ---------------------------------------------------------------------------------------------- the reward check
def test_held_out_pairs_longer_than_the_prompt_limit_are_never_scored(tokenizer):
    cfg = parse("--preset", "smoke", "--num-samples", "1", "--reward-check-pairs", "8")
    rows = [{"system": "", "question": "q", "chosen": "a", "rejected": "b"}] * 2
    rows += [{"system": "", "question": "long " * 50_000, "chosen": "a", "rejected": "b"}] * 3
    rows += [{"system": "", "question": "q", "chosen": "word " * 5000, "rejected": "b"}]
    rows += [{"system": "", "question": "fine", "chosen": "yes", "rejected": "no"}]
    assert held_out_pairs(cfg, rows, tokenizer) == [rows[1], rows[-1]]


def test_a_minimum_accuracy_without_pairs_to_check_is_one_line(smoke_paths, tokenizer):
    from smolppo.models import load_sequence_classifier

    reader = RewardReader(load_sequence_classifier(smoke_paths["reward"]), tokenizer)
    with pytest.raises(UserError, match="--min-reward-accuracy 0.9 cannot be checked"):
        check_reward_model(reader, [], 0.9)
    assert check_reward_model(reader, [], None) is None


# ---------------------------------------------------------------------------------------------- reports and order
def test_a_report_write_that_fails_leaves_the_previous_report(tmp_path):
    report = tmp_path / "evaluation.json"
    report.write_text('{"old": true}')

    def dies_half_way(tmp):
        with open(tmp, "w") as f:
            f.write('{"new": ')
        raise KeyboardInterrupt  # what a kill between the two writes would leave

    with pytest.raises(KeyboardInterrupt):
        output_dir.write_atomically(str(report), dies_half_way)
    assert json.loads(report.read_text()) == {"old": True} and os.listdir(tmp_path) == ["evaluation.json"]
    output_dir.write_json_atomically(str(report), {"new": 1})
    assert json.loads(report.read_text()) == {"new": 1}


def test_a_missing_local_reward_model_fails_before_the_hub_is_asked(tmp_path):
    from smolppo.job.build import load_ppo_models

    cfg = parse("--output-dir", str(tmp_path), "--reward-model", str(tmp_path / "no_rm"))
    with pytest.raises(UserError, match=r"reward model '.*no_rm' does not exist"):
        load_ppo_models(cfg)  # the default policy is a hub id: it would be asked for first otherwise


def test_an_evaluation_seed_out_of_range_is_one_line():
    from smolppo.configs import EvalConfig

    with pytest.raises(UserError, match="seed must be an integer"):
        parse_config(EvalConfig, ["--seed", "-3"])


# ---------------------------------------------------------------------------------------------- a full disk
def _mount_tmpfs(path, size):
    path.mkdir(exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


ON_A_TMPFS = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0, reason="mounts a small tmpfs (root on Linux)"
)


@pytest.mark.soak
@ON_A_TMPFS
def test_a_full_disk_mid_run_is_one_line_and_the_last_checkpoint_resumes(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2700k"):  # room for one smoke checkpoint (1.6 MB) and the logs, not for two
        pytest.skip("cannot mount a tmpfs here")
    flags = "--preset smoke --max-updates 6 --save-steps 2 --save-total-limit 2 --report-to none".split()
    try:
        out = disk / "run"
        result = run_script("train_ppo.py", *flags, "--output-dir", str(out))
        assert result.returncode == 4, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: no space left on the device of {str(out)!r}"), last
        assert "needs about 1.6 MB free" in last and "checkpoint-2) is intact" in last, last
        assert "Traceback" not in result.stderr
        assert [s for s, _ in checkpointing.list_checkpoints(str(out))] == [2]
        assert not [n for n in os.listdir(out) if n.startswith(files.STAGING_PREFIX)]  # its space was freed
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed = run_script("train_ppo.py", *flags, "--output-dir", str(out), "--resume-from-checkpoint", "latest")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert json.loads((out / "run_summary.json").read_text())["updates"] == 6
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.soak
@ON_A_TMPFS
def test_a_disk_too_full_for_the_last_checkpoint_still_gets_the_final_model(tmp_path):
    """The run's product is written before its last checkpoint: a disk with room for the model (0.6 MB) but not
    the checkpoint (1.6 MB) ends with the model saved and says so, not with the whole run lost."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1400k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = disk / "run"
        flags = "--preset smoke --max-updates 2 --save-steps 1000 --report-to none".split()
        result = run_script("train_ppo.py", *flags, "--output-dir", str(out))
        assert result.returncode == 4, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: no space left on the device of {str(out)!r}"), last
        assert "the final model is saved there" in last, last
        assert "Traceback" not in result.stderr
        assert checkpointing.list_checkpoints(str(out)) == []
        assert not [n for n in os.listdir(out) if n.startswith(files.STAGING_PREFIX)]
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(str(out))  # the trained policy, complete
        assert sum(p.numel() for p in saved.parameters()) > 0
        assert json.loads((out / "run_summary.json").read_text())["updates"] == 2
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
