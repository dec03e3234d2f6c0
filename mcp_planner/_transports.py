"""Opening the transport to one downstream server (stdio, streamable HTTP or SSE) for `downstream.py`.

The read stream is wrapped so the connection notices a server that went away while idle (its stdout
closed), not only when the next call fails: the downstream then restarts it on the next use.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import IO, Self, TextIO, cast

import anyio
import httpx2
from mcp.client._transport import ReadStream, TransportStreams
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.message import SessionMessage

from .config import ServerConfig

_HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)
_TAIL_CHARS = 600


class _WatchedReadStream:
    """A read stream that calls `on_eof` once when the other side is gone."""

    def __init__(self, inner: ReadStream[SessionMessage | Exception], on_eof: Callable[[], object]) -> None:
        self._inner = inner
        self._on_eof = on_eof
        self._ended = False

    @property
    def last_context(self) -> object:
        # The dispatcher reads the sender's contextvars snapshot from here when the transport has one.
        return getattr(self._inner, "last_context", None)

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

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        await self.aclose()
        return None


@contextlib.asynccontextmanager
async def open_transport(
    cfg: ServerConfig, errlog: IO[str], *, on_eof: Callable[[], object]
) -> AsyncIterator[TransportStreams]:
    """The stream pair to one server; a stdio server's stderr goes to `errlog`."""
    if cfg.transport == "stdio":
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
