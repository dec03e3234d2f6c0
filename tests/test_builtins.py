"""The built-in tools `planner.echo` and `planner.llm`: listed, validated, executed like downstream tools.

Through the real MCP server (in-process `mcp.Client`, SQLite store) and the library `Executor`; one test
uses a real downstream server subprocess to show the built-ins sit in front of it without hiding it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp_types import CallToolResult, TextContent
from test_downstream import READY, servers, stdio

from mcp_planner import Executor, PlanStatus, StepStatus
from mcp_planner.downstream.client import Downstream
from mcp_planner.downstream.config import ServersConfig
from mcp_planner.engine.builtins import BUILTINS, ECHO, LLM, WithBuiltins, with_builtins
from mcp_planner.engine.tools import LocalTools, ToolProvider
from mcp_planner.errors import ConfigError, LLMNotConfiguredError
from mcp_planner.plan.model import ExecutionPlan, PlanSpec, StepResult
from mcp_planner.runner import CachedCatalog, publish_catalog
from mcp_planner.server.app import build_server
from mcp_planner.service import PlannerService
from mcp_planner.store.sqlite import PlanStore

pytestmark = pytest.mark.anyio


async def shout(params: dict[str, Any]) -> str:
    return str(params["text"]).upper()


@asynccontextmanager
async def planner(tmp_path: Path, tools: ToolProvider | None = None) -> AsyncIterator[Client]:
    async with PlanStore.open(tmp_path / "plans.db") as store:
        async with PlannerService(store, tools or LocalTools({"shout": shout})) as service:
            async with Client(build_server(service)) as client:
                yield client


def text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, text(result)
    assert result.structured_content is not None
    return dict(result.structured_content)


def plan(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"description": "built-ins", "steps": list(steps), "options": {"require_approval": False}}


async def run(client: Client, spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Create and execute a plan over MCP; its summary and the stored plan."""
    plan_id = structured(await client.call_tool("create_plan", spec))["id"]
    summary = structured(await client.call_tool("execute_plan", {"plan_id": plan_id}))
    stored = structured(await client.call_tool("get_plan", {"plan_id": plan_id}))
    return summary, stored


ECHO_THEN_SHOUT = (
    {"id": "e", "tool_name": ECHO, "parameters": {"x": "hello", "n": 2}},
    {
        "id": "s",
        "tool_name": "shout",
        "parameters": {"text": "{{ steps.e.result.x }} x{{ steps.e.result.n }}"},
    },
)


async def test_an_echo_result_flows_into_a_later_step_through_the_mcp_server(tmp_path: Path) -> None:
    async with planner(tmp_path) as client:
        summary, stored = await run(client, plan(*ECHO_THEN_SHOUT))
    assert summary["status"] == "completed", summary
    echoed, shouted = stored["steps"]
    assert echoed["result"]["structured"] == {"x": "hello", "n": 2}
    assert shouted["result"]["text"] == "HELLO X2"


async def test_an_echo_result_flows_into_a_later_step_in_the_library_executor() -> None:
    executor = Executor({"shout": shout})
    execution = ExecutionPlan.from_spec(PlanSpec.model_validate(plan(*ECHO_THEN_SHOUT)))
    summary = await executor.execute(execution)
    assert summary.status == PlanStatus.COMPLETED
    assert execution.step("s").result == StepResult(text="HELLO X2")


async def test_echo_with_a_lone_value_returns_that_value_to_shape_a_list_for_for_each(tmp_path: Path) -> None:
    async with planner(tmp_path) as client:
        summary, stored = await run(
            client,
            plan(
                {"id": "names", "tool_name": ECHO, "parameters": {"value": ["a", "b"]}},
                {
                    "id": "each",
                    "tool_name": "shout",
                    "for_each": "{{ steps.names.result }}",
                    "parameters": {"text": "{{ item }}"},
                },
            ),
        )
    assert summary["status"] == "completed", summary
    assert stored["steps"][0]["result"]["structured"] == ["a", "b"]
    assert stored["steps"][1]["result"]["structured"] == ["A", "B"]


async def test_llm_without_a_provider_fails_once_with_a_clear_error_and_no_retries(tmp_path: Path) -> None:
    async with planner(tmp_path) as client:
        summary, stored = await run(
            client,
            plan({"id": "ask", "tool_name": LLM, "parameters": {"prompt": "hi"}, "max_retries": 2}),
        )
    assert summary["status"] == "failed", summary
    step = stored["steps"][0]
    assert step["status"] == "failed" and step["retry_count"] == 0
    assert step["error"].startswith("no LLM configured")
    for hint in ("--llm", "MCP_PLANNER_LLM", "into the plan"):
        assert hint in step["error"]


async def test_llm_asks_the_function_it_is_given_and_a_dict_answer_is_structured() -> None:
    asked: list[tuple[Any, ...]] = []

    async def llm(
        prompt: str, schema: dict[str, Any] | None, system: str | None, max_tokens: int | None
    ) -> Any:
        asked.append((prompt, schema, system, max_tokens))
        return {"answer": 42}

    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    tools = WithBuiltins(LocalTools({"shout": shout}), llm=llm)
    execution = ExecutionPlan.from_spec(
        PlanSpec.model_validate(
            plan(
                {"id": "ask", "tool_name": LLM, "parameters": {"prompt": "6 x 7?", "schema": schema}},
                {"id": "s", "tool_name": "shout", "parameters": {"text": "{{ steps.ask.result.answer }}"}},
            )
        )
    )
    summary = await Executor(tools).execute(execution)
    assert summary.status == PlanStatus.COMPLETED
    assert asked == [("6 x 7?", schema, None, None)]
    assert execution.step("s").result == StepResult(text="42")


async def test_llm_without_a_provider_raises_a_non_retryable_step_error() -> None:
    with pytest.raises(LLMNotConfiguredError) as caught:
        await with_builtins(LocalTools({})).call(LLM, {"prompt": "hi"})
    assert caught.value.retryable is False


async def test_llm_parameters_are_validated_when_the_plan_is_created(tmp_path: Path) -> None:
    async with planner(tmp_path) as client:
        missing = await client.call_tool(
            "create_plan", plan({"id": "ask", "tool_name": LLM, "parameters": {"system": "be brief"}})
        )
        extra = await client.call_tool(
            "create_plan", plan({"id": "ask", "tool_name": LLM, "parameters": {"prompt": "hi", "temp": 1}})
        )
    assert missing.is_error and "prompt" in text(missing) and "'ask'" in text(missing)
    assert extra.is_error and "temp" in text(extra)


async def test_an_unknown_builtin_is_refused_with_close_names(tmp_path: Path) -> None:
    async with planner(tmp_path) as client:
        result = await client.call_tool("create_plan", plan({"id": "x", "tool_name": "planner.nope"}))
    assert result.is_error
    assert "unknown tool 'planner.nope'" in text(result) and "'planner.echo'" in text(result)


async def test_list_tools_shows_the_builtins_by_server_and_by_query(tmp_path: Path) -> None:
    async with planner(tmp_path) as client:
        everything = structured(await client.call_tool("list_tools", {}))
        builtins = structured(await client.call_tool("list_tools", {"server": "planner"}))
        echo = structured(await client.call_tool("list_tools", {"query": "echo"}))
        llm = structured(await client.call_tool("list_tools", {"query": "ask an llm"}))
    assert [t["name"] for t in everything["tools"]] == [ECHO, LLM, "shout"]
    assert [t["name"] for t in builtins["tools"]] == [ECHO, LLM]
    by_name = {t["name"]: t for t in builtins["tools"]}
    assert by_name[ECHO]["server"] == "planner"
    assert by_name[ECHO]["annotations"]["readOnlyHint"] and by_name[ECHO]["annotations"]["idempotentHint"]
    assert by_name[LLM]["annotations"]["openWorldHint"]
    assert by_name[LLM]["input_schema"]["required"] == ["prompt"]
    assert echo["tools"][0]["name"] == ECHO
    assert llm["tools"][0]["name"] == LLM


def test_a_downstream_server_named_planner_is_refused() -> None:
    with pytest.raises(ConfigError, match="'planner' is reserved for the built-in tools"):
        ServersConfig.from_dict({"mcpServers": {"planner": {"command": "true"}}})


def test_with_builtins_wraps_once() -> None:
    wrapped = with_builtins(LocalTools({"shout": shout}))
    assert with_builtins(wrapped) is wrapped
    assert list(wrapped.catalog()) == [*BUILTINS, "shout"]


async def test_a_published_catalog_leaves_the_builtins_out_and_its_readers_add_them(tmp_path: Path) -> None:
    async with PlanStore.open(tmp_path / "plans.db") as store:
        await publish_catalog(store, "key", with_builtins(LocalTools({"shout": shout})))
        published = await store.get_catalog("key")
        assert published is not None
        assert [entry["name"] for entry in published[0]] == ["shout"]
        async with PlannerService(store, CachedCatalog(published[0])) as service:
            assert sorted(await service.catalog()) == [ECHO, LLM, "shout"]


async def test_the_builtins_sit_in_front_of_a_downstream_server_without_hiding_it(tmp_path: Path) -> None:
    async with Downstream(servers(basic=stdio("basic.py"))) as downstream:
        tools = with_builtins(downstream)
        assert await tools.wait_ready(READY)
        assert tools.status()["basic"].state == "connected"
        async with planner(tmp_path, tools) as client:
            summary, stored = await run(
                client,
                plan(
                    {"id": "e", "tool_name": ECHO, "parameters": {"greeting": "hi"}},
                    {
                        "id": "b",
                        "tool_name": "basic.echo",
                        "parameters": {"text": "{{ steps.e.result.greeting }}"},
                    },
                ),
            )
    assert summary["status"] == "completed", summary
    assert stored["steps"][1]["result"]["text"] == "hi"
    assert stored["steps"][1]["status"] == StepStatus.COMPLETED


def test_a_bare_name_prefers_a_downstream_tool_over_a_built_in_one() -> None:
    """A plan written before the built-ins existed (`echo` meaning a server's echo) means what it meant."""
    from mcp_planner.plan.model import ExecutionPlan
    from mcp_planner.plan.validation import qualify_tool_names

    plan = ExecutionPlan.new("bare names")
    plan.add_step("echo", "a server's echo", {}, step_id="a")
    plan.add_step("llm", "only the built-in has it", {}, step_id="b")
    qualify_tool_names(plan, ["basic.echo", "planner.echo", "planner.llm"])
    assert [s.tool_name for s in plan.steps] == ["basic.echo", "planner.llm"]
    plan.add_step("echo", "two servers have it", {}, step_id="c")
    qualify_tool_names(plan, ["basic.echo", "other.echo", "planner.echo"])
    assert plan.step("c").tool_name == "echo"
    problems = plan.validate({"basic.echo": None, "other.echo": None, "planner.echo": None})
    assert "several servers ('basic.echo', 'other.echo')" in problems[-1].message
