"""Terminal rendering for the command line: plan tables, summaries and the live progress display.

Everything here draws from the model (`ExecutionPlan`, `PlanSummary`) and `rich`; nothing does I/O other
than writing to the console it is given, so `cli.py` stays about commands and exit codes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from mcp_planner.engine.tools import ServerState, ServerStatus, ToolInfo
from mcp_planner.plan.model import ExecutionPlan, PlanStatus, PlanSummary, StepStatus, StepSummary

STEP_STYLES: dict[StepStatus, str] = {
    StepStatus.PENDING: "dim",
    StepStatus.RUNNING: "bold cyan",
    StepStatus.COMPLETED: "green",
    StepStatus.FAILED: "bold red",
    StepStatus.SKIPPED: "yellow",
}
PLAN_STYLES: dict[PlanStatus, str] = {
    PlanStatus.DRAFT: "dim",
    PlanStatus.PENDING_APPROVAL: "magenta",
    PlanStatus.APPROVED: "blue",
    PlanStatus.EXECUTING: "bold cyan",
    PlanStatus.COMPLETED: "bold green",
    PlanStatus.FAILED: "bold red",
    PlanStatus.PARTIAL: "bold yellow",
    PlanStatus.CANCELLED: "yellow",
}


def shorten(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def duration(ms: int | None) -> str:
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms} ms"
    return f"{ms / 1000:.2f} s"


def timestamp(at: datetime | None) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if at else ""


def plan_status_text(status: PlanStatus) -> Text:
    return Text(status.value, style=PLAN_STYLES.get(status, ""))


def step_status_text(status: StepStatus) -> Text:
    return Text(status.value, style=STEP_STYLES.get(status, ""))


def _mode(plan: ExecutionPlan) -> str:
    options = plan.options
    mode = f"parallel, up to {options.slots} at once" if options.allow_parallel else "one step at a time"
    return f"{len(plan.steps)} step(s), {mode}"


def print_plan(console: Console, plan: ExecutionPlan, title: str) -> None:
    """The plan as it will run (what `run` shows before asking, `approve` before approving).

    A table on a terminal; plain lines otherwise, which stay readable in CI logs.
    """
    if console.is_terminal:
        console.print(plan_table(plan, title))
        return
    console.print(
        f"{title}: {plan.description} ({_mode(plan)})", markup=False, highlight=False, soft_wrap=True
    )
    for step in plan.steps:
        params = json.dumps(step.parameters, ensure_ascii=False, default=str)
        after = f" after {', '.join(step.depends_on)}" if step.depends_on else ""
        retries = f" retries={step.max_retries}" if step.max_retries else ""
        console.print(
            f"  {step.index + 1:>3}. {step.id} -> {step.tool_name} {shorten(params, 200)}{after}{retries}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def plan_table(plan: ExecutionPlan, title: str) -> Table:
    table = Table(
        title=f"{escape(title)}: {escape(plan.description)}", caption=_mode(plan), title_justify="left"
    )
    table.add_column("#", justify="right", style="dim")
    table.add_column("step", style="bold")
    table.add_column("tool")
    table.add_column("depends on")
    table.add_column("parameters", overflow="fold")
    table.add_column("retries", justify="right")
    for step in plan.steps:
        params = json.dumps(step.parameters, ensure_ascii=False, default=str)
        table.add_row(
            str(step.index + 1),
            escape(step.id),
            escape(step.tool_name),
            escape(", ".join(step.depends_on)),
            escape(shorten(params, 100)),
            str(step.max_retries) if step.max_retries else "",
        )
    return table


def steps_table(summary: PlanSummary, *, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("step", style="bold")
    table.add_column("tool")
    table.add_column("status")
    table.add_column("duration", justify="right")
    table.add_column("retries", justify="right")
    table.add_column("error", overflow="fold", style="red")
    for step in summary.steps:
        table.add_row(
            escape(step.id),
            escape(step.tool_name),
            step_status_text(step.status),
            duration(step.duration_ms),
            str(step.retry_count) if step.retry_count else "",
            escape(step.error or ""),
        )
    return table


def summary_renderable(summary: PlanSummary, *, steps: bool = True) -> RenderableType:
    """The summary's head line (status, counts, duration), its error, and the steps table if `steps`."""
    head = Text.assemble(
        ("Plan ", "bold"),
        (summary.plan_id, "bold"),
        " ",
        plan_status_text(summary.status),
        f"  {summary.completed}/{summary.total_steps} completed",
        f", {summary.failed} failed" if summary.failed else "",
        f", {summary.skipped} skipped" if summary.skipped else "",
        f", {summary.pending} pending" if summary.pending else "",
        f" in {duration(summary.duration_ms)}" if summary.duration_ms is not None else "",
    )
    parts: list[RenderableType] = [steps_table(summary), head] if steps else [head]
    if summary.error:
        parts.append(Text(f"error: {summary.error}", style="red"))
    return Group(*parts)


def summary_lines(summary: PlanSummary) -> list[str]:
    """The summary as plain lines, for logs and CI output."""
    lines = [
        f"plan {summary.plan_id} {summary.status.value}: {summary.completed}/{summary.total_steps} "
        f"completed, {summary.failed} failed, {summary.skipped} skipped"
        + (f" in {duration(summary.duration_ms)}" if summary.duration_ms is not None else "")
    ]
    if summary.error:
        lines.append(f"error: {summary.error}")
    for step in summary.steps:
        extra = f" ({duration(step.duration_ms)})" if step.duration_ms is not None else ""
        retries = (
            f" after {step.retry_count} retr{'y' if step.retry_count == 1 else 'ies'}"
            if step.retry_count
            else ""
        )
        error = f": {step.error}" if step.error else ""
        lines.append(f"  {step.id:<20} {step.status.value:<10} {step.tool_name}{extra}{retries}{error}")
    return lines


def plans_table(plans: Iterable[ExecutionPlan]) -> Table:
    table = Table(title="Plans (newest first)", title_justify="left")
    table.add_column("id", style="bold")
    table.add_column("status")
    table.add_column("steps", justify="right")
    table.add_column("progress", justify="right")
    table.add_column("created")
    table.add_column("duration", justify="right")
    table.add_column("description", overflow="fold")
    for plan in plans:
        summary = plan.summary()
        table.add_row(
            plan.id,
            plan_status_text(plan.status),
            str(summary.total_steps),
            f"{summary.progress:.0f}%",
            timestamp(plan.created_at),
            duration(plan.total_duration_ms),
            escape(shorten(plan.description, 70)),
        )
    return table


def plan_details(plan: ExecutionPlan) -> Table:
    """The plan's own fields as a two-column grid (for `show`)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    grid.add_row("plan", plan.id)
    grid.add_row("description", escape(plan.description))
    grid.add_row("status", plan_status_text(plan.status))
    if plan.approved_by:
        method = plan.metadata.get("approval_method")
        how = f" ({method})" if method else ""
        grid.add_row("approved", f"by {escape(plan.approved_by)}{how} at {timestamp(plan.approved_at)}")
    if plan.rejection_note:
        grid.add_row("rejected", escape(plan.rejection_note))
    grid.add_row("created", timestamp(plan.created_at))
    if plan.started_at:
        grid.add_row("started", timestamp(plan.started_at))
    if plan.completed_at:
        grid.add_row("finished", f"{timestamp(plan.completed_at)} ({duration(plan.total_duration_ms)})")
    if plan.error:
        grid.add_row("error", Text(plan.error, style="red"))
    grid.add_row("options", escape(json.dumps(plan.options.model_dump(mode="json"))))
    return grid


def results_table(plan: ExecutionPlan, limit: int = 80) -> Table:
    table = Table(title="Results", title_justify="left")
    table.add_column("step", style="bold")
    table.add_column("result (preview)", overflow="fold")
    for step in plan.steps:
        if step.result is None:
            continue
        value = step.result.value
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        table.add_row(escape(step.id), escape(shorten(text, limit)))
    return table


def tools_table(catalog: Mapping[str, ToolInfo]) -> Table:
    table = Table(title="Tools plan steps can call", title_justify="left")
    table.add_column("tool", style="bold")
    table.add_column("parameters")
    table.add_column("hints")
    table.add_column("description", overflow="fold")
    for name in sorted(catalog):
        info = catalog[name]
        table.add_row(
            escape(name),
            escape(_parameters(info.input_schema)),
            _hints(info),
            escape(shorten(info.description, 80)),
        )
    return table


_STATE_STYLES = {ServerState.CONNECTED: "green", ServerState.FAILED: "bold red", ServerState.DISABLED: "dim"}


def servers_table(status: Mapping[str, ServerStatus]) -> Table:
    """Each downstream server's state, tool count and error (from `Downstream.status()`)."""
    table = Table(title="Downstream servers", title_justify="left")
    table.add_column("server", style="bold")
    table.add_column("state")
    table.add_column("tools", justify="right")
    table.add_column("error", overflow="fold", style="red")
    for _, server in sorted(status.items()):
        table.add_row(
            escape(server.name),
            Text(server.state.value, style=_STATE_STYLES.get(server.state, "yellow")),
            str(server.tool_count),
            escape(server.error or ""),
        )
    return table


def _parameters(schema: dict[str, Any] | None) -> str:
    if not schema:
        return ""
    required = set(schema.get("required", []))
    names = [f"{name}{'' if name in required else '?'}" for name in schema.get("properties", {})]
    return ", ".join(names)


def _hints(info: ToolInfo) -> str:
    hints = []
    if info.annotations.get("readOnlyHint"):
        hints.append("read-only")
    if info.annotations.get("idempotentHint"):
        hints.append("idempotent")
    if info.annotations.get("destructiveHint"):
        hints.append("destructive")
    return ", ".join(hints)


class ProgressDisplay:
    """Shows a running plan: a progress bar and a per-step status table, or plain lines off a terminal.

    Feed it summaries with `update`; it works out what changed. Plain mode prints one line per step
    transition (started, retrying, completed, failed, skipped), which reads well in CI logs.
    """

    def __init__(self, console: Console, summary: PlanSummary, *, live: bool | None = None) -> None:
        self._console = console
        self._live_mode = console.is_terminal if live is None else live
        self._last: dict[str, StepSummary] = {s.id: s for s in summary.steps}
        self._summary = summary
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task: TaskID = self._progress.add_task(
            f"plan {summary.plan_id}", total=summary.total_steps or 1
        )
        self._live: Live | None = None

    def __enter__(self) -> ProgressDisplay:
        if self._live_mode:
            self._live = Live(
                self._renderable(), console=self._console, refresh_per_second=8, transient=False
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._renderable(), refresh=True)
            self._live.__exit__(None, None, None)
            self._live = None

    def _renderable(self) -> RenderableType:
        return Group(self._progress, steps_table(self._summary))

    def update(self, summary: PlanSummary) -> None:
        done = summary.completed + summary.failed + summary.skipped
        self._progress.update(self._task, completed=done, total=summary.total_steps or 1)
        if self._live is not None:
            self._summary = summary
            self._live.update(self._renderable())
        else:
            for step in summary.steps:
                line = _transition(self._last.get(step.id), step)
                if line:
                    self._console.print(line, markup=False, highlight=False, soft_wrap=True)
            self._summary = summary
        self._last = {s.id: s for s in summary.steps}


def _transition(before: StepSummary | None, now: StepSummary) -> str | None:
    if before is not None and before.status == now.status and before.retry_count == now.retry_count:
        return None
    if now.status == StepStatus.RUNNING:
        if before is not None and before.status == StepStatus.RUNNING:
            return f"retry   {now.id} (retry {now.retry_count})"
        return f"start   {now.id} -> {now.tool_name}"
    if now.status == StepStatus.COMPLETED:
        retries = (
            f", {now.retry_count} retr{'y' if now.retry_count == 1 else 'ies'}" if now.retry_count else ""
        )
        return f"done    {now.id} ({duration(now.duration_ms)}{retries})"
    if now.status == StepStatus.FAILED:
        return f"FAILED  {now.id}: {now.error or 'no error message'}"
    if now.status == StepStatus.SKIPPED:
        return f"skipped {now.id}: {now.error or ''}"
    return None
