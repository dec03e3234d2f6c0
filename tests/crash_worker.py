"""A process for the crash test: runs (or resumes) a 50-step DAG plan on a real SQLite file.

    python tests/crash_worker.py run DB LOG PLAN_ID HOLD_AFTER
    python tests/crash_worker.py resume DB LOG PLAN_ID

A PLAN_ID starting with "items" runs a `for_each` step of 40 items instead (`build_items_plan`).

Every tool call appends "<step_id>" to LOG (fsync'd) before it returns, so the log records every call the
plan made, including calls whose outcome a kill left uncommitted. In `run`, call number HOLD_AFTER and every
later call never return, so the plan is certainly still executing when the test, having seen HOLD_AFTER
calls in the log, kills the process with SIGKILL; the test does this at different points and checks what
`resume` does.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio

from mcp_planner import ExecutionPlan, Executor
from mcp_planner.store import open_store

STEPS = 50
WIDTH = 5


ITEMS = 40


def build_plan(plan_id: str) -> ExecutionPlan:
    """Ten layers of five; each step depends on one or two steps of the layer before and uses a result.

    A plan id starting with "items" gives instead one `for_each` step of 40 items, then a step using its
    result."""
    if plan_id.startswith("items"):
        return build_items_plan(plan_id)
    plan = ExecutionPlan(id=plan_id, description="crash test: 50 steps")
    plan.options.require_approval = False
    plan.options.allow_parallel = True
    plan.options.max_parallel_steps = 4
    for n in range(STEPS):
        layer, col = divmod(n, WIDTH)
        params: dict[str, Any] = {"id": f"s{n}"}
        if layer:
            first = (layer - 1) * WIDTH + col
            params["prev"] = f"{{{{ steps.s{first}.result.id }}}}"
            if col % 2:
                params["also"] = f"{{{{ steps.s{(layer - 1) * WIDTH + (col + 1) % WIDTH}.result.id }}}}"
        plan.add_step("work", f"step {n}", params, step_id=f"s{n}")
    return plan


def build_items_plan(plan_id: str) -> ExecutionPlan:
    plan = ExecutionPlan(id=plan_id, description="crash test: 40 items")
    plan.options.require_approval = False
    plan.options.allow_parallel = True
    plan.options.max_parallel_steps = 4
    each = plan.add_step("work", "each item", {"id": "i{{ item }}"}, step_id="each")
    each.for_each = list(range(ITEMS))
    plan.add_step(
        "work", "after", {"id": "after", "prev": "{{ steps.each.result | length }}"}, step_id="after"
    )
    return plan


def make_tool(log_path: str, hold_after: int | None = None) -> Any:
    calls = 0

    async def work(params: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        await anyio.sleep(0.002)  # spread the run so kills land at different points
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{params['id']}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        calls += 1
        if hold_after is not None and calls >= hold_after:
            await anyio.sleep_forever()
        return {"id": params["id"], "prev": params.get("prev")}

    return work


async def main(mode: str, db: str, log_path: str, plan_id: str, hold_after: str = "") -> int:
    async with open_store(db) as store:
        if mode == "run":
            executor = Executor({"work": make_tool(log_path, int(hold_after))}, store)
            summary = await executor.execute(build_plan(plan_id))
        else:
            executor = Executor({"work": make_tool(log_path)}, store)
            summary = await executor.resume(await store.get_plan(plan_id), rerun_interrupted=True)
    print(summary.status.value)
    return 0 if summary.status.value == "completed" else 1


if __name__ == "__main__":
    sys.exit(anyio.run(main, *sys.argv[1:6]))
