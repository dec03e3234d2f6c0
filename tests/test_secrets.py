"""What `${VAR}` expands to in the servers file (a token in a URL, a header, args, env) never surfaces.

Driven through the real stack (MCP client -> planner server -> SQLite file -> real downstream servers):
an HTTP server that connects and then dies, an HTTP URL on a closed port, and a stdio server that prints
its secret-bearing args and env to stderr and exits. The token must be in no tool result, no byte of the
database (and its WAL), and no log record; `${TOKEN}` shows where it was.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult, TextContent

from mcp_planner.downstream.config import ServersConfig, load_config
from mcp_planner.server.app import build_server, service_factory

pytestmark = pytest.mark.anyio

SERVERS = Path(__file__).parent / "servers"
READY = 30
TOKEN = "tok-7f3a9c2e51d4b8"
PRINTS_AND_EXITS = (
    "import os, sys; print('started with', sys.argv[1:], os.environ['API_KEY'], file=sys.stderr); sys.exit(3)"
)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def servers_file(tmp_path: Path, live_port: int) -> ServersConfig:
    path = tmp_path / "servers.json"
    entries = {
        "api": {
            "type": "http",
            "url": f"http://127.0.0.1:{live_port}/mcp?key=${{TOKEN}}",
            "headers": {"Authorization": "Bearer ${TOKEN}"},
            "callTimeout": 10,
            "timeout": 10,
        },
        "closed": {"type": "http", "url": f"http://127.0.0.1:{closed_port()}/mcp?key=${{TOKEN}}"},
        "broken": {
            "command": sys.executable,
            "args": ["-c", PRINTS_AND_EXITS, "--key=${TOKEN}"],
            "env": {"API_KEY": "${TOKEN}"},
        },
    }
    path.write_text(json.dumps({"mcpServers": entries}), encoding="utf-8")
    return load_config(path, env={"TOKEN": TOKEN})


def text(result: CallToolResult) -> str:
    parts = [block.text for block in result.content if isinstance(block, TextContent)]
    return "\n".join(parts) + json.dumps(result.structured_content)


def stored_bytes(tmp_path: Path) -> list[bytes]:
    """The database file and its -wal / -shm, as written."""
    return [p.read_bytes() for p in tmp_path.glob("plans.db*")]


async def call(client: Client, tool: str, arguments: dict[str, Any], seen: list[str]) -> CallToolResult:
    with anyio.fail_after(READY + 30):
        result = await client.call_tool(tool, arguments)
    seen.append(text(result))
    return result


async def test_an_expanded_token_is_in_no_result_database_byte_or_log_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    http = await anyio.open_process([sys.executable, str(SERVERS / "http_server.py")])
    try:
        assert http.stdout is not None
        with anyio.fail_after(READY):
            line = b""
            while not line.endswith(b"\n"):
                line += await http.stdout.receive(1)
        config = servers_file(tmp_path, int(line))
        db = tmp_path / "plans.db"
        seen: list[str] = []
        factory = service_factory(db, config.source, {"TOKEN": TOKEN}, runners=False)
        server = build_server(service_factory=factory)
        async with Client(server) as client:
            await call(client, "list_tools", {}, seen)
            assert "?key=${TOKEN}" in seen[-1]  # the closed port's error names the URL, redacted
            assert "--key=${TOKEN}" in seen[-1]  # the stdio server's stderr, redacted

            # The retry restarts the dead server, whose start-up error names the URL.
            step = {
                "id": "s",
                "tool_name": "api.echo",
                "parameters": {"text": "hi"},
                "max_retries": 2,
                "retry_delay_ms": 0,
            }
            plan = {"description": "echo once", "steps": [step], "options": {"require_approval": False}}
            created = await call(client, "create_plan", plan, seen)
            assert created.structured_content is not None, seen[-1]
            plan_id = created.structured_content["id"]

            http.terminate()
            with anyio.fail_after(10):
                await http.wait()
            await call(client, "execute_plan", {"plan_id": plan_id}, seen)
            shown = await call(client, "get_plan", {"plan_id": plan_id}, seen)
            assert shown.structured_content is not None
            [failed] = shown.structured_content["steps"]
            assert failed["status"] == "failed"
            assert "?key=${TOKEN}" in failed["error"]

            closed_step = {"tool_name": "closed.echo", "parameters": {}}
            await call(client, "create_plan", {"description": "x", "steps": [closed_step]}, seen)
            assert "${TOKEN}" in seen[-1]  # the validation problem names the unreachable server's URL
    finally:
        if http.returncode is None:
            http.kill()
        with anyio.fail_after(10):
            await http.aclose()

    for shown in seen:
        assert TOKEN not in shown
    stored = b"".join(stored_bytes(tmp_path))
    assert b"echo once" in stored
    assert TOKEN.encode() not in stored
    assert TOKEN not in caplog.text
    assert [r.getMessage() for r in caplog.records if TOKEN in r.getMessage()] == []
    assert "${TOKEN}" in caplog.text  # the failures were logged, redacted


def test_a_config_repr_shows_the_variables_not_their_values(tmp_path: Path) -> None:
    config = servers_file(tmp_path, closed_port())
    for shown in (repr(config), str(config), repr(config.servers["api"]), str(config.servers["broken"])):
        assert TOKEN not in shown
        assert "${TOKEN}" in shown
    assert config.servers["api"].url is not None and TOKEN in config.servers["api"].url


def test_defaults_and_short_values_are_not_redacted() -> None:
    raw = {"mcpServers": {"a": {"url": "http://h/${PATH_PART}/${MODE:-default-mode}?k=${KEY}"}}}
    config = ServersConfig.from_dict(raw, {"PATH_PART": "v1", "KEY": "a/b c"})
    assert config.redact("http://h/v1/default-mode?k=a/b c") == "http://h/v1/default-mode?k=${KEY}"
    assert config.redact("k=a%2Fb%20c") == "k=${KEY}"
