"""Terminal rendering for the command line: plan tables, summaries and the live progress display.

The words and numbers (durations, counts, previews, hints, step transitions) come from `presentation`;
this module only lays them out with `rich`. Nothing does I/O other than writing to the console it is
given, so `main.py` stays about commands and exit codes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from mcp_planner import presentation as views
from mcp_planner.engine.tools import ServerState, ServerStatus, ToolInfo
from mcp_planner.plan.model import ExecutionPlan, PlanStatus, PlanSummary, StepStatus, StepSummary
from mcp_planner.store.base import PlanProgress

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


def plan_status_text(status: PlanStatus) -> Text:
    return Text(status.value, style=PLAN_STYLES.get(status, ""))


def step_status_text(status: StepStatus) -> Text:
    return Text(status.value, style=STEP_STYLES.get(status, ""))


def print_plan(console: Console, plan: ExecutionPlan, title: str) -> None:
    """The plan as it will run (what `run` shows before asking, `approve` before approving): its steps,
    what each iterates over and checks, the values of its inputs and the outputs it returns.

    A table on a terminal; plain lines otherwise, which stay readable in CI logs.
    """
    if not console.is_terminal:
        console.print(views.plan_text(plan), markup=False, highlight=False, soft_wrap=True)
        return
    console.print(plan_table(plan, title))
    inputs = views.inputs_text(plan)
    if inputs:
        console.print(f"inputs: {inputs}", markup=False, highlight=False, soft_wrap=True)
    for name, template in plan.outputs.items():
        console.print(f"output {name} = {template}", markup=False, highlight=False, soft_wrap=True)


def output_text(value: Any, limit: int = views.OUTPUT_CHARS) -> str:
    """An output's value as a person reads it: a string as it is, anything else as JSON; cut at `limit`."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > limit:
        text = text[:limit] + f"… ({len(text) - limit} more characters; `mcp-planner show ID --json` has all)"
    return text


def outputs_renderable(outputs: Mapping[str, Any], errors: Mapping[str, str]) -> RenderableType | None:
    """The outputs as a titled grid (name, value), those not rendered in red; None without outputs."""
    if not outputs and not errors:
        return None
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for name, value in outputs.items():
        grid.add_row(escape(name), escape(output_text(value)))
    for name, error in errors.items():
        grid.add_row(escape(name), Text(f"not rendered: {error}", style="red"))
    return Group(Text("Outputs", style="bold"), grid)


def plan_table(plan: ExecutionPlan, title: str) -> Table:
    table = Table(
        title=f"{escape(title)}: {escape(plan.description)}",
        caption=f"{len(plan.steps)} step(s), {views.run_mode(plan)}",
        title_justify="left",
    )
    table.add_column("#", justify="right", style="dim")
    table.add_column("step", style="bold")
    table.add_column("tool")
    table.add_column("depends on")
    table.add_column("parameters", overflow="fold")
    table.add_column("retries", justify="right")
    with_logic = any(views.language_lines(step) for step in plan.steps)
    if with_logic:
        table.add_column("for each / conditions", overflow="fold")
    for step in plan.steps:
        params = json.dumps(step.parameters, ensure_ascii=False, default=str)
        row = [
            str(step.index + 1),
            escape(step.id),
            escape(step.tool_name),
            escape(", ".join(step.depends_on)),
            escape(views.one_line(params, 100)),
            str(step.max_retries) if step.max_retries else "",
        ]
        if with_logic:
            row.append(escape("\n".join(views.language_lines(step))))
        table.add_row(*row)
    return table


def steps_table(
    summary: PlanSummary, *, title: str | None = None, plan: ExecutionPlan | None = None
) -> Table:
    """Each step's status, duration, retries and error; given the `plan`, also what each step iterates
    over (with its item counts) and checks, when any step does."""
    table = Table(title=title, title_justify="left")
    table.add_column("step", style="bold")
    table.add_column("tool")
    table.add_column("status")
    table.add_column("duration", justify="right")
    table.add_column("retries", justify="right")
    language = {step.id: views.language_lines(step) for step in plan.steps} if plan is not None else {}
    with_language = any(language.values())
    if with_language:
        table.add_column("for each / conditions", overflow="fold")
    table.add_column("error", overflow="fold", style="red")
    for step in summary.steps:
        row: list[RenderableType] = [
            escape(step.id),
            escape(step.tool_name),
            step_status_text(step.status),
            views.duration_text(step.duration_ms),
            str(step.retry_count) if step.retry_count else "",
        ]
        if with_language:
            row.append(escape("\n".join(language.get(step.id, []))))
        row.append(escape(step.error or ""))
        table.add_row(*row)
    return table


def summary_renderable(summary: PlanSummary, *, steps: bool = True) -> RenderableType:
    """The plan's outputs first, then the steps table if `steps`, the summary's head line (status, counts,
    duration) and its error."""
    head = Text.assemble(
        ("Plan ", "bold"),
        (summary.plan_id, "bold"),
        " ",
        plan_status_text(summary.status),
        f"  {views.counts_text(summary)}",
        f" in {views.duration_text(summary.duration_ms)}" if summary.duration_ms is not None else "",
    )
    outputs = outputs_renderable(summary.outputs, summary.output_errors)
    parts: list[RenderableType] = [] if outputs is None else [outputs]
    parts += [steps_table(summary), head] if steps else [head]
    if summary.error:
        parts.append(Text(f"error: {summary.error}", style="red"))
    return Group(*parts)


def summary_lines(summary: PlanSummary) -> list[str]:
    """The summary as plain lines, for logs and CI output: the outputs first, then every step, however
    many."""
    return views.summary_text(summary, max_steps=len(summary.steps)).splitlines()


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
            views.timestamp_text(plan.created_at),
            views.duration_text(plan.total_duration_ms),
            escape(views.one_line(plan.description, 70)),
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
        grid.add_row(
            "approved", f"by {escape(plan.approved_by)}{how} at {views.timestamp_text(plan.approved_at)}"
        )
    if plan.rejection_note:
        grid.add_row("rejected", escape(plan.rejection_note))
    grid.add_row("created", views.timestamp_text(plan.created_at))
    if plan.started_at:
        grid.add_row("started", views.timestamp_text(plan.started_at))
    if plan.completed_at:
        grid.add_row(
            "finished",
            f"{views.timestamp_text(plan.completed_at)} ({views.duration_text(plan.total_duration_ms)})",
        )
    if plan.error:
        grid.add_row("error", Text(plan.error, style="red"))
    grid.add_row("options", escape(json.dumps(plan.options.model_dump(mode="json"))))
    inputs = views.inputs_text(plan)
    if inputs:
        grid.add_row("inputs", escape(inputs))
    for name, template in plan.outputs.items():
        if name in plan.output_values:
            value: RenderableType = escape(output_text(plan.output_values[name]))
        elif name in plan.output_errors:
            value = Text(f"not rendered: {plan.output_errors[name]}", style="red")
        else:
            value = Text("rendered when the plan ends", style="dim")
        grid.add_row(f"output {escape(name)}", value)
        grid.add_row("", Text(template, style="dim"))
    return grid


def results_table(plan: ExecutionPlan, limit: int = 80) -> Table:
    table = Table(title="Results", title_justify="left")
    table.add_column("step", style="bold")
    table.add_column("result (preview)", overflow="fold")
    for step in plan.steps:
        if step.result is None:
            continue
        table.add_row(escape(step.id), escape(views.result_preview(step.result, limit)))
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
            escape(views.parameters_text(info.input_schema)),
            ", ".join(views.tool_hints(info.annotations)),
            escape(views.one_line(info.description, 80)),
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


class ProgressDisplay:
    """Shows a running plan: a progress bar and a step status table, or plain lines off a terminal.

    Feed it the plan's progress with `update`: the events since the last call move the steps. Plain mode
    prints one line per step event (started, retrying, completed, failed, skipped), which reads well in CI
    logs. `show` puts a final summary on display.
    """

    def __init__(self, console: Console, summary: PlanSummary, *, live: bool | None = None) -> None:
        self._console = console
        self._live_mode = console.is_terminal if live is None else live
        self._steps: dict[str, StepSummary] = {s.id: s for s in summary.steps}
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
        shown = views.shown_steps(self._summary.steps)  # of a large plan, the steps that need attention
        return Group(self._progress, steps_table(self._summary.model_copy(update={"steps": shown})))

    def update(self, progress: PlanProgress) -> None:
        self._progress.update(self._task, completed=progress.done, total=progress.total or 1)
        for event in progress.events:
            step = self._steps.get(event.step_id or "")
            if step is None:
                continue
            if self._live is None:
                line = views.event_line(event, step)
                if line is not None:
                    self._console.print(line, markup=False, highlight=False, soft_wrap=True)
            self._steps[step.id] = views.apply_event(step, event)
        if self._live is not None:
            self._summary = self._summary.model_copy(update={"steps": list(self._steps.values())})
            self._live.update(self._renderable())

    def show(self, summary: PlanSummary) -> None:
        """Put the plan's final summary on display (the live table; plain mode has printed every line)."""
        done = summary.completed + summary.failed + summary.skipped
        self._progress.update(self._task, completed=done, total=summary.total_steps or 1)
        self._summary = summary
        self._steps = {s.id: s for s in summary.steps}
        if self._live is not None:
            self._live.update(self._renderable())
