"""The MCP server: the planning tools (`server/tools.py`), plan resources, and running over stdio or HTTP.

Exceptions become tool error results in exactly one place, `PlannerMCPServer.call_tool`, so no traceback,
pydantic report or protocol error reaches the client.

The service (store, downstream connections, executions) starts in the background when the server starts:
`initialize` and `tools/list` are answered at once, and a tool call waits for the service to be ready.
"""

import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any, Literal, NoReturn

import anyio
import anyio.abc
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, InputRequiredResult, TextContent
from mcp_types import Resource as MCPResource
from mcp_types import Tool as MCPTool
from pydantic import ValidationError

from mcp_planner import presentation as views
from mcp_planner.errors import PlannerError, PlanNotFoundError
from mcp_planner.server.http_security import bearer_auth, check_bind, transport_security
from mcp_planner.server.schemas import compact_input_schemas, compact_output_schema
from mcp_planner.server.stdio import answering_stdio_server
from mcp_planner.server.tasks import PlannerTasks, legacy_tasks
from mcp_planner.server.tools import ServiceState, register_tools
from mcp_planner.service import APPROVAL_POLICIES, ApprovalPolicy, PlannerService

log = logging.getLogger("mcp_planner.server.app")

INSTRUCTIONS = """\
mcp-planner turns multi-step work into a plan: a DAG of calls to the tools of other MCP servers (see
list_tools), which a person or you approve and the planner then executes durably, with retries, timeouts,
parallelism, cancellation and resume.

Typical flow: list_tools -> create_plan (or generate_plan) -> show the plan to the user -> approve_plan ->
execute_plan -> get_summary / get_plan. A step can run once per item of a list (for_each), only on a
condition (when, e.g. after another step failed) or fail on a check of a text result (fail_if); a plan's
`outputs` come back first, so you read the answer, not every result. A plan that failed can be resumed
(resume_plan) without re-running completed steps. Plan statuses: draft, pending_approval (waiting for
approve_plan), approved, executing, completed, failed (stopped at an error or timed out), partial (some
steps failed, others completed), cancelled (rejected, cancelled or approval timed out; never runs again).
Every result includes `next_action`, what to call next."""


#: How many of the newest plans resources/list names.
RECENT_PLANS = 20


class PlannerMCPServer(MCPServer[Any]):
    """`MCPServer` whose tool calls never fail with a traceback or a protocol error, and whose stdio
    transport answers every line (see `stdio_transport`)."""

    planner: ServiceState

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        try:
            return await super().call_tool(name, arguments, context)
        except Exception as exc:
            return error_result(name, exc)

    async def list_tools(self) -> list[MCPTool]:
        """The tools, their schemas compacted (`schemas.py`): the same contracts in fewer tokens."""
        tools = await super().list_tools()
        inputs = compact_input_schemas({tool.name: tool.input_schema for tool in tools})
        return [
            tool.model_copy(
                update={
                    "input_schema": inputs[tool.name],
                    "output_schema": tool.output_schema and compact_output_schema(tool.output_schema),
                }
            )
            for tool in tools
        ]

    async def list_resources(self) -> list[MCPResource]:
        """The fixed resources, then the `RECENT_PLANS` newest plans as `plan://<id>` (the templates say how
        to read any other plan, a graph or a result)."""
        resources = await super().list_resources()
        try:
            service = await self.planner.get()
            heads = await service.store.recent_plans(RECENT_PLANS)
        except PlannerError as exc:  # the list still answers, without the plans
            log.warning("resources/list: the recent plans are left out: %s", exc)
            return resources
        return resources + [
            MCPResource(
                uri=f"plan://{head.id}",
                name=f"plan-{head.id}",
                title=views.one_line(head.description, 80),
                description=f"{head.status.value} plan, updated {head.updated_at:%Y-%m-%d %H:%M} UTC",
                mime_type="application/json",
            )
            for head in heads
        ]

    async def run_stdio_async(self) -> None:
        # MCPServer's own, over a transport that answers unreadable lines instead of dropping them.
        async with answering_stdio_server() as (read_stream, write_stream):
            lowlevel = self._lowlevel_server
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())


# -- errors: the one place exceptions become tool results ----------------------------------------------


def error_result(tool: str, exc: BaseException) -> CallToolResult:
    """An `isError` result whose text says what went wrong and what to do; never a traceback."""
    return CallToolResult(content=[TextContent(type="text", text=error_message(tool, exc))], is_error=True)


def error_message(tool: str, exc: BaseException) -> str:
    cause: BaseException = exc
    # MCPServer wraps what a tool raises in ToolError / UnexpectedToolError; the original is the cause.
    while isinstance(cause, ToolError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, ValidationError):
        return _arguments_message(tool, cause)
    if isinstance(cause, PlannerError):
        return str(cause)
    if isinstance(cause, ToolError):
        text = str(cause).removeprefix(f"Error executing tool {tool}: ")
        if text.startswith("Unknown tool:"):
            return f"unknown tool {tool!r}: call tools/list to see this server's tools"
        return text
    if isinstance(cause, MCPError):
        return f"{tool} could not talk to the client: {cause.error.message}"
    log.error("tool %r crashed", tool, exc_info=cause)
    kind = type(cause).__name__
    return f"internal error in {tool} ({kind}); the server log has details. Try again or report it."


def _arguments_message(tool: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(part) for part in err["loc"]) or "arguments"
        lines.append(f"- {where}: {err['msg']}")
    return (
        f"invalid arguments for {tool} ({len(lines)} problem(s)):\n"
        + "\n".join(lines)
        + f"\nFix them and call {tool} again; its input schema is in tools/list."
    )


# -- the server ------------------------------------------------------------------------------------------


ServiceFactory = Callable[[], AbstractAsyncContextManager[PlannerService]]


def build_server(
    service: PlannerService | None = None,
    *,
    service_factory: ServiceFactory | None = None,
    name: str = "mcp-planner",
    auth_token: str | None = None,
) -> PlannerMCPServer:
    """The planner's MCP server over a service.

    Args:
        service: a running (entered) service, used as is: tests and embedding.
        service_factory: opens a service when the server starts and closes it when it stops; it is
            entered in the background so the server answers `initialize` without waiting for it.
        name: the server name announced to clients.
        auth_token: when set, HTTP requests must carry `Authorization: Bearer <auth_token>`.
    """
    if (service is None) == (service_factory is None):
        raise ValueError("pass exactly one of service or service_factory")
    state = ServiceState(service)

    @asynccontextmanager
    async def lifespan(app: MCPServer[Any]) -> AsyncIterator[None]:
        if service_factory is None:
            yield
            return
        stop = anyio.Event()
        state.ready = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_keep_service, service_factory, state, stop)
            try:
                yield
            finally:
                stop.set()

    tasks = PlannerTasks(state, error_result)
    server = PlannerMCPServer(
        name, instructions=INSTRUCTIONS, lifespan=lifespan, extensions=[tasks], **bearer_auth(auth_token)
    )
    server.middleware.append(legacy_tasks(tasks))
    server.planner = state
    register_tools(server, state)
    _register_resources(server, state)
    return server


async def _keep_service(factory: ServiceFactory, state: ServiceState, stop: anyio.Event) -> None:
    assert state.ready is not None
    try:
        async with factory() as service:
            state.service = service
            state.ready.set()
            await stop.wait()
    except Exception as exc:  # reported to every tool call instead of killing the server
        log.exception("the planner service failed")
        state.error = exc
    finally:
        state.service = None
        state.ready.set()


def _register_resources(server: PlannerMCPServer, state: ServiceState) -> None:
    async def load(plan_id: str) -> Any:
        service = await state.get()
        try:
            return await service.get_plan(plan_id)
        except PlanNotFoundError as exc:
            raise ResourceNotFoundError(str(exc)) from None

    @server.resource(
        "plan://{plan_id}",
        name="plan",
        description="A plan as JSON: fields, options, steps with results (large ones as preview + URI).",
        mime_type="application/json",
    )
    async def plan_resource(plan_id: str) -> str:
        return views.plan_view(await load(plan_id), limit=None).model_dump_json(indent=2)

    @server.resource(
        "plan://{plan_id}/graph",
        name="plan-graph",
        description="A plan's steps as a Mermaid flowchart, coloured by status.",
        mime_type="text/vnd.mermaid",
    )
    async def plan_graph(plan_id: str) -> str:
        return views.mermaid(await load(plan_id))

    @server.resource(
        "plan://{plan_id}/steps/{step_id}/result",
        name="step-result",
        description="One step's whole result as JSON: text, structured content and content blocks.",
        mime_type="application/json",
    )
    async def step_result(plan_id: str, step_id: str) -> str:
        plan = await load(plan_id)
        try:
            step = plan.step(step_id)
        except KeyError:
            raise ResourceNotFoundError(f"plan {plan_id!r} has no step {step_id!r}") from None
        if step.result is None:
            raise ResourceNotFoundError(
                f"step {step_id!r} of plan {plan_id!r} has no result ({step.status.value})"
            )
        return str(step.result.model_dump_json())


# -- running it ------------------------------------------------------------------------------------------


def service_factory(
    db_path: str | Path | None = None,
    servers_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    approval: ApprovalPolicy | str = "auto",
    runners: bool = True,
) -> ServiceFactory:
    """Opens the production stack (`stack.open_stack`) for the server.

    Args:
        db_path: the SQLite file or `postgresql://` URL (default `store.default_location()`).
        servers_file: the downstream servers, or None for none; `${VAR}` values expand from `env`.
        approval: the approval policy.
        runners: runs execute in runner processes started on demand, so they outlive this server (the
            default); else in this process.
    """

    @asynccontextmanager
    async def open_service() -> AsyncIterator[PlannerService]:
        # Import the heavy modules off the event loop, so initialize and tools/list are answered meanwhile.
        await anyio.to_thread.run_sync(_import_stack, servers_file is not None)
        from mcp_planner.stack import open_stack
        from mcp_planner.store import default_location

        db = db_path if db_path is not None else default_location()
        servers = Path(servers_file) if servers_file is not None else None
        async with open_stack(db, servers, env or {}, approval=approval, runners=runners) as stack:
            yield stack.service

    return open_service


def _import_stack(downstream: bool) -> None:
    import importlib

    for name in ("stack", *(("downstream.client",) if downstream else ())):
        importlib.import_module(f"mcp_planner.{name}")


async def serve(
    *,
    transport: Literal["stdio", "http"] | str = "stdio",
    host: str = "127.0.0.1",
    port: int = 8000,
    db_path: str | Path | None = None,
    servers_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    approval: ApprovalPolicy | str = "auto",
    auth_token: str | None = None,
    allowed_hosts: Sequence[str] = (),
) -> None:
    """Serve the planner over stdio or streamable HTTP until the client or a signal stops it.

    Args:
        transport: `stdio` (what agent configs launch) or `http` (streamable HTTP at /mcp).
        host: HTTP bind address.
        port: HTTP port.
        db_path: the SQLite file or `postgresql://` URL (default `store.default_location()`).
        servers_file: the servers file, loaded with `env` for `${VAR}` expansion.
        env: the environment for `servers_file`.
        approval: `auto`, `agent` or `human`.
        auth_token: HTTP only: the bearer token every request must carry (required off loopback).
        allowed_hosts: HTTP only: the Host names clients use (required off loopback); see `http_security`.

    Raises:
        ValueError: an unknown transport or approval policy, or HTTP off loopback without a token and
            allowed hosts.
    """
    if approval not in APPROVAL_POLICIES:
        raise ValueError(f"approval policy must be one of {', '.join(APPROVAL_POLICIES)}, not {approval!r}")
    if servers_file is not None:  # a bad file is reported before serving, not in the first tool call
        from mcp_planner.downstream.config import load_config

        load_config(Path(servers_file), env=env or {})
    http = transport in ("http", "streamable-http")
    if http:
        check_bind(host, auth_token=auth_token, allowed_hosts=allowed_hosts)
    if transport != "stdio" and not http:
        raise ValueError(f"transport must be stdio or http, not {transport!r}")
    service_closed = anyio.Event()
    server = build_server(
        service_factory=_reporting_close(
            service_factory(db_path, servers_file, env, approval=approval), service_closed
        ),
        auth_token=auth_token if http else None,
    )
    run: Callable[[], Awaitable[None]]
    if http:
        security = transport_security(host, port, allowed_hosts)
        run = partial(server.run_streamable_http_async, host=host, port=port, transport_security=security)
    else:
        run = server.run_stdio_async
    await _run_until_signalled(run, service_closed)


#: After SIGTERM or SIGINT, how long the service has to close (executions, store, downstream processes).
STOP_TIMEOUT = 5.0
#: Then how long the server has to return by itself before the process exits anyway.
EXIT_GRACE = 0.5


def _reporting_close(factory: ServiceFactory, closed: anyio.Event) -> ServiceFactory:
    @asynccontextmanager
    async def open_service() -> AsyncIterator[PlannerService]:
        try:
            async with factory() as service:
                yield service
        finally:
            closed.set()

    return open_service


async def _run_until_signalled(run: Callable[[], Awaitable[None]], service_closed: anyio.Event) -> None:
    """`run()` until it returns or SIGTERM/SIGINT stops it; a second signal exits at once."""
    if sys.platform == "win32":
        await run()
        return
    serving = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        await tg.start(_stop_on_signals, serving, service_closed)
        with serving:
            await run()
        tg.cancel_scope.cancel()


async def _stop_on_signals(
    serving: anyio.CancelScope,
    service_closed: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async with anyio.create_task_group() as tg:
            async for signum in signals:
                if serving.cancel_called:
                    log.info("second %s: exiting now", signal.Signals(signum).name)
                    _exit_now(128 + signum)
                log.info("%s: stopping (again to exit at once)", signal.Signals(signum).name)
                serving.cancel()
                tg.start_soon(_exit_when_closed, service_closed)


async def _exit_when_closed(service_closed: anyio.Event) -> None:
    # The SDK reads stdin in a worker thread that cancellation cannot interrupt, so a stopped stdio server
    # may never return while the client keeps stdin open; once the service has closed nothing is left.
    with anyio.move_on_after(STOP_TIMEOUT):
        await service_closed.wait()
    await anyio.sleep(EXIT_GRACE)
    _exit_now(0)


def _exit_now(code: int) -> NoReturn:
    logging.shutdown()
    with suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)
