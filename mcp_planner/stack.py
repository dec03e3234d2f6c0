"""The composition root: the production stack the MCP server, the CLI and runner processes are built from.

One place decides how the pieces fit: the store (SQLite or PostgreSQL), the downstream servers (all of them,
only the ones a plan names, or none, validating against the catalog a warm runner published), the service,
and whether runs execute in this process or in runner processes started on demand.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio

from mcp_planner.engine.builtins import WithBuiltins
from mcp_planner.engine.tools import LocalTools, ToolProvider
from mcp_planner.errors import ConfigError
from mcp_planner.generation.providers import LLMSettings, llm_settings
from mcp_planner.plan.model import MAX_STEPS
from mcp_planner.runner import (
    CachedCatalog,
    DetachedRunners,
    Runner,
    publish_catalog,
    servers_key,
)
from mcp_planner.service import ApprovalPolicy, PlannerService
from mcp_planner.store import is_postgres, open_store
from mcp_planner.store.base import QueueStore

log = logging.getLogger("mcp_planner.stack")

#: How long a stack waits for its downstream servers' first connections.
CONNECT_TIMEOUT = 30.0

#: Which downstream servers a stack connects: every one, only those named, none, or none but validating
#: against the catalog a live runner published ("cached").
Tools = Literal["all", "none", "cached"] | Collection[str]


@dataclass
class Stack:
    store: QueueStore
    tools: ToolProvider
    service: PlannerService
    servers_file: Path | None
    #: The LLM of `generate_plan`, `mcp-planner generate` and `planner.llm` (`MCP_PLANNER_LLM`), if any.
    llm: LLMSettings | None = None


@asynccontextmanager
async def open_stack(
    db: str | Path,
    servers_file: Path | None,
    env: Mapping[str, str],
    *,
    tools: Tools = "all",
    runners: bool = False,
    warm: bool = False,
    approval: ApprovalPolicy | str = "agent",
    idle_exit: float | None = None,
) -> AsyncIterator[Stack]:
    """Open the store, the downstream servers `tools` says, and the service.

    Args:
        db: the database: a SQLite file or a `postgresql://` URL.
        runners: runs go to runner processes (started on demand, outliving this one); else this process
            executes them itself.
        warm: when a live runner serves this database and servers file, use it instead: validate against
            the catalog it published (no server starts) and submit runs to it.

    The LLM comes from `env["MCP_PLANNER_LLM"]` (`generation.providers`): `planner.llm` steps ask it.

    Raises:
        StoreError: the database cannot be opened.
        ConfigError: the servers file is unreadable or malformed, or the LLM spec is.
    """
    llm = llm_settings(env)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_store(db))
        if warm and await warm_runner(store, servers_file):
            tools, runners = "cached", True
        provider = _with_llm(await stack.enter_async_context(_tools(store, servers_file, env, tools)), llm)
        launcher = DetachedRunners(db, servers_file, idle_exit=idle_exit) if runners else None
        service = await stack.enter_async_context(
            PlannerService(
                store,
                provider,
                approval=approval,
                ready_timeout=CONNECT_TIMEOUT,
                launcher=launcher,
                max_steps=max_steps(env),
            )
        )
        _freeze_startup_objects()
        # The service's tools: the downstream ones and the built-in tools, as plans are validated against.
        yield Stack(store=store, tools=service.tools, service=service, servers_file=servers_file, llm=llm)


def _with_llm(provider: ToolProvider, llm: LLMSettings | None) -> ToolProvider:
    """`provider` with the built-in tools, `planner.llm` asking `llm`."""
    return provider if llm is None else WithBuiltins(provider, llm)


@asynccontextmanager
async def _tools(
    store: QueueStore, servers_file: Path | None, env: Mapping[str, str], tools: Tools
) -> AsyncIterator[ToolProvider]:
    if servers_file is None or tools == "none":
        yield LocalTools({})
        return
    if tools == "cached":
        published = await store.get_catalog(servers_key(servers_file))
        yield CachedCatalog(published[0] if published else [])
        return
    from mcp_planner.downstream.client import Downstream
    from mcp_planner.downstream.config import load_config

    config = load_config(servers_file, env=env)
    if tools != "all":
        config = config.model_copy(
            update={"servers": {n: s for n, s in config.servers.items() if n in tools}}
        )
    async with Downstream(config) as downstream:
        yield downstream


async def warm_runner(store: QueueStore, servers_file: Path | None) -> bool:
    """Whether a live runner serves this database and servers file, with its catalog published."""
    key = servers_key(servers_file)
    return bool(await store.live_runners(key)) and await store.get_catalog(key) is not None


async def run_runner(
    db: str | Path,
    servers_file: Path | None,
    env: Mapping[str, str],
    *,
    idle_exit: float | None,
    max_runs: int = 8,
) -> int:
    """Be a runner: keep the downstream servers connected, claim and execute runs until idle or cancelled.

    Returns:
        How many runs it executed.
    """
    llm = llm_settings(env)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_store(db))
        provider = await stack.enter_async_context(_tools(store, servers_file, env, "all"))
        key = servers_key(servers_file)

        async def ready() -> None:
            wait_ready = getattr(provider, "wait_ready", None)
            if callable(wait_ready):
                with anyio.move_on_after(
                    CONNECT_TIMEOUT
                ):  # slow or failed servers are reported, not waited for
                    await wait_ready(CONNECT_TIMEOUT)

        # It claims runs at once (a submitter sees its run taken) and executes them once connected.
        _freeze_startup_objects()
        runner = Runner(
            store,
            _with_llm(provider, llm),
            servers=key,
            max_runs=max_runs,
            ready=ready,
            max_steps=max_steps(env),
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(_keep_catalog_published, store, key, provider, ready)
            if not is_postgres(db):
                tg.start_soon(_stop_when_deleted, Path(db), tg.cancel_scope)
            if sys.platform != "win32":
                tg.start_soon(_stop_on_signals, tg.cancel_scope)
            await runner.serve(idle_exit=idle_exit or None)
            tg.cancel_scope.cancel()
        return runner.finished


def _freeze_startup_objects() -> None:
    """Exclude what startup made (modules, the SDK's and pydantic's schemas) from garbage collection.

    Each full collection walks every object alive; with the MCP SDK loaded one took 25-55 ms here and stalled
    the event loop: every running step waited for it. What exists at this point lives as long as the
    process, so collections need not look at it again. (No collection first: that alone costs as much.)
    """
    gc.freeze()


def max_steps(env: Mapping[str, str]) -> int:
    """The most steps a plan may have: `MCP_PLANNER_MAX_STEPS` (runners started on demand inherit it).

    Raises:
        ConfigError: the value is not a positive whole number.
    """
    text = env.get("MCP_PLANNER_MAX_STEPS", "").strip()
    if not text:
        return MAX_STEPS
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"MCP_PLANNER_MAX_STEPS must be a positive whole number, not {text!r}")
    return int(text)


async def _stop_on_signals(scope: anyio.CancelScope) -> None:
    """SIGTERM or SIGINT stops the runner in order: runs cut short stay claimed, and the next runner resumes
    them (a service manager's stop or restart loses nothing)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: the runner stops", signal.Signals(signum).name)
            scope.cancel()
            return


async def _stop_when_deleted(db_path: Path, scope: anyio.CancelScope) -> None:
    """A runner whose database file was deleted has nothing left to serve: stop."""
    while True:  # a file vanishing is no event anyio offers
        if not await anyio.Path(db_path).exists():
            break
        await anyio.sleep(2)
    log.warning("the database %s is gone: the runner stops", db_path)
    scope.cancel()


async def _keep_catalog_published(
    store: QueueStore, key: str | None, provider: ToolProvider, ready: Callable[[], Awaitable[None]]
) -> None:
    await ready()
    published = None
    while True:  # the downstream catalog follows tools/list_changed; the published copy follows it
        current = sorted(provider.catalog())
        if current != published:
            await publish_catalog(store, key, provider)
            published = current
        await anyio.sleep(5)
