"""`mcp-planner serve --transport http` as a real subprocess: who it lets in (Host/Origin checks and the
bearer token), and that it refuses to start on a public address without them."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx2
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

BASIC_SERVER = Path(__file__).resolve().parent / "servers" / "basic.py"
TOKEN = "s3cret-token-for-tests"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
JSON_HEADERS = {"Accept": "application/json, text/event-stream"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def command(tmp_path: Path, *extra: str) -> list[str]:
    db = str(tmp_path / "plans.db")
    return [sys.executable, "-m", "mcp_planner", "serve", "--transport", "http", "--db", db, *extra]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MCP_PLANNER_AUTH_TOKEN", "MCP_PLANNER_SERVERS")}
    return {**env, **extra}


@asynccontextmanager
async def http_server(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> AsyncIterator[int]:
    """Starts the server and yields its port once uvicorn says it listens."""
    port = free_port()
    process = await anyio.open_process(
        command(tmp_path, "--port", str(port), *extra), env=env or environment(), cwd=str(tmp_path)
    )
    try:
        await _wait_until_listening(process)
        yield port
    finally:
        process.terminate()
        with anyio.fail_after(10):
            await process.wait()
        await process.aclose()


async def _wait_until_listening(process: Process) -> None:
    assert process.stderr is not None
    seen = ""
    with anyio.fail_after(30):
        async for chunk in TextReceiveStream(process.stderr):
            seen += chunk
            if "Uvicorn running on" in seen:
                return
    raise AssertionError(f"the server exited before listening:\n{seen}")


async def post(port: int, headers: dict[str, str]) -> httpx2.Response:
    with anyio.fail_after(10):
        async with httpx2.AsyncClient() as http:
            return await http.post(
                f"http://127.0.0.1:{port}/mcp", json=INITIALIZE, headers={**JSON_HEADERS, **headers}
            )


async def test_loopback_server_refuses_a_foreign_host_or_origin_and_serves_a_local_client(
    tmp_path: Path,
) -> None:
    async with http_server(tmp_path) as port:
        rebound = await post(port, {"Host": f"attacker.example:{port}"})
        foreign_page = await post(port, {"Origin": "http://attacker.example"})
        own_page = await post(port, {"Origin": f"http://localhost:{port}"})
        with anyio.fail_after(20):
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
                tools = await client.list_tools()
    assert rebound.status_code == 421
    assert foreign_page.status_code == 403
    assert own_page.status_code == 200
    assert "create_plan" in {tool.name for tool in tools.tools}


async def test_loopback_server_given_a_token_requires_it(tmp_path: Path) -> None:
    async with http_server(tmp_path, "--auth-token", TOKEN) as port:
        anonymous = await post(port, {})
        authorized = await post(port, {"Authorization": f"Bearer {TOKEN}"})
    assert anonymous.status_code == 401
    assert authorized.status_code == 200


@pytest.mark.parametrize(
    ("extra", "env", "missing"),
    [
        ((), {}, "auth token (--auth-token or MCP_PLANNER_AUTH_TOKEN) and --allowed-host"),
        (("--allowed-host", "planner.test"), {}, "auth token"),
        (("--auth-token", TOKEN), {}, "--allowed-host"),
        ((), {"MCP_PLANNER_AUTH_TOKEN": TOKEN}, "--allowed-host"),
    ],
)
async def test_public_address_without_token_and_allowed_hosts_refuses_to_start(
    tmp_path: Path, extra: tuple[str, ...], env: dict[str, str], missing: str
) -> None:
    with anyio.fail_after(30):
        done = await anyio.run_process(
            command(tmp_path, "--host", "0.0.0.0", "--port", str(free_port()), *extra),
            env=environment(**env),
            check=False,
        )
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "refusing to serve HTTP on '0.0.0.0' without" in stderr and missing in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


async def test_public_address_requires_the_token_and_an_allowed_host_on_every_request(tmp_path: Path) -> None:
    servers = tmp_path / "servers.json"
    servers.write_text(
        json.dumps({"mcpServers": {"basic": {"command": sys.executable, "args": [str(BASIC_SERVER)]}}})
    )
    extra = ("--host", "0.0.0.0", "--allowed-host", "planner.test", "--servers", str(servers))
    async with http_server(tmp_path, *extra, env=environment(MCP_PLANNER_AUTH_TOKEN=TOKEN)) as port:
        host = {"Host": f"planner.test:{port}"}
        anonymous = await post(port, host)
        wrong = await post(port, {**host, "Authorization": "Bearer not-the-token"})
        unlisted_host = await post(port, {"Authorization": f"Bearer {TOKEN}"})
        http = httpx2.AsyncClient(headers={**host, "Authorization": f"Bearer {TOKEN}"}, timeout=20)
        with anyio.fail_after(20):
            async with (
                http,
                Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)) as client,
            ):
                tools = await client.list_tools()
                step = {"id": "hi", "tool_name": "basic.echo", "parameters": {"text": "hi"}}
                created = await client.call_tool("create_plan", {"description": "say hi", "steps": [step]})
    assert anonymous.status_code == 401 and wrong.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert anonymous.json()["error"] == "invalid_token"
    assert unlisted_host.status_code == 421
    assert "create_plan" in {tool.name for tool in tools.tools}
    assert created.structured_content is not None, created
    assert not created.is_error and created.structured_content["id"], created
