"""`LLMProvider` over MCP sampling: the planner asks the client's own LLM, from inside a tool call.

How a sampling request reaches the client depends on the negotiated protocol era:

- up to 2025-11-25 (the agent apps of today): the server sends a `sampling/createMessage` request to the
  client in the middle of the tool call and waits for the answer;
- from 2026-07-28: servers send no requests of their own. The tool returns an `InputRequiredResult` that
  embeds the sampling request; the client's SDK answers it and calls the tool again with the answer
  (`input_responses`) and the state the server handed out (`request_state`, sealed by the SDK). The tool
  runs again from the start, and `SamplingProvider` replays the answers recorded in that state, each pinned
  to a digest of the exact conversation it answered. Plan generation is deterministic given the answers,
  so every round reaches the next question, which suspends the call again (`SamplingSuspended`).

`generate_with_sampling` wraps both: it returns the plan, or the `InputRequiredResult` the tool must return.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import anyio
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from mcp_types import (
    CreateMessageRequest,
    CreateMessageRequestParams,
    CreateMessageResult,
    CreateMessageResultWithTools,
    InputRequiredResult,
    SamplingMessage,
    TextContent,
)
from mcp_types.version import is_version_at_least
from pydantic import BaseModel, ValidationError

from mcp_planner.engine.tools import ToolInfo
from mcp_planner.errors import GenerationError
from mcp_planner.generation.generator import DEFAULT_MAX_REPAIRS, Generator, PlanRequest
from mcp_planner.plan.model import ExecutionPlan

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_SAMPLING_TIMEOUT",
    "NO_SAMPLING_MESSAGE",
    "SamplingProvider",
    "SamplingSuspended",
    "generate_with_sampling",
]

DEFAULT_MAX_TOKENS = 4000
#: A person may have to approve each sampling request in the client, so the bound is generous.
DEFAULT_SAMPLING_TIMEOUT = 300.0

NO_SAMPLING_MESSAGE = (
    "this client does not support sampling: draft the plan yourself — the plan_task prompt gives the "
    "instructions and the tool catalog — and call create_plan"
)

_INPUT_REQUIRED_VERSION = "2026-07-28"
_STATE_VERSION = 1


class SamplingSuspended(Exception):
    """Control flow, not a failure: on 2026-07-28+ the call must return `result` and wait to be re-sent.

    Raised by `SamplingProvider.complete` when the answer it needs is not in this round's input
    responses. `generate_with_sampling` catches it; anything else calling the provider must let it reach
    the tool, which returns `result`.
    """

    def __init__(self, result: InputRequiredResult) -> None:
        super().__init__("waiting for the client to answer a sampling request")
        self.result = result


class _Answer(BaseModel):
    q: str
    text: str


class _State(BaseModel):
    v: int
    answers: list[_Answer] = []
    asked: dict[str, str] = {}


class SamplingProvider:
    """Asks the MCP client's LLM (sampling) from inside a tool call.

    Args:
        ctx: The tool call's `Context`.
        max_tokens: `maxTokens` of each sampling request.
        timeout: Seconds to wait for each answer (up to 2025-11-25, where the server waits in the call).
        temperature: Optional sampling temperature.
    """

    def __init__(
        self,
        ctx: Context[Any, Any],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        timeout: float = DEFAULT_SAMPLING_TIMEOUT,
        temperature: float | None = None,
    ) -> None:
        self._ctx = ctx
        self._max_tokens = max_tokens
        self._timeout = timeout
        self._temperature = temperature
        self._calls = 0
        self._state: _State | None = None
        self._answers: list[_Answer] = []

    @property
    def supported(self) -> bool:
        """Whether the client declared the sampling capability."""
        caps = self._ctx.client_capabilities
        return caps is not None and caps.sampling is not None

    @property
    def suspends(self) -> bool:
        """True on 2026-07-28+: sampling rides `InputRequiredResult` rounds instead of requests."""
        version = self._ctx.protocol_version
        return version is not None and is_version_at_least(version, _INPUT_REQUIRED_VERSION)

    async def complete(self, system: str, messages: list[tuple[str, str]]) -> str:
        """Ask the client's LLM to answer the conversation.

        Raises:
            GenerationError: the client cannot sample (the message says what to do instead), declined,
                failed, timed out, or answered with something other than text.
            SamplingSuspended: 2026-07-28+ only: the answer must be fetched in another round.
        """
        index = self._calls
        self._calls += 1
        if not self.supported:
            raise GenerationError(NO_SAMPLING_MESSAGE)
        params = CreateMessageRequestParams(
            messages=[
                SamplingMessage(role="assistant" if role == "assistant" else "user", content=_text(text))
                for role, text in messages
            ],
            system_prompt=system,
            max_tokens=self._max_tokens,
            temperature=self._temperature,
        )
        if self.suspends:
            return self._replay_or_suspend(index, params)
        return await self._ask(params)

    async def _ask(self, params: CreateMessageRequestParams) -> str:
        session = self._ctx.request_context.session
        if not session.can_send_request:
            raise GenerationError(
                "this connection cannot carry sampling requests to the client (no back-channel): draft the "
                "plan yourself — the plan_task prompt gives the instructions and the tool catalog — and "
                "call create_plan"
            )
        try:
            with anyio.fail_after(self._timeout):
                # `session.create_message` is flagged deprecated (sampling is, from 2026-07-28); the plain
                # request is the same message without the warning.
                result = await session.send_request(
                    CreateMessageRequest(params=params),
                    CreateMessageResult,
                    metadata=ServerMessageMetadata(related_request_id=self._ctx.request_id),
                )
        except TimeoutError:
            raise GenerationError(
                f"the client's LLM did not answer the sampling request within {self._timeout:g} s: try "
                "again, or draft the plan yourself with the plan_task prompt and call create_plan"
            ) from None
        except MCPError as exc:
            raise GenerationError(
                f"the client declined or failed the sampling request ({exc.error.message}): try again, or "
                "draft the plan yourself with the plan_task prompt and call create_plan"
            ) from exc
        except ValidationError:
            raise GenerationError(
                "the client answered the sampling request with a malformed result: draft the plan yourself "
                "with the plan_task prompt and call create_plan"
            ) from None
        return _text_of(result)

    def _replay_or_suspend(self, index: int, params: CreateMessageRequestParams) -> str:
        state = self._decoded_state()
        q = _digest(params)
        if index < len(state.answers):
            recorded = state.answers[index]
            if recorded.q == q:
                self._answers.append(recorded)
                return recorded.text
            # The conversation changed since that answer (e.g. the catalog did): ask again from here.
            del state.answers[index:]
        key = f"sample-{index}"
        response = (self._ctx.input_responses or {}).get(key)
        if response is not None and state.asked.get(key) == q:
            text = _text_of(_as_sampling_result(response))
            self._answers.append(_Answer(q=q, text=text))
            return text
        request_state = _State(v=_STATE_VERSION, answers=list(self._answers), asked={key: q})
        raise SamplingSuspended(
            InputRequiredResult(
                input_requests={key: CreateMessageRequest(params=params)},
                request_state=request_state.model_dump_json(),
            )
        )

    def _decoded_state(self) -> _State:
        if self._state is None:
            self._state = _State(v=_STATE_VERSION)
            raw = self._ctx.request_state
            if raw:
                try:
                    state = _State.model_validate(json.loads(raw))
                except ValueError:
                    state = None  # not ours (another flow, or an older format): start over
                if state is not None and state.v == _STATE_VERSION:
                    self._state = state
        return self._state


async def generate_with_sampling(
    ctx: Context[Any, Any],
    tools: Mapping[str, ToolInfo],
    request: PlanRequest,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_repairs: int = DEFAULT_MAX_REPAIRS,
    sampling_timeout: float = DEFAULT_SAMPLING_TIMEOUT,
) -> ExecutionPlan | InputRequiredResult:
    """Generate a plan with the client's LLM from inside a tool call, on either protocol era.

    Returns:
        The valid, submitted plan (not stored: the caller stores it), or on 2026-07-28+ the
        `InputRequiredResult` the tool must return so the client answers the next sampling request.

    Raises:
        GenerationError: the client cannot sample (`NO_SAMPLING_MESSAGE`), sampling failed, or no answer
            became a valid plan.
    """
    provider = SamplingProvider(ctx, max_tokens=max_tokens, timeout=sampling_timeout)
    if not provider.supported:
        raise GenerationError(NO_SAMPLING_MESSAGE)
    try:
        return await Generator(provider, tools, max_repairs=max_repairs).generate(request)
    except SamplingSuspended as suspended:
        return suspended.result


def _text(text: str) -> TextContent:
    return TextContent(type="text", text=text)


def _text_of(result: CreateMessageResult | CreateMessageResultWithTools) -> str:
    blocks = result.content if isinstance(result.content, list) else [result.content]
    texts = [b.text for b in blocks if isinstance(b, TextContent)]
    if not texts:
        kinds = ", ".join(sorted({str(getattr(b, "type", "unknown")) for b in blocks})) or "empty"
        raise GenerationError(
            f"the client's LLM answered with {kinds} content instead of text: try again, or draft the plan "
            "yourself with the plan_task prompt and call create_plan"
        )
    return "\n".join(texts)


def _as_sampling_result(response: BaseModel) -> CreateMessageResult | CreateMessageResultWithTools:
    if isinstance(response, CreateMessageResult | CreateMessageResultWithTools):
        return response
    wire = response.model_dump(mode="json", by_alias=True, exclude_none=True)
    for kind in (CreateMessageResult, CreateMessageResultWithTools):
        try:
            return kind.model_validate(wire)
        except ValidationError:
            continue
    raise GenerationError(
        "the client answered the sampling request with something else: draft the plan yourself with the "
        "plan_task prompt and call create_plan"
    )


def _digest(params: CreateMessageRequestParams) -> str:
    """Pins a recorded answer to the exact request it answered."""
    wire = json.dumps(
        params.model_dump(mode="json", by_alias=True, exclude_none=True),
        sort_keys=True,
        separators=(",", ":"),
    )
    return base64.urlsafe_b64encode(hashlib.sha256(wire.encode()).digest()[:18]).decode()
