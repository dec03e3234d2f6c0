"""Opening the transport to one downstream server (stdio, streamable HTTP or SSE) for `downstream.py`.

The read stream is wrapped so the connection notices a server that went away while idle (its stdout
closed), not only when the next call fails: the downstream then restarts it on the next use.

A stdio server runs in its own session (process group) so its whole tree can be signalled. Closing it
closes its stdin, then SIGTERMs and SIGKILLs what is left of the group, each step bounded, so a server
(or a child of it) that ignores SIGTERM is gone well within 2 s. The SDK's `stdio_client` waits 2 s + 2 s
and spares the children of a server that exits by itself, hence our own on POSIX.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import IO, TextIO, cast

import anyio
import anyio.abc
import httpx2
import mcp_types as types
from mcp.client._transport import ReadStream, TransportStreams
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, get_default_environment, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.message import SessionMessage

from mcp_planner.downstream.config import ServerConfig
from mcp_planner.downstream.streams import ReadStreamWrapper

_HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)
_TAIL_CHARS = 600

STDIN_GRACE = 0.5
"""Seconds a stdio server's process group has to exit by itself once its stdin is closed."""
TERM_GRACE = 0.5
"""Seconds between SIGTERM and SIGKILL to what is left of the group."""
_REAP_WAIT = 0.5
_POLL = 0.01


class _WatchedReadStream(ReadStreamWrapper):
    """A read stream that calls `on_eof` once when the other side is gone."""

    def __init__(self, inner: ReadStream[SessionMessage | Exception], on_eof: Callable[[], object]) -> None:
        super().__init__(inner)
        self._on_eof = on_eof
        self._ended = False

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._on_eof()

    async def receive(self) -> SessionMessage | Exception:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            self._end()
            raise


@contextlib.asynccontextmanager
async def open_transport(
    cfg: ServerConfig, errlog: IO[str], *, on_eof: Callable[[], object]
) -> AsyncIterator[TransportStreams]:
    """The stream pair to one server; a stdio server's stderr goes to `errlog`."""
    if cfg.transport == "stdio" and sys.platform != "win32":
        async with _stdio_process_group(cfg, errlog) as (read, write):
            yield _WatchedReadStream(read, on_eof), write
    elif cfg.transport == "stdio":  # Windows: the SDK kills the tree through a job object
        assert cfg.command is not None
        params = StdioServerParameters(command=cfg.command, args=cfg.args, env=cfg.env or None, cwd=cfg.cwd)
        async with stdio_client(params, errlog=cast(TextIO, errlog)) as (read, write):
            yield _WatchedReadStream(read, on_eof), write
    elif cfg.transport == "sse":
        async with sse_client(cfg.url or "", headers=cfg.headers or None) as (read, write):
            yield _WatchedReadStream(read, on_eof), write
    else:
        async with (
            httpx2.AsyncClient(headers=cfg.headers, timeout=_HTTP_TIMEOUT) as http,
            streamable_http_client(cfg.url or "", http_client=http) as (read, write),
        ):
            yield _WatchedReadStream(read, on_eof), write


@contextlib.asynccontextmanager
async def _stdio_process_group(cfg: ServerConfig, errlog: IO[str]) -> AsyncIterator[TransportStreams]:
    """Newline-delimited JSON-RPC with `cfg.command` run in a new session; its group is gone on exit."""
    assert cfg.command is not None
    process = await anyio.open_process(
        [cfg.command, *cfg.args],
        env=get_default_environment() | cfg.env,
        stderr=errlog,
        cwd=cfg.cwd,
        start_new_session=True,
    )
    # No await until the task group is entered: a cancellation in between would leak the process.
    to_session, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, from_session = anyio.create_memory_object_stream[SessionMessage](0)

    async def pump_stdout() -> None:
        assert process.stdout is not None
        buffer = b""
        async with to_session:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                async for chunk in process.stdout:
                    *lines, buffer = (buffer + chunk).split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        try:
                            await to_session.send(_parse(line))
                        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                            pass  # the session is gone: keep draining, so a chatty server can still exit

    async def pump_stdin() -> None:
        assert process.stdin is not None
        try:
            async with from_session:
                async for message in from_session:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n"
                    await process.stdin.send(data.encode())
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            # The server stopped reading; end the session's reads instead of leaving a request hanging.
            await to_session.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump_stdout)
        tg.start_soon(pump_stdin)
        try:
            yield read_stream, write_stream
        finally:
            with anyio.CancelScope(shield=True):
                read_stream.close()
                write_stream.close()
                await stop_process_group(process)
            tg.cancel_scope.cancel()


def _parse(line: bytes) -> SessionMessage | Exception:
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValueError as exc:  # handed to the session, which reports it
        return exc


async def stop_process_group(process: anyio.abc.Process) -> None:
    """Close the server's stdin, let its group exit briefly, then SIGTERM and SIGKILL what is left.

    Every wait is bounded (about 1.5 s in all). The group is signalled even when its leader exited, since
    children it started may live on in the group.
    """
    if process.stdin is not None:
        with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            await process.stdin.aclose()
    pgid = process.pid  # a session leader's pid is its group id (start_new_session)
    for sig, wait in ((None, STDIN_GRACE), (signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, _REAP_WAIT)):
        if sig is not None:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            except PermissionError:
                pass  # a member we may not signal (or a zombie, on macOS): keep waiting, bounded
        with anyio.move_on_after(wait):
            while _group_alive(pgid):
                _ = process.returncode  # lets the backend reap the leader, whose zombie keeps the group
                await anyio.sleep(_POLL)
            break
    if process.returncode is None:  # the group is gone, but the backend may not have reaped the leader yet
        with anyio.move_on_after(_REAP_WAIT):
            await process.wait()
    if process.returncode is not None:
        await process.aclose()
    elif process.stdout is not None:  # an unkillable leader: at least stop reading from it
        with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            await process.stdout.aclose()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def stderr_tail(errlog: IO[str] | None) -> str:
    """The last few lines a server wrote to stderr, on one line, for error messages ('' if none)."""
    if errlog is None or errlog.closed:
        return ""
    try:
        raw = errlog.buffer  # type: ignore[attr-defined]
        size = raw.seek(0, 2)
        raw.seek(max(0, size - 4 * _TAIL_CHARS))
        text = raw.read().decode("utf-8", errors="replace")
    except (OSError, ValueError, AttributeError):
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    tail = " | ".join(lines[-5:])
    return tail[-_TAIL_CHARS:]
