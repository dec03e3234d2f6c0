"""The SQLite plan store (aiosqlite): plans, steps, an append-only event log, execution claims and the run
queue (runs, runners, cached catalogs).

Every state-changing write is one `BEGIN IMMEDIATE` transaction run as a single function on the
connection's own thread, so a caller cancelled mid-write can never leave a transaction half-open, and two
processes on one file serialise on SQLite's write lock instead of losing updates. `database is locked`
beyond the busy timeout is retried a bounded number of times.

Durability: WAL with `synchronous=NORMAL`. A committed transaction is in the WAL file before `COMMIT`
returns, so killing the process at any instant loses nothing committed; only a power loss or OS crash
could lose the last transactions (SQLite's documented trade-off for WAL + NORMAL).

SQLite and aiosqlite exceptions stay in this module: they leave it as `StoreError`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import EllipsisType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import aiosqlite
import anyio
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from mcp_planner.errors import PlanConflictError, PlannerError, PlanNotFoundError, RunNotFoundError
from mcp_planner.plan.model import ExecutionPlan, PlanStatus, Step, utcnow
from mcp_planner.store.base import (
    DEFAULT_STALE_AFTER,
    Claim,
    Event,
    RunKind,
    RunnerInfo,
    RunRecord,
    RunRequest,
    RunState,
    claim_is_live,
    queued_run,
    run_in_progress,
    runner_is_live,
)

if TYPE_CHECKING:
    from mcp_planner.store.base import QueueStore

T = TypeVar("T")
logger = logging.getLogger("mcp_planner.store.sqlite")

#: How long SQLite itself waits for another process's write lock before answering `busy`.
BUSY_TIMEOUT_MS = 5000
_WRITE_ATTEMPTS = 5

#: Ordered schema migrations; the store's version is the number applied. Append, never edit.
#: Indexes are few on purpose: every one is written on the executor's hot path (`save_transition`).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE plans (
            id TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            description TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            header TEXT NOT NULL
        )""",
        "CREATE INDEX plans_by_created ON plans (created_at DESC)",
        """CREATE TABLE steps (
            plan_id TEXT NOT NULL REFERENCES plans (id) ON DELETE CASCADE,
            step_id TEXT NOT NULL,
            idx INTEGER NOT NULL,
            status TEXT NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (plan_id, step_id)
        )""",
        """CREATE TABLE events (
            plan_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            at TEXT NOT NULL,
            kind TEXT NOT NULL,
            step_id TEXT,
            data TEXT NOT NULL,
            PRIMARY KEY (plan_id, seq)
        ) WITHOUT ROWID""",
        """CREATE TRIGGER events_no_update BEFORE UPDATE ON events
            BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END""",
        """CREATE TRIGGER events_no_delete BEFORE DELETE ON events
            BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END""",
        """CREATE TABLE claims (
            plan_id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            heartbeat_at TEXT NOT NULL,
            cancel_reason TEXT
        )""",
    ),
    # Every plan write is a compare-and-set on the revision it was read at.
    ("ALTER TABLE plans ADD COLUMN revision INTEGER NOT NULL DEFAULT 1",),
    # The run queue: runs outlive the process that submitted them; runners claim and execute them.
    (
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
    ),
)

_INSERT_PLAN = """
INSERT INTO plans (id, status, description, created_at, updated_at, header, revision)
VALUES (?, ?, ?, ?, ?, ?, 1) ON CONFLICT (id) DO NOTHING
"""
_UPDATE_PLAN = """
UPDATE plans SET status = ?, description = ?, created_at = ?, updated_at = ?, header = ?,
    revision = revision + 1
WHERE id = ? AND revision = ?
"""
_UPDATE_HEADER = """
UPDATE plans SET status = ?, description = ?, updated_at = ?, header = ?, revision = revision + 1
WHERE id = ? AND revision = ?
"""
_UPSERT_STEP = """
INSERT INTO steps (plan_id, step_id, idx, status, data) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (plan_id, step_id) DO UPDATE SET status = excluded.status, data = excluded.data
"""
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
_INSERT_EVENT = """
INSERT INTO events (plan_id, seq, at, kind, step_id, data)
VALUES (:plan_id, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE plan_id = :plan_id),
        :at, :kind, :step_id, :data)
"""


class StoreError(PlannerError):
    """The plan database could not be opened, read or written."""


def _timestamp(value: datetime) -> str:
    """A fixed-width UTC ISO string, so text order is time order (pydantic drops zero microseconds)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    elif value.utcoffset():
        value = value.astimezone(UTC)
    # What strftime("%Y-%m-%dT%H:%M:%S.%fZ") gives (glibc does not pad %Y), at less than half its cost:
    # several of these are written per commit on the executor's hot path.
    return "%d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (  # noqa: UP031 (an f-string with format specs is slower)
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


def _parse_timestamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _is_busy(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _plan_row(plan: ExecutionPlan) -> tuple[str, str, str, str, str, str]:
    header = plan.model_dump_json(exclude={"steps"})
    return (
        plan.id,
        plan.status.value,
        plan.description,
        _timestamp(plan.created_at),
        _timestamp(plan.updated_at),
        header,
    )


def _step_rows(plan_id: str, steps: Sequence[Step]) -> list[tuple[str, str, int, str, str]]:
    return [(plan_id, s.id, s.index, s.status.value, s.model_dump_json()) for s in steps]


#: `json.dumps(data, default=str)` without building an encoder per call (the same output).
_encode_data = json.JSONEncoder(default=str).encode


def _event_rows(events: Sequence[Event]) -> list[dict[str, Any]]:
    return [
        {
            "plan_id": e.plan_id,
            "at": _timestamp(e.at),
            "kind": e.kind,
            "step_id": e.step_id,
            "data": _encode_data(e.data),
        }
        for e in events
    ]


# -- functions run on the connection's thread -------------------------------------------------------------


def _in_write(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
    """Run `body` in one IMMEDIATE transaction: committed whole, or rolled back whole."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = body(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _in_read(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
    """Run `body` in one read transaction: one consistent snapshot across its queries."""
    conn.execute("BEGIN")
    try:
        return body(conn)
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


def _load_plan(conn: sqlite3.Connection, plan_id: str) -> ExecutionPlan | None:
    row = conn.execute("SELECT header, revision FROM plans WHERE id = ?", (plan_id,)).fetchone()
    if row is None:
        return None
    steps = [r[0] for r in conn.execute("SELECT data FROM steps WHERE plan_id = ? ORDER BY idx", (plan_id,))]
    # One parse of the whole document is much faster than one per step for large plans.
    header: str = row[0]
    whole = f'{header[:-1]},"revision":{int(row[1])},"steps":[{",".join(steps)}]}}'
    try:
        return ExecutionPlan.model_validate_json(whole)
    except ValueError as exc:
        raise StoreError(
            f"plan {plan_id!r} is stored but cannot be read ({exc.__class__.__name__}): it was written by "
            "an incompatible version or damaged; the other plans are unaffected"
        ) from exc


def _write_plan(
    conn: sqlite3.Connection, plan_row: tuple[str, ...], steps: list[tuple[Any, ...]], revision: int
) -> None:
    """Write the plan header and all its steps if the stored revision is still `revision` (0: new)."""
    if revision == 0:
        written = conn.execute(_INSERT_PLAN, plan_row)
    else:
        written = conn.execute(_UPDATE_PLAN, (*plan_row[1:], plan_row[0], revision))
    if written.rowcount == 0:
        raise PlanConflictError(plan_row[0])
    conn.execute("DELETE FROM steps WHERE plan_id = ?", (plan_row[0],))
    conn.executemany(
        "INSERT INTO steps (plan_id, step_id, idx, status, data) VALUES (?, ?, ?, ?, ?)",
        steps,
    )


def _write_events(conn: sqlite3.Connection, events: list[dict[str, Any]]) -> None:
    if events:
        conn.executemany(_INSERT_EVENT, events)


def _run_row(run: RunRecord) -> tuple[Any, ...]:
    def stamp(value: datetime | None) -> str | None:
        return _timestamp(value) if value is not None else None

    return (
        run.id,
        run.plan_id,
        run.kind.value,
        int(run.rerun_interrupted),
        run.servers,
        run.submitted_by,
        run.state.value,
        _timestamp(run.submitted_at),
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
        submitted_at=_parse_timestamp(submitted),
        runner=runner,
        claimed_at=_parse_timestamp(claimed) if claimed is not None else None,
        finished_at=_parse_timestamp(finished) if finished is not None else None,
        error=error,
    )


def _active_run(conn: sqlite3.Connection, plan_id: str) -> RunRecord | None:
    row = conn.execute(
        f"SELECT {_RUN_COLUMNS} FROM runs WHERE plan_id = ? AND state IN ('queued', 'claimed')", (plan_id,)
    ).fetchone()
    return _run_from_row(row) if row is not None else None


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def _claim_from_row(plan_id: str, row: tuple[Any, ...]) -> Claim:
    return Claim(plan_id=plan_id, owner=row[0], heartbeat_at=_parse_timestamp(row[1]), cancel_reason=row[2])


def _on_connection_thread(db: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> Awaitable[T]:
    """`fn(connection)` as ONE call on aiosqlite's connection thread: the only use of aiosqlite internals.

    aiosqlite 0.22 has no public way to do this: its API is one statement per thread hop (`execute`,
    `commit`, ...), and its thread only runs what `_execute` queues. A whole transaction in one function
    cannot be left half-open by a cancelled caller, and it is one hop instead of one per statement on the
    executor's hot path. `_execute` and `_conn` have kept these meanings since aiosqlite 0.17; if they change,
    this function is the one place to fix. `PlanStore._run` refuses a closed store before calling it.
    """
    execute = cast(Callable[[Callable[[], T]], Awaitable[T]], db._execute)
    return execute(lambda: fn(db._conn))


def _migrate(conn: sqlite3.Connection) -> int:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TEXT NOT NULL)"
    )
    (current,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    if current > len(MIGRATIONS):
        raise StoreError(
            f"the plan database has schema version {current}, newer than this mcp-planner supports "
            f"({len(MIGRATIONS)}): upgrade mcp-planner"
        )
    for version in range(current + 1, len(MIGRATIONS) + 1):
        for statement in MIGRATIONS[version - 1]:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, _timestamp(utcnow()))
        )
    return len(MIGRATIONS)


def _location(path: str | os.PathLike[str]) -> str:
    return os.path.expanduser(os.fspath(path))  # a string lookup in $HOME, no I/O


def _prepare_file(path: Path) -> None:
    """Create the database file 0600 (and a missing directory 0700) before SQLite opens it."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    # SQLite creates the -wal and -shm files with the database file's permissions.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


class PlanStore:
    """`storage.Store` on an SQLite file.

    Use `async with PlanStore.open(path) as store:`; or `store = await PlanStore.connect(path)` and
    `await store.close()` for a store that lives as long as a server.
    """

    def __init__(self, db: aiosqlite.Connection, path: str, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self._db = db
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._closed = False
        #: `PRAGMA data_version` as of this store's last `claim_run` or `wait_for_work` (None: neither yet).
        self._seen_version: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------

    @staticmethod
    def default_path() -> Path:
        """`$XDG_DATA_HOME/mcp-planner/plans.db`, by default `~/.local/share/mcp-planner/plans.db`."""
        xdg = os.environ.get("XDG_DATA_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"  # XDG: ignore relative
        return base / "mcp-planner" / "plans.db"

    @classmethod
    async def connect(
        cls, path: str | os.PathLike[str], *, busy_timeout_ms: int = BUSY_TIMEOUT_MS
    ) -> PlanStore:
        """Open (creating and migrating as needed) the database at `path`.

        `busy_timeout_ms` is how long one attempt waits for another process's write lock; a write still
        blocked after a few attempts fails with `StoreError`.

        Raises:
            StoreError: the file cannot be created or opened, or its schema is newer than this code.
        """
        location = _location(path)
        try:
            if location != ":memory:":
                await anyio.to_thread.run_sync(_prepare_file, Path(location))
            db = await aiosqlite.connect(location, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the plan database {location!r}: {exc}") from exc
        store = cls(db, location, busy_timeout_ms)
        try:
            await store._run(store._setup)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await db.close()
            raise
        return store

    @classmethod
    @asynccontextmanager
    async def open(
        cls, path: str | os.PathLike[str], *, busy_timeout_ms: int = BUSY_TIMEOUT_MS
    ) -> AsyncIterator[PlanStore]:
        """The store at `path` for the duration of an `async with` block.

        Raises:
            StoreError: see `connect`.
        """
        store = await cls.connect(path, busy_timeout_ms=busy_timeout_ms)
        try:
            yield store
        finally:
            await store.close()

    async def close(self) -> None:
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._db.close()

    async def __aenter__(self) -> PlanStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _setup(self, conn: sqlite3.Connection) -> int:
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        return _in_write(conn, _migrate)

    async def schema_version(self) -> int:
        """The number of migrations applied to this database."""
        row = await self._run(lambda c: c.execute("SELECT MAX(version) FROM schema_version").fetchone())
        return int(row[0])

    # -- the one door to the database ---------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the connection's thread; busy errors are retried a bounded number of times.

        Each attempt is shielded: once queued it runs to its end on the thread anyway, and the caller
        should learn whether it committed.

        Raises:
            StoreError: the database failed, stayed locked through every attempt, or is closed.
        """
        if self._closed:
            raise StoreError(f"plan database {self.path!r} is closed: open the store again")
        try:
            try:
                return await self._attempt(fn)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
            # Locked beyond the busy timeout: back off and try again, a bounded number of times.
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_is_busy),
                stop=stop_after_attempt(_WRITE_ATTEMPTS - 1),
                wait=wait_random_exponential(multiplier=0.05, max=1.0),
                sleep=anyio.sleep,
                reraise=True,
            ):
                with attempt:
                    return await self._attempt(fn)
        except sqlite3.Error as exc:
            raise StoreError(f"plan database {self.path!r}: {exc}") from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _attempt(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with anyio.CancelScope(shield=True):
            result = await _on_connection_thread(self._db, fn)
        return result

    # -- plans --------------------------------------------------------------------------------------------

    async def save_plan(self, plan: ExecutionPlan, events: Sequence[Event] = ()) -> None:
        """Write the whole plan (replacing all its steps) and append `events`, in one transaction.

        A compare-and-set: it commits only if the stored plan is still at `plan.revision` (a new plan:
        not stored at all), and then advances `plan.revision`.

        Raises:
            PlanConflictError: the stored plan changed since `plan` was read; nothing was written.
            StoreError: the write failed; nothing of it was stored.
        """
        plan_row = _plan_row(plan)
        step_rows = _step_rows(plan.id, plan.steps)
        event_rows = _event_rows(events)
        revision = plan.revision

        def body(conn: sqlite3.Connection) -> None:
            _write_plan(conn, plan_row, step_rows, revision)
            _write_events(conn, event_rows)

        await self._run(lambda c: _in_write(c, body))
        plan.__dict__["revision"] = revision + 1  # no validate_assignment round on the hot path

    async def save_transition(
        self, plan: ExecutionPlan, steps: Sequence[Step], events: Sequence[Event] = ()
    ) -> None:
        """Write the plan's own fields, the given steps only, and append `events`, in one transaction.

        Only the plan header and the given steps are serialised: this is the executor's hot path. A plan
        not stored yet is written whole. A compare-and-set on `plan.revision`, like `save_plan`.

        Raises:
            PlanConflictError: the stored plan changed since `plan` was read; nothing was written.
        """
        plan_row = _plan_row(plan)
        step_rows = _step_rows(plan.id, steps)
        event_rows = _event_rows(events)
        revision = plan.revision

        def body(conn: sqlite3.Connection) -> None:
            if revision == 0:
                _write_plan(conn, plan_row, _step_rows(plan.id, plan.steps), revision)
            else:
                status, description, _, updated_at, header = plan_row[1:]
                updated = conn.execute(
                    _UPDATE_HEADER, (status, description, updated_at, header, plan.id, revision)
                )
                if updated.rowcount == 0:
                    raise PlanConflictError(plan.id)
                conn.executemany(_UPSERT_STEP, step_rows)
            _write_events(conn, event_rows)

        await self._run(lambda c: _in_write(c, body))
        plan.__dict__["revision"] = revision + 1

    async def get_plan(self, plan_id: str) -> ExecutionPlan:
        """The plan as last committed.

        Raises:
            PlanNotFoundError: no plan has this id.
        """
        plan = await self._run(lambda c: _in_read(c, lambda c2: _load_plan(c2, plan_id)))
        if plan is None:
            raise PlanNotFoundError(plan_id)
        return plan

    async def plan_exists(self, plan_id: str) -> bool:
        row = await self._run(lambda c: c.execute("SELECT 1 FROM plans WHERE id = ?", (plan_id,)).fetchone())
        return row is not None

    async def list_plans(
        self, status: PlanStatus | str | None = None, limit: int = 20
    ) -> list[ExecutionPlan]:
        """Up to `limit` plans, newest first, optionally only those with `status`.

        Raises:
            ValueError: `status` is not a plan status.
        """
        wanted = PlanStatus(status).value if status is not None else None

        def body(conn: sqlite3.Connection) -> list[ExecutionPlan]:
            if wanted is None:
                rows = conn.execute(
                    "SELECT id FROM plans ORDER BY created_at DESC, rowid DESC LIMIT ?", (max(limit, 0),)
                )
            else:
                rows = conn.execute(
                    "SELECT id FROM plans WHERE status = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
                    (wanted, max(limit, 0)),
                )
            plans = []
            for (plan_id,) in rows.fetchall():
                try:
                    plan = _load_plan(conn, plan_id)
                except StoreError as exc:  # one damaged plan must not hide the others
                    logger.warning("%s", exc)
                    continue
                if plan is not None:
                    plans.append(plan)
            return plans

        return await self._run(lambda c: _in_read(c, body))

    # -- events -------------------------------------------------------------------------------------------

    async def append_event(self, event: Event) -> None:
        rows = _event_rows([event])
        await self._run(lambda c: _in_write(c, lambda c2: _write_events(c2, rows)))

    async def events(self, plan_id: str) -> list[Event]:
        """The plan's event log in order of `seq` (1, 2, ...)."""

        def body(conn: sqlite3.Connection) -> list[Event]:
            rows = conn.execute(
                "SELECT seq, at, kind, step_id, data FROM events WHERE plan_id = ? ORDER BY seq", (plan_id,)
            )
            return [
                Event(
                    plan_id=plan_id,
                    seq=seq,
                    at=_parse_timestamp(at),
                    kind=kind,
                    step_id=step_id,
                    data=json.loads(data),
                )
                for seq, at, kind, step_id, data in rows
            ]

        return await self._run(body)

    # -- claims -------------------------------------------------------------------------------------------

    async def claim(self, plan_id: str, owner: str, stale_after: float = DEFAULT_STALE_AFTER) -> Claim | None:
        """Claim the plan for `owner`, atomically across processes.

        Returns:
            None when `owner` now holds the claim; else the live claim of another owner. A claim whose
            owner is dead (same host, no such process) or whose heartbeat is stale is taken over.
        """

        def body(conn: sqlite3.Connection) -> Claim | None:
            now = utcnow()
            row = conn.execute(
                "SELECT owner, heartbeat_at, cancel_reason FROM claims WHERE plan_id = ?", (plan_id,)
            ).fetchone()
            if row is not None:
                current = _claim_from_row(plan_id, row)
                if current.owner != owner and claim_is_live(current, now, stale_after):
                    return current
            conn.execute(
                "INSERT INTO claims (plan_id, owner, heartbeat_at, cancel_reason) VALUES (?, ?, ?, NULL) "
                "ON CONFLICT (plan_id) DO UPDATE SET owner = excluded.owner, "
                "heartbeat_at = excluded.heartbeat_at, cancel_reason = NULL",
                (plan_id, owner, _timestamp(now)),
            )
            return None

        return await self._run(lambda c: _in_write(c, body))

    async def heartbeat(self, plan_id: str, owner: str) -> Claim | None:
        """Refresh `owner`'s claim. Returns the claim (with any `cancel_reason`), or None if it was lost."""

        def body(conn: sqlite3.Connection) -> Claim | None:
            row = conn.execute(
                "UPDATE claims SET heartbeat_at = ? WHERE plan_id = ? AND owner = ? "
                "RETURNING owner, heartbeat_at, cancel_reason",
                (_timestamp(utcnow()), plan_id, owner),
            ).fetchone()
            return _claim_from_row(plan_id, row) if row is not None else None

        return await self._run(lambda c: _in_write(c, body))

    async def release(self, plan_id: str, owner: str) -> None:
        """Drop `owner`'s claim; a claim held by someone else is left alone."""
        await self._run(
            lambda c: _in_write(
                c,
                lambda c2: c2.execute("DELETE FROM claims WHERE plan_id = ? AND owner = ?", (plan_id, owner)),
            )
        )

    async def get_claim(self, plan_id: str) -> Claim | None:
        row = await self._run(
            lambda c: c.execute(
                "SELECT owner, heartbeat_at, cancel_reason FROM claims WHERE plan_id = ?", (plan_id,)
            ).fetchone()
        )
        return _claim_from_row(plan_id, row) if row is not None else None

    async def request_cancel(self, plan_id: str, reason: str) -> bool:
        """Ask the process holding the plan's claim to cancel (it sees the reason on its next heartbeat).

        Returns:
            False when nobody holds a live claim, so there is no process to ask.
        """

        def body(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT owner, heartbeat_at, cancel_reason FROM claims WHERE plan_id = ?", (plan_id,)
            ).fetchone()
            if row is None or not claim_is_live(_claim_from_row(plan_id, row), utcnow(), DEFAULT_STALE_AFTER):
                return False
            conn.execute("UPDATE claims SET cancel_reason = ? WHERE plan_id = ?", (reason, plan_id))
            return True

        return await self._run(lambda c: _in_write(c, body))

    # -- the run queue ------------------------------------------------------------------------------------
    # Each claim or requeue is one IMMEDIATE transaction: SQLite's write lock serialises them across
    # processes. A PostgreSQL store does the same with `SELECT ... FOR UPDATE SKIP LOCKED` in the subquery
    # of `_CLAIM_RUN`, so concurrent runners skip each other's rows instead of waiting.

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

        await self._run(lambda c: _in_write(c, body))
        return run

    async def claim_run(self, runner: str, servers: str | None) -> RunRecord | None:
        """Claim for `runner` the oldest queued run for `servers` (None matches None); None if none.

        It also marks what this connection has seen for `wait_for_work`.
        """

        def body(conn: sqlite3.Connection) -> RunRecord | None:
            row = conn.execute(_CLAIM_RUN, (runner, _timestamp(utcnow()), servers)).fetchone()
            self._seen_version = _data_version(conn)
            return _run_from_row(row) if row is not None else None

        return await self._run(lambda c: _in_write(c, body))

    async def finish_run(self, run_id: str, runner: str, error: str | None = None) -> bool:
        """Mark `runner`'s claimed run done, with `error` if it did not run, and count it for `runner`.

        Returns:
            False when `runner` does not hold the run (it was requeued meanwhile): nothing changed.
        """

        def body(conn: sqlite3.Connection) -> bool:
            done = conn.execute(
                "UPDATE runs SET state = 'done', finished_at = ?, error = ? "
                "WHERE id = ? AND state = 'claimed' AND runner = ?",
                (_timestamp(utcnow()), error, run_id, runner),
            )
            if done.rowcount == 0:
                return False
            conn.execute("UPDATE runners SET runs = runs + 1 WHERE id = ?", (runner,))
            return True

        return await self._run(lambda c: _in_write(c, body))

    async def cancel_queued_run(self, plan_id: str, reason: str) -> bool:
        """Mark the plan's queued run done with error `reason`; False if it has none queued."""

        def body(conn: sqlite3.Connection) -> bool:
            cancelled = conn.execute(
                "UPDATE runs SET state = 'done', finished_at = ?, error = ? "
                "WHERE plan_id = ? AND state = 'queued'",
                (_timestamp(utcnow()), reason, plan_id),
            )
            return cancelled.rowcount > 0

        return await self._run(lambda c: _in_write(c, body))

    async def get_run(self, run_id: str) -> RunRecord:
        """Raises: RunNotFoundError."""
        row = await self._run(
            lambda c: c.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
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
                or not runner_is_live(runner, _parse_timestamp(heartbeat_at), now, stale_after)
            ]
            requeued = []
            for (run_id,) in orphans:
                row = conn.execute(_REQUEUE_RUN, (run_id,)).fetchone()
                requeued.append(_run_from_row(row))
            return requeued

        return await self._run(lambda c: _in_write(c, body))

    # -- runners ------------------------------------------------------------------------------------------

    async def register_runner(self, info: RunnerInfo) -> None:
        row = (
            info.id,
            info.servers,
            _timestamp(info.started_at),
            _timestamp(info.heartbeat_at),
            info.runs,
        )
        await self._run(
            lambda c: _in_write(
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
                "UPDATE runners SET heartbeat_at = ? WHERE id = ?", (_timestamp(utcnow()), runner_id)
            )
            return beat.rowcount > 0

        return await self._run(lambda c: _in_write(c, body))

    async def unregister_runner(self, runner_id: str) -> None:
        await self._run(
            lambda c: _in_write(c, lambda c2: c2.execute("DELETE FROM runners WHERE id = ?", (runner_id,)))
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
                    started_at=_parse_timestamp(started),
                    heartbeat_at=_parse_timestamp(beat),
                    runs=runs,
                )
                for rid, key, started, beat, runs in rows
            ]
            gone = [(r.id,) for r in runners if not runner_is_live(r.id, r.heartbeat_at, now, stale_after)]
            if gone:
                conn.executemany("DELETE FROM runners WHERE id = ?", gone)
            dead = {rid for (rid,) in gone}
            return [r for r in runners if r.id not in dead and (servers is ... or r.servers == servers)]

        return await self._run(lambda c: _in_write(c, body))

    async def wait_for_work(self, timeout: float) -> None:  # noqa: ASYNC109 (an idle wait, not a deadline)
        """Return soon after another connection or process commits anything to the database, or after
        `timeout` seconds; commits since this store's last `claim_run` count, so a submit between a claim
        that found nothing and this wait is not missed.

        Polls `PRAGMA data_version` (it changes when another connection commits) every `_POLL_INTERVAL`; a
        PostgreSQL store uses LISTEN/NOTIFY here instead (polling as its fallback).
        """
        with anyio.move_on_after(timeout):
            seen = self._seen_version
            if seen is None:
                seen = await self._run(_data_version)
            while True:
                now = await self._run(_data_version)
                if now != seen:
                    self._seen_version = now
                    return
                await anyio.sleep(_POLL_INTERVAL)

    # -- the catalog cache --------------------------------------------------------------------------------

    async def save_catalog(self, servers: str | None, tools: list[dict[str, Any]]) -> None:
        """Cache the tool catalog of a servers config, replacing the previous one."""
        data = _encode_data(tools)
        saved_at = _timestamp(utcnow())

        def body(conn: sqlite3.Connection) -> None:
            # `IS`: None is a key like any other (a unique index would let NULLs repeat).
            conn.execute("DELETE FROM catalogs WHERE servers IS ?", (servers,))
            conn.execute(
                "INSERT INTO catalogs (servers, tools, saved_at) VALUES (?, ?, ?)", (servers, data, saved_at)
            )

        await self._run(lambda c: _in_write(c, body))

    async def get_catalog(self, servers: str | None) -> tuple[list[dict[str, Any]], datetime] | None:
        """The cached catalog of `servers` and when it was saved; None if there is none."""
        row = await self._run(
            lambda c: c.execute(
                "SELECT tools, saved_at FROM catalogs WHERE servers IS ?", (servers,)
            ).fetchone()
        )
        if row is None:
            return None
        return json.loads(row[0]), _parse_timestamp(row[1])


if TYPE_CHECKING:
    _conforms: type[QueueStore] = PlanStore
