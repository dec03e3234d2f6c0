"""Executor benchmarks; prints measured numbers and ratios in one run (nothing is asserted).

    python bench/bench_executor.py [--quick]

(a) per-step overhead of executing N no-op steps with durable persistence (PlanStore on a file, two
    commits per step) against the floor: the same number of bare sqlite3 commits of a comparable row,
    with the same journal settings (WAL, synchronous=NORMAL). Goal <= 2x.
(b) makespan of a 100-wide DAG of sleeping steps against its critical path. Goal within 5%.
(c) a 10,000-step plan: validate + execute + summarise with no-op tools; time and peak memory
    (tracemalloc) at 1,000 / 5,000 / 10,000 steps, with growth ratios. Goal: linear.
"""

from __future__ import annotations

import gc
import heapq
import sqlite3
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import anyio

from mcp_planner import ExecutionPlan, Executor, MemoryStore, PlanStore, Step
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


# -- (a) overhead per step vs bare commits -----------------------------------------------------------------


def bare_commit_floor(path: Path, commits: int, row: str) -> tuple[float, float]:
    """(wall, cpu) seconds per commit of one upserted row: sqlite3 in-process, WAL + synchronous=NORMAL."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(
        "CREATE TABLE steps (plan_id TEXT, step_id TEXT, status TEXT, data TEXT, "
        "PRIMARY KEY (plan_id, step_id))"
    )
    upsert = (
        "INSERT INTO steps VALUES (?, ?, ?, ?) ON CONFLICT (plan_id, step_id) DO UPDATE SET "
        "status = excluded.status, data = excluded.data"
    )
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(commits):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(upsert, ("plan", f"step-{i // 2}", "running" if i % 2 == 0 else "completed", row))
        conn.execute("COMMIT")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    conn.close()
    return wall / commits, cpu / commits


async def aiosqlite_commit_floor(path: Path, commits: int, row: str) -> float:
    """Wall seconds per commit of the same upsert through aiosqlite, the driver the store is built on."""
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
        wall = time.perf_counter()
        for i in range(commits):  # one transaction per commit, as the store does: BEGIN, write, COMMIT
            await conn.execute("BEGIN IMMEDIATE")
            await conn.execute(upsert, ("plan", f"step-{i // 2}", "running", row))
            await conn.execute("COMMIT")
        return (time.perf_counter() - wall) / commits


class CountingStore:
    """Counts the transactions the executor commits, passing everything to the real store."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.commits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def save_plan(self, plan: ExecutionPlan, events: Any = ()) -> None:
        self.commits += 1
        await self.inner.save_plan(plan, events)

    async def save_transition(self, plan: ExecutionPlan, steps: Any, events: Any = ()) -> None:
        self.commits += 1
        await self.inner.save_transition(plan, steps, events)


async def executor_per_step(store: Store, n: int) -> tuple[float, float]:
    """(wall, cpu) seconds per step of executing `n` independent no-op steps one at a time."""
    plan = chain_plan(n)
    wall, cpu = time.perf_counter(), time.process_time()
    await Executor({"noop": noop}, store).execute(plan)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert plan.status.value == "completed", plan.status
    return wall / n, cpu / n


class NullStore(MemoryStore):
    """Commits nothing: isolates the executor's own cost."""

    async def save_transition(self, plan: ExecutionPlan, steps: Any, events: Any = ()) -> None:
        return None


async def bench_overhead(tmp: Path, n: int) -> list[tuple[str, str]]:
    step_row = Step(id="s1", tool_name="noop", parameters={"i": 1}, status="completed").model_dump_json()
    runs = []
    commits = 0
    for k in range(3):
        async with PlanStore.open(tmp / f"exec{k}.db") as store:
            counting = CountingStore(store)
            runs.append(await executor_per_step(counting, n))  # type: ignore[arg-type]
            commits = counting.commits
    per_step = commits / n
    exec_wall = min(r[0] for r in runs)
    exec_cpu = min(r[1] for r in runs)
    floors = [bare_commit_floor(tmp / f"floor{k}.db", commits, step_row) for k in range(3)]
    floor_wall = min(f[0] for f in floors)
    floor_cpu = min(f[1] for f in floors)
    aio = min([await aiosqlite_commit_floor(tmp / f"aio{k}.db", commits, step_row) for k in range(3)])
    null = [await executor_per_step(NullStore(), n) for _ in range(3)]
    null_wall = min(r[0] for r in null)
    naive = 2 * floor_wall  # a step stored `running`, then `completed`: two commits
    return [
        ("steps (sequential, no-op tool)", f"{n}"),
        ("commits the executor made, per step", f"{per_step:.2f} (a result and the next start share one)"),
        ("executor + PlanStore, per step", f"{exec_wall * 1e6:.0f} us wall, {exec_cpu * 1e6:.0f} us cpu"),
        ("  of which the executor alone (no store)", f"{null_wall * 1e6:.0f} us wall"),
        ("bare sqlite3 commit", f"{floor_wall * 1e6:.0f} us wall, {floor_cpu * 1e6:.0f} us cpu"),
        ("bare aiosqlite commit (BEGIN, upsert, COMMIT)", f"{aio * 1e6:.0f} us wall"),
        (
            "RATIO per step / same number of bare sqlite3 commits (goal <= 2x)",
            f"{exec_wall / (per_step * floor_wall):.2f}x",
        ),
        ("RATIO per step / 2 bare sqlite3 commits (running + completed)", f"{exec_wall / naive:.2f}x"),
        (
            "RATIO per step / same number of bare aiosqlite commits",
            f"{exec_wall / (per_step * aio):.2f}x",
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


# -- (c) scaling to 10,000 steps ---------------------------------------------------------------------------


async def scaling_run(n: int, store: Store, *, trace: bool) -> tuple[float, float, float]:
    """validate + execute + summarise `n` chained no-op steps: (wall s, cpu s, peak MB or 0)."""
    plan = chain_plan(n, independent=False)
    gc.collect()
    if trace:
        tracemalloc.start()
    wall, cpu = time.perf_counter(), time.process_time()
    problems = plan.validate({"noop": None})
    assert not problems, problems[:3]
    await Executor({"noop": noop}, store).execute(plan)
    summary = plan.summary()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = 0.0
    if trace:
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    assert summary.completed == n
    return wall, cpu, peak


async def bench_scaling(sizes: list[int], tmp: Path) -> list[tuple[str, str]]:
    rows = []
    for kind in ("memory", "sqlite"):
        base: tuple[float, float, float] | None = None
        for n in sizes:
            if kind == "memory":
                wall, cpu, _ = await scaling_run(n, MemoryStore(), trace=False)
                _, _, peak = await scaling_run(n, MemoryStore(), trace=True)
            else:
                async with PlanStore.open(tmp / f"scale{n}.db") as store:
                    wall, cpu, _ = await scaling_run(n, store, trace=False)
                async with PlanStore.open(tmp / f"scale{n}m.db") as store:
                    _, _, peak = await scaling_run(n, store, trace=True)
            if base is None:
                base = (wall, cpu, peak)
            rows.append(
                (
                    f"{kind} store, {n} steps",
                    f"{wall:.2f} s wall, {cpu:.2f} s cpu ({cpu / n * 1e6:.0f} us/step), peak {peak:.1f} MB | "
                    f"x{n // sizes[0]} steps: cpu x{cpu / base[1]:.1f}, memory x{peak / base[2]:.1f}",
                )
            )
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
            "(a) per-step overhead, durable (PlanStore) vs bare sqlite3 commits",
            await bench_overhead(tmp, 300 if quick else 1000),
        )
        for sleep_ms in (50.0, 200.0):  # the fixed cost per step weighs less against longer calls
            table("(b) wide DAG makespan vs critical path", await bench_makespan(sleep_ms, 3, tmp))
        sizes = [1000, 5000] if quick else [1000, 5000, 10000]
        table(
            "(c) validate + execute + summarise, time and peak memory (tracemalloc)",
            await bench_scaling(sizes, tmp),
        )


if __name__ == "__main__":
    anyio.run(main)
