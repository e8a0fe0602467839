"""Command-line plumbing shared by the scripts: dataclass parsing with presets and YAML, and one-line errors
(signals are `smolppo.signals`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

import yaml
from trl import TrlParser

from smolppo.errors import UserError
from smolppo.signals import signal_exit_code, stop_at_once_on_termination

T = TypeVar("T")
DEBUG_ENV = "SMOLPPO_DEBUG"


def script_options(args: Sequence[str]) -> argparse.Namespace:
    """The options read before the config is parsed: ``--config FILE``, ``--preset NAME`` and ``--debug``."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--config")
    early.add_argument("--preset")
    early.add_argument("--debug", nargs="?", const="true", default=None)
    known, _ = early.parse_known_args(list(args))
    return known


def config_parser(config_cls) -> TrlParser:
    """The parser of `config_cls`: one ``--help`` section per field group (its ``_argument_group_name``); a plain
    dataclass (a benchmark's) is one group."""
    return TrlParser(getattr(config_cls, "GROUPS", (config_cls,)))


def parse_config(config_cls: type[T], args: Sequence[str] | None = None, recipes: str | None = None) -> T:
    """Build `config_cls` from defaults, a recipe (``--preset NAME`` = ``recipes/<recipes>/NAME.yaml``), a YAML
    file (``--config``) and CLI flags, in that order of precedence.

    Raises `UserError` for values a field group rejects, unknown presets and unknown YAML keys; argparse itself
    exits with status 2 and a usage line on malformed flags.
    """
    from smolppo.configs import available_recipes, recipe_path

    args = list(sys.argv[1:] if args is None else args)
    parser = config_parser(config_cls)
    options = script_options(args)
    values = load_yaml_config(config_cls, options.config) if options.config is not None else {}
    preset = options.preset or values.get("preset")  # a preset named in the YAML works the same
    if preset is not None:
        names = available_recipes(recipes) if recipes else []
        if preset not in names:
            raise UserError(f"unknown preset {preset!r}; choose one of {names} (files in recipes/{recipes}/)")
        recipe = load_yaml_config(config_cls, recipe_path(recipes, preset))
        recipe.pop("env", None)
        parser.set_defaults_with_config(**recipe)
    if options.config is not None:  # applied here (not by TrlParser) so that trl's names work as YAML keys too
        for key, value in (values.pop("env", None) or {}).items():
            os.environ[str(key)] = str(value)
        parser.set_defaults_with_config(**values)
    try:
        groups = parser.parse_args_into_dataclasses(without_config(args))
        config = config_cls.from_groups(groups) if hasattr(config_cls, "from_groups") else groups[0]
    except ValueError as exc:
        raise UserError(f"invalid configuration: {exc}") from exc
    from smolppo.smoke import resolve_config  # the smoke preset's names end here

    return resolve_config(config)


def without_config(args: list[str]) -> list[str]:
    """`args` without ``--config FILE`` (its values are already the parser's defaults)."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--config")
    _, rest = early.parse_known_args(args)
    return rest


def field_aliases(config_cls) -> dict[str, str]:
    """Other names a field answers to (trl's, e.g. use_peft -> use_lora), from the fields' ``aliases``."""
    aliases = {}
    for name, f in config_cls.__dataclass_fields__.items():
        for alias in f.metadata.get("aliases", []):
            aliases[alias.lstrip("-").replace("-", "_")] = name
    return aliases


def load_yaml_config(config_cls, config_path: str) -> dict:
    """The checked contents of a YAML config or recipe file, keys as field names (one line for anything wrong)."""
    if not os.path.isfile(config_path):
        raise UserError(f"config file {config_path!r} does not exist; pass --config with the path of a YAML file")
    with open(config_path, encoding="utf-8") as f:
        try:
            loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {config_path!r} is not valid YAML: {exc}".splitlines()[0]) from exc
    if isinstance(loaded, dict):
        aliases = field_aliases(config_cls)
        named: dict = {}
        for key, value in loaded.items():
            name = aliases.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
            if name in named:
                raise UserError(
                    f"config file {config_path!r} sets {name} twice ({named[name][0]!r} and {key!r}, another name for "
                    "the same setting); keep one of them"
                )
            named[name] = (key, value)
        loaded = {name: value for name, (_, value) in named.items()}
    check_yaml_values(config_cls, config_path, loaded)
    return loaded


def check_yaml_values(config_cls, config_path: str, loaded) -> None:
    """One line for a YAML file that is not a mapping of known fields to values of the right shape."""
    if not isinstance(loaded, dict):
        raise UserError(
            f"config file {config_path!r} must be a mapping of field: value, got a {type(loaded).__name__}"
        )
    fields = config_cls.__dataclass_fields__  # the keys are field names already (see load_yaml_config)
    unknown = sorted(k for k in loaded if k not in fields and k != "env")
    if unknown:
        raise UserError(f"config file {config_path!r} has unknown keys {unknown}; see --help for valid names")
    for key, value in loaded.items():
        if key == "env":
            continue
        kind = str(fields[key].type)
        if value is None and "Optional" not in kind:
            raise UserError(f"config file {config_path!r}: {key} has no value; give one or remove the line")
        if isinstance(value, (list, dict)) and not kind.startswith(("list", "dict")):
            raise UserError(f"config file {config_path!r}: {key} must be a single value, got a {type(value).__name__}")
        if kind.startswith("list") and value is not None and not isinstance(value, list):
            raise UserError(f"config file {config_path!r}: {key} must be a list, e.g. {key}: [{value!r}]")


def wants_debug(args: Sequence[str] | None = None) -> bool:
    """``--debug`` on the command line (read before the config is parsed, so a bad config shows its traceback too),
    or ``SMOLPPO_DEBUG=1``."""
    flag = script_options(sys.argv[1:] if args is None else args).debug
    return (flag is not None and flag.lower() not in ("false", "0", "no")) or os.environ.get(DEBUG_ENV, "") not in (
        "",
        "0",
    )


def tolerate_console_encoding() -> None:
    """A character the console cannot show (a Windows console in cp1252, a path in another script) is written as
    an escape instead of raising `UnicodeEncodeError` in the middle of an error line or a table."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's `main`, turning user mistakes into one line on stderr and a non-zero exit.

    Set ``--debug`` or ``SMOLPPO_DEBUG=1`` to see the full traceback instead.
    """
    tolerate_console_encoding()
    worker = os.environ.get("RANK", "0") != "0"  # under `accelerate launch`, only rank 0 reports progress
    logging.basicConfig(
        level=logging.WARNING if worker else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "tensorboard", "matplotlib", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    debug = wants_debug()
    stop_at_once_on_termination()
    try:
        code = main()
    except UserError as exc:
        if debug:
            raise
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        sys.stderr.write("interrupted: stopped at once; anything not in a checkpoint-N directory was not saved\n")
        sys.exit(getattr(exc, "exit_code", signal_exit_code("SIGINT")))
    sys.exit(code or 0)
