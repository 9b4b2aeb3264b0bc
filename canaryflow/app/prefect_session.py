"""Running flows from a terminal: Prefect pointed at the stack, its chatter in a log file.

Prefect prints a line for every task run; over a release that is hundreds of lines that bury the
story. While a session is open, everything Prefect would print goes to `log_file` instead, and
the terminal shows only the lines a flow marks as progress (`tasks.common.say`) and errors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

PROGRESS_MARK = "canaryflow_progress"


class _ProgressOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return bool(getattr(record, PROGRESS_MARK, False)) or record.levelno >= logging.ERROR


class _ToCallback(logging.Handler):
    def __init__(self, show: Callable[[str], None]) -> None:
        super().__init__()
        self.show = show

    def emit(self, record: logging.LogRecord) -> None:
        self.show(record.getMessage())


@contextlib.contextmanager
def prefect_session(
    api_url: str | None, log_file: Path, show: Callable[[str], None]
) -> Iterator[None]:
    """Flows started inside talk to `api_url`; Prefect's console lines go to `log_file`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    consoles = [h for h in root.handlers if type(h).__name__ == "PrefectConsoleHandler"]
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(
        consoles[0].formatter if consoles else logging.Formatter("%(asctime)s %(message)s")
    )
    to_terminal = _ToCallback(show)
    to_terminal.addFilter(_ProgressOnly())
    for handler in consoles:
        root.removeHandler(handler)
    root.addHandler(to_file)
    root.addHandler(to_terminal)
    updates = {PREFECT_API_URL: api_url} if api_url else {}
    try:
        with temporary_settings(updates=updates):
            yield
    finally:
        root.removeHandler(to_terminal)
        root.removeHandler(to_file)
        to_file.close()
        for handler in consoles:
            root.addHandler(handler)
