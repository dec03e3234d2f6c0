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
import json
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mcp_planner.engine.attempts import call_step, check_parameters
from mcp_planner.engine.tools import ToolInfo, ToolProvider
from mcp_planner.errors import CheckFailedError, PlanClaimedError, PlanConflictError, StepError, TemplateError
from mcp_planner.plan.model import (
    CONDITION_FALSE,
    INTERRUPTED_ERROR,
    INTERRUPTED_KEY,
    MAX_ITEMS,
    RERUN_HINT,
    ExecutionPlan,
    PlanStatus,
    Step,
    StepItem,
    StepResult,
    StepStatus,
    set_fields,
    utcnow,
)
from mcp_planner.plan.templating import (
    ResultView,
    analyse_template,
    condition_template,
    contains_template,
    is_template,
    render_off_loop,
    template_context,
    truthy,
)
from mcp_planner.store.base import Event, Store

logger = logging.getLogger("mcp_planner.engine.executor")

#: How long running calls get to return after being cancelled before the run stops waiting for them.
CANCEL_GRACE_S = 10.0
#: Bound on the shielded final save (and release, and `on_plan_complete`) of a run.
FINAL_SAVE_TIMEOUT_S = 15.0
#: How long a run's outputs may take to render, all together, at its end.
OUTPUTS_TIME_S = 5.0
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
    """A unit's outcome: a step's call, or one item's call of a `for_each` step (`item` >= 0)."""

    pos: int
    item: int = -1
    result: StepResult | None = None
    error: str | None = None
    cancelled: bool = False


@dataclass(slots=True)
class _Prepared:
    """A step's `when` and `for_each`, rendered: whether it runs, and its items."""

    pos: int
    run: bool = True
    reason: str | None = None
    items: list[Any] | None = None
    error: str | None = None


@dataclass(slots=True)
class _Retrying:
    pos: int
    item: int
    retry: int
    error: str
    delay_s: float
    ack: anyio.Event = field(default_factory=anyio.Event)


@dataclass(slots=True)
class _Round:
    """What one round changes, committed together: steps, items, events; and, for the hooks after the
    commit, the steps that completed and failed."""

    changed: list[Step] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    items: list[tuple[Step, int]] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)
    failed: list[Step] = field(default_factory=list)


_Message = _Finished | _Prepared | _Retrying
_Work = tuple[int, int, anyio.CancelScope, dict[str, Any]]


def _ms_between(start: Any, end: Any) -> int | None:
    if start is None or end is None:
        return None
    return int((end - start).total_seconds() * 1000)


def _item_list(value: Any) -> list[Any]:
    """What a `for_each` rendered to, as the list of items (a JSON array in a text counts as a list)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise TemplateError(
                "for_each gave a text that is not a JSON list: give a list, e.g. steps.<id>.json or "
                "steps.<id>.result.<list field>"
            ) from None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise TemplateError(f"for_each gave {type(value).__name__}, not a list")
    if len(value) > MAX_ITEMS:
        raise TemplateError(f"for_each gave {len(value)} items, more than the limit of {MAX_ITEMS}")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Run:
    """The state of one execution of one plan, driven by `drive()` and closed by `finish()`.

    Steps already `failed` when the run is built (an interrupted step resume will not re-run) count as
    failures from the start: their dependents are skipped and `stop_on_error` applies.

    A unit of work is a step's call or one item of a `for_each` step; each running unit takes a slot. A
    step with `when`, or a `for_each` whose list is not known yet, is first prepared (its templates
    rendered off the event loop, holding no slot).
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
        #: The last round's outcomes, committed with the final state (hooks run after that commit).
        self._last_round: _Round | None = None
        self.done = anyio.Event()
        self._stopped = anyio.Event()
        self.coordinator_task: int | None = None

        self.slots = plan.options.slots
        self.running = 0
        self.preparing = 0
        self.scopes: dict[tuple[int, int], anyio.CancelScope] = {}
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
        #: Whether a unit of the step renders anything (its parameters, or its check) at run time.
        self.needs_context = [
            t or s.fail_if is not None for t, s in zip(self.templated, self.steps, strict=True)
        ]
        self.deps: list[list[int]] = [[] for _ in range(n)]
        self.dependents: list[list[int]] = [[] for _ in range(n)]
        #: Dependencies not completed yet; a step is ready at 0 (one with `when` also counts those that
        #: failed or were skipped: it waits for them to finish, not to complete).
        self.waiting = [0] * n
        self.in_ready = [False] * n
        #: Steps whose `when` held, or whose `for_each` list is known, in this run.
        self.prepared = [False] * n
        #: Steps skipped because their own `when`, or an ancestor's, was false: not failures.
        self.by_condition: set[int] = set()
        #: Per `for_each` step: its pending items, and how many of its items are running.
        self.item_queue: dict[int, deque[int]] = {}
        self.item_running: dict[int, int] = {}
        self.first = _Round(events=list(first_events))
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
            if step.items is not None and step.status == StepStatus.PENDING:
                self._queue_items(i)
        for i, dep_id in missing:  # validation reports these; never wait on a step that does not exist
            if self.steps[i].status == StepStatus.PENDING:
                self._skip(i, f"dependency {dep_id} does not exist", self.first)
                self._settled(i, self.first)
        for i, step in enumerate(self.steps):
            if step.status == StepStatus.PENDING and self.waiting[i] == 0:
                self._push(i)
        for i, step in enumerate(self.steps):
            if step.status == StepStatus.FAILED:
                self._after_failure(i, self.first)

    # -- state transitions (coordinator only) -------------------------------------------------------------

    @property
    def halted(self) -> bool:
        """No new unit may start (a stop after a failure still lets steps with `when` and started
        `for_each` steps go on)."""
        return self.cancel_reason is not None or self.timed_out or self.claim_lost

    def _event(self, kind: str, step: Step | None = None, **data: Any) -> Event:
        return Event(plan_id=self.plan.id, kind=kind, step_id=step.id if step else None, data=data)

    def _push(self, pos: int) -> None:
        if not self.in_ready[pos]:
            self.in_ready[pos] = True
            heapq.heappush(self.ready, (self.steps[pos].index, pos))

    def _queue_items(self, pos: int) -> None:
        items = self.steps[pos].items or []
        self.item_queue[pos] = deque(i for i, item in enumerate(items) if item.status == StepStatus.PENDING)
        self.item_running[pos] = 0

    def _skip(self, pos: int, reason: str, rnd: _Round) -> None:
        step = self.steps[pos]
        set_fields(step, status=StepStatus.SKIPPED, error=reason)
        rnd.changed.append(step)
        rnd.events.append(self._event("step_skipped", step, reason=reason))

    def _settled(self, pos: int, rnd: _Round) -> None:
        """A step finished (completed, failed or skipped): release or skip what depends on it, down the
        graph. A dependent with `when` waits for its dependencies to finish, whatever their outcome; one
        without runs only if they all completed."""
        stack = [pos]
        while stack:
            j = stack.pop()
            done = self.steps[j]
            for k in self.dependents[j]:
                step = self.steps[k]
                if step.status != StepStatus.PENDING:
                    continue
                if done.status == StepStatus.COMPLETED or step.when is not None:
                    self.waiting[k] -= 1
                    if self.waiting[k] == 0:
                        self._push(k)
                    continue
                if j in self.by_condition:
                    self.by_condition.add(k)
                    reason = f"dependency {done.id} was skipped by its condition"
                else:
                    reason = f"dependency {done.id} did not complete"
                self._skip(k, reason, rnd)
                stack.append(k)

    def _after_failure(self, pos: int, rnd: _Round) -> None:
        """Skip everything downstream of a failed step, and stop the plan if `stop_on_error` says so.

        A stop skips every step not started, except those with `when`: they decide for themselves once
        their dependencies have finished (a clean-up step runs `when: steps.deploy.status == 'failed'`).
        """
        failed = self.steps[pos]
        if self.first_failure is None:
            self.first_failure = f"step {failed.id!r} failed: {failed.error}"
        self._settled(pos, rnd)
        if self.options.stop_on_error and not self.options.continue_on_error and self.stopped_by is None:
            self.stopped_by = failed.id
            reason = f"not run: plan stopped after step {failed.id} failed"
            for k, step in enumerate(self.steps):
                if step.status == StepStatus.PENDING and step.when is None:
                    self._skip(k, reason, rnd)
                    self._settled(k, rnd)

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
                while self.running or self.preparing:
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
                    prepared: list[_Prepared] = []
                    while message is not None:
                        if isinstance(message, _Retrying):
                            await self._on_retry(message)
                        elif isinstance(message, _Prepared):
                            prepared.append(message)
                        else:
                            finished.append(message)
                        try:
                            message = receive.receive_nowait()
                        except anyio.WouldBlock:
                            message = None
                    if finished or prepared:
                        self.running -= len(finished)
                        self.preparing -= len(prepared)
                        for done in finished:
                            self.scopes.pop((done.pos, done.item), None)
                        await self._start_ready(tg, finished, prepared)
                if self.running or self.preparing:
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

    async def _start_ready(
        self, tg: TaskGroup, finished: Sequence[_Finished] = (), prepared: Sequence[_Prepared] = ()
    ) -> None:
        """Record `finished` units and `prepared` steps and start every ready unit a slot allows, in ONE
        commit.

        The commit holds the finished units' results and the started units' `running` state, so a result is
        durable before any dependent's call is sent, and a unit is `running` before its own call is sent.
        """
        rnd = self.first if not self.claimed else _Round()
        self._record_finished(finished, rnd)
        self._record_prepared(prepared, rnd)
        self._check_deadline()
        started, to_prepare, units = ([], [], []) if self.halted else self._take_ready(rnd)
        if self.claimed and not units and not to_prepare and not self.running and not self.preparing:
            # The run ends with this round: its outcomes go into the final commit, hooks after it.
            self._last_round = rnd
            return
        if rnd.changed or rnd.events or rnd.items or not self.claimed:
            await self._commit(rnd)
        await self._step_hooks(rnd)
        hooks = self.hooks
        if hooks.on_step_start is not None:
            for pos in started:
                await call_hook(hooks.on_step_start, self.plan, self.steps[pos])
        for pos in to_prepare:
            self.preparing += 1
            tg.start_soon(self._prepare, pos, self._context(pos))
        for pos, item in units:
            scope = anyio.CancelScope()
            self.scopes[(pos, item)] = scope
            if self.halted:  # cancelled while committing: the worker reports it at once, no call is sent
                scope.cancel()
            context = self._context(pos) if self.needs_context[pos] else {}
            if item >= 0 and context:
                items = self.steps[pos].items
                assert items is not None
                context |= {"item": items[item].value, "item_index": item}
            self.running += 1
            if self.workers < self.running:  # a pool of at most `slots` workers: no task spawned per unit
                self.workers += 1
                tg.start_soon(self._worker, self._work_queue)
            self._dispatch.send_nowait((pos, item, scope, context))

    def _context(self, pos: int) -> dict[str, Any]:
        """What the templates of the step at `pos` see: its dependencies (finished) and the inputs."""
        steps = self.steps
        return template_context({steps[j].id: steps[j] for j in self.deps[pos]}, self.plan.input_values)

    def _take_ready(self, rnd: _Round) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """Take the ready work that fits in the free slots, lowest step index first (in memory; the caller
        commits): returns the steps started, the steps to prepare, and the units to run."""
        started: list[int] = []
        to_prepare: list[int] = []
        units: list[tuple[int, int]] = []
        now = utcnow()
        while self.ready and self.running + len(units) < self.slots:
            _, pos = self.ready[0]
            step = self.steps[pos]
            if step.status not in (StepStatus.PENDING, StepStatus.RUNNING):
                self._pop()
                continue
            if not self.prepared[pos] and (step.when is not None or (step.for_each and step.items is None)):
                self._pop()
                to_prepare.append(pos)
                continue
            if step.for_each is None:
                self._pop()
                self._start(step, now, rnd)
                started.append(pos)
                units.append((pos, -1))
                continue
            queue = self.item_queue.get(pos)
            if not queue:
                self._pop()
                if not self.item_running.get(pos):
                    if step.status == StepStatus.PENDING:
                        set_fields(step, started_at=now)
                    self._finish_items(pos, rnd)
                continue
            cap = step.max_parallel_items or self.slots
            if self.item_running[pos] >= cap:
                self._pop()  # pushed again when one of its items finishes
                continue
            i = queue.popleft()
            assert step.items is not None
            item = step.items[i]
            set_fields(item, status=StepStatus.RUNNING, error=None)
            rnd.items.append((step, i))
            self.item_running[pos] += 1
            units.append((pos, i))
            if step.status == StepStatus.PENDING:
                self._start(step, now, rnd)
                started.append(pos)
        if started:
            set_fields(self.plan, current_step=self.steps[started[-1]].id, updated_at=now)
        return started, to_prepare, units

    def _pop(self) -> None:
        _, pos = heapq.heappop(self.ready)
        self.in_ready[pos] = False

    def _start(self, step: Step, now: Any, rnd: _Round) -> None:
        set_fields(step, status=StepStatus.RUNNING, started_at=now, error=None)
        rnd.changed.append(step)
        rnd.events.append(self._event("step_started", step))

    async def _on_retry(self, message: _Retrying) -> None:
        step = self.steps[message.pos]
        items: list[tuple[Step, int]] = []
        if message.item >= 0:
            assert step.items is not None
            set_fields(step.items[message.item], retry_count=message.retry, error=message.error)
            items.append((step, message.item))
            kind, extra = "item_retry", {"item": message.item}
        else:
            set_fields(step, retry_count=message.retry, error=message.error)
            kind, extra = "step_retry", {}
        set_fields(self.plan, updated_at=utcnow())
        event = self._event(
            kind,
            step,
            retry=message.retry,
            error=message.error,
            delay_ms=int(message.delay_s * 1000),
            **extra,
        )
        try:
            await self._commit(_Round(changed=[] if items else [step], events=[event], items=items))
        finally:
            message.ack.set()

    def _record_finished(self, batch: Sequence[_Finished], rnd: _Round) -> None:
        """Apply finished units' outcomes in memory and release what depends on them. The caller commits
        before any released dependent starts."""
        if not batch:
            return
        now = utcnow()
        set_fields(self.plan, updated_at=now)
        for message in batch:
            if message.item >= 0:
                self._record_item(message, now, rnd)
                continue
            pos = message.pos
            step = self.steps[pos]
            duration_ms = _ms_between(step.started_at, now)
            rnd.changed.append(step)
            if message.result is not None:
                set_fields(
                    step,
                    completed_at=now,
                    duration_ms=duration_ms,
                    status=StepStatus.COMPLETED,
                    result=message.result,
                    error=None,
                )
                rnd.events.append(self._event("step_completed", step, duration_ms=step.duration_ms))
                rnd.completed.append(pos)
                self._settled(pos, rnd)
                continue
            set_fields(step, completed_at=now, duration_ms=duration_ms)
            if message.cancelled and self.cancel_reason is not None:
                self._skip(pos, self.cancel_reason, _Round(events=rnd.events))
            elif message.cancelled:
                self._fail(step, "total timeout exceeded" if self.timed_out else INTERRUPTED_ERROR, rnd)
            else:
                self._fail(step, message.error or "failed", rnd)
                self._after_failure(pos, rnd)

    def _record_item(self, message: _Finished, now: Any, rnd: _Round) -> None:
        pos, i = message.pos, message.item
        step = self.steps[pos]
        assert step.items is not None
        item = step.items[i]
        self.item_running[pos] -= 1
        rnd.items.append((step, i))
        if message.result is not None:
            set_fields(item, status=StepStatus.COMPLETED, result=message.result, error=None)
            rnd.events.append(self._event("item_completed", step, item=i))
        else:
            if message.cancelled and self.cancel_reason is not None:
                status, error = StepStatus.SKIPPED, self.cancel_reason
            elif message.cancelled:
                status = StepStatus.FAILED
                error = "total timeout exceeded" if self.timed_out else INTERRUPTED_ERROR
            else:
                status, error = StepStatus.FAILED, message.error or "failed"
            set_fields(item, status=status, error=error)
            rnd.events.append(self._event("item_failed", step, item=i, error=error, retries=item.retry_count))
        if self.halted:
            return  # the step's end is decided by `settle`
        if self.item_queue[pos]:
            self._push(pos)
        elif not self.item_running[pos]:
            self._finish_items(pos, rnd)

    def _finish_items(self, pos: int, rnd: _Round) -> None:
        """Every item of a `for_each` step has finished: the step completes with the list of their results
        (in item order), or fails if an item failed and failures are not allowed."""
        step = self.steps[pos]
        items = step.items or []
        now = utcnow()
        values = [item.result.value if item.result is not None else None for item in items]
        bad = [i for i, item in enumerate(items) if item.status != StepStatus.COMPLETED]
        set_fields(
            step, completed_at=now, duration_ms=_ms_between(step.started_at, now), retry_count=0, error=None
        )
        rnd.changed.append(step)
        if bad and not step.allow_item_failures:
            first = items[bad[0]]
            error = (
                f"{len(bad)} of {len(items)} items failed; item {bad[0]} ({_short(first.value)}): "
                f"{first.error}"
            )
            self._fail(step, error, rnd)
            self._after_failure(pos, rnd)
            return
        result = StepResult(text=json.dumps(values, default=str), structured=values)
        listed = ", ".join(map(str, bad[:20])) + (", ..." if len(bad) > 20 else "")
        note = f"{len(bad)} of {len(items)} items failed (allowed): items {listed}" if bad else None
        set_fields(step, status=StepStatus.COMPLETED, result=result, error=note)
        rnd.events.append(self._event("step_completed", step, duration_ms=step.duration_ms))
        rnd.completed.append(pos)
        self._settled(pos, rnd)

    def _record_prepared(self, batch: Sequence[_Prepared], rnd: _Round) -> None:
        for message in batch:
            pos = message.pos
            step = self.steps[pos]
            if step.status != StepStatus.PENDING or self.halted:
                continue  # skipped meanwhile (a stop), or the run is ending: `settle` decides
            if message.error is not None:
                rnd.changed.append(step)
                self._fail(step, message.error, rnd)
                self._after_failure(pos, rnd)
            elif not message.run:
                self.by_condition.add(pos)
                self._skip(pos, message.reason or CONDITION_FALSE, rnd)
                self._settled(pos, rnd)
            else:
                self.prepared[pos] = True
                if message.items is not None:
                    step.items = [StepItem(value=v) for v in message.items]
                    rnd.items.extend((step, i) for i in range(len(message.items)))
                    self._queue_items(pos)
                self._push(pos)

    async def _step_hooks(self, rnd: _Round) -> None:
        hooks = self.hooks  # a missing hook costs no coroutine per step
        if hooks.on_step_complete is not None:
            for pos in rnd.completed:
                await call_hook(hooks.on_step_complete, self.plan, self.steps[pos])
        if hooks.on_step_failed is not None:
            for step in rnd.failed:
                await call_hook(hooks.on_step_failed, self.plan, step, StepError(step.error or "failed"))

    async def _commit(self, rnd: _Round) -> None:
        if self.claim_lost:  # the plan may belong to another process now: write nothing more
            return
        if not self.claimed:  # the first commit: the claim, and the plan whole
            holder = await self.store.start_run(self.plan, rnd.events, self.owner, self.stale_after)
            if holder is not None:
                raise PlanClaimedError(self.plan.id, holder.owner)
            self.claimed = True
            return
        try:
            await self.store.save_transition(self.plan, rnd.changed, rnd.events, items=rnd.items)
        except PlanConflictError:
            # Someone else wrote the plan while this run held it: only a takeover does that.
            self._lose_claim()
            raise

    def _lose_claim(self) -> None:
        logger.error("plan %r: lost the execution claim; stopping the run", self.plan.id)
        self.claim_lost = True
        self._cancel_running()

    def _fail(self, step: Step, error: str, rnd: _Round) -> None:
        set_fields(step, status=StepStatus.FAILED, error=error)
        rnd.events.append(self._event("step_failed", step, error=error, retries=step.retry_count))
        rnd.failed.append(step)

    # -- workers ------------------------------------------------------------------------------------------

    async def _prepare(self, pos: int, context: dict[str, Any]) -> None:
        """Render the step's `when` and then its `for_each` (off the event loop) and report what they say."""
        step = self.steps[pos]
        message = _Prepared(pos)
        field_name = "when"
        try:
            if step.when is not None and not truthy(
                await render_off_loop(condition_template(step.when), context)
            ):
                message.run = False
                message.reason = f"{CONDITION_FALSE}{step.when}"
            elif step.for_each is not None and step.items is None:
                field_name = "for_each"
                message.items = _item_list(await render_off_loop(step.for_each, context))
        except StepError as exc:
            message.error = f"{field_name}: {exc}"
        except (
            Exception
        ) as exc:  # a template's filter raised something unforeseen: the step fails, not the run
            message.error = f"{field_name}: {type(exc).__name__}: {exc}"
        self._report(message)

    async def _worker(self, work: MemoryObjectReceiveStream[_Work]) -> None:
        while True:
            try:  # work already queued is taken without the checkpoint `receive()` makes first
                pos, item, scope, context = work.receive_nowait()
            except anyio.WouldBlock:
                try:
                    pos, item, scope, context = await work.receive()
                except anyio.EndOfStream:
                    return
            except anyio.EndOfStream:
                return
            await self._work(pos, item, scope, context)

    async def _work(self, pos: int, item: int, scope: anyio.CancelScope, context: dict[str, Any]) -> None:
        step = self.steps[pos]
        outcome = _Finished(pos, item)
        if scope.cancel_called:  # cancelled before it started: send nothing (a tool may act before awaiting)
            outcome.cancelled = True
            self._report(outcome)
            return
        with scope:
            try:
                params = (  # a template may work for its whole time budget: off the event loop
                    await render_off_loop(step.parameters, context)
                    if self.templated[pos]
                    else step.parameters
                )
                if self.templated[pos]:  # the rest were checked against this catalog when the run began
                    check_parameters(step, self.catalog.get(step.tool_name), params)
                outcome.result = await call_step(
                    self.provider,
                    step,
                    params,
                    step_timeout_ms=self.options.step_timeout_ms,
                    backoff=self.options.retry_backoff,
                    on_retry=functools.partial(self._announce_retry, pos, item),
                    check=functools.partial(self._check, step, context) if step.fail_if else None,
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

    @staticmethod
    async def _check(step: Step, context: dict[str, Any], result: StepResult) -> None:
        """The step's `fail_if` on one attempt's result: true fails the attempt (and it is retried)."""
        assert step.fail_if is not None
        try:
            failed = truthy(
                await render_off_loop(
                    condition_template(step.fail_if), {**context, "result": ResultView(result)}
                )
            )
        except TemplateError as exc:
            raise TemplateError(f"fail_if: {exc}") from exc
        if failed:
            raise CheckFailedError(f"check failed: {step.fail_if}")

    def _report(self, outcome: _Finished | _Prepared) -> None:
        assert self._send is not None
        try:
            self._send.send_nowait(outcome)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # the coordinator gave up on this call (grace expired)

    async def _announce_retry(self, pos: int, item: int, retry: int, error: str, delay_s: float) -> None:
        message = _Retrying(pos, item, retry, error, delay_s)
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

    def settle(self, exc: BaseException | None, rnd: _Round) -> None:
        """Bring every step and the plan to a final state, recording what changed in `rnd`."""
        interrupted = set(self.interrupted)
        for pos, step in enumerate(self.steps):
            if step.status == StepStatus.RUNNING:
                rnd.changed.append(step)
                if step.items is not None and self._settle_items(step, rnd):
                    interrupted.add(step.id)
                if self.cancel_reason is not None:
                    self._skip(pos, self.cancel_reason, _Round(events=rnd.events))
                elif self.timed_out:
                    self._fail(step, "total timeout exceeded", _Round(events=rnd.events))
                elif step.items is not None and step.id not in interrupted:
                    self._fail(step, self._not_run_reason(pos, exc), _Round(events=rnd.events))
                else:
                    self._fail(step, INTERRUPTED_ERROR, _Round(events=rnd.events))
                    interrupted.add(step.id)
            elif step.status == StepStatus.PENDING:
                self._skip(pos, self._not_run_reason(pos, exc), rnd)
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
        rnd.events.append(self._event(f"plan_{status.value}", status=status.value, error=error))

    def _settle_items(self, step: Step, rnd: _Round) -> bool:
        """The running items of a `for_each` step the run is leaving; True if any call's outcome is
        unknown (its item is failed as interrupted)."""
        unknown = False
        for i, item in enumerate(step.items or []):
            if item.status != StepStatus.RUNNING:
                continue
            rnd.items.append((step, i))
            if self.cancel_reason is not None:
                set_fields(item, status=StepStatus.SKIPPED, error=self.cancel_reason)
            elif self.timed_out:
                set_fields(item, status=StepStatus.FAILED, error="total timeout exceeded")
            else:
                set_fields(item, status=StepStatus.FAILED, error=INTERRUPTED_ERROR)
                unknown = True
        return unknown

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
        if completed + len(self.by_condition) == len(self.steps):  # a step skipped by condition is no failure
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
        """Commit the final state with the rendered outputs (shielded, bounded), release the claim, call
        `on_plan_complete`."""
        if not self.claimed:  # refused (claimed elsewhere) or stopped before the first commit: wrote nothing
            self.done.set()
            return
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + FINAL_SAVE_TIMEOUT_S
            rnd = self._last_round or _Round()
            self.settle(exc, rnd)
            if self.plan.outputs and not self.claim_lost:
                await self._render_outputs()
            if not self.claim_lost:
                try:
                    await self.store.save_transition(
                        self.plan, rnd.changed, rnd.events, items=rnd.items, release=self.owner
                    )
                except Exception:
                    logger.exception("plan %r: could not save the final state", self.plan.id)
                    await self._release_anyway()
            await self._step_hooks(rnd)
            await call_hook(self.hooks.on_plan_complete, self.plan)
        if scope.cancelled_caught:
            logger.error(
                "plan %r: the final save did not finish in %.0f s", self.plan.id, FINAL_SAVE_TIMEOUT_S
            )
        self.done.set()

    async def _render_outputs(self) -> None:
        """Render the plan's outputs over what completed (each within the template limits, all within
        `OUTPUTS_TIME_S`); one that cannot be rendered gets its error instead."""
        done = {s.id: s for s in self.steps if s.status == StepStatus.COMPLETED}
        context = template_context(done, self.plan.input_values)
        values: dict[str, Any] = {}
        errors: dict[str, str] = {}
        with anyio.move_on_after(OUTPUTS_TIME_S):
            for name, text in self.plan.outputs.items():
                missing = sorted(analyse_template(text).refs - done.keys()) if is_template(text) else []
                if missing:
                    errors[name] = "; ".join(self._not_completed(ref) for ref in missing)
                    continue
                try:
                    values[name] = await render_off_loop(text, context)
                except StepError as exc:
                    errors[name] = str(exc)
        for name in self.plan.outputs:
            if name not in values and name not in errors:
                errors[name] = f"not rendered: the outputs took longer than {OUTPUTS_TIME_S:g} s"
        set_fields(self.plan, output_values=values, output_errors=errors)

    def _not_completed(self, step_id: str) -> str:
        pos = self.pos_of.get(step_id)
        if pos is None:
            return f"step {step_id!r} does not exist"
        step = self.steps[pos]
        return f"step {step_id!r} did not complete ({step.status.value}: {step.error or 'no error'})"
