"""Lines a client sends over stdio that are not valid JSON-RPC get JSON-RPC errors (never silence), and
the server keeps answering afterwards. Raw lines to a real `mcp-planner serve` subprocess."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import mcp_types
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from pydantic import ValidationError

from mcp_planner.server.stdio import unreadable

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


def deep_line(message: dict[str, Any], depth: int) -> str:
    """`message` with `"DEEP"` replaced by an object `depth` levels deep (json.dumps would recurse)."""
    return json.dumps(message).replace('"DEEP"', '{"a":' * depth + "1" + "}" * depth)


class Wire:
    def __init__(self, process: Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._stdin = process.stdin
        self._stdout = BufferedByteReceiveStream(process.stdout)

    async def send(self, line: str | dict[str, Any]) -> None:
        text = line if isinstance(line, str) else json.dumps(line)
        await self._stdin.send(text.encode() + b"\n")

    async def receive(self) -> dict[str, Any]:
        with anyio.fail_after(20):
            line = await self._stdout.receive_until(b"\n", 10_000_000)
        message: dict[str, Any] = json.loads(line)
        return message

    async def ping(self, request_id: int) -> dict[str, Any]:
        await self.send({"jsonrpc": "2.0", "id": request_id, "method": "ping"})
        return await self.receive()


@asynccontextmanager
async def stdio_server(tmp_path: Path) -> AsyncIterator[Wire]:
    env = {k: v for k, v in os.environ.items() if k != "MCP_PLANNER_SERVERS"}
    process = await anyio.open_process(
        [sys.executable, "-m", "mcp_planner", "serve", "--db", str(tmp_path / "plans.db")],
        env=env,
        cwd=str(tmp_path),
        stderr=None,
    )
    try:
        wire = Wire(process)
        await wire.send(
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "1"},
                },
            }
        )
        assert "result" in await wire.receive()
        await wire.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        yield wire
    finally:
        assert process.stdin is not None
        await process.stdin.aclose()
        with anyio.fail_after(20):
            await process.wait()
        await process.aclose()


async def test_a_line_that_is_not_json_gets_a_parse_error_with_a_null_id(tmp_path: Path) -> None:
    async with stdio_server(tmp_path) as wire:
        await wire.send("this is not json")
        error = await wire.receive()
        after = await wire.ping(2)
    assert error["id"] is None
    assert error["error"]["code"] == mcp_types.PARSE_ERROR
    assert after == {"jsonrpc": "2.0", "id": 2, "result": {}}


async def test_a_request_of_the_wrong_shape_gets_an_invalid_request_error_with_its_id(tmp_path: Path) -> None:
    async with stdio_server(tmp_path) as wire:
        await wire.send({"jsonrpc": "2.0", "id": 7, "method": 42})
        with_id = await wire.receive()
        await wire.send("[1, 2, 3]")
        batch = await wire.receive()
        after = await wire.ping(8)
    assert with_id["id"] == 7 and with_id["error"]["code"] == mcp_types.INVALID_REQUEST
    assert '"method"' in with_id["error"]["message"]
    assert batch["id"] is None and batch["error"]["code"] == mcp_types.INVALID_REQUEST
    assert after["id"] == 8 and "result" in after


async def test_a_tool_call_nested_too_deep_gets_an_error_with_its_id_and_the_server_goes_on(
    tmp_path: Path,
) -> None:
    call = {
        "jsonrpc": "2.0",
        "id": 11,
        "method": "tools/call",
        "params": {
            "name": "create_plan",
            "arguments": {"description": "d", "steps": [{"id": "s", "tool_name": "t", "parameters": "DEEP"}]},
        },
    }
    async with stdio_server(tmp_path) as wire:
        await wire.send(deep_line(call, 300))
        refused = await wire.receive()
        # A notification is never answered, even when unreadable: the next line is the ping's answer.
        await wire.send(
            deep_line({"jsonrpc": "2.0", "method": "notifications/progress", "params": "DEEP"}, 300)
        )
        after = await wire.ping(12)
    assert refused["id"] == 11
    assert refused["error"]["code"] == mcp_types.INVALID_PARAMS
    assert "flatten" in refused["error"]["message"]
    assert after["id"] == 12 and "result" in after


def test_an_unreadable_response_fails_the_servers_own_request_instead_of_answering_the_client() -> None:
    line = deep_line({"jsonrpc": "2.0", "id": 3, "result": {"content": "DEEP"}}, 300)
    with pytest.raises(ValidationError) as parsed:
        mcp_types.jsonrpc_message_adapter.validate_json(line, by_name=False)
    answer = unreadable(parsed.value)
    assert answer.to_client is False
    assert answer.error is not None and answer.error.id == 3
    assert "nested too deeply" in answer.error.error.message
