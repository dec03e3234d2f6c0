"""The SQLite plan store (aiosqlite): the connection, migrations, plans, steps, an append-only event log and
execution claims. The run queue (runs, runners, cached catalogs) is `sqlite_queue.SqliteRunQueue`, which
`PlanStore` inherits and serves through the same connection.

Every state-changing write is one `BEGIN IMMEDIATE` transaction run as a single function on the
connection's own thread, so a caller cancelled mid-write can never leave a transaction half-open, and two
processes on one file serialise on SQLite's write lock instead of losing updates. `database is locked`
beyond the busy timeout is retried a bounded number of times.

The executor's small, frequent writes (a step transition, a claim read) take a fast path: when the
connection is idle they run on the event loop's own thread, which costs ~40 µs of SQL instead of a ~110 µs
round trip through the connection's thread. They never wait there: with no busy timeout, a write that finds
another process's lock goes to the connection's thread to wait for it. And they never checkpoint there:
automatic checkpoints are off on this connection, and every `CHECKPOINT_EVERY` calls a passive checkpoint
runs on the connection's thread.

Durability: WAL with `synchronous=NORMAL`. A committed transaction is in the WAL file before `COMMIT`
returns, so killing the process at any instant loses nothing committed; only a power loss or OS crash
could lose the last transactions (SQLite's documented trade-off for WAL + NORMAL).

SQLite and aiosqlite exceptions stay in this package: they leave `PlanStore._run` as `StoreError`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiosqlite
import anyio
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from mcp_planner.errors import PlanConflictError, PlanNotFoundError
from mcp_planner.plan.model import (
    ATTENTION_ORDER,
    ExecutionPlan,
    PlanStatus,
    PlanSummary,
    Step,
    utcnow,
)
from mcp_planner.store.base import (
    DEFAULT_STALE_AFTER,
    PROGRESS_EVENTS,
    Claim,
    Event,
    PlanHead,
    PlanProgress,
    StoreError,
    claim_is_live,
    encode_json,
    plan_from_json,
    step_counts,
    summary_from_rows,
)
from mcp_planner.store.sqlite_common import T, in_read, in_write, parse_timestamp, timestamp
from mcp_planner.store.sqlite_queue import QUEUE_MIGRATION, SqliteRunQueue

if TYPE_CHECKING:
    from mcp_planner.store.base import QueueStore

logger = logging.getLogger("mcp_planner.store.sqlite")

#: How long SQLite itself waits for another process's write lock before answering `busy`.
BUSY_TIMEOUT_MS = 5000
_WRITE_ATTEMPTS = 5
#: The largest write (bytes of rows) that may run on the event loop's thread.
INLINE_MAX_BYTES = 64 * 1024
#: Calls between two WAL checkpoints (SQLite's own default is about every 1000 pages written).
CHECKPOINT_EVERY = 256

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
    QUEUE_MIGRATION,
    # How many of a plan's steps are in each status, kept by the database as steps change status, so a
    # follower reads a plan's progress without reading its steps. A whole-plan write recounts.
    (
        """CREATE TABLE step_counts (
            plan_id TEXT NOT NULL,
            status TEXT NOT NULL,
            n INTEGER NOT NULL,
            PRIMARY KEY (plan_id, status)
        ) WITHOUT ROWID""",
        """CREATE TRIGGER steps_counted AFTER UPDATE OF status ON steps WHEN old.status IS NOT new.status
        BEGIN
            UPDATE step_counts SET n = n - 1 WHERE plan_id = old.plan_id AND status = old.status;
            INSERT INTO step_counts (plan_id, status, n) VALUES (new.plan_id, new.status, 1)
                ON CONFLICT (plan_id, status) DO UPDATE SET n = n + 1;
        END""",
        "INSERT INTO step_counts SELECT plan_id, status, COUNT(*) FROM steps GROUP BY plan_id, status",
    ),
    # The items of `for_each` steps, one row each: a run writes an item's change, never the whole list.
    (
        """CREATE TABLE step_items (
            plan_id TEXT NOT NULL,
            step_id TEXT NOT NULL,
            item INTEGER NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (plan_id, step_id, item)
        ) WITHOUT ROWID""",
    ),
)

_INSERT_PLAN = """
INSERT INTO plans (id, status, description, created_at, updated_at, header, revision)
VALUES (?, ?, ?, ?, ?, ?, 1) ON CONFLICT (id) DO NOTHING
"""
#: Takes a `_plan_row` row and the revision it was read at (created_at, ?4, never changes).
_UPDATE_HEADER = """
UPDATE plans SET status = ?2, description = ?3, updated_at = ?5, header = ?6, revision = revision + 1
WHERE id = ?1 AND revision = ?7
"""
_COUNTS = "SELECT status, n FROM step_counts WHERE plan_id = ?"
_SUMMARY_HEAD = """
SELECT status, json_extract(header, '$.description'), json_extract(header, '$.error'),
    json_extract(header, '$.total_duration_ms'), json_extract(header, '$.output_values'),
    json_extract(header, '$.output_errors')
FROM plans WHERE id = ?
"""
#: `ATTENTION_ORDER`, then plan order: the steps a short summary lists.
_SUMMARY_STEPS = f"""
SELECT idx, step_id, status, json_extract(data, '$.tool_name'), json_extract(data, '$.duration_ms'),
    json_extract(data, '$.error'), json_extract(data, '$.retry_count')
FROM steps WHERE plan_id = ?
ORDER BY CASE status {" ".join(f"WHEN '{s.value}' THEN {i}" for i, s in enumerate(ATTENTION_ORDER))} END, idx
LIMIT ?
"""
_UPSERT_ITEM = "INSERT OR REPLACE INTO step_items (plan_id, step_id, item, data) VALUES (?, ?, ?, ?)"
#: Takes a `_step_rows` row, as the insert does.
_UPDATE_STEP = "UPDATE steps SET status = ?4, data = ?5 WHERE plan_id = ?1 AND step_id = ?2 AND idx = ?3"
_INSERT_EVENT = """
INSERT INTO events (plan_id, seq, at, kind, step_id, data)
VALUES (:plan_id, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE plan_id = :plan_id),
        :at, :kind, :step_id, :data)
"""


def _is_busy(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return "locked" in text or "busy" in text


# Statuses are `StrEnum`s, which sqlite3 stores as the text they are (`.value` costs a descriptor call).


def _plan_row(plan: ExecutionPlan) -> tuple[str, str, str, str, str, str]:
    header = plan.model_dump_json(exclude={"steps"})
    return (
        plan.id,
        plan.status,
        plan.description,
        timestamp(plan.created_at),
        timestamp(plan.updated_at),
        header,
    )


def _step_rows(plan_id: str, steps: Sequence[Step]) -> list[tuple[str, str, int, str, str]]:
    return [(plan_id, s.id, s.index, s.status, s.model_dump_json()) for s in steps]


def _item_rows(plan_id: str, items: Sequence[tuple[Step, int]]) -> list[tuple[str, str, int, str]]:
    """Rows of the given items (a `for_each` step and an item's position in it)."""
    rows = []
    for step, i in items:
        assert step.items is not None
        rows.append((plan_id, step.id, i, step.items[i].model_dump_json()))
    return rows


def _all_item_rows(plan_id: str, steps: Sequence[Step]) -> list[tuple[str, str, int, str]]:
    return _item_rows(plan_id, [(s, i) for s in steps if s.items for i in range(len(s.items))])


def _event_rows(events: Sequence[Event]) -> list[dict[str, Any]]:
    return [
        {
            "plan_id": e.plan_id,
            "at": timestamp(e.at),
            "kind": e.kind,
            "step_id": e.step_id,
            "data": encode_json(e.data),
        }
        for e in events
    ]


# -- functions run on the connection's thread -------------------------------------------------------------


def _load_plan(conn: sqlite3.Connection, plan_id: str) -> ExecutionPlan | None:
    """The stored plan (`plan_from_json`), its steps read from the cursor as they are parsed."""
    row = conn.execute("SELECT header, revision FROM plans WHERE id = ?", (plan_id,)).fetchone()
    if row is None:
        return None
    items: dict[str, list[str]] = {}
    for step_id, data in conn.execute(
        "SELECT step_id, data FROM step_items WHERE plan_id = ? ORDER BY step_id, item", (plan_id,)
    ):
        items.setdefault(step_id, []).append(data)
    steps = conn.execute("SELECT data FROM steps WHERE plan_id = ? ORDER BY idx", (plan_id,))
    return plan_from_json(plan_id, row[0], row[1], (data for (data,) in steps), items)


def _write_plan(
    conn: sqlite3.Connection,
    plan_row: tuple[str, ...],
    steps: list[tuple[Any, ...]],
    revision: int,
    items: list[tuple[Any, ...]],
) -> None:
    """Write the plan header, all its steps and their items if the stored revision is still `revision`
    (0: new)."""
    _write_header(conn, plan_row, revision)
    plan_id = plan_row[0]
    conn.execute("DELETE FROM steps WHERE plan_id = ?", (plan_id,))
    conn.executemany("INSERT INTO steps (plan_id, step_id, idx, status, data) VALUES (?, ?, ?, ?, ?)", steps)
    if revision:
        conn.execute("DELETE FROM step_items WHERE plan_id = ?", (plan_id,))
    conn.executemany(_UPSERT_ITEM, items)
    conn.execute("DELETE FROM step_counts WHERE plan_id = ?", (plan_id,))
    conn.execute(
        "INSERT INTO step_counts SELECT plan_id, status, COUNT(*) FROM steps WHERE plan_id = ? "
        "GROUP BY status",
        (plan_id,),
    )


def _write_header(conn: sqlite3.Connection, plan_row: tuple[str, ...], revision: int) -> None:
    """Insert the plan's row (revision 0: new), or update it if the stored revision is still `revision`."""
    if revision == 0:
        written = conn.execute(_INSERT_PLAN, plan_row)
    else:
        written = conn.execute(_UPDATE_HEADER, (*plan_row, revision))
    if written.rowcount == 0:
        raise PlanConflictError(plan_row[0])


def _size(plan_row: tuple[str, ...], steps: Sequence[tuple[Any, ...]], events: list[dict[str, Any]]) -> int:
    """About how many bytes a write stores: its JSON texts (the header, the steps' and items', the
    events')."""
    return len(plan_row[-1]) + sum(len(row[-1]) for row in steps) + sum(len(e["data"]) for e in events)


def _write_events(conn: sqlite3.Connection, events: list[dict[str, Any]]) -> None:
    if events:
        conn.executemany(_INSERT_EVENT, events)


def _events_after(
    conn: sqlite3.Connection, plan_id: str, after_seq: int, limit: int | None = None
) -> list[Event]:
    rows = conn.execute(
        "SELECT seq, at, kind, step_id, data FROM events WHERE plan_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        (plan_id, after_seq, -1 if limit is None else limit),
    )
    return [
        Event(
            plan_id=plan_id,
            seq=seq,
            at=parse_timestamp(at),
            kind=kind,
            step_id=step_id,
            data=json.loads(data),
        )
        for seq, at, kind, step_id, data in rows
    ]


def _claim_from_row(plan_id: str, row: tuple[Any, ...]) -> Claim:
    return Claim(plan_id=plan_id, owner=row[0], heartbeat_at=parse_timestamp(row[1]), cancel_reason=row[2])


def _claim(conn: sqlite3.Connection, plan_id: str, owner: str, stale_after: float) -> Claim | None:
    """Take the plan's claim for `owner` unless another owner holds it live; that claim is returned."""
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
        (plan_id, owner, timestamp(now)),
    )
    return None


def _release(conn: sqlite3.Connection, plan_id: str, owner: str) -> None:
    conn.execute("DELETE FROM claims WHERE plan_id = ? AND owner = ?", (plan_id, owner))


def _on_connection_thread(db: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> Awaitable[T]:
    """`fn(connection)` as ONE call on aiosqlite's connection thread: with `_connection`, the only uses of
    aiosqlite internals.

    aiosqlite 0.22 has no public way to do this: its API is one statement per thread hop (`execute`,
    `commit`, ...), and its thread only runs what `_execute` queues. A whole transaction in one function
    cannot be left half-open by a cancelled caller, and it is one hop instead of one per statement on the
    executor's hot path. `_execute` and `_conn` have kept these meanings since aiosqlite 0.17; if they change,
    this function is the one place to fix. `PlanStore._run` refuses a closed store before calling it.
    """
    execute = cast(Callable[[Callable[[], T]], Awaitable[T]], db._execute)
    return execute(lambda: fn(db._conn))


def _connection(db: aiosqlite.Connection) -> sqlite3.Connection:
    """The sqlite3 connection itself, for the fast path on the event loop's thread (see `PlanStore._run`)."""
    return db._conn


def _after_checkpoint(fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
    """A passive checkpoint (it waits for no reader or writer), then `fn`."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    return fn(conn)


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
            "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, timestamp(utcnow()))
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


class PlanStore(SqliteRunQueue):
    """`base.Store` and, through `SqliteRunQueue`, `base.RunQueue` on an SQLite file.

    Use `async with PlanStore.open(path) as store:`; or `store = await PlanStore.connect(path)` and
    `await store.close()` for a store that lives as long as a server.
    """

    def __init__(self, db: aiosqlite.Connection, path: str, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self._db = db
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._closed = False
        self._on_thread = 0  # calls queued or running on the connection's thread
        self._calls = 0  # since the last checkpoint

    # -- lifecycle ----------------------------------------------------------------------------------------

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
            # Used from the loop's thread too (the fast path), never by two threads at once.
            db = await aiosqlite.connect(location, isolation_level=None, check_same_thread=False)
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
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # `_run` checkpoints, on the connection's thread
        conn.execute("PRAGMA foreign_keys = ON")
        return in_write(conn, _migrate)

    async def schema_version(self) -> int:
        """The number of migrations applied to this database."""
        row = await self._run(lambda c: c.execute("SELECT MAX(version) FROM schema_version").fetchone())
        return int(row[0])

    # -- the one door to the database ---------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, inline: bool = False) -> T:
        """Run `fn(connection)` on the connection's thread; busy errors are retried a bounded number of times.

        `inline`: a small call that may run on the event loop's thread instead, when nothing is queued on
        the connection's thread (so calls stay in order and the connection is never used by two threads).
        Each thread attempt is shielded: once queued it runs to its end on the thread anyway, and the caller
        should learn whether it committed.

        Raises:
            StoreError: the database failed, stayed locked through every attempt, or is closed.
        """
        if self._closed:
            raise StoreError(f"plan database {self.path!r} is closed: open the store again")
        self._calls += 1
        if self._calls >= CHECKPOINT_EVERY:
            self._calls = 0
            fn = functools.partial(_after_checkpoint, fn)
        elif inline and not self._on_thread:
            try:
                return self._inline(fn)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise StoreError(f"plan database {self.path!r}: {exc}") from exc
            except sqlite3.Error as exc:
                raise StoreError(f"plan database {self.path!r}: {exc}") from exc
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

    def _inline(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` on this thread. The connection's busy timeout is 0 but on its own thread, so this fails at
        once rather than wait for another process's lock here."""
        return fn(_connection(self._db))

    async def _attempt(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._on_thread += 1
        try:
            with anyio.CancelScope(shield=True):
                result = await _on_connection_thread(self._db, functools.partial(self._waiting, fn))
        finally:
            self._on_thread -= 1
        return result

    def _waiting(self, fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
        """`fn` waiting up to the busy timeout for another process's lock (on the connection's thread)."""
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        try:
            return fn(conn)
        finally:
            conn.execute("PRAGMA busy_timeout = 0")

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
        item_rows = _all_item_rows(plan.id, plan.steps)
        event_rows = _event_rows(events)
        revision = plan.revision

        def body(conn: sqlite3.Connection) -> None:
            _write_plan(conn, plan_row, step_rows, revision, item_rows)
            _write_events(conn, event_rows)

        await self._run(lambda c: in_write(c, body))
        plan.__dict__["revision"] = revision + 1  # no validate_assignment round on the hot path

    async def save_transition(
        self,
        plan: ExecutionPlan,
        steps: Sequence[Step],
        events: Sequence[Event] = (),
        *,
        items: Sequence[tuple[Step, int]] = (),
        release: str | None = None,
    ) -> None:
        """Write the plan's own fields, the given steps and items only, and append `events`, in one
        transaction; with `release`, drop that owner's claim in it too.

        Only the plan header and the given steps are serialised: this is the executor's hot path. A plan
        not stored yet is written whole. A compare-and-set on `plan.revision`, like `save_plan`.

        Raises:
            PlanConflictError: the stored plan changed since `plan` was read; nothing was written.
            StoreError: a given step is not stored (a transition changes steps, it never adds them).
        """
        plan_row = _plan_row(plan)
        step_rows = _step_rows(plan.id, steps)
        item_rows = _item_rows(plan.id, items)
        event_rows = _event_rows(events)
        revision = plan.revision

        def body(conn: sqlite3.Connection) -> None:
            if revision == 0:
                whole = _step_rows(plan.id, plan.steps)
                _write_plan(conn, plan_row, whole, revision, _all_item_rows(plan.id, plan.steps))
            else:
                _write_header(conn, plan_row, revision)
                if conn.executemany(_UPDATE_STEP, step_rows).rowcount != len(step_rows):
                    raise StoreError(f"plan {plan.id!r}: a transition names a step that is not stored")
                conn.executemany(_UPSERT_ITEM, item_rows)
            _write_events(conn, event_rows)
            if release is not None:
                _release(conn, plan.id, release)

        small = revision != 0 and _size(plan_row, step_rows + item_rows, event_rows) <= INLINE_MAX_BYTES
        await self._run(lambda c: in_write(c, body), inline=small)
        plan.__dict__["revision"] = revision + 1

    async def get_plan(self, plan_id: str) -> ExecutionPlan:
        """The plan as last committed.

        Raises:
            PlanNotFoundError: no plan has this id.
        """
        plan = await self._run(lambda c: in_read(c, lambda c2: _load_plan(c2, plan_id)))
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

        return await self._run(lambda c: in_read(c, body))

    # -- events -------------------------------------------------------------------------------------------

    async def summary(self, plan_id: str, limit: int) -> PlanSummary:
        """The plan's summary listing at most `limit` steps, those that need attention first, read from the
        step counts and the listed steps' rows only.

        Raises:
            PlanNotFoundError: no plan has this id.
        """

        def body(conn: sqlite3.Connection) -> PlanSummary | None:
            head = conn.execute(_SUMMARY_HEAD, (plan_id,)).fetchone()
            if head is None:
                return None
            counts = conn.execute(_COUNTS, (plan_id,))
            return summary_from_rows(plan_id, head, counts, conn.execute(_SUMMARY_STEPS, (plan_id, limit)))

        summary = await self._run(lambda c: in_read(c, body))
        if summary is None:
            raise PlanNotFoundError(plan_id)
        return summary

    async def recent_plans(self, limit: int) -> list[PlanHead]:
        """The `limit` newest plans' heads, newest first, from their rows alone."""
        rows = await self._run(
            lambda c: c.execute(
                "SELECT id, description, status, updated_at FROM plans "
                "ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (max(limit, 0),),
            ).fetchall()
        )
        return [
            PlanHead(id=pid, description=text, status=status, updated_at=parse_timestamp(at))
            for pid, text, status, at in rows
        ]

    async def append_event(self, event: Event) -> None:
        rows = _event_rows([event])
        await self._run(lambda c: in_write(c, lambda c2: _write_events(c2, rows)))

    async def events(self, plan_id: str) -> list[Event]:
        """The plan's event log in order of `seq` (1, 2, ...)."""
        return await self._run(lambda c: _events_after(c, plan_id, 0))

    async def progress(self, plan_id: str, after_seq: int | None = None) -> PlanProgress:
        """The plan's status, step counts, newest event `seq`, and its events after `after_seq` (None: no
        events), from one snapshot.

        Raises:
            PlanNotFoundError: no plan has this id.
        """

        def body(conn: sqlite3.Connection) -> PlanProgress | None:
            row = conn.execute(
                "SELECT status, json_extract(header, '$.error') FROM plans WHERE id = ?", (plan_id,)
            ).fetchone()
            if row is None:
                return None
            counts = conn.execute(_COUNTS, (plan_id,))
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE plan_id = ?", (plan_id,))
            return PlanProgress(
                plan_id=plan_id,
                status=row[0],
                error=row[1],
                counts=step_counts(counts),
                seq=seq.fetchone()[0],
                events=(
                    _events_after(conn, plan_id, after_seq, PROGRESS_EVENTS) if after_seq is not None else []
                ),
            )

        progress = await self._run(lambda c: in_read(c, body), inline=True)  # small: bounded events
        if progress is None:
            raise PlanNotFoundError(plan_id)
        return progress

    # -- claims -------------------------------------------------------------------------------------------

    async def claim(self, plan_id: str, owner: str, stale_after: float = DEFAULT_STALE_AFTER) -> Claim | None:
        """Claim the plan for `owner`, atomically across processes.

        Returns:
            None when `owner` now holds the claim; else the live claim of another owner. A claim whose
            owner is dead (same host, no such process) or whose heartbeat is stale is taken over.
        """
        return await self._run(lambda c: in_write(c, lambda c2: _claim(c2, plan_id, owner, stale_after)))

    async def start_run(
        self,
        plan: ExecutionPlan,
        events: Sequence[Event],
        owner: str,
        stale_after: float = DEFAULT_STALE_AFTER,
    ) -> Claim | None:
        """Claim the plan for `owner` and write it whole with `events`, in one transaction.

        Returns:
            None when done; else the live claim in the way (nothing is written).

        Raises:
            PlanConflictError: the stored plan changed since `plan` was read; nothing was written.
        """
        plan_row = _plan_row(plan)
        step_rows = _step_rows(plan.id, plan.steps)
        item_rows = _all_item_rows(plan.id, plan.steps)
        event_rows = _event_rows(events)
        revision = plan.revision

        def body(conn: sqlite3.Connection) -> Claim | None:
            holder = _claim(conn, plan.id, owner, stale_after)
            if holder is None:
                _write_plan(conn, plan_row, step_rows, revision, item_rows)
                _write_events(conn, event_rows)
            return holder

        small = _size(plan_row, step_rows + item_rows, event_rows) <= INLINE_MAX_BYTES
        holder = await self._run(lambda c: in_write(c, body), inline=small)
        if holder is None:
            plan.__dict__["revision"] = revision + 1
        return holder

    async def heartbeat(self, plan_id: str, owner: str) -> Claim | None:
        """Refresh `owner`'s claim. Returns the claim (with any `cancel_reason`), or None if it was lost."""

        def body(conn: sqlite3.Connection) -> Claim | None:
            row = conn.execute(
                "UPDATE claims SET heartbeat_at = ? WHERE plan_id = ? AND owner = ? "
                "RETURNING owner, heartbeat_at, cancel_reason",
                (timestamp(utcnow()), plan_id, owner),
            ).fetchone()
            return _claim_from_row(plan_id, row) if row is not None else None

        return await self._run(lambda c: in_write(c, body), inline=True)

    async def release(self, plan_id: str, owner: str) -> None:
        """Drop `owner`'s claim; a claim held by someone else is left alone."""
        await self._run(lambda c: in_write(c, lambda c2: _release(c2, plan_id, owner)))

    async def get_claim(self, plan_id: str) -> Claim | None:
        row = await self._run(
            lambda c: c.execute(
                "SELECT owner, heartbeat_at, cancel_reason FROM claims WHERE plan_id = ?", (plan_id,)
            ).fetchone(),
            inline=True,
        )
        return _claim_from_row(plan_id, row) if row is not None else None

    async def request_cancel(self, plan_id: str, reason: str) -> bool:
        """Ask the process holding the plan's claim to cancel (its run polls for it every 0.2 s).

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

        return await self._run(lambda c: in_write(c, body))


if TYPE_CHECKING:
    _conforms: type[QueueStore] = PlanStore
