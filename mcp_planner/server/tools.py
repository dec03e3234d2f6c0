"""The planner's twelve MCP tools and the `plan_task` prompt, registered on an `MCPServer`.

Each tool is a module-level function of the `ServiceState` and its typed arguments (validated by pydantic):
it calls `PlannerService` and returns a `CallToolResult` with structured content (the output schema is the
presentation model named in its return annotation) plus a few lines of text a model reads at a glance.
`register_tools` registers them with the state bound. Tools raise `PlannerError`s; `app.PlannerMCPServer`
turns every exception into an error result in one place.

Approval uses MCP elicitation through `Resolve(...)`, which asks the person mid-call on protocol versions
up to 2025-11-25 and through an `InputRequiredResult` round on 2026-07-28 and later.
"""

# No `from __future__ import annotations`: MCPServer reads tool and resolver signatures at registration.

import inspect
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import anyio
from mcp.server.elicitation import (
    AcceptedElicitation,
    CancelledElicitation,
    DeclinedElicitation,
    ElicitationResult,
)
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.resolve import Elicit, Resolve
from mcp_types import CallToolResult, InputRequiredResult, TextContent, ToolAnnotations
from mcp_types.version import is_version_at_least
from pydantic import BaseModel, Field

from mcp_planner import presentation as views
from mcp_planner.errors import PlanChangedError, PlannerError, PlanStateError, PlanValidationError
from mcp_planner.plan.model import ExecutionOptions, ExecutionPlan, PlanStatus, PlanSummary, StepSpec
from mcp_planner.service import PlannerService
from mcp_planner.store.base import PlanProgress

STARTUP_WAIT = 30.0

PlanId = Annotated[str, Field(min_length=1, max_length=200, description="the plan's id (from create_plan)")]
WaitSeconds = Annotated[
    float,
    Field(
        ge=0,
        le=600,
        description="seconds to wait for the plan to finish before returning its summary; the plan keeps "
        "running in a runner after that, even if this client exits (follow it with get_summary)",
    ),
]

_INPUTS = "JSON Schema (type object: properties, required, defaults) of values used as {{ inputs.<name> }}"
_OUTPUTS = "name -> template, e.g. '{{ steps.read.result | length }}': returned first when the plan ends"
_INPUT_VALUES = "values of the inputs (checked against the schema; defaults fill the rest)"


def _hints(*, read_only: bool, destructive: bool, idempotent: bool, open_world: bool) -> ToolAnnotations:
    return ToolAnnotations(
        read_only_hint=read_only,
        destructive_hint=destructive,
        idempotent_hint=idempotent,
        open_world_hint=open_world,
    )


_READ_ONLY = _hints(read_only=True, destructive=False, idempotent=True, open_world=False)


class ApprovalForm(BaseModel):
    """What the person approving a plan may add; accepting the form approves, declining rejects."""

    note: str = Field(default="", description="Optional note kept with your decision")


class ServiceState:
    """The service the tools use; set by the server's lifespan once the service has started."""

    def __init__(self, service: PlannerService | None = None) -> None:
        self.service = service
        self.error: BaseException | None = None
        self.ready: anyio.Event | None = None
        #: (request id, plan id) -> hash of the plan an approval question showed, so that what is approved
        #: is what was shown. Request ids repeat across HTTP sessions; with the plan id a clash is harmless.
        self.shown: dict[tuple[str, str], str] = {}

    async def get(self) -> PlannerService:
        if self.service is None and self.ready is not None and self.error is None:
            with anyio.move_on_after(STARTUP_WAIT):
                await self.ready.wait()
        if self.service is not None:
            return self.service
        if self.error is not None:
            raise PlannerError(f"the planner failed to start: {self.error}; check the server log")
        raise PlannerError("the planner is still starting: call this tool again in a few seconds")


# -- helpers ---------------------------------------------------------------------------------------------


def _result(model: BaseModel, text: str) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=text)], structured_content=model.model_dump(mode="json")
    )


def summary_result(summary: PlanSummary, lead: str | None = None) -> CallToolResult:
    view = views.summary_view(summary)
    text = views.summary_text(summary) + f"\nnext: {view.next_action}"
    structured = view.model_dump(mode="json")
    first = {"outputs": structured.pop("outputs"), "output_errors": structured.pop("output_errors")}
    # A step's empty fields (no error, no retries) say nothing: 20 steps cost ~40% fewer tokens without them.
    structured["steps"] = [
        {k: v for k, v in step.items() if v is not None and (k != "retry_count" or v)}
        for step in structured["steps"]
    ]
    return CallToolResult(
        content=[TextContent(type="text", text=f"{lead}\n{text}" if lead else text)],
        structured_content=first | structured,  # the answer first, as in the text
    )


def _can_elicit(ctx: Context[Any, Any]) -> bool:
    """Whether this client can be asked a form question during this call."""
    caps = ctx.client_capabilities
    elicitation = caps.elicitation if caps is not None else None
    # A bare `elicitation: {}` (before modes existed) means form support; url-only does not.
    if elicitation is None or (elicitation.form is None and elicitation.url is not None):
        return False
    version = ctx.protocol_version
    if version is not None and is_version_at_least(version, "2026-07-28"):
        return True  # asked through an InputRequiredResult round, no back-channel needed
    return bool(ctx.session.can_send_request)


def _client_name(ctx: Context[Any, Any]) -> str | None:
    params = ctx.session.client_params
    return params.client_info.name if params is not None and params.client_info is not None else None


async def _ask_person(plan_id: str, ctx: Context[Any, Any]) -> Elicit[ApprovalForm] | None:
    """Resolver for approve_plan: the elicitation to send, or None when nobody is to be asked."""
    state = getattr(ctx.mcp_server, "planner", None)
    if not isinstance(state, ServiceState):
        return None
    try:
        service = await state.get()
        if not _can_elicit(ctx):
            return None
        plan = await service.get_plan(plan_id)
        if plan.status not in (PlanStatus.DRAFT, PlanStatus.PENDING_APPROVAL):
            return None
        if service.approval == "agent" and not service.person_required(plan):
            return None
        await service.note_person_asked(plan_id)
        plan = await service.get_plan(plan_id)
    except PlannerError:
        return None  # the tool body reports it
    message = (
        views.plan_text(plan) + "\n\nApprove this plan? Accept to let it run (its steps call the tools above "
        "with these parameters); decline to reject it."
    )
    if len(state.shown) > 1000:  # questions never answered (the client gave up): forget them
        state.shown.clear()
    state.shown[ctx.request_id, plan_id] = plan.compute_hash()
    return Elicit(message, ApprovalForm)


_Fn = TypeVar("_Fn", bound=Callable[..., Awaitable[Any]])

#: (function, description, annotations) of each tool, in the order clients list them.
_TOOLS: list[tuple[Callable[..., Awaitable[Any]], str, ToolAnnotations]] = []
_PROMPTS: list[tuple[Callable[..., Awaitable[Any]], str]] = []


def _tool(description: str, annotations: ToolAnnotations) -> Callable[[_Fn], _Fn]:
    def record(fn: _Fn) -> _Fn:
        _TOOLS.append((fn, description, annotations))
        return fn

    return record


def _prompt(description: str) -> Callable[[_Fn], _Fn]:
    def record(fn: _Fn) -> _Fn:
        _PROMPTS.append((fn, description))
        return fn

    return record


def register_tools(server: MCPServer[Any], state: ServiceState) -> None:
    """Register the twelve planning tools and the `plan_task` prompt on `server`, over `state`."""
    for fn, description, annotations in _TOOLS:
        server.add_tool(_bound(fn, state), description=description, annotations=annotations)
    for fn, description in _PROMPTS:
        server.prompt(description=description)(_bound(fn, state))


def _bound(fn: Callable[..., Awaitable[Any]], state: ServiceState) -> Callable[..., Awaitable[Any]]:
    """`fn` with its first parameter (the state) given.

    MCPServer builds a tool's name, input schema and injected parameters (context, resolvers) from the
    function's name, `inspect.signature` and type hints, so the bound function shows those of `fn`
    without `state`: what clients see is exactly what `fn` declares.
    """

    async def bound(**arguments: Any) -> Any:
        return await fn(state, **arguments)

    signature = inspect.signature(fn)
    bound.__name__ = fn.__name__
    without_state = signature.replace(parameters=list(signature.parameters.values())[1:])
    bound.__signature__ = without_state  # type: ignore[attr-defined]
    bound.__annotations__ = {k: v for k, v in fn.__annotations__.items() if k != "state"}
    return bound


# -- the tools -------------------------------------------------------------------------------------------


@_tool(
    description="List the tools that plan steps can call: the tools of the downstream MCP servers this "
    "planner is connected to, by qualified name (`server.tool`), with parameter signature, description, "
    "input schema and annotations (readOnlyHint/idempotentHint mean a step is safe to retry). Pass "
    "`query` (what you need, in a few words) to get only the best matches across all servers. Call this "
    "first, before writing a plan. Also reports servers that failed to connect.",
    annotations=_READ_ONLY,
)
async def list_tools(
    state: ServiceState,
    server: Annotated[str | None, Field(description="only the tools of this downstream server")] = None,
    query: Annotated[
        str | None,
        Field(description="words of what you need, e.g. 'read file': the best-matching tools, best first"),
    ] = None,
    limit: Annotated[int, Field(ge=1, le=100, description="with query: at most this many tools")] = 10,
) -> Annotated[CallToolResult, views.ToolCatalog]:
    service = await state.get()
    catalog = await service.catalog()
    tools = [
        views.CatalogTool(
            name=info.name,
            server=info.server,
            description=info.description,
            input_schema=info.input_schema,
            annotations=dict(info.annotations),
        )
        for info in sorted(catalog.values(), key=lambda i: i.name)
        if server is None or info.server == server or info.name.startswith(f"{server}.")
    ]
    servers = views.server_views(service.server_status())
    if server is not None:
        servers = [s for s in servers if s.name == server]
        if not tools and not servers:
            known = sorted({i.server for i in catalog.values() if i.server})
            raise PlannerError(f"no downstream server named {server!r}; known servers: {known}")
    if query is not None:
        tools = views.rank_tools(tools, query, limit)
    result = views.ToolCatalog(tools=tools, servers=servers)
    return _result(result, views.catalog_text(result))


@_tool(
    description="Ask an LLM (the configured provider, or the client's by MCP sampling) to write a plan for a "
    "task, using the tools from list_tools; the plan is validated (and repaired up to 3 times) and stored. "
    "Returns the plan: show it to the user, then call approve_plan and execute_plan. If no LLM is "
    "available, draft the plan yourself (the plan_task prompt has the instructions) and call create_plan.",
    annotations=_hints(read_only=False, destructive=False, idempotent=False, open_world=False),
)
async def generate_plan(
    state: ServiceState,
    task: Annotated[str, Field(min_length=1, description="what the plan should achieve")],
    ctx: Context[Any, Any],
    context: Annotated[str | None, Field(description="background the planner should know")] = None,
    constraints: Annotated[
        list[str] | str | None, Field(description="rules the plan must follow: a list, or one string")
    ] = None,
    options: Annotated[
        ExecutionOptions | None, Field(description="execution options to apply (only those given)")
    ] = None,
) -> Annotated[CallToolResult, views.PlanView] | InputRequiredResult:
    from mcp_planner.generation.generator import PlanRequest
    from mcp_planner.generation.providers import LLMSettings, generate_with_provider
    from mcp_planner.generation.sampling import SamplingProvider, generate_with_sampling

    service = await state.get()
    request = PlanRequest(task=task, context=context, constraints=constraints, options=options)
    catalog = await service.catalog()
    llm = service.tools.llm
    # `auto`: the client's LLM when it samples, else the configured provider, else the "no sampling" error.
    if (
        isinstance(llm, LLMSettings)
        and llm.has_provider
        and not (llm.sampling_first and SamplingProvider(ctx).supported)
    ):
        generated: ExecutionPlan | InputRequiredResult = await generate_with_provider(
            llm.provider(), catalog, request
        )
    else:
        generated = await generate_with_sampling(ctx, catalog, request)
    if isinstance(generated, InputRequiredResult):
        return generated
    plan = await service.add_plan(generated)
    return _plan_result(plan, "generated and stored", service)


@_tool(
    description="Store a plan you wrote: a description and steps, each step calling one tool from "
    "list_tools with parameters. Steps run in order of their dependencies (`depends_on`: ids of earlier "
    "steps); a string parameter may use an earlier step's result as `{{ steps.<id>.result }}` (or "
    "`.result.<field>`, `.text`, `.json`), which also makes it a dependency. Give steps short readable "
    "ids. Set max_retries for flaky, idempotent calls only. A step can run once per item of a list "
    "(for_each), only if a condition holds (when), or fail on a check of its result (fail_if). Name the "
    "answer in `outputs`: it comes back first when the plan ends. The whole plan is validated against the "
    "tools' input schemas and refused with every problem listed; fix them all and call again. A new plan "
    "is pending_approval (call approve_plan) unless options.require_approval is false.",
    annotations=_hints(read_only=False, destructive=False, idempotent=False, open_world=False),
)
async def create_plan(
    state: ServiceState,
    description: Annotated[str, Field(description="what the plan achieves, in one sentence")],
    steps: Annotated[list[StepSpec], Field(description="the steps, in a sensible order")],
    options: Annotated[
        ExecutionOptions | None,
        Field(description="how to approve and run it (parallelism, error handling, timeouts)"),
    ] = None,
    inputs: Annotated[dict[str, Any] | None, Field(description=_INPUTS)] = None,
    outputs: Annotated[dict[str, str] | None, Field(description=_OUTPUTS)] = None,
    input_values: Annotated[dict[str, Any] | None, Field(description=_INPUT_VALUES)] = None,
) -> Annotated[CallToolResult, views.PlanView]:
    from mcp_planner.plan.model import PlanSpec

    service = await state.get()
    spec = PlanSpec(
        description=description,
        steps=steps,
        options=options or ExecutionOptions(),
        inputs=inputs,
        outputs=outputs or {},
    )
    with _naming_input_values():
        plan = await service.create_plan(spec, input_values)
    return _plan_result(plan, "created", service, whole=False)


@_tool(
    description="Replace the description, steps, options, inputs, outputs and/or input values of a plan "
    "that has not started yet (draft, pending_approval or approved). The plan is validated again, and any "
    "approval is cleared: call approve_plan again afterwards. To change a plan that already ran, create a "
    "new one.",
    annotations=_hints(read_only=False, destructive=True, idempotent=True, open_world=False),
)
async def update_plan(
    state: ServiceState,
    plan_id: PlanId,
    description: Annotated[str | None, Field(description="new description")] = None,
    steps: Annotated[list[StepSpec] | None, Field(description="new steps (replace all steps)")] = None,
    options: Annotated[ExecutionOptions | None, Field(description="new options (replace all)")] = None,
    inputs: Annotated[dict[str, Any] | None, Field(description="new inputs schema")] = None,
    outputs: Annotated[dict[str, str] | None, Field(description="new outputs (replace all)")] = None,
    input_values: Annotated[
        dict[str, Any] | None, Field(description="new input values (replace all)")
    ] = None,
) -> Annotated[CallToolResult, views.PlanView]:
    service = await state.get()
    with _naming_input_values():
        plan = await service.update_plan(
            plan_id,
            description=description,
            steps=steps,
            options=options,
            inputs=inputs,
            outputs=outputs,
            input_values=input_values,
        )
    return _plan_result(plan, "updated (any earlier approval was cleared)", service, whole=False)


@_tool(
    description="Approve a pending_approval plan so it can be executed. Show the plan to the user "
    "first. Depending on the server's approval policy the user may be asked to confirm in their client; "
    "if they decline, the plan is rejected. Approval pins the plan's content: editing it later needs a "
    "new approval. Next: execute_plan.",
    annotations=_hints(read_only=False, destructive=False, idempotent=True, open_world=False),
)
async def approve_plan(
    state: ServiceState,
    plan_id: PlanId,
    ctx: Context[Any, Any],
    decision: Annotated[ElicitationResult[ApprovalForm], Resolve(_ask_person)],
    approved_by: Annotated[
        str | None, Field(max_length=200, description="who approves (default: agent)")
    ] = None,
) -> Annotated[CallToolResult, views.ApprovalView]:
    service = await state.get()
    shown = state.shown.pop((ctx.request_id, plan_id), None)
    if isinstance(decision, DeclinedElicitation):
        await service.reject_plan(plan_id, "declined by the user when asked to approve", rejected_by="user")
        raise PlanStateError(
            f"the user declined plan {plan_id!r}: it is rejected (cancelled) and will never run. Ask the "
            "user what to change, then create a new plan"
        )
    if isinstance(decision, CancelledElicitation):
        raise PlanStateError(
            f"the user dismissed the approval request: plan {plan_id!r} is still pending_approval. Call "
            "approve_plan again when the user is ready, or reject_plan"
        )
    if isinstance(decision, AcceptedElicitation) and isinstance(decision.data, ApprovalForm):
        if shown is None:
            raise PlanChangedError(
                f"the approval of plan {plan_id!r} cannot be matched to what the user was shown: call "
                "approve_plan again"
            )
        client = _client_name(ctx)
        by = f"user via {client}" if client else "user"
        note = decision.data.note.strip() or None
        plan = await service.approve_plan(
            plan_id, approved_by=by, method="elicitation", note=note, expected_hash=shown
        )
        lead = f"plan {plan_id!r} approved by the user"
    else:  # nobody was asked: the service refuses if only a person may approve this plan
        plan = await service.approve_plan(plan_id, approved_by=approved_by or "agent", method="agent")
        lead = f"plan {plan_id!r} approved by {plan.approved_by}"
    view = views.approval_view(plan)
    return _result(view, f"{lead}; next: {view.next_action}")


@_tool(
    description="Reject a plan that has not started (draft, pending_approval or approved): it becomes "
    "cancelled and will never run. To stop a plan that is executing, use cancel_plan.",
    annotations=_hints(read_only=False, destructive=True, idempotent=True, open_world=False),
)
async def reject_plan(
    state: ServiceState,
    plan_id: PlanId,
    reason: Annotated[str, Field(min_length=1, max_length=2000, description="why; kept with the plan")],
) -> Annotated[CallToolResult, views.ApprovalView]:
    service = await state.get()
    plan = await service.reject_plan(plan_id, reason)
    return _result(views.approval_view(plan), f"plan {plan_id!r} rejected: {reason}")


@_tool(
    description="Execute an approved plan: its steps call the downstream tools (real side effects). "
    "Returns the plan's outputs first, then the summary, when the plan finishes or after wait_seconds, "
    "whichever comes first; a plan "
    "still executing keeps running in a runner process, even if this client exits: follow it with "
    "get_summary, stop it with cancel_plan. "
    "Sends progress notifications per step when the request has a progress token. Only for a plan that "
    "is approved (or needs no approval); for a failed or partial plan use resume_plan.",
    annotations=_hints(read_only=False, destructive=True, idempotent=False, open_world=True),
)
async def execute_plan(
    state: ServiceState, plan_id: PlanId, ctx: Context[Any, Any], wait_seconds: WaitSeconds = 50.0
) -> Annotated[CallToolResult, views.SummaryView]:
    service = await state.get()
    summary = await service.execute_plan(plan_id, wait_seconds=wait_seconds, on_progress=_progress(ctx))
    return summary_result(summary)


@_tool(
    description="Resume a failed or partial plan, or one left executing by a server that stopped: "
    "completed steps are kept and never re-run; failed, skipped and pending steps run again. A step "
    "that was interrupted mid-call (outcome unknown) is re-run only if that is safe (retries allowed, or "
    "a read-only/idempotent tool) or rerun_interrupted is true; otherwise it fails and the summary says "
    "so. Returns like execute_plan. Resuming a completed plan just returns its summary.",
    annotations=_hints(read_only=False, destructive=True, idempotent=False, open_world=True),
)
async def resume_plan(
    state: ServiceState,
    plan_id: PlanId,
    ctx: Context[Any, Any],
    rerun_interrupted: Annotated[
        bool, Field(description="re-run steps interrupted mid-call even if not known to be safe")
    ] = False,
    wait_seconds: WaitSeconds = 50.0,
) -> Annotated[CallToolResult, views.SummaryView]:
    service = await state.get()
    summary = await service.resume_plan(
        plan_id,
        rerun_interrupted=rerun_interrupted,
        wait_seconds=wait_seconds,
        on_progress=_progress(ctx),
    )
    return summary_result(summary)


@_tool(
    description="Cancel a plan. An executing plan stops: running tool calls are cancelled and the steps "
    "not finished are skipped. A plan not started yet is cancelled too. Cancelled is final: the plan can "
    "never run or be resumed again.",
    annotations=_hints(read_only=False, destructive=True, idempotent=True, open_world=False),
)
async def cancel_plan(
    state: ServiceState,
    plan_id: PlanId,
    reason: Annotated[
        str, Field(max_length=2000, description="why; kept with the plan")
    ] = "cancelled by the agent",
) -> Annotated[CallToolResult, views.SummaryView]:
    service = await state.get()
    summary = await service.cancel_plan(plan_id, reason)
    lead = None
    if summary.status == PlanStatus.EXECUTING:
        lead = "cancellation requested: the process executing the plan stops it within seconds"
    return summary_result(summary, lead)


@_tool(
    description="A plan's outputs (once it ended), status, step counts, progress (percent of steps "
    "completed), duration, and for each step its id, tool, status, duration, error and retry count. Cheap: "
    "use it to follow an executing plan.",
    annotations=_READ_ONLY,
)
async def get_summary(state: ServiceState, plan_id: PlanId) -> Annotated[CallToolResult, views.SummaryView]:
    service = await state.get()
    return summary_result(await service.get_summary(plan_id))


@_tool(
    description="The plan: options, approval, inputs, outputs, its steps (100 at a time: pass next_offset "
    "as offset for more) with parameters, dependencies, for_each items, conditions, status and result, and "
    "a Mermaid graph of the steps coloured by status. Results over 64 KiB are shown as a preview plus a "
    "plan:// resource URI to read them in full.",
    annotations=_READ_ONLY,
)
async def get_plan(
    state: ServiceState,
    plan_id: PlanId,
    offset: Annotated[int, Field(ge=0, description="the first step to list (see next_offset)")] = 0,
    limit: Annotated[int, Field(ge=1, le=1000, description="at most this many steps")] = views.PAGE_STEPS,
) -> Annotated[CallToolResult, views.PlanView]:
    service = await state.get()
    plan = await service.get_plan(plan_id)
    view = views.plan_view(plan, offset, limit)
    text = (
        views.plan_text(plan, offset=view.steps_offset, max_steps=limit, outcomes=True)
        + "\n"
        + views.summary_text(plan.summary(), outputs=False)  # the plan's text has them
        + f"\nnext: {view.next_action}"
    )
    return _result(view, text)


@_tool(
    description="Recent plans, newest first, optionally only those with one status (e.g. "
    "pending_approval, executing, failed).",
    annotations=_READ_ONLY,
)
async def list_plans(
    state: ServiceState,
    status: Annotated[PlanStatus | None, Field(description="only plans with this status")] = None,
    limit: Annotated[int, Field(ge=1, le=200, description="at most this many plans")] = 20,
) -> Annotated[CallToolResult, views.PlanList]:
    service = await state.get()
    plans = views.plan_list(await service.list_plans(status=status, limit=limit))
    return _result(plans, views.plan_list_text(plans))


@_prompt(
    description="The planning instructions with the tool catalog, for a task: for clients without "
    "sampling, so the agent drafts the plan itself and calls create_plan."
)
async def plan_task(state: ServiceState, task: str, context: str | None = None) -> str:
    from mcp_planner.generation.generator import render_planning_prompt

    service = await state.get()
    return render_planning_prompt(await service.catalog(), task, context, None, for_agent=True)


@contextmanager
def _naming_input_values() -> Iterator[None]:
    """A plan refused for its inputs says which of this tool's arguments hold them."""
    try:
        yield
    except PlanValidationError as exc:
        if not any(p.step_id is None and p.field.startswith("inputs") for p in exc.problems):
            raise
        message = "the plan is invalid (its inputs schema is `inputs`, their values `input_values`)"
        raise PlanValidationError(exc.problems, message) from exc


def _plan_result(plan: Any, verb: str, service: PlannerService, *, whole: bool = True) -> CallToolResult:
    """A plan's view, and as text the plan whole (`whole`: one the caller has not seen, a generated plan)
    or its outline (one the caller just wrote: repeating it back costs its tokens again)."""
    view = views.plan_view(plan)
    view.warnings = [str(w) for w in service.warnings(plan)]
    head = f"plan {plan.id!r} {verb}; status {plan.status.value}."
    warned = "".join(f"\nwarning: {w}" for w in view.warnings)
    body = views.plan_text(plan) if whole else _outline(plan)
    text = f"{head}{warned}\n{body}\nnext: {view.next_action}"
    return _result(view, text)


def _outline(plan: Any, limit: int = 20) -> str:
    """`2 steps: read (workspace.read_file, for each of 10), write (workspace.write_file, for each of 10)`."""
    parts = []
    for step in plan.steps[:limit]:
        extra = ""
        if isinstance(step.for_each, list):
            extra += f", for each of {len(step.for_each)}"
        elif step.for_each is not None:
            extra += ", for each"
        if step.when is not None:
            extra += ", when"
        parts.append(f"{step.id} ({step.tool_name}{extra})")
    more = f", and {len(plan.steps) - limit} more" if len(plan.steps) > limit else ""
    inputs = views.inputs_text(plan)  # with the defaults the caller did not write
    return f"{len(plan.steps)} step(s): {', '.join(parts)}{more}; get_plan shows it whole" + (
        f"\ninputs: {inputs}" if inputs else ""
    )


def _progress(ctx: Context[Any, Any]) -> Callable[[PlanProgress], Any]:
    async def report(progress: PlanProgress) -> None:
        await ctx.report_progress(progress.done, progress.total, views.progress_message(progress.events))

    return report
