"""The planner's MCP server end to end through an in-process `mcp.Client`, on a real SQLite store.

In-process tools (`LocalTools`) keep these fast; `test_server_stdio.py` drives `mcp-planner serve` as a
subprocess with real downstream servers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp_types import CallToolResult, ElicitRequestParams, ElicitResult, TextContent

from mcp_planner.service import PlannerService
from mcp_planner.server import build_server
from mcp_planner.store import PlanStore
from mcp_planner.tools import LocalTools

pytestmark = pytest.mark.anyio


class Gate:
    """An in-process tool that blocks until released, to hold a plan in `executing`."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.release = anyio.Event()

    async def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        self.entered.set()
        await self.release.wait()
        return {"released": True}


async def echo(params: dict[str, Any]) -> dict[str, Any]:
    return dict(params)


async def boom(params: dict[str, Any]) -> str:
    raise RuntimeError(params.get("message", "boom"))


def make_tools(gate: Gate | None = None) -> LocalTools:
    tools: dict[str, Callable[[dict[str, Any]], Any]] = {"echo": echo, "boom": boom}
    if gate is not None:
        tools["wait"] = gate
    return LocalTools(tools)


@asynccontextmanager
async def planner(
    tmp_path: Path, *, approval: str = "agent", tools: LocalTools | None = None, **client_kwargs: Any
) -> AsyncIterator[tuple[Client, PlannerService]]:
    async with PlanStore.open(tmp_path / "plans.db") as store:
        async with PlannerService(store, tools or make_tools(), approval=approval) as service:
            async with Client(build_server(service), **client_kwargs) as client:
                yield client, service


def text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def two_step_plan(**options: Any) -> dict[str, Any]:
    return {
        "description": "say hello then world",
        "steps": [
            {"id": "hello", "tool_name": "echo", "parameters": {"text": "hello"}},
            {"id": "world", "tool_name": "echo", "parameters": {"text": "{{ steps.hello.result.text }} world"}},
        ],
        "options": options,
    }


async def create(client: Client, plan: dict[str, Any]) -> str:
    result = await client.call_tool("create_plan", plan)
    assert not result.is_error, text(result)
    assert result.structured_content is not None
    return str(result.structured_content["id"])


async def test_create_approve_execute_returns_completed_summary(tmp_path: Path) -> None:
    async with planner(tmp_path) as (client, _):
        plan_id = await create(client, two_step_plan())
        approved = await client.call_tool("approve_plan", {"plan_id": plan_id})
        assert not approved.is_error, text(approved)
        assert approved.structured_content is not None
        assert approved.structured_content["status"] == "approved"
        result = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert not result.is_error, text(result)
        assert result.structured_content is not None
        assert result.structured_content["status"] == "completed"
        assert result.structured_content["completed"] == 2
        plan = await client.call_tool("get_plan", {"plan_id": plan_id})
        assert plan.structured_content is not None
        world = plan.structured_content["steps"][1]
        assert world["result"]["structured"] == {"text": "hello world"}
        assert "flowchart TD" in plan.structured_content["mermaid"]
