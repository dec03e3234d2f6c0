"""Runners scaling out on one PostgreSQL database: 1, 2 and 4 `mcp-planner runner` processes execute 200 small
plans, and a runner SIGKILLed mid-way loses no run and executes none twice.

    python bench/bench_pg_runners.py [--plans 200] [--db postgresql://...]

Without --db it starts a throwaway PostgreSQL server (tests/pg_cluster.py: the distribution's binaries, a
temporary directory) and makes a fresh database per case. Each plan is two steps on the example `ci` server:
`ci.sleep 0.2 s`, then `ci.lint` (CI_DELAY=0), so a plan is mostly waiting, as real plans are; every runner
executes up to `--max-runs` (8) plans at once. The plans are created first (through the planner's service);
then, with the runners warm, their runs are queued in one burst by 8 concurrent submitters (the run queue's
`submit_run`, which `execute_plan` calls); throughput is plans completed per second from the first submit
to the last completion. Then, with 2 runners, one is SIGKILLed once a third of the plans are done, and every
plan's event log is checked: each completed, each step completed exactly once and never started again after
it completed, each plan's run done, none lost. Prints the ratios; nothing is asserted but the checks.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio
import anyio.abc

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "examples" / "servers.json"
sys.path.insert(0, str(ROOT / "tests"))

import pg_cluster  # noqa: E402  (tests/pg_cluster.py: a throwaway server)

from mcp_planner.plan.model import PlanSpec, PlanStatus  # noqa: E402
from mcp_planner.runner import servers_key  # noqa: E402
from mcp_planner.stack import open_stack  # noqa: E402
from mcp_planner.store import open_store  # noqa: E402
from mcp_planner.store.base import QueueStore, RunKind, RunRequest, RunState  # noqa: E402

NAP_S = 0.2
ENDED = {PlanStatus.COMPLETED, PlanStatus.FAILED, PlanStatus.CANCELLED}
SPEC = PlanSpec.model_validate(
    {
        "description": "nap, then lint",
        "steps": [
            {"id": "nap", "tool_name": "ci.sleep", "parameters": {"seconds": NAP_S}},
            {"id": "lint", "tool_name": "ci.lint", "depends_on": ["nap"]},
        ],
        "options": {"require_approval": False},
    }
)


async def start_runners(
    db: str, count: int, max_runs: int, env: dict[str, str], logs: Path
) -> list[anyio.abc.Process]:
    runners = []
    for i in range(count):
        with (logs / f"runner-{i}.log").open("ab") as log:
            cmd = [sys.executable, "-m", "mcp_planner", "runner", "--servers", str(SERVERS)]
            cmd += ["--idle-exit", "0", "--max-runs", str(max_runs)]
            runners.append(
                await anyio.open_process(
                    cmd, env={**env, "MCP_PLANNER_DB": db}, stdin=subprocess.DEVNULL, stdout=log, stderr=log
                )
            )
    async with open_store(db) as store:
        with anyio.fail_after(60):
            while True:  # the runners' rows and their published catalog are in another process's commits
                live = await store.live_runners(servers_key(SERVERS))
                if len(live) == count and await store.get_catalog(servers_key(SERVERS)) is not None:
                    break
                if any(r.returncode is not None for r in runners):
                    raise SystemExit(f"a runner exited at start: see {logs}")
                await anyio.sleep(0.1)
    return runners


async def stop(runners: list[anyio.abc.Process]) -> None:
    for runner in runners:
        if runner.returncode is None:
            runner.terminate()
    for runner in runners:
        with anyio.move_on_after(15):
            await runner.wait()
        if runner.returncode is None:
            runner.kill()
            await runner.wait()


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of this machine so far (Linux /proc/stat; zeros elsewhere)."""
    try:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


async def submit(store: QueueStore, plan_ids: list[str], key: str | None) -> None:
    """Queue a run of each plan, as `execute_plan` does (the runners are live, so none is started)."""
    for plan_id in plan_ids:
        await store.submit_run(RunRequest(plan_id=plan_id, kind=RunKind.EXECUTE, servers=key))


async def count_ended(store: QueueStore, plans: int) -> int:
    return sum(h.status in ENDED for h in await store.recent_plans(plans + 10))


async def run_case(
    db: str, runners: int, plans: int, max_runs: int, env: dict[str, str], logs: Path, *, kill: bool = False
) -> tuple[float, list[str], int, float]:
    """Execute `plans` plans with `runners` runners; returns (seconds, plan ids, runs requeued, how busy the
    CPUs were meanwhile: 0-1)."""
    procs = await start_runners(db, runners, max_runs, env, logs)
    try:
        async with open_stack(db, SERVERS, env, tools="cached", runners=True) as stack:
            ids = [(await stack.service.create_plan(SPEC)).id for _ in range(plans)]
            key = servers_key(SERVERS)
            start, ticks = time.perf_counter(), cpu_ticks()
            async with anyio.create_task_group() as tg:  # a burst of submits, as many agents would make
                for chunk in range(8):
                    tg.start_soon(submit, stack.store, ids[chunk::8], key)
            killed = False
            with anyio.fail_after(300):
                while (done := await count_ended(stack.store, plans)) < plans:
                    if kill and not killed and done >= plans // 3:
                        procs[0].send_signal(signal.SIGKILL)  # mid-way: it holds up to max_runs runs
                        killed = True
                    await anyio.sleep(0.02)
            elapsed = time.perf_counter() - start
            busy, total = (now - then for now, then in zip(cpu_ticks(), ticks, strict=True))
            requeued = 0
            for plan_id in ids:
                run = await stack.store.last_run(plan_id)
                requeued += run is not None and run.kind == "resume"
            return elapsed, ids, requeued, busy / total if total else 0.0
    finally:
        await stop(procs)


async def check(db: str, ids: list[str]) -> list[str]:
    """Every way a run could have been lost or executed twice, one message per plan (none: all well)."""
    problems = []
    async with open_store(db) as store:
        for plan_id in ids:
            plan = await store.get_plan(plan_id)
            if plan.status != PlanStatus.COMPLETED:
                problems.append(f"{plan_id}: {plan.status} ({plan.error})")
            run = await store.last_run(plan_id)
            if run is None or run.state != RunState.DONE or run.error:
                problems.append(f"{plan_id}: its run is {run}")
            completed: Counter[str | None] = Counter()
            for event in await store.events(plan_id):
                if event.kind == "step_completed":
                    completed[event.step_id] += 1
                elif event.kind == "step_started" and completed[event.step_id]:
                    problems.append(f"{plan_id}: step {event.step_id} started again after it completed")
            if completed != {"nap": 1, "lint": 1}:
                problems.append(f"{plan_id}: steps completed {dict(completed)} times")
    return sorted({p.split(":")[0]: p for p in problems}.values())


async def main(plans: int, max_runs: int, server: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        # Its own directory: as root the server runs as `postgres`, which cannot enter `tmp` (mode 0700).
        cluster = Path(tempfile.mkdtemp(prefix="mcp-planner-pg-"))
        if server is None:
            server = pg_cluster.start(cluster)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_PLANNER_")}
        env.update(CI_DELAY="0", CI_STATE_DIR=str(tmp_path / "ci"), XDG_DATA_HOME=str(tmp_path / "data"))
        os.environ.update(CI_DELAY="0", CI_STATE_DIR=str(tmp_path / "ci"))
        try:
            print(
                f"{plans} plans of 2 steps (ci.sleep {NAP_S} s, ci.lint), up to {max_runs} runs per runner, "
                f"{os.cpu_count()} CPUs for PostgreSQL, the runners and their servers"
            )
            rates = {}
            for runners in (1, 2, 4):
                db = pg_cluster.create_database(server, "bench")
                try:
                    seconds, ids, _, cpus = await run_case(db, runners, plans, max_runs, env, tmp_path)
                    problems = await check(db, ids)
                finally:
                    pg_cluster.drop_database(server, db)
                rates[runners] = plans / seconds
                ok = "all completed once" if not problems else f"{len(problems)} PROBLEMS: {problems[:3]}"
                rate = f"{rates[runners]:6.1f} plans/s  x{rates[runners] / rates[1]:.2f} of 1 runner"
                print(f"  {runners} runner(s): {seconds:6.2f} s  {rate}  CPUs {cpus:4.0%} busy  ({ok})")
            db = pg_cluster.create_database(server, "bench")
            try:
                seconds, ids, requeued, _ = await run_case(db, 2, plans, max_runs, env, tmp_path, kill=True)
                problems = await check(db, ids)
            finally:
                pg_cluster.drop_database(server, db)
            print(
                f"  2 runners, one SIGKILLed after a third: {seconds:6.2f} s; {requeued} runs requeued to "
                f"the other runner; {len(ids) - len(problems)}/{len(ids)} plans completed with every step "
                "completed exactly once"
            )
            for problem in problems[:10]:
                print(f"    {problem}")
        finally:
            pg_cluster.stop(cluster)  # (only deletes the directory when it started nothing)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", type=int, default=200)
    parser.add_argument("--max-runs", type=int, default=8)
    parser.add_argument("--db", help="a PostgreSQL server's URL (default: start a throwaway one)")
    args = parser.parse_args()
    anyio.run(main, args.plans, args.max_runs, args.db)
