"""Runner processes (`mcp-planner runner`, SPEC section 11): runs outlive whoever submitted them.

Every test runs real runner processes and real downstream servers (the example `ci` server and the test
`basic` server) against a real SQLite file, and reads what happened from the store: the event log
(`step_started` per step) and the runs table.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from mcp_planner.plan.model import INTERRUPTED_ERROR, ExecutionPlan, PlanSpec, PlanStatus, StepStatus
from mcp_planner.runner import servers_key
from mcp_planner.stack import open_stack
from mcp_planner.store import open_store
from mcp_planner.store.base import RunKind, RunState

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
CI_SERVER = ROOT / "examples" / "servers" / "ci.py"
BASIC_SERVER = ROOT / "tests" / "servers" / "basic.py"
#: How long a runner may take to start its servers and publish their catalog.
READY_S = 30
#: How long a plan of a few short steps may take to end once a runner has it.
PLAN_S = 30

#: Runs the script argv[2] as a server after touching `argv[1]-<pid>`: each server start leaves a file.
RECORD_START = (
    "import os, pathlib, runpy, sys; "
    "pathlib.Path(f'{sys.argv[1]}-{os.getpid()}').touch(); "
    "script = sys.argv[2]; sys.argv = [script]; runpy.run_path(script, run_name='__main__')"
)


def ci_entry(**extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "command": "${PYTHON}",
        "args": [str(CI_SERVER)],
        "env": {"CI_STATE_DIR": "${CI_STATE_DIR:-}", "CI_DELAY": "${CI_DELAY:-0}"},
    }
    for key, value in extra.items():
        entry[key] = entry[key] + value if isinstance(value, list) else {**entry[key], **value}
    return entry


def write_servers(tmp_path: Path, servers: dict[str, Any]) -> Path:
    path = tmp_path / "servers.json"
    path.write_text(json.dumps({"mcpServers": servers}), encoding="utf-8")
    return path


def ci_and_basic(tmp_path: Path) -> Path:
    basic = {"command": "${PYTHON}", "args": [str(BASIC_SERVER)]}
    return write_servers(tmp_path, {"ci": ci_entry(), "basic": basic})


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_PLANNER_")}
    env["MCP_PLANNER_RUNNER_IDLE_EXIT"] = "3"  # runners the commands start on demand do not linger
    env.update(CI_STATE_DIR=str(tmp_path / "ci-state"), CI_DELAY="0", PYTHONUNBUFFERED="1")
    return env


def planner(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "mcp_planner", *map(str, args)]


@asynccontextmanager
async def runner_process(
    tmp_path: Path, db: str | Path, servers: Path, *, idle_exit: float = 30, name: str = "runner"
) -> AsyncIterator[anyio.abc.Process]:
    """A `mcp-planner runner` on `db` started by the test, killed on the way out if it is still running."""
    with (tmp_path / f"{name}.out").open("ab") as log:
        process = await anyio.open_process(
            planner("runner", "--db", db, "--servers", servers, "--idle-exit", str(idle_exit)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=subprocess_env(tmp_path),
            cwd=tmp_path,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.move_on_after(10, shield=True):
            await process.wait()


async def wait_warm(db: str | Path, servers: Path, pid: int) -> str:
    """The id of the runner with `pid`, once it serves `servers` and has published their catalog."""
    key = servers_key(servers)
    async with open_store(db) as store:
        with anyio.fail_after(READY_S):
            for _ in range(READY_S * 20):
                mine = [r.id for r in await store.live_runners(key) if f":{pid}:" in r.id]
                if mine and await store.get_catalog(key) is not None:
                    return mine[0]
                await anyio.sleep(0.05)
    raise AssertionError(f"runner pid {pid} never became ready: see its .out file")


async def events_of(db: str | Path, plan_id: str) -> list[tuple[str, str | None]]:
    async with open_store(db) as store:
        return [(e.kind, e.step_id) for e in await store.events(plan_id)]


async def starts_per_step(db: str | Path, plan_id: str) -> Counter[str | None]:
    return Counter(step for kind, step in await events_of(db, plan_id) if kind == "step_started")


async def wait_for_events(db: str | Path, plan_id: str, *wanted: tuple[str, str | None]) -> None:
    """Until every (kind, step) in `wanted` is in the plan's event log."""
    async with open_store(db) as store:
        with anyio.fail_after(PLAN_S):
            for _ in range(PLAN_S * 100):
                if set(wanted) <= {(e.kind, e.step_id) for e in await store.events(plan_id)}:
                    return
                await anyio.sleep(0.01)
    raise AssertionError(f"plan {plan_id} never logged {wanted}")


async def ended(db: str | Path, plan_id: str) -> ExecutionPlan:
    """The plan once it has ended (a runner process executes it)."""
    async with open_store(db) as store:
        with anyio.fail_after(PLAN_S):
            for _ in range(PLAN_S * 20):
                plan = await store.get_plan(plan_id)
                if plan.status not in (PlanStatus.APPROVED, PlanStatus.EXECUTING):
                    return plan
                await anyio.sleep(0.05)
    raise AssertionError(f"plan {plan_id} never ended")


def config_env() -> dict[str, str]:
    return {"PYTHON": sys.executable, **os.environ}


def chain(*steps: dict[str, Any]) -> PlanSpec:
    """A plan whose steps run one after the other, named s1, s2, ..."""
    specs = []
    for number, step in enumerate(steps, start=1):
        specs.append({"id": f"s{number}", **step, "depends_on": [f"s{number - 1}"] if number > 1 else []})
    return PlanSpec.model_validate(
        {"description": "a chain", "steps": specs, "options": {"require_approval": False}}
    )


async def submit(db: str | Path, servers: Path, spec: PlanSpec) -> str:
    """Create and submit the plan through a service whose runs go to runner processes; return at once."""
    async with open_stack(db, servers, config_env(), tools="cached", runners=True) as stack:
        plan = await stack.service.create_plan(spec)
        summary = await stack.service.execute_plan(plan.id, wait_seconds=0)
        assert summary.status in (PlanStatus.EXECUTING, PlanStatus.COMPLETED), summary
        return plan.id


def nap(seconds: float, **options: Any) -> dict[str, Any]:
    return {"tool_name": "ci.sleep", "parameters": {"seconds": seconds}, **options}


# -- a killed runner's plan is picked up by the next runner --------------------------------------------


@pytest.mark.parametrize("completed_before_kill", [1, 3, 5])
async def test_a_runner_killed_mid_plan_is_replaced_by_the_next_runner_without_rerunning_completed_steps(
    tmp_path: Path, db: str, completed_before_kill: int
) -> None:
    servers = ci_and_basic(tmp_path)
    # The step the kill lands in is the longest, so that it is still running when the kill arrives.
    spec = chain(*(nap(1.0 if n == completed_before_kill else 0.3) for n in range(6)))
    async with runner_process(tmp_path, db, servers, name="first") as first:
        await wait_warm(db, servers, first.pid)
        plan_id = await submit(db, servers, spec)
        running = f"s{completed_before_kill + 1}"
        await wait_for_events(
            db, plan_id, ("step_completed", f"s{completed_before_kill}"), ("step_started", running)
        )
        first.send_signal(signal.SIGKILL)
        await first.wait()
    async with open_store(db) as store:
        at_kill = await store.get_plan(plan_id)
    assert at_kill.status == PlanStatus.EXECUTING
    assert at_kill.step(running).status == StepStatus.RUNNING

    async with runner_process(tmp_path, db, servers, name="second"):
        plan = await ended(db, plan_id)

    assert plan.status == PlanStatus.COMPLETED, plan.error
    expected = {f"s{n}": 1 for n in range(1, 7)}
    expected[running] = 2  # interrupted mid-call; ci.sleep is read-only, so safe to send again
    assert await starts_per_step(db, plan_id) == expected
    assert all(step.result is not None and step.result.value for step in plan.steps)
    assert "plan_resumed" in {kind for kind, _ in await events_of(db, plan_id)}


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
async def test_a_runner_stopped_mid_plan_leaves_the_plan_to_the_next_runner(
    tmp_path: Path, db: str, stop: signal.Signals
) -> None:
    servers = ci_and_basic(tmp_path)
    spec = chain(nap(0.2), nap(2.0), nap(0.2))
    async with runner_process(tmp_path, db, servers, name="first") as first:
        await wait_warm(db, servers, first.pid)
        plan_id = await submit(db, servers, spec)
        await wait_for_events(db, plan_id, ("step_started", "s2"))
        first.send_signal(stop)
        with anyio.fail_after(20):
            assert await first.wait() == 0  # an orderly stop, not a crash

    async with open_store(db) as store:
        stopped = await store.get_plan(plan_id)
    assert stopped.status == PlanStatus.FAILED  # cut short, its interrupted step's outcome unknown

    async with runner_process(tmp_path, db, servers, name="second"):
        # The run was not marked done by the runner that stopped: the next one resumes it by itself.
        await wait_for_events(db, plan_id, ("plan_resumed", None))
        plan = await ended(db, plan_id)

    assert plan.status == PlanStatus.COMPLETED, plan.error
    assert await starts_per_step(db, plan_id) == {"s1": 1, "s2": 2, "s3": 1}


@pytest.mark.parametrize(("max_retries", "safe"), [(1, True), (0, False)])
async def test_an_interrupted_non_idempotent_step_is_rerun_by_the_next_runner_only_when_retries_allow(
    tmp_path: Path, db: str, max_retries: int, safe: bool
) -> None:
    servers = ci_and_basic(tmp_path)
    # basic.sleep has no annotations: only its max_retries can make sending it again safe.
    risky = {"tool_name": "basic.sleep", "parameters": {"seconds": 1.5}, "max_retries": max_retries}
    spec = chain(nap(0.2), risky, nap(0.2), nap(0.2))
    async with runner_process(tmp_path, db, servers, name="first") as first:
        await wait_warm(db, servers, first.pid)
        plan_id = await submit(db, servers, spec)
        await wait_for_events(db, plan_id, ("step_started", "s2"))
        first.send_signal(signal.SIGKILL)
        await first.wait()

    async with runner_process(tmp_path, db, servers, name="second"):
        plan = await ended(db, plan_id)

    starts = await starts_per_step(db, plan_id)
    assert plan.step("s1").result is not None
    if safe:
        assert plan.status == PlanStatus.COMPLETED, plan.error
        assert starts == {"s1": 1, "s2": 2, "s3": 1, "s4": 1}
        assert all(step.result is not None for step in plan.steps)
    else:
        assert plan.status == PlanStatus.FAILED
        risky_step = plan.step("s2")
        assert risky_step.status == StepStatus.FAILED
        assert INTERRUPTED_ERROR in (risky_step.error or "")
        assert starts == {"s1": 1, "s2": 1}  # nothing after it ran


# -- many plans, two runners ---------------------------------------------------------------------------


async def test_two_runners_execute_twenty_plans_submitted_at_once_each_exactly_once(
    tmp_path: Path, db: str
) -> None:
    servers = ci_and_basic(tmp_path)
    specs = [chain(nap(0.05), {"tool_name": "ci.lint"}) for _ in range(20)]
    async with (
        runner_process(tmp_path, db, servers, name="one") as one,
        runner_process(tmp_path, db, servers, name="two") as two,
    ):
        await wait_warm(db, servers, one.pid)
        await wait_warm(db, servers, two.pid)
        async with open_stack(db, servers, config_env(), tools="cached", runners=True) as stack:
            plan_ids = [(await stack.service.create_plan(spec)).id for spec in specs]
            async with anyio.create_task_group() as tg:
                for plan_id in plan_ids:
                    tg.start_soon(stack.service.execute_plan, plan_id, 0)
        plans = [await ended(db, plan_id) for plan_id in plan_ids]
        runner_ids = {await wait_warm(db, servers, one.pid), await wait_warm(db, servers, two.pid)}

    assert [plan.status for plan in plans] == [PlanStatus.COMPLETED] * 20
    for plan_id in plan_ids:
        events = await events_of(db, plan_id)
        assert Counter(kind for kind, _ in events)["plan_started"] == 1
        assert await starts_per_step(db, plan_id) == {"s1": 1, "s2": 1}
    async with open_store(db) as store:
        runs = [await store.last_run(plan_id) for plan_id in plan_ids]
    # One run per plan, never requeued (a requeued run is a resume), done without error by these runners.
    assert {(r.kind, r.state, r.error) for r in runs if r} == {(RunKind.EXECUTE, RunState.DONE, None)}
    assert {r.runner for r in runs if r} <= runner_ids and None not in runs


# -- cancel from another process ---------------------------------------------------------------------


async def test_a_cancel_from_another_connection_stops_a_plan_in_a_runner_within_a_second(
    tmp_path: Path,
    db: str,
) -> None:
    servers = ci_and_basic(tmp_path)
    async with runner_process(tmp_path, db, servers) as runner:
        await wait_warm(db, servers, runner.pid)
        plan_id = await submit(db, servers, chain(nap(20), nap(0.1)))
        await wait_for_events(db, plan_id, ("step_started", "s1"))
        async with (
            open_stack(db, servers, config_env(), tools="none", runners=True) as other,
            open_store(db) as store,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(other.service.cancel_plan, plan_id, "changed my mind")
            with anyio.fail_after(10):
                for _ in range(500):
                    claim = await store.get_claim(plan_id)
                    if claim is not None and claim.cancel_reason is not None:
                        break
                    await anyio.sleep(0.01)
            with anyio.fail_after(1.5):  # from the committed request to the stopped plan
                for _ in range(300):
                    plan = await store.get_plan(plan_id)
                    if plan.status != PlanStatus.EXECUTING:
                        break
                    await anyio.sleep(0.01)

    assert plan.status == PlanStatus.CANCELLED
    assert plan.step("s2").status == StepStatus.SKIPPED
    assert "step_started" not in {kind for kind, step in await events_of(db, plan_id) if step == "s2"}


# -- idle exit and status -----------------------------------------------------------------------------


def status_json(tmp_path: Path, db: str) -> list[dict[str, Any]]:
    result = run_cli(tmp_path, "status", "--json", db=db)
    assert result.returncode == 0, result.stderr
    runners: list[dict[str, Any]] = json.loads(result.stdout)
    return runners


async def test_an_idle_runner_exits_by_itself_and_status_lists_only_live_runners(
    tmp_path: Path, db: str
) -> None:
    servers = ci_and_basic(tmp_path)
    async with (
        runner_process(tmp_path, db, servers, name="live") as live,
        runner_process(tmp_path, db, servers, idle_exit=1, name="idle") as idle,
    ):
        await wait_warm(db, servers, live.pid)
        with anyio.fail_after(READY_S):
            assert await idle.wait() == 0

        listed = await anyio.to_thread.run_sync(status_json, tmp_path, db)
        assert [f":{live.pid}:" in runner["id"] for runner in listed] == [True]
        assert listed[0]["servers"] == servers_key(servers)
        shown = await anyio.to_thread.run_sync(lambda: run_cli(tmp_path, "status", db=db))
    text = shown.stdout
    assert f"runner pid {live.pid}" in text and str(servers.resolve()) in text
    assert f"pid {idle.pid}" not in text


# -- the foreground run ----------------------------------------------------------------------------------


def recording_servers(tmp_path: Path) -> tuple[Path, Path]:
    """A servers file whose `ci` and `other` servers each leave a file per start in the returned dir."""
    starts = tmp_path / "starts"
    starts.mkdir()
    servers = {
        name: ci_entry(args=[]) | {"args": ["-c", RECORD_START, str(starts / name), str(CI_SERVER)]}
        for name in ("ci", "other")
    }
    return write_servers(tmp_path, servers), starts


def started(starts: Path) -> Counter[str]:
    return Counter(path.name.rpartition("-")[0] for path in starts.iterdir())


def run_cli(
    tmp_path: Path, *args: str | Path, db: str | Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        planner(*args, "--db", db or tmp_path / "plans.db"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=subprocess_env(tmp_path),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


def lint_plan(tmp_path: Path) -> Path:
    path = tmp_path / "plan.json"
    plan = {"description": "lint", "steps": [{"id": "lint", "tool_name": "ci.lint"}]}
    path.write_text(json.dumps(plan), encoding="utf-8")
    return path


async def test_a_foreground_run_without_a_runner_starts_only_the_servers_the_plan_names(
    tmp_path: Path,
) -> None:
    servers, starts = recording_servers(tmp_path)

    result = run_cli(tmp_path, "run", "--yes", "--servers", servers, lint_plan(tmp_path))

    assert result.returncode == 0, result.stderr
    assert started(starts) == {"ci": 1}


async def test_a_foreground_run_goes_to_a_live_runner_and_starts_no_server_itself(
    tmp_path: Path, db: str
) -> None:
    servers, starts = recording_servers(tmp_path)
    async with runner_process(tmp_path, db, servers) as runner:
        runner_id = await wait_warm(db, servers, runner.pid)
        assert started(starts) == {"ci": 1, "other": 1}

        result = await anyio.to_thread.run_sync(
            lambda: run_cli(tmp_path, "run", "--yes", "--servers", servers, lint_plan(tmp_path), db=db)
        )

        assert result.returncode == 0, result.stderr
        assert started(starts) == {"ci": 1, "other": 1}
    async with open_store(db) as store:
        [plan] = await store.recent_plans(1)
        run = await store.last_run(plan.id)
    assert run is not None and (run.runner, run.state) == (runner_id, RunState.DONE)


# -- secrets --------------------------------------------------------------------------------------------


async def test_a_token_a_runner_expands_reaches_neither_the_database_nor_the_runner_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "tok-3f9a7c1e5b2d4a6f8e0c"
    monkeypatch.setenv("TOKEN", token)
    monkeypatch.setenv("CI_STATE_DIR", str(tmp_path / "ci-state"))
    monkeypatch.setenv("CI_DELAY", "0")
    servers = write_servers(
        tmp_path, {"ci": ci_entry(args=["--token=${TOKEN}"], env={"CI_TOKEN": "${TOKEN}"})}
    )
    db = tmp_path / "plans.db"  # SQLite: the test reads the database's files for the token
    spec = chain(
        nap(0.1), {"tool_name": "ci.lint"}, {"tool_name": "ci.build", "parameters": {"version": "1"}}
    )

    # No runner is live: the service starts one, with this process's environment (TOKEN included).
    async with open_stack(db, servers, config_env(), tools="all", runners=True) as stack:
        plan = await stack.service.create_plan(spec)
        summary = await stack.service.execute_plan(plan.id, wait_seconds=PLAN_S)

    assert summary.status == PlanStatus.COMPLETED, summary.error  # the runner could expand ${TOKEN}
    log = tmp_path / "runner.log"
    assert log.stat().st_mode & 0o777 == 0o600
    for path in (log, db, *(db.with_name(db.name + suffix) for suffix in ("-wal", "-shm"))):
        if path.exists():
            assert token.encode() not in path.read_bytes(), path


# -- run --detach -----------------------------------------------------------------------------------------


async def test_run_detach_returns_with_the_plan_id_while_a_runner_completes_the_plan(
    tmp_path: Path, db: str
) -> None:
    servers = ci_and_basic(tmp_path)
    plan_file = tmp_path / "plan.json"
    steps = [
        {"id": "nap", "tool_name": "ci.sleep", "parameters": {"seconds": 1.0}},
        {"id": "lint", "tool_name": "ci.lint", "depends_on": ["nap"]},
    ]
    plan_file.write_text(json.dumps({"description": "nap, then lint", "steps": steps}), encoding="utf-8")

    result = await anyio.to_thread.run_sync(
        lambda: run_cli(tmp_path, "run", "--detach", "--yes", "--servers", servers, plan_file, db=db)
    )

    assert result.returncode == 0, result.stderr
    submitted = re.search(r"plan (\S+) submitted", result.stdout)
    assert submitted is not None, result.stdout
    plan_id = submitted[1]
    assert "executing now" in result.stdout  # it returned before the plan ended
    plan = await ended(db, plan_id)
    assert plan.status == PlanStatus.COMPLETED, plan.error
    assert await starts_per_step(db, plan_id) == {"nap": 1, "lint": 1}
