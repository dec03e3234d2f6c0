"""Large plans: validate, execute, summarise and read back 10k and 100k-step plans (SPEC section 10).

    python bench/bench_scale.py [--sizes 10000,100000]

Each size runs in a fresh process, so its resident memory is its own: a chain of no-op steps built from a
spec (as create_plan does), validated, executed durably (`Executor` + `PlanStore` on a file), summarised,
then read back from the store. Prints each phase's cost per step (linear time: the same at every size)
and the resident memory per step beyond the process's baseline before the plan existed (goal: <= 2 KB),
after execution and at the peak. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from mcp_planner import Executor, PlanStore
from mcp_planner.plan.model import ExecutionPlan, PlanSpec, StepSpec


async def noop(params: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True}


def resident_kb() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


async def child(n: int) -> dict[str, float]:
    """One size in this process: seconds per phase and resident KB."""
    spec = PlanSpec(
        description=f"{n} no-op steps",
        steps=[
            StepSpec(id=f"s{i}", tool_name="noop", parameters={"i": i}, depends_on=[f"s{i - 1}"] if i else [])
            for i in range(n)
        ],
        options={"require_approval": False},  # type: ignore[arg-type]
    )
    gc.collect()
    base = resident_kb()
    times: dict[str, float] = {}
    start = time.perf_counter()
    plan = ExecutionPlan.from_spec(spec)
    times["build"] = time.perf_counter() - start
    del spec
    with tempfile.TemporaryDirectory() as tmp:
        async with PlanStore.open(Path(tmp) / "scale.db") as store:
            start = time.perf_counter()
            problems = plan.validate({"noop": None}, max_steps=n)
            times["validate"] = time.perf_counter() - start
            assert not problems, problems[:3]
            start = time.perf_counter()
            await Executor({"noop": noop}, store, max_steps=n).execute(plan)
            times["execute"] = time.perf_counter() - start
            start = time.perf_counter()
            summary = plan.summary()
            times["summarise"] = time.perf_counter() - start
            assert summary.completed == n, summary.status
            after_execute = resident_kb() - base
            plan_id = plan.id
            del plan, summary
            gc.collect()
            start = time.perf_counter()
            loaded = await store.get_plan(plan_id)
            times["read back"] = time.perf_counter() - start
            assert len(loaded.steps) == n
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    return {**times, "resident_kb": after_execute, "peak_kb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(anyio.run(child, args.child)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for n in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True
        )
        results[n] = json.loads(out.stdout.strip().splitlines()[-1])
    print("a chain of no-op steps: time per step by phase, resident memory per step (fresh process per size)")
    phases = ["build", "validate", "execute", "summarise", "read back"]
    print(f"  {'steps':>8}  " + "  ".join(f"{p:>12}" for p in phases) + "   resident/step  peak/step")
    for n, r in results.items():
        cells = "  ".join(f"{r[p] / n * 1e6:9.1f} us" for p in phases)
        print(f"  {n:>8}  {cells}   {r['resident_kb'] / n * 1024:8.0f} B   {r['peak_kb'] / n * 1024:6.0f} B")
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        growth = "  ".join(
            f"{(results[large][p] / large) / (results[small][p] / small):11.2f}x" for p in phases
        )
        print(f"  {'per-step growth':>8} {small}->{large}: {growth}   (linear: 1.0x)")
    print("goal: linear in the size; <= 2 KB (2048 B) resident per step beyond the baseline")


if __name__ == "__main__":
    main()
