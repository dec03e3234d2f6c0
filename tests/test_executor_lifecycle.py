"""Approval gating, cancellation, claims, resume and durability of the executor (real SQLite files)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_executor_support import Tools, new_plan, statuses

from mcp_planner import ExecutionPlan, Executor, MemoryStore, PlanStatus, PlanStore, StepResult, StepStatus
from mcp_planner.errors import PlanClaimedError, PlanStateError, PlanValidationError
from mcp_planner.plan.model import utcnow
from mcp_planner.store import open_store
from mcp_planner.store.base import QueueStore, new_owner_id

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(db: str) -> AsyncIterator[QueueStore]:
    """A database store on each backend (`db`)."""
    async with open_store(db) as s:
        yield s


@pytest.fixture
def dead_owner() -> str:
    """A claim owner naming a process on this host that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}:deadbeef"


def approval_plan() -> ExecutionPlan:
    plan = ExecutionPlan.new("needs approval")
    plan.add_step("ok", "", {"x": 1}, step_id="a")
    plan.submit()
    return plan


# -- approval gating ----------------------------------------------------------------------------------------


async def test_a_plan_pending_approval_does_not_run() -> None:
    tools = Tools()
    plan = approval_plan()
    assert plan.status == PlanStatus.PENDING_APPROVAL
    with pytest.raises(PlanStateError, match="approve_plan"):
        await Executor(tools).execute(plan)
    assert tools.calls == []


async def test_an_approved_plan_runs_and_keeps_who_approved_it() -> None:
    plan = approval_plan()
    plan.approve("alice")
    summary = await Executor(Tools()).execute(plan)
    assert summary.status == PlanStatus.COMPLETED
    assert plan.approved_by == "alice"


async def test_a_draft_that_needs_no_approval_is_approved_by_auto_and_runs() -> None:
    plan = new_plan()
    plan.add_step("ok", "", {})
    executor = Executor(Tools())
    await executor.execute(plan)
    assert plan.approved_by == "auto"
    assert plan.status == PlanStatus.COMPLETED
    assert (await executor.store.events(plan.id))[0].kind == "plan_approved"


async def test_a_plan_edited_after_approval_does_not_run() -> None:
    tools = Tools()
    plan = approval_plan()
    plan.approve("alice")
    plan.step("a").parameters = {"x": 2}
    with pytest.raises(PlanStateError, match="changed after it was approved"):
        await Executor(tools).execute(plan)
    assert tools.calls == []


async def test_a_rejected_plan_never_runs_whatever_is_tried() -> None:
    tools = Tools()
    executor = Executor(tools)
    plan = approval_plan()
    plan.reject("too risky")
    with pytest.raises(PlanStateError):
        plan.approve("mallory")
    for attempt in (
        executor.execute(plan),
        executor.resume(plan),
        executor.resume(plan, rerun_interrupted=True),
    ):
        with pytest.raises(PlanStateError, match="rejected"):
            await attempt
    plan.clear_approval()
    with pytest.raises(PlanStateError):
        await executor.execute(plan)
    assert tools.calls == []
    assert plan.status == PlanStatus.CANCELLED


async def test_an_expired_approval_cancels_the_plan_and_it_never_runs() -> None:
    tools = Tools()
    plan = ExecutionPlan.new("expires")
    plan.options.approval_timeout_ms = 1000
    plan.add_step("ok", "", {})
    plan.submit()
    plan.pending_since = utcnow() - timedelta(seconds=2)
    executor = Executor(tools)
    with pytest.raises(PlanStateError, match="approval timed out"):
        await executor.execute(plan)
    assert plan.status == PlanStatus.CANCELLED
    with pytest.raises(PlanStateError):
        plan.approve("late")
    with pytest.raises(PlanStateError):
        await executor.resume(plan)
    assert tools.calls == []
    assert (await executor.store.get_plan(plan.id)).status == PlanStatus.CANCELLED


async def test_an_invalid_plan_is_refused_with_every_problem() -> None:
    tools = Tools()
    plan = new_plan()
    plan.add_step("ok", "", {}, step_id="a").depends_on = ["ghost"]
    plan.add_step("no_such_tool", "", {}, step_id="b")
    with pytest.raises(PlanValidationError) as caught:
        await Executor(tools).execute(plan)
    assert {p.step_id for p in caught.value.problems} == {"a", "b"}
    assert tools.calls == []


async def test_executing_a_plan_that_already_ran_is_refused_with_what_to_do() -> None:
    executor = Executor(Tools())
    failed = new_plan()
    failed.add_step("fail", "", {})
    await executor.execute(failed)
    with pytest.raises(PlanStateError, match="resume_plan"):
        await executor.execute(failed)
    done = new_plan()
    done.add_step("ok", "", {})
    await executor.execute(done)
    with pytest.raises(PlanStateError, match="completed"):
        await executor.execute(done)


async def test_a_plan_cannot_be_executed_twice_at_once() -> None:
    tools = Tools()
    plan = new_plan()
    plan.add_step("hold", "", {"key": "a"})
    executor = Executor(tools)
    async with anyio.create_task_group() as tg:
        tg.start_soon(executor.execute, plan)
        with anyio.fail_after(5):
            await tools.started["a"].wait()
        with pytest.raises(PlanStateError, match="already executing"):
            await executor.execute(plan)
        with pytest.raises(PlanStateError, match="already executing"):
            await Executor(tools).execute(plan)
        tools.release["a"].set()
    assert plan.status == PlanStatus.COMPLETED
    assert len(tools.calls) == 1


# -- cancellation -------------------------------------------------------------------------------------------


async def test_cancel_stops_running_calls_and_skips_running_and_pending_steps(store: QueueStore) -> None:
    tools = Tools()
    plan = new_plan(parallel=2)
    plan.add_step("hold", "", {"key": "a"}, step_id="a")
    plan.add_step("hold", "", {"key": "b"}, step_id="b")
    plan.add_step("ok", "", {}, step_id="c").depends_on = ["a"]
    executor = Executor(tools, store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(executor.execute, plan)
        with anyio.fail_after(5):
            await tools.started["a"].wait()
            await tools.started["b"].wait()
            summary = await executor.cancel(plan, "user said stop")
    assert summary.status == PlanStatus.CANCELLED
    assert sorted(tools.cancelled) == ["a", "b"]
    assert statuses(plan) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert {s.error for s in plan.steps} == {"user said stop"}
    stored = await store.get_plan(plan.id)
    assert stored.status == PlanStatus.CANCELLED and statuses(stored) == statuses(plan)
    with pytest.raises(PlanStateError):
        await executor.resume(plan)
    with pytest.raises(PlanStateError):
        await executor.execute(plan)


async def test_a_cancel_requested_through_the_store_stops_a_run_in_another_executor(
    store: QueueStore, db: str
) -> None:
    tools = Tools()
    plan = new_plan()
    plan.add_step("hold", "", {"key": "a"}, step_id="a")
    plan.add_step("ok", "", {}, step_id="b")
    ended = anyio.Event()
    runner = Executor(tools, store, heartbeat_interval=0.01, on_plan_complete=lambda p: ended.set())
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.execute, plan)
        with anyio.fail_after(5):
            await tools.started["a"].wait()
            async with open_store(db) as cli_store:
                copy = await cli_store.get_plan(plan.id)
                assert copy.status == PlanStatus.EXECUTING
                await Executor(tools, cli_store).cancel(copy, "stopped from the CLI")
            await ended.wait()
    assert plan.status == PlanStatus.CANCELLED
    assert tools.cancelled == ["a"]
    assert plan.step("a").error == "stopped from the CLI"
    assert (await store.get_plan(plan.id)).status == PlanStatus.CANCELLED


async def test_cancelling_a_plan_that_is_not_running_cancels_it_at_once(store: QueueStore) -> None:
    plan = approval_plan()
    plan.approve("alice")
    executor = Executor(Tools(), store)
    summary = await executor.cancel(plan, "changed my mind")
    assert summary.status == PlanStatus.CANCELLED
    assert (await store.get_plan(plan.id)).status == PlanStatus.CANCELLED
    with pytest.raises(PlanStateError):
        await executor.execute(plan)


async def test_cancel_called_from_a_hook_of_the_run_does_not_deadlock() -> None:
    tools = Tools()
    plan = new_plan()
    plan.add_step("ok", "", {}, step_id="a")
    plan.add_step("ok", "", {}, step_id="b")

    async def stop(plan: ExecutionPlan, step: Any) -> None:
        await executor.cancel(plan, "enough")

    executor = Executor(tools, on_step_complete=stop)
    with anyio.fail_after(5):
        await executor.execute(plan)
    assert statuses(plan) == {"a": "completed", "b": "skipped"}
    assert plan.status == PlanStatus.CANCELLED


async def test_a_run_cancelled_from_outside_ends_failed_and_resumable_never_executing(
    store: QueueStore,
) -> None:
    tools = Tools()
    plan = new_plan()
    plan.add_step("hold", "", {"key": "a"}, step_id="a")
    plan.add_step("ok", "", {}, step_id="b")
    executor = Executor(tools, store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(executor.execute, plan)
        with anyio.fail_after(5):
            await tools.started["a"].wait()
        tg.cancel_scope.cancel()
    stored = await store.get_plan(plan.id)
    assert stored.status == PlanStatus.FAILED
    assert stored.step("a").error == "interrupted; outcome unknown"
    assert await store.get_claim(plan.id) is None
    await executor.resume(stored)  # interrupted, not safe: not re-run without permission
    assert len(tools.called("hold")) == 1
    assert "rerun_interrupted" in (stored.error or "")
    tools.release["a"].set()
    await executor.resume(stored, rerun_interrupted=True)
    assert stored.status == PlanStatus.COMPLETED


# -- claims -------------------------------------------------------------------------------------------------


async def test_a_plan_claimed_by_a_live_process_cannot_be_executed() -> None:
    store = MemoryStore()
    plan = new_plan()
    plan.add_step("ok", "", {})
    assert await store.claim(plan.id, new_owner_id()) is None
    with pytest.raises(PlanClaimedError):
        await Executor(Tools(), store).execute(plan)


async def test_losing_the_claim_stops_the_run_without_writing_over_the_new_owner(store: QueueStore) -> None:
    tools = Tools()
    plan = new_plan()
    plan.add_step("hold", "", {"key": "a"}, step_id="a")
    executor = Executor(tools, store, heartbeat_interval=0.01)
    async with anyio.create_task_group() as tg:
        tg.start_soon(executor.execute, plan)
        with anyio.fail_after(5):
            await tools.started["a"].wait()
            await store.release(plan.id, executor.owner)
            await store.claim(plan.id, "someone-else")
    assert tools.cancelled == ["a"]
    assert plan.status == PlanStatus.FAILED and "claim" in (plan.error or "")
    assert (await store.get_plan(plan.id)).status == PlanStatus.EXECUTING


# -- resume -------------------------------------------------------------------------------------------------


async def test_resume_keeps_completed_steps_and_reruns_failed_and_skipped_ones(store: QueueStore) -> None:
    tools = Tools()
    plan = new_plan()
    plan.add_step("ok", "", {"n": 1}, step_id="a")
    plan.add_step("flaky", "", {"key": "b", "failures": 1}, step_id="b")
    plan.add_step("ok", "", {"b": "{{ steps.b.result.key }}"}, step_id="c")
    executor = Executor(tools, store)
    await executor.execute(plan)
    assert statuses(plan) == {"a": "completed", "b": "failed", "c": "skipped"}
    summary = await executor.resume(plan)
    assert summary.status == PlanStatus.COMPLETED
    assert [p for p in tools.called("ok")] == [{"n": 1}, {"b": "b"}]
    assert plan.step("b").retry_count == 0
    kinds = [e.kind for e in await store.events(plan.id)]
    assert kinds.count("plan_resumed") == 1 and kinds[-1] == "plan_completed"


async def test_resuming_a_completed_plan_returns_its_summary_and_runs_nothing() -> None:
    tools = Tools()
    plan = new_plan()
    plan.add_step("ok", "", {})
    executor = Executor(tools)
    await executor.execute(plan)
    summary = await executor.resume(plan)
    assert summary.status == PlanStatus.COMPLETED
    assert len(tools.calls) == 1


async def test_resume_refuses_a_plan_that_has_not_run() -> None:
    plan = approval_plan()
    plan.approve("alice")
    with pytest.raises(PlanStateError, match="execute_plan"):
        await Executor(Tools()).resume(plan)


async def crashed_plan(
    store: QueueStore, owner: str, *, max_retries: int = 0, tool: str = "ok"
) -> ExecutionPlan:
    """A plan as a process killed mid-step leaves it: `a` completed, `b` running, `c` pending."""
    plan = new_plan()
    plan.add_step("ok", "", {"n": 1}, step_id="a")
    plan.add_step(tool, "", {"n": 2}, step_id="b").max_retries = max_retries
    plan.add_step("ok", "", {"after": "{{ steps.b.result.n }}"}, step_id="c")
    plan.approve("auto", method="auto")
    plan.status = PlanStatus.EXECUTING
    plan.step("a").status = StepStatus.COMPLETED
    plan.step("a").result = StepResult.from_value({"n": 1})
    plan.step("b").status = StepStatus.RUNNING
    await store.save_plan(plan)
    assert await store.claim(plan.id, owner) is None
    return await store.get_plan(plan.id)


async def test_an_interrupted_step_is_not_rerun_without_permission(
    store: QueueStore, dead_owner: str
) -> None:
    tools = Tools()
    plan = await crashed_plan(store, dead_owner)
    executor = Executor(tools, store)
    summary = await executor.resume(plan)
    assert statuses(plan) == {"a": "completed", "b": "failed", "c": "skipped"}
    assert plan.step("b").error == "interrupted; outcome unknown"
    assert summary.status == PlanStatus.FAILED  # stop_on_error: c is skipped because b failed
    assert "rerun_interrupted=true" in (plan.error or "")
    assert tools.calls == []
    events = await store.events(plan.id)
    assert any(e.kind == "step_interrupted" and e.data["rerun"] is False for e in events)

    await executor.resume(plan)  # still no permission: still not re-run
    assert tools.calls == [] and plan.step("b").error == "interrupted; outcome unknown"

    summary = await executor.resume(plan, rerun_interrupted=True)
    assert summary.status == PlanStatus.COMPLETED
    assert tools.called() == [{"n": 2}, {"after": 2}]


@pytest.mark.parametrize("safety", ["retries", "read_only_tool"])
async def test_an_interrupted_step_that_is_safe_to_rerun_is_rerun(
    store: QueueStore, dead_owner: str, safety: str
) -> None:
    tools = Tools(safe={"flaky"})
    if safety == "retries":
        plan = await crashed_plan(store, dead_owner, max_retries=1)
    else:
        plan = await crashed_plan(store, dead_owner, tool="flaky")
        plan.step("b").parameters = {"key": "b", "failures": 0, "n": 2}
        plan.plan_hash = plan.compute_hash()  # re-pin the approval of this hand-built plan
    summary = await Executor(tools, store).resume(plan)
    assert summary.status == PlanStatus.COMPLETED
    assert len(tools.calls) == 2


async def test_a_plan_executing_in_a_live_process_cannot_be_resumed(store: QueueStore) -> None:
    plan = await crashed_plan(store, new_owner_id())
    with pytest.raises(PlanClaimedError):
        await Executor(Tools(), store).resume(plan)


async def test_a_plan_edited_after_it_failed_cannot_be_resumed() -> None:
    tools = Tools()
    plan = new_plan()
    plan.add_step("fail", "", {}, step_id="a")
    executor = Executor(tools)
    await executor.execute(plan)
    plan.step("a").tool_name = "ok"
    with pytest.raises(PlanStateError, match="changed after it was approved"):
        await executor.resume(plan)


# -- durability ---------------------------------------------------------------------------------------------


async def test_a_step_is_stored_running_before_its_call_and_completed_before_dependents_start(
    store: QueueStore, db: str
) -> None:
    seen: dict[str, dict[str, tuple[str, Any]]] = {}
    plan = new_plan()

    async def probe(params: dict[str, Any]) -> dict[str, Any]:
        async with open_store(db) as reader:  # a second connection sees commits only
            stored = await reader.get_plan(plan.id)
        seen[params["me"]] = {
            s.id: (s.status.value, s.result.value if s.result else None) for s in stored.steps
        }
        return {"me": params["me"]}

    plan.add_step("probe", "", {"me": "a"}, step_id="a")
    plan.add_step("probe", "", {"me": "b", "from": "{{ steps.a.result.me }}"}, step_id="b")
    executor = Executor({"probe": probe}, store)
    await executor.execute(plan)
    assert seen["a"] == {"a": ("running", None), "b": ("pending", None)}
    assert seen["b"] == {"a": ("completed", {"me": "a"}), "b": ("running", None)}
    async with open_store(db) as reader:
        stored = await reader.get_plan(plan.id)
        assert stored.model_dump() == plan.model_dump()
        assert await reader.get_claim(plan.id) is None


async def test_an_interrupted_step_left_failed_does_not_hold_up_independent_steps_when_continuing(
    store: QueueStore, dead_owner: str
) -> None:
    tools = Tools()
    plan = await crashed_plan(store, dead_owner)
    plan.options.continue_on_error = True
    plan.plan_hash = plan.compute_hash()  # re-pin the approval of this hand-built plan
    summary = await Executor(tools, store).resume(plan)
    assert statuses(plan) == {"a": "completed", "b": "failed", "c": "skipped"}
    assert summary.status == PlanStatus.PARTIAL
    assert plan.step("c").error == "dependency b did not complete"


class FailingStore(MemoryStore):
    """Fails the n-th step transition, like a full disk."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.transitions = 0

    async def save_transition(self, plan: Any, steps: Any, events: Any = (), **kwargs: Any) -> None:
        self.transitions += 1
        if self.transitions == self.fail_at:
            raise OSError("disk full")
        await super().save_transition(plan, steps, events, **kwargs)


async def test_a_store_failure_mid_run_raises_and_leaves_the_plan_resumable_not_executing() -> None:
    tools = Tools()
    store = FailingStore(fail_at=1)  # a's result with b's start (the first commit, the claim, is not one)
    plan = new_plan()
    plan.add_step("ok", "", {}, step_id="a")
    plan.add_step("ok", "", {}, step_id="b")
    with pytest.raises(OSError, match="disk full"):
        await Executor(tools, store).execute(plan)
    assert plan.status == PlanStatus.FAILED
    stored = await store.get_plan(plan.id)
    assert stored.status == PlanStatus.FAILED
    assert await store.get_claim(plan.id) is None
    summary = await Executor(tools, store).resume(stored, rerun_interrupted=True)
    assert summary.status == PlanStatus.COMPLETED


async def test_auto_approve_lets_a_draft_run_without_asking() -> None:
    plan = ExecutionPlan.new("auto")
    plan.options.auto_approve = True
    plan.add_step("ok", "", {})
    summary = await Executor(Tools()).execute(plan)
    assert summary.status == PlanStatus.COMPLETED and plan.approved_by == "auto"


async def test_a_step_cancelled_before_its_call_is_sent_never_reaches_the_tool() -> None:
    calls: list[dict[str, Any]] = []

    def sync_tool(params: dict[str, Any]) -> str:
        calls.append(params)
        return "done"

    async def cancel_on_start(plan: ExecutionPlan, step: Any) -> None:
        await executor.cancel(plan, "stop before it starts")

    plan = new_plan()
    plan.add_step("act", "", {}, step_id="a")
    executor = Executor({"act": sync_tool}, on_step_start=cancel_on_start)
    await executor.execute(plan)
    assert calls == []
    assert plan.step("a").status == StepStatus.SKIPPED
    assert plan.step("a").error == "stop before it starts"
    assert plan.status == PlanStatus.CANCELLED


async def test_an_approval_timeout_does_not_cancel_a_draft_that_needs_no_approval() -> None:
    plan = new_plan(approval_timeout_ms=1000)
    plan.add_step("ok", "", {})
    plan.created_at = utcnow() - timedelta(seconds=5)
    summary = await Executor(Tools()).execute(plan)
    assert summary.status == PlanStatus.COMPLETED


class CountingStore(PlanStore):
    """Counts the write transactions the executor makes."""

    writes: list[str]

    async def start_run(self, *args: Any, **kwargs: Any) -> Any:
        self.writes.append("start_run")
        return await super().start_run(*args, **kwargs)

    async def save_transition(self, *args: Any, **kwargs: Any) -> None:
        self.writes.append("save_transition" + (" + release" if kwargs.get("release") else ""))
        await super().save_transition(*args, **kwargs)

    async def save_plan(self, *args: Any, **kwargs: Any) -> None:
        self.writes.append("save_plan")
        await super().save_plan(*args, **kwargs)

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        self.writes.append("claim")
        return await super().claim(*args, **kwargs)

    async def release(self, *args: Any, **kwargs: Any) -> None:
        self.writes.append("release")
        await super().release(*args, **kwargs)


async def test_a_one_step_plan_costs_two_transactions_a_chain_one_more_per_step(tmp_path: Path) -> None:
    async with CountingStore.open(tmp_path / "plans.db") as store:
        store.writes = []
        plan = new_plan()
        plan.add_step("ok", "", {}, step_id="a")
        await Executor(Tools(), store).execute(plan)
        # the claim, the plan and a's start; then a's result, the final state and the release
        assert store.writes == ["start_run", "save_transition + release"]
        assert await store.get_claim(plan.id) is None
        assert (await store.get_plan(plan.id)).status == PlanStatus.COMPLETED

        store.writes = []
        chain = new_plan()
        for i in range(5):
            chain.add_step("ok", "", {}, step_id=f"s{i}").depends_on = [f"s{i - 1}"] if i else []
        await Executor(Tools(), store).execute(chain)
        assert store.writes == ["start_run", *["save_transition"] * 4, "save_transition + release"]
        kinds = [e.kind for e in await store.events(chain.id)]
        assert kinds.count("step_completed") == 5 and kinds[-1] == "plan_completed"
