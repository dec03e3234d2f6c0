"""The PostgreSQL plan store (psycopg 3, async, with its pool): migrations, plans, steps, an append-only event
log and execution claims, with the semantics of the SQLite store (`sqlite.PlanStore`). The run queue (runs,
runners, cached catalogs, LISTEN/NOTIFY) is `postgres_queue.PostgresRunQueue`, which `PostgresStore`
inherits and serves through the same pool. An optional extra: `pip install 'mcp-planner[postgres]'`.

What SQLite gets from its single write lock, this store does explicitly:
- every transaction that writes a plan, appends events, or takes, releases or cancels a claim first takes
  the plan's advisory lock (`pg_advisory_xact_lock(hashtextextended(plan_id, 0))`), so event `seq`s
  (MAX + 1 per plan) never collide and of two owners claiming at once one wins (a heartbeat is one
  statement on the claim's row and needs none);
- a plan write is a compare-and-set on the plan's `revision` (`UPDATE ... WHERE revision = %s`; a new plan:
  `INSERT ... ON CONFLICT DO NOTHING`), which READ COMMITTED makes atomic: the loser waits on the row, then
  matches nothing. The revision is the fencing token: `start_run` claims and writes the plan in one
  transaction, so a runner that lost its claim fails its next write with `PlanConflictError`;
- the checks that refuse a write (`planner_check`) run in the database, so a transition is one pipelined
  round trip (BEGIN, its statements, COMMIT) instead of a round trip per statement;
- heartbeats and claims are stamped with the database's clock (`now()`) and judged stale in SQL against it:
  hosts' clocks differ. An owner that is dead on this host (`owner_is_dead`) is still recognised here.

Reads of several statements run in one REPEATABLE READ snapshot. Every call is shielded once it has its
connection, so a caller cancelled mid-transaction never leaves one open or a connection broken in the
pool. psycopg exceptions stay in this package: they leave `PostgresStore._run` as `StoreError`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import select
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from mcp_planner.errors import PlanConflictError, PlanNotFoundError
from mcp_planner.plan.model import (
    ATTENTION_ORDER,
    ExecutionPlan,
    PlanStatus,
    PlanSummary,
    Step,
)
from mcp_planner.store.base import (
    DEFAULT_STALE_AFTER,
    PROGRESS_EVENTS,
    Claim,
    Event,
    PlanHead,
    PlanProgress,
    StoreError,
    encode_json,
    owner_is_dead,
    plan_from_json,
    step_counts,
    summary_from_rows,
)


class PostgresExtraMissingError(StoreError, ImportError):
    """psycopg is not installed: the PostgreSQL store is an optional extra."""


try:
    import psycopg
    from psycopg_pool import AsyncConnectionPool
except ImportError as exc:  # the base install has no psycopg
    raise PostgresExtraMissingError(
        f"a postgresql:// database needs PostgreSQL support ({exc.name} is missing): "
        "pip install 'mcp-planner[postgres]'"
    ) from exc

from mcp_planner.store.postgres_queue import (  # noqa: E402 (after the check that psycopg is there)
    NOTIFY_MIGRATION,
    QUEUE_MIGRATION,
    READ_ONLY,
    Conn,
    Listener,
    PostgresRunQueue,
    T,
    libpq_defaults,
    transaction,
)

if TYPE_CHECKING:
    from mcp_planner.store.base import QueueStore

logger = logging.getLogger("mcp_planner.store.postgres")

#: The SQLSTATEs `planner_check` raises: a lost compare-and-set, a transition naming an unknown step.
_CONFLICT = "MPC01"
_NOT_STORED = "MPS01"
#: How long opening waits for the pool's first connections (the server answered the listener already).
POOL_OPEN_TIMEOUT = 30.0
#: Serialises migrations of one database across processes (any constant unlikely to collide).
_MIGRATION_LOCK = 0x6D63_705F_706C_616E  # "mcp_plan"

#: Ordered schema migrations; the store's version is the number applied. Append, never edit.
#: JSON is `text` (cheaper to write than jsonb on the hot path; the few queries that look inside cast it).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE plans (
            id text PRIMARY KEY,
            n bigint GENERATED ALWAYS AS IDENTITY,
            status text NOT NULL,
            description text NOT NULL,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            header text NOT NULL,
            revision bigint NOT NULL DEFAULT 1
        )""",
        "CREATE INDEX plans_by_created ON plans (created_at DESC, n DESC)",
        """CREATE TABLE steps (
            plan_id text NOT NULL REFERENCES plans (id) ON DELETE CASCADE,
            step_id text NOT NULL,
            idx integer NOT NULL,
            status text NOT NULL,
            data text NOT NULL,
            PRIMARY KEY (plan_id, step_id)
        )""",
        """CREATE TABLE events (
            plan_id text NOT NULL,
            seq bigint NOT NULL,
            at timestamptz NOT NULL,
            kind text NOT NULL,
            step_id text,
            data text NOT NULL,
            PRIMARY KEY (plan_id, seq)
        )""",
        """CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'the event log is append-only';
        END $$""",
        """CREATE TRIGGER events_no_change BEFORE UPDATE OR DELETE ON events
            FOR EACH ROW EXECUTE FUNCTION events_append_only()""",
        """CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
            FOR EACH STATEMENT EXECUTE FUNCTION events_append_only()""",
        """CREATE TABLE claims (
            plan_id text PRIMARY KEY,
            owner text NOT NULL,
            heartbeat_at timestamptz NOT NULL,
            cancel_reason text
        )""",
        # How many of a plan's steps are in each status, kept by the database as steps change status, so a
        # follower reads a plan's progress without reading its steps. A whole-plan write recounts.
        """CREATE TABLE step_counts (
            plan_id text NOT NULL,
            status text NOT NULL,
            n integer NOT NULL,
            PRIMARY KEY (plan_id, status)
        )""",
        """CREATE FUNCTION steps_counted() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE step_counts SET n = n - 1 WHERE plan_id = old.plan_id AND status = old.status;
            INSERT INTO step_counts (plan_id, status, n) VALUES (new.plan_id, new.status, 1)
                ON CONFLICT (plan_id, status) DO UPDATE SET n = step_counts.n + 1;
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER steps_counted AFTER UPDATE OF status ON steps FOR EACH ROW
            WHEN (old.status IS DISTINCT FROM new.status) EXECUTE FUNCTION steps_counted()""",
        # The items of `for_each` steps, one row each: a run writes an item's change, never the whole list.
        """CREATE TABLE step_items (
            plan_id text NOT NULL,
            step_id text NOT NULL,
            item integer NOT NULL,
            data text NOT NULL,
            PRIMARY KEY (plan_id, step_id, item)
        )""",
        # Refuses a write from inside its transaction (`_CONFLICT`, `_NOT_STORED`): no round trip to ask.
        """CREATE FUNCTION planner_check(ok boolean, state text, message text) RETURNS void
        LANGUAGE plpgsql AS $$
        BEGIN
            IF NOT ok THEN
                RAISE EXCEPTION USING ERRCODE = state, MESSAGE = message;
            END IF;
        END $$""",
    ),
    # The run queue: runs outlive the process that submitted them; runners claim and execute them.
    QUEUE_MIGRATION,
    # Notifications that wake runners and followers (`PostgresRunQueue.wait_for_work`).
    NOTIFY_MIGRATION,
)

_LOCK_PLAN = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
_INSERT_PLAN = f"""
WITH written AS (
    INSERT INTO plans (id, status, description, created_at, updated_at, header, revision)
    VALUES (%(id)s, %(status)s, %(description)s, %(created_at)s, %(updated_at)s, %(header)s, 1)
    ON CONFLICT (id) DO NOTHING RETURNING 1
)
SELECT planner_check(EXISTS (SELECT FROM written), '{_CONFLICT}', %(id)s)
"""
_UPDATE_HEADER = f"""
WITH written AS (
    UPDATE plans SET status = %(status)s, description = %(description)s, updated_at = %(updated_at)s,
        header = %(header)s, revision = revision + 1
    WHERE id = %(id)s AND revision = %(revision)s RETURNING 1
)
SELECT planner_check(EXISTS (SELECT FROM written), '{_CONFLICT}', %(id)s)
"""
_INSERT_STEPS = """
INSERT INTO steps (plan_id, step_id, idx, status, data)
SELECT %s, s.step_id, s.idx, s.status, s.data
FROM unnest(%s::text[], %s::integer[], %s::text[], %s::text[]) AS s (step_id, idx, status, data)
"""
#: One step of a transition, a statement per step: on the hot path (a step or a few) this plans and runs in
#: half the time of one `unnest` statement for them all.
_UPDATE_STEP = f"""
WITH written AS (
    UPDATE steps SET status = %(status)s, data = %(data)s
    WHERE plan_id = %(plan_id)s AND step_id = %(step_id)s AND idx = %(idx)s RETURNING 1
)
SELECT planner_check(EXISTS (SELECT FROM written), '{_NOT_STORED}', %(plan_id)s)
"""
_UPSERT_ITEM = """
INSERT INTO step_items (plan_id, step_id, item, data) VALUES (%s, %s, %s, %s)
ON CONFLICT (plan_id, step_id, item) DO UPDATE SET data = excluded.data
"""
_UPSERT_ITEMS = """
INSERT INTO step_items (plan_id, step_id, item, data)
SELECT %s, i.step_id, i.item, i.data
FROM unnest(%s::text[], %s::integer[], %s::text[]) AS i (step_id, item, data)
ON CONFLICT (plan_id, step_id, item) DO UPDATE SET data = excluded.data
"""
_RECOUNT = """
INSERT INTO step_counts (plan_id, status, n)
SELECT plan_id, status, count(*) FROM steps WHERE plan_id = %s GROUP BY plan_id, status
"""
#: An event numbered on from its plan's newest (the caller holds the plan's advisory lock).
_INSERT_EVENT = """
INSERT INTO events (plan_id, seq, at, kind, step_id, data)
VALUES (%(plan_id)s, (SELECT COALESCE(max(seq), 0) + 1 FROM events WHERE plan_id = %(plan_id)s),
        %(at)s, %(kind)s, %(step_id)s, %(data)s)
"""
_CLAIM_COLUMNS = "owner, heartbeat_at, cancel_reason"
#: The claim, and whether its heartbeat is fresh by the database's clock.
_READ_CLAIM = f"""
SELECT {_CLAIM_COLUMNS}, now() - heartbeat_at < %s * interval '1 second' FROM claims WHERE plan_id = %s
"""
_TAKE_CLAIM = """
INSERT INTO claims (plan_id, owner, heartbeat_at, cancel_reason) VALUES (%s, %s, now(), NULL)
ON CONFLICT (plan_id) DO UPDATE SET owner = excluded.owner, heartbeat_at = excluded.heartbeat_at,
    cancel_reason = NULL
"""
_RELEASE = "DELETE FROM claims WHERE plan_id = %s AND owner = %s"
_COUNTS = "SELECT status, n FROM step_counts WHERE plan_id = %s"
_SUMMARY_HEAD = """
SELECT status, h ->> 'description', h ->> 'error', (h ->> 'total_duration_ms')::bigint, h ->> 'output_values',
    h ->> 'output_errors'
FROM (SELECT status, header::json AS h FROM plans WHERE id = %s) AS p
"""
#: `ATTENTION_ORDER`, then plan order: the steps a short summary lists.
_ATTENTION = " ".join(f"WHEN '{s.value}' THEN {i}" for i, s in enumerate(ATTENTION_ORDER))
_SUMMARY_STEPS = f"""
SELECT idx, step_id, status, d ->> 'tool_name', (d ->> 'duration_ms')::bigint, d ->> 'error',
    (d ->> 'retry_count')::integer
FROM (
    SELECT idx, step_id, status, data::json AS d FROM steps WHERE plan_id = %s
    ORDER BY CASE status {_ATTENTION} END, idx
    LIMIT %s
) AS listed
"""
_EVENTS_AFTER = """
SELECT seq, at, kind, step_id, data FROM events WHERE plan_id = %s AND seq > %s ORDER BY seq LIMIT %s
"""
#: The newest plans' ids (a subquery: the plans, their steps and items are read in one snapshot).
_NEWEST = """
SELECT id FROM plans WHERE (%(status)s::text IS NULL OR status = %(status)s)
ORDER BY created_at DESC, n DESC LIMIT %(limit)s
"""


def masked(url: str) -> str:
    """`url` with any password replaced by `***` (in the URL's user part or a `password=` parameter)."""
    url = re.sub(r"^([a-z]+://[^:/@?#]*):[^@/?#]*@", r"\1:***@", url)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", r"\1***", url)


# Statuses are `StrEnum`s, which psycopg sends as the text they are.


def _plan_params(plan: ExecutionPlan) -> dict[str, Any]:
    return {
        "id": plan.id,
        "status": str(plan.status),
        "description": plan.description,
        "created_at": plan.created_at,
        "updated_at": plan.updated_at,
        "header": plan.model_dump_json(exclude={"steps"}),
        "revision": plan.revision,
    }


def _step_arrays(steps: Sequence[Step]) -> tuple[list[str], list[int], list[str], list[str]]:
    """The steps as column arrays for `unnest`."""
    return (
        [s.id for s in steps],
        [s.index for s in steps],
        [str(s.status) for s in steps],
        [s.model_dump_json() for s in steps],
    )


def _item_arrays(items: Sequence[tuple[Step, int]]) -> tuple[list[str], list[int], list[str]]:
    """The given items (a `for_each` step and an item's position in it) as column arrays for `unnest`."""
    unique = {(step.id, i): (step, i) for step, i in items}.values()
    ids, positions, data = [], [], []
    for step, i in unique:
        assert step.items is not None
        ids.append(step.id)
        positions.append(i)
        data.append(step.items[i].model_dump_json())
    return ids, positions, data


def _all_items(steps: Sequence[Step]) -> list[tuple[Step, int]]:
    return [(s, i) for s in steps if s.items for i in range(len(s.items))]


def _step_rows(plan_id: str, steps: Sequence[Step]) -> list[dict[str, Any]]:
    return [
        {
            "plan_id": plan_id,
            "step_id": s.id,
            "idx": s.index,
            "status": str(s.status),
            "data": s.model_dump_json(),
        }
        for s in steps
    ]


def _event_rows(events: Sequence[Event]) -> list[dict[str, Any]]:
    return [
        {
            "plan_id": e.plan_id,
            "at": e.at,
            "kind": e.kind,
            "step_id": e.step_id,
            "data": encode_json(e.data),
        }
        for e in events
    ]


# -- statements run in a caller's transaction -------------------------------------------------------------


async def _lock_plans(conn: Conn, plan_ids: Sequence[str]) -> None:
    """The plans' advisory locks, in one order (two transactions locking two plans cannot deadlock)."""
    for plan_id in sorted(set(plan_ids)):
        await conn.execute(_LOCK_PLAN, (plan_id,))


async def _write_header(conn: Conn, plan: dict[str, Any]) -> None:
    """Insert the plan's row (revision 0: new), or update it if the stored revision is still the plan's."""
    await conn.execute(_UPDATE_HEADER if plan["revision"] else _INSERT_PLAN, plan)


async def _write_plan(conn: Conn, plan: dict[str, Any], steps: Sequence[Step]) -> None:
    """Write the plan header, all its steps and their items if the stored revision is still the plan's."""
    plan_id = plan["id"]
    await _write_header(conn, plan)
    if plan["revision"]:
        await conn.execute("DELETE FROM steps WHERE plan_id = %s", (plan_id,))
        await conn.execute("DELETE FROM step_items WHERE plan_id = %s", (plan_id,))
    await conn.execute(_INSERT_STEPS, (plan_id, *_step_arrays(steps)))
    items = _all_items(steps)
    if items:
        await conn.execute(_UPSERT_ITEMS, (plan_id, *_item_arrays(items)))
    await conn.execute("DELETE FROM step_counts WHERE plan_id = %s", (plan_id,))
    await conn.execute(_RECOUNT, (plan_id,))


async def _write_events(conn: Conn, events: list[dict[str, Any]]) -> None:
    if events:
        await conn.cursor().executemany(_INSERT_EVENT, events)


async def _claim(conn: Conn, plan_id: str, owner: str, stale_after: float) -> Claim | None:
    """Take the plan's claim for `owner` unless another owner holds it live; that claim is returned. The
    caller holds the plan's advisory lock."""
    row = await (await conn.execute(_READ_CLAIM, (stale_after, plan_id))).fetchone()
    if row is not None:
        current = _claim_from_row(plan_id, row)
        if current.owner != owner and row[3] and not owner_is_dead(current.owner):
            return current
    await conn.execute(_TAKE_CLAIM, (plan_id, owner))
    return None


def _claim_from_row(plan_id: str, row: tuple[Any, ...]) -> Claim:
    return Claim(plan_id=plan_id, owner=row[0], heartbeat_at=row[1], cancel_reason=row[2])


def _plans_from_rows(
    heads: list[tuple[Any, ...]], steps: list[tuple[Any, ...]], items: list[tuple[Any, ...]]
) -> list[ExecutionPlan | StoreError]:
    """Plans (in the order of `heads`) from their rows: (id, header, revision), (plan_id, data) in plan
    and step order, (plan_id, step_id, data) in item order. A plan that cannot be parsed is its error."""
    steps_of: dict[str, list[str]] = {}
    for plan_id, data in steps:
        steps_of.setdefault(plan_id, []).append(data)
    items_of: dict[str, dict[str, list[str]]] = {}
    for plan_id, step_id, data in items:
        items_of.setdefault(plan_id, {}).setdefault(step_id, []).append(data)
    plans: list[ExecutionPlan | StoreError] = []
    for plan_id, header, revision in heads:
        try:
            plans.append(
                plan_from_json(
                    plan_id, header, revision, steps_of.get(plan_id, []), items_of.get(plan_id, {})
                )
            )
        except StoreError as exc:
            plans.append(exc)
    return plans


async def _load_plans(conn: Conn, which: str, params: dict[str, Any]) -> list[ExecutionPlan | StoreError]:
    """The plans whose ids `which` (a query with `params`) selects, in its order, from one snapshot and in
    one round trip."""
    async with transaction(conn, READ_ONLY):
        heads = await conn.execute(
            f"SELECT p.id, p.header, p.revision FROM ({which}) AS w JOIN plans AS p ON p.id = w.id "
            "ORDER BY p.created_at DESC, p.n DESC",
            params,
        )
        steps = await conn.execute(
            f"SELECT plan_id, data FROM steps WHERE plan_id IN ({which}) ORDER BY plan_id, idx", params
        )
        items = await conn.execute(
            f"SELECT plan_id, step_id, data FROM step_items WHERE plan_id IN ({which}) "
            "ORDER BY plan_id, step_id, item",
            params,
        )
    return _plans_from_rows(await heads.fetchall(), await steps.fetchall(), await items.fetchall())


async def _migrate(conn: Conn) -> int:
    async with conn.transaction():
        # Two processes opening a fresh database at once: the second waits here, then finds it migrated.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(version integer NOT NULL, applied_at timestamptz NOT NULL)"
        )
        row = await (await conn.execute("SELECT COALESCE(max(version), 0) FROM schema_version")).fetchone()
        current = int(row[0]) if row is not None else 0
        if current > len(MIGRATIONS):
            raise StoreError(
                f"the plan database has schema version {current}, newer than this mcp-planner supports "
                f"({len(MIGRATIONS)}): upgrade mcp-planner"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[version - 1]:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (%s, now())", (version,)
            )
    return len(MIGRATIONS)


def _hung_up(conn: Conn) -> bool:
    """Whether the server has said goodbye on an idle connection (a FATAL at a restart or from
    `pg_terminate_backend`, then end of file): it has nothing else to say unasked. No round trip. (`poll`
    where there is one: `select` refuses descriptors past 1023, which a busy process reaches.)"""
    if not hasattr(select, "poll"):
        return bool(select.select([conn.fileno()], [], [], 0)[0])
    waiting = select.poll()
    waiting.register(conn.fileno(), select.POLLIN)
    return bool(waiting.poll(0))


async def _configure(conn: Conn) -> None:
    """Each pool connection reads timestamps in UTC (as the rest of the planner has them)."""
    await conn.execute("SET TIME ZONE 'UTC'")


class PostgresStore(PostgresRunQueue):
    """`base.Store` and, through `PostgresRunQueue`, `base.RunQueue` on a PostgreSQL database.

    Use `async with PostgresStore.open(url) as store:`; or `store = await PostgresStore.connect(url)` and
    `await store.close()` for a store that lives as long as a server.
    """

    def __init__(self, pool: AsyncConnectionPool[Conn], listener: Listener, path: str) -> None:
        self._pool = pool
        self._listener = listener
        #: The URL with any password masked: what messages name.
        self.path = path
        self._closed = False
        self._mark: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
            f"mcp_planner_pg_mark_{id(self)}", default=None
        )

    # -- lifecycle ----------------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, url: str, *, min_size: int = 1, max_size: int = 8) -> PostgresStore:
        """Open (migrating as needed) the database at `url`, with a pool of `min_size` to `max_size`
        connections and one more that listens for notifications.

        Raises:
            StoreError: the URL is bad, the server cannot be reached or refuses, or the database's schema is
                newer than this code.
        """
        path = masked(url)
        listener = Listener(url, path)
        try:
            conn = await listener.open()
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the plan database {path!r}: {exc}") from exc
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True, **libpq_defaults(url)},
            configure=_configure,
            name="mcp-planner",
            open=False,
        )
        try:
            try:
                await _migrate(conn)
                await pool.open(wait=True, timeout=POOL_OPEN_TIMEOUT)
            except psycopg.Error as exc:
                raise StoreError(f"cannot open the plan database {path!r}: {exc}") from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await pool.close()
                await listener.close()
            raise
        return cls(pool, listener, path)

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, *, min_size: int = 1, max_size: int = 8) -> AsyncIterator[PostgresStore]:
        """The store at `url` for the duration of an `async with` block.

        Raises:
            StoreError: see `connect`.
        """
        store = await cls.connect(url, min_size=min_size, max_size=max_size)
        try:
            yield store
        finally:
            await store.close()

    async def close(self) -> None:
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._listener.close()
            await self._pool.close()

    async def __aenter__(self) -> PostgresStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def schema_version(self) -> int:
        """The number of migrations applied to this database."""

        async def body(conn: Conn) -> int:
            row = await (await conn.execute("SELECT max(version) FROM schema_version")).fetchone()
            return int(row[0]) if row is not None else 0

        return await self._run(body)

    # -- the one door to the database ---------------------------------------------------------------------

    async def _run(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """`fn(connection)` on a pool connection (autocommit: `fn` opens any transaction it needs).

        Shielded once it has its connection: a caller cancelled meanwhile gets its cancellation when the
        call is done (committed or rolled back), and the connection goes back to the pool idle.

        Raises:
            StoreError: the database failed, is unreachable, or the store is closed.
            PlanConflictError: a compare-and-set write lost.
        """
        if self._closed:
            raise StoreError(f"plan database {self.path!r} is closed: open the store again")
        try:
            conn = await self._connection()
            with anyio.CancelScope(shield=True):
                try:
                    result = await fn(conn)
                finally:
                    await self._put_back(conn)
        except psycopg.Error as exc:
            if exc.sqlstate == _CONFLICT:
                raise PlanConflictError(exc.diag.message_primary or "") from None
            if exc.sqlstate == _NOT_STORED:
                raise StoreError(
                    f"plan {exc.diag.message_primary!r}: a transition names a step that is not stored"
                ) from None
            raise StoreError(f"plan database {self.path!r}: {exc}") from exc
        return result

    async def _connection(self) -> Conn:
        """A pool connection the server has not hung up on. After a server restart every idle connection
        is dead: the first one found makes the pool replace them all (waiting while the server comes back),
        so the restart costs no call an error."""
        conn = await self._pool.getconn()
        while _hung_up(conn):
            await conn.close()
            await self._pool.putconn(conn)  # a closed connection leaves the pool
            await self._pool.check()
            conn = await self._pool.getconn()
        return conn

    async def _put_back(self, conn: Conn) -> None:
        """Return the connection idle: a transaction an error left open is rolled back here.

        `rollback()`, not a ROLLBACK statement: it also forgets the statements psycopg prepared, which an
        error in a pipeline may have kept the server from preparing.
        """
        try:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                await conn.rollback()
        except psycopg.Error:
            await conn.close()  # the pool replaces it
        finally:
            await self._pool.putconn(conn)

    # -- plans --------------------------------------------------------------------------------------------

    async def save_plan(self, plan: ExecutionPlan, events: Sequence[Event] = ()) -> None:
        """Write the whole plan (replacing all its steps) and append `events`, in one transaction.

        A compare-and-set: it commits only if the stored plan is still at `plan.revision` (a new plan:
        not stored at all), and then advances `plan.revision`.

        Raises:
            PlanConflictError: the stored plan changed since `plan` was read; nothing was written.
            StoreError: the write failed; nothing of it was stored.
        """
        params = _plan_params(plan)
        steps = list(plan.steps)
        event_rows = _event_rows(events)

        async def body(conn: Conn) -> None:
            async with transaction(conn):
                await _lock_plans(conn, [plan.id, *(e["plan_id"] for e in event_rows)])
                await _write_plan(conn, params, steps)
                await _write_events(conn, event_rows)

        await self._run(body)
        plan.__dict__["revision"] = params["revision"] + 1  # no validate_assignment round on the hot path

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
        transaction of one round trip; with `release`, drop that owner's claim in it too.

        Only the plan header and the given steps are serialised: this is the executor's hot path. A plan
        not stored yet is written whole. A compare-and-set on `plan.revision`, like `save_plan`.

        Raises:
            PlanConflictError: the stored plan changed since `plan` was read; nothing was written.
            StoreError: a given step is not stored (a transition changes steps, it never adds them).
        """
        params = _plan_params(plan)
        revision = plan.revision
        step_rows = _step_rows(plan.id, steps) if revision else []
        item_rows = [(plan.id, *row) for row in zip(*_item_arrays(items), strict=True)] if revision else []
        whole = list(plan.steps) if not revision else []
        event_rows = _event_rows(events)

        async def body(conn: Conn) -> None:
            async with transaction(conn):
                await _lock_plans(conn, [plan.id, *(e["plan_id"] for e in event_rows)])
                if not revision:
                    await _write_plan(conn, params, whole)
                else:
                    await _write_header(conn, params)
                    if step_rows:
                        await conn.cursor().executemany(_UPDATE_STEP, step_rows)
                    if item_rows:
                        await conn.cursor().executemany(_UPSERT_ITEM, item_rows)
                await _write_events(conn, event_rows)
                if release is not None:
                    await conn.execute(_RELEASE, (plan.id, release))

        await self._run(body)
        plan.__dict__["revision"] = revision + 1

    async def get_plan(self, plan_id: str) -> ExecutionPlan:
        """The plan as last committed.

        Raises:
            PlanNotFoundError: no plan has this id.
        """
        plans = await self._run(lambda conn: _load_plans(conn, "SELECT %(id)s::text AS id", {"id": plan_id}))
        if not plans:
            raise PlanNotFoundError(plan_id)
        if isinstance(plans[0], StoreError):
            raise plans[0]
        return plans[0]

    async def plan_exists(self, plan_id: str) -> bool:
        async def body(conn: Conn) -> bool:
            return (
                await (await conn.execute("SELECT 1 FROM plans WHERE id = %s", (plan_id,))).fetchone()
                is not None
            )

        return await self._run(body)

    async def list_plans(
        self, status: PlanStatus | str | None = None, limit: int = 20
    ) -> list[ExecutionPlan]:
        """Up to `limit` plans, newest first, optionally only those with `status`.

        Raises:
            ValueError: `status` is not a plan status.
        """
        wanted = PlanStatus(status).value if status is not None else None
        params = {"status": wanted, "limit": max(limit, 0)}
        plans = []
        for plan in await self._run(lambda conn: _load_plans(conn, _NEWEST, params)):
            if isinstance(plan, StoreError):  # one damaged plan must not hide the others
                logger.warning("%s", plan)
            else:
                plans.append(plan)
        return plans

    # -- events -------------------------------------------------------------------------------------------

    async def summary(self, plan_id: str, limit: int) -> PlanSummary:
        """The plan's summary listing at most `limit` steps, those that need attention first, read from the
        step counts and the listed steps' rows only.

        Raises:
            PlanNotFoundError: no plan has this id.
        """

        async def body(conn: Conn) -> PlanSummary | None:
            async with transaction(conn, READ_ONLY):
                head_cur = await conn.execute(_SUMMARY_HEAD, (plan_id,))
                counts_cur = await conn.execute(_COUNTS, (plan_id,))
                steps_cur = await conn.execute(_SUMMARY_STEPS, (plan_id, max(limit, 0)))
            head = await head_cur.fetchone()
            if head is None:
                return None
            return summary_from_rows(plan_id, head, await counts_cur.fetchall(), await steps_cur.fetchall())

        summary = await self._run(body)
        if summary is None:
            raise PlanNotFoundError(plan_id)
        return summary

    async def recent_plans(self, limit: int) -> list[PlanHead]:
        """The `limit` newest plans' heads, newest first, from their rows alone."""

        async def body(conn: Conn) -> list[tuple[Any, ...]]:
            cur = await conn.execute(
                "SELECT id, description, status, updated_at FROM plans "
                "ORDER BY created_at DESC, n DESC LIMIT %s",
                (max(limit, 0),),
            )
            return await cur.fetchall()

        return [
            PlanHead(id=pid, description=text, status=status, updated_at=at)
            for pid, text, status, at in await self._run(body)
        ]

    async def append_event(self, event: Event) -> None:
        rows = _event_rows([event])

        async def body(conn: Conn) -> None:
            async with transaction(conn):
                await _lock_plans(conn, [event.plan_id])
                await _write_events(conn, rows)

        await self._run(body)

    async def events(self, plan_id: str) -> list[Event]:
        """The plan's event log in order of `seq` (1, 2, ...)."""

        async def body(conn: Conn) -> list[Event]:
            return _events(plan_id, await (await conn.execute(_EVENTS_AFTER, (plan_id, 0, None))).fetchall())

        return await self._run(body)

    async def progress(self, plan_id: str, after_seq: int | None = None) -> PlanProgress:
        """The plan's status, step counts, newest event `seq`, and its events after `after_seq` (None: no
        events), from one snapshot in one round trip.

        Raises:
            PlanNotFoundError: no plan has this id.
        """
        self._note_read()  # a follower reads progress, then waits (`wait_for_work`)

        async def body(conn: Conn) -> PlanProgress | None:
            async with transaction(conn, READ_ONLY):
                head_cur = await conn.execute(
                    "SELECT status, header::json ->> 'error', "
                    "(SELECT COALESCE(max(seq), 0) FROM events WHERE plan_id = %s) FROM plans WHERE id = %s",
                    (plan_id, plan_id),
                )
                counts_cur = await conn.execute(_COUNTS, (plan_id,))
                events_cur = (
                    await conn.execute(_EVENTS_AFTER, (plan_id, after_seq, PROGRESS_EVENTS))
                    if after_seq is not None
                    else None
                )
            head = await head_cur.fetchone()
            if head is None:
                return None
            return PlanProgress(
                plan_id=plan_id,
                status=head[0],
                error=head[1],
                counts=step_counts(await counts_cur.fetchall()),
                seq=head[2],
                events=_events(plan_id, await events_cur.fetchall()) if events_cur is not None else [],
            )

        progress = await self._run(body)
        if progress is None:
            raise PlanNotFoundError(plan_id)
        return progress

    # -- claims -------------------------------------------------------------------------------------------

    async def claim(self, plan_id: str, owner: str, stale_after: float = DEFAULT_STALE_AFTER) -> Claim | None:
        """Claim the plan for `owner`, atomically across processes.

        Returns:
            None when `owner` now holds the claim; else the live claim of another owner. A claim whose
            owner is dead (same host, no such process) or whose heartbeat is stale by the database's clock
            is taken over.
        """

        async def body(conn: Conn) -> Claim | None:
            async with transaction(conn):
                await _lock_plans(conn, [plan_id])
                return await _claim(conn, plan_id, owner, stale_after)

        return await self._run(body)

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
        params = _plan_params(plan)
        steps = list(plan.steps)
        event_rows = _event_rows(events)

        async def body(conn: Conn) -> Claim | None:
            async with transaction(conn):
                await _lock_plans(conn, [plan.id, *(e["plan_id"] for e in event_rows)])
                holder = await _claim(conn, plan.id, owner, stale_after)
                if holder is None:
                    await _write_plan(conn, params, steps)
                    await _write_events(conn, event_rows)
                return holder

        holder = await self._run(body)
        if holder is None:
            plan.__dict__["revision"] = params["revision"] + 1
        return holder

    async def heartbeat(self, plan_id: str, owner: str) -> Claim | None:
        """Refresh `owner`'s claim (by the database's clock). Returns the claim (with any `cancel_reason`),
        or None if it was lost."""

        async def body(conn: Conn) -> Claim | None:
            cur = await conn.execute(
                "UPDATE claims SET heartbeat_at = now() WHERE plan_id = %s AND owner = %s "
                f"RETURNING {_CLAIM_COLUMNS}",
                (plan_id, owner),
            )
            row = await cur.fetchone()
            return _claim_from_row(plan_id, row) if row is not None else None

        return await self._run(body)

    async def release(self, plan_id: str, owner: str) -> None:
        """Drop `owner`'s claim; a claim held by someone else is left alone."""

        async def body(conn: Conn) -> None:
            async with transaction(conn):
                await _lock_plans(conn, [plan_id])
                await conn.execute(_RELEASE, (plan_id, owner))

        await self._run(body)

    async def get_claim(self, plan_id: str) -> Claim | None:
        async def body(conn: Conn) -> Claim | None:
            cur = await conn.execute(f"SELECT {_CLAIM_COLUMNS} FROM claims WHERE plan_id = %s", (plan_id,))
            row = await cur.fetchone()
            return _claim_from_row(plan_id, row) if row is not None else None

        return await self._run(body)

    async def request_cancel(self, plan_id: str, reason: str) -> bool:
        """Ask the process holding the plan's claim to cancel (its run polls for it every 0.2 s; waiters are
        notified).

        Returns:
            False when nobody holds a live claim, so there is no process to ask.
        """

        async def body(conn: Conn) -> bool:
            async with transaction(conn):
                await _lock_plans(conn, [plan_id])
                row = await (await conn.execute(_READ_CLAIM, (DEFAULT_STALE_AFTER, plan_id))).fetchone()
                if row is None or not row[3] or owner_is_dead(row[0]):
                    return False
                await conn.execute(
                    "UPDATE claims SET cancel_reason = %s WHERE plan_id = %s", (reason, plan_id)
                )
                return True

        return await self._run(body)


def _events(plan_id: str, rows: list[tuple[Any, ...]]) -> list[Event]:
    return [
        Event(plan_id=plan_id, seq=seq, at=at, kind=kind, step_id=step_id, data=_json(data))
        for seq, at, kind, step_id, data in rows
    ]


def _json(text: str | None) -> Any:
    return json.loads(text) if text else None


if TYPE_CHECKING:
    _conforms: type[QueueStore] = PostgresStore
