"""The store used when none is given: `base.Store` and `base.RunQueue` kept in this process's memory."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from types import EllipsisType
from typing import TYPE_CHECKING, Any

import anyio

from mcp_planner.errors import PlanConflictError, PlanNotFoundError, RunNotFoundError
from mcp_planner.plan.model import (
    ExecutionPlan,
    PlanStatus,
    PlanSummary,
    Step,
    StepItem,
    StepStatus,
    gc_paused,
    utcnow,
)
from mcp_planner.store.base import (
    DEFAULT_STALE_AFTER,
    PROGRESS_EVENTS,
    Claim,
    Event,
    PlanHead,
    PlanProgress,
    RunKind,
    RunnerInfo,
    RunRecord,
    RunRequest,
    RunState,
    claim_is_live,
    queued_run,
    run_in_progress,
    runner_is_live,
    step_counts,
)

if TYPE_CHECKING:
    from mcp_planner.store.base import QueueStore


class MemoryStore:
    """The store used when none is given: the same semantics as `PlanStore`, kept in this process."""

    def __init__(self) -> None:
        self._heads: dict[str, str] = {}
        self._revisions: dict[str, int] = {}
        self._steps: dict[str, dict[str, str]] = {}
        self._statuses: dict[str, dict[str, StepStatus]] = {}
        self._items: dict[str, dict[str, dict[int, str]]] = {}  # plan -> step -> position -> item JSON
        self._events: dict[str, list[Event]] = {}
        self._claims: dict[str, Claim] = {}
        self._runs: dict[str, RunRecord] = {}  # in order of submission
        self._runners: dict[str, RunnerInfo] = {}
        self._catalogs: dict[str | None, tuple[str, datetime]] = {}
        self._work = anyio.Event()

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def save_plan(self, plan: ExecutionPlan, events: Sequence[Event] = ()) -> None:
        self._compare_and_advance(plan)
        self._steps[plan.id] = {s.id: s.model_dump_json() for s in plan.steps}
        self._statuses[plan.id] = {s.id: s.status for s in plan.steps}
        self._items[plan.id] = {
            s.id: {i: item.model_dump_json() for i, item in enumerate(s.items)} for s in plan.steps if s.items
        }
        self._heads[plan.id] = plan.model_dump_json(exclude={"steps"})
        self._append(events)

    async def save_transition(
        self,
        plan: ExecutionPlan,
        steps: Sequence[Step],
        events: Sequence[Event] = (),
        *,
        items: Sequence[tuple[Step, int]] = (),
        release: str | None = None,
    ) -> None:
        if release is not None:
            self._compare(plan)
            await self.release(plan.id, release)
        if plan.revision == 0:
            await self.save_plan(plan, events)
            return
        self._compare_and_advance(plan)
        self._heads[plan.id] = plan.model_dump_json(exclude={"steps"})
        stored = self._steps[plan.id]
        statuses = self._statuses[plan.id]
        for step in steps:
            stored[step.id] = step.model_dump_json()
            statuses[step.id] = step.status
        for step, i in items:
            assert step.items is not None
            self._items[plan.id].setdefault(step.id, {})[i] = step.items[i].model_dump_json()
        self._append(events)

    async def start_run(
        self,
        plan: ExecutionPlan,
        events: Sequence[Event],
        owner: str,
        stale_after: float = DEFAULT_STALE_AFTER,
    ) -> Claim | None:
        holder = self._in_the_way(plan.id, owner, stale_after)
        if holder is not None:
            return holder.model_copy()
        self._compare(plan)
        await self.claim(plan.id, owner, stale_after)
        await self.save_plan(plan, events)
        return None

    def _compare(self, plan: ExecutionPlan) -> None:
        if self._revisions.get(plan.id, 0) != plan.revision:
            raise PlanConflictError(plan.id)

    def _compare_and_advance(self, plan: ExecutionPlan) -> None:
        self._compare(plan)
        self._revisions[plan.id] = plan.__dict__["revision"] = plan.revision + 1

    def _append(self, events: Sequence[Event]) -> None:
        for event in events:
            log = self._events.setdefault(event.plan_id, [])
            log.append(event.model_copy(update={"seq": len(log) + 1}))

    def _load(self, plan_id: str) -> ExecutionPlan:
        with gc_paused():
            plan = ExecutionPlan.model_validate_json(self._heads[plan_id])
            plan.__dict__["revision"] = self._revisions[plan_id]
            plan.steps = [Step.model_validate_json(raw) for raw in self._steps[plan_id].values()]
            items = self._items.get(plan_id, {})
            for step in plan.steps:
                if step.id in items:
                    stored = items[step.id]
                    step.items = [StepItem.model_validate_json(stored[i]) for i in sorted(stored)]
        return plan

    async def get_plan(self, plan_id: str) -> ExecutionPlan:
        if plan_id not in self._heads:
            raise PlanNotFoundError(plan_id)
        return self._load(plan_id)

    async def list_plans(
        self, status: PlanStatus | str | None = None, limit: int = 20
    ) -> list[ExecutionPlan]:
        plans = [self._load(pid) for pid in self._heads]
        if status is not None:
            plans = [p for p in plans if p.status == PlanStatus(status)]
        plans.sort(key=lambda p: p.created_at, reverse=True)
        return plans[:limit]

    async def summary(self, plan_id: str, limit: int) -> PlanSummary:
        if plan_id not in self._heads:
            raise PlanNotFoundError(plan_id)
        return self._load(plan_id).summary(limit)

    async def recent_plans(self, limit: int) -> list[PlanHead]:
        heads = [json.loads(head) for head in self._heads.values()]
        heads.sort(key=lambda h: datetime.fromisoformat(h["created_at"]), reverse=True)
        return [PlanHead.model_validate(h) for h in heads[: max(limit, 0)]]

    async def append_event(self, event: Event) -> None:
        self._append([event])

    async def events(self, plan_id: str) -> list[Event]:
        return list(self._events.get(plan_id, []))

    async def progress(self, plan_id: str, after_seq: int | None = None) -> PlanProgress:
        if plan_id not in self._heads:
            raise PlanNotFoundError(plan_id)
        head = json.loads(self._heads[plan_id])
        statuses = self._statuses[plan_id].values()
        log = self._events.get(plan_id, [])
        return PlanProgress(
            plan_id=plan_id,
            status=head["status"],
            error=head["error"],
            counts=step_counts(Counter(statuses).items()),
            seq=len(log),
            events=log[after_seq : after_seq + PROGRESS_EVENTS] if after_seq is not None else [],
        )

    async def claim(self, plan_id: str, owner: str, stale_after: float = DEFAULT_STALE_AFTER) -> Claim | None:
        holder = self._in_the_way(plan_id, owner, stale_after)
        if holder is not None:
            return holder
        self._claims[plan_id] = Claim(plan_id=plan_id, owner=owner, heartbeat_at=utcnow())
        return None

    def _in_the_way(self, plan_id: str, owner: str, stale_after: float) -> Claim | None:
        """Another owner's live claim on the plan, if there is one."""
        current = self._claims.get(plan_id)
        if current is not None and current.owner != owner and claim_is_live(current, utcnow(), stale_after):
            return current
        return None

    async def heartbeat(self, plan_id: str, owner: str) -> Claim | None:
        current = self._claims.get(plan_id)
        if current is None or current.owner != owner:
            return None
        current.heartbeat_at = utcnow()
        return current.model_copy()

    async def release(self, plan_id: str, owner: str) -> None:
        current = self._claims.get(plan_id)
        if current is not None and current.owner == owner:
            del self._claims[plan_id]

    async def get_claim(self, plan_id: str) -> Claim | None:
        current = self._claims.get(plan_id)
        return current.model_copy() if current else None

    async def request_cancel(self, plan_id: str, reason: str) -> bool:
        current = self._claims.get(plan_id)
        if current is None:
            return False
        current.cancel_reason = reason
        return True

    # -- the run queue ------------------------------------------------------------------------------------

    def _wake(self) -> None:
        self._work.set()

    async def submit_run(self, request: RunRequest) -> RunRecord:
        if request.plan_id not in self._heads:
            raise PlanNotFoundError(request.plan_id)
        active = await self.active_run(request.plan_id)
        if active is not None:
            raise run_in_progress(active)
        run = queued_run(request)
        self._runs[run.id] = run
        self._wake()
        return run.model_copy()

    async def claim_run(self, runner: str, servers: str | None) -> RunRecord | None:
        if self._work.is_set():  # what happened so far is seen: `wait_for_work` waits for what comes next
            self._work = anyio.Event()
        for run in self._runs.values():  # insertion order: oldest first
            if run.state == RunState.QUEUED and run.servers == servers:
                run.state, run.runner, run.claimed_at = RunState.CLAIMED, runner, utcnow()
                return run.model_copy()
        return None

    async def finish_run(self, run_id: str, runner: str, error: str | None = None) -> bool:
        run = self._runs.get(run_id)
        if run is None or run.state != RunState.CLAIMED or run.runner != runner:
            return False
        run.state, run.finished_at, run.error = RunState.DONE, utcnow(), error
        if runner in self._runners:
            self._runners[runner].runs += 1
        return True

    async def cancel_queued_run(self, plan_id: str, reason: str) -> bool:
        for run in self._runs.values():
            if run.plan_id == plan_id and run.state == RunState.QUEUED:
                run.state, run.finished_at, run.error = RunState.DONE, utcnow(), reason
                self._wake()
                return True
        return False

    async def get_run(self, run_id: str) -> RunRecord:
        if run_id not in self._runs:
            raise RunNotFoundError(run_id)
        return self._runs[run_id].model_copy()

    async def active_run(self, plan_id: str) -> RunRecord | None:
        for run in self._runs.values():
            if run.plan_id == plan_id and run.state != RunState.DONE:
                return run.model_copy()
        return None

    async def last_run(self, plan_id: str) -> RunRecord | None:
        runs = [r for r in self._runs.values() if r.plan_id == plan_id]
        return runs[-1].model_copy() if runs else None

    async def requeue_orphans(self, stale_after: float = DEFAULT_STALE_AFTER) -> list[RunRecord]:
        now = utcnow()
        requeued = []
        for run in self._runs.values():
            if run.state != RunState.CLAIMED or run.runner is None:
                continue
            info = self._runners.get(run.runner)
            if info is not None and runner_is_live(info.id, info.heartbeat_at, now, stale_after):
                continue
            run.state, run.kind, run.runner, run.claimed_at = RunState.QUEUED, RunKind.RESUME, None, None
            requeued.append(run.model_copy())
        if requeued:
            self._wake()
        return requeued

    async def register_runner(self, info: RunnerInfo) -> None:
        self._runners[info.id] = info.model_copy()

    async def heartbeat_runner(self, runner_id: str) -> bool:
        info = self._runners.get(runner_id)
        if info is None:
            return False
        info.heartbeat_at = utcnow()
        return True

    async def unregister_runner(self, runner_id: str) -> None:
        self._runners.pop(runner_id, None)

    async def live_runners(
        self, servers: str | EllipsisType | None = ..., stale_after: float = DEFAULT_STALE_AFTER
    ) -> list[RunnerInfo]:
        now = utcnow()
        for info in list(self._runners.values()):
            if not runner_is_live(info.id, info.heartbeat_at, now, stale_after):
                del self._runners[info.id]
        return [
            info.model_copy()
            for info in sorted(self._runners.values(), key=lambda i: i.started_at)
            if servers is ... or info.servers == servers
        ]

    async def wait_for_work(
        self,
        timeout: float,  # noqa: ASYNC109 (an idle wait, not a deadline)
        *,
        local_only: bool = False,
    ) -> None:
        """Return when a run is submitted, requeued or cancelled in this store (since the last return), or
        after `timeout`."""
        with anyio.move_on_after(timeout):
            await self._work.wait()
        if self._work.is_set():
            self._work = anyio.Event()

    async def save_catalog(self, servers: str | None, tools: list[dict[str, Any]]) -> None:
        self._catalogs[servers] = (json.dumps(tools), utcnow())

    async def get_catalog(self, servers: str | None) -> tuple[list[dict[str, Any]], datetime] | None:
        saved = self._catalogs.get(servers)
        return (json.loads(saved[0]), saved[1]) if saved is not None else None


if TYPE_CHECKING:
    _conforms: type[QueueStore] = MemoryStore
