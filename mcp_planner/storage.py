"""The store protocol the engine writes through, plus an in-memory store for plans run without a file.

`store.PlanStore` is the SQLite implementation. Both keep copies, never the caller's objects, so a plan
read back is what was committed and nothing else.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, Field

from .errors import PlanConflictError, PlanNotFoundError
from .model import ExecutionPlan, PlanStatus, Step, utcnow

#: A claim whose heartbeat is older than this is stale: its owner is taken as dead.
DEFAULT_STALE_AFTER = 30.0


class Event(BaseModel):
    """One line of a plan's audit trail."""

    plan_id: str
    seq: int = 0
    at: datetime = Field(default_factory=utcnow)
    kind: str
    step_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class Claim(BaseModel):
    """Who executes a plan now. `cancel_reason` is set when someone asked that process to cancel."""

    plan_id: str
    owner: str
    heartbeat_at: datetime
    cancel_reason: str | None = None


def new_owner_id() -> str:
    """`host:pid:nonce`: the host and pid let a dead owner on this host be recognised at once."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str) -> bool:
    """True when `owner` names a process on this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def claim_is_live(claim: Claim, now: datetime, stale_after: float) -> bool:
    if owner_is_dead(claim.owner):
        return False
    return (now - claim.heartbeat_at).total_seconds() < stale_after


class Store(Protocol):
    """What the executor and the service need from a store. Each write is one transaction."""

    async def save_plan(self, plan: ExecutionPlan, events: Sequence[Event] = ()) -> None:
        """Write the whole plan (all its steps) and append `events`.

        A compare-and-set: commits only if the stored plan is still at `plan.revision` (0: not stored),
        then advances `plan.revision`; else raises `PlanConflictError` and writes nothing.
        """
        ...

    async def save_transition(
        self, plan: ExecutionPlan, steps: Sequence[Step], events: Sequence[Event] = ()
    ) -> None:
        """Write the plan's own fields, the given steps only, and append `events`: the executor's hot path.

        The same compare-and-set as `save_plan`.
        """
        ...

    async def get_plan(self, plan_id: str) -> ExecutionPlan:
        """Raises: PlanNotFoundError."""
        ...

    async def list_plans(
        self, status: PlanStatus | str | None = None, limit: int = 20
    ) -> list[ExecutionPlan]:
        """Newest first."""
        ...

    async def append_event(self, event: Event) -> None: ...

    async def events(self, plan_id: str) -> list[Event]:
        """In order of `seq`."""
        ...

    async def claim(self, plan_id: str, owner: str, stale_after: float = DEFAULT_STALE_AFTER) -> Claim | None:
        """Claim the plan for `owner` atomically. Returns None on success, else the live claim in the way.

        A claim whose owner is dead (same host, no such pid) or whose heartbeat is stale is taken over.
        """
        ...

    async def heartbeat(self, plan_id: str, owner: str) -> Claim | None:
        """Refresh `owner`'s claim; None if it no longer holds it (then it must stop)."""
        ...

    async def release(self, plan_id: str, owner: str) -> None: ...

    async def get_claim(self, plan_id: str) -> Claim | None: ...

    async def request_cancel(self, plan_id: str, reason: str) -> bool:
        """Ask the process holding the claim to cancel; False if nobody holds it."""
        ...


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
