"""Plan generation over real MCP sampling: a real `mcp.Client` with scripted sampling callbacks.

Every test runs on both protocol eras: `legacy` (2025-11-25: the server sends `sampling/createMessage`
mid-call, what agent apps speak today) and `2026-07-28` (the tool returns `InputRequiredResult` rounds and
the client SDK re-sends the call with the answers).

The server here is a small test-only `MCPServer` whose `generate_plan` tool runs the generator with a
`SamplingProvider` and stores the plan in a real SQLite store, as the planner's server does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError

from mcp_planner.engine.tools import ToolInfo
from mcp_planner.errors import GenerationError
from mcp_planner.generation.generator import PlanRequest
from mcp_planner.generation.sampling import (
    NO_SAMPLING_MESSAGE,
    SamplingProvider,
    SamplingSuspended,
    generate_with_sampling,
)
from mcp_planner.store.sqlite import PlanStore

pytestmark = pytest.mark.anyio

MODES = ["legacy", "2026-07-28"]

TOOLS = {
    "web.fetch": ToolInfo(
        name="web.fetch",
        description="Fetch a URL.",
        input_schema={
            "type": "object",
            "properties": {"url": {"type": "string"}},
            "required": ["url"],
            "additionalProperties": False,
        },
        annotations={"readOnlyHint": True},
        server="web",
    ),
    "files.write": ToolInfo(
        name="files.write",
        description="Write a file.",
        input_schema={
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
        server="files",
    ),
    "files.read": ToolInfo(
        name="files.read",
        description="Read a file.",
        input_schema={"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        server="files",
    ),
}

GOOD = {
    "description": "Fetch the page and save it",
    "steps": [
        {"id": "fetch", "tool_name": "fetch", "parameters": {"url": "https://example.com"}, "max_retries": 2},
        {
            "id": "save",
            "tool_name": "files.write",
            "parameters": {"path": "/tmp/page.html", "content": "{{ steps.fetch.text }}"},
            "depends_on": ["fetch"],
        },
    ],
}

# An unknown tool, a cycle (a -> c -> b -> a) and a missing required parameter (b has no content).
BROKEN = {
    "description": "Broken",
    "steps": [
        {"id": "a", "tool_name": "web.fetchh", "parameters": {"url": "x"}, "depends_on": ["c"]},
        {"id": "b", "tool_name": "files.write", "parameters": {"path": "/tmp/x"}, "depends_on": ["a"]},
        {"id": "c", "tool_name": "files.read", "parameters": {"path": "/tmp/y"}, "depends_on": ["b"]},
    ],
}


class ScriptedSampling:
    """A sampling callback answering from a script and recording every request."""

    def __init__(self, *answers: str | types.CreateMessageResult | types.ErrorData) -> None:
        self.answers = list(answers)
        self.requests: list[types.CreateMessageRequestParams] = []

    async def __call__(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult | types.ErrorData:
        self.requests.append(params)
        answer = self.answers.pop(0)
        if isinstance(answer, str):
            content = types.TextContent(type="text", text=answer)
            return types.CreateMessageResult(role="assistant", content=content, model="scripted")
        return answer

    def texts(self, index: int) -> list[tuple[str, str]]:
        """(role, text) of each message of the `index`-th request."""
        out = []
        for message in self.requests[index].messages:
            assert isinstance(message.content, types.TextContent)
            out.append((message.role, message.content.text))
        return out


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[PlanStore]:
    async with PlanStore.open(tmp_path / "plans.db") as s:
        yield s


def make_server(store: PlanStore, rounds: list[str | None] | None = None) -> MCPServer:
    """`rounds` records the protocol version of each run of `generate_plan`."""
    server = MCPServer("generator-test")

    @server.tool()
    async def generate_plan(
        task: str, ctx: Context, context: str | None = None, options: dict[str, Any] | None = None
    ) -> dict[str, Any] | types.InputRequiredResult:
        if rounds is not None:
            rounds.append(ctx.protocol_version)
        try:
            outcome = await generate_with_sampling(
                ctx, TOOLS, PlanRequest(task=task, context=context, options=options)
            )
        except GenerationError as exc:
            raise ToolError(str(exc)) from exc
        if isinstance(outcome, types.InputRequiredResult):
            return outcome
        await store.save_plan(outcome)
        return {"plan_id": outcome.id, "status": outcome.status.value, "metadata": outcome.metadata}

    @server.tool()
    async def ask_once(question: str, ctx: Context) -> str | types.InputRequiredResult:
        """The provider on its own: one question, the answer back."""
        try:
            return await SamplingProvider(ctx, max_tokens=50).complete("be brief", [("user", question)])
        except GenerationError as exc:
            raise ToolError(str(exc)) from exc
        except SamplingSuspended as suspended:
            return suspended.result

    @server.tool()
    async def list_plans() -> list[str]:
        return [p.id for p in await store.list_plans()]

    return server


def _text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def _stored(client: Client) -> list[str]:
    result = await client.call_tool("list_plans", {})
    assert result.structured_content is not None
    ids: list[str] = result.structured_content["result"]
    return ids


@pytest.mark.parametrize("mode", MODES)
async def test_provider_asks_the_clients_llm_with_system_prompt_and_max_tokens(
    mode: str, store: PlanStore
) -> None:
    sampling = ScriptedSampling("pong")
    async with Client(make_server(store), sampling_callback=sampling, mode=mode) as client:
        result = await client.call_tool("ask_once", {"question": "ping"})
    assert not result.is_error, _text(result)
    assert _text(result) == "pong"
    assert sampling.requests[0].system_prompt == "be brief"
    assert sampling.requests[0].max_tokens == 50
    assert sampling.texts(0) == [("user", "ping")]


@pytest.mark.parametrize("mode", MODES)
async def test_good_plan_is_generated_validated_and_stored(mode: str, store: PlanStore) -> None:
    sampling = ScriptedSampling(json.dumps(GOOD))
    async with Client(make_server(store), sampling_callback=sampling, mode=mode) as client:
        result = await client.call_tool("generate_plan", {"task": "Save example.com", "context": "nightly"})
        assert not result.is_error, _text(result)
        assert result.structured_content is not None
        plan_id = result.structured_content["plan_id"]
        assert await _stored(client) == [plan_id]
    plan = await store.get_plan(plan_id)
    assert plan.status.value == "pending_approval"
    assert [s.tool_name for s in plan.steps] == ["web.fetch", "files.write"]
    assert plan.metadata["generation"]["attempts"] == 1
    assert len(sampling.requests) == 1
    request = sampling.requests[0]
    assert request.max_tokens == 4000
    assert request.system_prompt and "JSON" in request.system_prompt
    (role, prompt), *_ = sampling.texts(0)
    assert role == "user" and "Save example.com" in prompt and "nightly" in prompt
    assert "- url* (string)" in prompt


@pytest.mark.parametrize("mode", MODES)
async def test_plan_with_unknown_tool_cycle_and_missing_parameter_is_repaired(
    mode: str, store: PlanStore
) -> None:
    broken = json.dumps(BROKEN)
    sampling = ScriptedSampling(broken, json.dumps(GOOD))
    rounds: list[str | None] = []
    async with Client(make_server(store, rounds), sampling_callback=sampling, mode=mode) as client:
        result = await client.call_tool("generate_plan", {"task": "Save example.com"})
        assert not result.is_error, _text(result)
        assert result.structured_content is not None
        assert result.structured_content["metadata"]["generation"]["attempts"] == 2
        assert len(await _stored(client)) == 1
    assert len(sampling.requests) == 2
    # 2025-11-25: one call, sampling mid-call; 2026-07-28: a round per answer plus the final one.
    assert rounds == (["2025-11-25"] if mode == "legacy" else ["2026-07-28"] * 3)
    conversation = sampling.texts(1)
    assert [role for role, _ in conversation] == ["user", "assistant", "user"]
    assert conversation[1][1] == broken
    repair = conversation[2][1]
    assert "step 'a', tool_name: unknown tool 'web.fetchh'; did you mean 'web.fetch'?" in repair
    assert "dependency cycle: a -> c -> b -> a" in repair
    assert "step 'b', parameters: 'content' is a required property" in repair


@pytest.mark.parametrize("mode", MODES)
async def test_plan_that_never_validates_fails_clearly_and_stores_nothing(
    mode: str, store: PlanStore
) -> None:
    sampling = ScriptedSampling(*[json.dumps(BROKEN)] * 4)
    async with Client(make_server(store), sampling_callback=sampling, mode=mode) as client:
        result = await client.call_tool("generate_plan", {"task": "Save example.com"})
        assert result.is_error
        message = _text(result)
        assert "did not produce a valid plan in 4 attempts (the first answer and 3 repairs)" in message
        assert "unknown tool 'web.fetchh'" in message
        assert "dependency cycle" in message
        assert "'content' is a required property" in message
        assert "create_plan" in message
        assert "Traceback" not in message
        assert await _stored(client) == []
    assert len(sampling.requests) == 4


@pytest.mark.parametrize("mode", MODES)
async def test_prose_wrapped_json_is_accepted(mode: str, store: PlanStore) -> None:
    answer = (
        f"Sure, here is a plan that does it:\n\n```json\n{json.dumps(GOOD, indent=2)}\n```\n\nAnything else?"
    )
    sampling = ScriptedSampling(answer)
    async with Client(make_server(store), sampling_callback=sampling, mode=mode) as client:
        result = await client.call_tool("generate_plan", {"task": "Save example.com"})
        assert not result.is_error, _text(result)
        assert len(await _stored(client)) == 1


@pytest.mark.parametrize("mode", MODES)
async def test_client_without_sampling_gets_the_fallback_instructions(mode: str, store: PlanStore) -> None:
    async with Client(make_server(store), mode=mode) as client:
        result = await client.call_tool("generate_plan", {"task": "Save example.com"})
        assert result.is_error
        assert NO_SAMPLING_MESSAGE in _text(result)
        assert "plan_task" in _text(result) and "create_plan" in _text(result)
        assert await _stored(client) == []


@pytest.mark.parametrize("mode", MODES)
async def test_requested_options_decide_the_initial_status(mode: str, store: PlanStore) -> None:
    sampling = ScriptedSampling(json.dumps(GOOD))
    async with Client(make_server(store), sampling_callback=sampling, mode=mode) as client:
        args = {"task": "Save example.com", "options": {"require_approval": False}}
        result = await client.call_tool("generate_plan", args)
        assert not result.is_error, _text(result)
        assert result.structured_content is not None
        assert result.structured_content["status"] == "approved"


@pytest.mark.parametrize("mode", MODES)
async def test_non_text_answer_is_a_clear_error(mode: str, store: PlanStore) -> None:
    image = types.ImageContent(type="image", data="aGk=", mime_type="image/png")
    sampling = ScriptedSampling(types.CreateMessageResult(role="assistant", content=image, model="scripted"))
    async with Client(make_server(store), sampling_callback=sampling, mode=mode) as client:
        result = await client.call_tool("generate_plan", {"task": "Save example.com"})
        assert result.is_error
        assert "answered with image content instead of text" in _text(result)
        assert await _stored(client) == []


async def test_declined_sampling_is_a_clear_error_on_the_legacy_era(store: PlanStore) -> None:
    sampling = ScriptedSampling(types.ErrorData(code=types.INVALID_REQUEST, message="user declined"))
    async with Client(make_server(store), sampling_callback=sampling, mode="legacy") as client:
        result = await client.call_tool("generate_plan", {"task": "Save example.com"})
        assert result.is_error
        assert "the client declined or failed the sampling request (user declined)" in _text(result)
        assert await _stored(client) == []


async def test_declined_sampling_on_2026_07_28_fails_the_call_in_the_client(store: PlanStore) -> None:
    # On 2026-07-28 the client SDK answers input requests itself: a refusal ends the call client-side.
    sampling = ScriptedSampling(types.ErrorData(code=types.INVALID_REQUEST, message="user declined"))
    async with Client(make_server(store), sampling_callback=sampling, mode="2026-07-28") as client:
        with pytest.raises(MCPError, match="user declined"):
            await client.call_tool("generate_plan", {"task": "Save example.com"})
        assert await _stored(client) == []


async def test_an_answer_to_an_outdated_question_is_asked_again_on_2026_07_28(store: PlanStore) -> None:
    # The catalog changes between rounds (a downstream server connected): the recorded question no longer
    # matches the prompt, so the answer is not used and the new prompt is asked instead.
    server = MCPServer("changing-catalog")
    catalogs = [{"files.read": TOOLS["files.read"]}, TOOLS]

    @server.tool()
    async def generate_plan(task: str, ctx: Context) -> dict[str, Any] | types.InputRequiredResult:
        tools = catalogs.pop(0) if len(catalogs) > 1 else catalogs[0]
        outcome = await generate_with_sampling(ctx, tools, PlanRequest(task=task))
        if isinstance(outcome, types.InputRequiredResult):
            return outcome
        return {"tools": [s.tool_name for s in outcome.steps]}

    sampling = ScriptedSampling(json.dumps(GOOD), json.dumps(GOOD))
    async with Client(server, sampling_callback=sampling, mode="2026-07-28") as client:
        result = await client.call_tool("generate_plan", {"task": "Save example.com"})
    assert not result.is_error, _text(result)
    assert result.structured_content == {"tools": ["web.fetch", "files.write"]}
    assert len(sampling.requests) == 2
    assert "## web.fetch" not in sampling.texts(0)[0][1]
    assert "## web.fetch" in sampling.texts(1)[0][1]
