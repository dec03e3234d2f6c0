"""The run queue of every store (memory, SQLite, PostgreSQL): submit, claim, finish, cancel, orphans, runners,
wake-up, catalogs; and each database's queue shared by real processes."""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator
from datetime import timedelta

import anyio
import pytest
from conftest import BACKENDS, new_database
from test_store import run_workers_together

from mcp_planner.errors import PlanNotFoundError, PlanStateError, RunNotFoundError
from mcp_planner.plan.model import ExecutionPlan, utcnow
from mcp_planner.store import open_store
from mcp_planner.store.base import (
    QueueStore,
    RunKind,
    RunnerInfo,
    RunRequest,
    RunState,
    new_owner_id,
)
from mcp_planner.store.memory import MemoryStore

pytestmark = pytest.mark.anyio

KEY = "/etc/servers.json#" + "ab" * 32


@pytest.fixture(params=["memory", *BACKENDS])
async def stores(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[QueueStore, QueueStore]]:
    """Two handles on one store: for a database two stores opened on it, for memory the same object."""
    if request.param == "memory":
        store = MemoryStore()
        yield store, store
        return
    db = new_database(request, request.param)
    async with open_store(db) as one, open_store(db) as other:
        yield one, other


@pytest.fixture
async def store(stores: tuple[QueueStore, QueueStore]) -> QueueStore:
    return stores[0]


async def stored_plan(store: QueueStore) -> str:
    plan = ExecutionPlan.new("demo")
    plan.add_step("tools.echo", "echo", {"i": 1}, step_id="s0")
    await store.save_plan(plan)
    return plan.id


def execute(plan_id: str, servers: str | None = None) -> RunRequest:
    return RunRequest(plan_id=plan_id, kind=RunKind.EXECUTE, servers=servers)


async def dead_owner() -> str:
    """An owner id naming a process on this host that has exited."""
    proc = await anyio.run_process([sys.executable, "-c", "import os; print(os.getpid())"])
    return f"{socket.gethostname()}:{int(proc.stdout)}:deadbeef"


def runner_info(runner_id: str, servers: str | None = None, age: float = 0.0) -> RunnerInfo:
    at = utcnow() - timedelta(seconds=age)
    return RunnerInfo(id=runner_id, servers=servers, started_at=at, heartbeat_at=at)


# -- submit, claim, finish --------------------------------------------------------------------------------


async def test_a_submitted_run_is_claimed_then_finished_and_counted_for_its_runner(store: QueueStore) -> None:
    plan_id = await stored_plan(store)
    runner = new_owner_id()
    await store.register_runner(runner_info(runner))

    submitted = await store.submit_run(
        RunRequest(plan_id=plan_id, kind=RunKind.RESUME, rerun_interrupted=True)
    )
    assert submitted.state == RunState.QUEUED and submitted.runner is None
    assert await store.get_run(submitted.id) == submitted

    claimed = await store.claim_run(runner, None)
    assert claimed is not None and claimed.id == submitted.id
    assert (claimed.state, claimed.runner, claimed.kind, claimed.rerun_interrupted) == (
        RunState.CLAIMED,
        runner,
        RunKind.RESUME,
        True,
    )
    assert claimed.claimed_at is not None
    assert await store.claim_run(new_owner_id(), None) is None

    assert await store.finish_run(submitted.id, runner) is True
    done = await store.get_run(submitted.id)
    assert (done.state, done.error) == (RunState.DONE, None) and done.finished_at is not None
    assert await store.active_run(plan_id) is None
    assert await store.last_run(plan_id) == done
    [info] = await store.live_runners()
    assert info.runs == 1


async def test_a_second_submit_is_refused_while_a_run_is_active_and_accepted_once_it_is_done(
    store: QueueStore,
) -> None:
    plan_id = await stored_plan(store)
    runner = new_owner_id()
    first = await store.submit_run(execute(plan_id))

    with pytest.raises(
        PlanStateError, match=rf"plan {plan_id!r} already has a run in progress .*get_summary"
    ):
        await store.submit_run(execute(plan_id))
    assert await store.claim_run(runner, None) is not None
    with pytest.raises(PlanStateError, match="already has a run in progress"):
        await store.submit_run(execute(plan_id))
    assert await store.active_run(plan_id) == await store.get_run(first.id)

    await store.finish_run(first.id, runner, error="refused: the plan is not approved")
    second = await store.submit_run(execute(plan_id))

    assert (await store.get_run(first.id)).error == "refused: the plan is not approved"
    assert await store.active_run(plan_id) == second
    assert await store.last_run(plan_id) == second


async def test_a_run_is_claimed_only_by_a_runner_with_its_servers_key(store: QueueStore) -> None:
    with_key = await store.submit_run(execute(await stored_plan(store), KEY))
    without = await store.submit_run(execute(await stored_plan(store), None))

    assert await store.claim_run(new_owner_id(), KEY + "0") is None
    keyed = await store.claim_run(new_owner_id(), KEY)
    plain = await store.claim_run(new_owner_id(), None)

    assert keyed is not None and keyed.id == with_key.id
    assert plain is not None and plain.id == without.id
    assert await store.claim_run(new_owner_id(), KEY) is None


async def test_runs_are_claimed_oldest_first(store: QueueStore) -> None:
    ids = [(await store.submit_run(execute(await stored_plan(store)))).id for _ in range(5)]

    claimed = [await store.claim_run(new_owner_id(), None) for _ in ids]

    assert [run.id for run in claimed if run is not None] == ids


async def test_finishing_a_run_another_runner_holds_changes_nothing(store: QueueStore) -> None:
    plan_id = await stored_plan(store)
    run = await store.submit_run(execute(plan_id))
    holder = new_owner_id()

    assert await store.finish_run(run.id, holder) is False  # queued: nobody holds it
    await store.claim_run(holder, None)
    assert await store.finish_run(run.id, new_owner_id(), error="not mine") is False

    current = await store.get_run(run.id)
    assert (current.state, current.runner, current.error) == (RunState.CLAIMED, holder, None)


async def test_submitting_for_an_unknown_plan_or_reading_an_unknown_run_says_what_to_do(
    store: QueueStore,
) -> None:
    with pytest.raises(PlanNotFoundError, match="list_plans"):
        await store.submit_run(execute("nope"))
    with pytest.raises(RunNotFoundError, match=r"no run with id 'nope'"):
        await store.get_run("nope")
    assert await store.active_run("nope") is None
    assert await store.last_run("nope") is None


async def test_cancelling_a_queued_run_finishes_it_with_the_reason_and_leaves_a_claimed_one_alone(
    store: QueueStore,
) -> None:
    queued_plan, claimed_plan = await stored_plan(store), await stored_plan(store)
    claimed = await store.submit_run(execute(claimed_plan))
    await store.claim_run(new_owner_id(), None)
    queued = await store.submit_run(execute(queued_plan))

    assert await store.cancel_queued_run(queued_plan, "cancelled by alice") is True
    assert await store.cancel_queued_run(queued_plan, "again") is False
    assert await store.cancel_queued_run(claimed_plan, "too late") is False

    cancelled = await store.get_run(queued.id)
    assert (cancelled.state, cancelled.error) == (RunState.DONE, "cancelled by alice")
    assert await store.claim_run(new_owner_id(), None) is None
    assert (await store.get_run(claimed.id)).state == RunState.CLAIMED


# -- orphans and runners ----------------------------------------------------------------------------------


async def test_runs_of_dead_stale_or_unregistered_runners_are_requeued_as_resumes(store: QueueStore) -> None:
    live, dead, stale, unregistered = new_owner_id(), await dead_owner(), new_owner_id(), new_owner_id()
    await store.register_runner(runner_info(live))
    await store.register_runner(runner_info(dead))
    await store.register_runner(runner_info(stale, age=120))
    runs = {}
    for runner in (live, dead, stale, unregistered):
        plan_id = await stored_plan(store)
        runs[runner] = await store.submit_run(
            RunRequest(plan_id=plan_id, kind=RunKind.EXECUTE, rerun_interrupted=True)
        )
        assert await store.claim_run(runner, None) is not None

    requeued = await store.requeue_orphans(stale_after=30)

    assert sorted(r.id for r in requeued) == sorted(runs[r].id for r in (dead, stale, unregistered))
    for run in requeued:
        assert run == await store.get_run(run.id)
        assert (run.state, run.kind, run.rerun_interrupted) == (RunState.QUEUED, RunKind.RESUME, True)
        assert run.runner is None and run.claimed_at is None
    untouched = await store.get_run(runs[live].id)
    assert (untouched.state, untouched.runner) == (RunState.CLAIMED, live)
    assert await store.requeue_orphans(stale_after=30) == []

    taker = new_owner_id()
    retaken = [await store.claim_run(taker, None) for _ in range(3)]
    assert sorted(r.id for r in retaken if r is not None) == sorted(r.id for r in requeued)
    assert await store.finish_run(runs[dead].id, dead) is False  # the lost claim cannot finish it


async def test_live_runners_leaves_out_and_forgets_dead_and_stale_ones(store: QueueStore) -> None:
    first, second, dead, stale = new_owner_id(), new_owner_id(), await dead_owner(), new_owner_id()
    await store.register_runner(runner_info(first, KEY, age=5))
    await store.register_runner(runner_info(second, None))
    await store.register_runner(runner_info(dead, KEY))
    await store.register_runner(runner_info(stale, KEY, age=120))

    assert [r.id for r in await store.live_runners(stale_after=30)] == [first, second]
    assert [r.id for r in await store.live_runners(KEY, stale_after=30)] == [first]
    assert [r.id for r in await store.live_runners(None, stale_after=30)] == [second]
    assert await store.heartbeat_runner(dead) is False
    assert await store.heartbeat_runner(stale) is False

    assert await store.heartbeat_runner(first) is True
    await store.unregister_runner(second)
    assert await store.heartbeat_runner(second) is False
    [info] = await store.live_runners()
    assert info.id == first and info.heartbeat_at > info.started_at


# -- wake-up ----------------------------------------------------------------------------------------------


async def test_wait_for_work_returns_when_another_connection_submits(
    stores: tuple[QueueStore, QueueStore],
) -> None:
    runner_side, submitter = stores
    plan_id = await stored_plan(submitter)
    woke = anyio.Event()

    async def wait() -> None:
        await runner_side.wait_for_work(timeout=60)
        woke.set()

    assert await runner_side.claim_run(new_owner_id(), None) is None
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await submitter.submit_run(execute(plan_id))
            await woke.wait()
    assert await runner_side.claim_run(new_owner_id(), None) is not None


async def test_a_submit_between_an_empty_claim_and_the_wait_is_not_missed(
    stores: tuple[QueueStore, QueueStore],
) -> None:
    runner_side, submitter = stores
    plan_id = await stored_plan(submitter)

    assert await runner_side.claim_run(new_owner_id(), None) is None
    await submitter.submit_run(execute(plan_id))
    with anyio.fail_after(10):
        await runner_side.wait_for_work(timeout=60)


async def test_wait_for_work_returns_after_its_timeout_when_nothing_happens(store: QueueStore) -> None:
    assert await store.claim_run(new_owner_id(), None) is None
    with anyio.fail_after(10):
        await store.wait_for_work(timeout=0.1)


# -- the catalog cache ------------------------------------------------------------------------------------


async def test_a_catalog_is_cached_per_servers_key_and_replaced_by_the_next(store: QueueStore) -> None:
    tools = [{"name": "files.read", "inputSchema": {"type": "object"}}]
    assert await store.get_catalog(None) is None

    await store.save_catalog(None, [{"name": "old"}])
    await store.save_catalog(None, tools)
    await store.save_catalog(KEY, [])

    cached = await store.get_catalog(None)
    assert cached is not None and cached[0] == tools
    assert cached[1] <= utcnow()
    keyed = await store.get_catalog(KEY)
    assert keyed is not None and keyed[0] == []
    assert await store.get_catalog(KEY + "0") is None


# -- real processes on one SQLite file --------------------------------------------------------------------


async def test_two_processes_claiming_twenty_runs_claim_each_exactly_once(db: str) -> None:
    async with open_store(db) as store:
        submitted = {(await store.submit_run(execute(await stored_plan(store), KEY))).id for _ in range(20)}
        await store.submit_run(execute(await stored_plan(store), None))  # not theirs to take

    outcomes = await run_workers_together([("claim-runs", db, KEY)] * 2)

    (owner_a, *runs_a), (owner_b, *runs_b) = (o.split() for o in outcomes)
    assert not set(runs_a) & set(runs_b)
    assert sorted(runs_a + runs_b) == sorted(submitted)
    async with open_store(db) as store:
        for run_id in runs_a + runs_b:
            run = await store.get_run(run_id)
            assert (run.state, run.runner) == (RunState.CLAIMED, owner_a if run_id in runs_a else owner_b)


@pytest.mark.parametrize("round_", range(3))
async def test_two_processes_submitting_for_one_plan_at_once_exactly_one_succeeds(
    db: str, round_: int
) -> None:
    async with open_store(db) as store:
        plan_id = await stored_plan(store)

    outcomes = await run_workers_together([("submit", db, plan_id)] * 2)

    assert sorted(o.split()[0] for o in outcomes) == ["refused", "submitted"]
    [winner] = [o.split()[1] for o in outcomes if o.startswith("submitted")]
    async with open_store(db) as store:
        active = await store.active_run(plan_id)
    assert active is not None and active.id == winner
