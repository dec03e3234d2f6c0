"""The planner against direct MCP client calls of the same downstream tools (SPEC section 10).

    python bench/bench_downstream.py [--calls N] [--rounds N]

(1) One step.
Each round calls the `echo` tool of `tests/servers/basic.py` (a stdio subprocess) once per path, the
paths interleaved (in a rotating order) so drift hits them alike:

  direct      `mcp.Client.call_tool("echo", ...)` (the floor)
  provider    `Downstream.call("basic.echo", ...)` (connection manager + result conversion)
  executor    a one-step plan run by `Executor(downstream)` with the in-memory store
  durable     the same with a `PlanStore` on a SQLite file (every transition committed)

Prints min and median and the ratios to `direct` (goal for a step through the planner: <= 1.3x).

(2) A wide DAG: 64 independent steps, each a 50 ms `sleep` call, run by the planner with 64 slots, against
the same 64 calls made directly and concurrently on one `mcp.Client` (the floor: it is already above 50 ms
on a loaded machine). Alternating, min and median of each; goal: makespan <= 1.05x the floor.

Nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from statistics import median

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from mcp_planner.downstream.client import Downstream
from mcp_planner.downstream.config import ServersConfig
from mcp_planner.engine.executor import Executor
from mcp_planner.plan.model import ExecutionPlan, PlanStatus
from mcp_planner.store.memory import MemoryStore
from mcp_planner.store.sqlite import PlanStore

SERVER = Path(__file__).parent.parent / "tests" / "servers" / "basic.py"
WARMUP = 20

#: A measured path: untimed preparation (if any), then the timed call.
Path_ = tuple[Callable[[], None] | None, Callable[[], Awaitable[None]]]


def one_step_plan() -> ExecutionPlan:
    plan = ExecutionPlan.new("echo once")
    plan.options.require_approval = False
    plan.add_step("basic.echo", "echo", {"text": "hello"}, step_id="echo")
    plan.submit()
    return plan


def wide_plan(width: int, seconds: float) -> ExecutionPlan:
    plan = ExecutionPlan.new(f"{width} sleeps at once")
    plan.options.require_approval = False
    plan.options.allow_parallel = True
    plan.options.max_parallel_steps = width
    for i in range(width):
        plan.add_step("basic.sleep", "nap", {"seconds": seconds}, step_id=f"nap{i}")
    return plan


async def wide_dag(
    client: Client,
    downstream: Downstream,
    store: PlanStore,
    rounds: int,
    width: int = 64,
    seconds: float = 0.05,
) -> None:
    async def direct() -> float:
        async def one() -> None:
            result = await client.call_tool("sleep", {"seconds": seconds})
            assert not result.is_error

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(width):
                tg.start_soon(one)
        return time.perf_counter() - start

    async def planner() -> float:
        plan = wide_plan(width, seconds)
        start = time.perf_counter()
        summary = await Executor(downstream, store).execute(plan)
        elapsed = time.perf_counter() - start
        assert summary.status == PlanStatus.COMPLETED, summary
        return elapsed

    await direct()  # warm-up
    await planner()
    samples: dict[str, list[float]] = {"direct": [], "planner": []}
    for round_ in range(rounds):
        order = [("direct", direct), ("planner", planner)]
        for name, fn in order if round_ % 2 == 0 else order[::-1]:
            samples[name].append(await fn())
    d, p = samples["direct"], samples["planner"]
    print(
        f"\n(2) wide DAG: {width} x {seconds * 1000:.0f} ms sleep calls at once, {rounds} rounds, alternating"
    )
    for label, values in (
        ("direct, concurrent on one mcp.Client", d),
        (f"planner, {width} slots, PlanStore", p),
    ):
        print(f"  {label:<40} min {min(values) * 1e3:7.1f} ms   median {median(values) * 1e3:7.1f} ms")
    ratio_min, ratio_median = min(p) / min(d), median(p) / median(d)
    print(f"  RATIO planner / direct (goal <= 1.05x)   min {ratio_min:.3f}x   median {ratio_median:.3f}x")


async def main(calls: int, rounds: int) -> None:
    params = StdioServerParameters(command=sys.executable, args=[str(SERVER)])
    config = ServersConfig.from_dict(
        {"mcpServers": {"basic": {"command": sys.executable, "args": [str(SERVER)]}}}
    )
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            Client(params, mode="legacy", cache=None) as client,
            Downstream(config) as downstream,
            PlanStore.open(Path(tmp) / "bench.db") as plan_store,
        ):
            if not await downstream.wait_ready(60):
                raise SystemExit(f"the echo server did not start: {downstream.status()}")
            gc.freeze()  # as the planner's own processes do once started (stack.py): for both paths alike
            await wide_dag(client, downstream, plan_store, rounds)
            memory_executor = Executor(downstream, MemoryStore())
            durable_executor = Executor(downstream, plan_store)

            async def direct() -> None:
                result = await client.call_tool("echo", {"text": "hello"})
                assert not result.is_error

            async def provider() -> None:
                await downstream.call("basic.echo", {"text": "hello"})

            def through(executor: Executor) -> Path_:
                plans: list[ExecutionPlan] = []

                def prepare() -> None:  # the caller's work, like building the direct call's arguments
                    plans.append(one_step_plan())

                async def run() -> None:
                    summary = await executor.execute(plans.pop())
                    assert summary.status == PlanStatus.COMPLETED, summary

                return prepare, run

            paths: dict[str, Path_] = {
                "direct": (None, direct),
                "provider": (None, provider),
                "executor": through(memory_executor),
                "durable": through(durable_executor),
            }
            samples: dict[str, list[float]] = {name: [] for name in paths}
            names = list(paths)
            for round_ in range(WARMUP + calls):
                # Rotate the order so no path always runs right after the same other path.
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    prepare, fn = paths[name]
                    if prepare is not None:
                        prepare()
                    start = time.perf_counter()
                    await fn()
                    elapsed = time.perf_counter() - start
                    if round_ >= WARMUP:
                        samples[name].append(elapsed)

    floor = median(samples["direct"])
    floor_min = min(samples["direct"])
    print(f"\n(1) one echo step, {calls} calls each, rotating order (after {WARMUP} warm-up rounds)")
    labels = {
        "direct": "direct mcp.Client.call_tool",
        "provider": "Downstream.call",
        "executor": "Executor + Downstream, MemoryStore",
        "durable": "Executor + Downstream, PlanStore (SQLite)",
    }
    for name, values in samples.items():
        mid, low = median(values), min(values)
        print(
            f"  {labels[name]:<42} min {low * 1e3:6.3f} ms {low / floor_min:5.2f}x   "
            f"median {mid * 1e3:6.3f} ms {mid / floor:5.2f}x"
        )
    print("goal: a step through the planner <= 1.3x the direct call")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    anyio.run(main, args.calls, args.rounds)
