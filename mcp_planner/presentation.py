"""Views of plans for people and models: summaries, plan views with result previews, Mermaid, short text.

No I/O and no MCP types: the MCP server returns these models as structured content (their JSON schemas are
the tools' output schemas) and the CLI prints them. A result larger than `RESULT_PREVIEW_LIMIT` is shown as
its first `PREVIEW_CHARS` characters of text plus the `plan://<plan_id>/steps/<step_id>/result` URI from
which it can be read in full.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from mcp_planner.engine.tools import ServerState, ServerStatus
from mcp_planner.plan.model import (
    CONDITION_FALSE,
    RESULT_PREVIEW_LIMIT,
    SUMMARY_STEPS,
    ExecutionOptions,
    ExecutionPlan,
    PlanStatus,
    PlanSummary,
    Step,
    StepItem,
    StepResult,
    StepStatus,
    StepSummary,
    attention_first,
)
from mcp_planner.store.base import Event, RunnerInfo

#: How much of a large result's text a preview shows.
PREVIEW_CHARS = 2048
#: How many steps a plan view holds at once (get_plan pages through the rest with `offset`).
PAGE_STEPS = 100
#: Plans with more steps than this get no Mermaid graph (nobody reads one that large).
MERMAID_MAX_STEPS = 200
#: How much of one output's value the text of a summary shows (the structured content has it whole).
OUTPUT_CHARS = 2000
#: How many failed items of a `for_each` step a view names, with their errors.
FAILED_ITEMS = 3

_STATUS_MARK = {
    StepStatus.PENDING: "·",
    StepStatus.RUNNING: "…",
    StepStatus.COMPLETED: "✓",
    StepStatus.FAILED: "✗",
    StepStatus.SKIPPED: "-",
}

#: Mermaid classDef styles by step status.
_STATUS_STYLE = {
    StepStatus.PENDING: "fill:#eeeeee,stroke:#999999,color:#333333",
    StepStatus.RUNNING: "fill:#cce5ff,stroke:#0066cc,color:#003366",
    StepStatus.COMPLETED: "fill:#d4edda,stroke:#28a745,color:#155724",
    StepStatus.FAILED: "fill:#f8d7da,stroke:#dc3545,color:#721c24",
    StepStatus.SKIPPED: "fill:#fff3cd,stroke:#c69500,color:#6b5200,stroke-dasharray:4 3",
}


def result_uri(plan_id: str, step_id: str) -> str:
    return f"plan://{plan_id}/steps/{step_id}/result"


def next_action(plan: ExecutionPlan | PlanSummary) -> str:
    """What an agent should do next with a plan in this status, in one sentence."""
    status = plan.status
    pid = plan.id if isinstance(plan, ExecutionPlan) else plan.plan_id
    return {
        PlanStatus.DRAFT: f"call approve_plan({pid!r}) or execute_plan({pid!r})",
        PlanStatus.PENDING_APPROVAL: f"show the plan to the user, then call approve_plan({pid!r}) "
        f"or reject_plan({pid!r})",
        PlanStatus.APPROVED: f"call execute_plan({pid!r})",
        PlanStatus.EXECUTING: f"a runner executes it (it goes on if this client exits): call "
        f"get_summary({pid!r}) to follow it",
        PlanStatus.COMPLETED: f"done: get_plan({pid!r}) shows each step's result",
        PlanStatus.FAILED: f"read the failed steps' errors, fix the cause, then call resume_plan({pid!r}) "
        "to re-run what did not complete",
        PlanStatus.PARTIAL: f"read the failed steps' errors, fix the cause, then call resume_plan({pid!r}) "
        "to re-run what did not complete",
        PlanStatus.CANCELLED: "nothing: a cancelled plan never runs again; create a new plan if needed",
    }[status]


# -- models (the MCP tools' output schemas) ------------------------------------------------------------


class SummaryView(PlanSummary):
    """A plan's status, counts, progress and its steps' states (all of them, up to a limit: those that need
    attention first), with what to do next."""

    next_action: str = Field(description="what to call next for this plan")


class ResultView(BaseModel):
    """A step's result, or for a large one a preview plus the URI that holds it whole."""

    text: str = Field(description="the result's text (for a large result, its first part)")
    structured: Any = Field(default=None, description="structured content, when small enough to show")
    content: list[dict[str, Any]] = Field(
        default_factory=list, description="non-text content blocks (images, resources), when small"
    )
    truncated: bool = Field(default=False, description="true when this is only a preview")
    size: int = Field(description="the full result's size in bytes of JSON")
    uri: str | None = Field(default=None, description="resource URI to read the whole result")


class FailedItem(BaseModel):
    index: int
    value: str = Field(description="the item, as JSON (shortened)")
    error: str | None = None
    retry_count: int = 0


class ItemsView(BaseModel):
    """A for_each step's items, once its list is known."""

    total: int
    completed: int
    failed: int
    failed_items: list[FailedItem] = Field(default_factory=list, description="the first failed items")


class StepView(BaseModel):
    id: str
    index: int
    tool_name: str
    description: str
    parameters: dict[str, Any]
    depends_on: list[str]
    status: StepStatus
    error: str | None = None
    retry_count: int = 0
    max_retries: int = 0
    timeout_ms: int | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    duration_ms: int | None = None
    result: ResultView | None = None
    for_each: list[Any] | str | None = None
    max_parallel_items: int = 0
    allow_item_failures: bool = False
    items: ItemsView | None = None
    when: str | None = None
    fail_if: str | None = None


class PlanView(BaseModel):
    """The plan: fields, options, approval, its steps (a page of them) with results, and a Mermaid graph."""

    id: str
    description: str
    status: PlanStatus
    options: ExecutionOptions
    user_approved: bool
    approved_by: str | None = None
    approved_at: datetime | None = None
    approval_method: str | None = None
    rejection_note: str | None = None
    error: str | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    total_duration_ms: int | None = None
    progress: float
    inputs: dict[str, Any] | None = Field(default=None, description="JSON Schema of the inputs")
    input_values: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict, description="name -> template")
    output_values: dict[str, Any] = Field(default_factory=dict, description="as rendered at the end")
    output_errors: dict[str, str] = Field(default_factory=dict, description="outputs not rendered, why")
    steps: list[StepView] = Field(description="the steps from `steps_offset` on, at most a page of them")
    steps_total: int = Field(description="how many steps the plan has")
    steps_offset: int = Field(default=0, description="the position of the first step listed")
    next_offset: int | None = Field(
        default=None, description="pass as `offset` to read the next page of steps; null: none left"
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="what may be wrong though the plan is valid, e.g. an unknown parameter",
    )
    mermaid: str | None = Field(
        default=None,
        description=f"Mermaid flowchart of the steps by status (none for over {MERMAID_MAX_STEPS} steps)",
    )
    next_action: str


class PlanListItem(BaseModel):
    id: str
    description: str
    status: PlanStatus
    total_steps: int
    completed: int
    progress: float
    created_at: datetime
    updated_at: datetime


class PlanList(BaseModel):
    plans: list[PlanListItem] = Field(description="newest first")


# -- builders -------------------------------------------------------------------------------------------


def shown_steps(steps: Sequence[StepSummary], limit: int = SUMMARY_STEPS) -> list[StepSummary]:
    """Every step of a small plan; of a larger one, the `limit` steps a reader needs first, in plan order."""
    return [steps[i] for i in attention_first([s.status for s in steps], limit)]


def summary_view(plan: ExecutionPlan | PlanSummary) -> SummaryView:
    summary = plan.summary(SUMMARY_STEPS) if isinstance(plan, ExecutionPlan) else plan
    shown = shown_steps(summary.steps)
    fields = {name: getattr(summary, name) for name in PlanSummary.model_fields}
    fields |= {"steps": shown, "steps_omitted": summary.steps_omitted + len(summary.steps) - len(shown)}
    return SummaryView.model_construct(**fields, next_action=next_action(summary))


def result_view(plan_id: str, step_id: str, result: StepResult) -> ResultView:
    size = result.size()
    if size <= RESULT_PREVIEW_LIMIT:
        return ResultView(
            text=result.text, structured=result.structured, content=_non_text(result), size=size
        )
    text = result.text or json.dumps(result.structured, default=str)
    return ResultView(
        text=text[:PREVIEW_CHARS],
        truncated=True,
        size=size,
        uri=result_uri(plan_id, step_id),
    )


def _non_text(result: StepResult) -> list[dict[str, Any]]:
    return [block for block in result.content if block.get("type") != "text"]


def items_view(step: Step) -> ItemsView | None:
    """A `for_each` step's item counts and first failed items (None before its list is known)."""
    items = step.items
    if items is None:
        return None
    failed = _failed_items(items)
    return ItemsView(
        total=len(items),
        completed=sum(1 for item in items if item.status == StepStatus.COMPLETED),
        failed=len(failed),
        failed_items=[
            FailedItem(
                index=i, value=_json_line(item.value, 200), error=item.error, retry_count=item.retry_count
            )
            for i, item in failed[:FAILED_ITEMS]
        ],
    )


def _failed_items(items: Sequence[StepItem]) -> list[tuple[int, StepItem]]:
    return [(i, item) for i, item in enumerate(items) if item.status == StepStatus.FAILED]


def step_view(plan_id: str, step: Step) -> StepView:
    return StepView(
        id=step.id,
        index=step.index,
        tool_name=step.tool_name,
        description=step.description,
        parameters=step.parameters,
        depends_on=step.depends_on,
        status=step.status,
        error=step.error,
        retry_count=step.retry_count,
        max_retries=step.max_retries,
        timeout_ms=step.timeout_ms,
        started_at=step.started_at,
        completed_at=step.completed_at,
        duration_ms=step.duration_ms,
        result=result_view(plan_id, step.id, step.result) if step.result is not None else None,
        for_each=step.for_each,
        max_parallel_items=step.max_parallel_items,
        allow_item_failures=step.allow_item_failures,
        items=items_view(step),
        when=step.when,
        fail_if=step.fail_if,
    )


def plan_view(plan: ExecutionPlan, offset: int = 0, limit: int | None = PAGE_STEPS) -> PlanView:
    """The plan with the steps from `offset` on, `limit` of them (None: all)."""
    total = len(plan.steps)
    offset = min(max(offset, 0), total)
    end = total if limit is None else min(total, offset + max(limit, 1))
    method = plan.metadata.get("approval_method")
    return PlanView(
        id=plan.id,
        description=plan.description,
        status=plan.status,
        options=plan.options,
        user_approved=plan.user_approved,
        approved_by=plan.approved_by,
        approved_at=plan.approved_at,
        approval_method=method if isinstance(method, str) else None,
        rejection_note=plan.rejection_note,
        error=plan.error,
        created_at=plan.created_at,
        updated_at=plan.updated_at,
        started_at=plan.started_at,
        completed_at=plan.completed_at,
        total_duration_ms=plan.total_duration_ms,
        progress=plan.summary().progress,
        inputs=plan.inputs,
        input_values=plan.input_values,
        outputs=plan.outputs,
        output_values=plan.output_values,
        output_errors=plan.output_errors,
        steps=[step_view(plan.id, s) for s in plan.steps[offset:end]],
        steps_total=total,
        steps_offset=offset,
        next_offset=end if end < total else None,
        mermaid=mermaid(plan) if total <= MERMAID_MAX_STEPS else None,
        next_action=next_action(plan),
    )


def plan_list(plans: list[ExecutionPlan]) -> PlanList:
    items = []
    for plan in plans:
        summary = plan.summary()
        items.append(
            PlanListItem(
                id=plan.id,
                description=plan.description,
                status=plan.status,
                total_steps=summary.total_steps,
                completed=summary.completed,
                progress=summary.progress,
                created_at=plan.created_at,
                updated_at=plan.updated_at,
            )
        )
    return PlanList(plans=items)


# -- Mermaid --------------------------------------------------------------------------------------------


def mermaid(plan: ExecutionPlan) -> str:
    """A `flowchart TD` of the steps (edges from dependency to dependent), nodes coloured by status.

    A `for_each` step's node says `for each ×<items>` (and how many failed), a step with a condition or a
    check shows it, and the edges into a step with `when` are dashed: it may run whatever they did.
    Node ids are `s<index>` because step ids may hold characters Mermaid reserves; labels are quoted.
    """
    node = {s.id: f"s{i}" for i, s in enumerate(plan.steps)}
    lines = ["flowchart TD"]
    for status, style in _STATUS_STYLE.items():
        lines.append(f"  classDef {status.value} {style}")
    for i, s in enumerate(plan.steps):
        label = "<br/>".join(_mermaid_text(part) for part in _node_lines(s))
        lines.append(f'  s{i}["{label}"]:::{s.status.value}')
    for i, s in enumerate(plan.steps):
        arrow = "-.->" if s.when is not None else "-->"
        for dep in s.depends_on:
            if dep in node:
                lines.append(f"  {node[dep]} {arrow} s{i}")
    return "\n".join(lines)


def _node_lines(step: Step) -> list[str]:
    lines = [step.id, step.tool_name, step.status.value]
    if step.for_each is not None:
        each = "for each"
        if step.items is not None:
            each += f" ×{len(step.items)}"
            failed = len(_failed_items(step.items))
            each += f", {failed} failed" if failed else ""
        elif isinstance(step.for_each, list):  # known before the run
            each += f" ×{len(step.for_each)}"
        lines.append(each)
    if step.when is not None:
        lines.append(f"when {one_line(step.when, 60)}")
    if step.fail_if is not None:
        lines.append(f"fail if {one_line(step.fail_if, 60)}")
    return lines


#: Characters that would end a quoted label, open a tag or start a markdown string, as Mermaid entity codes
#: (`#` first: the codes themselves start with it).
_MERMAID_ESCAPES = (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;"), ("`", "#96;"))


def _mermaid_text(text: str) -> str:
    for char, code in _MERMAID_ESCAPES:
        text = text.replace(char, code)
    return text


# -- words and numbers (the CLI lays these out with rich) ------------------------------------------------


def one_line(text: str, limit: int = 200) -> str:
    """`text` with its whitespace flattened, cut to `limit` characters (an ellipsis marks the cut)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def duration_text(ms: int | None) -> str:
    """`850 ms`, `12.3 s`, or empty when unknown."""
    if ms is None:
        return ""
    return f"{ms} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def timestamp_text(at: datetime | None) -> str:
    """Local time to the second, or empty."""
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if at else ""


def retries_text(count: int) -> str:
    return f"{count} retr{'y' if count == 1 else 'ies'}"


def counts_text(summary: PlanSummary) -> str:
    """`3/5 completed, 1 failed, 1 running`: the completed count always, the others when not zero."""
    counts = (
        (summary.failed, "failed"),
        (summary.skipped, "skipped"),
        (summary.running, "running"),
        (summary.pending, "pending"),
    )
    done = f"{summary.completed}/{summary.total_steps} completed"
    return done + "".join(f", {n} {name}" for n, name in counts if n)


def run_mode(plan: ExecutionPlan) -> str:
    """How the steps run: `up to 4 in parallel, stop at the first failure`."""
    options = plan.options
    mode = f"up to {options.slots} in parallel" if options.allow_parallel else "one at a time"
    stops = options.stop_on_error and not options.continue_on_error
    return mode + (", stop at the first failure" if stops else ", continue after a failure")


def result_preview(result: StepResult, limit: int = 200) -> str:
    """A result on one line: its structured content as JSON when it has some, else its text."""
    value = result.value
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return one_line(text, limit)


def parameters_text(schema: dict[str, Any] | None, *, types: bool = False) -> str:
    """A tool's parameter names from its input schema, optional ones marked `?`; with `types`, each with
    its JSON type (or its enum values): `path: string, recursive?: boolean`."""
    properties = schema.get("properties") if schema else None
    if not isinstance(properties, dict):
        return ""
    required = set(schema.get("required", [])) if schema else set()
    params = []
    for param, spec in properties.items():
        text = f"{param}{'' if param in required else '?'}"
        if types:
            kind = spec.get("type", "any") if isinstance(spec, dict) else "any"
            if isinstance(spec, dict) and isinstance(spec.get("enum"), list):
                kind = "|".join(json.dumps(v) for v in spec["enum"][:6])
            elif isinstance(kind, list):
                kind = "|".join(map(str, kind))
            text += f": {kind}"
        params.append(text)
    return ", ".join(params)


def tool_hints(annotations: Mapping[str, Any]) -> list[str]:
    """The annotations that matter to a plan: `read-only`, `idempotent`, `destructive`."""
    names = (
        ("read-only", "readOnlyHint"),
        ("idempotent", "idempotentHint"),
        ("destructive", "destructiveHint"),
    )
    return [name for name, key in names if annotations.get(key)]


def event_line(event: Event, step: StepSummary | None = None) -> str | None:
    """The log line for one step event (started, retry, completed, failed, skipped) or item event of a
    `for_each` step (`item    read[3] failed: ...`), given the step as it was before it (for its tool and
    retries); None for other events."""
    data, sid = event.data, event.step_id
    match event.kind:
        case "item_completed":
            return f"item    {sid}[{data.get('item')}] done"
        case "item_failed":
            retries = data.get("retries")
            after = f" (after {retries_text(retries)})" if isinstance(retries, int) and retries else ""
            return f"item    {sid}[{data.get('item')}] failed{after}: {_event_error(data)}"
        case "item_retry":
            return f"retry   {sid}[{data.get('item')}] (retry {data.get('retry')}): {_event_error(data)}"
        case "step_started":
            return f"start   {sid} -> {step.tool_name}" if step is not None else f"start   {sid}"
        case "step_retry":
            return f"retry   {sid} (retry {data.get('retry')}): {_event_error(data)}"
        case "step_completed":
            retries = f", {retries_text(step.retry_count)}" if step is not None and step.retry_count else ""
            return f"done    {sid} ({duration_text(data.get('duration_ms'))}{retries})"
        case "step_failed":
            return f"FAILED  {sid}: {data.get('error') or 'no error message'}"
        case "step_skipped":
            reason = str(data.get("reason", ""))
            if reason.startswith(CONDITION_FALSE):
                return f"skipped {sid} by its condition: {one_line(reason.removeprefix(CONDITION_FALSE))}"
            return f"skipped {sid}: {one_line(reason)}"
    return None


def _event_error(data: Mapping[str, Any]) -> str:
    return one_line(str(data.get("error") or "no error message"))


#: The status a step event leaves its step in.
_EVENT_STATUS = {
    "step_started": StepStatus.RUNNING,
    "step_retry": StepStatus.RUNNING,
    "step_completed": StepStatus.COMPLETED,
    "step_failed": StepStatus.FAILED,
    "step_skipped": StepStatus.SKIPPED,
}


def apply_event(step: StepSummary, event: Event) -> StepSummary:
    """`step` as it is after `event` (one of its own step events); unchanged by any other event."""
    status = _EVENT_STATUS.get(event.kind)
    if status is None:
        return step
    data = event.data
    update: dict[str, Any] = {"status": status}
    if event.kind == "step_started":
        update |= {"duration_ms": None, "error": None, "retry_count": 0}
    elif event.kind == "step_retry":
        update |= {"retry_count": data.get("retry", step.retry_count), "error": data.get("error")}
    elif event.kind == "step_completed":
        update |= {"duration_ms": data.get("duration_ms"), "error": None}
    else:
        update |= {"error": data.get("error", data.get("reason"))}
    return step.model_copy(update=update)


#: What an item event of a `for_each` step says happened to the item.
_ITEM_EVENTS = {"item_completed": "completed", "item_failed": "failed", "item_retry": "retrying"}


def progress_message(events: Sequence[Event], limit: int = 5) -> str | None:
    """What the newest step and item events say, e.g. "step 'a' completed; item read[3] failed; step 'b'
    running" (None: nothing moved)."""
    parts = []
    for e in events:
        if e.kind in _EVENT_STATUS:
            parts.append(f"step {e.step_id!r} {_EVENT_STATUS[e.kind].value}")
        elif e.kind in _ITEM_EVENTS:
            parts.append(f"item {e.step_id}[{e.data.get('item')}] {_ITEM_EVENTS[e.kind]}")
    return "; ".join(parts[-limit:]) or None


# -- short text -----------------------------------------------------------------------------------------


def summary_text(
    summary: PlanSummary, *, steps: bool = True, max_steps: int = SUMMARY_STEPS, outputs: bool = True
) -> str:
    """A few lines a model reads at a glance: the plan's outputs first (with `outputs`; the answer, when
    the plan has one), the status line, then one line per step (of a large plan, the steps that need
    attention first)."""
    head = f"plan {summary.plan_id!r} ({summary.description}): {summary.status.value}, {counts_text(summary)}"
    if summary.duration_ms is not None:
        head += f", {duration_text(summary.duration_ms)}"
    lines = outputs_lines(summary.outputs, summary.output_errors) if outputs else []
    lines.append(head)
    if summary.error:
        lines.append(f"  error: {summary.error}")
    if steps:
        for s in shown_steps(summary.steps, max_steps):
            line = f"  {_STATUS_MARK[s.status]} {s.id} [{s.tool_name}] {s.status.value}"
            if s.duration_ms is not None:
                line += f" {duration_text(s.duration_ms)}"
            if s.retry_count:
                line += f", {retries_text(s.retry_count)}"
            if s.error:
                line += f": {one_line(s.error)}"
            lines.append(line)
        omitted = summary.steps_omitted + max(len(summary.steps) - max_steps, 0)
        if omitted:
            lines.append(f"  ... and {omitted} more steps (get_plan lists them all)")
    return "\n".join(lines)


def outputs_lines(
    outputs: Mapping[str, Any], errors: Mapping[str, str], limit: int = OUTPUT_CHARS
) -> list[str]:
    """`outputs:` then `  name: value` per output (a string as it is, with its lines indented; anything
    else as JSON), each cut at `limit` characters with where to read it whole, then those that could not
    be rendered with why; no lines for a plan without outputs."""
    if not outputs and not errors:
        return []
    lines = ["outputs:"]
    for name, value in outputs.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        if len(text) > limit:
            text = (
                f"{text[:limit]}… ({len(text) - limit} more characters: the whole value is outputs.{name} in "
                "the structured content, also from get_summary)"
            )
        lines.append(f"  {name}: " + text.replace("\n", "\n    "))
    for name, error in errors.items():
        lines.append(f"  {name}: not rendered: {one_line(error.removeprefix('not rendered: '))}")
    return lines


def plan_text(
    plan: ExecutionPlan,
    *,
    max_param_chars: int = 300,
    max_steps: int = 200,
    offset: int = 0,
    outcomes: bool = False,
) -> str:
    """The plan as a person approving it reads it: one line per step with its tool and parameters (the
    steps from `offset` on, `max_steps` of them), what each iterates over (`for_each`, and its items once
    known) and checks (`when`, `fail_if`), the values of the plan's inputs and its outputs (templates, and
    values once rendered); with `outcomes`, each step's status and result or error under it, so the text
    alone is enough to read a plan that ran."""
    lines = [f"Plan {plan.id!r}: {plan.description}"]
    inputs = inputs_text(plan)
    if inputs:
        lines.append(f"inputs: {inputs}")
    lines.append(f"{len(plan.steps)} step(s):")
    shown = plan.steps[offset : offset + max_steps]
    for i, s in enumerate(shown, offset + 1):
        params = json.dumps(s.parameters, sort_keys=True, default=str)
        if len(params) > max_param_chars:
            params = params[:max_param_chars] + "…"
        notes = [f"after {', '.join(s.depends_on)}"] if s.depends_on else []
        notes += [f"up to {retries_text(s.max_retries)}"] if s.max_retries else []
        lines.append(f"{i}. {s.id}: {s.tool_name} {params}" + (f" ({'; '.join(notes)})" if notes else ""))
        if s.description:
            lines.append(f"   {one_line(s.description)}")
        lines += [f"   {line}" for line in language_lines(s)]
        if outcomes and s.status != StepStatus.PENDING:
            lines.append(f"   {_outcome_text(plan.id, s)}")
    rest = len(plan.steps) - offset - len(shown)
    if rest > 0:
        lines.append(f"... and {rest} more steps (get_plan with offset={offset + len(shown)} shows them)")
    lines.append(f"Steps run {run_mode(plan)}.")
    if plan.outputs:
        lines.append("outputs:")
        for name, template in plan.outputs.items():
            line = f"  {name} = {one_line(template, 200)}"
            if name in plan.output_values:
                line += f" -> {_json_line(plan.output_values[name], 300)}"
            elif name in plan.output_errors:
                line += f" -> not rendered: {one_line(plan.output_errors[name])}"
            lines.append(line)
    return "\n".join(lines)


def inputs_text(plan: ExecutionPlan) -> str:
    """The plan's inputs with their values: `pattern = "*.md", limit = 10, tag (not set)` (the schema's
    properties, then any other value given); empty for a plan without inputs."""
    properties = (plan.inputs or {}).get("properties")
    names = list(properties) if isinstance(properties, dict) else []
    names += [name for name in plan.input_values if name not in names]
    parts = []
    for name in names:
        if name in plan.input_values:
            parts.append(f"{name} = {_json_line(plan.input_values[name], 100)}")
        else:
            parts.append(f"{name} (not set)")
    return ", ".join(parts)


def language_lines(step: Step) -> list[str]:
    """What a step iterates over and what decides whether it runs or fails: `for each of ...` (with its
    items once known), `when ...`, `fail if ...`; none for a plain step."""
    lines = []
    if step.for_each is not None:
        each = step.for_each if isinstance(step.for_each, str) else _json_line(step.for_each, 200)
        line = f"for each of {one_line(each, 200)}"
        notes = [f"up to {step.max_parallel_items} at once"] if step.max_parallel_items else []
        notes += ["item failures allowed"] if step.allow_item_failures else []
        lines.append(line + (f" ({', '.join(notes)})" if notes else ""))
        if step.items is not None:
            lines.append(items_text(step))
    if step.when is not None:
        lines.append(f"when {one_line(step.when, 200)}")
    if step.fail_if is not None:
        lines.append(f"fail if {one_line(step.fail_if, 200)}")
    return lines


def items_text(step: Step) -> str:
    """`items: 12 (10 completed, 2 failed); read[3] "b.md": error; ...`: a `for_each` step's item counts
    and its first failed items with their errors (empty before its list is known)."""
    items = step.items
    if items is None:
        return ""
    counts = dict.fromkeys(StepStatus, 0)
    for item in items:
        counts[item.status] += 1
    text = f"items: {len(items)}"
    shown = [f"{counts[s]} {s.value}" for s in _ITEM_ORDER if counts[s]]
    text += f" ({', '.join(shown)})" if shown else ""
    failed = _failed_items(items)
    for i, item in failed[:FAILED_ITEMS]:
        text += f"; {step.id}[{i}] {_json_line(item.value, 60)}: {one_line(item.error or 'failed', 150)}"
    if len(failed) > FAILED_ITEMS:
        text += f"; and {len(failed) - FAILED_ITEMS} more failed"
    return text


_ITEM_ORDER = (
    StepStatus.COMPLETED,
    StepStatus.FAILED,
    StepStatus.RUNNING,
    StepStatus.PENDING,
    StepStatus.SKIPPED,
)


def _json_line(value: Any, limit: int) -> str:
    return one_line(json.dumps(value, ensure_ascii=False, default=str), limit)


def _outcome_text(plan_id: str, step: Step) -> str:
    """`-> completed in 12 ms: {"n": 1}`, with the URI of a result too large to show whole."""
    head = f"-> {step.status.value}" + (f" in {duration_text(step.duration_ms)}" if step.duration_ms else "")
    if step.retry_count:
        head += f" after {retries_text(step.retry_count)}"
    if step.result is not None:
        size = step.result.size()
        more = f" (first part of {size} bytes; whole: {result_uri(plan_id, step.id)})"
        return f"{head}: {result_preview(step.result, 500)}" + (more if size > RESULT_PREVIEW_LIMIT else "")
    return f"{head}: {one_line(step.error)}" if step.error else head


def plan_list_text(plans: PlanList) -> str:
    if not plans.plans:
        return "no plans"
    return "\n".join(
        f"{p.id} {p.status.value} {p.completed}/{p.total_steps} {p.description}" for p in plans.plans
    )


# -- the tool catalog and approvals ---------------------------------------------------------------------


class CatalogTool(BaseModel):
    name: str = Field(description="the name plan steps use as tool_name: server.tool")
    server: str | None = None
    description: str = ""
    input_schema: dict[str, Any] | None = None
    annotations: dict[str, Any] = Field(default_factory=dict)


class ServerView(BaseModel):
    name: str
    state: str = Field(description="connected, connecting, failed, disabled, ... as the server reports")
    error: str | None = None


def rank_tools(tools: Sequence[CatalogTool], query: str, limit: int) -> list[CatalogTool]:
    """The `limit` tools that match `query` best, best first; tools matching no word of it are left out.

    A word found in a tool's name counts 3, in a parameter name 2, in its description 1 (case-insensitive,
    also as a prefix: "file" finds "files" and "filesystem").
    """
    words = [w for w in re.findall(r"[a-z0-9]+", query.lower()) if len(w) > 1]
    scored = []
    for position, tool in enumerate(tools):
        params = " ".join((tool.input_schema or {}).get("properties", {}) or {})
        fields = [(_words(tool.name), 3), (_words(params), 2), (_words(tool.description), 1)]
        score = sum(weight for word in words for text, weight in fields if re.search(rf"\b{word}", text))
        if score:
            scored.append((-score, position, tool))
    return [tool for _, _, tool in sorted(scored)[:limit]]


def _words(text: str) -> str:
    """`text` lower-cased with `_` and `-` as word breaks, so "file" is a word of "read_file"."""
    return re.sub(r"[_\-]", " ", text.lower())


class ToolCatalog(BaseModel):
    tools: list[CatalogTool]
    servers: list[ServerView] = Field(default_factory=list, description="downstream servers and their state")


class ApprovalView(BaseModel):
    plan_id: str
    status: PlanStatus
    approved_by: str | None = None
    approval_method: str | None = None
    rejection_note: str | None = None
    next_action: str


def approval_view(plan: ExecutionPlan) -> ApprovalView:
    method = plan.metadata.get("approval_method")
    return ApprovalView(
        plan_id=plan.id,
        status=plan.status,
        approved_by=plan.approved_by,
        approval_method=method if isinstance(method, str) and plan.user_approved else None,
        rejection_note=plan.rejection_note,
        next_action=next_action(plan),
    )


def server_views(status: Mapping[str, ServerStatus]) -> list[ServerView]:
    return [ServerView(name=s.name, state=s.state.value, error=s.error) for _, s in sorted(status.items())]


def signature(name: str, schema: dict[str, Any] | None) -> str:
    """`fs.list(path: string, recursive?: boolean)`: a tool's parameters as a model reads them at a glance."""
    return f"{name}({parameters_text(schema, types=True)})"


def catalog_text(catalog: ToolCatalog, *, max_tools: int = 100) -> str:
    lines = [f"{len(catalog.tools)} tool(s) available to plan steps:"]
    for tool in catalog.tools[:max_tools]:
        hints = tool_hints(tool.annotations)
        suffix = f" ({', '.join(hints)})" if hints else ""
        about = f": {one_line(tool.description, 120)}" if tool.description else ""
        lines.append(f"  {signature(tool.name, tool.input_schema)}{suffix}{about}")
    if len(catalog.tools) > max_tools:
        lines.append(f"  ... and {len(catalog.tools) - max_tools} more (see structured content)")
    for server in catalog.servers:
        if server.error or server.state != ServerState.CONNECTED:
            lines.append(
                f"server {server.name!r}: {server.state}" + (f" ({server.error})" if server.error else "")
            )
    return "\n".join(lines)


def runner_lines(runners: Sequence[RunnerInfo]) -> list[str]:
    """One line per live runner: pid, host, since when, runs executed, servers file."""
    lines = []
    for runner in runners:
        host, _, rest = runner.id.partition(":")
        pid = rest.partition(":")[0]
        if runner.servers is None:
            serves = "servers: none"
        elif "#" in runner.servers:  # "<servers file>#<sha256 of its content>"
            serves = f"servers {runner.servers.rpartition('#')[0]}"
        else:  # a process running its own submissions (a foreground `run`, the library)
            serves = "in-process, its own runs only"
        lines.append(
            f"runner pid {pid} on {host}: since {timestamp_text(runner.started_at)}, {runner.runs} run(s), "
            f"{serves}"
        )
    return lines
