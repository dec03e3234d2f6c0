"""The launch path agents use: `mcp-planner serve` as a stdio subprocess with a real downstream server,
asked for a plan through MCP sampling over JSON-RPC, then running that plan."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import mcp_types as types
import pytest
from conftest import RUNNER_IDLE_EXIT
from mcp import Client, StdioServerParameters
from mcp.client.session import ClientRequestContext

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SERVERS = Path(__file__).parent / "servers"

PLAN = {
    "description": "Echo a word, then reuse it",
    "steps": [
        {"id": "first", "tool_name": "echo_structured", "parameters": {"text": "hello", "number": 2}},
        {
            "id": "second",
            "tool_name": "basic.echo",
            "parameters": {"text": "{{ steps.first.result.text }} world"},
            "depends_on": ["first"],
        },
    ],
}


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_generate_plan_over_stdio_samples_the_client_and_the_plan_runs(
    mode: str, tmp_path: Path
) -> None:
    config = {"mcpServers": {"basic": {"command": sys.executable, "args": [str(SERVERS / "basic.py")]}}}
    (tmp_path / "servers.json").write_text(json.dumps(config))
    prompts: list[str] = []

    async def sampling(
        context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        content = params.messages[-1].content
        assert isinstance(content, types.TextContent)
        prompts.append(content.text)
        answer = types.TextContent(type="text", text=f"Plan:\n```json\n{json.dumps(PLAN)}\n```")
        return types.CreateMessageResult(role="assistant", content=answer, model="scripted")

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_planner", "serve", "--servers", str(tmp_path / "servers.json")],
        env={"MCP_PLANNER_DB": str(tmp_path / "plans.db"), "PATH": "/usr/bin:/bin", **RUNNER_IDLE_EXIT},
        cwd=str(tmp_path),
    )
    with anyio.fail_after(50):
        async with Client(params, sampling_callback=sampling, mode=mode) as client:
            result = await client.call_tool(
                "generate_plan", {"task": "say hello world", "options": {"require_approval": False}}
            )
            assert not result.is_error, result.content
            assert result.structured_content is not None
            plan_id = result.structured_content["id"]
            steps = result.structured_content["steps"]
            assert [s["tool_name"] for s in steps] == ["basic.echo_structured", "basic.echo"]
            run = await client.call_tool("execute_plan", {"plan_id": plan_id})
            assert not run.is_error, run.content
            assert run.structured_content is not None
            assert run.structured_content["status"] == "completed"
    assert len(prompts) == 1
    assert "## basic.echo_structured" in prompts[0]
    assert "- text* (string)" in prompts[0]
