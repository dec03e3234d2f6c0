"""Malformed arguments thrown at every tool: each answer is a clean result (an `isError` one with no
traceback, pydantic report or protocol error), and the server keeps working afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp_types import CallToolResult, TextContent

from mcp_planner.engine.tools import LocalTools
from mcp_planner.server.app import build_server
from mcp_planner.service import PlannerService
from mcp_planner.store.sqlite import PlanStore

pytestmark = pytest.mark.anyio

EXAMPLES_PER_TOOL = 25
NOISE = (
    "Traceback",
    "pydantic",
    "input_value=",  # pydantic's report (`input_values` is a create_plan parameter)
    "input_type",
    "Error executing tool",
    "For further information",
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def arguments(names: list[str], plan_ids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly wrong: real argument names with values of any type, unknown names, missing ones."""
    value_for = {
        "plan_id": st.sampled_from(plan_ids) | json_values,
        "steps": st.lists(
            st.dictionaries(st.sampled_from(["id", "tool_name", "parameters", "x"]), json_values)
        ),
        "options": st.dictionaries(
            st.sampled_from(["allow_parallel", "max_parallel_steps", "bogus"]), json_values
        ),
    }
    known = st.fixed_dictionaries({}, optional={n: value_for.get(n, json_values) for n in names})
    unknown = st.dictionaries(st.text(min_size=1, max_size=12), json_values, max_size=3)
    return st.builds(lambda a, b: {**b, **a}, known, unknown)


def draw(strategy: st.SearchStrategy[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: dict[str, Any]) -> None:
        found.append(value)

    collect()
    return found


def text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


async def echo(params: dict[str, Any]) -> dict[str, Any]:
    return params


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_every_tool_answers_malformed_arguments_cleanly_and_keeps_working(
    tmp_path: Path, mode: str
) -> None:
    async with PlanStore.open(tmp_path / "plans.db") as store:
        async with PlannerService(store, LocalTools({"echo": echo}), approval="agent") as service:
            async with Client(build_server(service), mode=mode) as client:
                created = await client.call_tool(
                    "create_plan", {"description": "d", "steps": [{"id": "a", "tool_name": "echo"}]}
                )
                assert created.structured_content is not None
                plan_ids = [str(created.structured_content["id"]), "nope", ""]
                tools = (await client.list_tools()).tools
                assert len(tools) == 12
                for tool in tools:
                    names = list((tool.input_schema.get("properties") or {}).keys())
                    for args in draw(arguments(names, plan_ids), EXAMPLES_PER_TOOL):
                        if tool.name in ("execute_plan", "resume_plan"):
                            args["wait_seconds"] = 5  # bounded: a valid call may really run the plan
                        result = await client.call_tool(tool.name, args)
                        if result.is_error:
                            message = text(result)
                            assert message, (tool.name, args)
                            for noise in NOISE:
                                assert noise not in message, (tool.name, args, message)
                        else:
                            assert result.structured_content is not None, (tool.name, args)
                    alive = await client.call_tool("list_plans", {"limit": 1})
                    assert not alive.is_error, text(alive)
