"""The tool protocol the executor calls, the status a provider reports, and in-process tools.

The engine never imports `mcp`: downstream MCP servers reach it through `ToolProvider` (see
`downstream/client.py`, which also reports each server's `ServerStatus`), in-process tools through
`LocalTools`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from mcp_planner.errors import StepError, ToolCallError, ToolNotFoundError
from mcp_planner.plan.model import StepResult


@dataclass(frozen=True)
class ToolInfo:
    """One tool a step can call. `name` is what steps use: `server.tool` for downstream tools."""

    name: str
    description: str = ""
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    annotations: dict[str, Any] = field(default_factory=dict)
    server: str | None = None

    @property
    def safe_to_rerun(self) -> bool:
        """Whether an interrupted call may be sent again without asking (read-only or idempotent)."""
        return bool(self.annotations.get("readOnlyHint") or self.annotations.get("idempotentHint"))


@runtime_checkable
class ToolProvider(Protocol):
    def catalog(self) -> Mapping[str, ToolInfo]:
        """The tools callable now, by name."""
        ...

    async def call(self, tool_name: str, parameters: dict[str, Any]) -> StepResult:
        """Call one tool once. Must be cancel-safe: the executor bounds attempts with cancel scopes.

        Raises:
            StepError: a subclass saying what went wrong and whether a retry may help.
        """
        ...


class ServerState(StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    FAILED = "failed"
    DISABLED = "disabled"


@dataclass(frozen=True)
class ServerStatus:
    """One downstream server as its tool provider reports it."""

    name: str
    state: ServerState
    #: Why it failed (to start, or its connection was lost); None unless `state` is `failed`.
    error: str | None = None
    tool_count: int = 0
    transport: str | None = None
    #: Failed starts in a row; each doubles the wait before the next start.
    failures: int = 0


@runtime_checkable
class StatusReporter(Protocol):
    """A tool provider that reports the state of the servers behind it (`Downstream` does)."""

    def status(self) -> Mapping[str, ServerStatus]:
        """Each server's status, by name."""
        ...


def schema_catalog(provider: ToolProvider) -> dict[str, dict[str, Any] | None]:
    """The catalog as validation wants it: tool name -> input schema (None when unknown)."""
    return {name: info.input_schema for name, info in provider.catalog().items()}


class LocalTools:
    """In-process tools: `{"name": async_fn}` where `async_fn(params) -> value` (a sync function works too).

    A returned string becomes the result's text, anything else its structured content. An exception a tool
    raises fails the attempt as a retryable tool error, unless it is already a `StepError`.
    """

    def __init__(self, tools: Mapping[str, Callable[[dict[str, Any]], Any]]) -> None:
        self._tools = dict(tools)
        self._catalog = {name: ToolInfo(name=name) for name in self._tools}

    def catalog(self) -> Mapping[str, ToolInfo]:
        return self._catalog

    async def call(self, tool_name: str, parameters: dict[str, Any]) -> StepResult:
        fn = self._tools.get(tool_name)
        if fn is None:
            raise ToolNotFoundError(f"no tool named {tool_name!r}; known tools: {sorted(self._tools)}")
        try:
            value = fn(parameters)
            if inspect.isawaitable(value):
                value = await value
        except StepError:
            raise
        except Exception as exc:
            raise ToolCallError(f"{type(exc).__name__}: {exc}") from exc
        return StepResult.from_value(value)


def as_provider(tools: ToolProvider | Mapping[str, Callable[[dict[str, Any]], Any]]) -> ToolProvider:
    if isinstance(tools, ToolProvider):
        return tools
    return LocalTools(tools)
