"""Long runs as MCP tasks (SPEC 15): `execute_plan` and `resume_plan` answer with a task handle at once.

The submitted run of the run queue *is* the task: its id is the run's id, the run is committed before the
handle is returned, and every answer about it is read from the store (`get_run`, the plan's progress and
summary). So any planner process on the same store answers for any task, and nothing is lost when the
process that created it exits. A task's status is what happened to the `tools/call` it stands for:
`working` while the run is queued or executing; `completed` when it ended, with the result `execute_plan`
would have returned (a plan that failed is a completed call whose summary says `failed`, and a run the
runner refused is a completed call with an `isError` result); `cancelled` when the plan was cancelled. No
run ever waits for client input, so `input_required` never occurs.

Two wire eras:

- 2026-07-28, the Tasks extension (`io.modelcontextprotocol/tasks`, SEP-2663): a client that declares it
  on a request gets a `CreateTaskResult` (`resultType: "task"`) from `tools/call`; `tasks/get` inlines the
  final result, `tasks/update` and `tasks/cancel` acknowledge. Built on `Extension` (its
  `intercept_tool_call` and methods).
- 2025-11-25 (SEP-1686): a `tools/call` with `params.task` gets `{"task": ...}`; `tasks/get`,
  `tasks/result` (blocks until the end) and `tasks/cancel` answer with the task. The SDK checks every
  2025-11-25 `tools/call` result against `CallToolResult`, which a task handle is not, so this era's
  `tools/call` is answered by a server middleware (`legacy_tasks`) before that check. It also advertises
  `capabilities.tasks` in `initialize` and `execution.taskSupport` in `tools/list`, which the SDK's
  capability builder has no place for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver import require_client_extension
from mcp.shared.exceptions import MCPError
from mcp_types import (
    CallToolRequestParams,
    CallToolResult,
    CancelTaskRequestParams,
    GetTaskPayloadRequestParams,
    GetTaskRequestParams,
    RequestParams,
    TextContent,
)
from mcp_types.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ConfigDict, ValidationError

from mcp_planner.errors import PlannerError, PlanNotFoundError, PlanStateError, RunNotFoundError
from mcp_planner.plan.model import PlanStatus
from mcp_planner.server.tools import PlanId, ServiceState, WaitSeconds, summary_result
from mcp_planner.service import PlannerService
from mcp_planner.store.base import RunKind, RunRecord, RunState

log = logging.getLogger("mcp_planner.server.tasks")

TASKS_EXTENSION = "io.modelcontextprotocol/tasks"
#: The tools whose calls become tasks.
TASK_TOOLS = frozenset({"execute_plan", "resume_plan"})
#: The polling interval suggested to clients: a plan's steps take seconds, a look costs a few reads.
POLL_INTERVAL_MS = 1000
#: How often `tasks/result` (2025-11-25) looks at a run it waits for.
RESULT_POLL_S = 0.25
#: The first protocol version with task-augmented requests.
LEGACY_TASKS_VERSION = "2025-11-25"
RELATED_TASK_META_KEY = "io.modelcontextprotocol/related-task"

TaskStatus = Literal["working", "input_required", "completed", "failed", "cancelled"]
ErrorResult = Callable[[str, BaseException], CallToolResult]


class RunArguments(BaseModel):
    """The arguments of `execute_plan` / `resume_plan` a task needs; `wait_seconds` is accepted and unused
    (a task is followed with `tasks/get`)."""

    model_config = ConfigDict(extra="ignore")

    plan_id: PlanId
    rerun_interrupted: bool = False
    wait_seconds: WaitSeconds = 50.0


class UpdateTaskParams(RequestParams):
    task_id: str
    input_responses: dict[str, Any] | None = None


@dataclass(frozen=True)
class TaskState:
    """A run as a task, read from the store."""

    run: RunRecord
    status: TaskStatus
    message: str
    #: What `execute_plan` / `resume_plan` would have returned; set once the task is terminal.
    result: CallToolResult | None

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    def fields(self, *, modern: bool) -> dict[str, Any]:
        """The wire `Task` of either era (2026-07-28 adds `Ms` to `ttl`, `pollInterval`)."""
        run = self.run
        updated = run.finished_at or run.claimed_at or run.submitted_at
        return {
            "taskId": run.id,
            "status": self.status,
            "statusMessage": self.message,
            "createdAt": _iso(run.submitted_at),
            "lastUpdatedAt": _iso(updated),
            "ttlMs" if modern else "ttl": None,  # runs stay in the store: no expiry
            "pollIntervalMs" if modern else "pollInterval": POLL_INTERVAL_MS,
        }


class PlannerTasks(Extension):
    """The Tasks extension over the run queue, and the 2025-11-25 task methods.

    Args:
        state: the service the tools use.
        error_result: turns an exception into the tool error result the tool would have returned.
    """

    identifier = TASKS_EXTENSION

    def __init__(self, state: ServiceState, error_result: ErrorResult) -> None:
        self.state = state
        self.error_result = error_result

    def methods(self) -> Sequence[MethodBinding]:
        modern = frozenset(MODERN_PROTOCOL_VERSIONS)
        legacy = frozenset(v for v in HANDSHAKE_PROTOCOL_VERSIONS if v >= LEGACY_TASKS_VERSION)
        return (
            MethodBinding("tasks/get", GetTaskRequestParams, self._get, modern | legacy),
            MethodBinding("tasks/cancel", CancelTaskRequestParams, self._cancel, modern | legacy),
            MethodBinding("tasks/update", UpdateTaskParams, self._update, modern),
            MethodBinding("tasks/result", GetTaskPayloadRequestParams, self._result, legacy),
        )

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if params.name not in TASK_TOOLS or not _declares_extension(ctx):
            return await call_next(ctx)
        submitted = await self.submit(params.name, params.arguments)
        if submitted is None:  # arguments the tool itself must refuse
            return await call_next(ctx)
        if isinstance(submitted, CallToolResult):
            return submitted
        return {"resultType": "task", **submitted.fields(modern=True)}

    async def submit(
        self, tool: str, arguments: Mapping[str, Any] | None
    ) -> TaskState | CallToolResult | None:
        """Submit the run a call of `tool` asks for and return it as a task, committed.

        Returns a result instead when there is no run to follow: the error the tool would have returned (the
        plan cannot run), or a completed plan's summary (resume_plan, nothing to resume); None when the
        arguments are invalid, for the tool to report.
        """
        try:
            args = RunArguments.model_validate(arguments or {})
        except ValidationError:
            return None
        try:
            service = await self.state.get()
            if tool == "execute_plan":
                run: RunRecord | None = await service.submit_execute(args.plan_id)
            else:
                run = await service.submit_resume(args.plan_id, args.rerun_interrupted)
            if run is None:
                return summary_result(await service.get_summary(args.plan_id))
            return await task_state(service, run)
        except Exception as exc:  # what the tool would have answered (`app.error_result`), never a traceback
            return self.error_result(tool, exc)

    # -- the task methods ------------------------------------------------------------------------------

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: GetTaskRequestParams) -> dict[str, Any]:
        modern = _check_client(ctx)
        task = await self._look(params.task_id)
        fields = task.fields(modern=modern)
        if modern and task.status == "completed" and task.result is not None:
            fields["result"] = _wire(task.result)
        return fields

    async def _cancel(
        self, ctx: ServerRequestContext[Any, Any], params: CancelTaskRequestParams
    ) -> dict[str, Any]:
        modern = _check_client(ctx)
        task = await self._look(params.task_id)
        if task.terminal:
            if modern:  # cancellation is cooperative: a task that ended is acknowledged as is
                return {}
            raise MCPError(INVALID_PARAMS, f"Cannot cancel task {task.run.id!r}: it is already {task.status}")
        service = await self._service()
        try:
            await service.cancel_plan(
                task.run.plan_id, "cancelled by the client (tasks/cancel)", cancelled_by="client"
            )
        except PlanStateError as exc:  # it ended meanwhile
            log.debug("tasks/cancel of %s: %s", task.run.id, exc)
        return {} if modern else (await self._look(params.task_id)).fields(modern=False)

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskParams) -> dict[str, Any]:
        _check_client(ctx)
        await self._look(params.task_id)  # no run asks for input: responses are acknowledged and ignored
        return {}

    async def _result(
        self, ctx: ServerRequestContext[Any, Any], params: GetTaskPayloadRequestParams
    ) -> dict[str, Any]:
        """2025-11-25 `tasks/result`: the tool's result once the task has ended (it waits until then)."""
        task = await self._look(params.task_id)
        while not task.terminal:
            await anyio.sleep(RESULT_POLL_S)
            task = await self._look(params.task_id)
        assert task.result is not None
        wire = _wire(task.result)
        wire["_meta"] = {**wire.get("_meta", {}), RELATED_TASK_META_KEY: {"taskId": task.run.id}}
        return wire

    async def _service(self) -> PlannerService:
        try:
            return await self.state.get()
        except PlannerError as exc:
            raise MCPError(INTERNAL_ERROR, str(exc)) from None

    async def _look(self, task_id: str) -> TaskState:
        service = await self._service()
        try:
            run = await service.store.get_run(task_id)
            if run.state == RunState.QUEUED:
                await service.tend_queued_run(run)  # a runner that never came up must not leave it waiting
                run = await service.store.get_run(task_id)
            return await task_state(service, run)
        except (RunNotFoundError, PlanNotFoundError):
            raise MCPError(
                INVALID_PARAMS,
                f"Failed to retrieve task: no task {task_id!r} in this planner's store (task ids are the "
                "taskId of an execute_plan or resume_plan task handle)",
            ) from None
        except PlannerError as exc:
            raise MCPError(INTERNAL_ERROR, f"Failed to retrieve task {task_id!r}: {exc}") from None


async def task_state(service: PlannerService, run: RunRecord) -> TaskState:
    """The run as a task, from what the store says now."""
    progress = await service.store.progress(run.plan_id)
    tool = "execute_plan" if run.kind == RunKind.EXECUTE else "resume_plan"
    if run.state != RunState.DONE:
        counts = f"{progress.done}/{progress.total} steps done"
        if run.state == RunState.QUEUED:
            return TaskState(run, "working", f"queued for a runner; plan {progress.status.value}", None)
        return TaskState(run, "working", f"plan {progress.status.value}: {counts}", None)
    if progress.status == PlanStatus.CANCELLED and await _is_last_run(service, run):
        summary = await service.get_summary(run.plan_id)
        return TaskState(
            run, "cancelled", f"plan cancelled: {summary.error or 'cancelled'}", summary_result(summary)
        )
    if run.error is not None:  # the runner refused the run, or it crashed: the tool's error result
        result = CallToolResult(content=[TextContent(type="text", text=run.error)], is_error=True)
        return TaskState(run, "completed", f"{tool} failed: {run.error}", result)
    summary = await service.get_summary(run.plan_id)
    return TaskState(run, "completed", f"plan {summary.status.value}", summary_result(summary))


async def _is_last_run(service: PlannerService, run: RunRecord) -> bool:
    last = await service.store.last_run(run.plan_id)
    return last is not None and last.id == run.id


def _declares_extension(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether this request's client declared the Tasks extension (2026-07-28: on the request itself)."""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return False
    capabilities = ctx.session.client_capabilities
    return capabilities is not None and TASKS_EXTENSION in (capabilities.extensions or {})


def _check_client(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether the request is of the 2026-07-28 era, whose client must declare the extension (-32021)."""
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        require_client_extension(ctx, TASKS_EXTENSION)
        return True
    return False


def _wire(result: CallToolResult) -> dict[str, Any]:
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


# -- 2025-11-25 ------------------------------------------------------------------------------------------


def legacy_tasks(extension: PlannerTasks) -> ServerMiddleware[Any]:
    """The server middleware for 2025-11-25 task-augmented `tools/call` (see the module docstring)."""

    async def middleware(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        params = ctx.params or {}
        if (
            ctx.method == "tools/call"
            and ctx.protocol_version == LEGACY_TASKS_VERSION
            and params.get("task") is not None
            and params.get("name") in TASK_TOOLS
            and ctx.session.client_params is not None  # initialized: else the SDK's own refusal
        ):
            submitted = await extension.submit(str(params["name"]), params.get("arguments"))
            if submitted is None:
                return await call_next(ctx)
            if isinstance(submitted, CallToolResult):
                return _wire(submitted)
            return {"task": submitted.fields(modern=False)}
        result = await call_next(ctx)
        if isinstance(result, dict):
            _advertise(ctx, result)
        return result

    return middleware


def _advertise(ctx: ServerRequestContext[Any, Any], result: dict[str, Any]) -> None:
    """2025-11-25 clients learn from `initialize` that tools/call can be a task, cancelled with
    `tasks/cancel`, and from `tools/list` which tools may be."""
    if ctx.method == "initialize" and result.get("protocolVersion") == LEGACY_TASKS_VERSION:
        capabilities = result.setdefault("capabilities", {})
        capabilities["tasks"] = {"cancel": {}, "requests": {"tools": {"call": {}}}}
    elif ctx.method == "tools/list" and ctx.protocol_version == LEGACY_TASKS_VERSION:
        for tool in result.get("tools", []):
            if tool.get("name") in TASK_TOOLS:
                tool["execution"] = {"taskSupport": "optional"}
