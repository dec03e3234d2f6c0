"""The plan store on each backend (a SQLite file, a PostgreSQL database): round trips, events, listing,
claims, two processes at once; and SQLite's own files, migrations and locks."""

from __future__ import annotations

import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from mcp_planner.errors import PlanNotFoundError
from mcp_planner.plan.model import ExecutionPlan, PlanStatus, StepResult, StepStatus
from mcp_planner.store import default_location, open_store
from mcp_planner.store.base import Event, QueueStore, Store, new_owner_id
from mcp_planner.store.memory import MemoryStore
from mcp_planner.store.sqlite import PlanStore, StoreError

pytestmark = pytest.mark.anyio

WORKER = Path(__file__).with_name("store_worker.py")


@pytest.fixture
async def store(db: str) -> AsyncIterator[QueueStore]:
    async with open_store(db) as s:
        yield s


def make_plan(description: str = "demo", steps: int = 3) -> ExecutionPlan:
    plan = ExecutionPlan.new(description)
    previous = None
    for i in range(steps):
        params = {"i": i, "prev": f"{{{{ steps.s{i - 1}.result }}}}"} if previous else {"i": i}
        previous = plan.add_step("tools.echo", f"step {i}", params, step_id=f"s{i}")
    return plan


def dead_owner() -> str:
    """An owner id naming a process on this host that has exited."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    return f"{socket.gethostname()}:{int(proc.stdout)}:deadbeef"


# -- plans ------------------------------------------------------------------------------------------------


async def test_plan_round_trips_with_every_field(store: QueueStore) -> None:
    plan = make_plan()
    plan.options.allow_parallel = True
    plan.metadata = {"origin": "test", "nested": {"a": [1, 2]}}
    plan.submit()
    plan.approve("alice")
    plan.steps[0].status = StepStatus.COMPLETED
    plan.steps[0].result = StepResult(
        text='{"v": 1}',
        structured={"v": 1},
        content=[{"type": "image", "data": "AAAA", "mimeType": "image/png"}],
    )
    plan.steps[1].error = "boom"
    await store.save_plan(plan)

    loaded = await store.get_plan(plan.id)

    assert loaded == plan
    assert loaded.is_approved()
    assert loaded is not plan


async def test_ten_thousand_step_plan_round_trips(store: QueueStore) -> None:
    plan = ExecutionPlan.new("big")
    for i in range(10_000):
        plan.add_step("tools.echo", "", {"i": i}, step_id=f"s{i}")

    await store.save_plan(plan)
    loaded = await store.get_plan(plan.id)

    assert loaded == plan
    assert [s.id for s in loaded.steps] == [f"s{i}" for i in range(10_000)]


async def test_multi_megabyte_result_is_kept_whole(store: QueueStore) -> None:
    plan = make_plan()
    big = "".join(chr(ord("a") + i % 26) for i in range(5 * 1024 * 1024))
    plan.steps[0].result = StepResult(text=big, structured={"blob": big[:1000]})
    plan.steps[0].status = StepStatus.COMPLETED
    await store.save_plan(plan)

    loaded = await store.get_plan(plan.id)

    assert loaded.steps[0].result is not None
    assert loaded.steps[0].result.text == big


async def test_unknown_plan_id_raises_plan_not_found(store: QueueStore) -> None:
    with pytest.raises(PlanNotFoundError, match="'nope'"):
        await store.get_plan("nope")
    assert not await store.plan_exists("nope")


async def test_saving_again_replaces_the_steps(store: QueueStore) -> None:
    plan = make_plan(steps=3)
    await store.save_plan(plan)
    plan.steps = plan.steps[:1]
    plan.description = "shorter"
    await store.save_plan(plan)

    loaded = await store.get_plan(plan.id)

    assert loaded.description == "shorter"
    assert [s.id for s in loaded.steps] == ["s0"]


async def test_save_transition_writes_the_header_and_only_the_given_steps(store: QueueStore) -> None:
    plan = make_plan()
    await store.save_plan(plan)
    plan.status = PlanStatus.EXECUTING
    plan.steps[0].status = StepStatus.RUNNING
    plan.steps[1].status = StepStatus.COMPLETED  # changed in memory, not handed to the store

    await store.save_transition(
        plan, [plan.steps[0]], [Event(plan_id=plan.id, kind="step_started", step_id="s0")]
    )
    loaded = await store.get_plan(plan.id)

    assert loaded.status == PlanStatus.EXECUTING
    assert [s.status for s in loaded.steps] == [StepStatus.RUNNING, StepStatus.PENDING, StepStatus.PENDING]
    assert [e.kind for e in await store.events(plan.id)] == ["step_started"]


async def test_save_transition_of_a_plan_not_stored_yet_writes_it_whole(store: QueueStore) -> None:
    plan = make_plan()

    await store.save_transition(plan, [plan.steps[2]])

    assert await store.get_plan(plan.id) == plan


async def test_a_save_that_fails_midway_leaves_nothing(store: QueueStore) -> None:
    plan = make_plan()
    plan.steps[2].id = "s0"  # the second row for s0 breaks the primary key after rows were written

    with pytest.raises(StoreError, match=r"(?i)unique"):
        await store.save_plan(plan, [Event(plan_id=plan.id, kind="created")])

    assert not await store.plan_exists(plan.id)
    assert await store.events(plan.id) == []
    assert await store.list_plans() == []


async def test_a_failed_save_keeps_the_previous_version(store: QueueStore) -> None:
    plan = make_plan()
    await store.save_plan(plan)
    broken = plan.model_copy(deep=True)
    broken.description = "changed"
    broken.steps[1].id = "s0"

    with pytest.raises(StoreError):
        await store.save_plan(broken)

    assert await store.get_plan(plan.id) == plan


async def test_a_cancelled_caller_never_leaves_a_transaction_open(store: QueueStore) -> None:
    plan = make_plan()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await store.save_plan(plan)

    # The write was shielded: it either completed whole or not at all, and the store still works.
    other = make_plan("other")
    await store.save_plan(other)
    assert await store.get_plan(other.id) == other
    assert await store.get_plan(plan.id) == plan


# -- listing ----------------------------------------------------------------------------------------------


async def test_list_plans_is_newest_first_and_filters_by_status(store: QueueStore) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    plans = []
    for i in range(5):
        plan = make_plan(f"plan {i}", steps=1)
        plan.created_at = base + timedelta(seconds=i)  # whole seconds: pydantic drops zero microseconds
        plan.status = PlanStatus.COMPLETED if i % 2 else PlanStatus.DRAFT
        plans.append(plan)
    for plan in reversed(plans):
        await store.save_plan(plan)

    newest = await store.list_plans()
    completed = await store.list_plans(status="completed")
    limited = await store.list_plans(status=PlanStatus.DRAFT, limit=2)

    assert [p.description for p in newest] == ["plan 4", "plan 3", "plan 2", "plan 1", "plan 0"]
    assert [p.description for p in completed] == ["plan 3", "plan 1"]
    assert [p.description for p in limited] == ["plan 4", "plan 2"]
    assert newest[0] == plans[4]


async def test_list_plans_orders_sub_second_creation_times(store: QueueStore) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    early = make_plan("early", steps=1)
    early.created_at = base
    late = make_plan("late", steps=1)
    late.created_at = base + timedelta(microseconds=500_000)
    await store.save_plan(late)
    await store.save_plan(early)

    assert [p.description for p in await store.list_plans()] == ["late", "early"]


# -- events -----------------------------------------------------------------------------------------------


async def test_events_are_numbered_per_plan_and_returned_in_order(store: QueueStore) -> None:
    a, b = make_plan("a"), make_plan("b")
    await store.save_plan(a, [Event(plan_id=a.id, kind="created")])
    await store.save_plan(b, [Event(plan_id=b.id, kind="created")])
    for i in range(3):
        await store.append_event(Event(plan_id=a.id, kind="tick", data={"i": i}))
        await store.append_event(Event(plan_id=b.id, kind="tick", step_id="s1", data={"i": i}))

    events_a = await store.events(a.id)
    events_b = await store.events(b.id)

    assert [e.seq for e in events_a] == [1, 2, 3, 4]
    assert [e.kind for e in events_a] == ["created", "tick", "tick", "tick"]
    assert [e.data for e in events_a[1:]] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert [e.seq for e in events_b] == [1, 2, 3, 4]
    assert events_b[1].step_id == "s1"
    assert all(e.plan_id == b.id for e in events_b)


async def test_the_event_log_refuses_updates_and_deletes(tmp_path: Path) -> None:
    path = tmp_path / "plans.db"
    async with PlanStore.open(path) as store:
        await store.append_event(Event(plan_id="p", kind="created"))

    with sqlite3.connect(path) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE events SET kind = 'forged'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM events")
    conn.close()

    async with PlanStore.open(path) as store:
        assert [e.kind for e in await store.events("p")] == ["created"]


# -- files, paths, migrations -----------------------------------------------------------------------------


async def test_database_file_and_new_directory_are_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "plans.db"
    async with PlanStore.open(path) as store:
        await store.save_plan(make_plan())
        wal = anyio.Path(f"{path}-wal")
        assert stat.S_IMODE((await anyio.Path(path).stat()).st_mode) == 0o600
        assert stat.S_IMODE((await anyio.Path(path.parent).stat()).st_mode) == 0o700
        assert await wal.exists()
        assert stat.S_IMODE((await wal.stat()).st_mode) == 0o600


def test_default_path_is_in_the_user_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_location() == tmp_path / "xdg" / "mcp-planner" / "plans.db"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    fallback = tmp_path / "home" / ".local" / "share" / "mcp-planner" / "plans.db"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")  # the XDG spec says to ignore relative paths
    assert default_location() == fallback
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_location() == fallback


async def test_reopening_applies_no_migration_twice_and_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "plans.db"
    plan = make_plan()
    async with PlanStore.open(path) as store:
        await store.save_plan(plan)
        first = await store.schema_version()
    for _ in range(2):
        async with PlanStore.open(path) as store:
            assert await store.schema_version() == first
            assert await store.get_plan(plan.id) == plan

    with sqlite3.connect(path) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY version")]
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert versions == list(range(1, first + 1))
    assert journal == "wal"


async def test_a_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plans.db"
    async with PlanStore.open(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (999, 'later')")
    conn.close()

    with pytest.raises(StoreError, match="upgrade mcp-planner"):
        async with PlanStore.open(path):
            pass


async def test_an_unopenable_path_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    with pytest.raises(StoreError, match="cannot open"):
        async with PlanStore.open(blocker / "plans.db"):
            pass


async def test_a_closed_store_raises_store_error(tmp_path: Path) -> None:
    store = await PlanStore.connect(tmp_path / "plans.db")
    await store.close()

    with pytest.raises(StoreError, match="closed"):
        await store.get_plan("x")


async def test_plan_store_implements_the_store_protocol(store: QueueStore) -> None:
    typed: Store = store
    assert await typed.list_plans() == []


async def test_a_write_waits_for_another_connections_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "plans.db"
    plan = make_plan()
    async with PlanStore.open(path) as store:
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.save_plan, plan)
                await anyio.wait_all_tasks_blocked()
                blocker.execute("COMMIT")
        finally:
            blocker.close()
        assert await store.get_plan(plan.id) == plan


async def test_a_fast_path_write_that_finds_a_lock_waits_for_it_without_blocking_the_event_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "plans.db"
    plan = make_plan(steps=2)
    async with PlanStore.open(path) as store:
        await store.save_plan(plan)
        plan.steps[0].status = StepStatus.RUNNING
        blocker = sqlite3.connect(path, isolation_level=None)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await anyio.sleep(0.01)
                ticks += 1

        try:
            blocker.execute("BEGIN IMMEDIATE")
            async with anyio.create_task_group() as tg:
                tg.start_soon(tick)
                with anyio.fail_after(5):
                    async with anyio.create_task_group() as writer:
                        writer.start_soon(store.save_transition, plan, plan.steps[:1])
                        await anyio.sleep(0.3)  # the write waits on the connection's thread meanwhile
                        assert ticks >= 10  # ... and the event loop went on
                        blocker.execute("COMMIT")
                tg.cancel_scope.cancel()
        finally:
            blocker.close()
        assert (await store.get_plan(plan.id)).steps[0].status == StepStatus.RUNNING
        assert (await store.progress(plan.id)).counts[StepStatus.RUNNING] == 1


async def test_the_wal_is_checkpointed_though_automatic_checkpoints_are_off(tmp_path: Path) -> None:
    path = tmp_path / "plans.db"
    plan = make_plan(steps=1)
    async with PlanStore.open(path) as store:
        await store.save_plan(plan)
        for i in range(1500):
            plan.steps[0].error = f"round {i}"
            await store.save_transition(plan, plan.steps)
        wal = (await anyio.Path(f"{path}-wal").stat()).st_size  # closing the store removes it
    assert wal < 4_000_000  # checkpoints let SQLite reuse the log: it stays ~2 MB; without them, 12 MB


async def test_a_write_blocked_for_too_long_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "plans.db"
    async with PlanStore.open(path, busy_timeout_ms=20) as store:
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="locked"):
                await store.save_plan(make_plan())
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        plan = make_plan()
        await store.save_plan(plan)  # usable again once the lock is gone
        assert await store.get_plan(plan.id) == plan


# -- claims -----------------------------------------------------------------------------------------------


async def test_a_free_plan_is_claimed_and_a_second_owner_is_refused(store: QueueStore) -> None:
    me, other = new_owner_id(), new_owner_id()

    assert await store.claim("p", me) is None
    in_the_way = await store.claim("p", other)

    assert in_the_way is not None
    assert in_the_way.owner == me
    assert await store.claim("p", me) is None  # the holder may claim again
    claim = await store.get_claim("p")
    assert claim is not None and claim.owner == me


async def test_heartbeat_refreshes_the_claim_and_reports_a_lost_one(store: QueueStore) -> None:
    me = new_owner_id()
    await store.claim("p", me)
    before = await store.get_claim("p")

    beat = await store.heartbeat("p", me)

    assert before is not None and beat is not None
    assert beat.heartbeat_at >= before.heartbeat_at
    assert beat.cancel_reason is None
    assert await store.heartbeat("p", new_owner_id()) is None
    assert await store.heartbeat("unclaimed", me) is None


async def test_release_drops_only_the_owners_claim(store: QueueStore) -> None:
    me = new_owner_id()
    await store.claim("p", me)

    await store.release("p", new_owner_id())
    assert await store.get_claim("p") is not None

    await store.release("p", me)
    assert await store.get_claim("p") is None
    assert await store.heartbeat("p", me) is None


async def test_a_stale_claim_is_taken_over(store: QueueStore) -> None:
    me, other = new_owner_id(), new_owner_id()
    await store.claim("p", me)

    assert await store.claim("p", other, stale_after=0) is None

    claim = await store.get_claim("p")
    assert claim is not None and claim.owner == other
    assert await store.heartbeat("p", me) is None


async def test_a_dead_owners_claim_is_taken_over_at_once(store: QueueStore) -> None:
    dead = dead_owner()
    await store.claim("p", dead)
    me = new_owner_id()

    assert await store.claim("p", me) is None

    claim = await store.get_claim("p")
    assert claim is not None and claim.owner == me


async def test_request_cancel_is_seen_by_the_owner_on_its_next_heartbeat(store: QueueStore) -> None:
    me = new_owner_id()
    await store.claim("p", me)

    assert await store.request_cancel("p", "user asked") is True
    beat = await store.heartbeat("p", me)

    assert beat is not None and beat.cancel_reason == "user asked"


async def test_request_cancel_without_a_live_owner_returns_false(store: QueueStore) -> None:
    assert await store.request_cancel("nobody", "stop") is False
    await store.claim("dead", dead_owner())
    assert await store.request_cancel("dead", "stop") is False


async def test_start_run_claims_and_writes_the_plan_in_one_transaction_or_writes_nothing(
    store: QueueStore,
) -> None:
    plan, other, me = make_plan(), new_owner_id(), new_owner_id()
    await store.claim(plan.id, other)
    started = Event(plan_id=plan.id, kind="plan_started")

    in_the_way = await store.start_run(plan, [started], me)

    assert in_the_way is not None and in_the_way.owner == other
    assert not await store.plan_exists(plan.id) and plan.revision == 0
    await store.release(plan.id, other)
    assert await store.start_run(plan, [started], me) is None
    claim = await store.get_claim(plan.id)
    assert claim is not None and claim.owner == me
    assert await store.get_plan(plan.id) == plan and plan.revision == 1
    assert [e.kind for e in await store.events(plan.id)] == ["plan_started"]


async def test_a_runs_last_transition_releases_its_claim(store: QueueStore) -> None:
    plan, me = make_plan(steps=1), new_owner_id()
    assert await store.start_run(plan, [], me) is None
    plan.steps[0].status = StepStatus.COMPLETED
    plan.status = PlanStatus.COMPLETED

    await store.save_transition(plan, plan.steps, [Event(plan_id=plan.id, kind="plan_completed")], release=me)

    assert await store.get_claim(plan.id) is None
    assert (await store.get_plan(plan.id)).status == PlanStatus.COMPLETED


async def test_progress_counts_steps_by_status_and_returns_the_events_after_a_seq(store: QueueStore) -> None:
    plan = make_plan(steps=3)
    await store.save_plan(plan, [Event(plan_id=plan.id, kind="plan_created")])
    first = await store.progress(plan.id)
    assert first.counts[StepStatus.PENDING] == 3 and first.total == 3 and first.done == 0
    assert first.seq == 1 and first.events == []

    plan.steps[0].status = StepStatus.COMPLETED
    plan.steps[1].status = StepStatus.RUNNING
    moved = [Event(plan_id=plan.id, kind="step_completed", step_id="s0")]
    await store.save_transition(plan, plan.steps[:2], moved)
    await store.save_transition(plan, plan.steps[1:2], [])  # the same status again counts once

    later = await store.progress(plan.id, first.seq)
    assert later.counts[StepStatus.COMPLETED] == 1 and later.counts[StepStatus.RUNNING] == 1
    assert later.counts[StepStatus.PENDING] == 1 and later.done == 1
    assert [e.kind for e in later.events] == ["step_completed"] and later.seq == 2
    plan.steps.pop()  # a whole-plan write (an edit) counts again from the steps it stores
    await store.save_plan(plan)
    assert (await store.progress(plan.id)).total == 2
    with pytest.raises(PlanNotFoundError):
        await store.progress("nope")


async def test_a_short_summary_reads_the_steps_that_need_attention_and_matches_the_plans_own(
    store: QueueStore,
) -> None:
    plan = make_plan(steps=8)
    statuses = ["completed", "completed", "failed", "completed", "running", "skipped", "pending", "completed"]
    for step, status in zip(plan.steps, statuses, strict=True):
        step.status = StepStatus(status)
    plan.steps[2].error = "exit 2"
    plan.steps[2].retry_count = 1
    plan.steps[0].duration_ms = 12
    plan.status = PlanStatus.PARTIAL
    plan.error = "step 's2' failed"
    await store.save_plan(plan)

    short = await store.summary(plan.id, 4)

    assert short == plan.summary(4)
    assert [s.id for s in short.steps] == ["s2", "s4", "s5", "s6"]  # failed, running, skipped, pending
    assert short.steps_omitted == 4 and short.completed == 4 and short.total_steps == 8
    assert short.steps[0].error == "exit 2" and short.steps[0].retry_count == 1
    whole = await store.summary(plan.id, 100)
    assert whole == plan.summary() and whole.steps[0].duration_ms == 12 and whole.steps_omitted == 0
    with pytest.raises(PlanNotFoundError):
        await store.summary("nope", 3)


@pytest.mark.parametrize("kind", ["database", "memory"])
async def test_recent_plans_are_heads_newest_first(db: str, kind: str) -> None:
    async with open_store(db) as database:
        store: Store = database if kind == "database" else MemoryStore()
        plans = [make_plan(f"plan {i}", steps=2) for i in range(3)]
        for i, plan in enumerate(plans):
            plan.created_at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=i)
            await store.save_plan(plan)
        heads = await store.recent_plans(2)
        assert [h.id for h in heads] == [plans[2].id, plans[1].id]
        assert heads[0].description == "plan 2" and heads[0].status == PlanStatus.DRAFT
        assert await store.recent_plans(0) == []


async def test_a_transition_naming_a_step_that_is_not_stored_is_refused(store: QueueStore) -> None:
    plan = make_plan(steps=1)
    await store.save_plan(plan)
    stray = plan.add_step("tools.echo", "", {}, step_id="stray")
    with pytest.raises(StoreError, match="not stored"):
        await store.save_transition(plan, [stray])


# -- two processes ----------------------------------------------------------------------------------------


async def start_worker(*args: str) -> tuple[Process, BufferedByteReceiveStream]:
    proc = await anyio.open_process(
        [sys.executable, str(WORKER), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
    )
    assert proc.stdout is not None
    return proc, BufferedByteReceiveStream(proc.stdout)


async def read_line(reader: BufferedByteReceiveStream) -> str:
    with anyio.fail_after(30):
        return (await reader.receive_until(b"\n", 100_000)).decode()  # a line of up to 20 run ids


async def run_workers_together(workers: list[tuple[str, ...]]) -> list[str]:
    """Start the workers, wait until each is ready, release them at once, and collect their outcomes."""
    started = [await start_worker(*args) for args in workers]
    try:
        for _, reader in started:
            assert await read_line(reader) == "ready"
        for proc, _ in started:
            assert proc.stdin is not None
            await proc.stdin.send(b"go\n")
        outcomes = [await read_line(reader) for _, reader in started]
    finally:
        for proc, _ in started:
            assert proc.stdin is not None
            await proc.stdin.aclose()
        for proc, _ in started:
            with anyio.fail_after(30):
                await proc.wait()
            await proc.aclose()
    assert [proc.returncode for proc, _ in started] == [0] * len(started)
    return outcomes


@pytest.mark.parametrize("round_", range(3))
async def test_two_processes_claiming_at_once_exactly_one_wins(db: str, round_: int) -> None:
    async with open_store(db) as store:
        await store.save_plan(make_plan())

    outcomes = await run_workers_together([("claim", db, f"plan-{round_}")] * 2)

    assert sorted(o.split()[0] for o in outcomes) == ["lost", "won"]


async def test_two_processes_writing_at_once_lose_no_update(db: str) -> None:
    plan = make_plan(steps=2)
    count = 40
    async with open_store(db) as store:
        await store.save_plan(plan)

    outcomes = await run_workers_together(
        [("write", db, plan.id, "s0", str(count)), ("write", db, plan.id, "s1", str(count))]
    )

    assert outcomes == ["done", "done"]
    async with open_store(db) as store:
        loaded = await store.get_plan(plan.id)
        events = await store.events(plan.id)
    assert [s.retry_count for s in loaded.steps] == [count, count]
    assert [e.seq for e in events] == list(range(1, 4 * count + 1))
    for step_id in ("s0", "s1"):
        ticks = [e.data["n"] for e in events if e.step_id == step_id and e.kind == "tick"]
        notes = [e.data["n"] for e in events if e.step_id == step_id and e.kind == "note"]
        assert ticks == list(range(count))
        assert notes == list(range(count))


async def test_database_path_can_be_given_as_a_string_or_a_path(tmp_path: Path) -> None:
    for path in (str(tmp_path / "a.db"), tmp_path / "b.db"):
        async with PlanStore.open(path) as store:
            await store.save_plan(make_plan())
    assert await anyio.Path(tmp_path / "a.db").exists()
    assert await anyio.Path(tmp_path / "b.db").exists()


async def test_a_committed_transition_survives_the_process_being_killed(db: str) -> None:
    plan = make_plan()
    async with open_store(db) as store:
        await store.save_plan(plan)
    proc, reader = await start_worker("commit", db, plan.id)
    try:
        assert await read_line(reader) == "ready"
        assert proc.stdin is not None
        await proc.stdin.send(b"go\n")
        assert await read_line(reader) == "committed"
        proc.kill()  # SIGKILL: no cleanup, no checkpoint, no close
        with anyio.fail_after(30):
            await proc.wait()
    finally:
        await proc.aclose()

    async with open_store(db) as store:
        loaded = await store.get_plan(plan.id)
        events = await store.events(plan.id)
    assert loaded.steps[0].status == StepStatus.COMPLETED
    assert loaded.steps[0].result is not None and loaded.steps[0].result.structured == {"answer": 42}
    assert [e.kind for e in events] == ["step_completed"]
