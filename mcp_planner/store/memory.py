"""The store used when none is given: `base.Store` kept in this process's memory."""

from __future__ import annotations

from collections.abc import Sequence

from mcp_planner.errors import PlanConflictError, PlanNotFoundError
from mcp_planner.plan.model import ExecutionPlan, PlanStatus, Step, utcnow
from mcp_planner.store.base import DEFAULT_STALE_AFTER, Claim, Event, claim_is_live


class MemoryStore:
    """The store used when none is given: the same semantics as `PlanStore`, kept in this process."""

    def __init__(self) -> None:
        self._heads: dict[str, str] = {}
        self._revisions: dict[str, int] = {}
        self._steps: dict[str, dict[str, str]] = {}
        self._events: dict[str, list[Event]] = {}
        self._claims: dict[str, Claim] = {}

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def save_plan(self, plan: ExecutionPlan, events: Sequence[Event] = ()) -> None:
        self._compare_and_advance(plan)
        self._steps[plan.id] = {s.id: s.model_dump_json() for s in plan.steps}
        self._heads[plan.id] = plan.model_dump_json(exclude={"steps"})
        self._append(events)

    async def save_transition(
        self, plan: ExecutionPlan, steps: Sequence[Step], events: Sequence[Event] = ()
    ) -> None:
        if plan.revision == 0:
            await self.save_plan(plan, events)
            return
        self._compare_and_advance(plan)
        self._heads[plan.id] = plan.model_dump_json(exclude={"steps"})
        stored = self._steps[plan.id]
        for step in steps:
            stored[step.id] = step.model_dump_json()
        self._append(events)

    def _compare_and_advance(self, plan: ExecutionPlan) -> None:
        if self._revisions.get(plan.id, 0) != plan.revision:
            raise PlanConflictError(plan.id)
        self._revisions[plan.id] = plan.__dict__["revision"] = plan.revision + 1

    def _append(self, events: Sequence[Event]) -> None:
        for event in events:
            log = self._events.setdefault(event.plan_id, [])
            log.append(event.model_copy(update={"seq": len(log) + 1}))

    def _load(self, plan_id: str) -> ExecutionPlan:
        plan = ExecutionPlan.model_validate_json(self._heads[plan_id])
        plan.__dict__["revision"] = self._revisions[plan_id]
        plan.steps = [Step.model_validate_json(raw) for raw in self._steps[plan_id].values()]
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

    async def append_event(self, event: Event) -> None:
        self._append([event])

    async def events(self, plan_id: str) -> list[Event]:
        return list(self._events.get(plan_id, []))

    async def claim(self, plan_id: str, owner: str, stale_after: float = DEFAULT_STALE_AFTER) -> Claim | None:
        now = utcnow()
        current = self._claims.get(plan_id)
        if current is not None and current.owner != owner and claim_is_live(current, now, stale_after):
            return current
        self._claims[plan_id] = Claim(plan_id=plan_id, owner=owner, heartbeat_at=now)
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
