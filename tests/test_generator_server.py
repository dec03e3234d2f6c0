"""`generate_plan` and the `plan_task` prompt of the planner's own MCP server, through a real `mcp.Client`
with scripted sampling callbacks, on a real SQLite store, on both protocol eras (see
`test_generator_sampling.py` for what the eras change)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext

from mcp_planner.engine.builtins import with_builtins
from mcp_planner.engine.tools import ToolInfo
from mcp_planner.errors import ToolNotFoundError
from mcp_planner.generation.generator import render_planning_prompt
from mcp_planner.generation.sampling import NO_SAMPLING_MESSAGE
from mcp_planner.plan.model import StepResult
from mcp_planner.server.app import build_server
from mcp_planner.service import PlannerService
from mcp_planner.store.sqlite import PlanStore

pytestmark = pytest.mark.anyio

MODES = ["legacy", "2026-07-28"]


class NotesTools:
    """Two in-process tools with real input schemas, so validation checks parameters as downstream ones."""

    def __init__(self) -> None:
        self.notes: dict[str, str] = {}
        self._catalog = {
            "notes.read": ToolInfo(
                name="notes.read",
                description="Read a note.",
                input_schema={
                    "type": "object",
                    "properties": {"name": {"type": "string", "description": "the note's name"}},
                    "required": ["name"],
                    "additionalProperties": False,
                },
                annotations={"readOnlyHint": True},
                server="notes",
            ),
            "notes.write": ToolInfo(
                name="notes.write",
                description="Write a note.",
                input_schema={
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "text": {"type": "string"}},
                    "required": ["name", "text"],
                    "additionalProperties": False,
                },
                server="notes",
            ),
        }

    def catalog(self) -> Mapping[str, ToolInfo]:
        return self._catalog

    async def call(self, tool_name: str, parameters: dict[str, Any]) -> StepResult:
        if tool_name == "notes.read":
            return StepResult.from_value(self.notes.get(parameters["name"], ""))
        if tool_name == "notes.write":
            self.notes[parameters["name"]] = parameters["text"]
            return StepResult.from_value({"written": parameters["name"]})
        raise ToolNotFoundError(f"no tool named {tool_name!r}")


GOOD = {
    "description": "Copy the todo note to a backup",
    "steps": [
        {"id": "read", "tool_name": "read", "parameters": {"name": "todo"}, "max_retries": 1},
        {
            "id": "backup",
            "tool_name": "notes.write",
            "parameters": {"name": "todo.bak", "text": "{{ steps.read.text }}"},
            "depends_on": ["read"],
        },
    ],
}

# An unknown tool, a cycle (a -> b -> a) and a missing required parameter (`text` of b).
BROKEN = {
    "description": "Broken copy",
    "steps": [
        {"id": "a", "tool_name": "notes.raed", "parameters": {"name": "todo"}, "depends_on": ["b"]},
        {"id": "b", "tool_name": "notes.write", "parameters": {"name": "x"}, "depends_on": ["a"]},
    ],
}


class ScriptedSampling:
    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.requests: list[types.CreateMessageRequestParams] = []

    async def __call__(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        self.requests.append(params)
        content = types.TextContent(type="text", text=self.answers.pop(0))
        return types.CreateMessageResult(role="assistant", content=content, model="scripted")

    def last_message(self, index: int) -> str:
        content = self.requests[index].messages[-1].content
        assert isinstance(content, types.TextContent)
        return content.text


@asynccontextmanager
async def planner(tmp_path: Path, tools: NotesTools, **client_kwargs: Any) -> AsyncIterator[Client]:
    async with PlanStore.open(tmp_path / "plans.db") as store:
        async with PlannerService(store, tools, approval="agent") as service:
            async with Client(build_server(service), **client_kwargs) as client:
                yield client


def _text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def _plan_ids(client: Client) -> list[str]:
    result = await client.call_tool("list_plans", {})
    assert not result.is_error, _text(result)
    assert result.structured_content is not None
    return [p["id"] for p in result.structured_content["plans"]]


@pytest.mark.parametrize("mode", MODES)
async def test_generated_plan_is_stored_and_runs_after_approval(mode: str, tmp_path: Path) -> None:
    tools = NotesTools()
    tools.notes["todo"] = "buy milk"
    sampling = ScriptedSampling(json.dumps(GOOD))
    async with planner(tmp_path, tools, sampling_callback=sampling, mode=mode) as client:
        result = await client.call_tool("generate_plan", {"task": "back up my todo note"})
        assert not result.is_error, _text(result)
        assert result.structured_content is not None
        plan_id = result.structured_content["id"]
        assert result.structured_content["status"] == "pending_approval"
        assert [s["tool_name"] for s in result.structured_content["steps"]] == ["notes.read", "notes.write"]
        assert await _plan_ids(client) == [plan_id]

        approved = await client.call_tool("approve_plan", {"plan_id": plan_id})
        assert not approved.is_error, _text(approved)
        run = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert not run.is_error, _text(run)
        assert run.structured_content is not None and run.structured_content["status"] == "completed"
    assert tools.notes["todo.bak"] == "buy milk"
    assert "- name* (string): the note's name" in sampling.last_message(0)


@pytest.mark.parametrize("mode", MODES)
async def test_generate_plan_repairs_unknown_tool_cycle_and_missing_parameter(
    mode: str, tmp_path: Path
) -> None:
    sampling = ScriptedSampling(json.dumps(BROKEN), json.dumps(GOOD))
    async with planner(tmp_path, NotesTools(), sampling_callback=sampling, mode=mode) as client:
        result = await client.call_tool("generate_plan", {"task": "back up my todo note"})
        assert not result.is_error, _text(result)
        assert len(await _plan_ids(client)) == 1
    assert len(sampling.requests) == 2
    repair = sampling.last_message(1)
    assert "step 'a', tool_name: unknown tool 'notes.raed'; did you mean 'notes.read'" in repair
    assert "dependency cycle: a -> b -> a" in repair
    assert "step 'b', parameters: 'text' is a required property" in repair


@pytest.mark.parametrize("mode", MODES)
async def test_generate_plan_that_never_validates_stores_nothing(mode: str, tmp_path: Path) -> None:
    sampling = ScriptedSampling(*[json.dumps(BROKEN)] * 4)
    async with planner(tmp_path, NotesTools(), sampling_callback=sampling, mode=mode) as client:
        result = await client.call_tool("generate_plan", {"task": "back up my todo note"})
        assert result.is_error
        message = _text(result)
        assert "did not produce a valid plan in 4 attempts (the first answer and 3 repairs)" in message
        assert "unknown tool 'notes.raed'" in message and "dependency cycle" in message
        assert "'text' is a required property" in message
        assert "Traceback" not in message
        assert await _plan_ids(client) == []
    assert len(sampling.requests) == 4


@pytest.mark.parametrize("mode", MODES)
async def test_generate_plan_accepts_prose_wrapped_json(mode: str, tmp_path: Path) -> None:
    sampling = ScriptedSampling(f"Here is the plan you asked for:\n{json.dumps(GOOD, indent=1)}\nCheers!")
    async with planner(tmp_path, NotesTools(), sampling_callback=sampling, mode=mode) as client:
        result = await client.call_tool("generate_plan", {"task": "back up my todo note"})
        assert not result.is_error, _text(result)
        assert len(await _plan_ids(client)) == 1


@pytest.mark.parametrize("mode", MODES)
async def test_generate_plan_without_sampling_points_to_plan_task_and_create_plan(
    mode: str, tmp_path: Path
) -> None:
    async with planner(tmp_path, NotesTools(), mode=mode) as client:
        result = await client.call_tool("generate_plan", {"task": "back up my todo note"})
        assert result.is_error
        assert NO_SAMPLING_MESSAGE in _text(result)
        assert await _plan_ids(client) == []


@pytest.mark.parametrize("mode", MODES)
async def test_generate_plan_applies_requested_options(mode: str, tmp_path: Path) -> None:
    sampling = ScriptedSampling(json.dumps(GOOD))
    async with planner(tmp_path, NotesTools(), sampling_callback=sampling, mode=mode) as client:
        args = {
            "task": "back up my todo note",
            "options": {"require_approval": False, "stop_on_error": False},
        }
        result = await client.call_tool("generate_plan", args)
        assert not result.is_error, _text(result)
        assert result.structured_content is not None
        assert result.structured_content["status"] == "approved"
        assert result.structured_content["options"]["stop_on_error"] is False


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("constraints", "expected"),
    [
        (["never overwrite", "read first"], "- never overwrite\n- read first\n"),
        ("never overwrite", "- never overwrite\n"),
    ],
    ids=["list", "string"],
)
async def test_generate_plan_takes_constraints_as_a_list_or_one_string(
    mode: str, constraints: list[str] | str, expected: str, tmp_path: Path
) -> None:
    sampling = ScriptedSampling(json.dumps(GOOD))
    async with planner(tmp_path, NotesTools(), sampling_callback=sampling, mode=mode) as client:
        args = {"task": "back up my todo note", "constraints": constraints}
        result = await client.call_tool("generate_plan", args)
        assert not result.is_error, _text(result)
    assert "# Constraints\n" + expected + "\n# Tools" in sampling.last_message(0)


@pytest.mark.parametrize("mode", MODES)
async def test_plan_task_prompt_renders_the_same_planning_prompt(mode: str, tmp_path: Path) -> None:
    tools = NotesTools()
    async with planner(tmp_path, tools, mode=mode) as client:
        result = await client.get_prompt("plan_task", {"task": "back up my todo note", "context": "daily"})
    texts = [m.content.text for m in result.messages if isinstance(m.content, types.TextContent)]
    expected = render_planning_prompt(with_builtins(tools).catalog(), "back up my todo note", "daily")
    assert texts == [expected]
    assert "call the `create_plan` tool" in expected and "## notes.read" in expected
