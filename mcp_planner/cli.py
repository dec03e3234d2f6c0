"""The `mcp-planner` command line: serve over MCP, or run, inspect, approve and cancel plans from a terminal.

This is the only module that reads the environment (`MCP_PLANNER_DB`, `MCP_PLANNER_SERVERS`, and the
variables a servers file expands). Every command opens the same application layer the MCP server uses
(`service.PlannerService` over a `store.PlanStore` and, when it needs tools, a `downstream.Downstream`),
so a plan behaves the same whether an agent or a person drives it.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import anyio
import click
import typer
from pydantic import ValidationError
from rich.console import Console

from . import terminal
from .errors import PlannerError, PlanValidationError, Problem
from .model import ExecutionPlan, PlanSpec, PlanStatus, PlanSummary, Step
from .tools import LocalTools, ToolInfo, ToolProvider

if TYPE_CHECKING:
    from .service import PlannerService

log = logging.getLogger("mcp_planner.cli")
T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

#: How long commands that need tools wait for the downstream servers to connect.
CONNECT_TIMEOUT = 30.0


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

EXIT_CODES_HELP = """\
Exit codes: 0 the plan completed (or the command succeeded); 1 error (unknown plan, wrong state, bad
servers file, unreachable server); 2 invalid plan or usage; 3 the plan failed; 4 the plan ended partial;
5 the plan was cancelled; 6 the plan was not approved (declined, or no terminal to ask and no --yes).

Environment: MCP_PLANNER_DB (default database), MCP_PLANNER_SERVERS (default servers file).
"""

app = typer.Typer(
    name="mcp-planner",
    help="Planning as MCP tools: DAG plans of downstream MCP tool calls, approved, executed and resumed "
    "durably. With no command, serves MCP over stdio.",
    epilog=EXIT_CODES_HELP,
    rich_markup_mode=None,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Off a terminal (CI logs, pipes) rich would wrap tables at 80 columns; logs read better wider.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
out = Console(highlight=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, width=_WIDTH)

#: Error messages are written for agents ("call approve_plan"); on the command line, name the command.
_CLI_EQUIVALENTS = {
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
_TOOL_HINT = re.compile(r"\bcall (" + "|".join(_CLI_EQUIVALENTS) + r")\b")


# -- settings -------------------------------------------------------------------------------------------


@dataclass
class Settings:
    servers: Path | None = None
    db: Path | None = None
    verbose: int = 0


ServersOpt = Annotated[
    Path | None,
    typer.Option(
        "--servers",
        help="Downstream servers file (mcpServers JSON). Default: $MCP_PLANNER_SERVERS, else none.",
        dir_okay=False,
    ),
]
DbOpt = Annotated[
    Path | None,
    typer.Option(
        "--db",
        help="Plan database. Default: $MCP_PLANNER_DB, else ~/.local/share/mcp-planner/plans.db.",
        dir_okay=False,
    ),
]
VerboseOpt = Annotated[
    int,
    typer.Option(
        "--verbose", "-v", count=True, show_default=False, help="Log to stderr (-v info, -vv debug)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


class Approval(StrEnum):
    AUTO = "auto"
    AGENT = "agent"
    HUMAN = "human"


class Transport(StrEnum):
    STDIO = "stdio"
    HTTP = "http"


ApprovalOpt = Annotated[
    Approval,
    typer.Option(
        "--approval",
        help="Approval policy: auto (ask the person through the client when it can, else accept the "
        "agent's call), agent (accept the agent's call), human (only a person: elicitation, or "
        "`mcp-planner approve ID`).",
    ),
]


def _settings(ctx: typer.Context, servers: Path | None, db: Path | None, verbose: int) -> Settings:
    root: Settings = ctx.obj if isinstance(ctx.obj, Settings) else Settings()
    merged = Settings(servers=servers or root.servers, db=db or root.db, verbose=verbose + root.verbose)
    _configure_logging(merged.verbose)
    return merged


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("aiosqlite", "asyncio"):  # one line per query otherwise
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))


def _servers_path(settings: Settings) -> Path | None:
    if settings.servers is not None:
        return settings.servers
    env = os.environ.get("MCP_PLANNER_SERVERS")
    return Path(env) if env else None


def _db_path(settings: Settings) -> Path:
    if settings.db is not None:
        return settings.db
    env = os.environ.get("MCP_PLANNER_DB")
    if env:
        return Path(env)
    from .store import PlanStore

    return Path(PlanStore.default_path())


def _config_env() -> dict[str, str]:
    """The variables a servers file may expand: the environment, plus `PYTHON` (this interpreter)."""
    return {"PYTHON": sys.executable, **os.environ}


# -- running async commands with clean errors -----------------------------------------------------------


def _for_cli(message: str) -> str:
    return _TOOL_HINT.sub(lambda m: f"run {_CLI_EQUIVALENTS[m.group(1)]}", message)


def _fail(message: str, code: ExitCode = ExitCode.ERROR) -> NoReturn:
    err.print(_for_cli(message), markup=False, soft_wrap=True)
    raise typer.Exit(int(code))


def _find(exc: BaseException, kind: type[E]) -> E | None:
    """The first `kind` error behind `exc`, looking inside exception groups (task groups wrap errors)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


def _run(settings: Settings, fn: Callable[[], Awaitable[T]]) -> T:
    """Run `fn` under anyio; turn planner errors into a message on stderr and an exit code."""
    try:
        return anyio.run(fn)
    except (typer.Exit, click.exceptions.ClickException, click.exceptions.Abort):
        raise
    except KeyboardInterrupt:
        _fail("interrupted", ExitCode.INTERRUPTED)
    except BaseException as exc:
        exit_request = _find(exc, typer.Exit)
        if exit_request is not None:
            raise exit_request from None
        planner_error = _find(exc, PlannerError)
        if planner_error is not None:
            if settings.verbose >= 2:
                log.debug("error", exc_info=exc)
            code = ExitCode.INVALID if isinstance(planner_error, PlanValidationError) else ExitCode.ERROR
            _fail(f"error: {planner_error}", code)
        if not isinstance(exc, Exception):
            raise
        if settings.verbose:
            log.error("unexpected error", exc_info=exc)
        _fail(f"internal error: {type(exc).__name__}: {exc} (run with -v for details)")


@dataclass
class Runtime:
    """What a command works with: the tools (downstream servers, if any) and the service over the store."""

    tools: ToolProvider
    service: PlannerService
    servers: Path | None = None


@asynccontextmanager
async def _runtime(settings: Settings, *, tools: bool) -> AsyncIterator[Runtime]:
    """Open the store, the downstream servers (when `tools` and a servers file is set) and the service.

    The approval policy is the MCP server's business: here a person at the terminal approves (or
    passes --yes), so the service records what the command says.
    """
    from .service import PlannerService
    from .store import PlanStore

    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(PlanStore.open(_db_path(settings)))
        provider: ToolProvider = LocalTools({})
        servers = _servers_path(settings)
        if tools and servers is not None:
            from .config import load_config
            from .downstream import Downstream

            config = load_config(servers, env=_config_env())
            provider = await stack.enter_async_context(Downstream(config))
        service = await stack.enter_async_context(
            PlannerService(store, provider, approval="agent", ready_timeout=CONNECT_TIMEOUT)
        )
        yield Runtime(tools=provider, service=service, servers=servers if tools else None)


# -- commands -------------------------------------------------------------------------------------------


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """With no command, serve MCP over stdio (what agent configs launch)."""
    ctx.obj = Settings(servers=servers, db=db, verbose=verbose)
    if ctx.invoked_subcommand is None:
        _serve(_settings(ctx, None, None, 0), "stdio", "127.0.0.1", 8000, "auto")


@app.command()
def serve(
    ctx: typer.Context,
    transport: Annotated[Transport, typer.Option("--transport", help="stdio or http.")] = Transport.STDIO,
    host: Annotated[str, typer.Option("--host", help="HTTP bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="HTTP port.")] = 8000,
    approval: ApprovalOpt = Approval.AUTO,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Serve the planner's MCP tools over stdio (default) or streamable HTTP."""
    _serve(_settings(ctx, servers, db, verbose), transport.value, host, port, approval.value)


def _serve(settings: Settings, transport: str, host: str, port: int, approval: str) -> None:
    from . import server

    servers = _servers_path(settings)
    db = _db_path(settings)
    _run(
        settings,
        lambda: server.serve(
            transport=transport,
            host=host,
            port=port,
            db_path=db,
            servers_file=servers,
            env=_config_env(),
            approval=approval,
        ),
    )


@app.command(epilog=EXIT_CODES_HELP)
def run(
    ctx: typer.Context,
    plan_file: Annotated[
        Path, typer.Argument(metavar="PLAN_FILE", help="JSON file with description, steps and options.")
    ],
    yes: YesOpt = False,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Create a plan from PLAN_FILE, show it, ask y/N (unless --yes), execute it and print the summary.

    Exits 0 only if the plan completed. Ctrl-C cancels the plan (exit 5).
    """
    settings = _settings(ctx, servers, db, verbose)
    spec = _load_plan_file(plan_file)
    summary = _run(settings, lambda: _run_plan(settings, spec, yes))
    raise typer.Exit(int(STATUS_EXIT.get(summary.status, ExitCode.ERROR)))


def _load_plan_file(path: Path) -> PlanSpec:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        _fail(f"error: plan file {str(path)!r} does not exist", ExitCode.INVALID)
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"error: cannot read plan file {str(path)!r}: {exc}", ExitCode.INVALID)
    except json.JSONDecodeError as exc:
        _fail(f"error: plan file {str(path)!r} is not valid JSON: {exc}", ExitCode.INVALID)
    try:
        return PlanSpec.model_validate(raw)
    except ValidationError as exc:
        problems = [_pydantic_problem(e) for e in exc.errors()]
        _print_problems(f"plan file {str(path)!r} is malformed", problems)
        raise typer.Exit(int(ExitCode.INVALID)) from None


def _pydantic_problem(error: Mapping[str, Any]) -> Problem:
    loc = [str(part) for part in error.get("loc", ())]
    step_id = None
    if len(loc) >= 2 and loc[0] == "steps":
        step_id = f"#{int(loc[1]) + 1}" if loc[1].isdigit() else loc[1]
        loc = loc[2:]
    return Problem(step_id, ".".join(loc) or "plan", str(error.get("msg", "invalid")))


def _print_problems(headline: str, problems: list[Problem]) -> None:
    err.print(f"error: {headline} ({len(problems)} problem(s)):", markup=False, soft_wrap=True)
    for problem in problems:
        err.print(f"  - {problem}", markup=False, soft_wrap=True)


def _terminal_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "terminal user"


def _ask(question: str) -> bool:
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


def _can_ask() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


async def _run_plan(settings: Settings, spec: PlanSpec, yes: bool) -> PlanSummary:
    async with _runtime(settings, tools=True) as rt:
        plan = await _checked_plan(rt, spec)
        terminal.print_plan(out, plan, "Plan")
        if not yes and not _can_ask():
            _fail(
                "refusing to run without confirmation: stdin is not a terminal. Pass --yes to run the plan "
                "as shown, or run this command in a terminal to be asked.",
                ExitCode.NOT_APPROVED,
            )
        if not yes and not _ask("Run this plan?"):
            user = _terminal_user()
            plan = await rt.service.create_plan(spec, created_by=user)
            await rt.service.reject_plan(plan.id, f"declined at the terminal by {user}", rejected_by=user)
            _fail(f"not run: plan {plan.id} declined", ExitCode.NOT_APPROVED)
        plan = await rt.service.create_plan(spec, created_by=_terminal_user())
        if plan.status in (PlanStatus.DRAFT, PlanStatus.PENDING_APPROVAL):
            plan = await rt.service.approve_plan(plan.id, _terminal_user(), "human-terminal")
        out.print(f"plan {plan.id} approved by {plan.approved_by}; executing", markup=False, highlight=False)
        return await _execute(rt, plan, resume=False, rerun_interrupted=False)


async def _checked_plan(rt: Runtime, spec: PlanSpec) -> ExecutionPlan:
    """The plan as `create_plan` would store it, validated against the catalog, but not stored yet.

    Raises:
        PlanValidationError: with every problem (and the downstream servers that are unreachable).
    """
    from .tools import schema_catalog
    from .validation import qualify_tool_names

    catalog = await rt.service.catalog()
    plan = ExecutionPlan.from_spec(spec)
    qualify_tool_names(plan, catalog.keys())
    problems = plan.validate(schema_catalog(rt.tools))
    if problems:
        if rt.servers is None and any(p.field == "tool_name" for p in problems):
            problems.append(
                Problem(
                    None,
                    "servers",
                    "no servers file was given, so there are no downstream tools: pass --servers FILE or "
                    "set MCP_PLANNER_SERVERS",
                )
            )
        for name, state in sorted(rt.service.server_status().items()):
            if state.get("error"):
                problems.append(
                    Problem(None, "servers", f"downstream server {name!r} is unreachable: {state['error']}")
                )
        raise PlanValidationError(problems)
    return plan


async def _execute(rt: Runtime, plan: ExecutionPlan, *, resume: bool, rerun_interrupted: bool) -> PlanSummary:
    """Execute or resume with a live display; the first Ctrl-C cancels the plan, a second one aborts."""
    display = terminal.ProgressDisplay(out, plan.summary())
    interrupts = 0

    def on_progress(summary: PlanSummary, step: Step | None) -> None:
        display.update(summary)

    async def watch_interrupts(scope: anyio.CancelScope) -> None:
        nonlocal interrupts
        with anyio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                interrupts += 1
                if interrupts > 1:
                    scope.cancel()
                    return
                err.print("cancelling the plan (Ctrl-C again to abort without waiting)...", markup=False)
                await rt.service.cancel_plan(plan.id, "cancelled from the terminal (Ctrl-C)")

    with display:
        async with anyio.create_task_group() as tg:
            if sys.platform != "win32":
                tg.start_soon(watch_interrupts, tg.cancel_scope)
            if resume:
                summary: PlanSummary = await rt.service.resume_plan(
                    plan.id, rerun_interrupted=rerun_interrupted, wait_seconds=None, on_progress=on_progress
                )
            else:
                summary = await rt.service.execute_plan(plan.id, wait_seconds=None, on_progress=on_progress)
            tg.cancel_scope.cancel()
        if interrupts > 1:
            _fail(
                f"aborted: plan {plan.id} may be left executing; `mcp-planner resume {plan.id}` recovers it"
            )
        display.update(summary)
    _print_summary(summary)
    return summary


def _print_summary(summary: PlanSummary) -> None:
    if out.is_terminal:
        out.print(terminal.summary_renderable(summary))
    else:
        for line in terminal.summary_lines(summary):
            out.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command()
def plans(
    ctx: typer.Context,
    status: Annotated[
        PlanStatus | None,
        typer.Option("--status", help="Only plans in this status."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many plans.")] = 20,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """List recent plans, newest first."""
    settings = _settings(ctx, None, db, verbose)

    async def body() -> list[ExecutionPlan]:
        async with _runtime(settings, tools=False) as rt:
            found: list[ExecutionPlan] = await rt.service.list_plans(status=status, limit=limit)
            return found

    found = _run(settings, body)
    if as_json:
        out.print_json(json.dumps([p.summary().model_dump(mode="json", exclude={"steps"}) for p in found]))
        return
    if not found:
        out.print("no plans" + (f" with status {status}" if status else ""))
        return
    out.print(terminal.plans_table(found))


@app.command()
def show(
    ctx: typer.Context,
    plan_id: Annotated[str, typer.Argument(metavar="ID", help="Plan id.")],
    as_json: JsonOpt = False,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Show a plan: its fields, steps with durations and errors, result previews and its Mermaid graph."""
    settings = _settings(ctx, None, db, verbose)

    async def body() -> ExecutionPlan:
        async with _runtime(settings, tools=False) as rt:
            plan: ExecutionPlan = await rt.service.get_plan(plan_id)
            return plan

    plan = _run(settings, body)
    if as_json:
        out.print_json(plan.model_dump_json())
        return
    from .presentation import mermaid

    out.print(terminal.plan_details(plan))
    out.print(terminal.steps_table(plan.summary(), title="Steps"))
    if any(step.result is not None for step in plan.steps):
        out.print(terminal.results_table(plan))
    out.print("Graph (Mermaid):", style="bold")
    out.print(mermaid(plan), markup=False, highlight=False, soft_wrap=True)


@app.command(epilog=EXIT_CODES_HELP)
def approve(
    ctx: typer.Context,
    plan_id: Annotated[str, typer.Argument(metavar="ID", help="Plan id.")],
    yes: YesOpt = False,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Approve a pending plan as the person at this terminal (what the `human` policy asks for)."""
    settings = _settings(ctx, None, db, verbose)

    async def body() -> ExecutionPlan:
        async with _runtime(settings, tools=False) as rt:
            return await _approve_here(rt, await rt.service.get_plan(plan_id), yes)

    plan = _run(settings, body)
    out.print(
        f"plan {plan.id} approved by {plan.approved_by}: the agent can now call execute_plan "
        f"(or run `mcp-planner execute {plan.id}`)",
        markup=False,
    )


async def _approve_here(rt: Runtime, plan: ExecutionPlan, yes: bool) -> ExecutionPlan:
    """Show the plan and approve it as the person at this terminal, asking y/N unless `yes`."""
    if plan.status not in (PlanStatus.DRAFT, PlanStatus.PENDING_APPROVAL):
        # Nothing to ask about: the service says it is approved already, or why it cannot be.
        done: ExecutionPlan = await rt.service.approve_plan(plan.id, _terminal_user(), "human-terminal")
        return done
    terminal.print_plan(out, plan, f"Plan {plan.id} ({plan.status.value})")
    if not yes:
        if not _can_ask():
            _fail(
                "refusing to approve without confirmation: stdin is not a terminal. Pass --yes to "
                "approve the plan as shown.",
                ExitCode.NOT_APPROVED,
            )
        if not _ask(f"Approve plan {plan.id}?"):
            _fail(f"plan {plan.id} not approved (still {plan.status.value})", ExitCode.NOT_APPROVED)
    approved: ExecutionPlan = await rt.service.approve_plan(plan.id, _terminal_user(), "human-terminal")
    return approved


@app.command(epilog=EXIT_CODES_HELP)
def execute(
    ctx: typer.Context,
    plan_id: Annotated[str, typer.Argument(metavar="ID", help="Plan id.")],
    yes: YesOpt = False,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Execute a stored plan (one an agent created, say) with the live progress display.

    A plan still pending approval is shown and approved first, as `approve` does (y/N unless --yes).
    """
    settings = _settings(ctx, servers, db, verbose)

    async def body() -> PlanSummary:
        async with _runtime(settings, tools=True) as rt:
            plan: ExecutionPlan = await rt.service.get_plan(plan_id)
            if plan.status in (PlanStatus.DRAFT, PlanStatus.PENDING_APPROVAL) and plan.options.needs_approval:
                plan = await _approve_here(rt, plan, yes)
            return await _execute(rt, plan, resume=False, rerun_interrupted=False)

    summary = _run(settings, body)
    raise typer.Exit(int(STATUS_EXIT.get(summary.status, ExitCode.ERROR)))


@app.command()
def reject(
    ctx: typer.Context,
    plan_id: Annotated[str, typer.Argument(metavar="ID", help="Plan id.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept with the plan).")],
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Reject a plan that has not started: it becomes cancelled and never runs."""
    settings = _settings(ctx, None, db, verbose)

    async def body() -> ExecutionPlan:
        async with _runtime(settings, tools=False) as rt:
            plan: ExecutionPlan = await rt.service.reject_plan(plan_id, reason, rejected_by=_terminal_user())
            return plan

    plan = _run(settings, body)
    out.print(f"plan {plan.id} rejected: {plan.status.value}", markup=False)


@app.command(epilog=EXIT_CODES_HELP)
def resume(
    ctx: typer.Context,
    plan_id: Annotated[str, typer.Argument(metavar="ID", help="Plan id.")],
    rerun_interrupted: Annotated[
        bool,
        typer.Option(
            "--rerun-interrupted",
            help="Also re-run steps whose outcome is unknown because the run was interrupted mid-call.",
        ),
    ] = False,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Resume a failed, partial or interrupted plan: completed steps are kept, the rest run again."""
    settings = _settings(ctx, servers, db, verbose)

    async def body() -> PlanSummary:
        async with _runtime(settings, tools=True) as rt:
            plan: ExecutionPlan = await rt.service.get_plan(plan_id)
            return await _execute(rt, plan, resume=True, rerun_interrupted=rerun_interrupted)

    summary = _run(settings, body)
    raise typer.Exit(int(STATUS_EXIT.get(summary.status, ExitCode.ERROR)))


@app.command()
def cancel(
    ctx: typer.Context,
    plan_id: Annotated[str, typer.Argument(metavar="ID", help="Plan id.")],
    reason: Annotated[
        str, typer.Option("--reason", help="Why (kept with the plan).")
    ] = "cancelled from the command line",
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Cancel a plan: stops it if it is executing (in any process on this database), else cancels it."""
    settings = _settings(ctx, None, db, verbose)

    async def body() -> Any:
        async with _runtime(settings, tools=False) as rt:
            return await rt.service.cancel_plan(plan_id, reason, cancelled_by=_terminal_user())

    _run(settings, body)
    out.print(f"plan {plan_id}: cancellation requested ({reason})", markup=False)


@app.command()
def tools(
    ctx: typer.Context,
    servers: ServersOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """List the downstream tools plan steps can call, and each server's status.

    Exits 1 when a downstream server could not be reached (its error is shown).
    """
    settings = _settings(ctx, servers, None, verbose)
    if _servers_path(settings) is None:
        _fail("no servers file: pass --servers FILE or set MCP_PLANNER_SERVERS", ExitCode.INVALID)

    async def body() -> tuple[dict[str, ToolInfo], dict[str, dict[str, Any]]]:
        async with _runtime(settings, tools=True) as rt:
            return await rt.service.catalog(), rt.service.server_status()

    catalog, status = _run(settings, body)
    out.print(terminal.tools_table(catalog))
    out.print(terminal.servers_table(status))
    failed = sorted(name for name, state in status.items() if state.get("error"))
    if failed:
        _fail(f"error: unreachable downstream server(s): {', '.join(failed)}")


def main() -> None:
    """The `mcp-planner` console script."""
    app()


if __name__ == "__main__":
    main()
