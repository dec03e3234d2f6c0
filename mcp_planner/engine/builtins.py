"""The built-in tools, under the reserved server name `planner`: `planner.echo` and `planner.llm`.

`WithBuiltins` puts them in front of any tool provider, so they are listed, validated, approved and called
like downstream tools. No downstream server may be named `planner` (the servers config refuses it).

- `planner.echo` returns its parameters as structured content, for shaping data between steps; called with
  exactly one parameter, `value`, it returns that value itself (`{"value": [...]}` gives a list).
- `planner.llm` asks the configured LLM (`prompt`, optional `schema`, `system`, `max_tokens`) for text, or
  JSON matching `schema`. Without an LLM it fails its step with `LLMNotConfiguredError` (not retried).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

from mcp_planner.engine.tools import ServerStatus, StatusReporter, ToolInfo, ToolProvider
from mcp_planner.errors import LLMNotConfiguredError, ParameterError, ToolNotFoundError
from mcp_planner.plan.model import StepResult

BUILTIN_SERVER: Final = "planner"
ECHO: Final = f"{BUILTIN_SERVER}.echo"
LLM: Final = f"{BUILTIN_SERVER}.llm"

#: What `planner.llm` calls: `(prompt, schema, system, max_tokens)` -> the answer. A string becomes the
#: result's text, a dict its structured content; it should return JSON matching `schema` when one is given.
LLMFunction = Callable[
    [str, dict[str, Any] | None, str | None, int | None], Awaitable[StepResult | str | dict[str, Any]]
]

NO_LLM_MESSAGE: Final = (
    f"no LLM configured: {LLM!r} asks an LLM provider and this planner has none: start it with `--llm` or "
    "MCP_PLANNER_LLM (e.g. 'anthropic:claude-sonnet-4-5' with ANTHROPIC_API_KEY set; see the README's LLM "
    f"providers), or write the text into the plan instead, as a step parameter or shaped with {ECHO!r}"
)

_ECHO_INFO = ToolInfo(
    name=ECHO,
    server=BUILTIN_SERVER,
    description="Return the parameters as JSON, to shape data for later steps; a lone `value` parameter "
    "returns that value itself (e.g. a list).",
    input_schema={"type": "object", "additionalProperties": True},
    annotations={"title": "Echo", "readOnlyHint": True, "idempotentHint": True},
)

_LLM_INFO = ToolInfo(
    name=LLM,
    server=BUILTIN_SERVER,
    description="Ask the configured LLM: text for `prompt`, or JSON matching `schema`. Fails when no LLM "
    "is configured: then write the text into the plan yourself.",
    input_schema={
        "type": "object",
        "properties": {
            "prompt": {"type": "string", "description": "what to ask"},
            "schema": {
                "type": "object",
                "description": "a JSON Schema the answer must match; the result is then that JSON",
            },
            "system": {"type": "string", "description": "a system prompt"},
            "max_tokens": {"type": "integer", "minimum": 1, "description": "the most tokens to generate"},
        },
        "required": ["prompt"],
        "additionalProperties": False,
    },
    annotations={"title": "Ask the LLM", "readOnlyHint": True, "openWorldHint": True},
)

#: The built-in tools by name.
BUILTINS: Final[Mapping[str, ToolInfo]] = MappingProxyType({ECHO: _ECHO_INFO, LLM: _LLM_INFO})


def echo(parameters: dict[str, Any]) -> StepResult:
    """`planner.echo`: the parameters, or the value of a lone `value` parameter."""
    if parameters.keys() == {"value"}:
        return StepResult.from_value(parameters["value"])
    return StepResult.from_value(dict(parameters))


class WithBuiltins:
    """A tool provider with the built-in tools in front of another's (`inner`).

    Calls to `planner.*` are answered here, every other call goes to `inner`. It reports `inner`'s server
    status (none when `inner` reports none) and waits for `inner`'s connections (`wait_ready`).

    Args:
        inner: the downstream (or in-process) tools.
        llm: what `planner.llm` asks; None: it fails with "no LLM configured".
    """

    def __init__(self, inner: ToolProvider, llm: LLMFunction | None = None) -> None:
        self.inner = inner
        self.llm = llm
        self._inner_catalog: Mapping[str, ToolInfo] | None = None
        self._catalog: Mapping[str, ToolInfo] = BUILTINS

    def catalog(self) -> Mapping[str, ToolInfo]:
        inner = self.inner.catalog()
        if inner is not self._inner_catalog:  # providers keep one mapping until their tools change
            merged = dict(BUILTINS)
            merged.update((name, info) for name, info in inner.items() if name not in BUILTINS)
            self._catalog, self._inner_catalog = merged, inner
        return self._catalog

    async def call(self, tool_name: str, parameters: dict[str, Any]) -> StepResult:
        """Answer a `planner.*` call here, pass any other to `inner`.

        Raises:
            LLMNotConfiguredError: `planner.llm` was called and there is no LLM.
            StepError: what `inner` or the LLM raised.
        """
        if not tool_name.startswith(f"{BUILTIN_SERVER}."):
            return await self.inner.call(tool_name, parameters)
        if tool_name == ECHO:
            return echo(parameters)
        if tool_name == LLM:
            return await self._ask(parameters)
        raise ToolNotFoundError(
            f"no built-in tool named {tool_name!r}; the built-in tools are {sorted(BUILTINS)}"
        )

    async def _ask(self, parameters: dict[str, Any]) -> StepResult:
        if self.llm is None:
            raise LLMNotConfiguredError(NO_LLM_MESSAGE)
        prompt = parameters.get("prompt")
        if not isinstance(prompt, str):
            raise ParameterError(f"{LLM!r} needs a `prompt` string, got {type(prompt).__name__}")
        answer = await self.llm(
            prompt, parameters.get("schema"), parameters.get("system"), parameters.get("max_tokens")
        )
        return StepResult.from_value(answer)

    def status(self) -> Mapping[str, ServerStatus]:
        """The inner provider's server status (the built-ins have none)."""
        return self.inner.status() if isinstance(self.inner, StatusReporter) else {}

    async def wait_ready(self, timeout: float) -> bool:  # noqa: ASYNC109 (the agreed interface)
        """Wait for the inner provider's first connections, when it has any; False if `timeout` passed."""
        wait_ready = getattr(self.inner, "wait_ready", None)
        if not callable(wait_ready):
            return True
        return bool(await wait_ready(timeout))


def with_builtins(provider: ToolProvider, llm: LLMFunction | None = None) -> WithBuiltins:
    """`provider` with the built-in tools; a provider that already has them is returned unchanged.

    `llm` is ignored for a provider that already has the built-ins.
    """
    if isinstance(provider, WithBuiltins):
        return provider
    return WithBuiltins(provider, llm)
