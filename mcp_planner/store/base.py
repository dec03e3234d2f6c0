"""The store protocol the engine writes through: plans, events, execution claims and their liveness.

`memory.MemoryStore` and `sqlite.PlanStore` implement it. Both keep copies, never the caller's objects, so a
plan read back is what was committed and nothing else.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, Field

from mcp_planner.plan.model import ExecutionPlan, PlanStatus, Step, utcnow

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
