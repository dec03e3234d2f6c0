"""In-process tools for the executor tests, coordinated with anyio events (no sleeps)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import anyio

from mcp_planner import ExecutionPlan, StepResult
from mcp_planner.engine.tools import ToolInfo
from mcp_planner.errors import ParameterError, ToolCallError, ToolNotFoundError


class Tools:
    """A `ToolProvider` with tools the test can watch, hold and release.

    - `hold {"key"}`: records the call, sets `started[key]`, waits for `release[key]`.
    - `ok {...}`: returns its parameters.
    - `fail {"message"}`: a retryable tool error, every time.
    - `flaky {"key", "failures"}`: fails `failures` times per key, then returns its parameters.
    - `fatal {}`: a non-retryable error.
    - `hang {}`: never returns (until cancelled).
    - `slot {}`: counts concurrent calls; when `busy_at` calls run at once sets `all_busy`, then waits `gate`.
    """

    def __init__(self, schemas: Mapping[str, dict[str, Any]] | None = None, safe: set[str] | None = None):
        self.started: defaultdict[str, anyio.Event] = defaultdict(anyio.Event)
        self.release: defaultdict[str, anyio.Event] = defaultdict(anyio.Event)
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.cancelled: list[str] = []
        self.active = 0
        self.max_active = 0
        self.busy_at = 2
        self.all_busy = anyio.Event()
        self.gate = anyio.Event()
        self._failures: defaultdict[str, int] = defaultdict(int)
        names = ["hold", "ok", "fail", "flaky", "fatal", "hang", "slot"]
        schemas = schemas or {}
        safe = safe or set()
        self._catalog = {
            n: ToolInfo(
                name=n, input_schema=schemas.get(n), annotations={"readOnlyHint": True} if n in safe else {}
            )
            for n in names
        }

    def catalog(self) -> Mapping[str, ToolInfo]:
        return self._catalog

    def called(self, tool: str | None = None) -> list[dict[str, Any]]:
        return [p for t, p in self.calls if tool is None or t == tool]

    async def call(self, tool_name: str, parameters: dict[str, Any]) -> StepResult:
        self.calls.append((tool_name, parameters))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._call(tool_name, parameters)
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(str(parameters.get("key", tool_name)))
            raise
        finally:
            self.active -= 1

    async def _call(self, tool_name: str, parameters: dict[str, Any]) -> StepResult:
        if tool_name == "hold":
            key = parameters["key"]
            self.started[key].set()
            await self.release[key].wait()
            return StepResult.from_value({"key": key})
        if tool_name == "ok":
            return StepResult.from_value(parameters)
        if tool_name == "fail":
            raise ToolCallError(parameters.get("message", "boom"))
        if tool_name == "flaky":
            key = parameters["key"]
            if self._failures[key] < parameters["failures"]:
                self._failures[key] += 1
                raise ToolCallError(f"flaky failure {self._failures[key]}")
            return StepResult.from_value(parameters)
        if tool_name == "fatal":
            raise ParameterError("the tool refused its parameters")
        if tool_name == "hang":
            self.started[parameters.get("key", "hang")].set()
            await anyio.sleep_forever()
        if tool_name == "slot":
            if self.active >= self.busy_at:
                self.all_busy.set()
            await self.gate.wait()
            return StepResult.from_value(parameters)
        raise ToolNotFoundError(f"no tool {tool_name!r}")


def new_plan(*, parallel: int = 0, **options: Any) -> ExecutionPlan:
    """A draft plan needing no approval; `parallel` > 0 turns on parallel execution with that many slots."""
    plan = ExecutionPlan.new("test plan")
    plan.options.require_approval = False
    if parallel:
        plan.options.allow_parallel = True
        plan.options.max_parallel_steps = parallel
    for name, value in options.items():
        setattr(plan.options, name, value)
    return plan


def statuses(plan: ExecutionPlan) -> dict[str, str]:
    return {s.id: s.status.value for s in plan.steps}
