"""Downstream MCP servers as one `ToolProvider`: connections, the tool catalog, and calls.

Each server is held open by one long-lived task in the `Downstream`'s task group (an `mcp.Client` must be
entered and exited in the same task); calls from any task go through that client concurrently. All servers
connect concurrently in the background; `wait_ready()` waits for the first round to settle. A server that
fails to start, or whose connection is lost, is `failed` in `status()`; the next call restarts it, with an
exponential backoff between consecutive failed starts.

The catalog names tools `server.tool` and follows `notifications/tools/list_changed` (and, on 2026-07-28
connections, the `subscriptions/listen` stream that replaces it).

Errors are translated here, once: a tool's `isError` result -> `ToolCallError`; a dead, unreachable or
misbehaving server -> `DownstreamError`; the per-server call timeout -> `StepTimeoutError` (the SDK then
sends `notifications/cancelled` downstream, as it does when the caller's own scope is cancelled).

What `${VAR}` references in the config expanded to (tokens in URLs, headers, args) never leaves this layer:
error messages, server status errors and every log record made while a `Downstream` is open are passed
through the config's redaction, which puts `${VAR}` back.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import anyio
import mcp_types as types
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from mcp_planner.downstream.config import Redactor, ServerConfig, ServersConfig
from mcp_planner.downstream.transports import open_transport, stderr_tail
from mcp_planner.engine.tools import ServerState, ServerStatus, ToolInfo
from mcp_planner.errors import (
    DownstreamError,
    ParameterError,
    StepError,
    StepTimeoutError,
    ToolCallError,
    ToolNotFoundError,
)
from mcp_planner.plan.model import StepResult

logger = logging.getLogger(__name__)

BACKOFF_BASE = 0.25
BACKOFF_CAP = 5.0
SHUTDOWN_TIMEOUT = 10.0
_LIST_PAGE_CAP = 100
_CLIENT_INFO = types.Implementation(name="mcp-planner", version="0.1.0")


@dataclass(eq=False)
class _Attempt:
    """One start of one server: its holder task, its client while connected, and why it ended."""

    settled: anyio.Event = field(default_factory=anyio.Event)
    finished: anyio.Event = field(default_factory=anyio.Event)
    close: anyio.Event = field(default_factory=anyio.Event)
    refresh: anyio.Event = field(default_factory=anyio.Event)
    client: Client | None = None
    lost: str | None = None
    errlog: IO[str] | None = None


@dataclass(eq=False)
class _Server:
    config: ServerConfig
    state: ServerState = ServerState.CONNECTING
    error: str | None = None
    tools: dict[str, types.Tool] | None = None
    attempt: _Attempt | None = None
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    failures: int = 0
    next_start_at: float = 0.0

    @property
    def name(self) -> str:
        return self.config.name


class Downstream:
    """The downstream servers of a `ServersConfig`, as a `ToolProvider`.

    ```python
    async with Downstream(load_config("servers.json", os.environ)) as tools:
        await tools.wait_ready(30)
        result = await tools.call("git.git_status", {"repo_path": "."})
    ```

    Args:
        config: The servers.
        on_catalog_changed: Called with a server's name whenever its tools were (re)listed.
        on_status_changed: Called with a server's name whenever its state changed (see `status()`).
    """

    def __init__(
        self,
        config: ServersConfig,
        *,
        on_catalog_changed: Callable[[str], None] | None = None,
        on_status_changed: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self._on_catalog_changed = on_catalog_changed
        self._on_status_changed = on_status_changed
        self._servers = {
            name: _Server(cfg, state=ServerState.DISABLED if cfg.disabled else ServerState.CONNECTING)
            for name, cfg in config.servers.items()
        }
        self._redact = config.redactor
        self._catalog: dict[str, ToolInfo] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = False
        self._live: set[_Attempt] = set()  # holders still running, including lost ones still closing

    async def __aenter__(self) -> Downstream:
        _log_redaction.add(self._redact)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for server in self._servers.values():
            if server.state is ServerState.CONNECTING:
                self._start(server)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._tg is not None
        self._closing = True
        attempts = list(self._live)
        for attempt in attempts:
            attempt.close.set()
        # Let every client close gracefully (stdin closed, process reaped); the SDK bounds each step.
        with anyio.move_on_after(SHUTDOWN_TIMEOUT, shield=True):
            for attempt in attempts:
                await attempt.finished.wait()
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(*exc_info)
        finally:
            _log_redaction.discard(self._redact)

    # -- ToolProvider -------------------------------------------------------------------------------

    def catalog(self) -> Mapping[str, ToolInfo]:
        """Every tool of every server that has listed its tools, by `server.tool` (filters applied)."""
        if self._catalog is None:
            catalog: dict[str, ToolInfo] = {}
            for server in self._servers.values():
                for tool in (server.tools or {}).values():
                    info = _tool_info(server.name, tool)
                    catalog[info.name] = info
            self._catalog = catalog
        return self._catalog

    async def call(self, tool_name: str, parameters: dict[str, Any]) -> StepResult:
        """Call one tool once, by `server.tool` or by its bare name when only one server offers it.

        Raises:
            ToolNotFoundError: no such tool, or it is filtered out, or its server is disabled.
            DownstreamError: the server cannot be started or reached, or died during the call.
            StepTimeoutError: the server's `callTimeout` passed (the call is cancelled downstream).
            ToolCallError: the tool answered `isError: true`; the message is its own text.
            ParameterError: the server refused the arguments at the protocol level.
        """
        try:
            return await self._call(tool_name, parameters)
        except StepError as exc:
            message = str(exc)
            clean = self._redact(message)
            if clean == message:
                raise
            raise type(exc)(clean) from exc.__cause__

    async def _call(self, tool_name: str, parameters: dict[str, Any]) -> StepResult:
        server, tool = self._resolve(tool_name)
        try:
            attempt, client = await self._ensure_connected(server)
        except DownstreamError as exc:
            raise DownstreamError(f"{tool_name}: {exc}") from None
        if server.tools is not None and tool not in server.tools:
            raise self._not_found(tool_name, server)
        qualified = f"{server.name}.{tool}"
        timeout = server.config.call_timeout
        try:
            with anyio.move_on_after(timeout) as scope:
                result = await client.call_tool(tool, parameters)
        except MCPError as exc:
            if exc.code == types.CONNECTION_CLOSED:
                reason = self._lost(server, attempt, "the connection closed during a call")
                raise DownstreamError(
                    f"{qualified}: server {server.name!r} closed the connection during the call ({reason}); "
                    "it is restarted on the next call"
                ) from exc
            if exc.code == types.INVALID_PARAMS:
                raise ParameterError(f"{qualified}: the server refused the arguments: {exc.message}") from exc
            raise DownstreamError(
                f"{qualified}: server {server.name!r} answered error {exc.code}: {exc.message}"
            ) from exc
        except ValidationError as exc:
            raise DownstreamError(f"{qualified}: server {server.name!r} sent a malformed result") from exc
        except RuntimeError as exc:
            if attempt.close.is_set():  # the client closed under us (connection lost or shutting down)
                raise DownstreamError(f"{qualified}: server {server.name!r} is unreachable: {exc}") from exc
            # The SDK's own checks of a result (structured content against the output schema, ...).
            raise ToolCallError(f"{qualified}: {exc}") from exc
        except Exception as exc:
            reason = self._lost(server, attempt, f"{type(exc).__name__}: {exc}")
            raise DownstreamError(f"{qualified}: server {server.name!r} is unreachable: {reason}") from exc
        if scope.cancelled_caught:
            raise StepTimeoutError(
                f"{qualified} did not answer within {timeout:g}s (the callTimeout of server "
                f"{server.name!r}); the call was cancelled downstream"
            )
        step_result = to_step_result(result)
        if result.is_error:
            raise ToolCallError(f"{qualified}: {step_result.text or 'the tool failed without a message'}")
        return step_result

    # -- status -------------------------------------------------------------------------------------

    async def wait_ready(self, timeout: float) -> bool:  # noqa: ASYNC109 (the agreed interface)
        """Wait until every enabled server has connected or failed once; False if `timeout` passed first."""
        with anyio.move_on_after(timeout):
            for server in self._servers.values():
                if server.attempt is not None:
                    await server.attempt.settled.wait()
            return True
        return False

    def status(self) -> dict[str, ServerStatus]:
        """Each server's state, error, tool count, transport and failed starts in a row, by name."""
        return {
            name: ServerStatus(
                name=name,
                state=server.state,
                error=server.error,
                tool_count=len(server.tools or {}),
                transport=server.config.transport,
                failures=server.failures,
            )
            for name, server in self._servers.items()
        }

    def unavailable_reason(self, server_name: str) -> str | None:
        """Why a server cannot take calls now (None when it is connected), naming it."""
        server = self._servers.get(server_name)
        if server is None:
            return f"no downstream server named {server_name!r} in {self._where()}"
        match server.state:
            case ServerState.CONNECTED:
                return None
            case ServerState.DISABLED:
                return f"downstream server {server_name!r} is disabled in {self._where()}"
            case ServerState.CONNECTING:
                return f"downstream server {server_name!r} is still starting"
            case _:
                return f"downstream server {server_name!r} is unreachable: {server.error}"

    # -- internals ----------------------------------------------------------------------------------

    def _where(self) -> str:
        return str(self.config.source) if self.config.source is not None else "the servers config"

    def _split(self, tool_name: str) -> tuple[_Server, str] | None:
        for name in sorted(self._servers, key=len, reverse=True):
            if tool_name.startswith(name + ".") and len(tool_name) > len(name) + 1:
                return self._servers[name], tool_name[len(name) + 1 :]
        return None

    def _resolve(self, tool_name: str) -> tuple[_Server, str]:
        prefixed = self._split(tool_name)
        if prefixed is not None:
            server, tool = prefixed
            if server.state is ServerState.DISABLED:
                raise ToolNotFoundError(
                    f"tool {tool_name!r}: server {server.name!r} is disabled in {self._where()}; "
                    "enable it there"
                )
            if not server.config.allows(tool):
                raise ToolNotFoundError(
                    f"tool {tool_name!r} is filtered out by the allowedTools/disabledTools of server "
                    f"{server.name!r} in {self._where()}"
                )
            if server.tools is not None and tool not in server.tools:
                raise self._not_found(tool_name, server)
            return server, tool
        owners = [s for s in self._servers.values() if s.tools and tool_name in s.tools]
        if len(owners) == 1:
            return owners[0], tool_name
        if owners:
            names = ", ".join(repr(f"{s.name}.{tool_name}") for s in owners)
            raise ToolNotFoundError(f"tool name {tool_name!r} is ambiguous; use one of {names}")
        raise self._not_found(tool_name, None)

    def _not_found(self, tool_name: str, server: _Server | None) -> ToolNotFoundError:
        if server is not None:
            known = sorted(server.tools or {})
            return ToolNotFoundError(
                f"server {server.name!r} has no tool {tool_name.split('.', 1)[-1]!r} "
                f"(its tools: {', '.join(known) or 'none'})"
            )
        known = sorted(self.catalog())
        shown = ", ".join(known[:30]) + (", ..." if len(known) > 30 else "")
        message = f"no tool named {tool_name!r}; call it as 'server.tool' (known: {shown or 'none'})"
        down = [
            s.name for s in self._servers.values() if s.tools is None and s.state is not ServerState.DISABLED
        ]
        if down:
            message += f"; servers whose tools are unknown (not connected): {', '.join(down)}"
        return ToolNotFoundError(message)

    def _start(self, server: _Server) -> _Attempt:
        assert self._tg is not None
        attempt = _Attempt()
        self._live.add(attempt)
        server.attempt = attempt
        self._set_state(server, ServerState.CONNECTING)
        self._tg.start_soon(self._hold, server, attempt, name=f"downstream {server.name}")
        return attempt

    async def _ensure_connected(self, server: _Server) -> tuple[_Attempt, Client]:
        attempt = server.attempt
        if server.state is ServerState.CONNECTED and attempt is not None and attempt.client is not None:
            return attempt, attempt.client
        if self._tg is None:
            raise DownstreamError("the downstream servers are not started: use Downstream as `async with`")
        if self._closing:
            raise DownstreamError(
                f"downstream server {server.name!r} is not available: the planner is shutting down"
            )
        async with server.lock:
            attempt = server.attempt
            if server.state is ServerState.CONNECTED and attempt is not None and attempt.client is not None:
                return attempt, attempt.client  # another caller's start, which we queued behind
            if server.state is not ServerState.CONNECTING or attempt is None:
                delay = server.next_start_at - anyio.current_time()
                if delay > 0:
                    await anyio.sleep(delay)
                attempt = self._start(server)
            # The holder bounds the start by the server's own timeout; this is a safety net.
            with anyio.move_on_after(server.config.timeout + SHUTDOWN_TIMEOUT):
                await attempt.settled.wait()
            if server.state is ServerState.CONNECTED and attempt.client is not None:
                return attempt, attempt.client
        raise DownstreamError(
            self.unavailable_reason(server.name) or f"server {server.name!r} is unavailable"
        )

    def _lost(self, server: _Server, attempt: _Attempt, reason: str) -> str:
        """Mark this connection of the server as lost (its holder then closes it); returns the full reason."""
        if attempt.lost is not None:
            return attempt.lost
        tail = stderr_tail(attempt.errlog)
        full = f"{reason}; stderr: {tail}" if tail else reason
        if attempt is not server.attempt or attempt.client is None or attempt.close.is_set() or self._closing:
            return full
        attempt.lost = full
        attempt.client = None
        server.error = self._redact(f"connection lost: {full}; it is restarted on the next call")
        self._set_state(server, ServerState.FAILED)
        logger.warning("downstream server %r: %s", server.name, server.error)
        attempt.close.set()
        return full

    async def _hold(self, server: _Server, attempt: _Attempt) -> None:
        """Own one connection from start to close: the client is entered and exited in this task."""
        cfg = server.config
        # Append mode: the child shares the file offset, and reading the tail must not move its writes.
        attempt.errlog = errlog = tempfile.TemporaryFile("a+", encoding="utf-8", errors="replace")
        connected = False
        error: str | None = None

        async def on_message(message: Any) -> None:
            if isinstance(message, types.ToolListChangedNotification):
                attempt.refresh.set()

        try:
            with anyio.CancelScope(deadline=anyio.current_time() + cfg.timeout) as deadline:
                transport = open_transport(
                    cfg, errlog, on_eof=lambda: self._lost(server, attempt, "the server closed")
                )
                client = Client(
                    transport,
                    mode=cfg.protocol,
                    cache=None,
                    message_handler=on_message,
                    client_info=_CLIENT_INFO,
                )
                async with client:
                    tools = await _list_tools(client, cfg)
                    deadline.deadline = math.inf
                    connected = True
                    self._connected(server, attempt, client, tools)
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._follow_tool_list, server, attempt, client)
                        await attempt.close.wait()
                        tg.cancel_scope.cancel()
            if deadline.cancelled_caught and not connected:
                error = (
                    f"did not start and list its tools within {cfg.timeout:g}s "
                    "(raise its 'timeout' in the config if it is slow to start)"
                )
        except Exception as exc:
            error = _describe_failure(cfg, exc)
        finally:
            current = server.attempt is attempt and not self._closing
            if current and not connected:
                tail = stderr_tail(errlog)
                server.error = self._redact(
                    (error or "failed to start") + (f"; stderr: {tail}" if tail else "")
                )
                server.failures += 1
                server.next_start_at = anyio.current_time() + backoff_delay(server.failures)
                self._set_state(server, ServerState.FAILED)
                logger.warning("downstream server %r failed to start: %s", server.name, server.error)
            elif current and attempt.lost is None:
                self._lost(server, attempt, error or "the connection ended")
            attempt.client = None
            errlog.close()
            self._live.discard(attempt)
            attempt.settled.set()
            attempt.finished.set()

    def _connected(
        self, server: _Server, attempt: _Attempt, client: Client, tools: dict[str, types.Tool]
    ) -> None:
        attempt.client = client
        server.tools = tools
        server.error = None
        server.failures = 0
        server.next_start_at = 0.0
        self._set_state(server, ServerState.CONNECTED)
        attempt.settled.set()
        logger.info("downstream server %r connected (%d tools)", server.name, len(tools))
        self._catalog_changed(server)

    def _catalog_changed(self, server: _Server) -> None:
        self._catalog = None
        _notify(self._on_catalog_changed, server.name)

    def _set_state(self, server: _Server, state: ServerState) -> None:
        server.state = state
        _notify(self._on_status_changed, server.name)

    async def _follow_tool_list(self, server: _Server, attempt: _Attempt, client: Client) -> None:
        """Relist the tools whenever the server says they changed."""
        async with anyio.create_task_group() as tg:
            caps = client.server_capabilities
            if client.protocol_version in MODERN_PROTOCOL_VERSIONS and caps.tools and caps.tools.list_changed:
                tg.start_soon(self._listen, server, attempt, client)
            while True:
                await attempt.refresh.wait()
                attempt.refresh = anyio.Event()
                try:
                    with anyio.fail_after(server.config.timeout):
                        tools = await _list_tools(client, server.config)
                except Exception as exc:
                    logger.warning("downstream server %r: cannot relist its tools: %r", server.name, exc)
                    continue
                server.tools = tools
                logger.info("downstream server %r changed its tools (%d now)", server.name, len(tools))
                self._catalog_changed(server)

    async def _listen(self, server: _Server, attempt: _Attempt, client: Client) -> None:
        try:
            async with client.listen(tools_list_changed=True) as subscription:
                # A change between our first listing and the subscription's acknowledgement is not replayed.
                attempt.refresh.set()
                async for _event in subscription:
                    attempt.refresh.set()
        except Exception as exc:
            logger.info("downstream server %r: no tools/list_changed stream: %r", server.name, exc)


class _LogRedaction:
    """Redacts the expanded `${VAR}` values of every open `Downstream` from every log record.

    A record factory rather than a logger filter: filters on a logger miss what its children log, and the
    SDK's and httpx's loggers (which log URLs) are not ours to enumerate.
    """

    def __init__(self) -> None:
        self._open: list[Redactor] = []
        self._merged = Redactor()
        self._base: Callable[..., logging.LogRecord] | None = None

    def add(self, redactor: Redactor) -> None:
        if not redactor:
            return
        if self._base is None:
            self._base = logging.getLogRecordFactory()
            logging.setLogRecordFactory(self._record)
        self._open.append(redactor)
        self._merged = Redactor.merge(self._open)

    def discard(self, redactor: Redactor) -> None:
        if redactor in self._open:
            self._open.remove(redactor)
            self._merged = Redactor.merge(self._open)

    def _record(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        assert self._base is not None
        record = self._base(*args, **kwargs)
        redact = self._merged
        if not redact:
            return record
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: logging reports it when it emits the record
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            # Formatters reuse exc_text, so the traceback they print is the redacted one.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record


_log_redaction = _LogRedaction()


def _notify(callback: Callable[[str], None] | None, name: str) -> None:
    if callback is not None:
        try:
            callback(name)
        except Exception:  # an observer's bug must not break a connection
            logger.exception("downstream change callback raised")


def backoff_delay(failures: int) -> float:
    """Seconds to wait before the next start of a server that failed to start `failures` times in a row."""
    return 0.0 if failures <= 0 else min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(failures, 16))


async def _list_tools(client: Client, cfg: ServerConfig) -> dict[str, types.Tool]:
    tools: dict[str, types.Tool] = {}
    cursor: str | None = None
    for _ in range(_LIST_PAGE_CAP):
        page = await client.list_tools(cursor=cursor)
        tools.update((t.name, t) for t in page.tools if cfg.allows(t.name))
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _tool_info(server: str, tool: types.Tool) -> ToolInfo:
    annotations = (
        tool.annotations.model_dump(mode="json", by_alias=True, exclude_none=True) if tool.annotations else {}
    )
    return ToolInfo(
        name=f"{server}.{tool.name}",
        description=tool.description or tool.title or "",
        input_schema=tool.input_schema,
        output_schema=tool.output_schema,
        annotations=annotations,
        server=server,
    )


def to_step_result(result: types.CallToolResult) -> StepResult:
    """A tool's result as a step result: text blocks joined, structured content, every block as JSON."""
    text = "\n".join(block.text for block in result.content if isinstance(block, types.TextContent))
    content = [block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in result.content]
    return StepResult(text=text, structured=result.structured_content, content=content)


def _describe_failure(cfg: ServerConfig, exc: BaseException) -> str:
    """Why a start failed, in words: the first real exception of a group, without Python noise."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, FileNotFoundError) and cfg.transport == "stdio":
        return f"cannot run command {cfg.command!r}: not found (check 'command' and PATH)"
    if isinstance(exc, OSError) and cfg.transport == "stdio":
        return f"cannot run command {cfg.command!r}: {exc.strerror or exc}"
    if isinstance(exc, MCPError):
        if exc.code == types.CONNECTION_CLOSED:
            return "the server closed the connection during start-up (the process exited?)"
        return f"the server refused the handshake: {exc.message}"
    text = str(exc) or type(exc).__name__
    if cfg.transport != "stdio":
        return f"cannot connect to {cfg.url!r}: {text}"
    return f"{type(exc).__name__}: {text}"
