"""Signals: SIGINT (Ctrl-C), SIGTERM and Ctrl-Break on Windows, handled by one handler.

Before training nothing needs saving, so the first signal stops at once (`Interrupted`, exit 128 + its number).
While a job is running, the first signal asks it to stop at its next safe point and the second stops at once.
"""

from __future__ import annotations

import logging
import signal

logger = logging.getLogger(__name__)


def termination_signals() -> list:
    """SIGTERM everywhere, and Ctrl-Break (SIGBREAK) on Windows: both are handled like SIGTERM."""
    return [signal.SIGTERM] + ([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])


def signal_exit_code(name: str | None) -> int:
    """The exit status shells and schedulers expect after a signal: 128 + its number (SIGINT 130, SIGTERM 143)."""
    try:
        return 128 + signal.Signals[name].value
    except (KeyError, TypeError):
        return 128 + signal.SIGINT.value


class Interrupted(KeyboardInterrupt):
    """Stopped at once by a signal; `run_main` exits with `exit_code`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + int(signum)


class GracefulStop:
    """While installed, SIGINT / SIGTERM (Ctrl-Break on Windows) asks the job to stop at its next safe point
    (`signal_name` is then set and `message` logged); a second signal stops at once (`Interrupted`). With
    ``message=None`` the first signal already stops at once."""

    def __init__(self, message: str | None, signals: list | None = None):
        self.message = message
        self.signals = signals if signals is not None else [signal.SIGINT, *termination_signals()]
        self.signal_name: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.signal_name or self.message is None:
            raise Interrupted(signum)
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: %s (again to stop now)", self.signal_name, self.message)

    def install(self) -> GracefulStop:
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except (ValueError, OSError):  # not the main thread, or not settable here
                pass
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> GracefulStop:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def stop_at_once_on_termination() -> None:
    """Before training starts nothing needs saving: SIGTERM stops like Ctrl-C (one line, exit 143)."""
    GracefulStop(None, termination_signals()).install()
