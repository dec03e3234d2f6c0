"""The LLM providers (`generation.providers`) against a real local HTTP server speaking the OpenAI
chat-completions and Anthropic messages wire formats with scripted replies: through the library, the
planner's own MCP server (a real `mcp.Client`, no sampling) and the `mcp-planner generate` command.

Skipped when the optional extra (`mcp-planner[llm]`: the openai and anthropic SDKs) is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from mcp import Client, StdioServerParameters

from mcp_planner.engine.builtins import WithBuiltins
from mcp_planner.engine.tools import LocalTools, ToolInfo
from mcp_planner.errors import ConfigError, ToolCallError, ToolNotFoundError
from mcp_planner.generation.generator import PlanRequest
from mcp_planner.generation.providers import (
    ENV_VAR,
    LLMSettings,
    LLMSpec,
    generate_with_provider,
    llm_settings,
    parse_llm_spec,
)
from mcp_planner.plan.model import StepResult
from mcp_planner.server.app import build_server
from mcp_planner.service import PlannerService
from mcp_planner.store.sqlite import PlanStore

pytest.importorskip("openai")
pytest.importorskip("anthropic")

pytestmark = pytest.mark.anyio

KEY = "sk-test-DO-NOT-STORE-5f1c9e"


# -- the scripted server -----------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    #: Answer nothing until the server stops (a model that never answers).
    hang: bool = False


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class ScriptedLLMServer:
    """A real HTTP server on 127.0.0.1 answering each POST with the next scripted reply."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[Seen] = []
        self.stopping = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                owner.requests.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                reply = (
                    owner.replies.pop(0)
                    if owner.replies
                    else Reply(500, {"error": {"message": "none"}}, {"retry-after-ms": "1"})
                )
                if reply.hang:
                    owner.stopping.wait(30)
                    return
                data = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def chat(self, text: str, prompt_tokens: int = 100, completion_tokens: int = 40) -> None:
        """Script an OpenAI chat-completions answer."""
        self.replies.append(
            Reply(
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "scripted",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                },
            )
        )

    def message(self, text: str, input_tokens: int = 100, output_tokens: int = 40) -> None:
        """Script an Anthropic messages answer."""
        self.replies.append(
            Reply(
                200,
                {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": "scripted",
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
                },
            )
        )

    def rate_limited(self) -> None:
        """Script a 429 that asks for a 1 ms wait."""
        self.replies.append(
            Reply(
                429,
                {"error": {"message": "slow down", "type": "rate_limit_error"}},
                {"retry-after-ms": "1", "retry-after": "0"},
            )
        )

    def __enter__(self) -> ScriptedLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def llm_server() -> Iterator[ScriptedLLMServer]:
    with ScriptedLLMServer() as server:
        yield server


def openai_settings(server: ScriptedLLMServer, key: str | None = KEY) -> LLMSettings:
    return LLMSettings(LLMSpec("openai-compatible", "scripted-model", server.openai_url), key, timeout=10)


def anthropic_settings(server: ScriptedLLMServer) -> LLMSettings:
    return LLMSettings(LLMSpec("anthropic", "claude-test", server.anthropic_url), KEY, timeout=10)


# -- tools and plans ---------------------------------------------------------------------------------------


class NotesTools:
    def __init__(self) -> None:
        self.notes: dict[str, str] = {}
        self._catalog = {
            "notes.write": ToolInfo(
                name="notes.write",
                description="Write a note.",
                input_schema={
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "text": {"type": "string"}},
                    "required": ["name", "text"],
                    "additionalProperties": False,
                },
                server="notes",
            ),
        }

    def catalog(self) -> Mapping[str, ToolInfo]:
        return self._catalog

    async def call(self, tool_name: str, parameters: dict[str, Any]) -> StepResult:
        if tool_name == "notes.write":
            self.notes[parameters["name"]] = parameters["text"]
            return StepResult.from_value({"written": parameters["name"]})
        raise ToolNotFoundError(f"no tool named {tool_name!r}")


GOOD = {
    "description": "Write a greeting note",
    "steps": [{"id": "write", "tool_name": "notes.write", "parameters": {"name": "hi", "text": "hello"}}],
}
# An unknown tool and a missing required parameter.
BROKEN = {
    "description": "Broken",
    "steps": [
        {"id": "a", "tool_name": "notes.wirte", "parameters": {"name": "x", "text": "y"}},
        {"id": "b", "tool_name": "notes.write", "parameters": {"name": "x"}},
    ],
}


def assert_key_not_stored(folder: Path) -> None:
    """No byte of the database files (the WAL too) holds the key."""
    files = list(folder.glob("plans.db*"))
    assert files
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


def _text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


@asynccontextmanager
async def planner(db: Path, tools: Any, llm: LLMSettings | None) -> AsyncIterator[Client]:
    async with PlanStore.open(db) as store:
        async with PlannerService(store, WithBuiltins(tools, llm), approval="agent") as service:
            async with Client(build_server(service)) as client:
                yield client


# -- specs -------------------------------------------------------------------------------------------------


def test_specs_parse_into_provider_model_and_base_url() -> None:
    assert parse_llm_spec("anthropic:claude-sonnet-4-5") == LLMSpec("anthropic", "claude-sonnet-4-5")
    assert parse_llm_spec("openai:gpt-4.1-mini") == LLMSpec("openai", "gpt-4.1-mini")
    assert parse_llm_spec("openai-compatible:http://127.0.0.1:11434/v1#qwen3") == LLMSpec(
        "openai-compatible", "qwen3", "http://127.0.0.1:11434/v1"
    )
    assert parse_llm_spec("sampling") == LLMSpec(sampling_first=True)
    assert parse_llm_spec("auto:openai:gpt-4.1-mini") == LLMSpec(
        "openai", "gpt-4.1-mini", sampling_first=True
    )
    for bad in ("gemini:pro", "openai:", "openai-compatible:http://x/v1", "openai-compatible:ftp://x#m"):
        with pytest.raises(ConfigError):
            parse_llm_spec(bad)


def test_settings_take_keys_from_the_environment_and_auto_picks_a_provider_by_key() -> None:
    assert llm_settings({}) is None
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        llm_settings({ENV_VAR: "anthropic:claude-sonnet-4-5"})
    settings = llm_settings({ENV_VAR: "auto", "OPENAI_API_KEY": KEY})
    assert settings is not None and settings.spec.kind == "openai" and settings.sampling_first
    assert settings.api_key == KEY and KEY not in repr(settings)
    only_sampling = llm_settings({}, "auto")
    assert only_sampling is not None and not only_sampling.has_provider
    local = llm_settings({}, "openai-compatible:http://user:pw@127.0.0.1:11434/v1#qwen3")
    assert local is not None and local.api_key is None
    assert local.spec.label() == "openai-compatible:http://127.0.0.1:11434/v1#qwen3"


# -- the library -------------------------------------------------------------------------------------------


async def test_first_invalid_plan_is_repaired_and_usage_recorded(llm_server: ScriptedLLMServer) -> None:
    llm_server.chat(json.dumps(BROKEN), prompt_tokens=300, completion_tokens=80)
    llm_server.chat(f"Sure:\n```json\n{json.dumps(GOOD)}\n```", prompt_tokens=500, completion_tokens=60)
    tools = WithBuiltins(NotesTools()).catalog()
    plan = await generate_with_provider(
        openai_settings(llm_server).provider(), tools, PlanRequest("write a greeting")
    )
    assert [s.tool_name for s in plan.steps] == ["notes.write"]
    assert plan.metadata["llm_usage"] == {
        "provider": "openai-compatible",
        "model": "scripted-model",
        "calls": 2,
        "input_tokens": 800,
        "output_tokens": 140,
    }
    first, repair = llm_server.requests
    assert first.path == "/v1/chat/completions" and first.body["model"] == "scripted-model"
    assert first.headers["authorization"] == f"Bearer {KEY}"
    assert first.body["response_format"]["type"] == "json_schema"
    assert "steps" in first.body["response_format"]["json_schema"]["schema"]["properties"]
    assert first.body["messages"][0]["role"] == "system"
    assert "notes.wirte" in repair.body["messages"][-1]["content"]
    assert "'text' is a required property" in repair.body["messages"][-1]["content"]


async def test_rate_limited_request_is_retried_then_succeeds(llm_server: ScriptedLLMServer) -> None:
    llm_server.rate_limited()
    llm_server.chat(json.dumps(GOOD))
    tools = WithBuiltins(NotesTools()).catalog()
    plan = await generate_with_provider(openai_settings(llm_server).provider(), tools, PlanRequest("greet"))
    assert plan.metadata["llm_usage"]["calls"] == 1
    assert len(llm_server.requests) == 2


async def test_server_errors_after_every_retry_become_a_generation_error(
    llm_server: ScriptedLLMServer,
) -> None:
    settings = LLMSettings(
        LLMSpec("openai-compatible", "m", llm_server.openai_url), None, timeout=10, max_retries=1
    )
    for _ in range(2):
        llm_server.replies.append(Reply(503, {"error": {"message": "overloaded"}}, {"retry-after-ms": "1"}))
    with pytest.raises(Exception, match="answered HTTP 503") as caught:
        await generate_with_provider(
            settings.provider(), WithBuiltins(NotesTools()).catalog(), PlanRequest("x")
        )
    assert type(caught.value).__name__ == "GenerationError"
    assert len(llm_server.requests) == 2
    assert llm_server.requests[0].headers["authorization"] == "Bearer not-needed"


async def test_server_refusing_json_schema_output_is_asked_again_in_plain_text(
    llm_server: ScriptedLLMServer,
) -> None:
    llm_server.replies.append(Reply(400, {"error": {"message": "response_format is not supported"}}))
    llm_server.chat(json.dumps(GOOD))
    tools = WithBuiltins(NotesTools()).catalog()
    plan = await generate_with_provider(openai_settings(llm_server).provider(), tools, PlanRequest("greet"))
    assert plan.steps[0].id == "write"
    refused, plain = llm_server.requests
    assert "response_format" in refused.body and "response_format" not in plain.body
    assert "JSON Schema" in plain.body["messages"][0]["content"]


async def test_a_model_that_never_answers_times_out_with_a_clear_error(
    llm_server: ScriptedLLMServer,
) -> None:
    llm_server.replies.append(Reply(200, {}, hang=True))
    settings = LLMSettings(
        LLMSpec("openai-compatible", "m", llm_server.openai_url), None, timeout=0.5, max_retries=0
    )
    with pytest.raises(ToolCallError, match="could not be reached"):
        await settings("hello?", None, None, None)


async def test_anthropic_messages_wire_format_generates_a_plan(llm_server: ScriptedLLMServer) -> None:
    llm_server.message("not json at all")
    llm_server.message(json.dumps(GOOD), input_tokens=700, output_tokens=90)
    tools = WithBuiltins(NotesTools()).catalog()
    plan = await generate_with_provider(
        anthropic_settings(llm_server).provider(), tools, PlanRequest("greet")
    )
    assert [s.id for s in plan.steps] == ["write"]
    assert plan.metadata["llm_usage"]["provider"] == "anthropic"
    assert plan.metadata["llm_usage"]["input_tokens"] == 800
    first = llm_server.requests[0]
    assert first.path == "/v1/messages"
    # The SDK sends the key as `x-api-key` or, in newer versions, as a bearer token.
    assert KEY in (
        first.headers.get("x-api-key"),
        first.headers.get("authorization", "").removeprefix("Bearer "),
    )
    assert first.body["model"] == "claude-test" and first.body["max_tokens"] > 0
    assert "JSON Schema" in first.body["system"]
    assert [m["role"] for m in llm_server.requests[1].body["messages"]] == ["user", "assistant", "user"]


async def test_anthropic_rate_limit_is_retried(llm_server: ScriptedLLMServer) -> None:
    llm_server.rate_limited()
    llm_server.message("a short poem")
    answer = await anthropic_settings(llm_server)("write a poem", None, "be brief", 50)
    assert answer == "a short poem"
    assert len(llm_server.requests) == 2
    assert llm_server.requests[1].body["system"] == "be brief"
    assert llm_server.requests[1].body["max_tokens"] == 50


# -- the MCP server ----------------------------------------------------------------------------------------


async def test_llm_step_text_flows_into_a_later_step_through_the_mcp_server(
    llm_server: ScriptedLLMServer, tmp_path: Path
) -> None:
    llm_server.chat("Roses are red")
    llm_server.chat('{"title": "Spring"}')
    tools = NotesTools()
    plan = {
        "description": "Write a poem and its title",
        "steps": [
            {"id": "poem", "tool_name": "planner.llm", "parameters": {"prompt": "Write a poem"}},
            {
                "id": "title",
                "tool_name": "planner.llm",
                "parameters": {
                    "prompt": "Title for: {{ steps.poem.text }}",
                    "schema": {"type": "object", "properties": {"title": {"type": "string"}}},
                },
            },
            {
                "id": "save",
                "tool_name": "notes.write",
                "parameters": {"name": "{{ steps.title.result.title }}", "text": "{{ steps.poem.text }}"},
            },
        ],
    }
    async with planner(tmp_path / "plans.db", tools, openai_settings(llm_server)) as client:
        created = await client.call_tool("create_plan", plan)
        assert not created.is_error, _text(created)
        assert created.structured_content is not None
        plan_id = created.structured_content["id"]
        approved = await client.call_tool("approve_plan", {"plan_id": plan_id})
        assert not approved.is_error, _text(approved)
        run = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert not run.is_error, _text(run)
        assert run.structured_content is not None and run.structured_content["status"] == "completed"
    assert tools.notes == {"Spring": "Roses are red"}
    assert llm_server.requests[1].body["messages"][-1]["content"] == "Title for: Roses are red"
    assert "response_format" not in llm_server.requests[0].body
    assert llm_server.requests[1].body["response_format"]["json_schema"]["schema"]["type"] == "object"


async def test_generate_plan_uses_the_provider_and_no_key_reaches_the_database(
    llm_server: ScriptedLLMServer, tmp_path: Path
) -> None:
    llm_server.chat(json.dumps(BROKEN))
    llm_server.chat(json.dumps(GOOD), prompt_tokens=321, completion_tokens=45)
    llm_server.chat("hello from the model")
    db = tmp_path / "plans.db"
    tools = NotesTools()
    async with planner(db, tools, openai_settings(llm_server)) as client:
        result = await client.call_tool("generate_plan", {"task": "write a greeting note"})
        assert not result.is_error, _text(result)
        assert result.structured_content is not None
        generated_id = result.structured_content["id"]
        ask = {
            "description": "Ask",
            "steps": [{"id": "ask", "tool_name": "planner.llm", "parameters": {"prompt": "hi"}}],
        }
        created = await client.call_tool("create_plan", ask)
        assert created.structured_content is not None
        plan_id = created.structured_content["id"]
        await client.call_tool("approve_plan", {"plan_id": plan_id})
        run = await client.call_tool("execute_plan", {"plan_id": plan_id})
        assert run.structured_content is not None and run.structured_content["status"] == "completed"
    async with PlanStore.open(db) as store:
        stored = await store.get_plan(generated_id)
    assert stored.metadata["llm_usage"]["input_tokens"] == 100 + 321
    assert all(seen.headers["authorization"] == f"Bearer {KEY}" for seen in llm_server.requests)
    assert_key_not_stored(tmp_path)


async def test_auto_prefers_sampling_when_the_client_offers_it(
    llm_server: ScriptedLLMServer, tmp_path: Path
) -> None:
    asked: list[str] = []

    async def sampling(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append("sampling")
        content = types.TextContent(type="text", text=json.dumps(GOOD))
        return types.CreateMessageResult(role="assistant", content=content, model="client")

    settings = LLMSettings(LLMSpec("openai-compatible", "m", llm_server.openai_url, sampling_first=True))
    async with PlanStore.open(tmp_path / "plans.db") as store:
        async with PlannerService(store, WithBuiltins(NotesTools(), settings), approval="agent") as service:
            async with Client(build_server(service), sampling_callback=sampling) as client:
                result = await client.call_tool("generate_plan", {"task": "greet"})
                assert not result.is_error, _text(result)
            llm_server.chat(json.dumps(GOOD))
            async with Client(build_server(service)) as client:  # no sampling: the provider answers
                result = await client.call_tool("generate_plan", {"task": "greet"})
                assert not result.is_error, _text(result)
    assert asked == ["sampling"]
    assert len(llm_server.requests) == 1


async def test_without_a_provider_planner_llm_fails_its_step_with_a_clear_error(tmp_path: Path) -> None:
    async with planner(tmp_path / "plans.db", LocalTools({}), LLMSettings(LLMSpec(sampling_first=True))) as c:
        ask = {
            "description": "Ask",
            "steps": [{"id": "ask", "tool_name": "planner.llm", "parameters": {"prompt": "hi"}}],
        }
        created = await c.call_tool("create_plan", ask)
        assert created.structured_content is not None
        plan_id = created.structured_content["id"]
        await c.call_tool("approve_plan", {"plan_id": plan_id})
        run = await c.call_tool("execute_plan", {"plan_id": plan_id})
        assert run.structured_content is not None and run.structured_content["status"] == "failed"
        shown = await c.call_tool("get_plan", {"plan_id": plan_id})
        assert "needs an LLM provider" in _text(shown) + json.dumps(shown.structured_content)


@pytest.mark.e2e
async def test_serve_with_llm_generates_plans_and_its_runners_answer_planner_llm(
    llm_server: ScriptedLLMServer, tmp_path: Path
) -> None:
    plan = {
        "description": "Echo a greeting",
        "steps": [{"id": "greet", "tool_name": "planner.echo", "parameters": {"value": "hello"}}],
    }
    llm_server.chat(json.dumps(plan))
    llm_server.chat("a poem")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MCP_PLANNER", "OPENAI", "ANTHROPIC"))}
    env.update({"MCP_PLANNER_LLM_API_KEY": KEY, "MCP_PLANNER_RUNNER_IDLE_EXIT": "3"})
    spec = f"openai-compatible:{llm_server.openai_url}#scripted-model"
    db = tmp_path / "plans.db"
    args = ["-m", "mcp_planner", "serve", "--db", str(db), "--approval", "agent", "--llm", spec]
    launch = StdioServerParameters(command=sys.executable, args=args, env=env, cwd=str(tmp_path))
    ask = {
        "description": "Ask and keep",
        "steps": [
            {"id": "ask", "tool_name": "planner.llm", "parameters": {"prompt": "a poem"}},
            {"id": "keep", "tool_name": "planner.echo", "parameters": {"poem": "{{ steps.ask.text }}"}},
        ],
    }
    async with Client(launch, mode="legacy") as client:
        generated = await client.call_tool("generate_plan", {"task": "greet"})
        assert not generated.is_error, _text(generated)
        assert generated.structured_content is not None
        assert generated.structured_content["steps"][0]["tool_name"] == "planner.echo"
        created = await client.call_tool("create_plan", ask)
        assert created.structured_content is not None
        plan_id = created.structured_content["id"]
        await client.call_tool("approve_plan", {"plan_id": plan_id})
        run = await client.call_tool("execute_plan", {"plan_id": plan_id, "wait_seconds": 30})
        assert run.structured_content is not None, _text(run)
        assert run.structured_content["status"] == "completed", _text(run)
        shown = await client.call_tool("get_plan", {"plan_id": plan_id})
        assert '"poem": "a poem"' in json.dumps(shown.structured_content) + _text(shown)
    assert len(llm_server.requests) == 2
    assert_key_not_stored(tmp_path)


# -- the command line --------------------------------------------------------------------------------------


def test_cli_generate_stores_the_plan_and_shows_it_for_approval(
    llm_server: ScriptedLLMServer, tmp_path: Path
) -> None:
    plan = {
        "description": "Echo a greeting",
        "steps": [{"id": "greet", "tool_name": "planner.echo", "parameters": {"value": "hello"}}],
    }
    llm_server.chat(json.dumps(plan), prompt_tokens=10, completion_tokens=5)
    db = tmp_path / "plans.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MCP_PLANNER", "OPENAI", "ANTHROPIC"))}
    env.update({"MCP_PLANNER_DB": str(db), "MCP_PLANNER_LLM_API_KEY": KEY, "COLUMNS": "200"})
    spec = f"openai-compatible:{llm_server.openai_url}#scripted-model"
    command = [sys.executable, "-m", "mcp_planner", "generate", "say hello", "--llm", spec]
    done = subprocess.run(
        [*command, "--context", "a test", "--constraint", "one step"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Echo a greeting" in done.stdout and "pending_approval" in done.stdout
    assert "mcp-planner approve" in done.stdout
    prompt = llm_server.requests[0].body["messages"][-1]["content"]
    assert "say hello" in prompt and "a test" in prompt and "one step" in prompt
    llm_server.chat(json.dumps(plan), prompt_tokens=7, completion_tokens=3)
    as_json = subprocess.run(
        [*command, "--json"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert as_json.returncode == 0, as_json.stderr
    stored = json.loads(as_json.stdout)
    assert stored["status"] == "pending_approval"
    assert stored["metadata"]["llm_usage"] == {
        "provider": "openai-compatible",
        "model": "scripted-model",
        "calls": 1,
        "input_tokens": 7,
        "output_tokens": 3,
    }
    llm_server.replies.append(Reply(401, {"error": {"message": "bad key"}}))  # not retried
    refused = subprocess.run(
        [*command, "--json"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode == 1 and "answered HTTP 401" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert_key_not_stored(tmp_path)


def test_cli_run_with_llm_answers_planner_llm_steps(llm_server: ScriptedLLMServer, tmp_path: Path) -> None:
    llm_server.chat("a haiku about dags")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(
        json.dumps(
            {
                "description": "Ask and keep",
                "steps": [
                    {"id": "ask", "tool_name": "planner.llm", "parameters": {"prompt": "a haiku"}},
                    {
                        "id": "keep",
                        "tool_name": "planner.echo",
                        "parameters": {"value": "{{ steps.ask.text }}!"},
                    },
                ],
                "outputs": {"poem": "{{ steps.keep.text }}"},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MCP_PLANNER", "OPENAI", "ANTHROPIC"))}
    env.update({"MCP_PLANNER_DB": str(tmp_path / "plans.db"), "COLUMNS": "200"})
    spec = f"openai-compatible:{llm_server.openai_url}#scripted-model"
    done = subprocess.run(
        [sys.executable, "-m", "mcp_planner", "run", str(plan_file), "--yes", "--llm", spec],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "a haiku about dags!" in done.stdout
    assert llm_server.requests[0].body["messages"] == [{"role": "user", "content": "a haiku"}]


def test_cli_generate_without_a_provider_says_how_to_configure_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MCP_PLANNER", "OPENAI", "ANTHROPIC"))}
    env["MCP_PLANNER_DB"] = str(tmp_path / "plans.db")
    done = subprocess.run(
        [sys.executable, "-m", "mcp_planner", "generate", "say hello"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "no LLM provider configured: pass --llm" in done.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "mcp_planner", "generate", "x", "--llm", "gemini:pro"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "unknown LLM provider 'gemini:pro'" in bad.stderr
