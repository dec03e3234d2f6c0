"""`mcp-planner serve` launched as a stdio subprocess, as agent apps launch it, with the real example
downstream servers (`examples/servers.json`) and a real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.session import ClientRequestContext
from mcp_types import CallToolResult, ElicitRequestParams, ElicitResult, TextContent

from mcp_planner.store import open_store

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "examples" / "servers.json"


def text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def params(tmp_path: Path, *extra: str, db: str | None = None) -> StdioServerParameters:
    env = {
        **os.environ,
        "CI_STATE_DIR": str(tmp_path / "ci-state"),
        "CI_DELAY": "0",
        "WORKSPACE_ROOT": str(tmp_path / "workspace"),
    }
    (tmp_path / "workspace").mkdir(exist_ok=True)
    args = [
        "-m",
        "mcp_planner",
        "serve",
        "--servers",
        str(SERVERS),
        "--db",
        db or str(tmp_path / "plans.db"),
        *extra,
    ]
    return StdioServerParameters(command=sys.executable, args=args, env=env, cwd=str(tmp_path))


@asynccontextmanager
async def serve(
    tmp_path: Path, *extra: str, db: str | None = None, **client_kwargs: Any
) -> AsyncIterator[Client]:
    client_kwargs.setdefault("mode", "legacy")  # the 2025-11-25 handshake agent apps speak today
    async with Client(params(tmp_path, *extra, db=db), **client_kwargs) as client:
        yield client


async def accept(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
    return ElicitResult(action="accept", content={"note": "ship it"})


async def decline(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
    return ElicitResult(action="decline")


RELEASE = {
    "description": "check out, build and deploy to staging",
    "steps": [
        {"id": "checkout", "tool_name": "checkout", "parameters": {"repo": "acme/app"}},
        {
            "id": "build",
            "tool_name": "ci.build",
            "parameters": {"version": "2.0.0", "commit": "{{ steps.checkout.result.commit }}"},
        },
        {
            "id": "deploy",
            "tool_name": "deploy",
            "parameters": {"artifact": "{{ steps.build.result.artifact }}"},
        },
    ],
}


def sleeper(seconds: float, **options: Any) -> dict[str, Any]:
    return {
        "description": "sleep, then lint",
        "steps": [
            {"id": "nap", "tool_name": "ci.sleep", "parameters": {"seconds": seconds}},
            {"id": "lint", "tool_name": "ci.lint", "depends_on": ["nap"]},
        ],
        "options": {"require_approval": False, **options},
    }


async def create(client: Client, plan: dict[str, Any]) -> str:
    result = await client.call_tool("create_plan", plan)
    assert not result.is_error, text(result)
    assert result.structured_content is not None
    return str(result.structured_content["id"])


async def test_agent_creates_approves_through_the_person_and_executes_with_progress(tmp_path: Path) -> None:
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async with serve(tmp_path, "--approval", "human", elicitation_callback=accept) as client:
        catalog = await client.call_tool("list_tools", {})
        assert catalog.structured_content is not None
        names = {t["name"] for t in catalog.structured_content["tools"]}
        assert {"ci.checkout", "ci.build", "ci.deploy", "workspace.read_file"} <= names
        plan_id = await create(client, RELEASE)
        plan = await client.call_tool("get_plan", {"plan_id": plan_id})
        assert plan.structured_content is not None
        assert [s["tool_name"] for s in plan.structured_content["steps"]] == [
            "ci.checkout",
            "ci.build",
            "ci.deploy",
        ]
        assert plan.structured_content["steps"][2]["depends_on"] == ["build"]
        approved = await client.call_tool("approve_plan", {"plan_id": plan_id})
        assert not approved.is_error, text(approved)
        assert approved.structured_content is not None
        assert approved.structured_content["approval_method"] == "elicitation"
        done = await client.call_tool("execute_plan", {"plan_id": plan_id}, progress_callback=on_progress)
        assert done.structured_content is not None, text(done)
        assert done.structured_content["status"] == "completed", text(done)
        assert progress and progress[-1] == 3
        view = await client.call_tool("get_plan", {"plan_id": plan_id})
        assert view.structured_content is not None
        deploy = view.structured_content["steps"][2]["result"]["structured"]
        assert deploy["artifact"] == "dist/app-2.0.0.tar.gz" and deploy["environment"] == "staging"
        graph = await client.read_resource(f"plan://{plan_id}/graph")
        assert "classDef completed" in graph.contents[0].text  # type: ignore[union-attr]
        prompt = await client.get_prompt("plan_task", {"task": "release 2.0.0"})
        assert "ci.deploy" in prompt.messages[0].content.text  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_declined_plan_is_rejected_and_never_runs(tmp_path: Path, mode: str) -> None:
    async with serve(tmp_path, "--approval", "auto", elicitation_callback=decline, mode=mode) as client:
        if mode == "auto":
            assert client.protocol_version >= "2026-07-28"  # elicitation rides InputRequiredResult rounds
        plan_id = await create(client, RELEASE)
        declined = await client.call_tool("approve_plan", {"plan_id": plan_id})
        assert declined.is_error and "declined" in text(declined)
        refused = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert refused.is_error and "cancelled" in text(refused)


async def test_failing_step_fails_the_plan_and_resume_finishes_it(tmp_path: Path) -> None:
    plan = {
        "description": "flaky step then lint",
        "steps": [
            {"id": "flaky", "tool_name": "ci.flaky", "parameters": {"key": "resume-test", "failures": 1}},
            {"id": "lint", "tool_name": "ci.lint", "depends_on": ["flaky"]},
        ],
        "options": {"require_approval": False},
    }
    async with serve(tmp_path) as client:
        plan_id = await create(client, plan)
        failed = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert failed.structured_content is not None, text(failed)
        assert failed.structured_content["status"] == "failed"
        assert "transient failure 1 of 1" in text(failed)
        resumed = await client.call_tool("resume_plan", {"plan_id": plan_id})
        assert resumed.structured_content is not None, text(resumed)
        assert resumed.structured_content["status"] == "completed"


async def test_invalid_plan_and_wrong_states_are_clean_errors(tmp_path: Path) -> None:
    async with serve(tmp_path, "--approval", "human") as client:
        bad = await client.call_tool(
            "create_plan",
            {
                "description": "bad",
                "steps": [
                    {"id": "a", "tool_name": "ci.deplo", "parameters": {}},
                    {"id": "b", "tool_name": "ci.build", "parameters": {"version": 3}, "depends_on": ["b"]},
                ],
            },
        )
        assert bad.is_error
        for fragment in ("ci.deplo", "ci.deploy", "version", "'b'"):
            assert fragment in text(bad), text(bad)
        plan_id = await create(client, RELEASE)
        no_person = await client.call_tool("approve_plan", {"plan_id": plan_id})
        assert no_person.is_error and f"mcp-planner approve {plan_id}" in text(no_person)
        not_yet = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert not_yet.is_error and "approve_plan first" in text(not_yet)
        missing = await client.call_tool("get_plan", {"plan_id": "missing"})
        assert missing.is_error and "list_plans" in text(missing)
        malformed = await client.call_tool("execute_plan", {"plan_id": 5, "wait_seconds": "soon"})
        assert malformed.is_error
        assert "plan_id: Input should be a valid string" in text(malformed)
        assert "wait_seconds: Input should be a valid number" in text(malformed)
        for result in (bad, no_person, not_yet, missing, malformed):
            assert "Traceback" not in text(result) and "pydantic" not in text(result)


async def test_cancel_stops_an_executing_plan(tmp_path: Path) -> None:
    async with serve(tmp_path) as client:
        plan_id = await create(client, sleeper(60))
        started = await client.call_tool("execute_plan", {"plan_id": plan_id, "wait_seconds": 0})
        assert started.structured_content is not None and started.structured_content["status"] == "executing"
        with anyio.fail_after(15):
            cancelled = await client.call_tool("cancel_plan", {"plan_id": plan_id, "reason": "too slow"})
        assert cancelled.structured_content is not None, text(cancelled)
        assert cancelled.structured_content["status"] == "cancelled"
        assert [s["status"] for s in cancelled.structured_content["steps"]] == ["skipped", "skipped"]


async def test_two_server_processes_cannot_both_execute_one_plan(tmp_path: Path, db: str) -> None:
    started = anyio.Event()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        if message and "running" in message:
            started.set()

    async with serve(tmp_path, db=db) as first, serve(tmp_path, db=db) as second:
        plan_id = await create(first, sleeper(60))
        outcome: dict[str, CallToolResult] = {}

        async def run_in_first() -> None:
            outcome["first"] = await first.call_tool(
                "execute_plan", {"plan_id": plan_id, "wait_seconds": 120}, progress_callback=on_progress
            )

        with anyio.fail_after(45):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_in_first)
                await started.wait()
                for tool in ("execute_plan", "resume_plan"):
                    refused = await second.call_tool(tool, {"plan_id": plan_id, "wait_seconds": 0})
                    assert refused.is_error, tool
                    assert "already executing in another process" in text(refused), text(refused)
                requested = await second.call_tool(
                    "cancel_plan", {"plan_id": plan_id, "reason": "from second"}
                )
                assert not requested.is_error, text(requested)
                assert requested.structured_content is not None
                assert requested.structured_content["status"] == "cancelled", text(requested)
        first_result = outcome["first"]
        assert first_result.structured_content is not None, text(first_result)
        assert first_result.structured_content["status"] == "cancelled"


def processes_running(*words: str) -> list[int]:
    """Pids of this machine's processes whose command line holds every one of `words` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if all(word in args for word in words):
                found.append(int(entry.name))
    return found


async def finished(client: Client, plan_id: str) -> dict[str, Any]:
    """The plan's summary once it has ended (a runner process executes it, not the server we ask)."""
    with anyio.fail_after(30):
        for _ in range(300):
            summary = await client.call_tool("get_summary", {"plan_id": plan_id})
            assert summary.structured_content is not None, text(summary)
            if summary.structured_content["status"] not in ("approved", "executing"):
                return summary.structured_content
            await anyio.sleep(0.1)
    raise AssertionError("the plan never ended")


async def starts_per_step(db: str, plan_id: str) -> dict[str | None, int]:
    async with open_store(db) as store:
        events = await store.events(plan_id)
    return dict(Counter(e.step_id for e in events if e.kind == "step_started"))


async def test_a_plan_submitted_by_a_client_that_exits_at_once_completes_in_a_runner(
    tmp_path: Path, db: str
) -> None:
    async with serve(tmp_path, db=db) as first:
        plan_id = await create(first, sleeper(1.0))
        submitted = await first.call_tool("execute_plan", {"plan_id": plan_id, "wait_seconds": 0})
        assert not submitted.is_error, text(submitted)
        assert "runner" in text(submitted)
    # The client and its server are gone; the runner they started goes on.
    async with serve(tmp_path, db=db) as second:
        summary = await finished(second, plan_id)
    assert summary["status"] == "completed", summary
    assert await starts_per_step(db, plan_id) == {"nap": 1, "lint": 1}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the server's pid in /proc")
async def test_a_plan_whose_server_is_killed_mid_run_completes_in_its_runner(tmp_path: Path, db: str) -> None:
    async with serve(tmp_path, db=db) as first:
        plan_id = await create(first, sleeper(1.5))
        started = await first.call_tool("execute_plan", {"plan_id": plan_id, "wait_seconds": 0.5})
        assert started.structured_content is not None and started.structured_content["status"] == "executing"
        [server_pid] = processes_running("serve", db)
        os.kill(server_pid, signal.SIGKILL)
    async with serve(tmp_path, db=db) as second:
        summary = await finished(second, plan_id)
    assert summary["status"] == "completed", summary
    assert await starts_per_step(db, plan_id) == {"nap": 1, "lint": 1}


async def test_serves_streamable_http(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = params(tmp_path, "--transport", "http", "--port", str(port))
    process = await anyio.open_process([server.command, *server.args], env=server.env, cwd=server.cwd)
    try:
        with anyio.fail_after(20):
            while True:
                try:
                    await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await anyio.sleep(0.1)  # the server is still binding its port: a bounded poll
        async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
            tools = await client.list_tools()
            plan_id = await create(client, sleeper(0))
            done = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert len(tools.tools) == 12
        assert done.structured_content is not None and done.structured_content["status"] == "completed"
    finally:
        process.terminate()
        with anyio.fail_after(10):
            await process.wait()
        await process.aclose()


async def test_unreachable_downstream_server_is_reported_and_named_in_errors(tmp_path: Path) -> None:
    servers = tmp_path / "servers.json"
    servers.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "ci": {"command": sys.executable, "args": [str(ROOT / "examples" / "servers" / "ci.py")]},
                    "vault": {"command": str(tmp_path / "no-such-server")},
                }
            }
        )
    )
    launch = params(tmp_path)
    launch.args[launch.args.index("--servers") + 1] = str(servers)
    async with Client(launch, mode="legacy") as client:
        catalog = await client.call_tool("list_tools", {})
        assert catalog.structured_content is not None
        states = {s["name"]: s for s in catalog.structured_content["servers"]}
        assert states["ci"]["state"] == "connected"
        assert states["vault"]["state"] == "failed" and states["vault"]["error"]
        assert "vault" in text(catalog)
        refused = await client.call_tool(
            "create_plan",
            {
                "description": "read a secret",
                "steps": [{"id": "s", "tool_name": "vault.read", "parameters": {}}],
            },
        )
        assert refused.is_error
        assert "vault.read" in text(refused) and "'vault' is unreachable" in text(refused)


# Puts the planner on the pseudo-terminal at fd 0 as its controlling terminal, as a shell does, so a typed
# Ctrl-C reaches it as SIGINT from the terminal, not from the test.
ON_A_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
async def test_ctrl_c_typed_on_the_terminal_stops_serve_cleanly(tmp_path: Path) -> None:
    launch = params(tmp_path)
    command = [sys.executable, "-c", ON_A_TERMINAL, sys.executable, *launch.args]
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"},
        },
    }
    master, slave = os.openpty()
    try:
        with (tmp_path / "stderr").open("wb") as stderr:
            planner = await anyio.open_process(
                command, stdin=slave, stderr=stderr, env=launch.env, cwd=tmp_path, start_new_session=True
            )
        try:
            assert planner.stdout is not None
            with anyio.fail_after(30):  # serving: it answered initialize
                os.write(master, json.dumps(initialize).encode() + b"\n")
                answer = b""
                async for chunk in planner.stdout:
                    answer += chunk
                    if b"\n" in answer:
                        break
            assert answer.startswith(b'{"jsonrpc":"2.0","id":1,"result"'), (tmp_path / "stderr").read_text()

            os.write(master, b"\x03")  # Ctrl-C
            with anyio.fail_after(10):
                code = await planner.wait()
        finally:
            if planner.returncode is None:
                planner.kill()
            with anyio.fail_after(10):
                await planner.aclose()
    finally:
        os.close(slave)
        os.close(master)

    log = (tmp_path / "stderr").read_text()
    assert code == 0, log
    assert "Traceback" not in log
