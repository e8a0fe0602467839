"""Nothing lost, for real: overwrite removes only our files, one run per directory, honest resume, damaged
checkpoints, final outputs that never land on the user's files, and one line per mistake."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from smolppo import files, smoke
from smolppo.errors import UserError
from smolppo.runs import checkpointing, output_dir
from tests.conftest import REPO, SMOKE, one_line_error, run_script, scalars, snapshot, train_smoke

POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals (Windows uses Ctrl-Break)")
TRAIN = os.path.join(REPO, "train_ppo.py")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, smoke_cache):
    out = tmp_path_factory.mktemp("finished") / "out"
    result = train_smoke(out, "--max-updates", "4", "--save-steps", "2", "--save-total-limit", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _copy_run(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


# ---------------------------------------------------------------------------------------------- overwrite
def test_user_files_with_names_like_our_temporary_ones_are_never_ours(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    names = [".tmp-mynotes.txt", ".trash-old", ".smolppo-staging", ".smolppo-trash-notes.txt", "checkpoint-x"]
    for name in names:
        (out / name).write_text("notes")
    ours = [f"{files.STAGING_PREFIX}final-123", f"{files.TRASH_PREFIX}checkpoint-4-123-456"]
    for name in ours:
        (out / name).mkdir()
    assert sorted(output_dir.foreign_entries(str(out))) == sorted(names)
    output_dir.remove_leftovers(str(out))  # what every run does at start
    assert sorted(os.listdir(out)) == sorted(names) and all((out / n).read_text() == "notes" for n in names)


def test_overwrite_refuses_a_directory_with_a_user_file(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    before = snapshot(out)
    result = train_smoke(out, "--overwrite-output-dir", "--max-updates", "1")
    one_line_error(result, "holds files smolppo did not write", "data", "notes.txt")
    assert snapshot(out) == before


@pytest.mark.soak  # CI runs it after the README command (moved to keep that command short)
def test_overwrite_replaces_our_own_run(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    result = train_smoke(out, "--overwrite-output-dir", "--max-updates", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "run_summary.json").read_text())["updates"] == 2
    assert [s for s, _ in checkpointing.list_checkpoints(str(out))] == [2]  # the old run's checkpoints are gone
    assert not [n for n in os.listdir(out) if n.startswith((files.STAGING_PREFIX, files.TRASH_PREFIX))]


@pytest.mark.soak  # CI runs it after the README command
def test_overwrite_refuses_the_current_directory_a_parent_and_a_git_clone(tmp_path):
    clone = tmp_path / "clone"
    (clone / "src").mkdir(parents=True)
    (clone / "src" / "code.py").write_text("print('hi')\n")
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    before = snapshot(clone)
    one_line_error(train_smoke(".", "--overwrite-output-dir", cwd=clone), "current directory or a parent")
    one_line_error(train_smoke("..", "--overwrite-output-dir", cwd=clone / "src"), "current directory or a parent")
    one_line_error(train_smoke(clone, "--overwrite-output-dir"), "git work tree")
    assert snapshot(clone) == before and (clone / ".git").is_dir()


def test_overwrite_refuses_an_input_inside_the_output_dir(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    before = snapshot(out)
    result = train_smoke(out, "--overwrite-output-dir", "--policy-model", str(out / "checkpoint-4"))
    one_line_error(result, "overlaps --policy-model")
    assert snapshot(out) == before


@pytest.mark.soak
def test_reward_model_overwrite_deletes_nothing_before_loading(tmp_path):
    out = tmp_path / "rm"
    flags = ["train_reward_model.py", *SMOKE, "--output-dir", str(out), "--max-steps", "2", "--eval-steps", "2"]
    assert run_script(*flags, "--save-steps", "2").returncode == 0
    before = snapshot(out)
    result = run_script(*flags, "--overwrite-output-dir", "--policy-model", "./no/such/model")
    one_line_error(result, "policy model './no/such/model' does not exist")
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------- one run per dir
def _start(out, *args):
    return subprocess.Popen(
        [sys.executable, TRAIN, *SMOKE, "--output-dir", str(out), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.soak
def test_a_second_run_on_a_live_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    first = _start(out, "--max-updates", "12", "--max-new-tokens", "64", "--ppo-epochs", "6")
    deadline = time.time() + 60
    while not (out / files.LOCK).exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.05)
    lock = json.loads((out / files.LOCK).read_text())
    assert lock["pid"] == first.pid
    for extra in ([], ["--overwrite-output-dir"]):
        second = train_smoke(out, "--max-updates", "1", *extra)
        one_line_error(second, "is in use by another run", f"pid {first.pid}")
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "finished" and summary["updates"] == 12
    assert not (out / files.LOCK).exists()


@pytest.mark.soak  # CI runs it after the README command
def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "process_started": 1.0, "started": "long ago"}
    (out / files.LOCK).write_text(json.dumps(stale))
    result = train_smoke(out, "--max-updates", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no longer alive" in result.stderr and not (out / files.LOCK).exists()


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.soak  # CI runs it after the README command
def test_resume_with_a_changed_learning_rate_is_refused_or_honoured(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    before = snapshot(out)
    refused = train_smoke(out, "--resume-from-checkpoint", "latest", "--max-updates", "6", "--learning-rate", "0.01")
    one_line_error(refused, "learning_rate: 0.003 -> 0.01", "--allow-config-change")
    assert snapshot(out) == before
    honoured = train_smoke(
        out,
        *"--resume-from-checkpoint latest --max-updates 6 --learning-rate 0.01 --allow-config-change".split(),
    )
    assert honoured.returncode == 0, honoured.stderr[-3000:]
    rates = scalars(out / "logs", "learning_rate")
    assert rates[4] == pytest.approx(0.003) and rates[5] == pytest.approx(0.01) and rates[6] == pytest.approx(0.01)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["config_changes_on_resume"] == [{"field": "learning_rate", "checkpoint": 0.003, "now": 0.01}]


@pytest.mark.soak
def test_resume_refuses_other_batch_sizes_seed_and_reward_model(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    flags = ["--resume-from-checkpoint", "latest", "--max-updates", "6"]
    one_line_error(train_smoke(out, *flags, "--seed", "7"), "seed: 42 -> 7")
    one_line_error(train_smoke(out, *flags, "--mini-batch-size", "4"), "mini_batch_size: 8 -> 4")
    reward = smoke.resolve("smoke:reward")  # smoke names are paths from parsing on
    one_line_error(train_smoke(out, *flags, "--reward-model", "smoke:policy"), f"reward_model: '{reward}'")
    one_line_error(train_smoke(out, *flags, "--use-lora", "--allow-config-change"), "cannot resume", "use_lora")


@pytest.mark.soak  # CI runs it after the README command
def test_resuming_an_older_checkpoint_is_a_branch(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    older = str(out / "checkpoint-2")
    refused = train_smoke(out, "--resume-from-checkpoint", older, "--max-updates", "4")
    one_line_error(refused, "is not the newest checkpoint", "checkpoint-4", "--discard-newer-checkpoints")
    branch = train_smoke(
        out,
        "--resume-from-checkpoint",
        older,
        "--max-updates",
        "3",
        "--discard-newer-checkpoints",
        "--save-total-limit",
        "5",
    )
    assert branch.returncode == 0, branch.stderr[-3000:]
    assert [s for s, _ in checkpointing.list_checkpoints(str(out))] == [2, 3]  # the resumed-from one kept
    assert json.loads((out / "run_summary.json").read_text())["updates"] == 3


@pytest.mark.soak  # CI runs it after the README command (moved to keep that command short)
def test_resuming_a_finished_run_keeps_its_metrics(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    finished = json.loads((out / "run_summary.json").read_text())["final_metrics"]
    result = train_smoke(out, "--resume-from-checkpoint", "latest", "--max-updates", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "run_summary.json").read_text())["final_metrics"] == finished != {}


@pytest.mark.soak  # CI runs it after the README command (moved to keep that command short)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = train_smoke(out, "--resume-from-checkpoint", "latest", "--max-updates", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint-4 is damaged (model.safetensors is damaged)" in result.stderr
    assert "at update 2" in result.stderr
    assert [s for s, _ in checkpointing.list_checkpoints(str(out))] == [5]  # the damaged one is gone
    load_file(out / "checkpoint-5" / "model.safetensors")


@pytest.mark.soak  # CI runs it after the README command (moved to keep that command short)
def test_only_the_newest_checkpoint_keeps_the_optimizer_state(finished_run, tmp_path):
    assert (finished_run / "checkpoint-4" / "optimizer.safetensors").is_file()
    assert not (finished_run / "checkpoint-2" / "optimizer.safetensors").exists()  # --save-optimizer-state latest
    state = json.loads((finished_run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["optimizer_state"] is False
    out = _copy_run(finished_run, tmp_path)
    branch = train_smoke(
        out, "--resume-from-checkpoint", str(out / "checkpoint-2"), "--max-updates", "3", "--discard-newer-checkpoints"
    )
    assert branch.returncode == 0, branch.stderr[-3000:]
    assert "keeps weights only (its optimizer state was dropped): AdamW moments restart" in branch.stderr


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_all_checkpoints_keep_the_optimizer_state_when_asked_and_the_size_is_said(tmp_path, caplog):
    from tests.conftest import make_smoke_trainer

    out = tmp_path / "all"
    trainer = make_smoke_trainer(
        out,
        *"--max-updates 4 --save-steps 2 --save-total-limit 5 --save-optimizer-state all --report-to none".split(),
    )
    with caplog.at_level("INFO"):
        trainer.train()
    assert all((out / f"checkpoint-{n}" / "optimizer.safetensors").is_file() for n in (2, 4))
    said = "each checkpoint writes 1.6 MB (models 0.5 MB, optimizer state 1.1 MB); checkpoints in this run: 2"
    assert said in caplog.text
    size = sum(f.stat().st_size for f in (out / "checkpoint-4").rglob("*") if f.is_file())
    assert 1.5e6 < size < 1.8e6  # the estimate is what the checkpoint really holds


@pytest.mark.soak
def test_a_checkpoint_without_optimizer_state_is_not_resumed_silently(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    (out / "checkpoint-4" / "optimizer.safetensors").unlink()
    explicit = train_smoke(out, "--resume-from-checkpoint", str(out / "checkpoint-4"), "--max-updates", "5")
    one_line_error(explicit, "optimizer.safetensors is missing")
    corrupt = _copy_run(finished_run, tmp_path / "c")
    (corrupt / "checkpoint-4" / "algorithm_state.json").write_bytes(b"garbage")
    result = train_smoke(corrupt, "--resume-from-checkpoint", "latest", "--max-updates", "5")
    one_line_error(result, "checkpoint-4", "is damaged")


@pytest.mark.soak
@POSIX_ONLY
def test_rotation_never_leaves_a_half_deleted_checkpoint(tmp_path):
    """SIGKILL a process while it rotates a checkpoint of many files: what is left is whole or gone."""
    script = (
        "import sys; from smolppo.runs import checkpointing; print('ready', flush=True); "
        "checkpointing.rotate_checkpoints(sys.argv[1], 1)"
    )
    for attempt in range(4):
        run_dir = tmp_path / f"r{attempt}"
        for step in (1, 2):
            ckpt = run_dir / f"checkpoint-{step}"
            (ckpt / "shards").mkdir(parents=True)
            for i in range(3000):
                (ckpt / "shards" / f"{i}.bin").write_bytes(b"x")
            (ckpt / files.STATE_FILE).write_text("{}")
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.005 + 0.01 * attempt)  # somewhere inside the deletion of 3000 files
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for name in os.listdir(run_dir):  # every checkpoint-N left is whole: nothing half-deleted keeps its name
            if name.startswith("checkpoint-"):
                assert len(os.listdir(run_dir / name / "shards")) == 3000, (attempt, name)
                assert (run_dir / name / files.STATE_FILE).exists()
        output_dir.remove_leftovers(str(run_dir))
        assert not [n for n in os.listdir(run_dir) if n.startswith(files.TRASH_PREFIX)]


# ---------------------------------------------------------------------------------------------- final outputs
def test_final_outputs_never_replace_a_users_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    with pytest.raises(UserError, match="config.json .* is in the way"):
        with output_dir.publishing(str(out)) as staging:
            with open(os.path.join(staging, "config.json"), "w") as f:
                f.write("{}")
            with open(os.path.join(staging, "model.safetensors"), "w") as f:
                f.write("weights")
    assert json.loads((out / "config.json").read_text()) == {"mine": True}
    kept = [n for n in os.listdir(out) if n.startswith("unpublished-final-")]
    assert len(kept) == 1 and sorted(os.listdir(out / kept[0])) == ["config.json", "model.safetensors"]


def test_a_file_in_the_way_of_the_outputs_is_refused_before_training(tmp_path):
    for name in ("value_model", "config.json"):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / name).write_text("mine")
        one_line_error(train_smoke(out, "--max-updates", "1"), name, "would be overwritten")
        assert (out / name).read_text() == "mine" and sorted(os.listdir(out)) == [name]


# ---------------------------------------------------------------------------------------------- one line each
def _yaml(tmp_path, content):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(content) if not isinstance(content, str) else content)
    return str(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("- a\n- b\n", "must be a mapping of field: value, got a list"),
        ({"learning_rate": None}, "learning_rate has no value"),
        ({"seed": [1, 2]}, "seed must be a single value, got a list"),
    ],
)
def test_bad_yaml_is_one_line(tmp_path, content, message):
    from config import PPOConfig
    from smolppo.cli import parse_config

    with pytest.raises(UserError, match=message):
        parse_config(PPOConfig, ["--config", _yaml(tmp_path, content)])


def test_infinite_learning_rate_is_refused():
    from config import PPOConfig
    from smolppo.cli import parse_config

    with pytest.raises(UserError, match="learning_rate must hold finite numbers"):
        parse_config(PPOConfig, ["--learning-rate", "inf"])


@pytest.mark.parametrize(
    "case",
    ["fewer rows than a batch", "garbage weights", "output is a file", "output under /proc", "truncated summary"],
)
def test_mistakes_are_one_line_and_touch_nothing(tmp_path, smoke_paths, case):
    import shutil

    out = tmp_path / "out"
    args = []
    if case == "fewer rows than a batch":
        args, fragment = ["--num-samples", "10"], "fewer than one rollout batch"
    elif case == "garbage weights":
        policy = tmp_path / "policy"
        shutil.copytree(smoke_paths["policy"], policy)
        (policy / "model.safetensors").write_bytes(b"\x00" * 64)
        args, fragment = ["--policy-model", str(policy)], "could not load policy model"
    elif case == "output is a file":
        out = tmp_path / "a_file"
        out.write_text("x")
        fragment = "is a file, not a directory"
    elif case == "output under /proc":
        out, fragment = "/proc/smolppo-out", "not writable"
    else:
        out.mkdir()
        (out / "run_summary.json").write_text('{"status": "fini')
        fragment = "run_summary.json' is unreadable"
    before = snapshot(out) if os.path.isdir(out) else None
    one_line_error(train_smoke(out, *args), fragment)
    if before is not None:
        assert snapshot(out) == before
    elif case != "output is a file":
        assert not os.path.exists(out)


@pytest.mark.soak  # CI runs it after the README command
def test_empty_questions_and_too_few_rows_are_reported(tmp_path):
    from smolppo.smoke import load_smoke_rows

    rows = load_smoke_rows()
    for row in rows[:5]:
        row["question"] = None
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = train_smoke(tmp_path / "o", "--dataset", str(data), "--num-samples", "500", "--max-updates", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dropped 5 of 128 rows" in result.stderr and "question is empty or null" in result.stderr
    assert "num_samples=500 but" in result.stderr and "only 128 rows" in result.stderr


@POSIX_ONLY
def test_sigterm_before_training_stops_with_one_line(tmp_path):
    """SIGTERM while the job is still assembling (here: importing a reward function that signals it got there and
    then blocks) stops at once with one line and exit 143, as schedulers expect."""
    ready = tmp_path / "importing"
    module = tmp_path / "slow_reward.py"
    module.write_text(
        f"import pathlib, time\npathlib.Path({str(ready)!r}).write_text('x')\ntime.sleep(120)\n"
        "def reward(prompts, completions, **kwargs):\n    return [0.0] * len(completions)\n"
    )
    out = tmp_path / "run"
    proc = _start(out, "--max-updates", "1", "--reward-funcs", f"{module}:reward")
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("interrupted:")
    assert not os.path.exists(out) or not checkpointing.list_checkpoints(str(out))


@pytest.mark.soak
@POSIX_ONLY
def test_reward_model_training_stops_gracefully_on_sigint(tmp_path):
    out = tmp_path / "rm"
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "train_reward_model.py"),
            *SMOKE,
            "--output-dir",
            str(out),
            *"--num-train-epochs 200 --save-steps 100000 --eval-steps 100000".split(),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 90
    while not (out / "logs").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "--resume-from-checkpoint latest" in stderr
    assert checkpointing.latest_checkpoint(str(out)) is not None
    assert not (out / "reward_model_summary.json").exists()  # not a finished run


def test_evaluation_mistakes_are_found_before_any_generation(smoke_run, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run_script("evaluate_generations.py", "--model-path", str(smoke_run), "--output", str(blocker / "e.json"))
    one_line_error(result, "cannot create the directory of --output")
    assert "evaluating" not in result.stderr
    missing = run_script("evaluate_generations.py", "--model-path", "/missing/model")
    one_line_error(missing, "'/missing/model'")


def test_plot_creates_a_missing_output_parent(smoke_run, tmp_path):
    target = tmp_path / "new" / "dir" / "plot.png"
    result = run_script("plot_training_progress.py", "--log-dir", str(smoke_run / "logs"), "--output", str(target))
    assert result.returncode == 0, result.stderr[-2000:]
    assert target.stat().st_size > 0 and (target.parent / "training_scalars.csv").exists()


def test_reports_are_strict_json_even_with_an_undefined_figure(tmp_path):
    """A figure undefined in its update (nan) or infinite is written as null: Python's NaN is not JSON, and the run
    summary is read by other tools (jq, a browser, a spreadsheet)."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    path = tmp_path / "summary.json"
    output_dir.write_json_atomically(str(path), {"a": float("nan"), "b": [float("inf"), 1.5], "c": (2, float("-inf"))})
    assert json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse) == {
        "a": None,
        "b": [None, 1.5],
        "c": [2, None],
    }
