"""`mcp-planner serve` as a real process: however it is stopped, downstream process trees go with it.

The downstream server ignores SIGTERM and has a child that ignores it too; both run in the server's own
process group. Closing the planner's stdin (a client that went away), SIGTERM and SIGINT (Ctrl-C) must each
end the planner and leave neither process alive.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.abc
import pytest

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SERVERS = Path(__file__).parent / "servers"
READY = 30  # seconds for the planner and the downstream server to start on a busy machine
GONE = 5  # seconds the downstream tree may take to disappear (the planner aims for well under 2)
POLL = 0.05


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for a reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def poll_until(condition: Callable[[], bool]) -> None:
    """Poll; the caller bounds the wait. Another process's birth or death has no event to wait on."""
    while not condition():  # noqa: ASYNC110
        await anyio.sleep(POLL)


async def close_stdin(process: anyio.abc.Process) -> None:
    assert process.stdin is not None
    await process.stdin.aclose()


async def send_sigterm(process: anyio.abc.Process) -> None:
    process.send_signal(signal.SIGTERM)


async def send_sigint(process: anyio.abc.Process) -> None:
    process.send_signal(signal.SIGINT)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize(
    "stop", [close_stdin, send_sigterm, send_sigint], ids=["stdin-closed", "sigterm", "sigint"]
)
async def test_stopping_serve_ends_the_downstream_server_and_its_child_even_if_they_ignore_sigterm(
    tmp_path: Path, stop: Callable[[anyio.abc.Process], object]
) -> None:
    pids_file = tmp_path / "pids"
    servers = tmp_path / "servers.json"
    entry = {
        "command": sys.executable,
        "args": [str(SERVERS / "stubborn.py")],
        "env": {"PIDS_FILE": str(pids_file)},
    }
    servers.write_text(json.dumps({"mcpServers": {"stubborn": entry}}), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_PLANNER_")}
    env["MCP_PLANNER_RUNNER_IDLE_EXIT"] = "3"  # runners started by these tests do not linger
    command = [
        sys.executable,
        "-m",
        "mcp_planner",
        "serve",
        "--servers",
        str(servers),
        "--db",
        str(tmp_path / "p.db"),
    ]
    with (tmp_path / "stderr").open("wb") as stderr:
        planner = await anyio.open_process(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    pids: list[int] = []
    try:
        with anyio.fail_after(READY):
            await poll_until(pids_file.exists)
        pids = [int(pid) for pid in pids_file.read_text().split()]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)

        await stop(planner)  # type: ignore[misc]
        with anyio.fail_after(GONE):
            await poll_until(lambda: not any(alive(pid) for pid in pids))
        with anyio.fail_after(GONE):
            code = await planner.wait()
        assert code == 0, (tmp_path / "stderr").read_text()
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if planner.returncode is None:
            planner.kill()
        with anyio.fail_after(10):
            await planner.aclose()
