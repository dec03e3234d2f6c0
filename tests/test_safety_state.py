"""Approval integrity, compare-and-set transitions and bounded numbers (SPEC section 4).

Two `PlannerService`s on one SQLite file stand for two planner processes: each has its own connection,
owner id and claims, so SQLite's locking and the stored state decide every race, as between processes.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_cli import cli_env, hello_plan, planner_over_mcp, text

from mcp_planner.engine.tools import LocalTools
from mcp_planner.errors import PlanChangedError, PlanConflictError, PlannerError, PlanStateError
from mcp_planner.plan.model import ExecutionOptions, ExecutionPlan, PlanSpec, PlanStatus, StepSpec
from mcp_planner.service import PlannerService
from mcp_planner.store.memory import MemoryStore
from mcp_planner.store.sqlite import PlanStore

pytestmark = pytest.mark.anyio


class Calls:
    """In-process tools that record each call's parameters; `hold` blocks until the run is cancelled."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.held = anyio.Event()

    async def echo(self, params: dict[str, Any]) -> dict[str, Any]:
        self.seen.append(params)
        return params

    async def hold(self, params: dict[str, Any]) -> dict[str, Any]:
        self.held.set()
        await anyio.sleep_forever()
        return {}

    def tools(self) -> LocalTools:
        return LocalTools({"echo": self.echo, "hold": self.hold})


@asynccontextmanager
async def two_processes(
    db: Path, calls: Calls, approval: str = "auto"
) -> AsyncIterator[tuple[PlannerService, PlannerService]]:
    async with AsyncExitStack() as stack:
        services = []
        for _ in range(2):
            store = await stack.enter_async_context(PlanStore.open(db))
            services.append(
                await stack.enter_async_context(PlannerService(store, calls.tools(), approval=approval))
            )
        yield services[0], services[1]


def spec(text: str = "hello", *, tool: str = "echo", approval: bool = False, **options: Any) -> PlanSpec:
    return PlanSpec(
        description="race",
        steps=[StepSpec(id="a", tool_name=tool, parameters={"text": text})],
        options=ExecutionOptions(require_approval=approval, **options),
    )


async def outcome(call: Any) -> str | BaseException:
    try:
        result = await call
    except PlannerError as exc:
        return exc
    return getattr(result, "status", "ok")


# -- compare-and-set in the store ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_write_from_an_outdated_copy_is_refused_and_writes_nothing(tmp_path: Path, kind: str) -> None:
    async with AsyncExitStack() as stack:
        store = (
            MemoryStore()
            if kind == "memory"
            else await stack.enter_async_context(PlanStore.open(tmp_path / "p.db"))
        )
        plan = ExecutionPlan.new("x")
        plan.add_step("echo", "s", {})
        await store.save_plan(plan)
        first, second = await store.get_plan(plan.id), await store.get_plan(plan.id)
        first.description = "first"
        await store.save_plan(first)
        second.description = "second"
        with pytest.raises(PlanConflictError, match="changed by another call or process"):
            await store.save_plan(second)
        with pytest.raises(PlanConflictError):
            await store.save_transition(second, second.steps)
        assert (await store.get_plan(plan.id)).description == "first"
        fresh = ExecutionPlan.new("same id")
        fresh.id = plan.id
        with pytest.raises(PlanConflictError):  # a new plan never overwrites a stored one
            await store.save_plan(fresh)


# -- races between two processes ----------------------------------------------------------------------------


async def test_reject_racing_execute_either_wins_cleanly_and_never_both(tmp_path: Path) -> None:
    calls = Calls()
    async with two_processes(tmp_path / "p.db", calls) as (one, two):
        for _ in range(15):
            plan = await one.create_plan(spec())
            results: dict[str, Any] = {}

            async def run(name: str, call: Any, into: dict[str, Any] = results) -> None:
                into[name] = await outcome(call)

            before = len(calls.seen)
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "execute", one.execute_plan(plan.id, None))
                tg.start_soon(run, "reject", two.reject_plan(plan.id, "no"))
            final = await one.get_plan(plan.id)
            ran = len(calls.seen) - before
            if isinstance(results["reject"], PlannerError):
                assert final.status == PlanStatus.COMPLETED and ran == 1
                assert "executing" in str(results["reject"]) or "completed" in str(results["reject"])
            else:
                assert isinstance(results["execute"], PlanStateError), results
                assert final.status == PlanStatus.CANCELLED and ran == 0


async def test_update_racing_execute_is_never_silently_lost(tmp_path: Path) -> None:
    calls = Calls()
    async with two_processes(tmp_path / "p.db", calls) as (one, two):
        for _ in range(15):
            plan = await one.create_plan(spec("old"))
            results: dict[str, Any] = {}

            async def run(name: str, call: Any, into: dict[str, Any] = results) -> None:
                into[name] = await outcome(call)

            before = len(calls.seen)
            new_steps = [StepSpec(id="a", tool_name="echo", parameters={"text": "new"})]
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "execute", one.execute_plan(plan.id, None))
                tg.start_soon(run, "update", two.update_plan(plan.id, steps=new_steps))
            stored = await one.get_plan(plan.id)
            texts = [c["text"] for c in calls.seen[before:]]
            if not isinstance(results["update"], PlannerError):
                # The update succeeded: whatever ran (or is stored to run) is the new content.
                assert stored.steps[0].parameters == {"text": "new"}
                assert texts in ([], ["new"])
            else:
                assert texts == ["old"]


async def test_cancel_from_another_process_stops_a_running_plan_promptly(tmp_path: Path) -> None:
    calls = Calls()
    async with two_processes(tmp_path / "p.db", calls) as (one, two):
        plan = await one.create_plan(spec(tool="hold"))
        ended = anyio.Event()

        async def execute() -> None:
            await one.execute_plan(plan.id, None)
            ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(execute)
            with anyio.fail_after(5):
                await calls.held.wait()
            await two.cancel_plan(plan.id, "stop it")
            with anyio.fail_after(1.5):  # seen by polling the claim (every 0.2 s), not the 5 s heartbeat
                await ended.wait()
        stored = await two.get_plan(plan.id)
        assert stored.status == PlanStatus.CANCELLED and stored.steps[0].error == "stop it"


# -- approval integrity -------------------------------------------------------------------------------------


async def test_an_approval_names_what_was_shown_and_a_changed_plan_is_refused(tmp_path: Path) -> None:
    calls = Calls()
    async with two_processes(tmp_path / "p.db", calls, approval="agent") as (one, two):
        plan = await one.create_plan(spec(approval=True))
        shown = plan.compute_hash()
        await two.update_plan(plan.id, steps=[StepSpec(id="a", tool_name="echo", parameters={"text": "x"})])
        with pytest.raises(PlanChangedError, match="changed"):
            await one.approve_plan(plan.id, "alice", "human-terminal", expected_hash=shown)
        assert (await one.get_plan(plan.id)).status == PlanStatus.PENDING_APPROVAL


async def test_after_a_person_approved_an_edit_cannot_turn_approval_off(tmp_path: Path) -> None:
    calls = Calls()
    async with two_processes(tmp_path / "p.db", calls, approval="auto") as (one, _):
        plan = await one.create_plan(spec(approval=True))
        await one.approve_plan(plan.id, "alice", "elicitation", expected_hash=plan.compute_hash())
        updated = await one.update_plan(
            plan.id,
            steps=[StepSpec(id="a", tool_name="echo", parameters={"text": "rm -rf"})],
            options=ExecutionOptions(require_approval=False),
        )
        assert updated.status == PlanStatus.PENDING_APPROVAL
        assert updated.options.require_approval
        with pytest.raises(PlanStateError, match="needs a person's approval"):
            await one.approve_plan(plan.id, "agent", "agent")
        with pytest.raises(PlanStateError, match="approve_plan first"):
            await one.execute_plan(plan.id, None)
        assert calls.seen == []


async def test_under_auto_an_edit_after_the_person_was_asked_needs_the_person_again(tmp_path: Path) -> None:
    async with planner_over_mcp(tmp_path, approval="auto") as (client, service):
        created = await client.call_tool("create_plan", hello_plan(require_approval=True))
        plan_id = created.structured_content["id"]  # type: ignore[index]
        await service.note_person_asked(plan_id)  # what approve_plan does before it elicits
        result = await client.call_tool(
            "update_plan", {"plan_id": plan_id, "options": {"require_approval": False}}
        )
        assert not result.is_error, text(result)
        assert result.structured_content["status"] == "pending_approval"  # type: ignore[index]
        refused = await client.call_tool("approve_plan", {"plan_id": plan_id})
        assert refused.is_error and f"mcp-planner approve {plan_id}" in text(refused)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
async def test_cli_approve_shows_the_plan_again_when_it_changed_before_the_answer(tmp_path: Path) -> None:
    async with planner_over_mcp(tmp_path, approval="human") as (client, service):
        created = await client.call_tool("create_plan", hello_plan())
        plan_id = created.structured_content["id"]  # type: ignore[index]
        master, slave = os.openpty()
        cmd = [sys.executable, "-m", "mcp_planner", "approve", plan_id, "--db", str(tmp_path / "plans.db")]
        async with await anyio.open_process(
            cmd, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(tmp_path)
        ) as proc:
            assert proc.stdout is not None
            seen = b""

            async def until(marker: bytes, count: int) -> None:
                nonlocal seen
                with anyio.fail_after(30):
                    while seen.count(marker) < count:
                        seen += await proc.stdout.receive()  # type: ignore[union-attr]

            await until(b"Approve plan", 1)
            changed = {"id": "hello", "tool_name": "echo", "parameters": {"text": "changed"}}
            updated = await client.call_tool("update_plan", {"plan_id": plan_id, "steps": [changed]})
            assert not updated.is_error, text(updated)
            os.write(master, b"y\n")
            await until(b"Approve plan", 2)  # the new version is shown and the question asked again
            assert b"changed while you were looking" in seen
            os.write(master, b"y\n")
            with anyio.fail_after(30):
                assert await proc.wait() == 0
        os.close(master)
        os.close(slave)
        plan = await service.get_plan(plan_id)
        assert plan.status == PlanStatus.APPROVED and plan.is_approved()
        assert plan.steps[0].parameters == {"text": "changed"}


# -- bounded numbers ----------------------------------------------------------------------------------------


async def test_poison_numbers_and_sizes_are_refused_and_listing_keeps_working(tmp_path: Path) -> None:
    async with planner_over_mcp(tmp_path, approval="auto") as (client, _):
        bad: list[dict[str, Any]] = [
            hello_plan(retry_backoff="nan"),
            hello_plan(retry_backoff=float("inf")),
            hello_plan(retry_backoff=1e308),
            hello_plan(total_timeout_ms=10**30),
            {**hello_plan(), "description": "d" * 20_000},
            {**hello_plan(), "steps": [{"tool_name": "echo", "retry_delay_ms": 1e30, "max_retries": 1}]},
            {**hello_plan(), "steps": [{"tool_name": "echo", "max_retries": 10**30}]},
            {**hello_plan(), "steps": [{"tool_name": "echo", "parameters": {"blob": "x" * (2 << 20)}}]},
        ]
        for plan in bad:
            result = await client.call_tool("create_plan", plan)
            assert result.is_error, plan["options"]
            assert "Traceback" not in text(result)
        listed = await client.call_tool("list_plans", {})
        assert not listed.is_error, text(listed)
        assert listed.structured_content["plans"] == []  # type: ignore[index]


async def test_a_stored_plan_that_cannot_be_read_is_reported_and_the_rest_are_listed(tmp_path: Path) -> None:
    db = tmp_path / "plans.db"
    async with planner_over_mcp(tmp_path, approval="auto") as (client, _):
        ids = []
        for _ in range(2):
            created = await client.call_tool("create_plan", hello_plan())
            ids.append(created.structured_content["id"])  # type: ignore[index]
    with sqlite3.connect(db) as conn:  # damage one plan as a bug or another version might
        conn.execute("UPDATE plans SET header = '{\"id\": 1}' WHERE id = ?", (ids[0],))
    async with PlanStore.open(db) as store:
        listed = await store.list_plans()
        assert [p.id for p in listed] == [ids[1]]
        with pytest.raises(PlannerError, match="cannot be read"):
            await store.get_plan(ids[0])
