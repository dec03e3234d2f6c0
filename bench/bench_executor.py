"""Executor benchmarks; prints measured numbers and ratios in one run (nothing is asserted).

    python bench/bench_executor.py [--quick]

(a) Durable cost per step: a 300-step chain of no-op steps executed with a `PlanStore` on a file, against
    one bare aiosqlite commit of a step-like row (one thread hop, WAL, synchronous=NORMAL), alternating, min
    and median (goal <= 2.5x); and the write transactions a one-step plan and the chain make (goal <= 3
    for a one-step plan).
(b) Makespan of wide DAGs of in-process sleeping steps against the ideal of the executor's own policy
    (within 5%): the engine alone; bench_downstream measures the same against real downstream calls.

Large plans (100k steps) are bench_scale.py's.
"""

from __future__ import annotations

import heapq
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

from mcp_planner import ExecutionPlan, Executor, MemoryStore, PlanStore, Step
from mcp_planner.plan.model import StepStatus
from mcp_planner.store.base import Store


async def noop(params: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True}


def chain_plan(n: int, *, independent: bool = True) -> ExecutionPlan:
    plan = ExecutionPlan.new(f"{n} no-op steps")
    plan.options.require_approval = False
    for i in range(n):
        step = plan.add_step("noop", f"step {i}", {"i": i}, step_id=f"s{i}")
        if not independent and i:
            step.depends_on = [f"s{i - 1}"]
    return plan


# -- (a) durable cost per step vs one bare aiosqlite commit ----------------------------------------------


async def aiosqlite_commits(path: Path, commits: int, row: str) -> float:
    """Seconds per commit of one step-like row through aiosqlite, the driver the store is built on: one
    statement in autocommit mode, so one thread hop and one transaction each (WAL, synchronous=NORMAL)."""
    import aiosqlite

    async with aiosqlite.connect(path, isolation_level=None) as conn:
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = NORMAL")
        await conn.execute(
            "CREATE TABLE steps (plan_id TEXT, step_id TEXT, status TEXT, data TEXT, "
            "PRIMARY KEY (plan_id, step_id))"
        )
        upsert = (
            "INSERT INTO steps VALUES (?, ?, ?, ?) ON CONFLICT (plan_id, step_id) DO UPDATE SET "
            "status = excluded.status, data = excluded.data"
        )
        start = time.perf_counter()
        for i in range(commits):
            await conn.execute(upsert, ("plan", f"step-{i}", "completed", row))
        return (time.perf_counter() - start) / commits


class CountingStore:
    """Counts the write transactions the executor makes, passing everything to the real store."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def start_run(self, *args: Any, **kwargs: Any) -> Any:
        self.writes += 1
        return await self.inner.start_run(*args, **kwargs)

    async def save_transition(self, *args: Any, **kwargs: Any) -> None:
        self.writes += 1
        await self.inner.save_transition(*args, **kwargs)

    async def save_plan(self, *args: Any, **kwargs: Any) -> None:
        self.writes += 1
        await self.inner.save_plan(*args, **kwargs)

    async def release(self, *args: Any, **kwargs: Any) -> None:
        self.writes += 1
        await self.inner.release(*args, **kwargs)


async def planner_chain(path: Path, n: int) -> tuple[float, int]:
    """(seconds per step, write transactions) of executing a chain of `n` no-op steps durably."""
    async with PlanStore.open(path) as store:
        counting = CountingStore(store)
        plan = chain_plan(n, independent=False)
        start = time.perf_counter()
        await Executor({"noop": noop}, counting).execute(plan)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - start
    assert plan.status.value == "completed", plan.status
    return elapsed / n, counting.writes


def spread(values: list[float]) -> str:
    return f"min {min(values) * 1e6:6.0f} us, median {statistics.median(values) * 1e6:6.0f} us"


async def bench_per_step(tmp: Path, n: int, rounds: int) -> list[tuple[str, str]]:
    row = Step(id="s1", tool_name="noop", parameters={"i": 1}, status=StepStatus.COMPLETED).model_dump_json()
    planner: list[float] = []
    bare: list[float] = []
    writes = 0
    for r in range(rounds):  # alternating, each on a fresh file
        pair = [("planner", tmp / f"p{r}.db"), ("bare", tmp / f"b{r}.db")]
        for kind, path in pair if r % 2 == 0 else pair[::-1]:
            if kind == "planner":
                per_step, writes = await planner_chain(path, n)
                planner.append(per_step)
            else:
                bare.append(await aiosqlite_commits(path, n, row))
    _, one_step = await planner_chain(tmp / "one.db", 1)
    return [
        ("chain of no-op steps, rounds (alternating)", f"{n} steps, {rounds} rounds"),
        ("write transactions: one-step plan (goal <= 3)", f"{one_step}"),
        (f"write transactions: {n}-step chain", f"{writes} ({writes / n:.2f} per step)"),
        ("planner per step (executor + PlanStore)", spread(planner)),
        ("bare aiosqlite commit (one hop, one row)", spread(bare)),
        (
            "RATIO planner per step / bare commit (goal <= 2.5x)",
            f"min {min(planner) / min(bare):.2f}x, median "
            f"{statistics.median(planner) / statistics.median(bare):.2f}x",
        ),
    ]


# -- (b) makespan of a wide DAG vs its critical path ------------------------------------------------------


def diamond(width: int, depth: int) -> ExecutionPlan:
    """root -> `width` chains of `depth` steps -> sink."""
    plan = ExecutionPlan.new("wide DAG")
    plan.options.require_approval = False
    plan.options.allow_parallel = True
    plan.options.max_parallel_steps = 64
    plan.add_step("nap", "root", {}, step_id="root")
    ends = []
    for c in range(width):
        prev = "root"
        for d in range(depth):
            step = plan.add_step("nap", f"chain {c} link {d}", {}, step_id=f"c{c}-{d}")
            step.depends_on = [prev]
            prev = step.id
        ends.append(prev)
    plan.add_step("nap", "sink", {}, step_id="sink").depends_on = ends
    return plan


def ideal_makespan(plan: ExecutionPlan, duration: float) -> float:
    """The makespan of the executor's own policy (lowest ready index first, `slots` at once) at zero cost."""
    slots = plan.options.slots
    index = {s.id: i for i, s in enumerate(plan.steps)}
    waiting = [len(s.depends_on) for s in plan.steps]
    dependents: list[list[int]] = [[] for _ in plan.steps]
    for i, s in enumerate(plan.steps):
        for d in s.depends_on:
            dependents[index[d]].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    running: list[tuple[float, int]] = []
    now = 0.0
    while ready or running:
        while ready and len(running) < slots:
            heapq.heappush(running, (now + duration, heapq.heappop(ready)))
        now, done = heapq.heappop(running)
        for k in dependents[done]:
            waiting[k] -= 1
            if waiting[k] == 0:
                heapq.heappush(ready, k)
    return now


async def timed_run(plan: ExecutionPlan, tools: dict[str, Any], store: Store) -> float:
    p = plan.model_copy(deep=True, update={"id": uuid.uuid4().hex[:12]})  # each run a plan of its own
    start = time.perf_counter()
    await Executor(tools, store).execute(p)
    elapsed = time.perf_counter() - start
    assert p.status.value == "completed", p.status
    return elapsed


async def bench_makespan(sleep_ms: float, depth: int, tmp: Path) -> list[tuple[str, str]]:
    async def nap(params: dict[str, Any]) -> str:
        await anyio.sleep(sleep_ms / 1000)
        return "z"

    tools = {"nap": nap}
    rows = [("step", f"sleeps {sleep_ms:.0f} ms; 64 slots; best of 3")]
    for width in (64, 100):
        plan = diamond(width, depth)
        critical = (depth + 2) * sleep_ms / 1000
        ideal = ideal_makespan(plan, sleep_ms / 1000)
        best = min([await timed_run(plan, tools, MemoryStore()) for _ in range(3)])
        async with PlanStore.open(tmp / f"wide{width}.db") as store:
            durable = min([await timed_run(plan, tools, store) for _ in range(3)])
        name = f"root -> {width} chains x {depth} -> sink ({len(plan.steps)} steps)"
        rows.append(
            (
                name,
                f"critical path {critical * 1000:.0f} ms; ideal with 64 slots {ideal * 1000:.0f} ms",
            )
        )
        rows.append(("  makespan, memory store", f"{best * 1000:.1f} ms"))
        rows.append(("  makespan, PlanStore on a file", f"{durable * 1000:.1f} ms"))
        rows.append(("  RATIO makespan / ideal, memory (goal <= 1.05)", f"{best / ideal:.3f}"))
        rows.append(("  RATIO makespan / ideal, PlanStore (goal <= 1.05)", f"{durable / ideal:.3f}"))
    return rows


def table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n{title}")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")


async def main() -> None:
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        table(
            "(a) durable cost per step vs one bare aiosqlite commit",
            await bench_per_step(tmp, 300, 3 if quick else 9),
        )
        for sleep_ms in (50.0, 200.0):  # the fixed cost per step weighs less against longer calls
            table("(b) wide DAG makespan vs critical path", await bench_makespan(sleep_ms, 3, tmp))


if __name__ == "__main__":
    anyio.run(main)
