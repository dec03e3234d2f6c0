"""What the command line's commands do on the application stack: clean errors, prompts and execution.

`main.py` resolves the settings (flags and environment), defines the commands and opens the stack
(`stack.open_stack`) for them; this module turns planner errors into a message and an exit code, asks y/N
questions, and approves and executes plans with the live display and Ctrl-C handling.
"""

from __future__ import annotations

import getpass
import json
import logging
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import anyio
import anyio.abc
import click
import typer
from pydantic import ValidationError

from mcp_planner.errors import PlanChangedError, PlannerError, PlanValidationError, Problem
from mcp_planner.plan.model import UNKNOWN_FIELD, ExecutionPlan, PlanSpec, PlanStatus, PlanSummary, StepSpec

if TYPE_CHECKING:
    from rich.console import Console

    from mcp_planner.stack import Stack
    from mcp_planner.store.base import PlanProgress

log = logging.getLogger("mcp_planner.cli.main")
T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

#: How the person at the terminal approves, as recorded with the plan.
METHOD = "human-terminal"


class LazyConsole:
    """A rich `Console` made on first use: `mcp-planner serve` never prints, so it never imports rich."""

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            stream = sys.stderr if self._stderr else sys.stdout
            # Off a terminal (CI logs, pipes) rich would wrap tables at 80 columns; logs read better wider.
            width = None if stream.isatty() else 160
            self._console = Console(stderr=self._stderr, highlight=False, width=width)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


out = LazyConsole(stderr=False)
err = LazyConsole(stderr=True)


class ExitCode(IntEnum):
    """Process exit codes. Stable: scripts and CI jobs rely on them."""

    OK = 0
    ERROR = 1
    INVALID = 2
    FAILED = 3
    PARTIAL = 4
    CANCELLED = 5
    NOT_APPROVED = 6
    INTERRUPTED = 130


STATUS_EXIT = {
    PlanStatus.COMPLETED: ExitCode.OK,
    PlanStatus.FAILED: ExitCode.FAILED,
    PlanStatus.PARTIAL: ExitCode.PARTIAL,
    PlanStatus.CANCELLED: ExitCode.CANCELLED,
}


def exit_code(status: PlanStatus) -> ExitCode:
    return STATUS_EXIT.get(status, ExitCode.ERROR)


#: Error messages are written for agents ("call approve_plan"); on the command line, name the command.
CLI_EQUIVALENTS = {
    "list_plans": "`mcp-planner plans`",
    "approve_plan": "`mcp-planner approve ID`",
    "resume_plan": "`mcp-planner resume ID`",
    "cancel_plan": "`mcp-planner cancel ID`",
    "execute_plan": "`mcp-planner execute ID`",
    "get_summary": "`mcp-planner show ID`",
    "get_plan": "`mcp-planner show ID`",
    "reject_plan": "`mcp-planner reject ID`",
    "list_tools": "`mcp-planner tools`",
}
TOOL_HINT = re.compile(r"\b(call )?(" + "|".join(CLI_EQUIVALENTS) + r")\b")


# -- running async bodies with clean errors ---------------------------------------------------------------


def for_cli(message: str) -> str:
    """`message` with the MCP tools it names replaced by the equivalent commands (for the plan it names)."""
    named = re.search(r"\bplan '([\w.-]+)'", message)

    def command(m: re.Match[str]) -> str:
        text = CLI_EQUIVALENTS[m.group(2)]
        if named is not None:
            text = text.replace(" ID", f" {named.group(1)}")
        return ("run " if m.group(1) else "") + text

    return TOOL_HINT.sub(command, message)


def fail(message: str, code: ExitCode = ExitCode.ERROR) -> NoReturn:
    err.print(for_cli(message), markup=False, soft_wrap=True)
    raise typer.Exit(int(code))


def find(exc: BaseException, kind: type[E]) -> E | None:
    """The first `kind` error behind `exc`, looking inside exception groups (task groups wrap errors)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find(inner, kind)
            if found is not None:
                return found
    return None


def run_async(fn: Callable[[], Awaitable[T]], *, verbose: int = 0, stop_on_interrupt: bool = False) -> T:
    """Run `fn` under anyio; turn planner errors into a message on stderr and an exit code.

    Ctrl-C exits 130, or 0 with `stop_on_interrupt` (how a server is normally stopped).
    """
    try:
        return anyio.run(fn)
    except (typer.Exit, click.exceptions.ClickException, click.exceptions.Abort):
        raise
    except KeyboardInterrupt:
        if stop_on_interrupt:
            raise typer.Exit(0) from None
        fail("interrupted", ExitCode.INTERRUPTED)
    except BaseException as exc:
        exit_request = find(exc, typer.Exit)
        if exit_request is not None:
            raise exit_request from None
        # rich exits so when stdout is a closed pipe (`mcp-planner run ... | head`)
        system_exit = find(exc, SystemExit)
        if system_exit is not None:
            raise system_exit from None
        planner_error = find(exc, PlannerError)
        if planner_error is not None:
            if verbose >= 2:
                log.debug("error", exc_info=exc)
            code = ExitCode.INVALID if isinstance(planner_error, PlanValidationError) else ExitCode.ERROR
            fail(f"error: {planner_error}", code)
        if not isinstance(exc, Exception):
            raise
        if verbose:
            log.error("unexpected error", exc_info=exc)
        fail(f"internal error: {type(exc).__name__}: {exc} (run with -v for details)")


# -- plan files, prompts --------------------------------------------------------------------------------


def load_plan_file(path: Path) -> PlanSpec:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"error: plan file {str(path)!r} does not exist", ExitCode.INVALID)
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"error: cannot read plan file {str(path)!r}: {exc}", ExitCode.INVALID)
    except json.JSONDecodeError as exc:
        fail(f"error: plan file {str(path)!r} is not valid JSON: {exc}", ExitCode.INVALID)
    try:
        return PlanSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [_plan_file_problem(e, raw) for e in exc.errors(include_url=False)]
        _print_lines(f"plan file {str(path)!r} is malformed", lines)
        raise typer.Exit(int(ExitCode.INVALID)) from None


def _plan_file_problem(error: Mapping[str, Any], raw: Any) -> str:
    """One problem of a plan file, its step named by id and position, e.g. "unknown field 'params' in step
    'build' (#1): did you mean 'parameters'?" (a file's reader counts steps from 1)."""
    loc = list(error.get("loc", ()))
    where = "plan"
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        where, loc = _step_label(raw, loc[1]), loc[2:]
        if error.get("type") == UNKNOWN_FIELD and len(loc) == 1:
            return StepSpec.unknown_field_message(str(loc[0]), where)
    if error.get("type") == UNKNOWN_FIELD:
        return str(error.get("msg"))  # it names the field and where it is
    field = ".".join(str(part) for part in loc) or "plan"
    return f"{where}, {field}: {error.get('msg', 'invalid')}"


def _step_label(raw: Any, index: int) -> str:
    steps = raw.get("steps") if isinstance(raw, dict) else None
    step = steps[index] if isinstance(steps, list) and index < len(steps) else None
    step_id = step.get("id") if isinstance(step, dict) else None
    return (
        f"step {step_id!r} (#{index + 1})" if isinstance(step_id, str) and step_id else f"step #{index + 1}"
    )


def print_problems(headline: str, problems: list[Problem]) -> None:
    _print_lines(headline, [str(problem) for problem in problems])


def _print_lines(headline: str, lines: list[str]) -> None:
    err.print(f"error: {headline} ({len(lines)} problem(s)):", markup=False, soft_wrap=True)
    for line in lines:
        err.print(f"  - {line}", markup=False, soft_wrap=True)


def terminal_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "terminal user"


def ask(question: str) -> bool:
    """A y/N question on the terminal; Ctrl-C or end of input means no."""
    # The event loop's SIGINT handler would swallow Ctrl-C while input() blocks; restore the default.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return bool(typer.confirm(question, default=False))
    except (KeyboardInterrupt, EOFError, click.exceptions.Abort):
        out.print()
        return False
    finally:
        signal.signal(signal.SIGINT, previous)


def can_ask() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


# -- running plans --------------------------------------------------------------------------------------


async def run_plan(
    rt: Stack,
    spec: PlanSpec,
    yes: bool,
    *,
    values: Mapping[str, Any] | None = None,
    detach: bool = False,
) -> PlanSummary:
    """What `run` does: validate, show, ask (unless `yes`), create, approve, execute (or only submit).

    `values`: the values of the plan's inputs (their defaults fill the rest).
    """
    from mcp_planner.cli import terminal

    plan = await checked_plan(rt, spec, values)
    terminal.print_plan(out.console, plan, "Plan")
    for warning in rt.service.warnings(plan):
        err.print(f"warning: {warning}", markup=False, highlight=False)
    if not yes and not can_ask():
        fail(
            "refusing to run without confirmation: stdin is not a terminal. Pass --yes to run the plan "
            "as shown, or run this command in a terminal to be asked.",
            ExitCode.NOT_APPROVED,
        )
    shown, shown_hash = plan.id, plan.compute_hash()  # stored under the id shown, approved as shown
    if not yes and not ask("Run this plan?"):
        user = terminal_user()
        plan = await rt.service.create_plan(spec, values, created_by=user, plan_id=shown)
        await rt.service.reject_plan(plan.id, f"declined at the terminal by {user}", rejected_by=user)
        fail(f"not run: plan {plan.id} declined", ExitCode.NOT_APPROVED)
    plan = await rt.service.create_plan(spec, values, created_by=terminal_user(), plan_id=shown)
    if plan.status in (PlanStatus.DRAFT, PlanStatus.PENDING_APPROVAL):
        plan = await rt.service.approve_plan(plan.id, terminal_user(), METHOD, expected_hash=shown_hash)
    if detach:
        summary = await rt.service.execute_plan(plan.id, wait_seconds=0, submitted_by=terminal_user())
        out.print(
            f"plan {plan.id} submitted: a runner executes it ({summary.status.value} now). "
            f"`mcp-planner show {plan.id}` follows it, `mcp-planner cancel {plan.id}` stops it.",
            markup=False,
            highlight=False,
        )
        return summary
    out.print(f"plan {plan.id} approved by {plan.approved_by}; executing", markup=False, highlight=False)
    return await execute_with_progress(rt, plan, resume=False, rerun_interrupted=False)


async def generate_plan(
    rt: Stack, task: str, context: str | None, constraints: list[str], *, as_json: bool = False
) -> ExecutionPlan:
    """What `generate` does: ask the configured LLM provider for a plan, store it and show it for approval.

    Raises:
        GenerationError: no provider is configured, it failed, or no answer became a valid plan.
    """
    from mcp_planner.errors import GenerationError
    from mcp_planner.generation.generator import PlanRequest
    from mcp_planner.generation.providers import generate_with_provider

    if rt.llm is None or not rt.llm.has_provider:
        raise GenerationError(
            "no LLM provider configured: pass --llm (e.g. 'anthropic:claude-sonnet-4-5', "
            "'openai:gpt-4.1-mini' or 'openai-compatible:http://127.0.0.1:11434/v1#qwen3') or set "
            "MCP_PLANNER_LLM, with the "
            "provider's key in ANTHROPIC_API_KEY or OPENAI_API_KEY"
        )
    request = PlanRequest(task=task, context=context, constraints=constraints)
    generated = await generate_with_provider(rt.llm.provider(), await rt.service.catalog(), request)
    plan = await rt.service.add_plan(generated, source="generate")
    if as_json:
        return plan
    from mcp_planner.cli import terminal

    terminal.print_plan(out.console, plan, "Generated plan")
    for warning in rt.service.warnings(plan):
        err.print(f"warning: {warning}", markup=False, highlight=False)
    if plan.status is PlanStatus.PENDING_APPROVAL:
        follow = f"`mcp-planner approve {plan.id}` approves it, `mcp-planner execute {plan.id}` runs it"
    else:
        follow = f"`mcp-planner execute {plan.id}` runs it"
    out.print(f"plan {plan.id} stored ({plan.status.value}): {follow}", markup=False, highlight=False)
    return plan


async def checked_plan(rt: Stack, spec: PlanSpec, values: Mapping[str, Any] | None = None) -> ExecutionPlan:
    """The plan as `create_plan` would store it (with `values` for its inputs), validated against the
    catalog, but not stored yet.

    Raises:
        PlanValidationError: with every problem (and the downstream servers that are unreachable).
    """
    from mcp_planner.engine.tools import schema_catalog
    from mcp_planner.plan.validation import qualify_tool_names

    catalog = await rt.service.catalog()
    plan = ExecutionPlan.from_spec(spec, values)
    qualify_tool_names(plan, catalog.keys())
    problems = plan.validate(schema_catalog(rt.tools), max_steps=rt.service.max_steps)
    if problems:
        if rt.servers_file is None and any(p.field == "tool_name" for p in problems):
            problems.append(
                Problem(
                    None,
                    "servers",
                    "no servers file was given, so there are no downstream tools: pass --servers FILE or "
                    "set MCP_PLANNER_SERVERS",
                )
            )
        raise PlanValidationError(problems + rt.service.unreachable_problems(problems))
    return plan


async def approve_stored(rt: Stack, plan_id: str, yes: bool) -> ExecutionPlan:
    """What `approve` does: show the stored plan and approve it here (`approve_here`)."""
    return await approve_here(rt, await rt.service.get_plan(plan_id), yes)


async def execute_stored(rt: Stack, plan_id: str, yes: bool) -> PlanSummary:
    """What `execute` does: approve the stored plan here if it still waits for that, then execute it."""
    plan = await rt.service.get_plan(plan_id)
    if plan.status in (PlanStatus.DRAFT, PlanStatus.PENDING_APPROVAL) and plan.options.needs_approval:
        plan = await approve_here(rt, plan, yes)
    return await execute_with_progress(rt, plan, resume=False, rerun_interrupted=False)


async def resume_stored(rt: Stack, plan_id: str, rerun_interrupted: bool) -> PlanSummary:
    """What `resume` does: resume the stored plan with the live display."""
    plan = await rt.service.get_plan(plan_id)
    return await execute_with_progress(rt, plan, resume=True, rerun_interrupted=rerun_interrupted)


async def execute_with_progress(
    rt: Stack, plan: ExecutionPlan, *, resume: bool, rerun_interrupted: bool
) -> PlanSummary:
    """Execute or resume with a live display; the first Ctrl-C cancels the plan, a second one aborts."""
    from mcp_planner.cli import terminal

    display = terminal.ProgressDisplay(out.console, plan.summary())
    interrupts = 0

    def on_progress(progress: PlanProgress) -> None:
        display.update(progress)

    async def cancel() -> None:
        err.print("cancelling the plan (Ctrl-C again to abort without waiting)...", markup=False)
        await rt.service.cancel_plan(
            plan.id, "cancelled from the terminal (Ctrl-C)", cancelled_by=terminal_user()
        )

    async def watch_interrupts(
        tg: anyio.abc.TaskGroup, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        nonlocal interrupts
        with anyio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                interrupts += 1
                if interrupts > 1:
                    tg.cancel_scope.cancel()
                    return
                tg.start_soon(cancel)

    with display:
        async with anyio.create_task_group() as tg:
            if sys.platform != "win32":
                await tg.start(watch_interrupts, tg)
            by = terminal_user()
            if resume:
                summary: PlanSummary = await rt.service.resume_plan(
                    plan.id, rerun_interrupted, None, on_progress, submitted_by=by
                )
            else:
                summary = await rt.service.execute_plan(plan.id, None, on_progress, submitted_by=by)
            tg.cancel_scope.cancel()
        if interrupts > 1 and rt.service.runs_in_process:
            fail(f"aborted: plan {plan.id} may be left executing; `mcp-planner resume {plan.id}` recovers it")
        if interrupts > 1:
            fail(f"stopped following plan {plan.id}; `mcp-planner cancel {plan.id}` stops it")
        display.show(summary)
    print_summary(summary)
    return summary


def print_summary(summary: PlanSummary) -> None:
    from mcp_planner.cli import terminal
    from mcp_planner.plan.model import INTERRUPTED_ERROR

    if out.is_terminal:  # the live display left the steps table on screen
        out.print(terminal.summary_renderable(summary, steps=False))
    else:
        for line in terminal.summary_lines(summary):
            out.print(line, markup=False, highlight=False, soft_wrap=True)
    if any(step.error == INTERRUPTED_ERROR for step in summary.steps):
        err.print(
            f"some steps were interrupted mid-call and their outcome is unknown, so they were not run again: "
            f"check their effects, then `mcp-planner resume {summary.plan_id} --rerun-interrupted`",
            markup=False,
            soft_wrap=True,
        )


async def approve_here(rt: Stack, plan: ExecutionPlan, yes: bool) -> ExecutionPlan:
    """Show the plan and approve it as the person at this terminal, asking y/N unless `yes`.

    What is approved is exactly what was shown: if the plan changes meanwhile (an agent's update_plan),
    the new version is shown and the question asked again.
    """
    from mcp_planner.cli import terminal

    while True:
        shown = plan.compute_hash()
        if plan.status not in (PlanStatus.DRAFT, PlanStatus.PENDING_APPROVAL):
            # Nothing to ask about: the service says it is approved already, or why it cannot be.
            done: ExecutionPlan = await rt.service.approve_plan(
                plan.id, terminal_user(), METHOD, expected_hash=shown
            )
            return done
        terminal.print_plan(out.console, plan, f"Plan {plan.id} ({plan.status.value})")
        if not yes:
            if not can_ask():
                fail(
                    "refusing to approve without confirmation: stdin is not a terminal. Pass --yes to "
                    "approve the plan as shown.",
                    ExitCode.NOT_APPROVED,
                )
            await rt.service.note_person_asked(plan.id)
            if not ask(f"Approve plan {plan.id}?"):
                fail(f"plan {plan.id} not approved (still {plan.status.value})", ExitCode.NOT_APPROVED)
        try:
            approved: ExecutionPlan = await rt.service.approve_plan(
                plan.id, terminal_user(), METHOD, expected_hash=shown
            )
            return approved
        except PlanChangedError:
            out.print(
                f"plan {plan.id} changed while you were looking at it: here is the current version",
                markup=False,
                highlight=False,
            )
            plan = await rt.service.get_plan(plan.id)
