"""Shared bits of the test servers: quiet logging and a pid record for the no-leftover-children tests."""

from __future__ import annotations

import logging
import os
from pathlib import Path


def startup() -> None:
    """Record this process's pid in `$PID_DIR` (if set) and keep the server's logging quiet."""
    logging.getLogger().setLevel(logging.WARNING)
    pid_dir = os.environ.get("PID_DIR")
    if pid_dir:
        Path(pid_dir, f"{os.getpid()}.pid").write_text(str(os.getpid()))
