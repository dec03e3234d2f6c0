"""A step executed through the planner against a direct MCP client call of the same downstream tool.

    python bench/bench_downstream.py [--calls N]

Each round calls the `echo` tool of `tests/servers/basic.py` (a stdio subprocess) once per path, the
paths interleaved (in a rotating order) so drift hits them alike:

  direct      `mcp.Client.call_tool("echo", ...)` (the floor)
  provider    `Downstream.call("basic.echo", ...)` (connection manager + result conversion)
  executor    a one-step plan run by `Executor(downstream)` with the in-memory store
  durable     the same with a `PlanStore` on a SQLite file (every transition committed)

Prints medians and the ratios to `direct` (goal for a step through the planner: <= 1.3x). Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

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


async def main(calls: int) -> None:
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

    floor = statistics.median(samples["direct"])
    print(f"one echo step, median of {calls} calls (after {WARMUP} warm-up rounds)")
    labels = {
        "direct": "direct mcp.Client.call_tool",
        "provider": "Downstream.call",
        "executor": "Executor + Downstream, MemoryStore",
        "durable": "Executor + Downstream, PlanStore (SQLite)",
    }
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"  {labels[name]:<44} {median * 1e3:8.3f} ms   {median / floor:5.2f}x")
    print("goal: a step through the planner <= 1.3x the direct call")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    anyio.run(main, parser.parse_args().calls)
