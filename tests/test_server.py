"""The planner's MCP server end to end through an in-process `mcp.Client`, on a real SQLite store.

In-process tools (`LocalTools`) keep these fast; `test_server_stdio.py` drives `mcp-planner serve` as a
subprocess with real downstream servers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, ElicitRequestParams, ElicitResult, TextContent

from mcp_planner.engine.tools import LocalTools, ToolInfo
from mcp_planner.server.app import build_server
from mcp_planner.service import PlannerService
from mcp_planner.store import open_store

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
    db: str, *, approval: str = "agent", tools: LocalTools | None = None, **client_kwargs: Any
) -> AsyncIterator[tuple[Client, PlannerService]]:
    """A real client on the planner's server, over a service on the database `db` (each backend: `db`)."""
    async with open_store(db) as store:
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
            {
                "id": "world",
                "tool_name": "echo",
                "parameters": {"text": "{{ steps.hello.result.text }} world"},
            },
        ],
        "options": options,
    }


async def create(client: Client, plan: dict[str, Any]) -> str:
    result = await client.call_tool("create_plan", plan)
    assert not result.is_error, text(result)
    assert result.structured_content is not None
    return str(result.structured_content["id"])


async def test_create_approve_execute_returns_completed_summary(db: str) -> None:
    async with planner(db) as (client, _):
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


def accept(note: str = "") -> Any:
    asked: list[str] = []

    async def callback(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"note": note})

    callback.asked = asked  # type: ignore[attr-defined]
    return callback


async def decline(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
    return ElicitResult(action="decline")


async def dismiss(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
    return ElicitResult(action="cancel")


async def test_new_plan_waits_for_approval_and_execute_says_to_approve_first(db: str) -> None:
    async with planner(db) as (client, _):
        plan_id = await create(client, two_step_plan())
        summary = await client.call_tool("get_summary", {"plan_id": plan_id})
        assert summary.structured_content is not None
        assert summary.structured_content["status"] == "pending_approval"
        assert "approve_plan" in summary.structured_content["next_action"]
        refused = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert refused.is_error
        assert text(refused) == f"plan {plan_id!r} is pending_approval: call approve_plan first"


async def test_plan_without_required_approval_executes_at_once(db: str) -> None:
    async with planner(db) as (client, _):
        plan_id = await create(client, two_step_plan(require_approval=False))
        result = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert result.structured_content is not None
        assert result.structured_content["status"] == "completed"


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_auto_policy_asks_the_person_and_records_the_approval(db: str, mode: str) -> None:
    callback = accept("looks good")
    async with planner(db, approval="auto", elicitation_callback=callback, mode=mode) as (
        client,
        service,
    ):
        plan_id = await create(client, two_step_plan())
        result = await client.call_tool("approve_plan", {"plan_id": plan_id})
        assert not result.is_error, text(result)
        assert result.structured_content is not None
        assert result.structured_content["status"] == "approved"
        assert result.structured_content["approval_method"] == "elicitation"
        assert result.structured_content["approved_by"].startswith("user")
        assert len(callback.asked) == 1
        assert "echo" in callback.asked[0] and '"text": "hello"' in callback.asked[0]
        events = [e for e in await service.events(plan_id) if e.kind == "plan_approved"]
        assert events[-1].data["method"] == "elicitation"
        assert events[-1].data["note"] == "looks good"


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_person_declining_rejects_the_plan(db: str, mode: str) -> None:
    async with planner(db, approval="human", elicitation_callback=decline, mode=mode) as (client, _):
        plan_id = await create(client, two_step_plan())
        result = await client.call_tool("approve_plan", {"plan_id": plan_id})
        assert result.is_error
        assert "declined" in text(result)
        summary = await client.call_tool("get_summary", {"plan_id": plan_id})
        assert summary.structured_content is not None
        assert summary.structured_content["status"] == "cancelled"
        refused = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert refused.is_error and "cancelled" in text(refused)


async def test_person_dismissing_the_question_leaves_the_plan_pending(db: str) -> None:
    async with planner(db, approval="human", elicitation_callback=dismiss, mode="legacy") as (
        client,
        _,
    ):
        plan_id = await create(client, two_step_plan())
        result = await client.call_tool("approve_plan", {"plan_id": plan_id})
        assert result.is_error and "still pending_approval" in text(result)
        summary = await client.call_tool("get_summary", {"plan_id": plan_id})
        assert summary.structured_content is not None
        assert summary.structured_content["status"] == "pending_approval"


async def test_human_policy_without_elicitation_points_to_the_terminal(db: str) -> None:
    async with planner(db, approval="human") as (client, service):
        plan_id = await create(client, two_step_plan())
        result = await client.call_tool("approve_plan", {"plan_id": plan_id})
        assert result.is_error
        assert f"mcp-planner approve {plan_id}" in text(result)
        # A person approving from the terminal (what the CLI does) lets the agent execute it.
        shown = (await service.get_plan(plan_id)).compute_hash()
        await service.approve_plan(plan_id, "alice", "human-terminal", expected_hash=shown)
        done = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert done.structured_content is not None and done.structured_content["status"] == "completed"


async def test_auto_policy_without_elicitation_accepts_the_agents_call(db: str) -> None:
    async with planner(db, approval="auto") as (client, service):
        plan_id = await create(client, two_step_plan())
        result = await client.call_tool("approve_plan", {"plan_id": plan_id, "approved_by": "claude"})
        assert result.structured_content is not None
        assert result.structured_content["approved_by"] == "claude"
        assert result.structured_content["approval_method"] == "agent"
        events = [e for e in await service.events(plan_id) if e.kind == "plan_approved"]
        assert events[-1].data == {"by": "claude", "method": "agent"}


async def test_agent_policy_never_asks_the_person(db: str) -> None:
    callback = accept()
    async with planner(db, approval="agent", elicitation_callback=callback) as (client, _):
        plan_id = await create(client, two_step_plan())
        result = await client.call_tool("approve_plan", {"plan_id": plan_id})
        assert not result.is_error
        assert callback.asked == []


async def test_execute_sends_progress_per_step(db: str) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with planner(db) as (client, _):
        plan_id = await create(client, two_step_plan(require_approval=False))
        result = await client.call_tool("execute_plan", {"plan_id": plan_id}, progress_callback=on_progress)
        assert result.structured_content is not None and result.structured_content["status"] == "completed"
    assert seen, "no progress notification arrived"
    assert seen[-1][0] == 2 and seen[-1][1] == 2
    assert any(m and "'world'" in m for _, _, m in seen)


async def test_failed_plan_reports_the_error_and_resume_completes_it(db: str) -> None:
    calls = {"n": 0}

    async def flaky(params: dict[str, Any]) -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("first call fails")
        return "ok"

    tools = LocalTools({"echo": echo, "flaky": flaky})
    plan = {
        "description": "flaky then echo",
        "steps": [
            {"id": "first", "tool_name": "echo", "parameters": {"n": 1}},
            {"id": "shaky", "tool_name": "flaky", "depends_on": ["first"]},
            {"id": "last", "tool_name": "echo", "parameters": {"n": 3}, "depends_on": ["shaky"]},
        ],
        "options": {"require_approval": False},
    }
    async with planner(db, tools=tools) as (client, _):
        plan_id = await create(client, plan)
        failed = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert not failed.is_error, text(failed)
        assert failed.structured_content is not None
        assert failed.structured_content["status"] == "failed"
        assert "first call fails" in text(failed)
        assert "resume_plan" in failed.structured_content["next_action"]
        again = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert again.is_error and "resume_plan" in text(again)
        resumed = await client.call_tool("resume_plan", {"plan_id": plan_id})
        assert resumed.structured_content is not None
        assert resumed.structured_content["status"] == "completed"
        assert calls["n"] == 2
        noop = await client.call_tool("resume_plan", {"plan_id": plan_id})
        assert noop.structured_content is not None and noop.structured_content["status"] == "completed"


async def test_execute_returns_after_wait_seconds_and_cancel_stops_the_plan(db: str) -> None:
    gate = Gate()
    plan = {
        "description": "wait then echo",
        "steps": [
            {"id": "wait", "tool_name": "wait"},
            {"id": "after", "tool_name": "echo", "depends_on": ["wait"]},
        ],
        "options": {"require_approval": False},
    }
    async with planner(db, tools=make_tools(gate)) as (client, _):
        plan_id = await create(client, plan)
        with anyio.fail_after(5):
            result = await client.call_tool("execute_plan", {"plan_id": plan_id, "wait_seconds": 0})
        assert result.structured_content is not None
        assert result.structured_content["status"] == "executing"
        assert "get_summary" in result.structured_content["next_action"]
        with anyio.fail_after(5):
            await gate.entered.wait()
        twice = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert twice.is_error and "already executing" in text(twice)
        rejected = await client.call_tool("reject_plan", {"plan_id": plan_id, "reason": "no"})
        assert rejected.is_error and "cancel_plan" in text(rejected)
        with anyio.fail_after(10):
            cancelled = await client.call_tool(
                "cancel_plan", {"plan_id": plan_id, "reason": "changed my mind"}
            )
        assert not cancelled.is_error, text(cancelled)
        assert cancelled.structured_content is not None
        assert cancelled.structured_content["status"] == "cancelled"
        assert all(s["status"] == "skipped" for s in cancelled.structured_content["steps"])
        resumed = await client.call_tool("resume_plan", {"plan_id": plan_id})
        assert resumed.is_error and "cancelled" in text(resumed)


async def test_update_clears_the_approval(db: str) -> None:
    async with planner(db) as (client, service):
        plan_id = await create(client, two_step_plan())
        await client.call_tool("approve_plan", {"plan_id": plan_id})
        updated = await client.call_tool(
            "update_plan", {"plan_id": plan_id, "description": "a new description"}
        )
        assert not updated.is_error, text(updated)
        assert updated.structured_content is not None
        assert updated.structured_content["status"] == "pending_approval"
        assert updated.structured_content["user_approved"] is False
        assert updated.structured_content["description"] == "a new description"
        assert len(updated.structured_content["steps"]) == 2
        kinds = [e.kind for e in await service.events(plan_id)]
        assert kinds[-1] == "plan_updated"


async def test_invalid_plan_lists_every_problem_and_stores_nothing(db: str) -> None:
    plan = {
        "description": "",
        "steps": [
            {"id": "a", "tool_name": "ech", "parameters": {}},
            {"id": "a", "tool_name": "echo", "depends_on": ["ghost"]},
        ],
    }
    async with planner(db) as (client, _):
        result = await client.call_tool("create_plan", plan)
        assert result.is_error
        message = text(result)
        assert "ech" in message and "echo" in message  # unknown tool, with a suggestion
        assert "ghost" in message
        assert "duplicate" in message.lower()
        assert "description" in message
        listed = await client.call_tool("list_plans", {})
        assert listed.structured_content == {"plans": []}


async def test_unknown_plan_id_is_a_clear_error_for_every_plan_tool(db: str) -> None:
    calls = {
        "get_summary": {},
        "get_plan": {},
        "approve_plan": {},
        "reject_plan": {"reason": "x"},
        "execute_plan": {},
        "resume_plan": {},
        "cancel_plan": {},
        "update_plan": {"description": "x"},
    }
    async with planner(db, approval="auto", elicitation_callback=accept()) as (client, _):
        for tool, extra in calls.items():
            result = await client.call_tool(tool, {"plan_id": "nope", **extra})
            assert result.is_error, tool
            assert text(result) == "no plan with id 'nope': call list_plans to see the plans that exist", tool


async def test_malformed_arguments_get_a_clean_error(db: str) -> None:
    async with planner(db) as (client, _):
        missing = await client.call_tool("get_summary", {})
        wrong = await client.call_tool("create_plan", {"description": 3, "steps": "nope"})
        bad_step = await client.call_tool("create_plan", {"description": "d", "steps": [{"parameters": []}]})
        unknown = await client.call_tool("no_such_tool", {})
        for result in (missing, wrong, bad_step, unknown):
            assert result.is_error
            message = text(result)
            for noise in ("pydantic", "Traceback", "type=", "input_value", "Arguments"):
                assert noise not in message, message
        assert "plan_id: Field required" in text(missing)
        assert "steps.0.tool_name: Field required" in text(bad_step)
        assert "list_plans" not in text(unknown) and "tools/list" in text(unknown)


async def test_list_plans_filters_by_status_newest_first(db: str) -> None:
    async with planner(db) as (client, _):
        first = await create(client, two_step_plan())
        second = await create(client, two_step_plan(require_approval=False))
        listed = await client.call_tool("list_plans", {})
        assert listed.structured_content is not None
        assert [p["id"] for p in listed.structured_content["plans"]] == [second, first]
        pending = await client.call_tool("list_plans", {"status": "pending_approval"})
        assert pending.structured_content is not None
        assert [p["id"] for p in pending.structured_content["plans"]] == [first]
        bad = await client.call_tool("list_plans", {"status": "sleeping"})
        assert bad.is_error and "status" in text(bad)


async def test_tools_are_annotated_truthfully(db: str) -> None:
    async with planner(db) as (client, _):
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert len(tools) == 12
    for name in ("list_tools", "get_summary", "get_plan", "list_plans"):
        assert tools[name].annotations is not None and tools[name].annotations.read_only_hint is True
    for name in ("execute_plan", "resume_plan"):
        annotations = tools[name].annotations
        assert annotations is not None
        assert annotations.destructive_hint is True and annotations.read_only_hint is False
    for tool in tools.values():
        assert tool.output_schema is not None, tool.name
        assert tool.description and len(tool.description) > 80, tool.name


async def test_list_tools_shows_the_catalog(db: str) -> None:
    async with planner(db) as (client, _):
        result = await client.call_tool("list_tools", {})
        assert result.structured_content is not None
        names = [t["name"] for t in result.structured_content["tools"]]
        assert names == ["boom", "echo", "planner.echo", "planner.llm"]
        unknown = await client.call_tool("list_tools", {"server": "nowhere"})
        assert unknown.is_error and "nowhere" in text(unknown)


async def test_resources_give_plan_graph_and_whole_large_results(db: str) -> None:
    big = "x" * (200 * 1024)

    async def large(params: dict[str, Any]) -> str:
        return big

    tools = LocalTools({"large": large})
    plan = {
        "description": "big",
        "steps": [{"id": "big", "tool_name": "large"}],
        "options": {"require_approval": False},
    }
    async with planner(db, tools=tools) as (client, _):
        plan_id = await create(client, plan)
        await client.call_tool("execute_plan", {"plan_id": plan_id})
        view = await client.call_tool("get_plan", {"plan_id": plan_id})
        assert view.structured_content is not None
        result = view.structured_content["steps"][0]["result"]
        uri = f"plan://{plan_id}/steps/big/result"
        assert result["truncated"] is True and result["uri"] == uri
        assert len(result["text"]) < 4096
        full = await client.read_resource(uri)
        assert big in full.contents[0].text  # type: ignore[union-attr]
        graph = await client.read_resource(f"plan://{plan_id}/graph")
        assert graph.contents[0].text.startswith("flowchart TD")  # type: ignore[union-attr]
        whole = await client.read_resource(f"plan://{plan_id}")
        assert f'"id": "{plan_id}"' in whole.contents[0].text  # type: ignore[union-attr]
        templates = await client.list_resource_templates()
        assert {t.uri_template for t in templates.resource_templates} == {
            "plan://{plan_id}",
            "plan://{plan_id}/graph",
            "plan://{plan_id}/steps/{step_id}/result",
        }


async def test_plan_task_prompt_renders_the_planning_prompt(db: str) -> None:
    async with planner(db) as (client, _):
        prompt = await client.get_prompt("plan_task", {"task": "greet the world"})
    body = prompt.messages[0].content.text  # type: ignore[union-attr]
    assert "greet the world" in body and "echo" in body and "create_plan" in body


async def test_generate_plan_without_sampling_tells_the_agent_to_draft_it(db: str) -> None:
    async with planner(db) as (client, _):
        result = await client.call_tool("generate_plan", {"task": "greet"})
    assert result.is_error
    assert "create_plan" in text(result) and "plan_task" in text(result)


async def test_server_answers_tools_list_while_the_service_is_still_starting(db: str) -> None:
    proceed = anyio.Event()

    @asynccontextmanager
    async def slow_service() -> AsyncIterator[PlannerService]:
        await proceed.wait()
        async with open_store(db) as store:
            async with PlannerService(store, make_tools()) as service:
                yield service

    async with Client(build_server(service_factory=slow_service)) as client:
        with anyio.fail_after(5):
            tools = await client.list_tools()
        assert len(tools.tools) == 12
        proceed.set()
        with anyio.fail_after(5):
            listed = await client.call_tool("list_plans", {})
        assert listed.structured_content == {"plans": []}


async def test_plan_not_approved_in_time_is_cancelled_and_cannot_be_approved(db: str) -> None:
    async with planner(db) as (client, service):
        plan_id = await create(client, two_step_plan(approval_timeout_ms=60_000))
        stored = await service.store.get_plan(plan_id)
        stored.pending_since = datetime.now(UTC) - timedelta(minutes=2)  # as if it had waited two minutes
        await service.store.save_plan(stored)
        result = await client.call_tool("approve_plan", {"plan_id": plan_id})
        assert result.is_error and "approval timed out" in text(result)
        listed = await client.call_tool("list_plans", {"status": "cancelled"})
        assert listed.structured_content is not None
        assert [p["id"] for p in listed.structured_content["plans"]] == [plan_id]
        assert "approval_expired" in [e.kind for e in await service.events(plan_id)]


async def test_every_approval_rejection_and_cancellation_is_an_event_with_who_and_how(db: str) -> None:
    async with planner(db) as (client, service):
        approved = await create(client, two_step_plan())
        await client.call_tool("approve_plan", {"plan_id": approved, "approved_by": "claude"})
        rejected = await create(client, two_step_plan())
        await client.call_tool("reject_plan", {"plan_id": rejected, "reason": "wrong target"})
        cancelled = await create(client, two_step_plan())
        result = await client.call_tool("cancel_plan", {"plan_id": cancelled, "reason": "not needed"})
        assert result.structured_content is not None
        assert result.structured_content["status"] == "cancelled"
        assert {s["status"] for s in result.structured_content["steps"]} == {"skipped"}

        def last(events: list[Any], kind: str) -> dict[str, Any]:
            return dict([e for e in events if e.kind == kind][-1].data)

        assert last(await service.events(approved), "plan_approved") == {"by": "claude", "method": "agent"}
        assert last(await service.events(rejected), "plan_rejected") == {
            "by": "agent",
            "reason": "wrong target",
        }
        assert last(await service.events(cancelled), "plan_cancelled") == {
            "by": "agent",
            "status": "cancelled",
            "error": "not needed",
        }
        again = await client.call_tool("cancel_plan", {"plan_id": cancelled})
        assert again.is_error and "nothing to cancel" in text(again)


async def test_human_policy_does_not_let_a_plan_skip_approval(db: str) -> None:
    async with planner(db, approval="human") as (client, _):
        plan_id = await create(client, two_step_plan(require_approval=False, auto_approve=True))
        refused = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert refused.is_error and "approve_plan first" in text(refused)


async def test_a_service_that_fails_to_start_is_reported_by_every_tool() -> None:
    @asynccontextmanager
    async def broken() -> AsyncIterator[PlannerService]:
        raise OSError("database is read-only")
        yield  # pragma: no cover

    async with Client(build_server(service_factory=broken)) as client:
        assert len((await client.list_tools()).tools) == 12
        result = await client.call_tool("list_plans", {})
        assert result.is_error
        assert text(result) == "the planner failed to start: database is read-only; check the server log"


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_plan_edited_while_the_person_decides_is_not_approved_unseen(db: str, mode: str) -> None:
    asked: list[str] = []
    holder: dict[str, Any] = {}

    async def edit_then_accept(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        asked.append(params.message)
        if len(asked) == 1:  # the agent edits the plan while the person reads the first version
            await holder["service"].update_plan(holder["plan_id"], description="edited meanwhile")
        return ElicitResult(action="accept", content={})

    async with planner(db, approval="human", elicitation_callback=edit_then_accept, mode=mode) as (
        client,
        service,
    ):
        holder["service"] = service
        holder["plan_id"] = plan_id = await create(client, two_step_plan())
        result = await client.call_tool("approve_plan", {"plan_id": plan_id})
        plan = await service.get_plan(plan_id)
        if mode == "legacy":
            assert result.is_error and "changed while it was being approved" in text(result)
            assert plan.status == "pending_approval"
        else:  # on 2026-07-28 the question changed, so the person is asked again and sees the edit
            assert not result.is_error, text(result)
            assert len(asked) == 2 and "edited meanwhile" in asked[1]
            assert plan.status == "approved" and plan.description == "edited meanwhile"


async def test_reading_a_resource_of_an_unknown_plan_or_step_says_which(db: str) -> None:
    async with planner(db) as (client, _):
        plan_id = await create(client, two_step_plan())
        with pytest.raises(MCPError, match="no plan with id 'ghost'"):
            await client.read_resource("plan://ghost")
        with pytest.raises(MCPError, match="has no step 'nope'"):
            await client.read_resource(f"plan://{plan_id}/steps/nope/result")
        with pytest.raises(MCPError, match="has no result"):
            await client.read_resource(f"plan://{plan_id}/steps/hello/result")


async def test_get_plan_pages_through_a_large_plan_and_its_summary_stays_short(db: str) -> None:
    steps = [{"id": f"s{i}", "tool_name": "echo", "parameters": {"text": str(i)}} for i in range(250)]
    plan = {"description": "many", "steps": steps, "options": {"require_approval": False}}
    async with planner(db) as (client, _):
        plan_id = await create(client, plan)
        first = await client.call_tool("get_plan", {"plan_id": plan_id})
        page = first.structured_content
        assert page is not None and len(page["steps"]) == 100 and page["steps_total"] == 250
        assert page["next_offset"] == 100 and page["mermaid"] is None  # no graph of 250 nodes
        assert "s99" in text(first) and "s100" not in text(first) and "offset=100" in text(first)
        last = await client.call_tool("get_plan", {"plan_id": plan_id, "offset": 200, "limit": 100})
        assert last.structured_content is not None
        assert [s["id"] for s in last.structured_content["steps"]] == [f"s{i}" for i in range(200, 250)]
        assert last.structured_content["next_offset"] is None
        done = await client.call_tool("execute_plan", {"plan_id": plan_id, "wait_seconds": 60})
        summary = done.structured_content
        assert summary is not None and summary["status"] == "completed" and summary["total_steps"] == 250
        assert len(summary["steps"]) == 20 and summary["steps_omitted"] == 230


async def test_resources_list_names_the_newest_plans_and_each_reads_as_the_plan(db: str) -> None:
    async with planner(db) as (client, _):
        first = await create(client, two_step_plan())
        second = await create(client, {**two_step_plan(), "description": "the second plan"})
        listed = await client.list_resources()
        plans = [r for r in listed.resources if str(r.uri).startswith("plan://")]
        assert [str(r.uri) for r in plans] == [f"plan://{second}", f"plan://{first}"]  # newest first
        assert plans[0].title == "the second plan" and plans[0].mime_type == "application/json"
        assert plans[0].description is not None and plans[0].description.startswith("pending_approval plan")
        whole = await client.read_resource(str(plans[0].uri))
        assert f'"id": "{second}"' in whole.contents[0].text  # type: ignore[union-attr]


async def test_create_plan_warns_of_a_parameter_the_tools_schema_does_not_declare(db: str) -> None:
    class Declared(LocalTools):
        def catalog(self) -> dict[str, ToolInfo]:
            schema = {"type": "object", "properties": {"text": {"type": "string"}}}
            return {**super().catalog(), "echo": ToolInfo(name="echo", input_schema=schema)}

    plan = {"description": "typo", "steps": [{"id": "say", "tool_name": "echo", "parameters": {"txt": "hi"}}]}
    async with planner(db, tools=Declared({"echo": echo})) as (client, _):
        result = await client.call_tool("create_plan", plan)
        assert not result.is_error and result.structured_content is not None
        warnings = result.structured_content["warnings"]
        assert len(warnings) == 1 and "'txt'" in warnings[0] and "did you mean 'text'" in warnings[0]
        assert "warning: step 'say', parameters.txt:" in text(result)


async def test_list_tools_shows_signatures_and_a_query_ranks_the_best_matches(db: str) -> None:
    schemas = {
        "fs.read_file": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        "fs.write_file": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
        "git.log": {"type": "object", "properties": {"max_count": {"type": "integer"}}},
    }
    descriptions = {
        "fs.read_file": "Read a file",
        "fs.write_file": "Write a file",
        "git.log": "Commit history",
    }

    class Described(LocalTools):
        def catalog(self) -> dict[str, ToolInfo]:
            return {
                name: ToolInfo(name=name, description=descriptions[name], input_schema=schemas[name])
                for name in schemas
            }

    async with planner(db, tools=Described({name: echo for name in schemas})) as (client, _):
        everything = await client.call_tool("list_tools", {})
        assert "fs.write_file(path: string, content: string)" in text(everything)
        assert "git.log(max_count?: integer)" in text(everything)
        found = await client.call_tool("list_tools", {"query": "read a file", "limit": 2})
        assert found.structured_content is not None
        assert [t["name"] for t in found.structured_content["tools"]] == ["fs.read_file", "fs.write_file"]
        none = await client.call_tool("list_tools", {"query": "send email"})
        assert none.structured_content is not None and none.structured_content["tools"] == []


async def test_get_plan_text_alone_shows_each_steps_outcome(db: str) -> None:
    async with planner(db) as (client, _):
        plan_id = await create(client, two_step_plan(require_approval=False))
        await client.call_tool("execute_plan", {"plan_id": plan_id, "wait_seconds": 30})
        shown = text(await client.call_tool("get_plan", {"plan_id": plan_id}))
        assert "-> completed" in shown and '"text": "hello world"' in shown  # the second step's result
        assert "call get_plan" not in shown  # the text is the answer, not a pointer to it
