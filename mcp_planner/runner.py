"""Runners: the processes that execute submitted runs, so a run outlives whoever asked for it.

A run is one committed row in the store's queue (`store.base.RunQueue`): `execute_plan` and `resume_plan`
submit it and then only follow the plan's stored state. A `Runner` claims queued runs whose servers config it
holds, executes them with the engine's `Executor` over its (warm) tools, heart-beats, and puts the runs of
runners that died back in the queue, where the at-most-once rule of a resume applies to them.

Two ways to have one:
- `mcp-planner runner` (a process of its own; `start_detached` starts one on demand for a submitter), which
  serves one database and one servers file;
- in-process, inside a `PlannerService` built without a launcher (the library and tests): its runs carry a
  servers key private to that process, so only it executes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from mcp_planner.engine.builtins import BUILTIN_SERVER
from mcp_planner.engine.tools import ToolInfo, ToolProvider
from mcp_planner.errors import DownstreamError, PlannerError
from mcp_planner.plan.model import MAX_STEPS, PlanStatus, StepResult, utcnow
from mcp_planner.store import files_dir, is_postgres
from mcp_planner.store.base import (
    DEFAULT_STALE_AFTER,
    QueueStore,
    RunKind,
    RunnerInfo,
    RunRecord,
    new_owner_id,
)

log = logging.getLogger("mcp_planner.runner")

#: How long a runner waits for new work before looking again (a submit wakes it sooner).
POLL_S = 0.25
#: How often a runner looks for runs whose runner died.
ORPHAN_SCAN_S = 2.0
#: The default `--idle-exit` of a runner started on demand.
DEFAULT_IDLE_EXIT = 300.0
#: After starting a runner, how long a submitter trusts it to come up before starting another.
SPAWN_GRACE_S = 20.0
#: Pids of runners this process started and has not reaped yet (they outlive it; it never waits for them).
_CHILDREN: set[int] = set()


def _exited(pid: int) -> bool:
    """Whether a runner this process started has exited (reaping it if so). A pid, not a `Popen`: a
    runner is meant to outlive this process, which `Popen` warns about when it is collected."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # reaped already
        done = pid
    if done:
        _CHILDREN.discard(pid)
    return bool(done)


#: The servers key of runs only the submitting process's own in-process runner may execute.
LOCAL_KEY_PREFIX = "local:"


def local_key(owner: str) -> str:
    return LOCAL_KEY_PREFIX + owner


def servers_key(servers_file: Path | None) -> str | None:
    """The identity of a servers config: its absolute path and the sha256 of its content (None: no file).

    A run records the key it was planned with; a runner executes only runs whose key it holds.
    """
    if servers_file is None:
        return None
    path = servers_file.resolve()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"{path}#{digest}"


class Runner:
    """Claims and executes queued runs whose servers key is `servers`, until stopped or idle.

    Args:
        store: the store whose queue it serves.
        tools: the tools steps call (kept connected between runs).
        servers: the servers key of the runs it may claim.
        owner: its id (host:pid:nonce); also the owner of its plans' execution claims.
        max_runs: how many runs it executes at once.
        on_change: called (plain function) with the plan id after each of its runs is marked done.
        ready: awaited before each run executes: the tools' first connections (it returns at once after).
        max_steps: the most steps a plan may have.
    """

    def __init__(
        self,
        store: QueueStore,
        tools: ToolProvider,
        *,
        servers: str | None,
        owner: str | None = None,
        max_runs: int = 8,
        stale_after: float = DEFAULT_STALE_AFTER,
        heartbeat_interval: float = 5.0,
        on_change: Callable[[str], None] | None = None,
        ready: Callable[[], Awaitable[object]] | None = None,
        max_steps: int = MAX_STEPS,
    ) -> None:
        self.store = store
        self.servers = servers
        self.id = owner or new_owner_id()
        self.max_runs = max(1, max_runs)
        self.stale_after = stale_after
        self.heartbeat_interval = heartbeat_interval
        self._on_change = on_change
        self._ready = ready
        from mcp_planner.engine.executor import Executor  # imported when a runner is made: serve starts lean

        self.executor = Executor(
            tools,
            store,
            owner=self.id,
            heartbeat_interval=heartbeat_interval,
            stale_after=stale_after,
            max_steps=max_steps,
        )
        self.running = 0
        self.finished = 0
        self._slot_free = anyio.Event()

    def _info(self) -> RunnerInfo:
        now = utcnow()
        return RunnerInfo(
            id=self.id, servers=self.servers, started_at=now, heartbeat_at=now, runs=self.finished
        )

    async def serve(
        self,
        *,
        idle_exit: float | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Claim and execute runs until cancelled, or until `idle_exit` seconds pass with nothing to do.

        Runs still executing when it is cancelled are cut short like a killed process: their plans are left
        `executing` with this runner's claims, and the next runner resumes them.
        """
        await self.store.register_runner(self._info())
        log.info("runner %s serving runs for servers %s", self.id, self.servers or "(none)")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat)
                task_status.started()
                await self._claim_loop(tg, idle_exit)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.store.unregister_runner(self.id)
            log.info("runner %s stopped after %d run(s)", self.id, self.finished)

    async def _claim_loop(self, tg: anyio.abc.TaskGroup, idle_exit: float | None) -> None:
        idle_since = anyio.current_time()
        next_scan = 0.0
        while True:
            if anyio.current_time() >= next_scan:
                next_scan = anyio.current_time() + ORPHAN_SCAN_S
                await reclaim_orphans(self.store, self.stale_after)
            claimed = None
            if self.running < self.max_runs:
                claimed = await self.store.claim_run(self.id, self.servers)
            if claimed is not None:
                self.running += 1
                tg.start_soon(self._execute, claimed, name=f"run {claimed.id} (plan {claimed.plan_id})")
                continue
            if self.running:
                idle_since = anyio.current_time()
            elif idle_exit and anyio.current_time() - idle_since >= idle_exit:
                log.info("runner %s: idle for %.0f s; exiting", self.id, idle_exit)
                return
            if self.running >= self.max_runs:
                self._slot_free = anyio.Event()
                with anyio.move_on_after(POLL_S):
                    await self._slot_free.wait()
            else:
                # Only this process submits to a runner for its local key: no other connection to watch.
                await self.store.wait_for_work(POLL_S, local_only=self.servers == local_key(self.id))

    async def _execute(self, run: RunRecord) -> None:
        error: str | None = None
        cut_short = False
        try:
            if self._ready is not None:  # claimed at once, executed once the tools are connected
                await self._ready()
            plan = await self.store.get_plan(run.plan_id)
            # A run queued again after its runner died may find its plan never started: then it executes.
            if run.kind == RunKind.EXECUTE or plan.status in (PlanStatus.DRAFT, PlanStatus.APPROVED):
                await self.executor.execute(plan)
            else:
                await self.executor.resume(plan, rerun_interrupted=run.rerun_interrupted)
        except PlannerError as exc:
            error = str(exc)
        except Exception as exc:  # a bug must not take the runner's other runs down
            log.exception("run %s of plan %r crashed", run.id, run.plan_id)
            error = f"the runner failed: {type(exc).__name__}: {exc}"
        except anyio.get_cancelled_exc_class():
            # The runner is stopping: the run stays claimed by it, and once it is gone the next runner
            # resumes the plan, as if this one had been killed.
            cut_short = True
            raise
        finally:
            if not cut_short:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await self.store.finish_run(run.id, self.id, error)
            if self._on_change is not None:
                self._on_change(run.plan_id)
            self.running -= 1
            self.finished += 1
            self._slot_free.set()

    async def _heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval)
            try:
                if not await self.store.heartbeat_runner(self.id):  # swept as dead: say who we are again
                    await self.store.register_runner(self._info())
            except PlannerError:
                log.warning("runner %s: heartbeat failed; trying again", self.id, exc_info=True)


class CachedCatalog:
    """The tool catalog a runner published in the store: enough to validate plans without starting servers.

    It cannot call tools: runs go to the runner that published it.
    """

    def __init__(self, tools: list[dict[str, Any]]) -> None:
        infos = (ToolInfo(**t) for t in tools)
        self._catalog = {info.name: info for info in infos}

    def catalog(self) -> Mapping[str, ToolInfo]:
        return self._catalog

    async def call(self, tool_name: str, parameters: dict[str, Any]) -> StepResult:
        raise DownstreamError(f"this process does not call tools: a runner executes {tool_name!r}")


async def publish_catalog(store: QueueStore, servers: str | None, tools: ToolProvider) -> None:
    """Store `tools`' catalog under `servers`, for `CachedCatalog`.

    The built-in tools are left out: whoever reads the catalog adds its own (`engine.builtins`).
    """
    entries = [dataclasses.asdict(info) for info in tools.catalog().values() if info.server != BUILTIN_SERVER]
    await store.save_catalog(servers, entries)


async def reclaim_orphans(store: QueueStore, stale_after: float = DEFAULT_STALE_AFTER) -> None:
    """Queue again, as resumes, the runs whose runner died; a live runner with their servers takes them.

    A run that only its own (now dead) process could execute, an in-process one, is ended instead: its
    plan is left as it was (`executing` with a dead claim), for a person or agent to resume.
    """
    for orphan in await store.requeue_orphans(stale_after):
        if orphan.servers is not None and orphan.servers.startswith(LOCAL_KEY_PREFIX):
            await store.cancel_queued_run(orphan.plan_id, "the process running it stopped: resume the plan")
            log.warning("run %s of plan %r: the process running it stopped", orphan.id, orphan.plan_id)
        else:
            log.warning("run %s of plan %r: its runner is gone; queued to resume", orphan.id, orphan.plan_id)


@dataclass
class DetachedRunners:
    """Starts a `mcp-planner runner` process on demand for one database and one servers file.

    The runner is detached (its own session, stdio to /dev/null, its log in `runner.log` beside the
    database, mode 0600) and inherits this process's environment, from which it expands `${VAR}` values.
    """

    #: A SQLite file or a `postgresql://` URL.
    db: str | Path
    servers_file: Path | None
    #: None: the runner's own default (its environment's MCP_PLANNER_RUNNER_IDLE_EXIT, else 300 s).
    idle_exit: float | None = None
    stale_after: float = DEFAULT_STALE_AFTER
    _spawned: int | None = field(default=None, init=False, repr=False)
    _spawned_at: float = field(default=0.0, init=False, repr=False)

    def key(self) -> str | None:
        return servers_key(self.servers_file)

    def started_runner_died(self) -> bool:
        """Whether the runner this process started last has already exited (it failed to start)."""
        return self._spawned is not None and _exited(self._spawned)

    @property
    def log_path(self) -> Path:
        return runner_log(self.db)

    async def ensure(self, store: QueueStore, key: str | None) -> bool:
        """Start a runner unless a live one serves `key` (or one started here moments ago is coming up).

        Returns:
            True if it started one.
        """
        for pid in list(_CHILDREN):
            _exited(pid)
        if await store.live_runners(key, stale_after=self.stale_after):
            return False
        coming_up = self._spawned is not None and not _exited(self._spawned)
        if coming_up and anyio.current_time() - self._spawned_at < SPAWN_GRACE_S:
            return False
        self._spawned = await anyio.to_thread.run_sync(self._start)
        self._spawned_at = anyio.current_time()
        return True

    def _start(self) -> int:
        return start_detached(self.db, self.servers_file, idle_exit=self.idle_exit)


def runner_log(db: str | Path) -> Path:
    """Where a runner started on demand for `db` writes its log: beside a SQLite file, else in this user's
    data directory."""
    return files_dir(db) / "runner.log"


def start_detached(db: str | Path, servers_file: Path | None, *, idle_exit: float | None = None) -> int:
    """Start `mcp-planner runner` for `db` and `servers_file`, detached from this process; its pid.

    A PostgreSQL URL goes to the runner in its environment (`MCP_PLANNER_DB`), not its command line, where
    any user of the host could read a password in it.
    """
    log_path = runner_log(db)
    log_path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    env = None
    cmd = [sys.executable, "-m", "mcp_planner", "runner"]
    if is_postgres(db):
        env = {**os.environ, "MCP_PLANNER_DB": str(db)}
    else:
        cmd += ["--db", os.path.abspath(os.path.expanduser(db))]  # its cwd is the log's directory
    if idle_exit is not None:
        cmd += ["--idle-exit", str(idle_exit)]
    if servers_file is not None:
        cmd += ["--servers", str(servers_file.resolve())]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            close_fds=True,
            cwd=str(log_path.parent),
            env=env,
        )
    finally:
        os.close(fd)
    proc.returncode = 0  # not ours to wait for: `Popen` must not warn that it still runs
    _CHILDREN.add(proc.pid)
    log.info("started runner pid %d on %s (log: %s)", proc.pid, socket.gethostname(), log_path)
    return proc.pid


__all__ = [
    "CachedCatalog",
    "DetachedRunners",
    "Runner",
    "local_key",
    "publish_catalog",
    "reclaim_orphans",
    "servers_key",
    "start_detached",
]
