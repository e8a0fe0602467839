"""Command-line plumbing shared by the scripts: dataclass parsing with presets and YAML, and one-line errors
(signals are `smolppo.signals`)."""

from __future__ import annotations

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


def _option_value(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


class SectionedParser(TrlParser):
    """`TrlParser` whose ``--help`` lists fields under the field group that declares them (`SECTION` of the class)."""

    def _add_dataclass_arguments(self, dtype):
        import dataclasses
        from typing import get_type_hints

        type_hints = get_type_hints(dtype)
        groups = {}
        for field in dataclasses.fields(dtype):
            if not field.init:
                continue
            owner = next(c for c in dtype.__mro__ if field.name in c.__dict__.get("__annotations__", {}))
            title = getattr(owner, "SECTION", None) if owner is not dtype else None
            title = title or getattr(dtype, "SECTION", dtype.__name__)
            if title not in groups:
                groups[title] = self.add_argument_group(title)
            field.type = type_hints[field.name]
            self._parse_dataclass_field(groups[title], field)


def parse_config(config_cls: type[T], args: Sequence[str] | None = None, recipes: str | None = None) -> T:
    """Build `config_cls` from defaults, a recipe (``--preset NAME`` = ``recipes/<recipes>/NAME.yaml``), a YAML
    file (``--config``) and CLI flags, in that order of precedence.

    Raises `UserError` for values `__post_init__` rejects, unknown presets and unknown YAML keys; argparse itself
    exits with status 2 and a usage line on malformed flags.
    """
    from smolppo.configs import available_recipes, recipe_path

    args = list(sys.argv[1:] if args is None else args)
    parser = SectionedParser(config_cls)
    config_path = _option_value(args, "--config")
    values = load_yaml_config(config_cls, config_path) if config_path is not None else {}
    preset = _option_value(args, "--preset") or values.get("preset")  # a preset named in the YAML works the same
    if preset is not None:
        names = available_recipes(recipes) if recipes else []
        if preset not in names:
            raise UserError(f"unknown preset {preset!r}; choose one of {names} (files in recipes/{recipes}/)")
        recipe = load_yaml_config(config_cls, recipe_path(recipes, preset))
        recipe.pop("env", None)
        parser.set_defaults_with_config(**recipe)
    if config_path is not None:  # applied here (not by TrlParser) so that trl's names work as YAML keys too
        for key, value in (values.pop("env", None) or {}).items():
            os.environ[str(key)] = str(value)
        parser.set_defaults_with_config(**values)
        args = _without_option(args, "--config")
    try:
        (config,) = parser.parse_args_and_config(args)
    except ValueError as exc:
        raise UserError(f"invalid configuration: {exc}") from exc
    from smolppo.smoke import resolve_config  # the smoke preset's names end here

    return resolve_config(config)


def _without_option(args: list[str], name: str) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == name:
            skip = i + 1 < len(args)
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


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
    args = sys.argv[1:] if args is None else args
    return "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


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
