"""The run queue on PostgreSQL: runs that outlive the process that submitted them, the runners that claim and
execute them, the tool catalogs runners publish, and the LISTEN connection that wakes whoever waits for
work. `postgres.PostgresStore` inherits it and serves it through the same pool; this module also holds the
transaction helper both share.

Each method is one statement where it can be (autocommit), else one transaction. Runners claim with
`SELECT ... FOR UPDATE SKIP LOCKED` in the subquery of `_CLAIM_RUN`, so concurrent runners skip each
other's rows instead of waiting; the partial unique index keeps one active run per plan. Times are the
database's clock (`now()`), never a host's: hosts' clocks differ, and staleness is judged in SQL.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from datetime import datetime
from types import EllipsisType
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import anyio
import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from mcp_planner.errors import PlanNotFoundError, RunNotFoundError
from mcp_planner.plan.model import utcnow
from mcp_planner.store.base import (
    DEFAULT_STALE_AFTER,
    RunKind,
    RunnerInfo,
    RunRecord,
    RunRequest,
    RunState,
    StoreError,
    encode_json,
    owner_is_dead,
    queued_run,
    run_in_progress,
)

T = TypeVar("T")
Conn: TypeAlias = psycopg.AsyncConnection[TupleRow]

logger = logging.getLogger("mcp_planner.store.postgres")

#: The one channel every notification goes to: a run queued, requeued or finished, a cancel requested, a
#: plan's status changed (the triggers of `NOTIFY_MIGRATION`).
CHANNEL = "mcp_planner"
#: How long `wait_for_work` waits before it returns while the listening connection is broken.
POLL_FALLBACK = 0.5
#: How long opening a connection may take (libpq's `connect_timeout`, unless the URL sets one).
CONNECT_TIMEOUT = 10

#: The queue's schema, the store's migration 2 (`postgres.MIGRATIONS`). Append a new migration, never edit.
QUEUE_MIGRATION: tuple[str, ...] = (
    """CREATE TABLE runs (
        id text PRIMARY KEY,
        n bigint GENERATED ALWAYS AS IDENTITY,
        plan_id text NOT NULL,
        kind text NOT NULL,
        rerun_interrupted boolean NOT NULL,
        servers text,
        submitted_by text NOT NULL,
        state text NOT NULL,
        submitted_at timestamptz NOT NULL,
        runner text,
        claimed_at timestamptz,
        finished_at timestamptz,
        error text
    )""",
    # At most one active run per plan, enforced where two racing processes meet.
    "CREATE UNIQUE INDEX runs_one_active_per_plan ON runs (plan_id) WHERE state IN ('queued', 'claimed')",
    "CREATE INDEX runs_queued ON runs (submitted_at, n) WHERE state = 'queued'",
    "CREATE INDEX runs_claimed ON runs (runner) WHERE state = 'claimed'",
    "CREATE INDEX runs_by_plan ON runs (plan_id, submitted_at, n)",
    """CREATE TABLE runners (
        id text PRIMARY KEY,
        servers text,
        started_at timestamptz NOT NULL,
        heartbeat_at timestamptz NOT NULL,
        runs integer NOT NULL DEFAULT 0
    )""",
    # Keyed by `servers`, NULL included: `save_catalog` replaces under a table lock (a unique index would
    # let NULLs repeat, and NULLS NOT DISTINCT needs PostgreSQL 15).
    """CREATE TABLE catalogs (
        servers text,
        tools text NOT NULL,
        saved_at timestamptz NOT NULL
    )""",
)

#: Migration 3: NOTIFY on `CHANNEL` for what a waiter must see; never on a step's transition (the hot
#: path: a notifying commit takes a cluster-wide lock). A run claimed wakes nobody.
NOTIFY_MIGRATION: tuple[str, ...] = (
    f"""CREATE FUNCTION planner_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME);
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER runs_queued_notify AFTER INSERT ON runs FOR EACH ROW EXECUTE FUNCTION planner_notify()",
    """CREATE TRIGGER runs_state_notify AFTER UPDATE OF state ON runs FOR EACH ROW
        WHEN (old.state IS DISTINCT FROM new.state AND new.state <> 'claimed')
        EXECUTE FUNCTION planner_notify()""",
    """CREATE TRIGGER claims_cancel_notify AFTER UPDATE OF cancel_reason ON claims FOR EACH ROW
        WHEN (new.cancel_reason IS NOT NULL AND old.cancel_reason IS DISTINCT FROM new.cancel_reason)
        EXECUTE FUNCTION planner_notify()""",
    """CREATE TRIGGER plans_status_notify AFTER UPDATE OF status ON plans FOR EACH ROW
        WHEN (old.status IS DISTINCT FROM new.status)
        EXECUTE FUNCTION planner_notify()""",
)

_RUN_COLUMNS = (
    "id, plan_id, kind, rerun_interrupted, servers, submitted_by, state, submitted_at, runner, claimed_at, "
    "finished_at, error"
)
_RUNS_COLUMNS = ", ".join(f"runs.{c.strip()}" for c in _RUN_COLUMNS.split(","))
# Stamped with the database's clock; the run as stored is what the submitter gets back.
_INSERT_RUN = f"""
INSERT INTO runs ({_RUN_COLUMNS})
SELECT %s, %s, %s, %s, %s, %s, 'queued', now(), NULL, NULL, NULL, NULL
WHERE EXISTS (SELECT 1 FROM plans WHERE id = %s)
RETURNING {_RUN_COLUMNS}
"""
# `IS NOT DISTINCT FROM`: a run without a servers file (NULL) goes to a runner without one.
_CLAIM_RUN = f"""
UPDATE runs SET state = 'claimed', runner = %s, claimed_at = now()
WHERE id = (
    SELECT id FROM runs WHERE state = 'queued' AND servers IS NOT DISTINCT FROM %s
    ORDER BY submitted_at, n LIMIT 1 FOR UPDATE SKIP LOCKED
)
RETURNING {_RUN_COLUMNS}
"""
# One statement: the run is done and counted for its runner, or neither.
_FINISH_RUN = """
WITH done AS (
    UPDATE runs SET state = 'done', finished_at = now(), error = %s
    WHERE id = %s AND state = 'claimed' AND runner = %s RETURNING runner
), counted AS (
    UPDATE runners SET runs = runs + 1 WHERE id IN (SELECT runner FROM done)
)
SELECT count(*) FROM done
"""
_CLAIMED_RUNS = """
SELECT runs.id, runs.runner,
    runners.heartbeat_at IS NOT NULL AND now() - runners.heartbeat_at < %s * interval '1 second'
FROM runs LEFT JOIN runners ON runners.id = runs.runner WHERE runs.state = 'claimed'
"""
# `runs.runner = o.runner`: a run another requeuer queued (and someone claimed) since is left alone.
_REQUEUE_RUNS = f"""
UPDATE runs SET state = 'queued', kind = 'resume', runner = NULL, claimed_at = NULL
FROM unnest(%s::text[], %s::text[]) AS o (run_id, old_runner)
WHERE runs.id = o.run_id AND runs.state = 'claimed' AND runs.runner = o.old_runner
RETURNING {_RUNS_COLUMNS}
"""
#: Ages (seconds before the database's now) rather than the caller's clock.
_REGISTER_RUNNER = """
INSERT INTO runners (id, servers, started_at, heartbeat_at, runs)
VALUES (%s, %s, now() - %s * interval '1 second', now() - %s * interval '1 second', %s)
ON CONFLICT (id) DO UPDATE SET servers = excluded.servers, started_at = excluded.started_at,
    heartbeat_at = excluded.heartbeat_at, runs = excluded.runs
"""
_RUNNERS = """
SELECT id, servers, started_at, heartbeat_at, runs, now() - heartbeat_at < %s * interval '1 second'
FROM runners ORDER BY started_at, id
"""
# Stale ones are checked again: one may have beaten since it was read.
_FORGET_RUNNERS = """
DELETE FROM runners
WHERE id = ANY(%s::text[]) OR (id = ANY(%s::text[]) AND now() - heartbeat_at >= %s * interval '1 second')
"""


#: The BEGIN of a transaction reading one snapshot across its statements.
READ_ONLY = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"


@asynccontextmanager
async def transaction(conn: Conn, begin: str = "BEGIN") -> AsyncIterator[None]:
    """One transaction on an autocommit connection, pipelined: its statements go out together and their
    results come back on the first fetch or at the end, so a transaction whose statements do not wait on
    each other's results is one round trip. A transaction an error left open is rolled back by
    `PostgresStore._run`, which owns the connection.
    """
    failed: psycopg.Error | None = None
    try:
        async with conn.pipeline():
            try:
                await conn.execute(begin)
                yield
                await conn.execute("COMMIT")
            except psycopg.Error as exc:
                # Raised while statements were still queued: the pipeline ends aborted, and psycopg would
                # log that as a warning if this exception were on its way out of the block.
                failed = exc
    except psycopg.Error:
        if failed is None:
            raise
    if failed is not None:
        raise failed


def _run_from_row(row: tuple[Any, ...]) -> RunRecord:
    (rid, plan_id, kind, rerun, servers, by, state, submitted, runner, claimed, finished, error) = row
    return RunRecord(
        id=rid,
        plan_id=plan_id,
        kind=RunKind(kind),
        rerun_interrupted=rerun,
        servers=servers,
        submitted_by=by,
        state=RunState(state),
        submitted_at=submitted,
        runner=runner,
        claimed_at=claimed,
        finished_at=finished,
        error=error,
    )


async def _active_run(conn: Conn, plan_id: str) -> RunRecord | None:
    cur = await conn.execute(
        f"SELECT {_RUN_COLUMNS} FROM runs WHERE plan_id = %s AND state IN ('queued', 'claimed')", (plan_id,)
    )
    row = await cur.fetchone()
    return _run_from_row(row) if row is not None else None


def _age(at: datetime) -> float:
    return max((utcnow() - at).total_seconds(), 0.0)


class Listener:
    """The connection (not the pool's) that LISTENs on `CHANNEL`, and what it has heard.

    `notices` counts the notifications read (and reconnections, after which some may have been missed). No
    task of its own: one waiting task at a time reads the connection, the others wait for it to tell them.
    A broken connection is opened again by the next wait; until then waits poll.
    """

    def __init__(self, conninfo: str, path: str) -> None:
        self._conninfo = conninfo
        self._path = path
        self._conn: Conn | None = None
        self.notices = 0
        self._changed = anyio.Event()
        self._reading = False
        self._reconnecting = anyio.Lock()
        self._retry_at = 0.0
        self._warned = False
        self.closed = False

    async def open(self) -> Conn:
        """Connect and LISTEN; the connection is returned too (the store migrates through it first).

        Raises:
            psycopg.Error: the server cannot be reached.
        """
        conn = await connect(self._conninfo)
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        self._conn = conn
        return conn

    async def close(self) -> None:
        self.closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await conn.close()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait(self) -> bool:
        """Wait until `notices` may have changed: a notification was read, or another reader stopped.

        Returns:
            False when the connection is broken and could not be opened again: then after `POLL_FALLBACK`.

        Raises:
            StoreError: the store is closed.
        """
        if self.closed:
            raise StoreError(f"plan database {self._path!r} is closed: open the store again")
        conn = self._conn
        if conn is None or conn.closed:
            if await self._reconnect():
                self.notices += 1  # notifications sent while it was down are lost: waiters re-check
                self._notify()
                return True
            await anyio.sleep(POLL_FALLBACK)
            return False
        if self._reading:
            await self._changed.wait()
            return True
        self._reading = True
        try:
            async with aclosing(conn.notifies(stop_after=1)) as notifies:
                async for _ in notifies:
                    self.notices += 1
        except (psycopg.Error, OSError) as exc:
            if self.closed:  # closed under this wait: the caller finds the store closed
                return True
            self._broken(exc)
            with anyio.CancelScope(shield=True):
                await conn.close()
            await anyio.sleep(POLL_FALLBACK)
            return False
        finally:
            self._reading = False
            self._notify()  # the other waiters look again; one of them reads next
        return True

    def _broken(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "plan database %r: the connection listening for notifications broke (%s); polling every "
                "%.1f s until it reconnects",
                self._path,
                exc,
                POLL_FALLBACK,
            )

    async def _reconnect(self) -> bool:
        async with self._reconnecting:
            if self._conn is not None and not self._conn.closed:
                return True
            if anyio.current_time() < self._retry_at:
                return False
            self._retry_at = anyio.current_time() + POLL_FALLBACK
            try:
                with anyio.fail_after(CONNECT_TIMEOUT):
                    await self.open()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                self._broken(exc)
                return False
            if self._warned:
                logger.info("plan database %r: listening for notifications again", self._path)
            self._warned = False
            return True


def libpq_defaults(conninfo: str) -> dict[str, Any]:
    """The connection settings the store uses unless the URL sets them: a connect timeout, and TCP keepalives,
    so a server or network that vanished is noticed within about a minute, not after the kernel's hours."""
    defaults = {
        "connect_timeout": CONNECT_TIMEOUT,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    return {name: value for name, value in defaults.items() if name not in conninfo}


async def connect(conninfo: str) -> Conn:
    """A new autocommit connection, with `libpq_defaults`.

    Raises:
        psycopg.Error: bad URL, unreachable server, refused login.
    """
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True, **libpq_defaults(conninfo))


class PostgresRunQueue:
    """`base.RunQueue` on the store's pool: a mixin for `postgres.PostgresStore`, which provides `_run`,
    `_listener` and `_mark` (a task's id and `Listener.notices` as of its first read since its last wait:
    a context variable, and tagged with the task, as a new task inherits its parent's context)."""

    _listener: Listener
    _mark: contextvars.ContextVar[tuple[int, int] | None]
    #: Set when a run is queued through this store: `local_only` waits need no notification.
    _local_work: anyio.Event | None = None

    if TYPE_CHECKING:

        async def _run(self, fn: Callable[[Conn], Awaitable[T]]) -> T: ...

    # -- runs ---------------------------------------------------------------------------------------------

    async def submit_run(self, request: RunRequest) -> RunRecord:
        """Queue a run of `request.plan_id`; the partial unique index keeps one active run per plan, so of
        two processes submitting at once exactly one succeeds.

        Raises:
            PlanNotFoundError: no such plan.
            PlanStateError: the plan already has an active run.
        """
        run = queued_run(request)
        params = (run.id, run.plan_id, run.kind.value, run.rerun_interrupted, run.servers, run.submitted_by)

        async def body(conn: Conn) -> RunRecord:
            try:
                cur = await conn.execute(_INSERT_RUN, (*params, run.plan_id))
            except psycopg.errors.UniqueViolation:
                active = await _active_run(conn, run.plan_id)  # autocommit: the failed insert is gone
                if active is None:
                    raise
                raise run_in_progress(active) from None
            row = await cur.fetchone()
            if row is None:
                raise PlanNotFoundError(run.plan_id)
            return _run_from_row(row)

        stored = await self._run(body)
        self._wake()
        return stored

    def _wake(self) -> None:
        if self._local_work is None:
            self._local_work = anyio.Event()
        self._local_work.set()

    def _note_read(self) -> None:
        """Mark, for this task's next `wait_for_work`, what the listener had heard before this read: a
        notification read meanwhile (by any task) ends that wait at once, so none falls between a read that
        found nothing new and the wait."""
        task, mark = anyio.get_current_task().id, self._mark.get()
        if mark is None or mark[0] != task:
            self._mark.set((task, self._listener.notices))

    def _take_local_work(self) -> bool:
        """Whether a run was queued through this store since the last call."""
        if self._local_work is None or not self._local_work.is_set():
            return False
        self._local_work = None
        return True

    async def claim_run(self, runner: str, servers: str | None) -> RunRecord | None:
        """Claim for `runner` the oldest queued run for `servers` (None matches None); None if none.

        It also marks, for this task's next `wait_for_work`, what the listener had heard before it looked.
        """
        self._take_local_work()
        self._note_read()

        async def body(conn: Conn) -> RunRecord | None:
            row = await (await conn.execute(_CLAIM_RUN, (runner, servers))).fetchone()
            return _run_from_row(row) if row is not None else None

        return await self._run(body)

    async def finish_run(self, run_id: str, runner: str, error: str | None = None) -> bool:
        """Mark `runner`'s claimed run done, with `error` if it did not run, and count it for `runner`.

        Returns:
            False when `runner` does not hold the run (it was requeued meanwhile): nothing changed.
        """

        async def body(conn: Conn) -> bool:
            row = await (await conn.execute(_FINISH_RUN, (error, run_id, runner))).fetchone()
            return row is not None and row[0] > 0

        return await self._run(body)

    async def cancel_queued_run(self, plan_id: str, reason: str) -> bool:
        """Mark the plan's queued run done with error `reason`; False if it has none queued."""

        async def body(conn: Conn) -> bool:
            cancelled = await conn.execute(
                "UPDATE runs SET state = 'done', finished_at = now(), error = %s "
                "WHERE plan_id = %s AND state = 'queued'",
                (reason, plan_id),
            )
            return cancelled.rowcount > 0

        return await self._run(body)

    async def get_run(self, run_id: str) -> RunRecord:
        """Raises: RunNotFoundError."""
        self._note_read()  # a follower reads its run, then waits

        async def body(conn: Conn) -> tuple[Any, ...] | None:
            return await (
                await conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = %s", (run_id,))
            ).fetchone()

        row = await self._run(body)
        if row is None:
            raise RunNotFoundError(run_id)
        return _run_from_row(row)

    async def active_run(self, plan_id: str) -> RunRecord | None:
        return await self._run(lambda conn: _active_run(conn, plan_id))

    async def last_run(self, plan_id: str) -> RunRecord | None:
        async def body(conn: Conn) -> tuple[Any, ...] | None:
            cur = await conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE plan_id = %s "
                "ORDER BY submitted_at DESC, n DESC LIMIT 1",
                (plan_id,),
            )
            return await cur.fetchone()

        row = await self._run(body)
        return _run_from_row(row) if row is not None else None

    async def requeue_orphans(self, stale_after: float = DEFAULT_STALE_AFTER) -> list[RunRecord]:
        """Queue again, as resumes, the claimed runs whose runner is gone: unregistered, dead on this host,
        or with a heartbeat older than `stale_after` seconds by the database's clock. Returns them as they
        are now; a run another process requeued first is not in the list."""

        async def body(conn: Conn) -> list[RunRecord]:
            claimed = await (await conn.execute(_CLAIMED_RUNS, (stale_after,))).fetchall()
            orphans = [(rid, runner) for rid, runner, fresh in claimed if not fresh or owner_is_dead(runner)]
            if not orphans:
                return []
            ids, runners = [list(column) for column in zip(*orphans, strict=True)]
            rows = await (await conn.execute(_REQUEUE_RUNS, (ids, runners))).fetchall()
            return [_run_from_row(row) for row in rows]

        requeued = await self._run(body)
        if requeued:
            self._wake()
        return requeued

    # -- runners ------------------------------------------------------------------------------------------

    async def register_runner(self, info: RunnerInfo) -> None:
        """Register (or replace) a runner. Its times are kept as ages before the database's clock, so the
        caller's clock never meets another host's."""
        params = (info.id, info.servers, _age(info.started_at), _age(info.heartbeat_at), info.runs)

        async def body(conn: Conn) -> None:
            await conn.execute(_REGISTER_RUNNER, params)

        await self._run(body)

    async def heartbeat_runner(self, runner_id: str) -> bool:
        """Refresh the runner's heartbeat; False if its row is gone (it was taken as dead)."""

        async def body(conn: Conn) -> bool:
            beat = await conn.execute("UPDATE runners SET heartbeat_at = now() WHERE id = %s", (runner_id,))
            return beat.rowcount > 0

        return await self._run(body)

    async def unregister_runner(self, runner_id: str) -> None:
        async def body(conn: Conn) -> None:
            await conn.execute("DELETE FROM runners WHERE id = %s", (runner_id,))

        await self._run(body)

    async def live_runners(
        self, servers: str | EllipsisType | None = ..., stale_after: float = DEFAULT_STALE_AFTER
    ) -> list[RunnerInfo]:
        """The live runners for `servers` (`...`: any), oldest first; dead and stale ones are deleted."""

        async def body(conn: Conn) -> list[RunnerInfo]:
            rows = await (await conn.execute(_RUNNERS, (stale_after,))).fetchall()
            live, dead, stale = [], [], []
            for rid, key, started, beat, runs, fresh in rows:
                if owner_is_dead(rid):
                    dead.append(rid)
                elif not fresh:
                    stale.append(rid)
                elif servers is ... or key == servers:
                    live.append(
                        RunnerInfo(id=rid, servers=key, started_at=started, heartbeat_at=beat, runs=runs)
                    )
            if dead or stale:
                await conn.execute(_FORGET_RUNNERS, (dead, stale, stale_after))
            return live

        return await self._run(body)

    async def wait_for_work(
        self,
        timeout: float,  # noqa: ASYNC109 (an idle wait, not a deadline)
        *,
        local_only: bool = False,
    ) -> None:
        """Return soon after a run is queued, requeued or finished, a cancel is requested or a plan's status
        changes (a NOTIFY from any process), or after `timeout` seconds. A notification read since this
        task's first `claim_run`, `get_run` or `progress` since its last wait counts, so a submit (or a run's
        end) between a read that found nothing and this wait is not missed. `local_only`: only runs queued
        through this store count.

        While the listening connection is broken, it returns after `POLL_FALLBACK` seconds (callers re-check)
        and the next call reconnects; it never raises for that.

        Raises:
            StoreError: the store is closed.
        """
        mark = self._mark.get()
        self._mark.set(None)
        if mark is not None and mark[0] != anyio.get_current_task().id:
            mark = None  # its parent's, inherited with its context
        with anyio.move_on_after(timeout):
            if local_only:
                while not self._take_local_work():
                    if self._local_work is None:
                        self._local_work = anyio.Event()
                    await self._local_work.wait()
                return
            seen = self._listener.notices if mark is None else mark[1]
            while not self._take_local_work():
                if self._listener.notices != seen or not await self._listener.wait():
                    return

    # -- the catalog cache --------------------------------------------------------------------------------

    async def save_catalog(self, servers: str | None, tools: list[dict[str, Any]]) -> None:
        """Cache the tool catalog of a servers config, replacing the previous one."""
        data = encode_json(tools)

        async def body(conn: Conn) -> None:
            async with transaction(conn):
                # Two runners saving at once must not leave two rows for one key.
                await conn.execute("LOCK TABLE catalogs IN EXCLUSIVE MODE")
                await conn.execute("DELETE FROM catalogs WHERE servers IS NOT DISTINCT FROM %s", (servers,))
                await conn.execute(
                    "INSERT INTO catalogs (servers, tools, saved_at) VALUES (%s, %s, now())", (servers, data)
                )

        await self._run(body)

    async def get_catalog(self, servers: str | None) -> tuple[list[dict[str, Any]], datetime] | None:
        """The cached catalog of `servers` and when it was saved; None if there is none."""

        async def body(conn: Conn) -> tuple[Any, ...] | None:
            cur = await conn.execute(
                "SELECT tools, saved_at FROM catalogs WHERE servers IS NOT DISTINCT FROM %s", (servers,)
            )
            return await cur.fetchone()

        row = await self._run(body)
        if row is None:
            return None
        return json.loads(row[0]), row[1]
