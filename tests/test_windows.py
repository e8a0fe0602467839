"""Where the user runs it: Windows 11 (files held open by other programs, its disk-full message, no NCCL, no
DeepSpeed, a cp1252 console, UTF-8 files with a byte-order mark) and checkpoints written on a GPU. Windows is
played on Linux by what it does differently: `sys.platform`, and `PermissionError` with winerror 32 from the calls
it refuses."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import zipfile

import pytest
import torch

from smolppo import distributed, filesystem
from smolppo.errors import UserError
from smolppo.filesystem import FileHeldOpen
from smolppo.runs import checkpointing, output_dir
from tests.conftest import make_smoke_trainer, run_script, run_script_in_process
from tests.legacy_checkpoint import as_format_1

real_replace, real_remove = os.replace, os.remove


def held_open(path: str) -> PermissionError:
    """What Windows raises for a file another process has open."""
    exc = PermissionError(
        errno.EACCES, "The process cannot access the file because it is being used by another process", path
    )
    exc.winerror = 32
    return exc


@pytest.fixture
def no_wait(monkeypatch):
    """Retries without their pauses (the number of tries is what is tested)."""
    monkeypatch.setattr(filesystem, "RETRY_DELAYS_S", (0.0,) * len(filesystem.RETRY_DELAYS_S))


def hold(monkeypatch, predicate, times: int | None = None) -> list:
    """Make `os.replace`/`os.remove` refuse paths for which ``predicate(path)`` holds (`times` tries, else always);
    returns the refused calls."""
    refused = []

    def replace(src, dst):
        if predicate(str(dst)) or predicate(str(src)):
            if times is None or len(refused) < times:
                refused.append((src, dst))
                raise held_open(str(dst))
        return real_replace(src, dst)

    def remove(path):
        if predicate(str(path)) and (times is None or len(refused) < times):
            refused.append((path, None))
            raise held_open(str(path))
        return real_remove(path)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "remove", remove)
    return refused


# ---------------------------------------------------------------------------------------------- held-open files
def test_a_brief_hold_is_waited_out(tmp_path, no_wait, monkeypatch):
    target = tmp_path / "run_summary.json"
    refused = hold(monkeypatch, lambda p: p == str(target), times=3)
    output_dir.write_json_atomically(str(target), {"status": "finished"})
    assert len(refused) == 3 and json.loads(target.read_text(encoding="utf-8")) == {"status": "finished"}


def test_a_file_that_stays_held_is_one_line_and_the_new_content_is_kept(tmp_path, no_wait, monkeypatch):
    target = tmp_path / "training_scalars.csv"
    target.write_text("old", encoding="utf-8")
    refused = hold(monkeypatch, lambda p: p == str(target))
    with pytest.raises(FileHeldOpen) as caught:
        output_dir.write_atomically(str(target), lambda tmp: open(tmp, "w", encoding="utf-8").write("new"))
    assert len(refused) == len(filesystem.RETRY_DELAYS_S) + 1
    message, kept = str(caught.value), f"{target}.tmp-{os.getpid()}"
    assert caught.value.exit_code == filesystem.HELD_OPEN_EXIT_CODE and "\n" not in message
    assert repr(str(target)) in message and "held open by" in message and repr(kept) in message
    assert target.read_text(encoding="utf-8") == "old" and open(kept, encoding="utf-8").read() == "new"


def test_a_final_model_that_cannot_be_published_is_kept_where_no_cleanup_looks(tmp_path, no_wait, monkeypatch):
    out = tmp_path / "out"
    hold(monkeypatch, lambda p: p.endswith(os.sep + "model.safetensors") and ".smolppo-staging-" not in p)
    with pytest.raises(FileHeldOpen, match="unpublished-final-") as caught:
        with output_dir.publishing(str(out)) as staging:
            for name in ("config.json", "model.safetensors"):
                (tmp_path / "out" / os.path.basename(staging) / name).write_text(name, encoding="utf-8")
    kept = re.search(r"kept in '([^']+)'", str(caught.value)).group(1)
    assert os.listdir(kept) == ["model.safetensors"] and (out / "config.json").is_file()
    output_dir.remove_leftovers(str(out))  # what the next run does first
    assert os.path.isfile(os.path.join(kept, "model.safetensors"))


@pytest.mark.soak  # CI runs it after the README command (moved to keep that command short)
def test_rotation_skips_a_checkpoint_being_read_and_a_held_checkpoint_is_kept_to_resume(
    tmp_path, no_wait, monkeypatch, caplog
):
    trainer = make_smoke_trainer(tmp_path / "out", "--save-total-limit", "1")
    trainer.step()
    first = trainer.save_checkpoint()
    refused = hold(monkeypatch, lambda p: p == first)  # an evaluation reads checkpoint-1
    trainer.step()
    second = trainer.save_checkpoint()  # rotation cannot remove checkpoint-1: a warning, training goes on
    assert refused and os.path.isdir(first) and os.path.isdir(second)
    assert any("held open" in r.message and "next checkpoint's rotation" in r.message for r in caplog.records)
    monkeypatch.undo()
    monkeypatch.setattr(filesystem, "RETRY_DELAYS_S", (0.0,))
    hold(monkeypatch, lambda p: p.endswith(f"{os.sep}checkpoint-3"))  # the antivirus scans the new checkpoint
    trainer.step()
    with pytest.raises(FileHeldOpen, match="resume with --resume-from-checkpoint") as caught:
        trainer.save_checkpoint()
    kept = str(tmp_path / "out" / "unpublished-checkpoint-3")
    assert kept in str(caught.value) and checkpointing.checkpoint_problem(kept) is None
    monkeypatch.undo()
    output_dir.remove_leftovers(str(tmp_path / "out"))
    resumed = make_smoke_trainer(tmp_path / "out", "--save-total-limit", "1")
    resumed.load_checkpoint(kept)
    assert resumed.update == 3


def test_the_script_says_which_file_is_held_and_exits_5(tmp_path, no_wait, monkeypatch, capsys):
    out = tmp_path / "out"
    hold(monkeypatch, lambda p: p.endswith(os.sep + "run_summary.json"))
    code, err = run_script_in_process(
        "train_ppo.py", "--preset", "smoke", "--output-dir", str(out), "--max-updates", "1", capsys=capsys
    )
    last = err.strip().splitlines()[-1]
    assert code == 5 and "Traceback" not in err, err[-2000:]
    assert last.startswith("error: ") and "run_summary.json" in last and "held open by" in last
    assert (out / "model.safetensors").is_file() and list(out.glob("run_summary.json.tmp-*"))


def test_the_holder_is_named_when_the_system_can_tell(tmp_path):
    path = tmp_path / "locked.csv"
    path.write_text("x", encoding="utf-8")
    import subprocess

    reader = subprocess.Popen(
        [sys.executable, "-c", f"f = open({str(path)!r}); print('open', flush=True); input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "open"  # the file is open now: no sleep needed
        holders = filesystem.holders_of(str(path))
        message = str(FileHeldOpen(str(path), holders))
    finally:
        reader.communicate("\n", timeout=30)
    assert holders and f"(pid {reader.pid})" in holders[0] and holders[0] in message


# ---------------------------------------------------------------------------------------------- a full disk
@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("There is not enough space on the disk. (os error 112)"),  # safetensors on Windows
        OSError(errno.EIO, "write failed"),  # with winerror 112, set below
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["safetensors", "winerror", "linux"],
)
def test_windows_disk_full_is_recognised(exc):
    if getattr(exc, "errno", None) == errno.EIO:
        exc.winerror = 112
    assert output_dir.is_disk_full(exc)
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = exc
    assert output_dir.is_disk_full(wrapped)
    assert not output_dir.is_disk_full(OSError(errno.EACCES, "Access is denied"))


# ---------------------------------------------------------------------------------------------- several GPUs
def test_several_gpus_on_windows_use_gloo_and_deepspeed_is_refused(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("USE_LIBUV", raising=False)
    assert distributed.process_group() == {"cpu": False, "backend": "gloo"}
    assert os.environ["USE_LIBUV"] == "0" and distributed.ddp_backend() == "gloo"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="WSL2"):
        distributed.process_group()
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert distributed.process_group() == {"cpu": False} and distributed.ddp_backend() is None


def test_deepspeed_on_windows_is_one_line_through_the_script(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    code, err = run_script_in_process(
        "train_ppo.py", "--preset", "smoke", "--output-dir", str(tmp_path / "o"), capsys=capsys
    )
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: DeepSpeed does not support")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- resume
def as_if_saved_on_a_gpu(path: str) -> None:
    """Rewrite a `torch.save` file so that its tensors say they were saved from ``cuda:0``, as a GPU run's are."""
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    name = next(n for n in members if n.endswith("/data.pkl"))
    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # protocol 2: BINUNICODE, 4-byte length
    assert cpu in members[name]
    members[name] = members[name].replace(cpu, cuda)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_cpu(tmp_path):
    trainer = make_smoke_trainer(tmp_path / "out")
    trainer.step()
    path = trainer.save_checkpoint()  # this version's tensors are read onto the CPU whatever wrote them; the
    as_format_1(path)  # earlier format's pickled tensors name the device they were saved from
    optimizer_file = os.path.join(path, "optimizer.pt")
    as_if_saved_on_a_gpu(optimizer_file)
    if not torch.cuda.is_available():  # the file is what a GPU wrote: read as it says, it needs CUDA
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(optimizer_file, weights_only=False)
    expected = trainer.step()  # the run going on from the checkpoint's random state
    resumed = make_smoke_trainer(tmp_path / "out")
    resumed.load_checkpoint(path)
    moments = [s["exp_avg"] for s in resumed.algorithm.optimizer.state_dict()["state"].values()]
    assert moments and all(m.device == resumed.accelerator.device for m in moments)
    got = resumed.step()
    for key in ("rewards/mean", "loss", "kl_divergence"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------------------------------------- text
@pytest.mark.soak  # CI runs it after the README command (moved to keep that command short)
def test_a_cp1252_console_gets_the_table_not_a_traceback(smoke_run, tmp_path):
    """A Windows console in cp1252 cannot show every character of a path: stdout escapes it instead of raising
    UnicodeEncodeError (stderr always did)."""
    model = tmp_path / "model\u2713"  # the check mark is not in cp1252
    shutil.copytree(smoke_run, model)
    result = run_script(
        "evaluate_generations.py",
        "--model-path",
        str(model),
        *"--num-prompts 2 --num-completions 2 --max-new-tokens 4 --output".split(),
        str(tmp_path / "e.json"),
        env={"PYTHONIOENCODING": "cp1252"},
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "model\\u2713" in result.stdout


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_a_dataset_saved_with_a_byte_order_mark_is_read(tmp_path, suffix):
    from smolppo.data import load_rows

    rows = [{"system": "", "question": "Was ist 2+2?", "chosen": "4", "rejected": "5"}] * 2
    if suffix == ".json":
        text = json.dumps(rows, ensure_ascii=False)
    elif suffix == ".jsonl":
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    else:
        text = "system,question,chosen,rejected\n" + ",Was ist 2+2?,4,5\n" * 2
    path = tmp_path / f"prompts{suffix}"
    path.write_text(text, encoding="utf-8-sig")  # Notepad, PowerShell 5.1's Set-Content -Encoding UTF8
    loaded = load_rows(str(path))
    assert [r["question"] for r in loaded] == ["Was ist 2+2?"] * 2 and "\ufeffsystem" not in loaded[0]


def test_a_scratch_folder_still_mapped_does_not_fail_the_conversion(monkeypatch):
    from smolppo.real_model import scratch_directory

    def refuse(path, *args, **kwargs):
        raise held_open(str(path))

    with scratch_directory("smolppo-test-") as work:
        with open(os.path.join(work, "model.gguf"), "wb") as f:
            f.write(b"GGUF")
        monkeypatch.setattr(os, "unlink", refuse)  # Windows: the GGUF reader still maps the file
        monkeypatch.setattr(os, "rmdir", refuse)
    monkeypatch.undo()
    assert os.path.isfile(os.path.join(work, "model.gguf"))  # left for the system's clean-up, not an error
    shutil.rmtree(work)
