"""`execute_plan` as an MCP task against a real `mcp-planner serve` process (stdio, the example servers,
runners started on demand), the way a 2026-07-28 client of the Tasks extension calls it.

    python bench/bench_tasks.py [--rounds 5]

Per round, a plan whose step naps 3 s (`ci.sleep`):
  handle      `tools/call execute_plan` until the task handle arrives (goal: within 5 s while the plan runs;
              the run is committed first)
  plain       the same call from a client without tasks, `wait_seconds: 0` (it waits until a runner has
              taken the run: the old path)
  tasks/get   one poll of the task while the plan runs (50 polls)
  to the end  the handle's arrival until `tasks/get` says completed, against the 3 s nap (polled every
              20 ms): the planner's overhead on a long run
The first round starts the runner (cold); min and median are over the others. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import anyio
from mcp import Client, StdioServerParameters
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp_types import CallToolResult, GetTaskRequest, GetTaskRequestParams, Result

from mcp_planner.server.tasks import TASKS_EXTENSION

ROOT = Path(__file__).resolve().parent.parent
NAP_S = 3.0


class TaskHandle(Result):
    result_type: Literal["task"] = "task"
    task_id: str
    status: str


class Task(Result):
    task_id: str
    status: str
    result: dict[str, Any] | None = None


async def _resolve(handle: TaskHandle, ctx: ClaimContext) -> CallToolResult:
    raise NotImplementedError("the bench polls tasks/get itself")


class Tasks(ClientExtension):
    identifier = TASKS_EXTENSION

    def claims(self) -> list[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=TaskHandle, resolve=_resolve)]


async def get_task(client: Client, task_id: str) -> Task:
    return await client.session.send_request(
        GetTaskRequest(params=GetTaskRequestParams(task_id=task_id)), Task
    )


async def create(client: Client) -> str:
    steps = [{"id": "nap", "tool_name": "ci.sleep", "parameters": {"seconds": NAP_S}}]
    spec = {"description": "nap", "steps": steps, "options": {"require_approval": False}}
    result = await client.call_tool("create_plan", spec)
    assert result.structured_content is not None, result
    return str(result.structured_content["id"])


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_PLANNER_")}
        env.update(CI_STATE_DIR=str(Path(tmp) / "ci"), CI_DELAY="0", XDG_DATA_HOME=str(Path(tmp) / "data"))
        args = ["-m", "mcp_planner", "serve", "--servers", str(ROOT / "examples" / "servers.json")]
        params = StdioServerParameters(
            command=sys.executable, args=[*args, "--db", str(Path(tmp) / "plans.db")], env=env, cwd=tmp
        )
        times: dict[str, list[float]] = {"handle": [], "plain": [], "tasks/get": [], "to the end": []}
        async with Client(params, extensions=[Tasks()]) as tasks, Client(params) as plain:
            for _ in range(rounds):
                plan_id = await create(tasks)
                start = time.perf_counter()
                call = {"plan_id": plan_id}
                handle = await tasks.session.call_tool("execute_plan", call, allow_claimed=True)
                arrived = time.perf_counter()
                assert isinstance(handle, TaskHandle), handle
                times["handle"].append(arrived - start)

                other = await create(plain)
                start = time.perf_counter()
                await plain.call_tool("execute_plan", {"plan_id": other, "wait_seconds": 0})
                times["plain"].append(time.perf_counter() - start)

                for _ in range(50):
                    start = time.perf_counter()
                    await get_task(tasks, handle.task_id)
                    times["tasks/get"].append(time.perf_counter() - start)
                while (await get_task(tasks, handle.task_id)).status == "working":  # noqa: ASYNC110 (polling is the protocol)
                    await anyio.sleep(0.02)
                times["to the end"].append(time.perf_counter() - arrived)
        print(
            f"execute_plan as a task, {rounds} rounds of a {NAP_S:.0f} s plan (the first is cold: it "
            "starts a runner)"
        )
        for name, values in times.items():
            warm = values[50:] if name == "tasks/get" else values[1:]
            cold = values[0] if name != "tasks/get" else statistics.median(values[:50])
            line = f"  {name:<11} cold {cold * 1000:7.1f} ms   warm min {min(warm) * 1000:7.1f} ms"
            line += f"  median {statistics.median(warm) * 1000:7.1f} ms"
            if name == "to the end":
                line += f"  ({statistics.median(warm) / NAP_S:.3f}x the nap)"
            print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    anyio.run(main, parser.parse_args().rounds)
