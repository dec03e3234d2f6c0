"""Kill the executor with SIGKILL at many points of a 50-step run, resume in a new process, check the store.

The worker (`crash_worker.py`) logs every tool call (fsync'd) before the call returns. At the kill, a step is
either completed in the store (then it was called exactly once and must never be called again) or not (then
resume may run it again, with `rerun_interrupted=True`). Waiting for the kill point polls the log file with a
bounded loop: coordination with another process, not a sleep standing in for an event.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest
from conftest import new_database

from mcp_planner import ExecutionPlan, PlanStatus, StepStatus
from mcp_planner.store import open_store

WORKER = str(Path(__file__).with_name("crash_worker.py"))
PLAN_ID = "crashplan"
STEPS = 50
KILL_AFTER = [1, 3, 8, 14, 21, 27, 33, 39, 44]
ITEM_KILL_AFTER = [1, 6, 17, 30]


def kill_points(points: list[int]) -> list[tuple[str, int]]:
    """Every kill point on SQLite; a spread of them on PostgreSQL (the store differs, the executor not)."""
    return [("sqlite", k) for k in points] + [("postgres", k) for k in points[::3]]


def logged_calls(log: Path) -> list[str]:
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    return [line for line in text.split("\n")[:-1]]  # a torn last line is not a call yet


def load(db: str, plan_id: str = PLAN_ID) -> ExecutionPlan:
    async def read() -> ExecutionPlan:
        async with open_store(db) as store:
            return await store.get_plan(plan_id)

    return anyio.run(read)


def completed_results(plan: ExecutionPlan) -> dict[str, object]:
    done = {}
    for step in plan.steps:
        if step.status == StepStatus.COMPLETED:
            assert step.result is not None, f"step {step.id} is completed without its result"
            done[step.id] = step.result.value
    return done


@pytest.mark.parametrize(("backend", "kill_after"), kill_points(KILL_AFTER))
def test_a_killed_run_resumes_without_rerunning_any_completed_step(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, kill_after: int
) -> None:
    db = new_database(request, backend)
    log = tmp_path / "calls.log"
    worker = subprocess.Popen(
        [sys.executable, WORKER, "run", db, str(log), PLAN_ID, str(kill_after)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while len(logged_calls(log)) < kill_after:
            assert worker.poll() is None, f"the worker ended before the kill point: {worker.stderr.read()!r}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the worker made no progress in 30 s"
            time.sleep(0.001)
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait(10)
        assert worker.stderr is not None
        worker.stderr.close()

    at_kill = load(db)
    # The worker holds call `kill_after` and every later call open, so the kill always lands mid-run.
    assert at_kill.status == PlanStatus.EXECUTING
    done_at_kill = completed_results(at_kill)
    for step_id, value in done_at_kill.items():
        assert isinstance(value, dict) and value["id"] == step_id

    resumed = subprocess.run(
        [sys.executable, WORKER, "resume", db, str(log), PLAN_ID],
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    final = load(db)
    assert final.status == PlanStatus.COMPLETED
    results = completed_results(final)
    assert len(results) == STEPS
    for step in final.steps:
        value = results[step.id]
        assert isinstance(value, dict) and value["id"] == step.id
        if "prev" in step.parameters:  # data flow survived the crash
            assert value["prev"] == step.depends_on[0] or value["prev"] in step.depends_on
    calls = Counter(logged_calls(log))
    assert set(calls) == {s.id for s in final.steps}
    for step_id in done_at_kill:
        assert calls[step_id] == 1, f"step {step_id} was completed before the kill and ran again"


@pytest.mark.parametrize(("backend", "kill_after"), kill_points(ITEM_KILL_AFTER))
def test_a_killed_for_each_resumes_without_rerunning_any_completed_item(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, kill_after: int
) -> None:
    """Items are durable like steps: a completed item is never called again, and the results come back whole
    and in item order."""
    db = new_database(request, backend)
    log, plan_id = tmp_path / "calls.log", "items-plan"
    worker = subprocess.Popen(
        [sys.executable, WORKER, "run", db, str(log), plan_id, str(kill_after)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while len(logged_calls(log)) < kill_after:
            assert worker.poll() is None, f"the worker ended before the kill point: {worker.stderr.read()!r}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the worker made no progress in 30 s"
            time.sleep(0.001)
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait(10)
        assert worker.stderr is not None
        worker.stderr.close()

    at_kill = load(db, plan_id)
    assert at_kill.status == PlanStatus.EXECUTING
    items = at_kill.step("each").items
    assert items is not None and len(items) == 40
    done_at_kill = [f"i{i}" for i, item in enumerate(items) if item.status == StepStatus.COMPLETED]

    resumed = subprocess.run(
        [sys.executable, WORKER, "resume", db, str(log), plan_id],
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    final = load(db, plan_id)
    assert final.status == PlanStatus.COMPLETED
    each = final.step("each")
    assert each.result is not None
    assert [r["id"] for r in each.result.structured] == [f"i{i}" for i in range(40)]
    assert final.step("after").result.structured["prev"] == 40  # type: ignore[union-attr]
    calls = Counter(logged_calls(log))
    for item_id in done_at_kill:
        assert calls[item_id] == 1, f"item {item_id} was completed before the kill and ran again"
