"""Per-step durable cost of mcp-planner beside its peers, in one process (nothing is asserted).

    .venv/bin/pip install -e '.[peers]'      # langgraph, langgraph-checkpoint-sqlite, dbos
    .venv/bin/python bench/peers/bench_peers.py [--quick] [--steps N] [--rounds R]

The workload for every engine: a sequential chain of N no-op steps (default 300), each step's result
persisted before the next starts, on a fresh SQLite file per run, journal WAL with synchronous=NORMAL:

- planner: `Executor` + `PlanStore.open(path)` (aiosqlite; the store sets WAL + NORMAL itself).
- langgraph: a `StateGraph` of N chained nodes compiled with `SqliteSaver` on a sqlite3 connection we open
  with WAL + NORMAL, one `invoke(..., durability="sync")` per run (a checkpoint is committed per node
  before the next node starts). The sync saver is the goal's basis because it is the faster of the two here.
- langgraph-async: the same graph with `AsyncSqliteSaver` (aiosqlite, the planner's own driver) and
  `ainvoke`: the like-for-like async peer, shown for reference.
- dbos: one workflow calling N `@DBOS.step()` no-op steps (sync: DBOS's async steps cost more here),
  `system_database_url="sqlite:///..."`, launched in-process per run. DBOS opens its own SQLAlchemy
  connections, so a SQLAlchemy `connect` listener sets WAL + NORMAL on each; the values are read back.
- dbos-defaults: the same at DBOS's own SQLite settings (rollback journal, synchronous=FULL), for reference:
  not the same sync level, so not a goal.

Engines alternate in one process, in a rotated order each round, after one small warm-up round. Times cover
only the run itself (graph compile, DBOS launch and schema setup are outside). Goals (SPEC section 10): per
step at least 2x cheaper than LangGraph's SQLite checkpointer and 5x cheaper than DBOS on SQLite.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

import anyio

from mcp_planner import ExecutionPlan, Executor, PlanStore

try:
    import aiosqlite
    import sqlalchemy as sa
    from dbos import DBOS
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    from langgraph.graph import END, START, StateGraph
except ImportError as exc:
    sys.exit(f"bench_peers: {exc.name!r} is not installed; install the extra: pip install -e '.[peers]'")

WAL_NORMAL = "journal_mode=wal, synchronous=NORMAL"
SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
used: dict[str, str] = {}  # engine -> the SQLite settings it ran with, read back where we can


# -- planner ----------------------------------------------------------------------------------------------


async def noop(params: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True}


def chain_plan(n: int) -> ExecutionPlan:
    """As bench/bench_executor.py `chain_plan(n, independent=False)`: each step depends on the one before."""
    plan = ExecutionPlan.new(f"{n} no-op steps")
    plan.options.require_approval = False
    for i in range(n):
        step = plan.add_step("noop", f"step {i}", {"i": i}, step_id=f"s{i}")
        if i:
            step.depends_on = [f"s{i - 1}"]
    return plan


def run_planner(path: Path, n: int) -> float:
    async def go() -> float:
        async with PlanStore.open(path) as store:
            plan = chain_plan(n)
            start = time.perf_counter()
            await Executor({"noop": noop}, store).execute(plan)
            elapsed = time.perf_counter() - start
            assert plan.status.value == "completed", plan.status
            return elapsed

    elapsed = anyio.run(go)
    used["planner"] = WAL_NORMAL + " (set by PlanStore)"
    return elapsed


# -- LangGraph --------------------------------------------------------------------------------------------


class State(TypedDict):
    i: int


def chain_graph(n: int, node: Callable[..., Any]) -> StateGraph[Any]:
    graph = StateGraph(State)
    for k in range(n):
        graph.add_node(f"n{k}", node)
        graph.add_edge(START if k == 0 else f"n{k - 1}", f"n{k}")
    graph.add_edge(f"n{n - 1}", END)
    return graph


def run_langgraph(path: Path, n: int) -> float:
    conn = sqlite3.connect(path, check_same_thread=False)  # as SqliteSaver.from_conn_string, plus pragmas
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        saver = SqliteSaver(conn)
        saver.setup()
        app = chain_graph(n, lambda s: {"i": s["i"] + 1}).compile(checkpointer=saver)
        config: Any = {"configurable": {"thread_id": "bench"}, "recursion_limit": n + 10}
        start = time.perf_counter()
        out = app.invoke({"i": 0}, config, durability="sync")
        elapsed = time.perf_counter() - start
        assert out["i"] == n, out
        used["langgraph"] = read_back(conn.execute, "SqliteSaver, our connection")
    finally:
        conn.close()
    return elapsed


def run_langgraph_async(path: Path, n: int) -> float:
    async def node(s: State) -> dict[str, int]:
        return {"i": s["i"] + 1}

    async def go() -> float:
        async with aiosqlite.connect(path) as conn:
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = NORMAL")
            saver = AsyncSqliteSaver(conn)
            await saver.setup()
            app = chain_graph(n, node).compile(checkpointer=saver)
            config: Any = {"configurable": {"thread_id": "bench"}, "recursion_limit": n + 10}
            start = time.perf_counter()
            out = await app.ainvoke({"i": 0}, config, durability="sync")
            elapsed = time.perf_counter() - start
            assert out["i"] == n, out
            rows = [await conn.execute_fetchall(f"PRAGMA {p}") for p in ("journal_mode", "synchronous")]
            used["langgraph-async"] = describe([next(iter(r))[0] for r in rows], "AsyncSqliteSaver")
            return elapsed

    return anyio.run(go)


# -- DBOS -------------------------------------------------------------------------------------------------


@DBOS.step()
def dbos_step(i: int) -> int:
    return i + 1


@DBOS.workflow()
def dbos_chain(n: int) -> int:
    i = 0
    for _ in range(n):
        i = dbos_step(i)
    return i


def read_back(execute: Callable[[str], Any], note: str) -> str:
    return describe([execute(f"PRAGMA {p}").fetchone()[0] for p in ("journal_mode", "synchronous")], note)


def describe(values: list[Any], note: str) -> str:
    """`values`: what PRAGMA journal_mode and PRAGMA synchronous read back."""
    mode, sync = values
    return f"journal_mode={mode}, synchronous={SYNC_NAMES.get(sync, sync)} ({note})"


@contextmanager
def sqlalchemy_sqlite_connections(set_pragmas: bool) -> Iterator[set[str]]:
    """While open, every new SQLAlchemy connection (DBOS's own) gets WAL + NORMAL if asked; yields what each
    connection ran with."""
    seen: set[str] = set()

    def on_connect(dbapi_conn: Any, record: Any) -> None:
        if set_pragmas:
            dbapi_conn.execute("PRAGMA journal_mode = WAL")
            dbapi_conn.execute("PRAGMA synchronous = NORMAL")
        seen.add(read_back(dbapi_conn.execute, "DBOS's connections"))

    sa.event.listen(sa.engine.Engine, "connect", on_connect)
    try:
        yield seen
    finally:
        sa.event.remove(sa.engine.Engine, "connect", on_connect)


def run_dbos(path: Path, n: int, *, set_pragmas: bool = True) -> float:
    with sqlalchemy_sqlite_connections(set_pragmas) as seen:
        url = f"sqlite:///{path}"
        DBOS(config={"name": "bench-peers", "system_database_url": url, "log_level": "WARNING"})
        DBOS.launch()
        try:
            start = time.perf_counter()
            result = dbos_chain(n)
            elapsed = time.perf_counter() - start
            assert result == n, result
        finally:
            DBOS.destroy()
    used["dbos" if set_pragmas else "dbos-defaults"] = " | ".join(sorted(seen))
    return elapsed


# -- the run ----------------------------------------------------------------------------------------------

ENGINES: dict[str, Callable[[Path, int], float]] = {
    "planner": run_planner,
    "langgraph": run_langgraph,
    "langgraph-async": run_langgraph_async,
    "dbos": run_dbos,
    "dbos-defaults": lambda path, n: run_dbos(path, n, set_pragmas=False),
}
GOALS = {"langgraph": 2.0, "dbos": 5.0}  # same sync level; langgraph-async, dbos-defaults: reference only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 50 steps, 2 rounds")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    n = args.steps or (50 if args.quick else 300)
    rounds = args.rounds or (2 if args.quick else 7)
    names = list(ENGINES)
    per_step: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in names:  # warm-up: imports, first connections, code paths
            ENGINES[name](tmp / f"warm-{name}.db", 10)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                per_step[name].append(ENGINES[name](tmp / f"{name}-{r}.db", n) / n)
    print(f"\n{n}-step sequential chain of no-op steps, durable per step, SQLite file; {rounds} rounds")
    for name in names:
        print(f"  {name:<16} {used[name]}")
    mins = {name: min(v) for name, v in per_step.items()}
    medians = {name: statistics.median(v) for name, v in per_step.items()}
    print(f"\n  {'engine':<16} {'min ms/step':>12} {'median':>8}   {'ratio/planner min':>17} {'median':>7}")
    for name in names:
        ratio = f"{mins[name] / mins['planner']:>16.2f}x {medians[name] / medians['planner']:>6.2f}x"
        print(f"  {name:<16} {mins[name] * 1e3:>12.3f} {medians[name] * 1e3:>8.3f}   {ratio}")
    print()
    for peer, goal in GOALS.items():
        lo, mid = mins[peer] / mins["planner"], medians[peer] / medians["planner"]
        verdict = "met" if min(lo, mid) >= goal else "NOT met"
        print(f"  GOAL {peer} / planner >= {goal:.0f}x: min {lo:.2f}x, median {mid:.2f}x -> {verdict}")


if __name__ == "__main__":
    main()
