"""The `mcp-planner` command line: its commands driven in-process (typer's `CliRunner`, which is quick), and
its real entry point (`python -m mcp_planner`) in a subprocess where the process is what is under test: the
README's main job, a prompt on a real pseudo-terminal, Ctrl-C, a killed process, serving stdio, and a cancel
from another process.

Plans run against the example downstream servers (`examples/servers.json`) on a fresh SQLite file per
test; the example servers' state (flaky counters, the workspace) lives under `tmp_path` too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp_types import CallToolResult, TextContent
from typer.testing import CliRunner

from mcp_planner.cli.main import ExitCode, app
from mcp_planner.engine.tools import LocalTools
from mcp_planner.plan.model import PlanSpec, PlanStatus
from mcp_planner.server.app import build_server
from mcp_planner.service import PlannerService
from mcp_planner.store.sqlite import PlanStore

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SERVERS = EXAMPLES / "servers.json"
CLI_TIMEOUT = 45


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_PLANNER_")}
    env["MCP_PLANNER_RUNNER_IDLE_EXIT"] = "3"  # runners started by these tests do not linger
    env.update(
        CI_STATE_DIR=str(tmp_path / "ci-state"),
        CI_DELAY="0.05",
        WORKSPACE_ROOT=str(tmp_path / "workspace"),
        COLUMNS="200",
        PYTHONUNBUFFERED="1",
    )
    return env


def cli(
    tmp_path: Path, *args: str | Path, db: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`mcp-planner ARGS --db <tmp>/plans.db` in this process, with `cli_env` and `tmp_path` as the working
    directory; stdin is not a terminal. An exception the command did not turn into an exit code is raised."""
    argv = [*map(str, args), *(["--db", str(tmp_path / "plans.db")] if db else [])]
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("MCP_PLANNER_")}
    env.update(cli_env(tmp_path))
    handlers, level = logging.root.handlers[:], logging.root.level  # the command configures logging
    try:
        with contextlib.chdir(tmp_path):
            result = CliRunner().invoke(app, argv, input=input, env=env, catch_exceptions=True)
    finally:
        logging.root.handlers[:], logging.root.level = handlers, level
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(argv, result.exit_code, result.stdout, result.stderr)


def cli_process(
    tmp_path: Path, *args: str | Path, stdin: int | None = subprocess.DEVNULL
) -> subprocess.CompletedProcess[str]:
    """Run `python -m mcp_planner ARGS --db <tmp>/plans.db`; stdin is not a terminal unless given one."""
    cmd = [sys.executable, "-m", "mcp_planner", *map(str, args), "--db", str(tmp_path / "plans.db")]
    return subprocess.run(
        cmd,
        stdin=stdin,
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        cwd=tmp_path,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def write_plan(tmp_path: Path, plan: dict[str, Any], name: str = "plan.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(plan), encoding="utf-8")
    return path


def stored_plans(tmp_path: Path) -> list[dict[str, Any]]:
    result = cli(tmp_path, "plans", "--json")
    assert result.returncode == 0, result.stderr
    plans: list[dict[str, Any]] = json.loads(result.stdout)
    return plans


def show_json(tmp_path: Path, plan_id: str) -> dict[str, Any]:
    result = cli(tmp_path, "show", plan_id, "--json")
    assert result.returncode == 0, result.stderr
    plan: dict[str, Any] = json.loads(result.stdout)
    return plan


def assert_clean_error(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout


# -- run -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The README's main job, run once for the tests that only read what it left behind."""
    tmp_path = tmp_path_factory.mktemp("ci-run")
    return tmp_path, cli_process(
        tmp_path, "run", EXAMPLES / "ci_pipeline.json", "--servers", SERVERS, "--yes"
    )


def test_run_ci_pipeline_example_completes_and_exits_zero(
    ci_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    tmp_path, result = ci_run

    assert result.returncode == ExitCode.OK, result.stderr
    assert "): completed, 7/7 completed" in result.stdout
    # Off a terminal, progress is one line per step transition; the flaky suite was retried twice.
    for line in ("start   checkout -> ci.checkout", "start   e2e_tests -> ci.flaky", "done    deploy"):
        assert line in result.stdout
    assert "e2e_tests [ci.flaky] completed" in result.stdout and "2 retries" in result.stdout
    [plan] = stored_plans(tmp_path)
    assert plan["status"] == "completed"
    shown = show_json(tmp_path, plan["plan_id"])
    assert shown["approved_by"] and shown["metadata"]["approval_method"] == "human-terminal"
    deploy = next(s for s in shown["steps"] if s["id"] == "deploy")
    assert deploy["result"]["structured"]["artifact"] == "dist/app-1.4.2.tar.gz"


def test_run_data_flow_example_passes_results_between_steps(tmp_path: Path) -> None:
    result = cli(tmp_path, "run", EXAMPLES / "data_flow.json", "--servers", SERVERS, "--yes")

    assert result.returncode == ExitCode.OK, result.stderr
    assert "): completed, 7/7 completed" in result.stdout
    note = (tmp_path / "workspace" / "releases" / "v2.0.0.md").read_text()
    assert note.startswith("# Release v2.0.0\n") and "dist/app-2.0.0.tar.gz" in note
    summary = (tmp_path / "workspace" / "releases" / "SUMMARY.txt").read_text()
    assert summary.startswith("v2.0.0 (dist/app-2.0.0.tar.gz): note has 5 lines")
    assert "title: # Release v2.0.0" in summary
    manifest = json.loads((tmp_path / "workspace" / "releases" / "manifest.json").read_text())
    assert manifest["version"] == "2.0.0"


def test_invalid_plan_exits_with_the_invalid_code_and_lists_every_problem(tmp_path: Path) -> None:
    plan = write_plan(
        tmp_path,
        {
            "description": "broken",
            "steps": [
                {"id": "a", "tool_name": "ci.checkout", "parameters": {}},
                {"id": "a", "tool_name": "ci.lint"},
                {"id": "b", "tool_name": "ci.no_such_tool", "depends_on": ["c"]},
                {"id": "c", "tool_name": "ci.lint", "depends_on": ["b"]},
                {"id": "d", "tool_name": "ci.sleep", "parameters": {"seconds": "soon"}, "depends_on": ["x"]},
            ],
        },
    )

    result = cli(tmp_path, "run", plan, "--servers", SERVERS, "--yes")

    assert result.returncode == ExitCode.INVALID
    assert_clean_error(result)
    err = result.stderr
    assert "repo" in err  # ci.checkout's required parameter
    assert "duplicate" in err.lower()
    assert "no_such_tool" in err
    assert "cycle" in err.lower()
    assert "'x'" in err  # unknown dependency
    assert "soon" in err or "number" in err  # wrong type for ci.sleep's seconds
    assert stored_plans(tmp_path) == []


def test_a_plan_naming_an_unreachable_server_is_invalid_and_says_what_to_check(tmp_path: Path) -> None:
    failing = REPO / "tests" / "servers" / "exit_at_start.py"
    servers = tmp_path / "servers.json"
    vault = {"command": sys.executable, "args": [str(failing)]}
    servers.write_text(json.dumps({"mcpServers": {"vault": vault}}))
    plan = write_plan(tmp_path, {"description": "read", "steps": [{"tool_name": "vault.read"}]})

    result = cli(tmp_path, "run", plan, "--servers", servers, "--yes")

    assert result.returncode == ExitCode.INVALID
    assert_clean_error(result)
    assert "vault.read" in result.stderr
    assert "'vault' is unreachable" in result.stderr
    assert "check its entry in the servers file" in result.stderr  # the MCP server's advice, word for word
    assert stored_plans(tmp_path) == []


def test_malformed_plan_file_exits_with_the_invalid_code(tmp_path: Path) -> None:
    not_json = tmp_path / "bad.json"
    not_json.write_text("{not json", encoding="utf-8")
    unknown_field = write_plan(tmp_path, {"description": "x", "stepz": []}, "fields.json")

    for path, expected in ((not_json, "not valid JSON"), (unknown_field, "stepz")):
        result = cli(tmp_path, "run", path, "--servers", SERVERS, "--yes")
        assert result.returncode == ExitCode.INVALID
        assert expected in result.stderr
        assert_clean_error(result)


def test_run_without_yes_and_without_a_terminal_refuses_and_stores_nothing(tmp_path: Path) -> None:
    result = cli(tmp_path, "run", EXAMPLES / "ci_pipeline.json", "--servers", SERVERS)

    assert result.returncode == ExitCode.NOT_APPROVED
    assert "--yes" in result.stderr
    assert_clean_error(result)
    assert stored_plans(tmp_path) == []


def run_on_a_terminal(
    tmp_path: Path, args: Sequence[str | Path], answer: str
) -> subprocess.CompletedProcess[str]:
    """Run the CLI with a pseudo-terminal as stdin and type `answer` at its prompt."""
    master, slave = os.openpty()
    try:
        os.write(master, answer.encode())
        return cli_process(tmp_path, *args, stdin=slave)
    finally:
        os.close(slave)
        os.close(master)


def test_run_asks_on_a_terminal_and_a_no_rejects_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mcp_planner.cli.runtime.can_ask", lambda: True)  # the yes test uses a real terminal
    result = cli(tmp_path, "run", EXAMPLES / "ci_pipeline.json", "--servers", SERVERS, input="n\n")

    assert result.returncode == ExitCode.NOT_APPROVED, result.stderr
    assert "Run this plan?" in result.stdout
    [plan] = stored_plans(tmp_path)
    assert plan["status"] == "cancelled"
    assert "declined at the terminal" in show_json(tmp_path, plan["plan_id"])["rejection_note"]


@pytest.mark.e2e
@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_run_asks_on_a_terminal_and_a_yes_runs_the_plan(tmp_path: Path) -> None:
    # One step: what is under test is the prompt on a real terminal, not the pipeline (ci_run runs that).
    plan = write_plan(tmp_path, {"description": "lint", "steps": [{"id": "lint", "tool_name": "ci.lint"}]})
    result = run_on_a_terminal(tmp_path, ["run", plan, "--servers", SERVERS], "y\n")

    assert result.returncode == ExitCode.OK, result.stderr
    assert "Run this plan?" in result.stdout
    assert [p["status"] for p in stored_plans(tmp_path)] == ["completed"]


def test_failed_plan_exits_with_the_failed_code_and_resume_completes_it(tmp_path: Path) -> None:
    plan = write_plan(
        tmp_path,
        {
            "description": "a step that fails once, then works",
            "steps": [
                {"id": "checkout", "tool_name": "ci.checkout", "parameters": {"repo": "r"}},
                {"id": "fragile", "tool_name": "ci.flaky", "parameters": {"key": "resume-me", "failures": 1}},
                {"id": "build", "tool_name": "build", "depends_on": ["fragile"]},
            ],
            "options": {"require_approval": False},
        },
    )

    first = cli(tmp_path, "run", plan, "--servers", SERVERS, "--yes")
    assert first.returncode == ExitCode.FAILED, first.stderr
    assert "transient failure 1 of 1" in first.stdout
    [stored] = stored_plans(tmp_path)
    assert stored["status"] == "failed"
    before = show_json(tmp_path, stored["plan_id"])
    again = cli(tmp_path, "execute", stored["plan_id"])
    assert again.returncode == ExitCode.ERROR
    assert f"run `mcp-planner resume {stored['plan_id']}`" in again.stderr  # the command, not the MCP tool

    resumed = cli(tmp_path, "resume", stored["plan_id"], "--servers", SERVERS)
    assert resumed.returncode == ExitCode.OK, resumed.stderr
    shown = show_json(tmp_path, stored["plan_id"])
    assert shown["status"] == "completed"
    # The completed step was kept, not run again; the failed one ran again and its dependent after it.
    assert shown["steps"][0] == before["steps"][0]
    assert [s["status"] for s in before["steps"]] == ["completed", "failed", "skipped"]


def test_partial_plan_exits_with_the_partial_code(tmp_path: Path) -> None:
    plan = write_plan(
        tmp_path,
        {
            "description": "one good step, one bad deploy",
            "steps": [
                {"id": "lint", "tool_name": "ci.lint"},
                {"id": "deploy", "tool_name": "ci.deploy", "parameters": {"artifact": "bogus"}},
            ],
            "options": {"require_approval": False, "continue_on_error": True},
        },
    )

    result = cli(tmp_path, "run", plan, "--servers", SERVERS, "--yes")

    assert result.returncode == ExitCode.PARTIAL, result.stderr
    assert "unknown artifact 'bogus'" in result.stdout


@pytest.mark.e2e
@pytest.mark.anyio
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_ctrl_c_during_run_cancels_the_plan_cleanly(tmp_path: Path) -> None:
    plan = write_plan(
        tmp_path,
        {
            "description": "wait a long time",
            "steps": [
                {"id": "first", "tool_name": "ci.lint"},
                {
                    "id": "long",
                    "tool_name": "ci.sleep",
                    "parameters": {"seconds": 300},
                    "depends_on": ["first"],
                },
                {"id": "after", "tool_name": "ci.lint", "depends_on": ["long"]},
            ],
        },
    )
    cmd = [sys.executable, "-m", "mcp_planner", "run", str(plan), "--servers", str(SERVERS), "--yes"]
    cmd += ["--db", str(tmp_path / "plans.db")]
    output = ""
    with anyio.fail_after(40):
        async with await anyio.open_process(cmd, env=cli_env(tmp_path), stdin=subprocess.DEVNULL) as proc:
            assert proc.stdout is not None
            async for chunk in proc.stdout:
                output += chunk.decode()
                if "start   long" in output:
                    break
            proc.send_signal(signal.SIGINT)
            async for chunk in proc.stdout:
                output += chunk.decode()
            code = await proc.wait()

    assert code == ExitCode.CANCELLED, output
    assert "cancelled" in output
    [stored] = await anyio.to_thread.run_sync(stored_plans, tmp_path)
    assert stored["status"] == "cancelled"
    shown = await anyio.to_thread.run_sync(show_json, tmp_path, stored["plan_id"])
    steps = {s["id"]: s["status"] for s in shown["steps"]}
    assert steps == {"first": "completed", "long": "skipped", "after": "skipped"}


async def flaky_calls(env: dict[str, str], key: str, calls: int) -> list[bool]:
    """Call the example ci server's `flaky` tool `calls` times over stdio; True for each failure."""
    ci = str(EXAMPLES / "servers" / "ci.py")
    server = StdioServerParameters(command=sys.executable, args=[ci], env=env)
    with anyio.fail_after(30):
        async with Client(server, mode="legacy") as client:
            return [(await client.call_tool("flaky", {"key": key})).is_error for _ in range(calls)]


@pytest.mark.anyio
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX user ids")
async def test_the_example_flaky_tool_counts_per_user_so_a_second_user_still_sees_the_retries(
    tmp_path: Path,
) -> None:
    # Another user ran the demo first: their counts sit in the directory a shared default would use.
    shared = tmp_path / "mcp-planner-ci"
    shared.mkdir()
    digest = hashlib.sha256(b"e2e-demo").hexdigest()[:16]
    (shared / f"flaky-{digest}").write_text("5")
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)}

    assert await flaky_calls(env, "e2e-demo", 3) == [True, True, False]
    assert (shared / f"flaky-{digest}").read_text() == "5"
    own = tmp_path / f"mcp-planner-ci-{os.getuid()}"
    assert (own / f"flaky-{digest}").read_text() == "3" and own.stat().st_mode & 0o077 == 0

    # CI_STATE_DIR still chooses the directory.
    chosen = tmp_path / "chosen"
    assert await flaky_calls({**env, "CI_STATE_DIR": str(chosen)}, "e2e-demo", 1) == [True]
    assert (chosen / f"flaky-{digest}").read_text() == "1"


def test_without_verbose_serve_logs_only_plain_one_line_notices(tmp_path: Path) -> None:
    servers = tmp_path / "servers.json"
    entry = {"command": "x", "disabled": True, "colour": "blue"}
    servers.write_text(json.dumps({"mcpServers": {"x": entry}}))

    quiet = [cli_process(tmp_path, "serve"), cli_process(tmp_path, "serve", "--servers", servers)]

    assert [r.returncode for r in quiet] == [0, 0], [r.stderr for r in quiet]
    lines = [line for r in quiet for line in r.stderr.splitlines()]
    assert len(lines) == 2 and all(line.startswith("mcp-planner: ") for line in lines), lines
    assert "no servers file" in lines[0] and "ignoring unknown field(s) ['colour']" in lines[1]
    verbose = cli_process(tmp_path, "serve", "-v")
    assert " WARNING mcp_planner.cli.main: no servers file" in verbose.stderr


# -- inspecting ------------------------------------------------------------------------------------------


def test_plans_and_show_describe_a_plan_that_ran(
    ci_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    tmp_path, result = ci_run
    assert result.returncode == 0, result.stderr
    [plan] = stored_plans(tmp_path)

    listing = cli(tmp_path, "plans")
    assert listing.returncode == 0
    assert plan["plan_id"] in listing.stdout and "completed" in listing.stdout
    assert cli(tmp_path, "plans", "--status", "failed").stdout.startswith("no plans")

    shown = cli(tmp_path, "show", plan["plan_id"])
    assert shown.returncode == 0, shown.stderr
    for expected in ("checkout", "e2e_tests", "ci.deploy", "flowchart", "-->", "human-terminal"):
        assert expected in shown.stdout


def test_unknown_plan_id_is_a_one_line_error_without_traceback(tmp_path: Path) -> None:
    for command in (["show", "nope"], ["approve", "nope", "--yes"], ["cancel", "nope"], ["resume", "nope"]):
        result = cli(tmp_path, *command)
        assert result.returncode == ExitCode.ERROR
        assert "no plan with id 'nope'" in result.stderr
        assert "mcp-planner plans" in result.stderr  # the CLI names its own command, not the MCP tool
        assert_clean_error(result)


def test_help_documents_the_exit_codes(tmp_path: Path) -> None:
    result = cli(tmp_path, "--help", db=False)
    assert result.returncode == 0
    for text in ("Exit codes", "3 the plan failed", "6 the plan was not approved"):
        assert text in " ".join(result.stdout.split())


def test_tools_lists_the_example_servers_tools(tmp_path: Path) -> None:
    result = cli(tmp_path, "tools", "--servers", SERVERS, db=False)

    assert result.returncode == 0, result.stderr
    for name in ("ci.checkout", "ci.flaky", "workspace.write_file", "workspace.read_file", "connected"):
        assert name in result.stdout


def test_tools_reports_a_server_that_fails_to_start_and_lists_the_rest(tmp_path: Path) -> None:
    config = json.loads(SERVERS.read_text())
    for server in config["mcpServers"].values():
        server["args"] = [str(EXAMPLES / arg) for arg in server["args"]]
        server["cwd"] = str(EXAMPLES)
    config["mcpServers"]["broken"] = {"command": str(tmp_path / "no-such-program")}
    servers = tmp_path / "servers.json"
    servers.write_text(json.dumps(config))

    result = cli(tmp_path, "tools", "--servers", servers, db=False)

    assert result.returncode == ExitCode.ERROR
    assert "ci.checkout" in result.stdout and "broken" in result.stdout
    assert "broken" in result.stderr
    assert_clean_error(result)


# -- approving, rejecting, cancelling plans an agent created ------------------------------------------------


async def echo(params: dict[str, Any]) -> dict[str, Any]:
    return dict(params)


class Gate:
    """An in-process tool that blocks until cancelled, to hold a plan in `executing`."""

    def __init__(self) -> None:
        self.entered = anyio.Event()

    async def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        self.entered.set()
        await anyio.sleep_forever()
        return {}


@asynccontextmanager
async def planner_over_mcp(
    tmp_path: Path, approval: str = "human", gate: Gate | None = None
) -> AsyncIterator[tuple[Client, PlannerService]]:
    tools = LocalTools({"echo": echo, **({"wait": gate} if gate else {})})
    async with PlanStore.open(tmp_path / "plans.db") as store:
        async with PlannerService(store, tools, approval=approval) as service:
            async with Client(build_server(service)) as client:
                yield client, service


async def acli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`cli` from an async test: the command runs its own event loop, so it runs in a worker thread."""
    with anyio.fail_after(CLI_TIMEOUT):
        return await anyio.to_thread.run_sync(functools.partial(cli, tmp_path, *args))


async def acli_process(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`cli_process` from an async test."""
    with anyio.fail_after(CLI_TIMEOUT):
        return await anyio.to_thread.run_sync(functools.partial(cli_process, tmp_path, *args))


def text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def hello_plan(**options: Any) -> dict[str, Any]:
    return {
        "description": "say hello",
        "steps": [{"id": "hello", "tool_name": "echo", "parameters": {"text": "hello"}}],
        "options": options,
    }


@pytest.mark.anyio
async def test_approve_from_the_cli_lets_a_plan_created_over_mcp_execute(tmp_path: Path) -> None:
    async with planner_over_mcp(tmp_path, approval="human") as (client, _service):
        created = await client.call_tool("create_plan", hello_plan())
        assert not created.is_error, text(created)
        plan_id = created.structured_content["id"]  # type: ignore[index]

        refused = await client.call_tool("approve_plan", {"plan_id": plan_id})
        assert refused.is_error and f"mcp-planner approve {plan_id}" in text(refused)

        approved = await acli(tmp_path, "approve", plan_id, "--yes")
        assert approved.returncode == 0, approved.stderr
        assert "approved by" in approved.stdout

        executed = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert not executed.is_error, text(executed)
        assert executed.structured_content["status"] == "completed"  # type: ignore[index]

    shown = await anyio.to_thread.run_sync(show_json, tmp_path, plan_id)
    assert shown["metadata"]["approval_method"] == "human-terminal"


@pytest.mark.anyio
async def test_approve_without_a_terminal_and_without_yes_leaves_the_plan_pending(tmp_path: Path) -> None:
    async with planner_over_mcp(tmp_path) as (client, service):
        created = await client.call_tool("create_plan", hello_plan())
        plan_id = created.structured_content["id"]  # type: ignore[index]

        result = await acli(tmp_path, "approve", plan_id)

        assert result.returncode == ExitCode.NOT_APPROVED
        assert "--yes" in result.stderr
        assert (await service.get_plan(plan_id)).status == PlanStatus.PENDING_APPROVAL


@pytest.mark.anyio
async def test_reject_from_the_cli_cancels_a_pending_plan_for_good(tmp_path: Path) -> None:
    async with planner_over_mcp(tmp_path) as (client, service):
        created = await client.call_tool("create_plan", hello_plan())
        plan_id = created.structured_content["id"]  # type: ignore[index]

        result = await acli(tmp_path, "reject", plan_id, "--reason", "not today")
        assert result.returncode == 0, result.stderr

        plan = await service.get_plan(plan_id)
        assert plan.status == PlanStatus.CANCELLED and plan.rejection_note == "not today"
        executed = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert executed.is_error


@pytest.mark.anyio
async def test_cancel_from_the_cli_cancels_an_approved_plan(tmp_path: Path) -> None:
    async with planner_over_mcp(tmp_path, approval="agent") as (client, service):
        created = await client.call_tool("create_plan", hello_plan(require_approval=False))
        plan_id = created.structured_content["id"]  # type: ignore[index]
        assert (await service.get_plan(plan_id)).status == PlanStatus.APPROVED

        result = await acli(tmp_path, "cancel", plan_id, "--reason", "changed my mind")
        assert result.returncode == 0, result.stderr

        assert (await service.get_plan(plan_id)).status == PlanStatus.CANCELLED


@pytest.mark.e2e
@pytest.mark.anyio
async def test_cancel_from_the_cli_stops_a_plan_executing_in_another_process(tmp_path: Path) -> None:
    gate = Gate()
    async with planner_over_mcp(tmp_path, approval="agent", gate=gate) as (_client, service):
        plan = await service.create_plan(
            PlanSpec.model_validate(
                {
                    "description": "hold",
                    "steps": [{"id": "hold", "tool_name": "wait"}, {"id": "next", "tool_name": "echo"}],
                    "options": {"require_approval": False},
                }
            )
        )
        outcome: dict[str, Any] = {}

        async def execute() -> None:
            outcome["summary"] = await service.execute_plan(plan.id, wait_seconds=None)

        # The executing process picks the request up on its next claim heartbeat.
        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                tg.start_soon(execute)
                await gate.entered.wait()
                result = await acli_process(tmp_path, "cancel", plan.id, "--reason", "stop it")
                assert result.returncode == 0, result.stderr

        assert outcome["summary"].status == PlanStatus.CANCELLED
        stopped = await service.get_plan(plan.id)
        assert stopped.status == PlanStatus.CANCELLED
        assert [s.status for s in stopped.steps] == ["skipped", "skipped"]


@pytest.mark.e2e
@pytest.mark.anyio
async def test_no_arguments_serves_stdio_and_execute_runs_a_plan_the_agent_created(tmp_path: Path) -> None:
    db = str(tmp_path / "plans.db")
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_planner", "--servers", str(SERVERS), "--db", db],
        env=cli_env(tmp_path),
        cwd=str(tmp_path),
    )
    spec = {
        "description": "check out and lint",
        "steps": [
            {"id": "checkout", "tool_name": "checkout", "parameters": {"repo": "example/app"}},
            {
                "id": "lint",
                "tool_name": "lint",
                "parameters": {"commit": "{{ steps.checkout.result.commit }}"},
            },
        ],
    }
    with anyio.fail_after(50):
        async with Client(server, mode="legacy") as client:
            created = await client.call_tool("create_plan", spec)
            assert not created.is_error, text(created)
            plan_id = created.structured_content["id"]  # type: ignore[index]

            executed = await acli_process(tmp_path, "execute", plan_id, "--yes", "--servers", str(SERVERS))
            assert executed.returncode == 0, executed.stderr

            summary = await client.call_tool("get_summary", {"plan_id": plan_id})
            assert summary.structured_content["status"] == "completed"  # type: ignore[index]


@pytest.mark.e2e
@pytest.mark.anyio
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_resume_recovers_a_plan_whose_cli_process_was_killed(tmp_path: Path) -> None:
    plan = write_plan(
        tmp_path,
        {
            "description": "killed mid-step",
            "steps": [
                {"id": "first", "tool_name": "ci.lint"},
                {
                    "id": "slow",
                    "tool_name": "ci.sleep",
                    "parameters": {"seconds": 3},
                    "depends_on": ["first"],
                },
                {"id": "after", "tool_name": "ci.lint", "depends_on": ["slow"]},
            ],
        },
    )
    cmd = [sys.executable, "-m", "mcp_planner", "run", str(plan), "--servers", str(SERVERS), "--yes"]
    cmd += ["--db", str(tmp_path / "plans.db")]
    output = ""
    with anyio.fail_after(40):
        async with await anyio.open_process(cmd, env=cli_env(tmp_path), stdin=subprocess.DEVNULL) as proc:
            assert proc.stdout is not None
            async for chunk in proc.stdout:
                output += chunk.decode()
                if "start   slow" in output:
                    break
            proc.kill()
            await proc.wait()

    [stored] = await anyio.to_thread.run_sync(stored_plans, tmp_path)
    assert stored["status"] == "executing"  # left behind by the dead process

    resumed = await acli_process(tmp_path, "resume", stored["plan_id"], "--servers", str(SERVERS))

    # `ci.sleep` is read-only, so the interrupted call is safe to send again.
    assert resumed.returncode == ExitCode.OK, resumed.stdout + resumed.stderr
    shown = await anyio.to_thread.run_sync(show_json, tmp_path, stored["plan_id"])
    steps = {s["id"]: s["status"] for s in shown["steps"]}
    assert steps == {"first": "completed", "slow": "completed", "after": "completed"}
