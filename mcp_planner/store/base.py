"""The store protocols: plans, events, execution claims and their liveness (`Store`, what the engine writes
through), and the run queue that lets runs outlive the process that asked for them (`RunQueue`).

`memory.MemoryStore`, `sqlite.PlanStore` and `postgres.PostgresStore` implement both. They keep copies, never
the caller's objects, so a plan read back is what was committed and nothing else.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from itertools import islice
from types import EllipsisType
from typing import Any, Protocol

from pydantic import BaseModel, Field, TypeAdapter

from mcp_planner.errors import PlannerError, PlanStateError
from mcp_planner.plan.model import (
    ExecutionPlan,
    PlanStatus,
    PlanSummary,
    Step,
    StepItem,
    StepStatus,
    StepSummary,
    gc_paused,
    make_summary,
    utcnow,
)


class StoreError(PlannerError):
    """The plan database could not be opened, read or written (SQLite or PostgreSQL: each store translates its
    driver's errors into this, once, at its edge)."""


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


#: The most events one `progress` read returns.
PROGRESS_EVENTS = 500


class PlanProgress(BaseModel):
    """A plan as a follower reads it while it runs: its status, how many steps are in each status, and the
    events committed after the follower's last read. Reading it never parses the plan's steps, so following
    a plan costs per change, not per step of the plan."""

    plan_id: str
    status: PlanStatus
    error: str | None = None
    counts: dict[StepStatus, int]
    seq: int = Field(description="the `seq` of the plan's newest event (0: none)")
    events: list[Event] = Field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def last_seen(self) -> int:
        """The seq a follower has seen once it has read these events (it reads on from there)."""
        return self.events[-1].seq if self.events else self.seq

    @property
    def done(self) -> int:
        """Steps that have ended: completed, failed or skipped."""
        c = self.counts
        return c[StepStatus.COMPLETED] + c[StepStatus.FAILED] + c[StepStatus.SKIPPED]


def step_counts(statuses: Iterable[tuple[str, int]]) -> dict[StepStatus, int]:
    """Every step status with its count (zero when absent), from (status, count) pairs."""
    counts = dict.fromkeys(StepStatus, 0)
    for status, n in statuses:
        counts[StepStatus(status)] += n
    return counts


# -- what the databases store: JSON text ------------------------------------------------------------------

#: `json.dumps(data, default=str)` without building an encoder per call (the same output).
encode_json = json.JSONEncoder(default=str).encode
#: Steps parsed at once when a plan is read.
LOAD_CHUNK = 1000
_STEPS = TypeAdapter(list[Step])
_ITEMS = TypeAdapter(list[StepItem])


def plan_from_json(
    plan_id: str, header: str, revision: int, steps: Iterable[str], items: Mapping[str, Sequence[str]]
) -> ExecutionPlan:
    """A stored plan from its texts: the header (the plan without its steps), the revision, the steps' texts
    in plan order (parsed `LOAD_CHUNK` at a time: one parse of many steps is much faster than one per step,
    and there is never one document of every step) and the items' texts of `for_each` steps by step id.

    Raises:
        StoreError: the texts do not parse (an incompatible version wrote them, or they are damaged).
    """
    rows = iter(steps)
    try:
        with gc_paused():
            plan = ExecutionPlan.model_validate_json(f'{header[:-1]},"revision":{int(revision)}}}')
            while chunk := list(islice(rows, LOAD_CHUNK)):
                plan.steps.extend(_STEPS.validate_json(f"[{','.join(chunk)}]"))
            for step in plan.steps:
                if step.id in items:
                    step.items = _ITEMS.validate_json(f"[{','.join(items[step.id])}]")
    except ValueError as exc:
        raise StoreError(
            f"plan {plan_id!r} is stored but cannot be read ({exc.__class__.__name__}): it was written by "
            "an incompatible version or damaged; the other plans are unaffected"
        ) from exc
    return plan


def summary_from_rows(
    plan_id: str, head: Sequence[Any], counts: Iterable[tuple[str, int]], steps: Iterable[tuple[Any, ...]]
) -> PlanSummary:
    """A plan's short summary from what a database's summary queries read: `head` (status, description,
    error, duration in ms, outputs and output errors as JSON text or None), (status, count) pairs, and the
    listed steps' rows (position, id, status, tool, duration in ms, error, retries) in any order."""
    status, description, error, duration_ms, outputs, output_errors = head
    listed = [
        StepSummary(id=step_id, tool_name=tool, status=s, duration_ms=ms, error=e, retry_count=retries)
        for _, step_id, s, tool, ms, e, retries in sorted(steps)
    ]
    return make_summary(
        plan_id,
        description,
        status,
        error,
        duration_ms,
        step_counts(counts),
        listed,
        json.loads(outputs) if outputs else None,
        json.loads(output_errors) if output_errors else None,
    )


class PlanHead(BaseModel):
    """A plan as a list of plans names it: what its row says, with no step read."""

    id: str
    description: str
    status: PlanStatus
    updated_at: datetime


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
        self,
        plan: ExecutionPlan,
        steps: Sequence[Step],
        events: Sequence[Event] = (),
        *,
        items: Sequence[tuple[Step, int]] = (),
        release: str | None = None,
    ) -> None:
        """Write the plan's own fields, the given steps only, and append `events`: the executor's hot path.

        The same compare-and-set as `save_plan`. `items`: the `for_each` items that changed, as (step,
        position); a step's items are stored apart from it, so a step of many items is not rewritten whole
        for each. `release`: also drop that owner's claim, in the same transaction (a run's last commit).
        """
        ...

    async def start_run(
        self,
        plan: ExecutionPlan,
        events: Sequence[Event],
        owner: str,
        stale_after: float = DEFAULT_STALE_AFTER,
    ) -> Claim | None:
        """Claim the plan for `owner` and write it whole with `events`, in one transaction: a run's first
        commit (the claim as `claim` takes it, the write as `save_plan` makes it).

        Returns:
            None when `owner` now holds the claim and the plan is written; else the live claim of another
            owner that is in the way, and nothing is written.

        Raises:
            PlanConflictError: the stored plan changed since `plan` was read; nothing was written.
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

    async def progress(self, plan_id: str, after_seq: int | None = None) -> PlanProgress:
        """The plan's status, step counts, newest event `seq`, and its events with `seq > after_seq` (none
        when `after_seq` is None; at most `PROGRESS_EVENTS`: `seq` says whether more wait), from one snapshot.

        Raises: PlanNotFoundError.
        """
        ...

    async def summary(self, plan_id: str, limit: int) -> PlanSummary:
        """The plan's summary listing at most `limit` steps, those that need attention first
        (`ExecutionPlan.summary(limit)`), without reading the other steps.

        Raises: PlanNotFoundError.
        """
        ...

    async def recent_plans(self, limit: int) -> list[PlanHead]:
        """The `limit` newest plans' heads, newest first."""
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


# -- the run queue ----------------------------------------------------------------------------------------


class RunKind(StrEnum):
    EXECUTE = "execute"
    RESUME = "resume"


class RunState(StrEnum):
    QUEUED = "queued"
    CLAIMED = "claimed"
    DONE = "done"


class RunRequest(BaseModel):
    """What a submitter asks for: run this plan against this servers config."""

    plan_id: str
    kind: RunKind
    rerun_interrupted: bool = False
    #: The servers-config key (`"<abs path>#<sha256 of content>"`); None: no servers file.
    servers: str | None = None
    submitted_by: str = "agent"


class RunRecord(RunRequest):
    """A submitted run as stored."""

    id: str
    state: RunState
    submitted_at: datetime
    #: The owner id (`host:pid:nonce`) of the runner that claimed it.
    runner: str | None = None
    claimed_at: datetime | None = None
    finished_at: datetime | None = None
    #: Why it did not run (a refusal) or how it crashed; None when it ran.
    error: str | None = None


class RunnerInfo(BaseModel):
    """A runner process serving one servers config."""

    #: An owner id (`host:pid:nonce`, see `new_owner_id`), so `owner_is_dead` works on it.
    id: str
    servers: str | None
    started_at: datetime
    heartbeat_at: datetime
    #: Runs finished by this runner so far.
    runs: int = 0


def queued_run(request: RunRequest) -> RunRecord:
    """A new queued run of `request` (only its request fields count, even if it is a `RunRecord`)."""
    fields = request.model_dump(include=set(RunRequest.model_fields))
    return RunRecord(**fields, id=uuid.uuid4().hex, state=RunState.QUEUED, submitted_at=utcnow())


def run_in_progress(active: RunRecord) -> PlanStateError:
    """The refusal of a second active run for one plan."""
    return PlanStateError(
        f"plan {active.plan_id!r} already has a run in progress (submitted at "
        f"{active.submitted_at:%Y-%m-%d %H:%M:%S} UTC, by {active.submitted_by}): "
        "call get_summary to follow it"
    )


def runner_is_live(runner_id: str, heartbeat_at: datetime, now: datetime, stale_after: float) -> bool:
    if owner_is_dead(runner_id):
        return False
    return (now - heartbeat_at).total_seconds() < stale_after


class RunQueue(Protocol):
    """Submitted runs and the runners that claim them. Each method is one transaction.

    At most one run per plan is active (queued or claimed). A run is claimed by exactly one runner, and only
    by one holding the run's servers config.
    """

    async def submit_run(self, request: RunRequest) -> RunRecord:
        """Queue a run of `request.plan_id`.

        Raises:
            PlanNotFoundError: no such plan.
            PlanStateError: the plan already has an active run.
        """
        ...

    async def claim_run(self, runner: str, servers: str | None) -> RunRecord | None:
        """Claim for `runner` the oldest queued run for `servers` (None matches None); None if none."""
        ...

    async def finish_run(self, run_id: str, runner: str, error: str | None = None) -> bool:
        """Mark `runner`'s claimed run done (with `error`, if it did not run); False if `runner` does not
        hold it (it was requeued, or never claimed by it): then nothing changes."""
        ...

    async def cancel_queued_run(self, plan_id: str, reason: str) -> bool:
        """Mark the plan's queued run done with error `reason`; False if it has none queued."""
        ...

    async def get_run(self, run_id: str) -> RunRecord:
        """Raises: RunNotFoundError."""
        ...

    async def active_run(self, plan_id: str) -> RunRecord | None:
        """The plan's queued or claimed run."""
        ...

    async def last_run(self, plan_id: str) -> RunRecord | None:
        """The plan's newest run, in any state."""
        ...

    async def requeue_orphans(self, stale_after: float = DEFAULT_STALE_AFTER) -> list[RunRecord]:
        """Queue again, as resumes, the claimed runs whose runner is gone (unregistered, dead on this host, or
        with a heartbeat older than `stale_after` seconds); returns them as they are now."""
        ...

    async def register_runner(self, info: RunnerInfo) -> None: ...

    async def heartbeat_runner(self, runner_id: str) -> bool:
        """False if the runner's row is gone (it was taken as dead): it must register again or stop."""
        ...

    async def unregister_runner(self, runner_id: str) -> None: ...

    async def live_runners(
        self, servers: str | EllipsisType | None = ..., stale_after: float = DEFAULT_STALE_AFTER
    ) -> list[RunnerInfo]:
        """The live runners for `servers` (`...`: any), oldest first; dead or stale ones may be deleted."""
        ...

    async def wait_for_work(
        self,
        timeout: float,  # noqa: ASYNC109 (an idle wait, not a deadline)
        *,
        local_only: bool = False,
    ) -> None:
        """Return soon after a run is queued through this store, or another connection or process commits
        something (a run submitted, a cancel), or after `timeout` seconds; possibly early for a commit
        unrelated to runs, so re-check, never assume. `local_only`: only runs queued through this store
        count (a runner that only this process submits to need not watch the others)."""
        ...

    async def save_catalog(self, servers: str | None, tools: list[dict[str, Any]]) -> None:
        """Cache the tool catalog of a servers config (tools as JSON objects), replacing the previous one."""
        ...

    async def get_catalog(self, servers: str | None) -> tuple[list[dict[str, Any]], datetime] | None:
        """The cached catalog of `servers` and when it was saved; None if there is none."""
        ...


class QueueStore(Store, RunQueue, Protocol):
    """A store that also holds the run queue (`MemoryStore`, `PlanStore` and `PostgresStore`)."""
