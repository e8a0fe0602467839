"""The house rules that keep the code enterable: layers import only downwards, no module grows too long, the
README stays a front door whose links all lead somewhere, and CI runs the README's own test command."""

from __future__ import annotations

import ast
import dataclasses
import os
import re

import pytest

from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "smolppo")
# A module may import from its own layer and the layers before it; the base (top-level modules and configs/)
# imports no sub-package at all.
LAYERS = ["base", "runs", "rewards", "algorithm", "evaluation", "job"]
# Module length is a guideline checked in review (about 400 lines: one subject per module); this ceiling only
# catches a module that has clearly become two. Lines are never packed to fit: black-style formatting throughout.
MAX_MODULE_LINES = 600
MAX_README_LINES = 250


def _modules() -> dict[str, str]:
    out = {}
    for root, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                out[module] = path
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "base"


def _imports(path: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "smolppo":
            if node.module in {"smolppo", *(f"smolppo.{layer}" for layer in LAYERS)}:
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "smolppo")
    return found


def test_imports_only_point_down():
    upward = []
    for module, path in _modules().items():
        own = LAYERS.index(_layer(module))
        for target in _imports(path):
            if LAYERS.index(_layer(target)) > own:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_layer_rule_catches_an_upward_import(tmp_path):
    """The check above can fail: an import from the job into the base is an upward import."""
    module = tmp_path / "fake.py"
    module.write_text("from smolppo.job.trainer import Trainer\n")
    (target,) = _imports(str(module))
    assert LAYERS.index(_layer(target)) > LAYERS.index(_layer("smolppo.models"))


def test_no_module_over_the_limit():
    lengths = {m: len(open(p, encoding="utf-8").readlines()) for m, p in _modules().items()}
    assert not {m: n for m, n in lengths.items() if n > MAX_MODULE_LINES}


def test_no_code_is_kept_out_of_the_formatter():
    """No ``fmt: skip`` / ``fmt: off`` anywhere: code is formatted, not packed under a line count."""
    marker = "# fmt" + ": "
    packed = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "node_modules")]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    packed += [f"{os.path.relpath(path, REPO)}:{n}" for n, line in enumerate(f, 1) if marker in line]
    assert not packed, packed


def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_is_a_front_door_and_every_link_resolves():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert len(readme.splitlines()) <= MAX_README_LINES
    pages = ["README.md"] + [os.path.join("docs", n) for n in os.listdir(os.path.join(REPO, "docs"))]
    broken = []
    for page in pages:
        text = open(os.path.join(REPO, page), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")) or target.endswith(".png"):
                continue
            file, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(REPO, os.path.dirname(page), file or os.path.basename(page)))
            if not os.path.exists(path):
                broken.append(f"{page}: {target}")
                continue
            if anchor:
                headings = re.findall(r"^#+ (.+)$", open(path, encoding="utf-8").read(), re.M)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{page}: {target} (no such heading)")
    assert not broken, broken
    assert "docs/DEVELOPMENT.md" in readme and "docs/ALGORITHM.md" in readme  # the map to the rest


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    (command,) = re.findall(r"^pip install torch==\S+ && pip install -r requirements-dev.txt && (.+)$", readme, re.M)
    ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read()
    assert re.search(rf"^{re.escape(command)}$", ci, re.M), command


def test_smoke_names_are_read_only_where_the_config_is_parsed():
    """The smoke preset's ``smoke:`` names end in `parse_config`: no other module of the package reads them."""
    readers = [m for m, p in _modules().items() if "smolppo.smoke" in _imports(p)]
    assert readers == ["smolppo.cli"], readers


def test_a_parsed_config_holds_no_smoke_name_and_a_wrong_one_is_one_line():
    import pytest

    from smolppo.cli import parse_config
    from smolppo.configs import EvalConfig, PPOConfig
    from smolppo.errors import UserError

    config = parse_config(PPOConfig, ["--preset", "smoke"], "train_ppo")
    assert not [v for v in vars(config).values() if isinstance(v, str) and v.startswith("smoke:")]
    assert os.path.isdir(config.policy_model) and os.path.isfile(config.dataset)
    evaluation = parse_config(EvalConfig, ["--model-path", "smoke:policy", "./other"])
    assert os.path.isdir(evaluation.model_path[0]) and evaluation.model_path[1] == "./other"
    with pytest.raises(UserError, match="unknown smoke name 'smoke:polcy'; the smoke preset has smoke:tokenizer"):
        parse_config(PPOConfig, ["--policy-model", "smoke:polcy"])


# ---------------------------------------------------------------------------------------------- who owns which state
def _ownership_table() -> dict[str, tuple[str, str]]:
    text = open(os.path.join(REPO, "docs", "DEVELOPMENT.md"), encoding="utf-8").read()
    section = text[text.index("## Who owns which state") :]
    section = section[: section.index("\n## ", 5)]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| `")]
    return {cells[0].strip().strip("`"): (cells[1].strip(), cells[2].strip()) for cells in rows}


def test_the_ownership_table_names_every_layer():
    table = _ownership_table()
    assert set(table) == {"configs", *LAYERS[1:]}
    assert all(os.path.isdir(os.path.join(PACKAGE, layer)) for layer in table)


def test_runs_never_touches_the_algorithm():
    """`runs/` owns directories: no name in it refers to the algorithm (it used to read 11 of its attributes); it
    may know the names of the files a checkpoint holds (upper-case constants from `smolppo.files`)."""
    touching = []
    for module, path in _modules().items():
        if _layer(module) != "runs":
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            names = {getattr(node, "id", None), getattr(node, "arg", None), getattr(node, "attr", None)}
            if any(name and "algorithm" in name.lower() and not name.isupper() for name in names):
                touching.append(f"{module}:{node.lineno}")
    assert not touching, touching


def test_the_algorithm_receives_its_settings_groups():
    import inspect

    from smolppo.algorithm.ppo import Algorithm
    from smolppo.configs.algorithm import AlgorithmSettings

    assert inspect.signature(Algorithm.__init__).parameters["config"].annotation == "AlgorithmSettings"
    groups = [f.type for f in dataclasses.fields(AlgorithmSettings) if f.type.endswith("Fields")]
    assert len(groups) >= 6  # estimator, KL, loss, sampling, optimizer, precision, rewards


def test_every_script_setting_belongs_to_one_frozen_group():
    from smolppo.configs import EvalConfig, PlotConfig, PPOConfig, RewardModelConfig

    for config in (PPOConfig, RewardModelConfig, EvalConfig, PlotConfig):
        owners: dict[str, list[str]] = {}
        for group in config.GROUPS:
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(group(), dataclasses.fields(group)[0].name, None)  # a part cannot write a setting back
            for f in dataclasses.fields(group):
                owners.setdefault(f.name, []).append(group.__name__)
        assert set(owners) == {f.name for f in dataclasses.fields(config)}, config  # nothing outside a group
        assert all(len(groups) == 1 for groups in owners.values()), {k: v for k, v in owners.items() if len(v) > 1}
