"""MCP over stdio where every line the client sends gets an answer.

The SDK's `stdio_server` hands a line it cannot read (not JSON, not a JSON-RPC message, or nested
deeper than its JSON parser's ~200-level limit) to the session as an exception, which the session logs
at debug level and drops: a client that sent a request waits forever. This transport wraps the SDK's
(keeping its claim of fds 0 and 1) and turns each such line into what JSON-RPC 2.0 asks for:
- not JSON: a Parse error (-32700) with id null;
- JSON but not a message: an Invalid Request (-32600) with the request's id when it can be read;
- a request nested too deep: an Invalid params (-32602) error with its id;
- a response to one of the server's own requests (sampling, elicitation): the pending request fails with
  that error instead of waiting;
- a notification nested too deep: nothing (JSON-RPC never answers one), only a log line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from mcp.server.stdio import stdio_server
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import SessionMessage
from mcp_types import INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, ErrorData, JSONRPCError, RequestId
from pydantic import ValidationError

from mcp_planner.downstream.streams import ReadStreamWrapper

log = logging.getLogger("mcp_planner.stdio")

_INVALID_REQUEST = (
    'Invalid Request: expected a JSON-RPC 2.0 object with "jsonrpc": "2.0", a string "method", '
    'an object "params" and, for a request, an integer or string "id"'
)
_TOO_DEEP = (
    "Invalid params: the message nests objects and arrays deeper than the 200 levels this server reads; "
    "flatten the arguments"
)


@asynccontextmanager
async def answering_stdio_server() -> AsyncIterator[
    tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]
]:
    """The SDK's `stdio_server` streams, with unreadable lines answered instead of dropped."""
    async with stdio_server() as (read_stream, write_stream):
        yield _AnsweringReadStream(read_stream, write_stream), write_stream


@dataclass(frozen=True)
class Unreadable:
    """What to do with a line the transport could not read."""

    error: JSONRPCError | None
    """The error to send (None for a notification: no answer)."""
    to_client: bool = True
    """True: write it to the client; False: deliver it to the session, failing the server's own request."""


def unreadable(exc: Exception) -> Unreadable:
    """The JSON-RPC answer to a line the SDK's stdio reader failed to read with `exc`."""
    errors = exc.errors(include_url=False) if isinstance(exc, ValidationError) else []
    first = errors[0] if errors else None
    too_deep = False
    if first is None or first["type"] == "json_invalid":
        reason = str(first["ctx"]["error"]) if first and "ctx" in first else "not JSON"
        too_deep = "recursion limit" in reason
        if not too_deep:
            return Unreadable(_error(None, PARSE_ERROR, f"Parse error: {reason}"))
        message = _json_or_none(first["input"] if first else None)
    else:
        message = _top_level(errors)
    if not isinstance(message, dict):
        return Unreadable(_error(None, INVALID_REQUEST, _INVALID_REQUEST))
    request_id = _request_id(message.get("id"))
    if "method" not in message and ("result" in message or "error" in message) and request_id is not None:
        problem = "nested too deeply" if too_deep else "not a valid JSON-RPC response"
        return Unreadable(_error(request_id, INVALID_PARAMS, f"the client's response was {problem}"), False)
    if too_deep:
        if "method" in message and "id" not in message:
            return Unreadable(None)
        return Unreadable(_error(request_id, INVALID_PARAMS, _TOO_DEEP))
    return Unreadable(_error(request_id, INVALID_REQUEST, _INVALID_REQUEST))


class _AnsweringReadStream(ReadStreamWrapper):
    """Yields the messages of `inner`; answers the exceptions on `write` (or turns them into messages)."""

    def __init__(
        self, inner: ReadStream[SessionMessage | Exception], write: WriteStream[SessionMessage]
    ) -> None:
        super().__init__(inner)
        self._write = write

    async def receive(self) -> SessionMessage | Exception:
        while True:
            item = await self._inner.receive()
            if not isinstance(item, Exception):
                return item
            answer = unreadable(item)
            if answer.error is None:
                log.warning("dropped an unreadable notification from the client")
                continue
            log.warning("unreadable message from the client: %s", answer.error.error.message)
            if not answer.to_client:
                return SessionMessage(answer.error)
            try:
                await self._write.send(SessionMessage(answer.error))
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass  # the session is closing; nobody is left to answer


def _error(request_id: RequestId | None, code: int, message: str) -> JSONRPCError:
    return JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=code, message=message))


def _json_or_none(line: object) -> Any:
    # Python's parser goes deeper than pydantic's; past its own limit the id is lost (answered as null).
    if not isinstance(line, str):
        return None
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def _top_level(errors: list[Any]) -> object:
    """The decoded message, from the validation errors of the SDK's JSON-RPC message union.

    Each error's `input` is the value at its `loc` (member name, then field); a whole-member error, or a
    missing field, is reported with the message itself as input.
    """
    for err in errors:
        loc = err["loc"]
        if len(loc) == 1 or (len(loc) == 2 and err["type"] == "missing"):
            return err["input"]
    return None


def _request_id(value: object) -> RequestId | None:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return None
