"""One run of a plan: the coordinator that owns the plan's state, the step workers, the retry policy.

The coordinator is the only code that changes the plan while it runs. Each started step runs in a worker
task inside its own `CancelScope` (kept by step position, so cancel and timeout hit exactly that step); the
worker sends its outcome back as a value over a memory stream and never raises into the task group. The
coordinator commits every transition to the store before the action that depends on it: a step is stored
`running` before its call is sent, and `completed` with its result before any dependent starts.

A run makes one transaction per round of outcomes, and no more at its ends: its first commit claims the
plan and stores it whole with the first started steps; the outcomes of its last round are committed with
the final state and the release of the claim. A one-step plan costs two transactions.

Scheduling is O(1) amortised per step: indegree counters, dependents lists and a heap of ready positions
ordered by `Step.index`.
"""

from __future__ import annotations

import functools
import heapq
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mcp_planner.engine.attempts import call_step, check_parameters
from mcp_planner.engine.tools import ToolInfo, ToolProvider
from mcp_planner.errors import PlanClaimedError, PlanConflictError, StepError
from mcp_planner.plan.model import (
    INTERRUPTED_ERROR,
    INTERRUPTED_KEY,
    RERUN_HINT,
    ExecutionPlan,
    PlanStatus,
    Step,
    StepResult,
    StepStatus,
    set_fields,
    utcnow,
)
from mcp_planner.plan.templating import contains_template, render_parameters, render_parameters_off_loop
from mcp_planner.store.base import Event, Store

logger = logging.getLogger("mcp_planner.engine.executor")

#: How long running calls get to return after being cancelled before the run stops waiting for them.
CANCEL_GRACE_S = 10.0
#: Bound on the shielded final save (and release, and `on_plan_complete`) of a run.
FINAL_SAVE_TIMEOUT_S = 15.0
#: How often a run reads its claim for a cancel requested by another process (SPEC: seen within 250 ms).
CANCEL_POLL_S = 0.2

Hook = Callable[..., Any]


@dataclass(frozen=True)
class Hooks:
    on_step_start: Hook | None = None
    on_step_complete: Hook | None = None
    on_step_failed: Hook | None = None
    on_plan_complete: Hook | None = None


async def call_hook(hook: Hook | None, *args: Any) -> None:
    """Run a plain or async hook; whatever it raises is logged and swallowed so the run goes on."""
    if hook is None:
        return
    try:
        value = hook(*args)
        if inspect.isawaitable(value):
            await value
    except Exception:
        logger.exception("hook %r raised; the run goes on", getattr(hook, "__name__", hook))


@dataclass(slots=True)
class _Finished:
    pos: int
    result: StepResult | None = None
    error: str | None = None
    cancelled: bool = False


@dataclass(slots=True)
class _Retrying:
    pos: int
    retry: int
    error: str
    delay_s: float
    ack: anyio.Event = field(default_factory=anyio.Event)


_Message = _Finished | _Retrying
_Work = tuple[int, anyio.CancelScope, dict[str, StepResult | None]]


def _ms_between(start: Any, end: Any) -> int | None:
    if start is None or end is None:
        return None
    return int((end - start).total_seconds() * 1000)


class Run:
    """The state of one execution of one plan, driven by `drive()` and closed by `finish()`.

    Steps already `failed` or `skipped` when the run is built (an interrupted step resume will not re-run)
    count as failures from the start: their dependents are skipped and `stop_on_error` applies.
    """

    def __init__(
        self,
        plan: ExecutionPlan,
        provider: ToolProvider,
        catalog: Mapping[str, ToolInfo],
        store: Store,
        hooks: Hooks,
        owner: str,
        *,
        heartbeat_interval: float,
        stale_after: float,
        interrupted: list[str] | None = None,
        first_events: Sequence[Event] = (),
    ) -> None:
        self.plan = plan
        self.steps = plan.steps
        self.options = plan.options
        self.provider = provider
        self.catalog = catalog
        self.store = store
        self.hooks = hooks
        self.owner = owner
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = stale_after
        self.interrupted = list(interrupted or [])
        #: Whether the first commit (the claim, and the whole plan) is made; nothing is written before it.
        self.claimed = False
        #: The last round's outcomes, committed with the final state (changed steps, events, and the
        #: completed positions and failed steps whose hooks run after that commit).
        self._last_round: tuple[list[Step], list[Event], list[int], list[Step]] | None = None
        self.done = anyio.Event()
        self._stopped = anyio.Event()
        self.coordinator_task: int | None = None

        self.slots = plan.options.slots
        self.running = 0
        self.scopes: dict[int, anyio.CancelScope] = {}
        self.ready: list[tuple[int, int]] = []
        self.cancel_reason: str | None = None
        self.timed_out = False
        self.claim_lost = False
        self.stopped_by: str | None = None
        self.first_failure: str | None = None
        self.grace_deadline = math.inf
        total = plan.options.total_timeout_ms
        self.deadline = anyio.current_time() + total / 1000 if total > 0 else math.inf
        self._send: MemoryObjectSendStream[_Message] | None = None
        self._dispatch: MemoryObjectSendStream[_Work]
        self._work_queue: MemoryObjectReceiveStream[_Work]
        self.workers = 0

        n = len(self.steps)
        self.pos_of = {s.id: i for i, s in enumerate(self.steps)}
        self.templated = [contains_template(s.parameters) for s in self.steps]
        self.deps: list[list[int]] = [[] for _ in range(n)]
        self.dependents: list[list[int]] = [[] for _ in range(n)]
        self.waiting = [0] * n
        self.initial_changes: list[Step] = []
        self.initial_events: list[Event] = list(first_events)
        missing: list[tuple[int, str]] = []
        for i, step in enumerate(self.steps):
            for dep_id in dict.fromkeys(step.depends_on):
                j = self.pos_of.get(dep_id)
                if j is None:
                    missing.append((i, dep_id))
                    continue
                self.deps[i].append(j)
                self.dependents[j].append(i)
                if self.steps[j].status != StepStatus.COMPLETED:
                    self.waiting[i] += 1
        for i, dep_id in missing:  # validation reports these; never wait on a step that does not exist
            if self.steps[i].status == StepStatus.PENDING:
                self._skip(
                    i, f"dependency {dep_id} does not exist", self.initial_changes, self.initial_events
                )
        for i, step in enumerate(self.steps):
            if step.status == StepStatus.PENDING and self.waiting[i] == 0:
                self.ready.append((step.index, i))
        heapq.heapify(self.ready)
        for i, step in enumerate(self.steps):
            if step.status == StepStatus.FAILED:
                self._after_failure(i, self.initial_changes, self.initial_events)

    # -- state transitions (coordinator only) -------------------------------------------------------------

    @property
    def halted(self) -> bool:
        """No new step may start."""
        return (
            self.cancel_reason is not None or self.timed_out or self.claim_lost or self.stopped_by is not None
        )

    def _event(self, kind: str, step: Step | None = None, **data: Any) -> Event:
        return Event(plan_id=self.plan.id, kind=kind, step_id=step.id if step else None, data=data)

    def _skip(self, pos: int, reason: str, changed: list[Step], events: list[Event]) -> None:
        step = self.steps[pos]
        set_fields(step, status=StepStatus.SKIPPED, error=reason)
        changed.append(step)
        events.append(self._event("step_skipped", step, reason=reason))

    def _after_failure(self, pos: int, changed: list[Step], events: list[Event]) -> None:
        """Skip everything downstream of a failed step, and stop the plan if `stop_on_error` says so."""
        failed = self.steps[pos]
        if self.first_failure is None:
            self.first_failure = f"step {failed.id!r} failed: {failed.error}"
        stack = [pos]
        while stack:
            j = stack.pop()
            for k in self.dependents[j]:
                if self.steps[k].status == StepStatus.PENDING:
                    self._skip(k, f"dependency {self.steps[j].id} did not complete", changed, events)
                    stack.append(k)
        if self.options.stop_on_error and not self.options.continue_on_error and self.stopped_by is None:
            self.stopped_by = failed.id
            reason = f"not run: plan stopped after step {failed.id} failed"
            for k, step in enumerate(self.steps):
                if step.status == StepStatus.PENDING:
                    self._skip(k, reason, changed, events)

    def request_cancel(self, reason: str) -> None:
        """Cancel the run: running calls through their cancel scopes, nothing new starts."""
        if self.cancel_reason is None and not self.timed_out:
            self.cancel_reason = reason
            self._cancel_running()

    def _cancel_running(self) -> None:
        self.grace_deadline = min(self.grace_deadline, anyio.current_time() + CANCEL_GRACE_S)
        for scope in self.scopes.values():
            scope.cancel()

    def _check_deadline(self) -> None:
        if self.deadline == math.inf:
            return
        if not self.timed_out and self.cancel_reason is None and anyio.current_time() >= self.deadline:
            self.timed_out = True
            self._cancel_running()

    # -- the coordinator ----------------------------------------------------------------------------------

    async def drive(self) -> None:
        """Run every step that can run, then return. Raises only what the store or anyio raise."""
        self.coordinator_task = anyio.get_current_task().id
        send, receive = anyio.create_memory_object_stream[_Message](math.inf)
        self._send = send
        self._dispatch, work = anyio.create_memory_object_stream[_Work](math.inf)
        with send, receive, self._dispatch, work:
            async with anyio.create_task_group() as tg:
                self._work_queue = work
                tg.start_soon(self._heartbeat)
                await self._start_ready(tg)
                while self.running:
                    message = await self._receive(receive)
                    if message is None:
                        if anyio.current_time() >= self.grace_deadline:
                            logger.error(
                                "plan %r: %d call(s) ignored cancellation for %.0f s; abandoning them",
                                self.plan.id,
                                self.running,
                                CANCEL_GRACE_S,
                            )
                            break
                        continue
                    # Outcomes that arrived together are committed together: one transaction per round.
                    finished: list[_Finished] = []
                    while message is not None:
                        if isinstance(message, _Retrying):
                            await self._on_retry(message)
                        else:
                            finished.append(message)
                        try:
                            message = receive.receive_nowait()
                        except anyio.WouldBlock:
                            message = None
                    if finished:
                        self.running -= len(finished)
                        for done in finished:
                            self.scopes.pop(done.pos, None)
                        await self._start_ready(tg, finished)
                if self.running:
                    tg.cancel_scope.cancel()  # the abandoned calls, and the heartbeat
                else:  # the heartbeat and the idle workers end on their own: no cancellation to deliver
                    self._stopped.set()
                    self._dispatch.close()

    async def _receive(self, receive: MemoryObjectReceiveStream[_Message]) -> _Message | None:
        self._check_deadline()
        try:  # `receive()` always yields to the loop first (a checkpoint): a whole loop cycle per message
            return receive.receive_nowait()
        except anyio.WouldBlock:
            pass
        deadline = self.grace_deadline
        if not self.timed_out and self.cancel_reason is None:  # still bounds steps that finish after a stop
            deadline = min(deadline, self.deadline)
        if deadline == math.inf:
            return await receive.receive()
        with anyio.CancelScope(deadline=deadline):
            return await receive.receive()
        self._check_deadline()
        return None

    async def _start_ready(self, tg: TaskGroup, finished: Sequence[_Finished] = ()) -> None:
        """Record `finished` steps and start every ready step a slot allows, in ONE commit.

        The commit holds the finished steps' results and the started steps' `running` state, so a result is
        durable before any dependent's call is sent, and a step is `running` before its own call is sent.
        """
        changed: list[Step] = []
        events: list[Event] = []
        completed, failed = self._record_finished(finished, changed, events)
        self._check_deadline()
        started = [] if self.halted else self._take_ready(changed, events)
        if self.claimed and not started and not self.running:
            # The run ends with this round: its outcomes go into the final commit, hooks after it.
            self._last_round = (changed, events, completed, failed)
            return
        if changed or events or not self.claimed:
            await self._commit(changed, events)
        await self._step_hooks(completed, failed)
        hooks = self.hooks
        for pos in started:
            step = self.steps[pos]
            if hooks.on_step_start is not None:
                await call_hook(hooks.on_step_start, self.plan, step)
            scope = anyio.CancelScope()
            self.scopes[pos] = scope
            if self.halted:  # cancelled while committing: the worker reports it at once, no call is sent
                scope.cancel()
            results = {self.steps[j].id: self.steps[j].result for j in self.deps[pos]}
            self.running += 1
            if self.workers < self.running:  # a pool of at most `slots` workers: no task spawned per step
                self.workers += 1
                tg.start_soon(self._worker, self._work_queue)
            self._dispatch.send_nowait((pos, scope, results))

    def _take_ready(self, changed: list[Step], events: list[Event]) -> list[int]:
        """Mark the ready steps that fit in the free slots `running` (in memory; the caller commits)."""
        positions: list[int] = []
        now = utcnow()
        while self.ready and self.running + len(positions) < self.slots:
            _, pos = heapq.heappop(self.ready)
            step = self.steps[pos]
            if step.status != StepStatus.PENDING:
                continue
            set_fields(step, status=StepStatus.RUNNING, started_at=now, error=None)
            changed.append(step)
            events.append(self._event("step_started", step))
            positions.append(pos)
        if positions:
            set_fields(self.plan, current_step=self.steps[positions[-1]].id, updated_at=now)
        return positions

    async def _on_retry(self, message: _Retrying) -> None:
        step = self.steps[message.pos]
        set_fields(step, retry_count=message.retry, error=message.error)
        set_fields(self.plan, updated_at=utcnow())
        event = self._event(
            "step_retry", step, retry=message.retry, error=message.error, delay_ms=int(message.delay_s * 1000)
        )
        try:
            await self._commit([step], [event])
        finally:
            message.ack.set()

    def _record_finished(
        self, batch: Sequence[_Finished], changed: list[Step], events: list[Event]
    ) -> tuple[list[int], list[Step]]:
        """Apply finished steps' outcomes in memory and release their dependents; returns (completed
        positions, failed steps) for the hooks. The caller commits before any released dependent starts."""
        completed: list[int] = []
        failed: list[Step] = []
        if not batch:
            return completed, failed
        now = utcnow()
        set_fields(self.plan, updated_at=now)
        for message in batch:
            pos = message.pos
            step = self.steps[pos]
            duration_ms = _ms_between(step.started_at, now)
            changed.append(step)
            if message.result is not None:
                set_fields(
                    step,
                    completed_at=now,
                    duration_ms=duration_ms,
                    status=StepStatus.COMPLETED,
                    result=message.result,
                    error=None,
                )
                events.append(self._event("step_completed", step, duration_ms=step.duration_ms))
                completed.append(pos)
                continue
            set_fields(step, completed_at=now, duration_ms=duration_ms)
            if message.cancelled and self.cancel_reason is not None:
                self._skip(pos, self.cancel_reason, [], events)
            elif message.cancelled:
                self._fail(step, "total timeout exceeded" if self.timed_out else INTERRUPTED_ERROR, events)
                failed.append(step)
            else:
                self._fail(step, message.error or "failed", events)
                self._after_failure(pos, changed, events)
                failed.append(step)
        for pos in completed:
            for k in self.dependents[pos]:
                self.waiting[k] -= 1
                if self.waiting[k] == 0 and self.steps[k].status == StepStatus.PENDING:
                    heapq.heappush(self.ready, (self.steps[k].index, k))
        return completed, failed

    async def _step_hooks(self, completed: Sequence[int], failed: Sequence[Step]) -> None:
        hooks = self.hooks  # a missing hook costs no coroutine per step
        if hooks.on_step_complete is not None:
            for pos in completed:
                await call_hook(hooks.on_step_complete, self.plan, self.steps[pos])
        if hooks.on_step_failed is not None:
            for step in failed:
                await call_hook(hooks.on_step_failed, self.plan, step, StepError(step.error or "failed"))

    async def _commit(self, changed: list[Step], events: list[Event]) -> None:
        if self.claim_lost:  # the plan may belong to another process now: write nothing more
            return
        if not self.claimed:  # the first commit: the claim, and the plan whole
            first = [*self.initial_events, *events]
            holder = await self.store.start_run(self.plan, first, self.owner, self.stale_after)
            if holder is not None:
                raise PlanClaimedError(self.plan.id, holder.owner)
            self.claimed = True
            return
        try:
            await self.store.save_transition(self.plan, changed, events)
        except PlanConflictError:
            # Someone else wrote the plan while this run held it: only a takeover does that.
            self._lose_claim()
            raise

    def _lose_claim(self) -> None:
        logger.error("plan %r: lost the execution claim; stopping the run", self.plan.id)
        self.claim_lost = True
        self._cancel_running()

    def _fail(self, step: Step, error: str, events: list[Event]) -> None:
        set_fields(step, status=StepStatus.FAILED, error=error)
        events.append(self._event("step_failed", step, error=error, retries=step.retry_count))

    # -- workers ------------------------------------------------------------------------------------------

    async def _worker(self, work: MemoryObjectReceiveStream[_Work]) -> None:
        while True:
            try:  # work already queued is taken without the checkpoint `receive()` makes first
                pos, scope, results = work.receive_nowait()
            except anyio.WouldBlock:
                try:
                    pos, scope, results = await work.receive()
                except anyio.EndOfStream:
                    return
            except anyio.EndOfStream:
                return
            await self._work(pos, scope, results)

    async def _work(self, pos: int, scope: anyio.CancelScope, results: dict[str, StepResult | None]) -> None:
        step = self.steps[pos]
        outcome = _Finished(pos)
        if scope.cancel_called:  # cancelled before it started: send nothing (a tool may act before awaiting)
            outcome.cancelled = True
            self._report(outcome)
            return
        with scope:
            try:
                done = {sid: r for sid, r in results.items() if r is not None}
                params = (  # a template may work for its whole time budget: off the event loop
                    await render_parameters_off_loop(step.parameters, done)
                    if self.templated[pos]
                    else render_parameters(step.parameters, done)
                )
                if self.templated[pos]:  # the rest were checked against this catalog when the run began
                    check_parameters(step, self.catalog.get(step.tool_name), params)
                outcome.result = await call_step(
                    self.provider,
                    step,
                    params,
                    step_timeout_ms=self.options.step_timeout_ms,
                    backoff=self.options.retry_backoff,
                    on_retry=functools.partial(self._announce_retry, pos),
                )
            except StepError as exc:
                outcome.error = str(exc)
            except Exception as exc:  # a provider broke its contract; the run must not
                logger.exception(
                    "plan %r step %r: unexpected error from the tool provider", self.plan.id, step.id
                )
                outcome.error = f"{type(exc).__name__}: {exc}"
        if scope.cancel_called and outcome.result is None:
            outcome.cancelled = True
        self._report(outcome)

    def _report(self, outcome: _Finished) -> None:
        assert self._send is not None
        try:
            self._send.send_nowait(outcome)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # the coordinator gave up on this call (grace expired)

    async def _announce_retry(self, pos: int, retry: int, error: str, delay_s: float) -> None:
        message = _Retrying(pos, retry, error, delay_s)
        assert self._send is not None
        self._send.send_nowait(message)
        await message.ack.wait()  # the retry is committed before the next attempt is sent

    # -- claim heartbeat ----------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Refresh the claim every `heartbeat_interval`; in between, look for a cancel request often.

        Another process asks for a cancel through the claim row, so it is read every `CANCEL_POLL_S`
        (a read, not a write): a cancel is seen within that, not on the next heartbeat.
        """
        next_beat = anyio.current_time() + self.heartbeat_interval
        while True:
            with anyio.move_on_after(min(CANCEL_POLL_S, self.heartbeat_interval)):
                await self._stopped.wait()
            if self._stopped.is_set():
                return
            if not self.claimed:  # nothing to refresh or read yet
                continue
            beat = anyio.current_time() >= next_beat
            try:
                with anyio.fail_after(max(self.heartbeat_interval, 5.0)):
                    if beat:
                        claim = await self.store.heartbeat(self.plan.id, self.owner)
                    else:
                        claim = await self.store.get_claim(self.plan.id)
            except Exception:
                logger.warning("plan %r: heartbeat failed; trying again", self.plan.id, exc_info=True)
                continue
            if beat:
                next_beat = anyio.current_time() + self.heartbeat_interval
            if claim is None or claim.owner != self.owner:
                self._lose_claim()
                return
            if claim.cancel_reason:
                self.request_cancel(claim.cancel_reason)

    # -- the end ------------------------------------------------------------------------------------------

    def settle(self, exc: BaseException | None) -> tuple[list[Step], list[Event]]:
        """Bring every step and the plan to a final state; returns what changed, to be committed."""
        changed: list[Step] = []
        events: list[Event] = []
        interrupted = set(self.interrupted)
        for pos, step in enumerate(self.steps):
            if step.status == StepStatus.RUNNING:
                changed.append(step)
                if self.cancel_reason is not None:
                    self._skip(pos, self.cancel_reason, [], events)
                elif self.timed_out:
                    self._fail(step, "total timeout exceeded", events)
                else:
                    self._fail(step, INTERRUPTED_ERROR, events)
                    interrupted.add(step.id)
            elif step.status == StepStatus.PENDING:
                self._skip(pos, self._not_run_reason(pos, exc), changed, events)
        if interrupted != set(self.interrupted):
            self.interrupted = [s.id for s in self.steps if s.id in interrupted]
        metadata = dict(self.plan.metadata)
        if self.interrupted:
            metadata[INTERRUPTED_KEY] = self.interrupted
        else:
            metadata.pop(INTERRUPTED_KEY, None)
        if metadata != self.plan.metadata:
            set_fields(self.plan, metadata=metadata)

        status, error = self._final_status(exc)
        plan = self.plan
        now = utcnow()
        set_fields(
            plan,
            status=status,
            error=error,
            completed_at=now,
            total_duration_ms=_ms_between(plan.started_at, now),
            updated_at=now,
        )
        events.append(self._event(f"plan_{status.value}", status=status.value, error=error))
        return changed, events

    def _not_run_reason(self, pos: int, exc: BaseException | None) -> str:
        if self.cancel_reason is not None:
            return self.cancel_reason
        if self.timed_out:
            return "not run: total timeout exceeded"
        if self.claim_lost:
            return "not run: the execution claim was lost"
        if exc is not None:
            return "not run: execution was interrupted"
        if self.stopped_by is not None:
            return f"not run: plan stopped after step {self.stopped_by} failed"
        for j in self.deps[pos]:
            if self.steps[j].status != StepStatus.COMPLETED:
                return f"dependency {self.steps[j].id} did not complete"
        return "not run: its dependencies never completed"

    def _final_status(self, exc: BaseException | None) -> tuple[PlanStatus, str | None]:
        if self.cancel_reason is not None:
            return PlanStatus.CANCELLED, self.cancel_reason
        if self.timed_out:
            return PlanStatus.FAILED, f"total timeout of {self.options.total_timeout_ms} ms exceeded"
        if self.claim_lost:
            return (
                PlanStatus.FAILED,
                "lost the execution claim (another process may have taken the plan over)",
            )
        if exc is not None:
            what = "cancelled" if isinstance(exc, anyio.get_cancelled_exc_class()) else type(exc).__name__
            return PlanStatus.FAILED, f"execution was interrupted ({what}): call resume_plan to continue"
        completed = sum(1 for s in self.steps if s.status == StepStatus.COMPLETED)
        if completed == len(self.steps):
            return PlanStatus.COMPLETED, None
        reasons = []
        if self.interrupted:
            reasons.append(
                f"step(s) {', '.join(map(repr, self.interrupted))} were interrupted and their outcome is "
                f"unknown: {RERUN_HINT}"
            )
        if self.first_failure is not None:
            reasons.append(self.first_failure)
        error = "; ".join(reasons) or None
        if self.stopped_by is not None or completed == 0:
            return PlanStatus.FAILED, error
        return PlanStatus.PARTIAL, error

    async def _release_anyway(self) -> None:
        try:
            await self.store.release(self.plan.id, self.owner)
        except Exception:
            logger.exception("plan %r: could not release the execution claim", self.plan.id)

    async def finish(self, exc: BaseException | None) -> None:
        """Commit the final state (shielded, bounded), release the claim, call `on_plan_complete`."""
        if not self.claimed:  # refused (claimed elsewhere) or stopped before the first commit: wrote nothing
            self.done.set()
            return
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + FINAL_SAVE_TIMEOUT_S
            changed, events, completed, failed = self._last_round or ([], [], [], [])
            final_changes, final_events = self.settle(exc)
            changed += final_changes
            events += final_events
            if not self.claim_lost:
                try:
                    await self.store.save_transition(self.plan, changed, events, release=self.owner)
                except Exception:
                    logger.exception("plan %r: could not save the final state", self.plan.id)
                    await self._release_anyway()
            await self._step_hooks(completed, failed)
            await call_hook(self.hooks.on_plan_complete, self.plan)
        if scope.cancelled_caught:
            logger.error(
                "plan %r: the final save did not finish in %.0f s", self.plan.id, FINAL_SAVE_TIMEOUT_S
            )
        self.done.set()
