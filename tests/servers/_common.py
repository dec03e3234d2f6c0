"""Shared bits of the test servers: quiet logging, a pid record, and an optional start-up rendezvous."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path


def startup() -> None:
    """Run before serving.

    `$PID_DIR`: record this process's pid there (the no-leftover-children test reads it).
    `$RENDEZVOUS_DIR` + `$RENDEZVOUS_COUNT`: wait until that many servers have reached this point, so
    servers started one after the other (not concurrently) never get past it and time out.
    """
    logging.getLogger().setLevel(logging.WARNING)
    pid_dir = os.environ.get("PID_DIR")
    if pid_dir:
        Path(pid_dir, f"{os.getpid()}.pid").write_text(str(os.getpid()))
    rendezvous = os.environ.get("RENDEZVOUS_DIR")
    if rendezvous:
        Path(rendezvous, f"{os.getpid()}.here").write_text("")
        count = int(os.environ.get("RENDEZVOUS_COUNT", "2"))
        deadline = time.monotonic() + 15
        while len(list(Path(rendezvous).glob("*.here"))) < count:
            if time.monotonic() > deadline:
                print("fatal: the other servers never started", file=sys.stderr, flush=True)
                sys.exit(4)
            time.sleep(0.02)
