"""The application layer: what the MCP server's tools and the CLI's commands do, with no MCP types.

`PlannerService` owns a task group in which plan executions run, so `execute_plan` can return after
`wait_seconds` while the plan keeps running (the MCP server's tools must answer within the client's
timeout; the CLI passes `wait_seconds=None` and waits to the end). Every operation reads the plan from the
store first and applies approval timeouts, so a plan that waited too long is cancelled before anything else
looks at it. Every approval, rejection and cancellation is written to the plan's event log with who did it
and how.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, Self, TypeVar

import anyio

from mcp_planner.engine.tools import ServerStatus, StatusReporter, ToolInfo, ToolProvider, schema_catalog
from mcp_planner.errors import (
    PlanChangedError,
    PlanClaimedError,
    PlanConflictError,
    PlanStateError,
    PlanValidationError,
    Problem,
)
from mcp_planner.plan.model import (
    PERSON_METHODS,
    ExecutionOptions,
    ExecutionPlan,
    PlanSpec,
    PlanStatus,
    PlanSummary,
    StepSpec,
    StepStatus,
    utcnow,
)
from mcp_planner.runs import BackgroundRun, ProgressCallback, RunBody, Runs
from mcp_planner.store.base import DEFAULT_STALE_AFTER, Event, Store, claim_is_live, new_owner_id

if TYPE_CHECKING:
    from mcp_planner.engine.executor import Executor

log = logging.getLogger("mcp_planner.service")

ApprovalPolicy = Literal["auto", "agent", "human"]
APPROVAL_POLICIES: tuple[ApprovalPolicy, ...] = ("auto", "agent", "human")

#: How long `cancel_plan` waits for a run in this process to wind down.
CANCEL_WAIT = 10.0

_NOT_STARTED = (PlanStatus.DRAFT, PlanStatus.PENDING_APPROVAL, PlanStatus.APPROVED)
#: How many times an operation is re-run from a fresh read when its compare-and-set write loses a race.
_CONFLICT_ATTEMPTS = 5

P = ParamSpec("P")
R = TypeVar("R")


def _on_fresh_state(
    operation: Callable[Concatenate[PlannerService, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[PlannerService, P], Coroutine[Any, Any, R]]:
    """Re-run `operation` from a fresh read when its write lost a race (`PlanConflictError`).

    Every write is a compare-and-set on the stored plan, so the rules of the operation are applied again
    to the state that won: a reject that lost to an execute then says the plan is executing.
    """

    @functools.wraps(operation)
    async def wrapper(self: PlannerService, /, *args: P.args, **kwargs: P.kwargs) -> R:
        for _ in range(_CONFLICT_ATTEMPTS - 1):
            try:
                return await operation(self, *args, **kwargs)
            except PlanConflictError:
                log.debug("%s lost a race; retrying on the stored state", operation.__name__)
        return await operation(self, *args, **kwargs)

    return wrapper


class PlannerService:
    """Create, approve, execute, resume, cancel and inspect plans over a store and a tool provider.

    Use it as an async context manager: executions run in its task group and are cancelled when it exits
    (a plan cut short that way stays `executing` with a dead claim and can be resumed later).

    Args:
        store: where plans, events and execution claims live.
        tools: the tools steps call (downstream MCP servers, or in-process tools).
        approval: the approval policy the MCP server applies (`auto`, `agent` or `human`); the service
            only records it, `approve_plan` records whatever approval the caller obtained.
        owner: this process's claim owner id (default: host, pid and a nonce).
        stale_after: seconds after which a claim whose heartbeat stopped is taken as dead.
        ready_timeout: how long the first operation that needs the tool catalog waits for the tool
            provider's initial connections (`tools.wait_ready`, when it has one).
    """

    def __init__(
        self,
        store: Store,
        tools: ToolProvider,
        *,
        approval: ApprovalPolicy | str = "auto",
        owner: str | None = None,
        stale_after: float = DEFAULT_STALE_AFTER,
        ready_timeout: float = 30.0,
    ) -> None:
        if approval not in APPROVAL_POLICIES:
            raise ValueError(f"approval policy must be one of {APPROVAL_POLICIES}, not {approval!r}")
        self.store = store
        self.tools = tools
        self.approval: ApprovalPolicy = approval  # type: ignore[assignment]
        self.owner = owner or new_owner_id()
        self.stale_after = stale_after
        self.ready_timeout = ready_timeout
        self._runs = Runs()
        self._ready = False

    async def __aenter__(self) -> Self:
        await self._runs.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self._runs.__aexit__(exc_type, exc, tb)

    # -- the tool catalog --------------------------------------------------------------------------------

    async def catalog(self) -> dict[str, ToolInfo]:
        """The tools steps can call now, by qualified name (waits once for the initial connections)."""
        await self._tools_ready()
        return dict(self.tools.catalog())

    def server_status(self) -> dict[str, ServerStatus]:
        """Each downstream server's status by name, when the tool provider reports one (else empty)."""
        if not isinstance(self.tools, StatusReporter):
            return {}
        try:
            return dict(self.tools.status())
        except Exception:  # a status report must never break the caller
            log.exception("tool provider status() failed")
            return {}

    async def _tools_ready(self) -> None:
        if self._ready:
            return
        wait_ready = getattr(self.tools, "wait_ready", None)
        if callable(wait_ready):
            try:
                await wait_ready(self.ready_timeout)
            except Exception:  # slow or failed servers are reported by status(); the rest still work
                log.info("not every downstream server was ready after %.0f s", self.ready_timeout)
        self._ready = True

    # -- creating and changing plans -----------------------------------------------------------------

    async def create_plan(self, spec: PlanSpec, *, created_by: str = "agent") -> ExecutionPlan:
        """Validate and store a plan a caller wrote; it starts `pending_approval` or auto-`approved`.

        Bare tool names are qualified (`server.tool`) when exactly one server offers them; dependencies
        are inferred from `{{ steps.<id> }}` references.

        Raises:
            PlanValidationError: with every problem; nothing is stored.
        """
        plan = ExecutionPlan.from_spec(spec)
        await self._check(plan)
        return await self._store_new(plan, source="create_plan", by=created_by)

    async def add_plan(self, plan: ExecutionPlan, *, source: str = "generate_plan") -> ExecutionPlan:
        """Store a plan built elsewhere (the generator), validated like `create_plan`.

        Raises:
            PlanValidationError: with every problem; nothing is stored.
        """
        await self._check(plan)
        return await self._store_new(plan, source=source, by=source)

    @_on_fresh_state
    async def update_plan(
        self,
        plan_id: str,
        description: str | None = None,
        steps: Sequence[StepSpec] | None = None,
        options: ExecutionOptions | None = None,
        *,
        updated_by: str = "agent",
    ) -> ExecutionPlan:
        """Replace parts of a plan that has not started; any approval is cleared (the hash changes).

        Raises:
            PlanNotFoundError: no such plan.
            PlanStateError: the plan has started or ended.
            PlanValidationError: the updated plan has problems; the stored plan is unchanged.
        """
        plan = await self._load(plan_id)
        if plan.id in self._runs or plan.status not in _NOT_STARTED:
            raise PlanStateError(
                f"plan {plan.id!r} is {plan.status.value}: only a plan that has not started can be updated; "
                "create a new plan instead"
            )
        if steps is None:
            steps = [StepSpec.from_step(s) for s in plan.steps]
        metadata = {k: v for k, v in plan.metadata.items() if k != "approval_method"}
        spec = PlanSpec(
            description=plan.description if description is None else description,
            steps=list(steps),
            options=plan.options if options is None else options,
            metadata=metadata,
        )
        updated = ExecutionPlan.from_spec(spec)
        updated.id = plan.id
        updated.created_at = plan.created_at
        updated.revision = plan.revision
        await self._check(updated)
        self._apply_policy(updated)
        updated.submit()
        changed = [
            name
            for name, value in (("description", description), ("steps", steps), ("options", options))
            if value is not None
        ]
        events = [
            _event(
                updated,
                "plan_updated",
                by=updated_by,
                fields=changed,
                approval_cleared=plan.user_approved,
                status=updated.status.value,
            )
        ]
        if updated.status == PlanStatus.APPROVED:
            events.append(_event(updated, "plan_approved", by="auto", method="auto"))
        await self.store.save_plan(updated, events)
        return updated

    async def _check(self, plan: ExecutionPlan) -> None:
        from mcp_planner.plan.validation import qualify_tool_names

        catalog = await self.catalog()
        qualify_tool_names(plan, catalog.keys())
        problems = plan.validate(schema_catalog(self.tools))
        if problems:
            raise PlanValidationError(problems + self._unreachable(problems))

    def _unreachable(self, problems: list[Problem]) -> list[Problem]:
        """A problem per downstream server that is not connected, when a tool could not be found."""
        if not any(p.field == "tool_name" for p in problems):
            return []
        extra = []
        for name, status in sorted(self.server_status().items()):
            if status.error is not None:
                extra.append(
                    Problem(
                        None,
                        "servers",
                        f"downstream server {name!r} is unreachable ({status.error}); its tools are "
                        "unavailable until it connects: check its entry in the servers file",
                    )
                )
        return extra

    def person_required(self, plan: ExecutionPlan) -> bool:
        """Only a person may approve `plan`: the `human` policy, or a person saw an earlier version."""
        return self.approval == "human" or plan.needs_person

    def _apply_policy(self, plan: ExecutionPlan) -> None:
        # Where only a person approves, a plan cannot opt out of approval (an edit cannot escape them).
        if self.person_required(plan) and not plan.options.needs_approval:
            plan.options.require_approval = True
            plan.options.auto_approve = False
            plan.metadata = {**plan.metadata, "approval_required_by_policy": True}

    async def _store_new(self, plan: ExecutionPlan, *, source: str, by: str) -> ExecutionPlan:
        self._apply_policy(plan)
        plan.submit()
        events = [_event(plan, "plan_created", by=by, source=source, steps=len(plan.steps))]
        if plan.status == PlanStatus.APPROVED:
            events.append(_event(plan, "plan_approved", by="auto", method="auto"))
        await self.store.save_plan(plan, events)
        return plan

    # -- approval --------------------------------------------------------------------------------------

    @_on_fresh_state
    async def approve_plan(
        self,
        plan_id: str,
        approved_by: str = "agent",
        method: str = "agent",
        *,
        note: str | None = None,
        expected_hash: str | None = None,
    ) -> ExecutionPlan:
        """Approve a `draft` or `pending_approval` plan, pinning its hash; `method` says how it was obtained.

        `expected_hash` is the hash of the plan as the approver saw it (required when a person approves,
        `method` in `PERSON_METHODS`): a plan edited since is not approved.

        Raises:
            PlanNotFoundError: no such plan.
            PlanChangedError: the plan changed since the approver saw it; show it again.
            PlanStateError: the plan is in another status, its approval timed out, or only a person may
                approve it and `method` is not a person's.
        """
        person = method in PERSON_METHODS
        if person and expected_hash is None:
            raise ValueError("a person's approval must name the hash of the plan they were shown")
        plan = await self._load(plan_id)
        if plan.status == PlanStatus.APPROVED and plan.is_approved():
            if expected_hash is not None and plan.plan_hash != expected_hash:
                raise PlanChangedError(f"plan {plan.id!r} changed since it was shown: {_SHOW_AGAIN}")
            return plan
        if plan.status == PlanStatus.CANCELLED:
            why = plan.rejection_note or plan.error or "cancelled"
            raise PlanStateError(
                f"plan {plan.id!r} is cancelled ({why}) and can no longer be approved: create a new plan"
            )
        if expected_hash is not None and plan.compute_hash() != expected_hash:
            raise PlanChangedError(f"plan {plan.id!r} changed while it was being approved: {_SHOW_AGAIN}")
        if not person and self.person_required(plan) and plan.status in _NOT_STARTED:
            why = "approval policy 'human'" if self.approval == "human" else "a person saw an earlier version"
            raise PlanStateError(
                f"plan {plan.id!r} needs a person's approval ({why}) and this client cannot ask them: ask "
                f"the user to run `mcp-planner approve {plan.id}` in a terminal, then call execute_plan"
            )
        plan.approve(approved_by, method=method)
        extra = {"note": note} if note else {}
        await self.store.save_plan(
            plan, [_event(plan, "plan_approved", by=approved_by, method=method, **extra)]
        )
        return plan

    @_on_fresh_state
    async def note_person_asked(self, plan_id: str) -> None:
        """Record that a person is being asked about the plan: from now on only a person approves it."""
        plan = await self._load(plan_id)
        if plan.needs_person or plan.status not in _NOT_STARTED:
            return
        plan.mark_person_involved()
        await self.store.save_plan(plan, [_event(plan, "person_asked")])

    @_on_fresh_state
    async def reject_plan(self, plan_id: str, reason: str, *, rejected_by: str = "agent") -> ExecutionPlan:
        """Reject a plan that has not started: it becomes `cancelled` and can never run.

        Raises:
            PlanNotFoundError: no such plan.
            PlanStateError: the plan has started or ended.
        """
        plan = await self._load(plan_id)
        plan.reject(reason)
        for step in plan.steps:
            if step.status == StepStatus.PENDING:
                step.status = StepStatus.SKIPPED
                step.error = f"not run: plan rejected ({reason})"
        await self.store.save_plan(plan, [_event(plan, "plan_rejected", by=rejected_by, reason=reason)])
        return plan

    # -- execution -------------------------------------------------------------------------------------

    @_on_fresh_state
    async def execute_plan(
        self, plan_id: str, wait_seconds: float | None = 50.0, on_progress: ProgressCallback | None = None
    ) -> PlanSummary:
        """Start executing an approved plan; return its summary when it ends or after `wait_seconds`.

        The plan keeps running in this service's task group after `wait_seconds` (`None`: wait to the
        end). `on_progress` is called after each step starts, completes or fails while the caller waits.

        Raises:
            PlanNotFoundError: no such plan.
            PlanStateError: not approved, changed since approval, already executing, or ended.
            PlanClaimedError: another live process is executing it.
            PlanValidationError: it no longer validates against the tool catalog.
        """
        plan = await self._load(plan_id)
        await self._refuse_running(plan, resuming=False)
        _check_executable(plan)
        await self._tools_ready()
        problems = plan.validate(schema_catalog(self.tools))
        if problems:
            raise PlanValidationError(problems + self._unreachable(problems), "the plan cannot run")
        run = self._start(plan, lambda ex, p: ex.execute(p))
        return await run.wait(wait_seconds, on_progress)

    @_on_fresh_state
    async def resume_plan(
        self,
        plan_id: str,
        rerun_interrupted: bool = False,
        wait_seconds: float | None = 50.0,
        on_progress: ProgressCallback | None = None,
    ) -> PlanSummary:
        """Resume a `failed` or `partial` plan, or one left `executing` by a process that stopped.

        Completed steps are kept; the rest run again. A step interrupted mid-call is re-run only when
        that is safe or `rerun_interrupted` is true. Resuming a `completed` plan returns its summary.

        Raises:
            PlanNotFoundError: no such plan.
            PlanStateError: the plan never ran, is cancelled, or is executing in this process.
            PlanClaimedError: another live process is executing it.
        """
        plan = await self._load(plan_id)
        if plan.status == PlanStatus.COMPLETED:
            return plan.summary()
        if plan.status == PlanStatus.CANCELLED:
            raise PlanStateError(
                f"plan {plan.id!r} is cancelled: a cancelled plan can never run again; create a new plan"
            )
        if plan.status in _NOT_STARTED:
            hint = (
                "call approve_plan, then execute_plan" if plan.options.needs_approval else "call execute_plan"
            )
            if plan.status == PlanStatus.APPROVED:
                hint = "call execute_plan"
            raise PlanStateError(f"plan {plan.id!r} is {plan.status.value} and has never run: {hint}")
        await self._refuse_running(plan, resuming=True)
        await self._tools_ready()
        run = self._start(plan, lambda ex, p: ex.resume(p, rerun_interrupted=rerun_interrupted))
        return await run.wait(wait_seconds, on_progress)

    @_on_fresh_state
    async def cancel_plan(
        self, plan_id: str, reason: str = "cancelled", *, cancelled_by: str = "agent"
    ) -> PlanSummary:
        """Cancel a plan: stop it if it runs here, ask its process if it runs elsewhere, else mark it.

        A plan executing in another live process is stopped by that process (it polls for the request on
        its heartbeat); the summary returned then still says `executing`.

        Raises:
            PlanNotFoundError: no such plan.
            PlanStateError: the plan is already completed or cancelled.
        """
        run = self._runs.get(plan_id)
        if run is not None and run.executor is not None:
            await self.store.append_event(
                _event(run.plan, "cancel_requested", by=cancelled_by, how="in_process", reason=reason)
            )
            await run.executor.cancel(run.plan, reason)
            with anyio.move_on_after(CANCEL_WAIT):
                await run.done.wait()
            return run.plan.summary()
        plan = await self._load(plan_id)
        if plan.status in (PlanStatus.COMPLETED, PlanStatus.CANCELLED):
            raise PlanStateError(f"plan {plan.id!r} is {plan.status.value}: there is nothing to cancel")
        if plan.status == PlanStatus.EXECUTING:
            claim = await self.store.get_claim(plan.id)
            if claim is not None and claim_is_live(claim, utcnow(), self.stale_after):
                if not await self.store.request_cancel(plan.id, reason):
                    raise PlanConflictError(plan.id)  # the run ended meanwhile: decide on its final state
                await self.store.append_event(
                    _event(
                        plan,
                        "cancel_requested",
                        by=cancelled_by,
                        how="via_store",
                        owner=claim.owner,
                        reason=reason,
                    )
                )
                return plan.summary()
        _mark_cancelled(plan, reason)
        await self.store.save_plan(
            plan, [_event(plan, "plan_cancelled", by=cancelled_by, how="direct", reason=reason)]
        )
        return plan.summary()

    async def _refuse_running(self, plan: ExecutionPlan, *, resuming: bool) -> None:
        if plan.id in self._runs:
            raise PlanStateError(
                f"plan {plan.id!r} is already executing: "
                "call get_summary to follow it, or cancel_plan to stop it"
            )
        if plan.status != PlanStatus.EXECUTING:
            return
        claim = await self.store.get_claim(plan.id)
        if claim is not None and claim_is_live(claim, utcnow(), self.stale_after):
            raise PlanClaimedError(plan.id, claim.owner)
        if not resuming:
            raise PlanStateError(
                f"plan {plan.id!r} was left executing by a process that stopped: "
                "call resume_plan to recover it"
            )

    def _start(self, plan: ExecutionPlan, body: RunBody) -> BackgroundRun:
        from mcp_planner.engine.executor import Executor

        def make_executor(on_step: Any, on_plan_complete: Any) -> Executor:
            return Executor(
                self.tools,
                self.store,
                on_step_start=on_step,
                on_step_complete=on_step,
                on_step_failed=on_step,
                on_plan_complete=on_plan_complete,
                owner=self.owner,
            )

        return self._runs.start(plan, make_executor, body)

    # -- reading ---------------------------------------------------------------------------------------

    async def get_plan(self, plan_id: str) -> ExecutionPlan:
        """Raises: PlanNotFoundError."""
        return await self._load(plan_id)

    async def get_summary(self, plan_id: str) -> PlanSummary:
        """Raises: PlanNotFoundError."""
        return (await self._load(plan_id)).summary()

    async def list_plans(
        self, status: PlanStatus | str | None = None, limit: int = 20
    ) -> list[ExecutionPlan]:
        """Recent plans, newest first, optionally only those in `status`."""
        plans = await self.store.list_plans(status=status, limit=limit)
        result = []
        for plan in plans:
            if plan.expire_approval():
                try:
                    await self.store.save_plan(plan, [_event(plan, "approval_expired")])
                except PlanConflictError:  # changed meanwhile: list it as it was read
                    plan = await self.store.get_plan(plan.id)
                if status is not None and plan.status != PlanStatus(status):
                    continue
            result.append(self._live(plan))
        return result

    async def events(self, plan_id: str) -> list[Event]:
        """The plan's audit trail, oldest first. Raises: PlanNotFoundError."""
        await self.store.get_plan(plan_id)
        return await self.store.events(plan_id)

    def is_running_here(self, plan_id: str) -> bool:
        return plan_id in self._runs

    def _live(self, plan: ExecutionPlan) -> ExecutionPlan:
        # The executor mutates its plan in place and commits as it goes; the live object is never older.
        run = self._runs.get(plan.id)
        return run.plan if run is not None else plan

    async def _load(self, plan_id: str) -> ExecutionPlan:
        run = self._runs.get(plan_id)
        if run is not None:
            return run.plan
        plan = await self.store.get_plan(plan_id)
        if plan.expire_approval():
            await self.store.save_plan(plan, [_event(plan, "approval_expired")])
        return plan


# -- helpers --------------------------------------------------------------------------------------------


_SHOW_AGAIN = "it was not approved; show the current version to the person and ask again"


def _event(plan: ExecutionPlan, kind: str, **data: Any) -> Event:
    return Event(plan_id=plan.id, kind=kind, data=data)


def _check_executable(plan: ExecutionPlan) -> None:
    pid, status = plan.id, plan.status
    if status == PlanStatus.PENDING_APPROVAL or (status == PlanStatus.DRAFT and plan.options.needs_approval):
        raise PlanStateError(f"plan {pid!r} is {status.value}: call approve_plan first")
    if status == PlanStatus.APPROVED and not plan.is_approved():
        raise PlanStateError(f"plan {pid!r} changed after it was approved: call approve_plan again")
    if status in (PlanStatus.FAILED, PlanStatus.PARTIAL):
        raise PlanStateError(
            f"plan {pid!r} is {status.value}: call resume_plan to re-run the steps that did not complete"
        )
    if status == PlanStatus.COMPLETED:
        raise PlanStateError(f"plan {pid!r} is already completed: call get_plan to read its results")
    if status == PlanStatus.CANCELLED:
        why = plan.rejection_note or plan.error
        raise PlanStateError(
            f"plan {pid!r} is cancelled{f' ({why})' if why else ''} and can never run: create a new plan"
        )


def _mark_cancelled(plan: ExecutionPlan, reason: str) -> None:
    for step in plan.steps:
        if step.status in (StepStatus.PENDING, StepStatus.RUNNING):
            step.status = StepStatus.SKIPPED
            step.error = f"not run: {reason}"
    now = utcnow()
    plan.status = PlanStatus.CANCELLED
    plan.error = reason
    plan.current_step = None
    plan.pending_since = None
    if plan.completed_at is None:
        plan.completed_at = now
    plan.touch()
