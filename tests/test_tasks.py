"""`execute_plan` and `resume_plan` as MCP tasks (SPEC 15), through real clients on a real SQLite store.

2026-07-28 clients declare the Tasks extension with a `ClientExtension` on `mcp.Client` and send
`tasks/*` through its session; 2025-11-25 clients send task-augmented `tools/call` requests as JSON-RPC
messages (the SDK's client checks every 2025-11-25 `tools/call` result against `CallToolResult`, so it cannot
receive a task handle itself). The e2e tests run `mcp-planner serve` processes over stdio.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.shared.exceptions import MCPError
from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher
from mcp_types import (
    CallToolResult,
    CancelTaskRequest,
    CancelTaskRequestParams,
    GetTaskRequest,
    GetTaskRequestParams,
    Result,
    TextContent,
)
from mcp_types.jsonrpc import INVALID_PARAMS, MISSING_REQUIRED_CLIENT_CAPABILITY

from mcp_planner.engine.tools import LocalTools
from mcp_planner.runner import DetachedRunners
from mcp_planner.server.app import build_server
from mcp_planner.server.tasks import TASKS_EXTENSION
from mcp_planner.service import PlannerService
from mcp_planner.store import open_store
from mcp_planner.store.base import RunState

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


# -- a 2026-07-28 client of the Tasks extension -----------------------------------------------------------


class TaskHandle(Result):
    """`CreateTaskResult` (SEP-2663): the task, flat, with `resultType: "task"`."""

    result_type: Literal["task"] = "task"
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None


class DetailedTask(Result):
    """The `tasks/get` answer: the task, with the tool's result once completed."""

    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


async def get_task(client: Client, task_id: str) -> DetailedTask:
    request = GetTaskRequest(params=GetTaskRequestParams(task_id=task_id))
    return await client.session.send_request(request, DetailedTask)


async def cancel_task(client: Client, task_id: str) -> None:
    await client.session.send_request(
        CancelTaskRequest(params=CancelTaskRequestParams(task_id=task_id)), Result
    )


async def wait_for(
    client: Client, task_id: str, statuses: tuple[str, ...], seconds: float = 10
) -> DetailedTask:
    """Poll `tasks/get` (faster than the suggested interval: tests are short) until a status in `statuses`."""
    with anyio.fail_after(seconds):
        while True:
            task = await get_task(client, task_id)
            if task.status in statuses:
                return task
            await anyio.sleep(0.05)


async def resolve(handle: TaskHandle, ctx: ClaimContext) -> CallToolResult:
    """What `Client.call_tool` does with a task handle: poll until the end and return the tool's result."""
    while True:
        request = GetTaskRequest(params=GetTaskRequestParams(task_id=handle.task_id))
        task = await ctx.session.send_request(request, DetailedTask)
        if task.status == "completed":
            return CallToolResult.model_validate(task.result)
        if task.status in ("failed", "cancelled"):
            raise RuntimeError(f"task {task.status}: {task.status_message}")
        await anyio.sleep(0.05)


class Tasks(ClientExtension):
    identifier = TASKS_EXTENSION

    def claims(self) -> list[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=TaskHandle, resolve=resolve)]


async def call_as_task(client: Client, tool: str, arguments: dict[str, Any]) -> TaskHandle:
    result = await client.session.call_tool(tool, arguments, allow_claimed=True)
    assert isinstance(result, TaskHandle), result
    return result


# -- in-process planners -----------------------------------------------------------------------------------


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


async def nap(params: dict[str, Any]) -> str:
    await anyio.sleep(float(params["seconds"]))
    return f"slept {params['seconds']} s"


async def boom(params: dict[str, Any]) -> str:
    raise RuntimeError("boom")


def tools(gate: Gate | None = None) -> LocalTools:
    fns: dict[str, Callable[[dict[str, Any]], Any]] = {"echo": echo, "nap": nap, "boom": boom}
    if gate is not None:
        fns["wait"] = gate
    return LocalTools(fns)


@asynccontextmanager
async def planner(
    db: str, gate: Gate | None = None, **client_kwargs: Any
) -> AsyncIterator[tuple[Client, PlannerService]]:
    async with open_store(db) as store:
        async with PlannerService(store, tools(gate), approval="agent") as service:
            async with Client(build_server(service), **client_kwargs) as client:
                yield client, service


def text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def plan(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"description": "a plan for tasks", "steps": list(steps), "options": {"require_approval": False}}


NAP = {"id": "nap", "tool_name": "nap", "parameters": {"seconds": 3}}
HELLO = {"id": "hello", "tool_name": "echo", "parameters": {"text": "hello"}}
WAIT = {"id": "wait", "tool_name": "wait"}
BOOM = {"id": "boom", "tool_name": "boom"}


async def create(client: Client, spec: dict[str, Any]) -> str:
    result = await client.call_tool("create_plan", spec)
    assert not result.is_error, text(result)
    assert result.structured_content is not None
    return str(result.structured_content["id"])


# -- 2026-07-28: the Tasks extension ----------------------------------------------------------------------


async def test_a_task_handle_arrives_while_a_3_s_plan_runs_and_the_run_is_already_stored(db: str) -> None:
    async with planner(db, extensions=[Tasks()]) as (client, _):
        plan_id = await create(client, plan(NAP, {**HELLO, "depends_on": ["nap"]}))
        with anyio.fail_after(5):
            handle = await call_as_task(client, "execute_plan", {"plan_id": plan_id})
        assert handle.status == "working"
        assert handle.poll_interval_ms is not None and handle.poll_interval_ms > 0
        assert handle.created_at.endswith("Z") and handle.ttl_ms is None
        assert client.server_capabilities.extensions == {TASKS_EXTENSION: {}}
        # The handle names a committed run: another connection to the database reads it.
        async with open_store(db) as other:
            run = await other.get_run(handle.task_id)
        assert run.plan_id == plan_id
        assert run.state != RunState.DONE
        task = await get_task(client, handle.task_id)
        assert task.status == "working" and task.result is None


async def test_tasks_get_is_polled_to_the_end_and_returns_what_execute_plan_returns(db: str) -> None:
    async with planner(db, extensions=[Tasks()]) as (client, service):
        plan_id = await create(client, plan(HELLO, {**HELLO, "id": "again", "depends_on": ["hello"]}))
        handle = await call_as_task(client, "execute_plan", {"plan_id": plan_id})
        task = await wait_for(client, handle.task_id, ("completed", "failed", "cancelled"))
        assert task.status == "completed", task
        assert task.status_message == "plan completed"
        assert task.result is not None
        result = CallToolResult.model_validate(task.result)
        assert result.structured_content is not None
        assert result.structured_content["status"] == "completed"
        assert list(result.structured_content)[:2] == ["outputs", "output_errors"]  # the outputs first
        # The same result execute_plan's follower returns at the end (resume_plan of a completed plan).
        async with Client(build_server(service)) as plain:
            direct = await plain.call_tool("resume_plan", {"plan_id": plan_id})
        assert direct.structured_content == result.structured_content
        assert text(direct) == text(result)


async def test_call_tool_of_a_client_with_the_extension_resolves_the_task_to_the_result(db: str) -> None:
    async with planner(db, extensions=[Tasks()]) as (client, _):
        plan_id = await create(client, plan(HELLO))
        result = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert result.structured_content is not None, text(result)
        assert result.structured_content["status"] == "completed"


async def test_a_failed_plan_is_a_completed_task_whose_summary_says_failed(db: str) -> None:
    async with planner(db, extensions=[Tasks()]) as (client, _):
        plan_id = await create(client, plan({**BOOM, "max_retries": 0}))
        handle = await call_as_task(client, "execute_plan", {"plan_id": plan_id})
        task = await wait_for(client, handle.task_id, ("completed", "failed", "cancelled"))
        assert task.status == "completed" and task.status_message == "plan failed"
        assert task.result is not None and task.result["structuredContent"]["status"] == "failed"
        assert not task.result.get("isError")
        resumed = await call_as_task(client, "resume_plan", {"plan_id": plan_id})
        assert resumed.task_id != handle.task_id
        again = await wait_for(client, resumed.task_id, ("completed", "failed", "cancelled"))
        assert again.result is not None and again.result["structuredContent"]["status"] == "failed"


async def test_tasks_cancel_cancels_the_plan(db: str) -> None:
    gate = Gate()
    async with planner(db, gate, extensions=[Tasks()]) as (client, service):
        plan_id = await create(client, plan(WAIT, {**HELLO, "depends_on": ["wait"]}))
        handle = await call_as_task(client, "execute_plan", {"plan_id": plan_id})
        with anyio.fail_after(5):
            await gate.entered.wait()
        await cancel_task(client, handle.task_id)
        task = await wait_for(client, handle.task_id, ("completed", "failed", "cancelled"))
        assert task.status == "cancelled", task
        assert task.result is None
        assert (await service.get_summary(plan_id)).status.value == "cancelled"
        await cancel_task(client, handle.task_id)  # a task that ended: acknowledged, nothing changes


async def test_a_plan_that_cannot_run_is_answered_at_once_not_as_a_task(db: str) -> None:
    async with planner(db, extensions=[Tasks()]) as (client, _):
        spec = plan(HELLO)
        spec["options"] = {"require_approval": True}
        plan_id = await create(client, spec)
        refused = await client.session.call_tool("execute_plan", {"plan_id": plan_id}, allow_claimed=True)
        assert isinstance(refused, CallToolResult) and refused.is_error
        assert text(refused) == f"plan {plan_id!r} is pending_approval: call approve_plan first"
        invalid = await client.session.call_tool("execute_plan", {"plan_id": ""}, allow_claimed=True)
        assert isinstance(invalid, CallToolResult) and invalid.is_error
        assert "invalid arguments for execute_plan" in text(invalid)


async def test_a_client_without_tasks_still_waits_wait_seconds(db: str) -> None:
    for mode in ("auto", "legacy"):
        async with planner(db, mode=mode) as (client, _):
            plan_id = await create(client, plan(HELLO))
            result = await client.call_tool("execute_plan", {"plan_id": plan_id, "wait_seconds": 30})
            assert result.structured_content is not None, text(result)
            assert result.structured_content["status"] == "completed"


async def test_unknown_task_ids_and_undeclared_clients_get_clear_json_rpc_errors(db: str) -> None:
    async with planner(db, extensions=[Tasks()]) as (client, _):
        for call in (get_task, cancel_task):
            with pytest.raises(MCPError) as raised:
                await call(client, "no-such-task")
            assert raised.value.error.code == INVALID_PARAMS
            assert raised.value.error.message.startswith("Failed to retrieve task: no task 'no-such-task'")
    async with planner(db) as (plain, _):
        with pytest.raises(MCPError) as raised:
            await get_task(plain, "no-such-task")
        assert raised.value.error.code == MISSING_REQUIRED_CLIENT_CAPABILITY


# -- 2025-11-25: task-augmented requests ------------------------------------------------------------------


class LegacyWire:
    """A 2025-11-25 client as JSON-RPC messages over the in-memory transport `Client(mode="legacy")` uses."""

    def __init__(self, dispatcher: JSONRPCDispatcher[Any]) -> None:
        self.dispatcher = dispatcher

    async def request(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return await self.dispatcher.send_raw_request(method, params, {"timeout": 10})


async def _no_requests(dctx: Any, method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    raise MCPError(-32601, f"this test client serves no {method}")


async def _ignore(dctx: Any, method: str, params: Mapping[str, Any] | None) -> None:
    return None


@asynccontextmanager
async def legacy_wire(db: str, gate: Gate | None = None) -> AsyncIterator[tuple[LegacyWire, dict[str, Any]]]:
    from mcp.client._memory import InMemoryTransport  # the transport Client(server, mode="legacy") uses

    async with open_store(db) as store:
        async with PlannerService(store, tools(gate), approval="agent") as service:
            async with InMemoryTransport(build_server(service)) as (read, write):
                dispatcher: JSONRPCDispatcher[Any] = JSONRPCDispatcher(read, write)
                async with anyio.create_task_group() as tg:
                    await tg.start(dispatcher.run, _no_requests, _ignore)
                    wire = LegacyWire(dispatcher)
                    init = await wire.request(
                        "initialize",
                        {
                            "protocolVersion": "2025-11-25",
                            "capabilities": {"tasks": {"cancel": {}}},
                            "clientInfo": {"name": "legacy-tasks", "version": "1"},
                        },
                    )
                    await dispatcher.notify("notifications/initialized", None)
                    yield wire, init
                    tg.cancel_scope.cancel()


async def legacy_create(wire: LegacyWire, spec: dict[str, Any]) -> str:
    created = await wire.request("tools/call", {"name": "create_plan", "arguments": spec})
    assert not created.get("isError"), created
    return str(created["structuredContent"]["id"])


async def test_legacy_task_augmented_call_is_a_task_polled_and_fetched_with_tasks_result(db: str) -> None:
    async with legacy_wire(db) as (wire, init):
        assert init["capabilities"]["tasks"] == {"cancel": {}, "requests": {"tools": {"call": {}}}}
        listed = await wire.request("tools/list")
        support = {tool["name"]: tool.get("execution") for tool in listed["tools"]}
        assert support["execute_plan"] == support["resume_plan"] == {"taskSupport": "optional"}
        assert support["get_summary"] is None

        plan_id = await legacy_create(wire, plan(HELLO))
        created = await wire.request(
            "tools/call", {"name": "execute_plan", "arguments": {"plan_id": plan_id}, "task": {"ttl": 60000}}
        )
        task = created["task"]
        assert set(task) >= {"taskId", "status", "createdAt", "lastUpdatedAt", "ttl", "pollInterval"}
        assert task["status"] == "working"
        result = await wire.request("tasks/result", {"taskId": task["taskId"]})  # waits for the end
        assert result["structuredContent"]["status"] == "completed"
        assert result["_meta"]["io.modelcontextprotocol/related-task"] == {"taskId": task["taskId"]}
        got = await wire.request("tasks/get", {"taskId": task["taskId"]})
        assert got["status"] == "completed" and "result" not in got
        summary = await wire.request("tools/call", {"name": "get_summary", "arguments": {"plan_id": plan_id}})
        assert result["structuredContent"] == summary["structuredContent"]
        assert result["content"] == summary["content"]


async def test_legacy_tasks_cancel_answers_the_cancelled_task(db: str) -> None:
    gate = Gate()
    async with legacy_wire(db, gate) as (wire, _):
        plan_id = await legacy_create(wire, plan(WAIT))
        created = await wire.request(
            "tools/call", {"name": "execute_plan", "arguments": {"plan_id": plan_id}, "task": {}}
        )
        task_id = created["task"]["taskId"]
        with anyio.fail_after(5):
            await gate.entered.wait()
        cancelled = await wire.request("tasks/cancel", {"taskId": task_id})
        assert cancelled["taskId"] == task_id and cancelled["status"] == "cancelled"
        with pytest.raises(MCPError) as raised:
            await wire.request("tasks/cancel", {"taskId": task_id})
        assert raised.value.error.code == INVALID_PARAMS and "already cancelled" in raised.value.error.message
        with pytest.raises(MCPError) as unknown:
            await wire.request("tasks/get", {"taskId": "nope"})
        assert unknown.value.error.code == INVALID_PARAMS


async def test_a_legacy_call_without_task_still_waits(db: str) -> None:
    async with legacy_wire(db) as (wire, _):
        plan_id = await legacy_create(wire, plan(HELLO))
        result = await wire.request("tools/call", {"name": "execute_plan", "arguments": {"plan_id": plan_id}})
        assert "task" not in result
        assert result["structuredContent"]["status"] == "completed"


@pytest.mark.e2e
async def test_a_task_whose_runner_dies_before_taking_it_ends_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = str(tmp_path / "plans.db")
    async with open_store(db) as store:
        launcher = DetachedRunners(db, None)
        async with PlannerService(store, tools(), approval="agent", launcher=launcher) as service:
            async with Client(build_server(service), extensions=[Tasks()]) as client:
                plan_id = await create(client, plan(HELLO))
                monkeypatch.setenv("MCP_PLANNER_MAX_STEPS", "lots")  # the runner it starts exits at once
                handle = await call_as_task(client, "execute_plan", {"plan_id": plan_id})
                done = await wait_for(client, handle.task_id, ("completed", "failed", "cancelled"), 30)
                summary = await client.call_tool("get_summary", {"plan_id": plan_id})
    assert done.status == "completed" and done.result is not None and done.result["isError"], done
    assert "exited before it could" in done.result["content"][0]["text"]
    assert summary.structured_content is not None and summary.structured_content["status"] == "approved"


# -- planner processes ------------------------------------------------------------------------------------


def serve_params(tmp_path: Path, db: str) -> StdioServerParameters:
    env = {**os.environ, "CI_STATE_DIR": str(tmp_path / "ci-state"), "CI_DELAY": "0"}
    args = ["-m", "mcp_planner", "serve", "--servers", str(ROOT / "examples" / "servers.json")]
    args += ["--db", db]
    return StdioServerParameters(command=sys.executable, args=args, env=env, cwd=str(tmp_path))


@pytest.mark.e2e
async def test_a_second_planner_process_answers_for_the_first_ones_task(tmp_path: Path, db: str) -> None:
    spec = plan(
        {"id": "nap", "tool_name": "ci.sleep", "parameters": {"seconds": 3}},
        {"id": "lint", "tool_name": "ci.lint", "depends_on": ["nap"]},
    )
    async with Client(serve_params(tmp_path, db), extensions=[Tasks()]) as first:
        plan_id = await create(first, spec)
        with anyio.fail_after(5):
            handle = await call_as_task(first, "execute_plan", {"plan_id": plan_id})
        assert handle.status == "working"
        async with Client(serve_params(tmp_path, db), extensions=[Tasks()]) as second:
            task = await get_task(second, handle.task_id)
            assert task.status == "working"
            done = await wait_for(second, handle.task_id, ("completed", "failed", "cancelled"), seconds=30)
        assert done.status == "completed", done
        assert done.result is not None and done.result["structuredContent"]["status"] == "completed"
        mine = await get_task(first, handle.task_id)
        assert mine.result == done.result

        # And the other way round: the first process creates a task, the second cancels it.
        long_id = await create(
            first, plan({"id": "nap", "tool_name": "ci.sleep", "parameters": {"seconds": 30}})
        )
        long = await call_as_task(first, "execute_plan", {"plan_id": long_id})
        await wait_for_executing(first, long_id)
        async with Client(serve_params(tmp_path, db), extensions=[Tasks()]) as second:
            await cancel_task(second, long.task_id)
        cancelled = await wait_for(first, long.task_id, ("completed", "failed", "cancelled"), seconds=15)
        assert cancelled.status == "cancelled", cancelled


async def wait_for_executing(client: Client, plan_id: str) -> None:
    with anyio.fail_after(15):
        while True:
            summary = await client.call_tool("get_summary", {"plan_id": plan_id})
            assert summary.structured_content is not None, text(summary)
            if summary.structured_content["status"] == "executing":
                return
            await anyio.sleep(0.05)


@pytest.mark.e2e
async def test_tasks_over_streamable_http(tmp_path: Path, db: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = serve_params(tmp_path, db)
    args = [*server.args, "--transport", "http", "--port", str(port)]
    process = await anyio.open_process([server.command, *args], env=server.env, cwd=server.cwd)
    try:
        with anyio.fail_after(20):
            while True:
                try:
                    await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await anyio.sleep(0.1)  # the server is still binding its port: a bounded poll
        async with Client(f"http://127.0.0.1:{port}/mcp", extensions=[Tasks()]) as client:
            assert client.protocol_version == "2026-07-28"
            plan_id = await create(client, plan({"id": "lint", "tool_name": "ci.lint"}))
            handle = await call_as_task(client, "execute_plan", {"plan_id": plan_id})
            done = await wait_for(client, handle.task_id, ("completed", "failed", "cancelled"), seconds=30)
        assert done.status == "completed", done
        assert done.result is not None and done.result["structuredContent"]["status"] == "completed"
    finally:
        process.terminate()
        with anyio.fail_after(10):
            await process.wait()
        await process.aclose()
