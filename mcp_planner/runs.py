"""Plan executions running in the background of a `PlannerService`, and the callers waiting on them.

Each execution runs in its own task of one task group, so `execute_plan` can return after `wait_seconds`
while the plan keeps running; a caller still waiting gets progress callbacks after each step.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Self

import anyio
from anyio.abc import TaskGroup

from mcp_planner.errors import PlannerError, PlanStateError, StepError
from mcp_planner.plan.model import ExecutionPlan, PlanSummary, Step

if TYPE_CHECKING:
    from mcp_planner.engine.executor import Executor

log = logging.getLogger("mcp_planner.runs")

#: Called after each step starts, completes or fails: `(summary, step)`; plain or async.
ProgressCallback = Callable[[PlanSummary, Step | None], Awaitable[None] | None]
#: Builds the executor of one run from the hooks the run needs: `(on_step, on_plan_complete)`.
ExecutorFactory = Callable[
    [Callable[[ExecutionPlan, Step], Awaitable[None]], Callable[[ExecutionPlan], Awaitable[None]]], "Executor"
]
#: What a run does with its executor: `execute` or `resume`.
RunBody = Callable[["Executor", ExecutionPlan], Awaitable[PlanSummary]]

#: How long a caller with `wait_seconds=0` still waits for the run to start, so that refusals (claimed by
#: another process, not approved) reach the caller instead of being lost in the background.
START_WAIT = 5.0
#: How long a progress listener may take before it is skipped (a slow client must not stall the run).
LISTENER_WAIT = 2.0


@dataclass(eq=False)
class BackgroundRun:
    """One execution in this process: the live plan the executor mutates, and who is listening."""

    plan: ExecutionPlan
    executor: Executor | None = None
    started: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    summary: PlanSummary | None = None
    error: Exception | None = None
    listeners: list[ProgressCallback] = field(default_factory=list)

    async def wait(self, wait_seconds: float | None, on_progress: ProgressCallback | None) -> PlanSummary:
        """The summary when the run ends or after `wait_seconds` (None: to the end).

        Raises:
            Exception: what the run raised (a refusal by the executor, typically a `PlannerError`).
        """
        if on_progress is not None:
            self.listeners.append(on_progress)
        try:
            with anyio.move_on_after(wait_seconds):
                await self.done.wait()
            if not self.started.is_set():
                with anyio.move_on_after(START_WAIT):
                    await self.started.wait()
        finally:
            if on_progress in self.listeners:
                self.listeners.remove(on_progress)
        if self.error is not None:
            raise self.error
        return self.summary if self.done.is_set() and self.summary is not None else self.plan.summary()

    async def notify(self, step: Step | None) -> None:
        if not self.listeners:
            return
        summary = self.plan.summary()
        for listener in list(self.listeners):
            try:
                with anyio.move_on_after(LISTENER_WAIT):
                    result = listener(summary, step)
                    if inspect.isawaitable(result):
                        await result
            except Exception:  # a listener that fails (a client gone) stops listening; the run goes on
                log.debug("progress listener failed; dropping it", exc_info=True)
                if listener in self.listeners:
                    self.listeners.remove(listener)


class Runs:
    """The executions running in this process, by plan id. An async context manager: leaving it cancels
    every run (a plan cut short that way is left `executing` or `failed`, and can be resumed)."""

    def __init__(self) -> None:
        self._runs: dict[str, BackgroundRun] = {}
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            self._tg = None

    def __contains__(self, plan_id: str) -> bool:
        return plan_id in self._runs

    def get(self, plan_id: str) -> BackgroundRun | None:
        return self._runs.get(plan_id)

    def start(self, plan: ExecutionPlan, make_executor: ExecutorFactory, body: RunBody) -> BackgroundRun:
        """Start `body(executor, plan)` in the background and return its run.

        Raises:
            PlanStateError: the plan already runs here.
            RuntimeError: used outside `async with`.
        """
        if self._tg is None:
            raise RuntimeError("PlannerService must be entered (async with) before running plans")
        if plan.id in self._runs:
            raise PlanStateError(f"plan {plan.id!r} is already executing: call get_summary to follow it")
        run = BackgroundRun(plan=plan)

        async def on_step(p: ExecutionPlan, step: Step, err: StepError | None = None) -> None:  # all 3 hooks
            run.started.set()
            await run.notify(step)

        async def on_plan_complete(p: ExecutionPlan) -> None:
            run.started.set()

        run.executor = make_executor(on_step, on_plan_complete)
        self._runs[plan.id] = run
        self._tg.start_soon(self._run, run, body, name=f"plan {plan.id}")
        return run

    async def _run(self, run: BackgroundRun, body: RunBody) -> None:
        assert run.executor is not None
        try:
            run.summary = await body(run.executor, run.plan)
        except PlannerError as exc:
            run.error = exc
        except Exception as exc:  # a bug must not take the other runs down; the caller gets a message
            log.exception("execution of plan %r crashed", run.plan.id)
            run.error = exc
        finally:
            self._runs.pop(run.plan.id, None)
            run.started.set()
            run.done.set()
