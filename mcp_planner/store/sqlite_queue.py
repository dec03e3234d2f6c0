"""The run queue on SQLite: runs that outlive the process that submitted them, the runners that claim and
execute them, and the tool catalogs runners publish. `sqlite.PlanStore` inherits it and is its connection.

Each claim or requeue is one IMMEDIATE transaction: SQLite's write lock serialises them across processes. A
PostgreSQL store does the same with `SELECT ... FOR UPDATE SKIP LOCKED` in the subquery of `_CLAIM_RUN`, so
concurrent runners skip each other's rows instead of waiting.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable
from datetime import datetime
from types import EllipsisType
from typing import TYPE_CHECKING, Any

import anyio

from mcp_planner.errors import PlanNotFoundError, RunNotFoundError
from mcp_planner.plan.model import utcnow
from mcp_planner.store.base import (
    DEFAULT_STALE_AFTER,
    RunKind,
    RunnerInfo,
    RunRecord,
    RunRequest,
    RunState,
    encode_json,
    queued_run,
    run_in_progress,
    runner_is_live,
)
from mcp_planner.store.sqlite_common import T, in_write, parse_timestamp, timestamp

#: The queue's schema, the store's migration 3 (`sqlite.MIGRATIONS`). Append a new migration, never edit.
QUEUE_MIGRATION: tuple[str, ...] = (
    """CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        plan_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        rerun_interrupted INTEGER NOT NULL,
        servers TEXT,
        submitted_by TEXT NOT NULL,
        state TEXT NOT NULL,
        submitted_at TEXT NOT NULL,
        runner TEXT,
        claimed_at TEXT,
        finished_at TEXT,
        error TEXT
    )""",
    # At most one active run per plan, enforced where two racing processes meet.
    "CREATE UNIQUE INDEX runs_one_active_per_plan ON runs (plan_id) WHERE state IN ('queued', 'claimed')",
    "CREATE INDEX runs_queued ON runs (servers, submitted_at) WHERE state = 'queued'",
    "CREATE INDEX runs_claimed ON runs (runner) WHERE state = 'claimed'",
    "CREATE INDEX runs_by_plan ON runs (plan_id, submitted_at)",
    """CREATE TABLE runners (
        id TEXT PRIMARY KEY,
        servers TEXT,
        started_at TEXT NOT NULL,
        heartbeat_at TEXT NOT NULL,
        runs INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE catalogs (
        servers TEXT,
        tools TEXT NOT NULL,
        saved_at TEXT NOT NULL
    )""",
)

_RUN_COLUMNS = (
    "id, plan_id, kind, rerun_interrupted, servers, submitted_by, state, submitted_at, runner, claimed_at, "
    "finished_at, error"
)
_INSERT_RUN = f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES ({', '.join('?' * 12)})"
# `servers IS ?`: a run without a servers file (NULL) goes to a runner without one.
_CLAIM_RUN = f"""
UPDATE runs SET state = 'claimed', runner = ?, claimed_at = ?
WHERE id = (SELECT id FROM runs WHERE state = 'queued' AND servers IS ? ORDER BY submitted_at, rowid LIMIT 1)
RETURNING {_RUN_COLUMNS}
"""
_REQUEUE_RUN = f"""
UPDATE runs SET state = 'queued', kind = 'resume', runner = NULL, claimed_at = NULL
WHERE id = ? AND state = 'claimed' RETURNING {_RUN_COLUMNS}
"""
#: How often `wait_for_work` looks for another connection's commit.
_POLL_INTERVAL = 0.02


def _run_row(run: RunRecord) -> tuple[Any, ...]:
    def stamp(value: datetime | None) -> str | None:
        return timestamp(value) if value is not None else None

    return (
        run.id,
        run.plan_id,
        run.kind.value,
        int(run.rerun_interrupted),
        run.servers,
        run.submitted_by,
        run.state.value,
        timestamp(run.submitted_at),
        run.runner,
        stamp(run.claimed_at),
        stamp(run.finished_at),
        run.error,
    )


def _run_from_row(row: tuple[Any, ...]) -> RunRecord:
    (rid, plan_id, kind, rerun, servers, by, state, submitted, runner, claimed, finished, error) = row
    return RunRecord(
        id=rid,
        plan_id=plan_id,
        kind=RunKind(kind),
        rerun_interrupted=bool(rerun),
        servers=servers,
        submitted_by=by,
        state=RunState(state),
        submitted_at=parse_timestamp(submitted),
        runner=runner,
        claimed_at=parse_timestamp(claimed) if claimed is not None else None,
        finished_at=parse_timestamp(finished) if finished is not None else None,
        error=error,
    )


def _active_run(conn: sqlite3.Connection, plan_id: str) -> RunRecord | None:
    row = conn.execute(
        f"SELECT {_RUN_COLUMNS} FROM runs WHERE plan_id = ? AND state IN ('queued', 'claimed')", (plan_id,)
    ).fetchone()
    return _run_from_row(row) if row is not None else None


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


class SqliteRunQueue:
    """`base.RunQueue` on the store's connection: a mixin for `sqlite.PlanStore`, which provides `_run`."""

    #: `PRAGMA data_version` as of this store's last `claim_run` or `wait_for_work` (None: neither yet).
    _seen_version: int | None = None
    #: Set when a run is queued through this connection, whose own commits `data_version` does not count.
    _local_work: anyio.Event | None = None

    if TYPE_CHECKING:

        async def _run(self, fn: Callable[[sqlite3.Connection], T], *, inline: bool = False) -> T: ...

    # -- runs ---------------------------------------------------------------------------------------------

    async def submit_run(self, request: RunRequest) -> RunRecord:
        """Queue a run of `request.plan_id`; the partial unique index keeps one active run per plan, so of
        two processes submitting at once exactly one succeeds.

        Raises:
            PlanNotFoundError: no such plan.
            PlanStateError: the plan already has an active run.
        """
        run = queued_run(request)
        row = _run_row(run)

        def body(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM plans WHERE id = ?", (run.plan_id,)).fetchone() is None:
                raise PlanNotFoundError(run.plan_id)
            try:
                conn.execute(_INSERT_RUN, row)
            except sqlite3.IntegrityError:
                active = _active_run(conn, run.plan_id)
                if active is None:
                    raise
                raise run_in_progress(active) from None

        await self._run(lambda c: in_write(c, body))
        self._wake()
        return run

    def _wake(self) -> None:
        if self._local_work is None:
            self._local_work = anyio.Event()
        self._local_work.set()

    def _take_local_work(self) -> bool:
        """Whether a run was queued through this connection since the last call."""
        if self._local_work is None or not self._local_work.is_set():
            return False
        self._local_work = None
        return True

    async def claim_run(self, runner: str, servers: str | None) -> RunRecord | None:
        """Claim for `runner` the oldest queued run for `servers` (None matches None); None if none.

        It also marks what this connection has seen for `wait_for_work`.
        """
        self._take_local_work()

        def body(conn: sqlite3.Connection) -> RunRecord | None:
            row = conn.execute(_CLAIM_RUN, (runner, timestamp(utcnow()), servers)).fetchone()
            self._seen_version = _data_version(conn)
            return _run_from_row(row) if row is not None else None

        return await self._run(lambda c: in_write(c, body))

    async def finish_run(self, run_id: str, runner: str, error: str | None = None) -> bool:
        """Mark `runner`'s claimed run done, with `error` if it did not run, and count it for `runner`.

        Returns:
            False when `runner` does not hold the run (it was requeued meanwhile): nothing changed.
        """

        def body(conn: sqlite3.Connection) -> bool:
            done = conn.execute(
                "UPDATE runs SET state = 'done', finished_at = ?, error = ? "
                "WHERE id = ? AND state = 'claimed' AND runner = ?",
                (timestamp(utcnow()), error, run_id, runner),
            )
            if done.rowcount == 0:
                return False
            conn.execute("UPDATE runners SET runs = runs + 1 WHERE id = ?", (runner,))
            return True

        return await self._run(lambda c: in_write(c, body))

    async def cancel_queued_run(self, plan_id: str, reason: str) -> bool:
        """Mark the plan's queued run done with error `reason`; False if it has none queued."""

        def body(conn: sqlite3.Connection) -> bool:
            cancelled = conn.execute(
                "UPDATE runs SET state = 'done', finished_at = ?, error = ? "
                "WHERE plan_id = ? AND state = 'queued'",
                (timestamp(utcnow()), reason, plan_id),
            )
            return cancelled.rowcount > 0

        return await self._run(lambda c: in_write(c, body))

    async def get_run(self, run_id: str) -> RunRecord:
        """Raises: RunNotFoundError."""
        row = await self._run(
            lambda c: c.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone(),
            inline=True,
        )
        if row is None:
            raise RunNotFoundError(run_id)
        return _run_from_row(row)

    async def active_run(self, plan_id: str) -> RunRecord | None:
        return await self._run(lambda c: _active_run(c, plan_id))

    async def last_run(self, plan_id: str) -> RunRecord | None:
        row = await self._run(
            lambda c: c.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE plan_id = ? "
                "ORDER BY submitted_at DESC, rowid DESC LIMIT 1",
                (plan_id,),
            ).fetchone()
        )
        return _run_from_row(row) if row is not None else None

    async def requeue_orphans(self, stale_after: float = DEFAULT_STALE_AFTER) -> list[RunRecord]:
        """Queue again, as resumes, the claimed runs whose runner is gone: unregistered, dead on this host,
        or with a heartbeat older than `stale_after` seconds. Returns them as they are now."""

        def body(conn: sqlite3.Connection) -> list[RunRecord]:
            now = utcnow()
            claimed = conn.execute(
                "SELECT runs.id, runs.runner, runners.heartbeat_at FROM runs "
                "LEFT JOIN runners ON runners.id = runs.runner WHERE runs.state = 'claimed'"
            ).fetchall()
            orphans = [
                (run_id,)
                for run_id, runner, heartbeat_at in claimed
                if heartbeat_at is None
                or not runner_is_live(runner, parse_timestamp(heartbeat_at), now, stale_after)
            ]
            requeued = []
            for (run_id,) in orphans:
                row = conn.execute(_REQUEUE_RUN, (run_id,)).fetchone()
                requeued.append(_run_from_row(row))
            return requeued

        requeued = await self._run(lambda c: in_write(c, body))
        if requeued:
            self._wake()
        return requeued

    # -- runners ------------------------------------------------------------------------------------------

    async def register_runner(self, info: RunnerInfo) -> None:
        row = (
            info.id,
            info.servers,
            timestamp(info.started_at),
            timestamp(info.heartbeat_at),
            info.runs,
        )
        await self._run(
            lambda c: in_write(
                c,
                lambda c2: c2.execute(
                    "INSERT OR REPLACE INTO runners (id, servers, started_at, heartbeat_at, runs) "
                    "VALUES (?, ?, ?, ?, ?)",
                    row,
                ),
            )
        )

    async def heartbeat_runner(self, runner_id: str) -> bool:
        """Refresh the runner's heartbeat; False if its row is gone (it was taken as dead)."""

        def body(conn: sqlite3.Connection) -> bool:
            beat = conn.execute(
                "UPDATE runners SET heartbeat_at = ? WHERE id = ?", (timestamp(utcnow()), runner_id)
            )
            return beat.rowcount > 0

        return await self._run(lambda c: in_write(c, body))

    async def unregister_runner(self, runner_id: str) -> None:
        await self._run(
            lambda c: in_write(c, lambda c2: c2.execute("DELETE FROM runners WHERE id = ?", (runner_id,)))
        )

    async def live_runners(
        self, servers: str | EllipsisType | None = ..., stale_after: float = DEFAULT_STALE_AFTER
    ) -> list[RunnerInfo]:
        """The live runners for `servers` (`...`: any), oldest first; dead and stale ones are deleted."""

        def body(conn: sqlite3.Connection) -> list[RunnerInfo]:
            now = utcnow()
            rows = conn.execute(
                "SELECT id, servers, started_at, heartbeat_at, runs FROM runners ORDER BY started_at, id"
            ).fetchall()
            runners = [
                RunnerInfo(
                    id=rid,
                    servers=key,
                    started_at=parse_timestamp(started),
                    heartbeat_at=parse_timestamp(beat),
                    runs=runs,
                )
                for rid, key, started, beat, runs in rows
            ]
            gone = [(r.id,) for r in runners if not runner_is_live(r.id, r.heartbeat_at, now, stale_after)]
            if gone:
                conn.executemany("DELETE FROM runners WHERE id = ?", gone)
            dead = {rid for (rid,) in gone}
            return [r for r in runners if r.id not in dead and (servers is ... or r.servers == servers)]

        return await self._run(lambda c: in_write(c, body))

    async def wait_for_work(
        self,
        timeout: float,  # noqa: ASYNC109 (an idle wait, not a deadline)
        *,
        local_only: bool = False,
    ) -> None:
        """Return soon after another connection or process commits anything to the database, or after
        `timeout` seconds; commits since this store's last `claim_run` count, so a submit between a claim
        that found nothing and this wait is not missed.

        Polls `PRAGMA data_version` (it changes when another connection commits) every `_POLL_INTERVAL`, and
        returns at once when a run is queued or requeued through this store; a PostgreSQL store uses
        LISTEN/NOTIFY here instead (polling as its fallback).
        """
        with anyio.move_on_after(timeout):
            seen = self._seen_version
            if seen is None and not local_only:
                seen = await self._run(_data_version)
            while not self._take_local_work():
                if not local_only:
                    now = await self._run(_data_version)
                    if now != seen:
                        self._seen_version = now
                        return
                if self._local_work is None:
                    self._local_work = anyio.Event()
                with anyio.move_on_after(math.inf if local_only else _POLL_INTERVAL):
                    await self._local_work.wait()

    # -- the catalog cache --------------------------------------------------------------------------------

    async def save_catalog(self, servers: str | None, tools: list[dict[str, Any]]) -> None:
        """Cache the tool catalog of a servers config, replacing the previous one."""
        data = encode_json(tools)
        saved_at = timestamp(utcnow())

        def body(conn: sqlite3.Connection) -> None:
            # `IS`: None is a key like any other (a unique index would let NULLs repeat).
            conn.execute("DELETE FROM catalogs WHERE servers IS ?", (servers,))
            conn.execute(
                "INSERT INTO catalogs (servers, tools, saved_at) VALUES (?, ?, ?)", (servers, data, saved_at)
            )

        await self._run(lambda c: in_write(c, body))

    async def get_catalog(self, servers: str | None) -> tuple[list[dict[str, Any]], datetime] | None:
        """The cached catalog of `servers` and when it was saved; None if there is none."""
        row = await self._run(
            lambda c: c.execute(
                "SELECT tools, saved_at FROM catalogs WHERE servers IS ?", (servers,)
            ).fetchone()
        )
        if row is None:
            return None
        return json.loads(row[0]), parse_timestamp(row[1])
