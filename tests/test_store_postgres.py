"""What only the PostgreSQL store has to show: processes racing on a fresh database, LISTEN/NOTIFY and its
polling fallback, refusals at connect time, fencing by the database's clock, and callers cancelled
mid-write. The behaviour both stores share is tested on both (test_store.py, test_run_queue.py)."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest
from test_run_queue import execute, stored_plan
from test_store import make_plan, run_workers_together

from mcp_planner import Executor
from mcp_planner.errors import PlanConflictError
from mcp_planner.plan.model import ExecutionPlan, PlanStatus, StepStatus
from mcp_planner.store.base import Event, RunState, StoreError, new_owner_id

psycopg = pytest.importorskip("psycopg", reason="the postgres extra is not installed")

from mcp_planner.store.postgres import PostgresStore, masked  # noqa: E402 (after the skip)

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def admin(url: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    """A connection of the test's own to the database (autocommit)."""
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


async def scalar(conn: psycopg.AsyncConnection[tuple[object, ...]], query: str, *params: object) -> object:
    row = await (await conn.execute(query, params or None)).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


async def until(conn: psycopg.AsyncConnection[tuple[object, ...]], query: str) -> None:
    """Poll until `query` answers true: what other sessions do has no event to wait on."""
    with anyio.fail_after(10):
        while not await scalar(conn, query):  # noqa: ASYNC110 (another session's state)
            await anyio.sleep(0.01)


WAITING_ON_A_LOCK = (
    "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database() "
    "AND wait_event_type = 'Lock'"
)


# -- processes on a fresh database ------------------------------------------------------------------------


async def test_four_processes_opening_a_fresh_database_at_once_migrate_it_once_and_one_claims(
    pg_db: str,
) -> None:
    outcomes = await run_workers_together([("claim", pg_db, "p")] * 4)

    assert sorted(o.split()[0] for o in outcomes) == ["lost", "lost", "lost", "won"]
    async with admin(pg_db) as conn:
        versions = await (
            await conn.execute("SELECT version FROM schema_version ORDER BY version")
        ).fetchall()
    async with PostgresStore.open(pg_db) as store:
        assert [v for (v,) in versions] == list(range(1, await store.schema_version() + 1))


async def test_four_processes_claiming_forty_runs_claim_each_exactly_once(pg_db: str) -> None:
    async with PostgresStore.open(pg_db) as store:
        submitted = {(await store.submit_run(execute(await stored_plan(store), "k"))).id for _ in range(40)}

    outcomes = await run_workers_together([("claim-runs", pg_db, "k")] * 4)

    claimed = [run_id for outcome in outcomes for run_id in outcome.split()[1:]]
    assert sorted(claimed) == sorted(submitted)


async def test_four_processes_submitting_for_one_plan_at_once_exactly_one_succeeds(pg_db: str) -> None:
    async with PostgresStore.open(pg_db) as store:
        plan_id = await stored_plan(store)

    outcomes = await run_workers_together([("submit", pg_db, plan_id)] * 4)

    assert sorted(o.split()[0] for o in outcomes) == ["refused", "refused", "refused", "submitted"]


# -- LISTEN/NOTIFY ----------------------------------------------------------------------------------------


async def test_every_waiting_task_wakes_when_another_process_submits(pg_db: str) -> None:
    async with PostgresStore.open(pg_db) as waiting, PostgresStore.open(pg_db) as submitter:
        plan_id = await stored_plan(submitter)
        woke = 0

        async def wait() -> None:
            nonlocal woke
            await waiting.wait_for_work(timeout=60)
            woke += 1

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(wait)
                await until_listener_reads(waiting)
                await submitter.submit_run(execute(plan_id))
        assert woke == 3


async def until_listener_reads(store: PostgresStore) -> None:
    """Until one of the store's waiting tasks reads its listening connection."""
    with anyio.fail_after(10):
        while not store._listener._reading:
            await anyio.lowlevel.checkpoint()


async def test_a_runs_end_between_a_followers_read_and_its_wait_is_not_missed_though_another_task_read_it(
    pg_db: str,
) -> None:
    async with PostgresStore.open(pg_db) as following, PostgresStore.open(pg_db) as running:
        plan_id = await stored_plan(running)
        run = await running.submit_run(execute(plan_id))
        runner = new_owner_id()
        await running.claim_run(runner, None)
        with anyio.fail_after(10):
            await following.wait_for_work(60)  # reads the submit's notification: none is pending now

        has_read, may_wait = anyio.Event(), anyio.Event()

        async def follower() -> None:
            assert (await following.get_run(run.id)).state == RunState.CLAIMED
            has_read.set()
            await may_wait.wait()
            await following.wait_for_work(60)  # returns at once: the run ended after the read above

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follower)
                await has_read.wait()
                async with anyio.create_task_group() as others:  # another task reads the notification
                    others.start_soon(following.wait_for_work, 60)
                    await until_listener_reads(following)
                    await running.finish_run(run.id, runner)
                may_wait.set()


async def test_a_task_started_by_one_that_read_waits_for_what_comes_next_not_for_what_its_parent_missed(
    pg_db: str,
) -> None:
    async with PostgresStore.open(pg_db) as waiting, PostgresStore.open(pg_db) as submitter:
        first, second = await stored_plan(submitter), await stored_plan(submitter)
        assert await waiting.claim_run(new_owner_id(), None) is None  # this task has read...
        await submitter.submit_run(execute(first))
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:  # ...and another task hears the submit
                tg.start_soon(waiting.wait_for_work, 60)

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiting.wait_for_work, 60)  # a new task: it waits, though its parent would not
                await until_listener_reads(waiting)
                await submitter.submit_run(execute(second))


async def test_notifications_come_for_runs_cancels_and_plan_status_but_not_step_transitions(
    pg_db: str,
) -> None:
    async with PostgresStore.open(pg_db) as store, admin(pg_db) as listening:
        plan = make_plan(steps=2)
        await store.save_plan(plan)
        await listening.execute("LISTEN mcp_planner")
        owner = new_owner_id()

        plan.steps[0].status = StepStatus.RUNNING
        await store.save_transition(plan, plan.steps[:1], [Event(plan_id=plan.id, kind="step_started")])
        plan.status = PlanStatus.EXECUTING
        await store.save_transition(plan, [], [])
        run = await store.submit_run(execute(plan.id))
        assert await store.claim_run(owner, None) is not None  # a claim wakes nobody
        await store.finish_run(run.id, owner)
        await store.claim(plan.id, owner)
        await store.request_cancel(plan.id, "stop")
        await store.heartbeat(plan.id, owner)
        await listening.execute("NOTIFY mcp_planner, 'end'")

        heard = []
        with anyio.fail_after(10):
            async for notify in listening.notifies():
                heard.append(notify.payload)
                if notify.payload == "end":
                    break

    assert heard == ["plans", "runs", "runs", "claims", "end"]


async def test_a_waiter_whose_listening_connection_is_killed_polls_then_reconnects_and_is_woken_again(
    pg_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mcp_planner.store.postgres")
    async with (
        PostgresStore.open(pg_db) as waiting,
        PostgresStore.open(pg_db) as submitter,
        admin(pg_db) as conn,
    ):
        plan_id = await stored_plan(submitter)
        listener = waiting._listener._conn
        assert listener is not None
        pid = listener.info.backend_pid

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiting.wait_for_work, 60)
                await until_listener_reads(waiting)
                await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await waiting.wait_for_work(60)  # reconnects: what was sent meanwhile may be lost, so at once

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiting.wait_for_work, 60)
                await until_listener_reads(waiting)
                await submitter.submit_run(execute(plan_id))

    broke = [r for r in caplog.records if "broke" in r.getMessage()]
    assert len(broke) == 1 and "polling" in broke[0].getMessage()
    assert any("listening for notifications again" in r.getMessage() for r in caplog.records)


async def test_a_wait_returns_after_a_short_poll_while_the_listener_cannot_reconnect(
    pg_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with PostgresStore.open(pg_db) as store:
        await store._listener.close()
        store._listener.closed = False  # broken, not closed: the store still works
        monkeypatch.setattr(store._listener, "_conninfo", "postgresql://127.0.0.1:1/unreachable")

        with anyio.fail_after(10):
            for _ in range(3):
                await store.wait_for_work(timeout=60)

        assert await store.claim_run(new_owner_id(), None) is None


# -- opening ----------------------------------------------------------------------------------------------


async def test_a_database_from_a_newer_version_is_refused(pg_db: str) -> None:
    async with PostgresStore.open(pg_db):
        pass
    async with admin(pg_db) as conn:
        await conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (999, now())")

    with pytest.raises(StoreError, match=r"newer than this mcp-planner supports.*upgrade mcp-planner"):
        async with PostgresStore.open(pg_db):
            pass


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://bob:hunter2@127.0.0.1:1/plans",  # nothing listens there
        "postgresql://bob:hunter2@127.0.0.1:notaport/plans",
        "postgresql://bob:hunter2@/plans?host=/nonexistent",
    ],
)
async def test_an_unreachable_server_or_bad_url_raises_store_error_naming_the_url_without_its_password(
    url: str,
) -> None:
    with pytest.raises(StoreError, match="cannot open the plan database") as raised:
        await PostgresStore.connect(url)

    assert "bob:***@" in str(raised.value) and "hunter2" not in str(raised.value)


async def test_an_unknown_database_raises_store_error(pg_server: str) -> None:
    with pytest.raises(StoreError, match="does_not_exist"):
        await PostgresStore.connect(pg_server.rsplit("/", 1)[0] + "/does_not_exist")


def test_passwords_are_masked_in_urls_and_parameters() -> None:
    assert masked("postgresql://u:p%40ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert masked("postgresql://h/db?user=u&password=secret&sslmode=require") == (
        "postgresql://h/db?user=u&password=***&sslmode=require"
    )
    assert masked("postgres://u@h/db") == "postgres://u@h/db"


async def test_the_store_names_its_url_without_the_password(pg_db: str) -> None:
    url = pg_db.replace("postgres@", "postgres:whatever@")  # trust auth ignores it
    async with PostgresStore.open(url) as store:
        assert store.path == pg_db.replace("postgres@", "postgres:***@")


def test_without_psycopg_the_import_says_which_extra_to_install() -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "try:\n    import mcp_planner.store.postgres\n"
        "except ImportError as exc:\n"
        "    from mcp_planner.store.base import StoreError\n"
        "    assert isinstance(exc, StoreError), type(exc)\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "pip install 'mcp-planner[postgres]'" in done.stdout


async def drop_connections(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    """What a server restart does to a client's idle connections: the server says goodbye and hangs up (once
    the backends have exited: `pg_terminate_backend` only signals them)."""
    cur = await conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    pids = [row[0] for row in await cur.fetchall()]
    await conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
    with anyio.fail_after(10):
        while await scalar(conn, "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", pids):  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_a_server_that_drops_the_stores_idle_connections_costs_no_call(pg_db: str) -> None:
    async with PostgresStore.open(pg_db, min_size=4) as store, admin(pg_db) as conn:
        plan = make_plan()
        await store.save_plan(plan)
        await drop_connections(conn)

        with anyio.fail_after(20):
            assert await store.get_plan(plan.id) == plan  # a new connection, not an error
            plan.steps[0].status = StepStatus.COMPLETED
            await store.save_transition(plan, [plan.steps[0]])
        assert (await store.get_plan(plan.id)).steps[0].status == StepStatus.COMPLETED


async def test_a_plan_runs_to_its_end_through_dropped_connections(pg_db: str) -> None:
    entered, release = anyio.Event(), anyio.Event()

    async def hold(params: dict[str, object]) -> dict[str, object]:
        entered.set()
        await release.wait()
        return params

    async def echo(params: dict[str, object]) -> dict[str, object]:
        return params

    async with PostgresStore.open(pg_db) as store, admin(pg_db) as conn:
        plan = ExecutionPlan.new("through a restart")
        plan.options.require_approval = False
        plan.add_step("hold", "", {"i": 0}, step_id="s0")
        plan.add_step("echo", "", {"prev": "{{ steps.s0.result.i }}"}, step_id="after")
        executor = Executor({"hold": hold, "echo": echo}, store)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(executor.execute, plan)
                await entered.wait()
                await drop_connections(conn)  # mid-run, as a restart of the server would
                release.set()
        assert plan.status == PlanStatus.COMPLETED, plan.error
        assert (await store.get_plan(plan.id)).status == PlanStatus.COMPLETED


# -- fencing and clocks -----------------------------------------------------------------------------------


async def test_a_runner_that_lost_its_claim_writes_nothing_more(pg_db: str) -> None:
    async with PostgresStore.open(pg_db) as first_host, PostgresStore.open(pg_db) as second_host:
        plan, first, second = make_plan(steps=1), new_owner_id(), new_owner_id()
        assert await first_host.start_run(plan, [], first) is None
        taken = await second_host.get_plan(plan.id)

        assert await second_host.start_run(taken, [], second, stale_after=0) is None  # first's beat is stale
        plan.steps[0].status = StepStatus.COMPLETED
        with pytest.raises(PlanConflictError):
            await first_host.save_transition(plan, plan.steps, [Event(plan_id=plan.id, kind="late")])

        assert await first_host.heartbeat(plan.id, first) is None
        assert (await second_host.get_plan(plan.id)).steps[0].status == StepStatus.PENDING
        assert [e.kind for e in await second_host.events(plan.id)] == []


async def test_claims_and_runs_are_stamped_with_the_databases_clock(pg_db: str) -> None:
    async with PostgresStore.open(pg_db) as store, admin(pg_db) as conn:
        owner = new_owner_id()
        await store.claim("p", owner)
        run = await store.submit_run(execute(await stored_plan(store)))
        beat = await store.heartbeat("p", owner)
        db_now = await scalar(conn, "SELECT now()")

        # A claim whose heartbeat the database dates a minute ago is stale, whatever this host's clock says.
        await conn.execute("UPDATE claims SET heartbeat_at = now() - interval '60 seconds'")
        assert await store.claim("p", new_owner_id(), stale_after=30) is None

    assert beat is not None and beat.heartbeat_at <= db_now  # type: ignore[operator]
    assert run.submitted_at <= db_now  # type: ignore[operator]
    assert run.state == RunState.QUEUED


# -- cancellation -----------------------------------------------------------------------------------------


async def test_a_caller_cancelled_mid_write_leaves_the_write_whole_and_no_transaction_open(
    pg_db: str,
) -> None:
    async with PostgresStore.open(pg_db, max_size=1) as store, admin(pg_db) as blocker:
        plan = make_plan()
        await store.save_plan(plan)
        writing, reading = anyio.CancelScope(), anyio.CancelScope()

        async def write() -> None:
            with writing:
                plan.description = "changed"
                await store.save_plan(plan, [Event(plan_id=plan.id, kind="edited")])

        async def read() -> None:
            with reading:  # waits for the pool's one connection, which the write holds
                await store.get_plan(plan.id)

        with anyio.fail_after(20):
            await blocker.execute("BEGIN")
            await blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (plan.id,))
            async with anyio.create_task_group() as tg:
                tg.start_soon(write)
                await until(blocker, WAITING_ON_A_LOCK)
                tg.start_soon(read)
                while not store._pool.get_stats().get("requests_waiting"):
                    await anyio.lowlevel.checkpoint()
                writing.cancel()
                reading.cancel()
                await blocker.execute("COMMIT")  # the write, shielded, goes on once the lock is free

            loaded = await store.get_plan(plan.id)
            events = await store.events(plan.id)
            open_transactions = await scalar(
                blocker,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%'",
            )

    assert reading.cancelled_caught
    assert loaded.description == "changed" and [e.kind for e in events] == ["edited"]
    assert open_transactions == 0
