"""`plot_training_progress.py`'s configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from smolppo.configs.parts import DebugFields, FieldGroup, ScriptConfig, _help


@dataclass(frozen=True)
class PlotFields(FieldGroup):
    _argument_group_name = "plotting"

    log_dir: list[str] = field(
        default_factory=lambda: ["./ppo_training_output/logs"],
        metadata=_help("TensorBoard log dir(s) or a directory of runs; several are overlaid."),
    )
    output: Optional[str] = field(
        default=None, metadata=_help("PNG path; default: training_progress.png beside the first log dir.")
    )
    csv: Optional[str] = field(
        default=None, metadata=_help("CSV path for every scalar; default: training_scalars.csv beside the PNG.")
    )
    smooth: float = field(default=0.0, metadata=_help("Exponential smoothing weight in [0, 1); 0 plots raw values."))
    title: Optional[str] = field(
        default=None,
        metadata=_help("Figure title; default: the runs' algorithms, e.g. 'GRPO training progress'."),
    )

    def check(self) -> None:
        if not 0.0 <= self.smooth < 1.0:
            raise ValueError(f"smooth must be in [0, 1), got {self.smooth}")
        if not self.log_dir:
            raise ValueError("log_dir needs at least one directory")


@dataclass(frozen=True)
class PlotConfig(PlotFields, DebugFields, ScriptConfig):
    """Everything `plot_training_progress.py` needs."""

    GROUPS: ClassVar[tuple[type, ...]] = (PlotFields, DebugFields)
