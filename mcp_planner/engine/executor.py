"""The executor: runs approved plans as DAGs of tool calls, durably, and resumes or cancels them.

`Executor` decides whether a plan may run (approval, pinned hash, validation, the store claim), prepares a
resume (the at-most-once rule for interrupted steps), and hands the run to `scheduling.Run`, which owns the
plan's state while it runs. Every transition is committed to the store before the next action.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from mcp_planner.engine.admission import check_can_execute, check_can_resume
from mcp_planner.engine.builtins import with_builtins
from mcp_planner.engine.scheduling import CANCEL_GRACE_S, FINAL_SAVE_TIMEOUT_S, Hook, Hooks, Run
from mcp_planner.engine.tools import ToolInfo, ToolProvider, as_provider
from mcp_planner.errors import (
    PlanConflictError,
    PlanStateError,
    PlanValidationError,
    Problem,
)
from mcp_planner.plan.model import (
    INTERRUPTED_ERROR,
    INTERRUPTED_KEY,
    MAX_STEPS,
    RERUN_HINT,
    ExecutionPlan,
    PlanStatus,
    PlanSummary,
    Step,
    StepStatus,
    utcnow,
)
from mcp_planner.plan.model import set_fields as _set
from mcp_planner.plan.validation import validate_plan
from mcp_planner.store.base import DEFAULT_STALE_AFTER, Event, Store, claim_is_live, new_owner_id
from mcp_planner.store.memory import MemoryStore

logger = logging.getLogger("mcp_planner.engine.executor")

__all__ = ["Executor", "check_can_execute", "check_can_resume"]


def _validate(plan: ExecutionPlan, catalog: Mapping[str, ToolInfo], max_steps: int) -> list[Problem]:
    schemas = {name: info.input_schema for name, info in catalog.items()}
    return validate_plan(plan, schemas, max_steps=max_steps)


class Executor:
    """Runs plans: a DAG scheduler with retries, timeouts, error strategies, cancellation and resume.

    Args:
        tools: a `ToolProvider` (e.g. `Downstream`), or a mapping of tool name to a plain or async function
            taking the parameters dict.
        store: where every transition is committed; an in-memory store when omitted.
        on_step_start, on_step_complete: called with `(plan, step)`; plain or async. A hook that raises is
            logged and ignored (this holds for every hook).
        on_step_failed: called with `(plan, step, err)`, as the seed's `func(plan, step, err)`: `err` is a
            `StepError` whose message is the step's final error (`str(err) == step.error`).
        on_plan_complete: called with `(plan)` once the run has ended and its final state is saved.
        owner: this executor's claim owner id (default: host, pid and a nonce).
        heartbeat_interval: seconds between claim heartbeats; each one also picks up a cancel requested by
            another process through the store.
        stale_after: a claim whose heartbeat is older than this many seconds is taken as dead.
        max_steps: the most steps a plan may have (validation refuses more).

    The executor mutates the plan it is given in place.
    """

    def __init__(
        self,
        tools: ToolProvider | Mapping[str, Callable[[dict[str, Any]], Any]],
        store: Store | None = None,
        *,
        on_step_start: Hook | None = None,
        on_step_complete: Hook | None = None,
        on_step_failed: Hook | None = None,
        on_plan_complete: Hook | None = None,
        owner: str | None = None,
        heartbeat_interval: float = 5.0,
        stale_after: float = DEFAULT_STALE_AFTER,
        max_steps: int = MAX_STEPS,
    ) -> None:
        self.provider = with_builtins(as_provider(tools))
        self.max_steps = max_steps
        self.store: Store = store if store is not None else MemoryStore()
        self.owner = owner or new_owner_id()
        self.hooks = Hooks(on_step_start, on_step_complete, on_step_failed, on_plan_complete)
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = stale_after
        self._runs: dict[str, Run] = {}

    async def execute(self, plan: ExecutionPlan) -> PlanSummary:
        """Run an approved plan (or a draft that needs no approval) to its end.

        Returns:
            The plan's summary; the plan itself is updated in place and saved.

        Raises:
            PlanStateError: the plan is not approved, was edited after approval, is already executing, or
                has already run (`resume` continues a failed or partial plan).
            PlanValidationError: the plan has problems; `problems` lists them.
            PlanClaimedError: another live process is executing the plan.
        """
        self._refuse_if_running_here(plan)
        await self.expire(plan)
        check_can_execute(plan)
        status = plan.status
        catalog = self.provider.catalog()
        problems = _validate(plan, catalog, self.max_steps)
        if problems:
            raise PlanValidationError(problems, f"plan {plan.id!r} cannot run: it is invalid")
        events: list[Event] = []
        if status == PlanStatus.DRAFT:
            plan.submit()  # needs no approval: approved by "auto" (approve() applies the approval timeout)
            events.append(Event(plan_id=plan.id, kind="plan_approved", data={"by": "auto", "method": "auto"}))
        for step in plan.steps:
            if step.status != StepStatus.PENDING:
                step.reset()
        metadata = {k: v for k, v in plan.metadata.items() if k != INTERRUPTED_KEY}
        if metadata != plan.metadata:
            _set(plan, metadata=metadata)
        events.append(Event(plan_id=plan.id, kind="plan_started", data={"owner": self.owner}))
        return await self._run(plan, catalog, events, interrupted=[])

    async def resume(self, plan: ExecutionPlan, rerun_interrupted: bool = False) -> PlanSummary:
        """Continue a failed or partial plan, or one left `executing` by a process that died.

        Completed steps are kept and never re-run; failed, skipped and pending steps run again. A step
        found `running` was interrupted and its outcome is unknown: it runs again only when that is safe
        (`max_retries > 0`, or the tool is read-only or idempotent) or `rerun_interrupted` is true;
        otherwise it is failed with "interrupted; outcome unknown" and the plan's error says what to do.

        Returns:
            The summary; for a completed plan, its summary unchanged.

        Raises:
            PlanStateError: the plan is cancelled, has not run yet, or was edited after approval.
            PlanValidationError: the plan has problems (e.g. a tool is gone).
            PlanClaimedError: another live process is executing the plan.
        """
        self._refuse_if_running_here(plan)
        await self.expire(plan)
        if not check_can_resume(plan):
            return plan.summary()
        status = plan.status
        catalog = self.provider.catalog()
        problems = _validate(plan, catalog, self.max_steps)
        if problems:
            raise PlanValidationError(problems, f"plan {plan.id!r} cannot be resumed: it is invalid")
        events, interrupted = self._prepare_resume(plan, catalog, rerun_interrupted)
        events.insert(
            0,
            Event(
                plan_id=plan.id,
                kind="plan_resumed",
                data={"owner": self.owner, "rerun_interrupted": rerun_interrupted, "from": status.value},
            ),
        )
        return await self._run(plan, catalog, events, interrupted=interrupted)

    async def cancel(
        self, plan: ExecutionPlan, reason: str = "cancelled", *, by: str = "user"
    ) -> PlanSummary:
        """Cancel a plan: running calls are cancelled, running and pending steps are skipped with `reason`.

        A plan running in this executor is stopped (this waits, bounded, until its final state is saved).
        A plan executing in another live process is asked to stop through the store. A plan that has not
        run, or whose executor died, becomes `cancelled` at once. `cancelled` is terminal.

        Raises:
            PlanStateError: the plan has already completed.
            PlanConflictError: the stored plan changed meanwhile (read it again and retry).
        """
        run = self._runs.get(plan.id)
        if run is not None:
            run.request_cancel(reason)
            if anyio.get_current_task().id != run.coordinator_task:  # not from inside a hook of that run
                with anyio.move_on_after(CANCEL_GRACE_S + FINAL_SAVE_TIMEOUT_S):
                    await run.done.wait()
            return run.plan.summary()
        if plan.status == PlanStatus.CANCELLED:
            return plan.summary()
        if plan.status == PlanStatus.COMPLETED:
            raise PlanStateError(f"plan {plan.id!r} has already completed: there is nothing to cancel")
        if plan.status == PlanStatus.EXECUTING:
            # Another executor (in another process, or a runner in this one) holds it: ask it to stop.
            claim = await self.store.get_claim(plan.id)
            if claim is not None and claim_is_live(claim, utcnow(), self.stale_after):
                if not await self.store.request_cancel(plan.id, reason):
                    raise PlanConflictError(plan.id)  # the run ended meanwhile: decide on its final state
                await self.store.append_event(
                    Event(
                        plan_id=plan.id,
                        kind="cancel_requested",
                        data={"reason": reason, "by": by, "owner": claim.owner},
                    )
                )
                return plan.summary()
        now = utcnow()
        events = []
        for step in plan.steps:
            for item in step.items or ():
                if item.status in (StepStatus.PENDING, StepStatus.RUNNING):
                    _set(item, status=StepStatus.SKIPPED, error=f"not run: {reason}")
            if step.status in (StepStatus.PENDING, StepStatus.RUNNING):
                step.status = StepStatus.SKIPPED
                step.error = f"not run: {reason}"
                events.append(
                    Event(plan_id=plan.id, kind="step_skipped", step_id=step.id, data={"reason": reason})
                )
        plan.status = PlanStatus.CANCELLED
        plan.error = reason
        plan.current_step = None
        plan.completed_at = plan.completed_at or now
        plan.updated_at = now
        plan.pending_since = None
        data = {"status": "cancelled", "error": reason, "by": by}
        events.append(Event(plan_id=plan.id, kind="plan_cancelled", data=data))
        await self.store.save_plan(plan, events)
        return plan.summary()

    # -- helpers ------------------------------------------------------------------------------------------

    def _refuse_if_running_here(self, plan: ExecutionPlan) -> None:
        if plan.id in self._runs:
            raise PlanStateError(f"plan {plan.id!r} is already executing; call get_summary to follow it")

    async def expire(self, plan: ExecutionPlan) -> bool:
        """Cancel and store a plan that waited for approval past its `approval_timeout_ms`; True if it did.

        Raises:
            PlanConflictError: the stored plan changed meanwhile.
        """
        if not plan.expire_approval():
            return False
        await self.store.save_plan(
            plan, [Event(plan_id=plan.id, kind="approval_expired", data={"error": "approval timed out"})]
        )
        return True

    def _prepare_resume(
        self, plan: ExecutionPlan, catalog: Mapping[str, ToolInfo], rerun_interrupted: bool
    ) -> tuple[list[Event], list[str]]:
        """Reset what did not complete; apply the at-most-once rule to interrupted steps."""
        known = set(plan.metadata.get(INTERRUPTED_KEY) or [])
        events: list[Event] = []
        left: list[str] = []
        for step in plan.steps:
            if step.status == StepStatus.COMPLETED:
                continue
            info = catalog.get(step.tool_name)
            safe = step.max_retries > 0 or (info is not None and info.safe_to_rerun)
            if step.items is not None:  # a for_each step: each item is decided like a step
                events.extend(
                    self._resume_items(plan, step, step.id in known, safe or rerun_interrupted, left)
                )
                continue
            if step.status != StepStatus.RUNNING and step.id not in known:
                step.reset()
                continue
            if rerun_interrupted or safe:
                why = "rerun_interrupted" if rerun_interrupted and not safe else "safe to re-run"
                events.append(
                    Event(
                        plan_id=plan.id,
                        kind="step_interrupted",
                        step_id=step.id,
                        data={"rerun": True, "why": why},
                    )
                )
                step.reset()
                continue
            step.status = StepStatus.FAILED
            step.error = INTERRUPTED_ERROR
            left.append(step.id)
            events.append(
                Event(
                    plan_id=plan.id,
                    kind="step_interrupted",
                    step_id=step.id,
                    data={"rerun": False, "error": INTERRUPTED_ERROR, "hint": RERUN_HINT},
                )
            )
        return events, left

    @staticmethod
    def _resume_items(
        plan: ExecutionPlan, step: Step, known: bool, rerun: bool, left: list[str]
    ) -> list[Event]:
        """Keep a `for_each` step's completed items, and run the others again, except items whose call was
        interrupted (outcome unknown) when re-running them is not safe: those stay failed."""
        assert step.items is not None
        unknown = [
            i
            for i, item in enumerate(step.items)
            if item.status == StepStatus.RUNNING
            or (known and item.status == StepStatus.FAILED and item.error == INTERRUPTED_ERROR)
        ]
        step.reset(keep_items=True)
        if not unknown:
            return []
        if not rerun:
            for i in unknown:
                _set(step.items[i], status=StepStatus.FAILED, error=INTERRUPTED_ERROR)
            left.append(step.id)
        data: dict[str, Any] = {"rerun": rerun, "items": unknown}
        if not rerun:
            data |= {"error": INTERRUPTED_ERROR, "hint": RERUN_HINT}
        return [Event(plan_id=plan.id, kind="step_interrupted", step_id=step.id, data=data)]

    async def _run(
        self,
        plan: ExecutionPlan,
        catalog: Mapping[str, ToolInfo],
        events: list[Event],
        interrupted: list[str],
    ) -> PlanSummary:
        """Mark the plan executing and drive the run to its end, which saves the final state.

        The run's first commit claims the plan and stores it whole with `events` and its first started
        steps (one transaction); its last commit holds the last results, the final state and the release.

        Raises:
            PlanClaimedError: another live process holds the plan; nothing was written (the plan object
                was changed in memory: read it again from the store).
        """
        now = utcnow()
        _set(
            plan,
            status=PlanStatus.EXECUTING,
            error=None,
            started_at=now,
            completed_at=None,
            total_duration_ms=None,
            current_step=None,
            updated_at=now,
            output_values={},
            output_errors={},
        )
        run = Run(
            plan,
            self.provider,
            catalog,
            self.store,
            self.hooks,
            self.owner,
            heartbeat_interval=self.heartbeat_interval,
            stale_after=self.stale_after,
            interrupted=interrupted,
            first_events=events,
        )
        self._runs[plan.id] = run
        failure: BaseException | None = None
        try:
            await run.drive()
        except BaseExceptionGroup as group:
            failure = group
            inner = group.exceptions[0] if len(group.exceptions) == 1 else None
            if isinstance(inner, Exception):  # the coordinator's own error (e.g. the store failed)
                failure = inner
                raise inner from None
            raise
        except BaseException as exc:
            failure = exc
            raise
        finally:
            del self._runs[plan.id]
            await run.finish(failure)
        return plan.summary()
