"""`mcp-planner run` of a one-step plan (`ci.lint`, CI_DELAY=0), wall time of the whole command.

    python bench/bench_runner.py [--runs 7]

Three paths, interleaved in a rotating order in every round so drift hits them alike:

  floor   a fresh Python process that starts the `ci` example server with `mcp.Client` and calls `lint`
          once: the least any command that runs this plan from nothing can cost
  cold    `mcp-planner run --yes PLAN` with no runner for its database: it runs the plan in-process,
          starting only the server the plan names (`ci`, not `workspace`)
  warm    the same command with a live `mcp-planner runner` started beforehand: the runner executes it

Prints min and median of each; goals: cold <= 1.3x the floor, warm <= 0.5 s. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import anyio.abc

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "examples" / "servers.json"
CI_SERVER = ROOT / "examples" / "servers" / "ci.py"
COLD_GOAL = 1.3
WARM_GOAL_S = 0.5

DIRECT = """
import sys
import anyio
from mcp import Client, StdioServerParameters


async def main() -> None:
    params = StdioServerParameters(command=sys.executable, args=[sys.argv[1]])
    async with Client(params, mode="legacy") as client:
        result = await client.call_tool("lint", {})
        assert not result.is_error, result


anyio.run(main)
"""


def planner(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "mcp_planner", *map(str, args)]


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return elapsed


async def wait_warm(db: Path, runner: anyio.abc.Process) -> None:
    from mcp_planner.stack import warm_runner
    from mcp_planner.store.sqlite import PlanStore

    with anyio.fail_after(60):
        for _ in range(600):
            if await anyio.Path(db).exists():
                async with PlanStore.open(db) as store:
                    if await warm_runner(store, SERVERS):
                        return
            if runner.returncode is not None:
                break
            await anyio.sleep(0.1)
    raise SystemExit(f"the runner did not come up ({runner.returncode}): see {db.parent / 'runner.log'}")


async def main(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_PLANNER_")}
        env.update(CI_DELAY="0", CI_STATE_DIR=str(tmp_path / "ci"), WORKSPACE_ROOT=str(tmp_path))
        direct = tmp_path / "direct.py"
        direct.write_text(DIRECT)
        plan = tmp_path / "plan.json"
        steps = [{"id": "lint", "tool_name": "ci.lint"}]
        plan.write_text(json.dumps({"description": "lint once", "steps": steps}))
        cold_db, warm_db = tmp_path / "cold" / "plans.db", tmp_path / "warm" / "plans.db"
        cold_db.parent.mkdir()
        warm_db.parent.mkdir()
        run_args = ("run", "--yes", "--servers", SERVERS, plan)
        cases = {
            "floor": [sys.executable, str(direct), str(CI_SERVER)],
            "cold": planner(*run_args, "--db", cold_db),
            "warm": planner(*run_args, "--db", warm_db),
        }
        with (warm_db.parent / "runner.log").open("ab") as log:
            runner = await anyio.open_process(
                planner("runner", "--db", warm_db, "--servers", SERVERS, "--idle-exit", "0"),
                env=env,
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            await wait_warm(warm_db, runner)
            times: dict[str, list[float]] = {name: [] for name in cases}
            names = list(cases)
            for round_ in range(runs + 1):  # round 0 warms disk caches and .pyc files
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    elapsed = await anyio.to_thread.run_sync(timed, cases[name], env, tmp_path)
                    if round_:
                        times[name].append(elapsed)
        finally:
            runner.terminate()
            with anyio.fail_after(30):
                await runner.wait()

    floor = statistics.median(times["floor"])
    print(f"`mcp-planner run` of one ci.lint step, wall time, {runs} runs each")
    labels = {
        "floor": "floor: fresh process, mcp.Client, one call",
        "cold": "cold: no runner (starts ci in-process)",
        "warm": "warm: a live runner executes it",
    }
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"  {labels[name]:<44} min {min(values) * 1e3:7.1f} ms   median {median * 1e3:7.1f} ms"
            f"   {median / floor:4.2f}x"
        )
    cold = statistics.median(times["cold"]) / floor
    warm = statistics.median(times["warm"])
    print(f"cold {cold:.2f}x the floor (goal <= {COLD_GOAL}x): {'OK' if cold <= COLD_GOAL else 'OVER'}")
    print(f"warm {warm:.2f} s (goal <= {WARM_GOAL_S} s): {'OK' if warm <= WARM_GOAL_S else 'OVER'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    anyio.run(main, parser.parse_args().runs)
