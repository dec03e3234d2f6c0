"""The `mcp-planner` command line: serve over MCP, or run, inspect, approve and cancel plans from a terminal.

This is the only module that reads the environment (`MCP_PLANNER_DB`, `MCP_PLANNER_SERVERS`,
`MCP_PLANNER_AUTH_TOKEN`, and the variables a servers file expands). Every command opens the same
application layer the MCP server uses (`service.PlannerService` over a `store.PlanStore` and, when it
needs tools, a `downstream.Downstream`), so a plan behaves the same whether an agent or a person drives it.

The terminal rendering (`terminal.py`, rich) is imported inside the commands that print, so `serve`, the
command agents launch, starts without it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from mcp_planner.cli.runtime import (
    ExitCode,
    approve_stored,
    execute_stored,
    exit_code,
    fail,
    generate_plan,
    load_plan_file,
    out,
    resume_stored,
    run_async,
    run_plan,
    terminal_user,
)
from mcp_planner.plan.model import ExecutionPlan, PlanSpec, PlanStatus

if TYPE_CHECKING:
    from mcp_planner.engine.tools import ServerStatus, ToolInfo
    from mcp_planner.stack import Stack, Tools

T = TypeVar("T")
log = logging.getLogger("mcp_planner.cli.main")

EXIT_CODES_HELP = """\
Exit codes: 0 the plan completed (or the command succeeded); 1 error (unknown plan, wrong state, bad
servers file, unreachable server); 2 invalid plan or usage; 3 the plan failed; 4 the plan ended partial;
5 the plan was cancelled; 6 the plan was not approved (declined, or no terminal to ask and no --yes).

Environment: MCP_PLANNER_DB (default database), MCP_PLANNER_SERVERS (default servers file), MCP_PLANNER_LLM
(the LLM provider, as --llm).
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

# -- settings -------------------------------------------------------------------------------------------


@dataclass
class Settings:
    servers: Path | None = None
    #: A SQLite file or a `postgresql://` URL.
    db: str | None = None
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
    str | None,
    typer.Option(
        "--db",
        help="Plan database: a SQLite file or a postgresql:// URL. Default: $MCP_PLANNER_DB, else "
        "~/.local/share/mcp-planner/plans.db.",
        show_default=False,
    ),
]
VerboseOpt = Annotated[
    int,
    typer.Option(
        "--verbose", "-v", count=True, show_default=False, help="Log to stderr (-v info, -vv debug)."
    ),
]
PlanIdArg = Annotated[str, typer.Argument(metavar="ID", help="Plan id.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
InputOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input",
        metavar="NAME=VALUE",
        help="A value for one of the plan's inputs; repeatable. Parsed as JSON (numbers, booleans, lists) "
        "unless the input is a string. Wins over --inputs.",
        show_default=False,
    ),
]
InputsFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--inputs",
        metavar="FILE.json",
        help="A JSON object of values for the plan's inputs.",
        dir_okay=False,
        show_default=False,
    ),
]


LlmOpt = Annotated[
    str | None,
    typer.Option(
        "--llm",
        metavar="SPEC",
        help="The LLM for plan generation and planner.llm: anthropic:MODEL, openai:MODEL, "
        "openai-compatible:BASE_URL#MODEL, auto (MCP sampling when the client offers it, else a provider "
        "from the keys set), auto:SPEC, or sampling. Default: MCP_PLANNER_LLM. Keys come from "
        "ANTHROPIC_API_KEY / OPENAI_API_KEY (MCP_PLANNER_LLM_API_KEY for an OpenAI-compatible server).",
        show_default=False,
    ),
]


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


def _settings(ctx: typer.Context, servers: Path | None, db: str | None, verbose: int) -> Settings:
    root: Settings = ctx.obj if isinstance(ctx.obj, Settings) else Settings()
    merged = Settings(servers=servers or root.servers, db=db or root.db, verbose=verbose + root.verbose)
    _configure_logging(merged.verbose)
    return merged


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _configure_logging(verbose: int, *, log_file: bool = False) -> None:
    """Log to stderr: without -v only warnings and errors, each as one plain line a person reads.

    `-v`/`-vv` (and `log_file`, a runner whose stderr is its log) keep the full format: time, level and
    logger, with tracebacks.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    if verbose or log_file:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    else:
        handler.setFormatter(_PlainFormatter())
        handler.addFilter(_OnlyOnce())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("aiosqlite", "asyncio"):  # one line per query otherwise
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))


class _PlainFormatter(logging.Formatter):
    """`mcp-planner: <message>` on one line, without time, level or logger (`-v` shows those).

    A warning's traceback (a transient failure retried) is left out; an error keeps its traceback, since
    the error results clients read say the server log has the details.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = "mcp-planner: " + " ".join(record.getMessage().split())
        if record.levelno >= logging.ERROR and record.exc_info:
            return line + "\n" + (record.exc_text or self.formatException(record.exc_info))
        return line


class _OnlyOnce(logging.Filter):
    """Drops a warning already shown (a servers file is read more than once); every error is shown.

    It remembers the last `REMEMBERED` warnings, so a server that runs for months holds no more.
    """

    REMEMBERED = 256

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[str, None] = {}  # insertion-ordered: the oldest is forgotten first

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen[message] = None
        if len(self._seen) > self.REMEMBERED:
            del self._seen[next(iter(self._seen))]
        return True


def _servers_path(settings: Settings) -> Path | None:
    if settings.servers is not None:
        return settings.servers
    env = os.environ.get("MCP_PLANNER_SERVERS")
    return Path(env) if env else None


def _db_path(settings: Settings) -> str:
    """The database: --db, else $MCP_PLANNER_DB, else the default SQLite file."""
    if settings.db:
        return settings.db
    env = os.environ.get("MCP_PLANNER_DB")
    if env:
        return env
    from mcp_planner.store import default_location

    return str(default_location())


def _config_env() -> dict[str, str]:
    """The variables a servers file may expand: the environment, plus `PYTHON` (this interpreter)."""
    return {"PYTHON": sys.executable, **os.environ}


def _use_llm(spec: str | None) -> None:
    """`--llm` wins over MCP_PLANNER_LLM, here and in the runners this process starts (they inherit it)."""
    if spec is not None:
        from mcp_planner.errors import ConfigError
        from mcp_planner.generation.providers import ENV_VAR, parse_llm_spec

        try:
            parse_llm_spec(spec)
        except ConfigError as exc:
            fail(f"error: --llm: {exc}", ExitCode.INVALID)
        os.environ[ENV_VAR] = spec


def _open_stack(
    settings: Settings, *, tools: Tools, runners: bool, warm: bool = False
) -> AbstractAsyncContextManager[Stack]:
    """The application stack for a command: which downstream servers it connects, who executes runs."""
    from mcp_planner.stack import open_stack

    # The approval policy is the MCP server's business: here a person at the terminal approves (or passes
    # --yes), so the service records what the command says.
    return open_stack(
        _db_path(settings),
        _servers_path(settings),
        _config_env(),
        tools=tools,
        runners=runners,
        warm=warm,
        approval="agent",
    )


def _with_stack(settings: Settings, fn: Callable[[Stack], Awaitable[T]], *, tools: Tools = "none") -> T:
    """`fn` on the command's stack, connected to the downstream servers `tools` says; runs go to runners.

    Planner errors end the command with a message and an exit code (`run_async`).
    """

    async def body() -> T:
        async with _open_stack(settings, tools=tools, runners=True) as stack:
            return await fn(stack)

    return run_async(body, verbose=settings.verbose)


def _submitting(settings: Settings, fn: Callable[[Stack], Awaitable[T]], *, here: Tools | None = None) -> T:
    """`fn`, which submits runs, on a stack validating against a warm runner's catalog if there is one.

    Without a warm runner the stack connects every downstream server and runners started on demand execute
    the runs; or, given `here`, it connects only those servers and this process executes the runs.
    """

    async def body() -> T:
        tools: Tools = "all" if here is None else here
        async with _open_stack(settings, tools=tools, runners=here is None, warm=True) as stack:
            return await fn(stack)

    return run_async(body, verbose=settings.verbose)


def _input_values(spec: PlanSpec, pairs: list[str] | None, file: Path | None) -> dict[str, Any]:
    """The values of the plan file's inputs from `--inputs` and `--input`; a bad one ends the command
    (exit 2, one line)."""
    from mcp_planner.cli.inputs import InputError, input_values

    try:
        return input_values(spec, pairs or [], file)
    except InputError as exc:
        fail(f"error: {exc}", ExitCode.INVALID)


def _plan_servers(spec: PlanSpec) -> Tools:
    """The downstream servers a plan names (`server.tool`); all of them if a tool name is bare."""
    names = [step.tool_name for step in spec.steps]
    if all("." in name for name in names):
        return {name.split(".", 1)[0] for name in names}
    return "all"


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
    auth_token: Annotated[
        str | None,
        typer.Option(
            "--auth-token",
            envvar="MCP_PLANNER_AUTH_TOKEN",
            show_envvar=True,
            help="HTTP: require `Authorization: Bearer TOKEN` on every request (required off loopback).",
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="HTTP: a Host name clients use to reach the server, with or without a port; repeatable "
            "(required off loopback).",
        ),
    ] = None,
    approval: ApprovalOpt = Approval.AUTO,
    llm: LlmOpt = None,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Serve the planner's MCP tools over stdio (default) or streamable HTTP."""
    _use_llm(llm)
    if transport is Transport.HTTP:
        from mcp_planner.server.http_security import check_bind

        try:
            check_bind(host, auth_token=auth_token, allowed_hosts=allowed_host or [])
        except ValueError as exc:
            fail(f"error: {exc}", ExitCode.INVALID)
    settings = _settings(ctx, servers, db, verbose)
    _serve(settings, transport.value, host, port, approval.value, auth_token, allowed_host or [])


def _serve(
    settings: Settings,
    transport: str,
    host: str,
    port: int,
    approval: str,
    auth_token: str | None = None,
    allowed_hosts: list[str] | None = None,
) -> None:
    from mcp_planner.server import app as server

    servers = _servers_path(settings)
    if transport == "stdio" and sys.stdin.isatty():
        # Someone typed `mcp-planner` at a prompt: stdout is the protocol, so explain on stderr.
        print(
            "mcp-planner: serving MCP over stdio, for an MCP client to launch (Ctrl-C stops). "
            "`mcp-planner --help` lists the commands.",
            file=sys.stderr,
        )
    if servers is None:
        log.warning("no servers file (--servers or MCP_PLANNER_SERVERS): plans will have no tools to call")

    async def body() -> None:
        await server.serve(
            transport=transport,
            host=host,
            port=port,
            db_path=_db_path(settings),
            servers_file=servers,
            env=_config_env(),
            approval=approval,
            auth_token=auth_token,
            allowed_hosts=allowed_hosts or [],
        )

    run_async(body, verbose=settings.verbose, stop_on_interrupt=True)


@app.command(epilog=EXIT_CODES_HELP)
def run(
    ctx: typer.Context,
    plan_file: Annotated[
        Path, typer.Argument(metavar="PLAN_FILE", help="JSON file with description, steps and options.")
    ],
    yes: YesOpt = False,
    detach: Annotated[
        bool, typer.Option("--detach", help="Submit the plan to a runner and return its id at once.")
    ] = False,
    input_pairs: InputOpt = None,
    inputs_file: InputsFileOpt = None,
    llm: LlmOpt = None,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Create a plan from PLAN_FILE, show it, ask y/N (unless --yes), execute it and print its outputs and
    summary.

    Exits 0 only if the plan completed. Ctrl-C cancels the plan (exit 5). A live runner for this database
    and servers file executes it; else this command does, starting only the servers the plan names.
    `planner.llm` steps ask the LLM of --llm (or MCP_PLANNER_LLM).
    """
    _use_llm(llm)
    settings = _settings(ctx, servers, db, verbose)
    spec = load_plan_file(plan_file)
    values = _input_values(spec, input_pairs, inputs_file)
    here = None if detach else _plan_servers(spec)
    summary = _submitting(
        settings, lambda stack: run_plan(stack, spec, yes, values=values, detach=detach), here=here
    )
    raise typer.Exit(0 if detach else int(exit_code(summary.status)))


@app.command(epilog=EXIT_CODES_HELP)
def generate(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(metavar="TASK", help="What the plan should achieve.")],
    context: Annotated[
        str | None,
        typer.Option(
            "--context", metavar="TEXT", help="Background the planner should know.", show_default=False
        ),
    ] = None,
    constraint: Annotated[
        list[str] | None,
        typer.Option(
            "--constraint",
            metavar="RULE",
            help="A rule the plan must follow; repeatable.",
            show_default=False,
        ),
    ] = None,
    llm: LlmOpt = None,
    as_json: JsonOpt = False,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Ask an LLM provider (--llm or MCP_PLANNER_LLM) for a plan for TASK with the downstream servers' tools,
    store it and show it for approval (`mcp-planner approve ID`, then `mcp-planner execute ID`).

    The plan is validated and repaired up to 3 times; its token usage is kept in its metadata (llm_usage).
    """
    _use_llm(llm)
    settings = _settings(ctx, servers, db, verbose)
    plan = _with_stack(
        settings,
        lambda stack: generate_plan(stack, task, context, constraint or [], as_json=as_json),
        tools="all",
    )
    if as_json:
        out.print_json(json.dumps(_plan_json(plan)))


@app.command()
def plans(
    ctx: typer.Context,
    status: Annotated[
        PlanStatus | None,
        typer.Option("--status", help="Only plans in this status."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many plans.")] = 20,
    as_json: JsonOpt = False,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """List recent plans, newest first."""
    from mcp_planner.cli import terminal

    settings = _settings(ctx, servers, db, verbose)
    found = _with_stack(settings, lambda stack: stack.service.list_plans(status=status, limit=limit))
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
    plan_id: PlanIdArg,
    as_json: JsonOpt = False,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Show a plan: its fields, inputs and outputs, steps with durations, errors, item counts and
    conditions, result previews and its Mermaid graph."""
    from mcp_planner.cli import terminal

    settings = _settings(ctx, servers, db, verbose)
    plan = _with_stack(settings, lambda stack: stack.service.get_plan(plan_id))
    if as_json:
        out.print_json(json.dumps(_plan_json(plan)))
        return
    from mcp_planner.presentation import mermaid

    out.print(terminal.plan_details(plan))
    out.print(terminal.steps_table(plan.summary(), title="Steps", plan=plan))
    if any(step.result is not None for step in plan.steps):
        out.print(terminal.results_table(plan))
    out.print("Graph (Mermaid):", style="bold")
    out.print(mermaid(plan), markup=False, highlight=False, soft_wrap=True)


def _plan_json(plan: ExecutionPlan) -> dict[str, Any]:
    """The plan as JSON, each `for_each` step with its items (the model keeps them apart from the step)."""
    data: dict[str, Any] = json.loads(plan.model_dump_json())
    for step, raw in zip(plan.steps, data["steps"], strict=True):
        if step.items is not None:
            raw["items"] = [item.model_dump(mode="json") for item in step.items]
    return data


@app.command(epilog=EXIT_CODES_HELP)
def approve(
    ctx: typer.Context,
    plan_id: PlanIdArg,
    yes: YesOpt = False,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Approve a pending plan as the person at this terminal (what the `human` policy asks for)."""
    settings = _settings(ctx, servers, db, verbose)
    plan = _with_stack(settings, lambda stack: approve_stored(stack, plan_id, yes))
    out.print(
        f"plan {plan.id} approved by {plan.approved_by}: the agent can now call execute_plan "
        f"(or run `mcp-planner execute {plan.id}`)",
        markup=False,
    )


@app.command(epilog=EXIT_CODES_HELP)
def execute(
    ctx: typer.Context,
    plan_id: PlanIdArg,
    yes: YesOpt = False,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Execute a stored plan (one an agent created, say) with the live progress display.

    A plan still pending approval is shown and approved first, as `approve` does (y/N unless --yes).
    """
    settings = _settings(ctx, servers, db, verbose)
    summary = _submitting(settings, lambda stack: execute_stored(stack, plan_id, yes))
    raise typer.Exit(int(exit_code(summary.status)))


@app.command()
def reject(
    ctx: typer.Context,
    plan_id: PlanIdArg,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept with the plan).")],
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Reject a plan that has not started: it becomes cancelled and never runs."""
    settings = _settings(ctx, servers, db, verbose)
    by = terminal_user()
    plan = _with_stack(settings, lambda stack: stack.service.reject_plan(plan_id, reason, rejected_by=by))
    out.print(f"plan {plan.id} rejected: {plan.status.value}", markup=False)


@app.command(epilog=EXIT_CODES_HELP)
def resume(
    ctx: typer.Context,
    plan_id: PlanIdArg,
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
    summary = _submitting(settings, lambda stack: resume_stored(stack, plan_id, rerun_interrupted))
    raise typer.Exit(int(exit_code(summary.status)))


@app.command()
def cancel(
    ctx: typer.Context,
    plan_id: PlanIdArg,
    reason: Annotated[
        str, typer.Option("--reason", help="Why (kept with the plan).")
    ] = "cancelled from the command line",
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Cancel a plan: stops it if it is executing (in any process on this database), else cancels it."""
    settings = _settings(ctx, servers, db, verbose)
    by = terminal_user()
    summary = _with_stack(settings, lambda stack: stack.service.cancel_plan(plan_id, reason, cancelled_by=by))
    if summary.status == PlanStatus.CANCELLED:
        out.print(f"plan {plan_id} cancelled: {reason}", markup=False)
    else:
        out.print(
            f"plan {plan_id} is executing in another process: asked it to cancel ({reason}), but it has not "
            f"stopped yet. `mcp-planner show {plan_id}` follows it.",
            markup=False,
        )


@app.command()
def tools(
    ctx: typer.Context,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """List the downstream tools plan steps can call, and each server's status.

    Exits 1 when a downstream server could not be reached (its error is shown).
    """
    from mcp_planner.cli import terminal

    settings = _settings(ctx, servers, db, verbose)
    if _servers_path(settings) is None:
        fail("no servers file: pass --servers FILE or set MCP_PLANNER_SERVERS", ExitCode.INVALID)

    async def listed(stack: Stack) -> tuple[dict[str, ToolInfo], dict[str, ServerStatus]]:
        return await stack.service.catalog(), stack.service.server_status()

    client_log = logging.getLogger("mcp_planner.downstream.client")
    level = client_log.level
    if not verbose:  # the servers table says which server failed and why: once, not also as a log line
        client_log.setLevel(logging.ERROR)
    try:
        catalog, status = _with_stack(settings, listed, tools="all")
    finally:
        client_log.setLevel(level)
    out.print(terminal.tools_table(catalog))
    out.print(terminal.servers_table(status))
    failed = sorted(name for name, server in status.items() if server.error)
    if failed:
        fail(f"error: unreachable downstream server(s): {', '.join(failed)}")


@app.command()
def runner(
    ctx: typer.Context,
    idle_exit: Annotated[
        float | None,
        typer.Option(
            "--idle-exit",
            envvar="MCP_PLANNER_RUNNER_IDLE_EXIT",
            help="Exit after this many seconds without work (default 300); 0 runs as a service.",
            show_default=False,
        ),
    ] = None,
    max_runs: Annotated[int, typer.Option("--max-runs", help="How many runs to execute at once.")] = 8,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Execute submitted runs for this database and servers file, keeping the servers connected.

    Agents' `execute_plan` and `mcp-planner execute` submit runs and start a runner on demand; run one
    yourself (e.g. under systemd with --idle-exit 0) to keep it warm. Any number may share a database.
    """
    settings = _settings(ctx, servers, db, verbose)
    _configure_logging(settings.verbose, log_file=True)

    async def body() -> int:
        from mcp_planner.runner import DEFAULT_IDLE_EXIT
        from mcp_planner.stack import run_runner

        idle = DEFAULT_IDLE_EXIT if idle_exit is None else idle_exit
        where, what = _db_path(settings), _servers_path(settings)
        return await run_runner(where, what, _config_env(), idle_exit=idle, max_runs=max_runs)

    run_async(body, verbose=settings.verbose, stop_on_interrupt=True)


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    servers: ServersOpt = None,
    db: DbOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """The live runners serving this database: pid, host, since, runs executed, servers file."""
    settings = _settings(ctx, servers, db, verbose)
    runners = _with_stack(settings, lambda stack: stack.service.runners())
    from mcp_planner.presentation import runner_lines

    if as_json:
        out.print_json(json.dumps([r.model_dump(mode="json") for r in runners]))
        return
    if not runners:
        out.print("no live runner: one starts when a plan is submitted", markup=False)
    for line in runner_lines(runners):
        out.print(line, markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    """The `mcp-planner` console script."""
    app()


if __name__ == "__main__":
    main()
