"""`PlannerService`, the application layer the MCP server and the CLI share, on a real SQLite store."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from mcp_planner.engine.tools import LocalTools
from mcp_planner.errors import PlanClaimedError, PlanStateError, PlanValidationError
from mcp_planner.plan.model import PlanSpec, PlanStatus, StepSpec, StepStatus
from mcp_planner.service import PlannerService
from mcp_planner.store import open_store
from mcp_planner.store.base import PlanProgress

pytestmark = pytest.mark.anyio


async def echo(params: dict[str, Any]) -> dict[str, Any]:
    return dict(params)


@asynccontextmanager
async def service(db: Path, **kwargs: Any) -> AsyncIterator[PlannerService]:
    async with open_store(db) as store:
        async with PlannerService(store, LocalTools({"echo": echo}), **kwargs) as svc:
            yield svc


def spec(require_approval: bool = False) -> PlanSpec:
    return PlanSpec.model_validate(
        {
            "description": "two echoes",
            "steps": [
                {"id": "a", "tool_name": "echo", "parameters": {"n": 1}},
                {"id": "b", "tool_name": "echo", "parameters": {"n": "{{ steps.a.result.n }}"}},
            ],
            "options": {"require_approval": require_approval},
        }
    )


def dead_pid() -> int:
    """A pid that no process has: one past the largest pid seen, skipping any that exist."""
    pid = max(int(p) for p in os.listdir("/proc") if p.isdigit()) + 1000
    while Path(f"/proc/{pid}").exists():
        pid += 1
    return pid


async def test_execute_without_wait_limit_runs_to_the_end_and_calls_plain_progress_callbacks(db: str) -> None:
    seen: list[PlanProgress] = []

    def on_progress(progress: PlanProgress) -> None:
        seen.append(progress)

    async with service(db) as svc:
        plan = await svc.create_plan(spec())
        assert plan.status == PlanStatus.APPROVED and plan.approved_by == "auto"
        summary = await svc.execute_plan(plan.id, wait_seconds=None, on_progress=on_progress)
        assert summary.status == PlanStatus.COMPLETED
        kinds = [e.kind for e in await svc.events(plan.id)]
        assert kinds[:2] == ["plan_created", "plan_approved"]
        stored = await svc.get_plan(plan.id)
        assert stored.step("b").result is not None and stored.step("b").result.structured == {"n": 1}
    done = [p.done for p in seen]
    assert done == sorted(done) and done[-1] == 2  # progress only moves forward, to the end
    assert seen[-1].status == PlanStatus.COMPLETED
    events = [e for p in seen for e in p.events]
    assert [e.seq for e in events] == sorted({e.seq for e in events})  # each event reported once, in order
    assert [e.kind for e in events if e.step_id == "b"] == ["step_started", "step_completed"]


async def test_create_refuses_an_invalid_plan_with_every_problem_and_stores_nothing(db: str) -> None:
    bad = PlanSpec(description="", steps=[StepSpec(id="x", tool_name="nope", depends_on=["y"])])
    async with service(db) as svc:
        with pytest.raises(PlanValidationError) as caught:
            await svc.create_plan(bad)
        fields = {(p.step_id, p.field) for p in caught.value.problems}
        assert (
            (None, "description") in fields and ("x", "tool_name") in fields and ("x", "depends_on") in fields
        )
        assert await svc.list_plans() == []


async def test_a_plan_left_executing_by_a_dead_process_is_refused_by_execute_and_resumed(db: str) -> None:
    async with service(db) as svc:
        plan = await svc.create_plan(spec())
        plan.status = PlanStatus.EXECUTING
        plan.steps[0].status = StepStatus.RUNNING
        await svc.store.save_plan(plan)
        assert await svc.store.claim(plan.id, f"{socket.gethostname()}:{dead_pid()}:gone") is None
        with pytest.raises(PlanStateError, match="resume_plan"):
            await svc.execute_plan(plan.id)
        interrupted = await svc.resume_plan(plan.id, wait_seconds=None)
        assert interrupted.status == PlanStatus.FAILED  # echo is not known to be safe to re-run
        assert "interrupted" in (interrupted.steps[0].error or "")
        done = await svc.resume_plan(plan.id, rerun_interrupted=True, wait_seconds=None)
        assert done.status == PlanStatus.COMPLETED


async def test_a_plan_executing_in_another_live_process_is_cancelled_through_the_store(db: str) -> None:
    async with service(db) as svc:
        plan = await svc.create_plan(spec())
        plan.status = PlanStatus.EXECUTING
        await svc.store.save_plan(plan)
        other = f"{socket.gethostname()}:{os.getpid()}:another-server"
        assert await svc.store.claim(plan.id, other) is None
        for call in (svc.execute_plan(plan.id), svc.resume_plan(plan.id)):
            with pytest.raises(PlanClaimedError):
                await call
        summary = await svc.cancel_plan(plan.id, "stop it", cancelled_by="alice")
        assert summary.status == PlanStatus.EXECUTING  # the other process stops it
        claim = await svc.store.get_claim(plan.id)
        assert claim is not None and claim.cancel_reason == "stop it"
        requested = [e for e in await svc.events(plan.id) if e.kind == "cancel_requested"]
        assert requested[-1].data["by"] == "alice" and requested[-1].data["owner"] == other


async def test_update_is_refused_once_a_plan_has_run(db: str) -> None:
    async with service(db) as svc:
        plan = await svc.create_plan(spec())
        await svc.execute_plan(plan.id, wait_seconds=None)
        with pytest.raises(PlanStateError, match="has not started"):
            await svc.update_plan(plan.id, description="too late")


async def test_unknown_approval_policy_is_refused(db: str) -> None:
    async with open_store(db) as store:
        with pytest.raises(ValueError, match="approval policy"):
            PlannerService(store, LocalTools({}), approval="sometimes")


async def test_the_step_limit_is_the_deployments_not_the_plans(db: str) -> None:
    from mcp_planner.errors import ConfigError
    from mcp_planner.stack import max_steps

    assert max_steps({}) == 10_000
    assert max_steps({"MCP_PLANNER_MAX_STEPS": "200000"}) == 200_000
    for bad in ("0", "-5", "lots"):
        with pytest.raises(ConfigError, match="MCP_PLANNER_MAX_STEPS"):
            max_steps({"MCP_PLANNER_MAX_STEPS": bad})
    async with open_store(db) as store:
        async with PlannerService(store, LocalTools({"echo": echo}), max_steps=2) as svc:
            steps = [StepSpec(id=f"s{i}", tool_name="echo") for i in range(3)]
            with pytest.raises(PlanValidationError, match="invalid") as caught:
                await svc.create_plan(PlanSpec(description="three", steps=steps))
            assert any("limit of 2" in p.message for p in caught.value.problems)
