"""A second process on the same plan database, driven by tests/test_store.py.

    python store_worker.py claim DB PLAN_ID
    python store_worker.py write DB PLAN_ID STEP_ID COUNT
    python store_worker.py commit DB PLAN_ID
    python store_worker.py submit DB PLAN_ID
    python store_worker.py claim-runs DB SERVERS_KEY   (`-`: no servers file)

It opens the store, prints `ready`, waits for `go` on stdin (the test's barrier, so both workers act at
the same moment), acts, prints its outcome, then waits for stdin to close before exiting (a claim must
not outlive its live owner during the test).
"""

from __future__ import annotations

import sys

import anyio

from mcp_planner.errors import PlanConflictError, PlanStateError
from mcp_planner.plan.model import StepResult, StepStatus
from mcp_planner.store import open_store
from mcp_planner.store.base import Event, RunKind, RunRequest, new_owner_id


async def main(argv: list[str]) -> None:
    mode, db, plan_id = argv[:3]
    async with open_store(db) as store:
        print("ready", flush=True)
        line = await anyio.to_thread.run_sync(sys.stdin.readline)
        assert line.strip() == "go", line
        if mode == "claim":
            owner = new_owner_id()
            in_the_way = await store.claim(plan_id, owner)
            print("won" if in_the_way is None else f"lost {in_the_way.owner}", flush=True)
        elif mode == "write":
            step_id, count = argv[3], int(argv[4])
            plan = await store.get_plan(plan_id)
            for i in range(count):
                event = Event(plan_id=plan_id, kind="tick", step_id=step_id, data={"n": i})
                while True:  # a write based on an outdated copy is refused, never lost: re-read, retry
                    step = plan.step(step_id)
                    step.retry_count = i + 1
                    try:
                        await store.save_transition(plan, [step], [event])
                        break
                    except PlanConflictError:
                        plan = await store.get_plan(plan_id)
                await store.append_event(Event(plan_id=plan_id, kind="note", step_id=step_id, data={"n": i}))
            print("done", flush=True)
        elif mode == "commit":
            plan = await store.get_plan(plan_id)
            step = plan.steps[0]
            step.status = StepStatus.COMPLETED
            step.result = StepResult.from_value({"answer": 42})
            await store.save_transition(plan, [step], [Event(plan_id=plan_id, kind="step_completed")])
            print("committed", flush=True)  # the test kills this process with SIGKILL now
        elif mode == "submit":
            try:
                run = await store.submit_run(RunRequest(plan_id=plan_id, kind=RunKind.EXECUTE))
            except PlanStateError:
                print("refused", flush=True)
            else:
                print(f"submitted {run.id}", flush=True)
        elif mode == "claim-runs":
            servers = None if plan_id == "-" else plan_id
            owner = new_owner_id()
            claimed = []
            while (run := await store.claim_run(owner, servers)) is not None:
                claimed.append(run.id)
            print(" ".join([owner, *claimed]), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1:])
