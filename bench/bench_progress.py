"""No quadratic path: per-step cost of a chain executed through the MCP server with a progress token,
against the library path, at several sizes (SPEC section 10, first goal).

    python bench/bench_progress.py [--sizes 1000,4000,10000] [--rounds 3]

For each size, each round runs the same chain of no-op steps twice on a fresh SQLite file each, in
alternating order:

  library   `Executor(tools, PlanStore).execute(plan)`
  server    `execute_plan` over an in-process `mcp.Client` with a progress callback (the service submits the
            run and follows it, reporting progress; its in-process runner executes it)

Prints the per-step cost of each path (min and median over the rounds) and their ratios per size (goal:
within 1.3x at every size, so the ratio does not grow with the size). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import anyio
from mcp import Client

from mcp_planner.engine.executor import Executor
from mcp_planner.engine.tools import LocalTools
from mcp_planner.plan.model import ExecutionPlan, PlanStatus
from mcp_planner.server.app import build_server
from mcp_planner.service import PlannerService
from mcp_planner.store.sqlite import PlanStore


async def noop(params: dict[str, Any]) -> dict[str, Any]:
    return params


def chain(n: int) -> ExecutionPlan:
    plan = ExecutionPlan.new(f"chain of {n}")
    previous = None
    for i in range(n):
        step = plan.add_step("noop", "", {"i": i}, step_id=f"s{i}")
        if previous is not None:
            step.depends_on = [previous]
        previous = step.id
    plan.options.require_approval = False
    return plan


async def library(db: Path, n: int) -> float:
    async with PlanStore.open(db) as store:
        plan = chain(n)
        start = time.perf_counter()
        await Executor({"noop": noop}, store).execute(plan)
        elapsed = time.perf_counter() - start
    assert plan.status == PlanStatus.COMPLETED
    return elapsed


async def server(db: Path, n: int) -> tuple[float, int]:
    notes = 0

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        nonlocal notes
        notes += 1

    plan = chain(n)
    spec = {
        "description": plan.description,
        "steps": [
            {"id": s.id, "tool_name": s.tool_name, "parameters": s.parameters, "depends_on": s.depends_on}
            for s in plan.steps
        ],
        "options": {"require_approval": False},
    }
    async with PlanStore.open(db) as store, PlannerService(store, LocalTools({"noop": noop})) as service:
        async with Client(build_server(service)) as client:
            created = await client.call_tool("create_plan", spec)
            assert created.structured_content is not None, created
            plan_id = created.structured_content["id"]
            start = time.perf_counter()
            result = await client.call_tool(
                "execute_plan", {"plan_id": plan_id, "wait_seconds": 600}, progress_callback=on_progress
            )
            elapsed = time.perf_counter() - start
    assert result.structured_content is not None, result
    assert result.structured_content["status"] == "completed", result.structured_content["status"]
    return elapsed, notes


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,4000,10000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print("chain of no-op steps, SQLite file, per-step cost (rounds alternate the order)")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            lib: list[float] = []
            srv: list[float] = []
            notes = 0
            for r in range(args.rounds):
                order = ["library", "server"] if r % 2 == 0 else ["server", "library"]
                for path in order:
                    if path == "library":
                        lib.append(await library(Path(tmp) / f"l{n}-{r}.db", n) / n)
                    else:
                        elapsed, notes = await server(Path(tmp) / f"s{n}-{r}.db", n)
                        srv.append(elapsed / n)
            print(
                f"  {n:>6} steps: library min {min(lib) * 1e6:4.0f} median {median(lib) * 1e6:4.0f} us/step; "
                f"server with progress min {min(srv) * 1e6:4.0f} median {median(srv) * 1e6:4.0f} us/step "
                f"({notes} notifications); RATIO min {min(srv) / min(lib):.2f}x median "
                f"{median(srv) / median(lib):.2f}x (goal <= 1.3x)"
            )


if __name__ == "__main__":
    anyio.run(main)
