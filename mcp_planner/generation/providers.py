"""LLM providers: Anthropic, OpenAI and any OpenAI-compatible endpoint, behind `LLMProvider`.

    --llm / MCP_PLANNER_LLM -> parse_llm_spec -> LLMSpec --(keys from env)--> LLMSettings
        LLMSettings.provider()  a fresh `APIProvider` per plan (its `usage` goes into the plan's metadata)
        LLMSettings(...)        the `planner.llm` callable (`WithBuiltins(inner, llm=settings)`)

Specs: `anthropic:<model>`, `openai:<model>`, `openai-compatible:<base_url>#<model>` (Ollama, vLLM,
llama.cpp server, LM Studio), `sampling` (only MCP sampling), `auto` (sampling when the client offers it,
else a provider chosen from the keys present), `auto:<spec>` (sampling when offered, else `<spec>`).

The clients are the official `openai` and `anthropic` SDKs (the optional extra `mcp-planner[llm]`), imported
only when a provider is used. Each request is bounded by `timeout`; 429 and 5xx answers are retried by the
SDK with exponential backoff (honouring `retry-after`), `max_retries` times. Keys are read once from the
environment mapping given, kept in memory and never written anywhere: usage metadata names only the
provider and the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import anyio

from mcp_planner.engine.tools import ToolInfo
from mcp_planner.errors import ConfigError, GenerationError, LLMNotConfiguredError, ToolCallError
from mcp_planner.generation.generator import (
    DEFAULT_MAX_REPAIRS,
    Generator,
    PlanRequest,
    extract_json_object,
)
from mcp_planner.plan.model import ExecutionPlan, PlanSpec

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_TIMEOUT",
    "ENV_VAR",
    "APIProvider",
    "LLMSettings",
    "LLMSpec",
    "generate_with_provider",
    "llm_settings",
    "parse_llm_spec",
]

#: The environment variable naming the provider (the CLI's `--llm` sets it for runners it starts).
ENV_VAR: Final = "MCP_PLANNER_LLM"
#: Seconds one request may take (each retry gets as long again).
DEFAULT_TIMEOUT: Final = 120.0
DEFAULT_MAX_RETRIES: Final = 4
DEFAULT_MAX_TOKENS: Final = 4000
#: What plain `auto` uses when only a key is present.
DEFAULT_MODELS: Final[Mapping[str, str]] = {"anthropic": "claude-sonnet-4-5", "openai": "gpt-4.1-mini"}

Kind = Literal["anthropic", "openai", "openai-compatible"]
_KINDS: Final = ("anthropic", "openai", "openai-compatible")
_KEY_VARS: Final[Mapping[str, tuple[str, ...]]] = {
    "anthropic": ("ANTHROPIC_API_KEY",),
    "openai": ("OPENAI_API_KEY",),
    # Local servers take any key or none; a gateway may want one.
    "openai-compatible": ("MCP_PLANNER_LLM_API_KEY", "OPENAI_API_KEY"),
}
_BASE_URL_VARS: Final[Mapping[str, str]] = {"anthropic": "ANTHROPIC_BASE_URL", "openai": "OPENAI_BASE_URL"}
_JSON_INSTRUCTION = (
    "Answer with exactly one JSON value matching this JSON Schema, and nothing else:\n{schema}"
)
_SPEC_HELP = (
    "use 'anthropic:<model>', 'openai:<model>', 'openai-compatible:<base_url>#<model>', 'auto', "
    "'auto:<one of those>' or 'sampling'"
)


@dataclass(frozen=True)
class LLMSpec:
    """A parsed `--llm` value: which provider, and whether MCP sampling comes first.

    `kind` None means no API provider (plain `sampling`, or `auto` before keys are looked at).
    """

    kind: Kind | None = None
    model: str = ""
    base_url: str | None = None
    sampling_first: bool = False
    auto: bool = False

    def label(self) -> str:
        """The spec as text without credentials (a base URL's user and password are left out)."""
        if self.kind is None:
            return "auto" if self.auto else "sampling"
        if self.kind == "openai-compatible" and self.base_url:
            parts = urlsplit(self.base_url)
            host = parts.hostname or ""
            netloc = f"{host}:{parts.port}" if parts.port else host
            return f"{self.kind}:{parts._replace(netloc=netloc).geturl()}#{self.model}"
        return f"{self.kind}:{self.model}"


def parse_llm_spec(text: str) -> LLMSpec:
    """Parse a `--llm` / `MCP_PLANNER_LLM` value.

    Raises:
        ConfigError: the value names no known provider, or lacks the model or base URL.
    """
    value = text.strip()
    if value in ("auto", ""):
        return LLMSpec(sampling_first=True, auto=True)
    if value == "sampling":
        return LLMSpec(sampling_first=True)
    if value.startswith("auto:"):
        inner = parse_llm_spec(value[len("auto:") :])
        if inner.kind is None:
            raise ConfigError(f"{text!r} is not a provider spec after 'auto:': {_SPEC_HELP}")
        return LLMSpec(inner.kind, inner.model, inner.base_url, sampling_first=True)
    kind, sep, rest = value.partition(":")
    if not sep or kind not in _KINDS:
        raise ConfigError(f"unknown LLM provider {text!r}: {_SPEC_HELP}")
    rest = rest.strip()
    if kind == "openai-compatible":
        base_url, hash_sign, model = rest.rpartition("#")
        if not hash_sign or not base_url or not model.strip():
            raise ConfigError(
                f"{text!r} needs a base URL and a model: 'openai-compatible:<base_url>#<model>', e.g. "
                "'openai-compatible:http://127.0.0.1:11434/v1#qwen3'"
            )
        if urlsplit(base_url).scheme not in ("http", "https"):
            raise ConfigError(f"the base URL of {text!r} must start with http:// or https://")
        return LLMSpec("openai-compatible", model.strip(), base_url)
    if not rest:
        raise ConfigError(f"{text!r} names no model: e.g. '{kind}:{DEFAULT_MODELS[kind]}'")
    return LLMSpec(kind, rest)  # type: ignore[arg-type]


def _key(kind: Kind, env: Mapping[str, str]) -> str | None:
    for var in _KEY_VARS[kind]:
        if env.get(var):
            return env[var]
    return None


@dataclass
class Usage:
    """Token counts of one plan's (or one step's) LLM calls."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, input_tokens: int | None, output_tokens: int | None) -> None:
        self.calls += 1
        self.input_tokens += input_tokens or 0
        self.output_tokens += output_tokens or 0


@dataclass
class APIProvider:
    """`LLMProvider` over a provider's API: one client, and the token usage of its calls so far.

    Args:
        spec: Which provider and model (`spec.kind` must be set).
        api_key: The key, or None (then an OpenAI-compatible server gets a placeholder).
        timeout: Seconds per request.
        max_retries: Retries of 429, 5xx and connection failures, with backoff.
        max_tokens: The most tokens per answer.
        structured: Ask for JSON matching `PlanSpec`'s schema where the provider supports it.
    """

    spec: LLMSpec
    api_key: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    max_tokens: int = DEFAULT_MAX_TOKENS
    structured: bool = True
    usage: Usage = field(default_factory=Usage)
    _client: Any = field(default=None, repr=False)

    async def aclose(self) -> None:
        """Close the client's connections (bounded: a close never hangs the caller)."""
        client, self._client = self._client, None
        if client is not None:
            with anyio.move_on_after(5, shield=True):
                await client.close()

    async def complete(self, system: str, messages: list[tuple[str, str]]) -> str:
        """Answer the conversation with a plan (structured output where supported).

        Raises:
            GenerationError: the provider failed, refused, or timed out (after the SDK's retries).
        """
        schema = PlanSpec.model_json_schema() if self.structured else None
        return await self.ask(system, messages, schema=schema, max_tokens=self.max_tokens)

    async def ask(
        self,
        system: str | None,
        messages: list[tuple[str, str]],
        *,
        schema: dict[str, Any] | None = None,
        max_tokens: int | None = None,
    ) -> str:
        """Ask the model; with `schema`, for JSON matching it (natively on OpenAI, by instruction else).

        Raises:
            GenerationError: the provider failed, refused, or timed out (after the SDK's retries).
        """
        kind = self.spec.kind
        if kind is None:
            raise GenerationError("no LLM provider configured: pass --llm or set MCP_PLANNER_LLM")
        bound = self.timeout * (self.max_retries + 1) + 30.0  # the SDK's own bound, plus its backoff
        try:
            with anyio.fail_after(bound):
                if kind == "anthropic":
                    return await self._anthropic(system, messages, schema, max_tokens)
                return await self._openai(system, messages, schema, max_tokens)
        except TimeoutError:
            raise GenerationError(
                f"the LLM ({self.spec.label()}) did not answer within {bound:g} s: try again later"
            ) from None
        except ImportError as exc:
            raise GenerationError(
                f"the LLM provider {self.spec.label()!r} needs the optional extra: "
                f"pip install 'mcp-planner[llm]' ({exc})"
            ) from None

    async def _openai(
        self,
        system: str | None,
        messages: list[tuple[str, str]],
        schema: dict[str, Any] | None,
        max_tokens: int | None,
    ) -> str:
        import openai

        if self._client is None:
            self._client = openai.AsyncOpenAI(
                api_key=self.api_key or "not-needed",
                base_url=self.spec.base_url,
                timeout=self.timeout,
                max_retries=self.max_retries,
            )
        wire: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        wire += [{"role": role, "content": text} for role, text in messages]
        kwargs: dict[str, Any] = {"model": self.spec.model, "messages": wire}
        if max_tokens:
            # OpenAI's newer models refuse `max_tokens`; most compatible servers know only `max_tokens`.
            kwargs["max_completion_tokens" if self.spec.kind == "openai" else "max_tokens"] = max_tokens
        if schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": False},
            }
        try:
            try:
                response = await self._client.chat.completions.create(**kwargs)
            except openai.BadRequestError:
                if "response_format" not in kwargs:
                    raise
                # Some compatible servers refuse JSON-schema output: ask again as plain text, whose
                # tolerant parsing and repair loop still apply, and stop asking for it.
                del kwargs["response_format"]
                self.structured = False
                kwargs["messages"] = _with_json_instruction(wire, schema)
                response = await self._client.chat.completions.create(**kwargs)
        except openai.APIStatusError as exc:
            raise GenerationError(
                f"the LLM ({self.spec.label()}) answered HTTP {exc.status_code}: {_short(exc.message)}; "
                "check the model name and key"
            ) from exc
        except openai.APIError as exc:
            raise GenerationError(
                f"the LLM ({self.spec.label()}) could not be reached: {_short(str(exc))}; check --llm and "
                "that the server is running"
            ) from exc
        usage = response.usage
        self.usage.add(usage.prompt_tokens if usage else None, usage.completion_tokens if usage else None)
        if not response.choices:
            raise GenerationError(f"the LLM ({self.spec.label()}) answered with no choices: try again")
        message = response.choices[0].message
        if message.content is None:
            refusal = getattr(message, "refusal", None)
            raise GenerationError(
                f"the LLM ({self.spec.label()}) gave no text" + (f" (refused: {refusal})" if refusal else "")
            )
        return str(message.content)

    async def _anthropic(
        self,
        system: str | None,
        messages: list[tuple[str, str]],
        schema: dict[str, Any] | None,
        max_tokens: int | None,
    ) -> str:
        import anthropic

        if self._client is None:
            self._client = anthropic.AsyncAnthropic(
                api_key=self.api_key,
                base_url=self.spec.base_url,
                timeout=self.timeout,
                max_retries=self.max_retries,
            )
        if schema is not None:
            # Tolerant parsing and the repair loop do the rest.
            instruction = _JSON_INSTRUCTION.format(schema=json.dumps(schema, separators=(",", ":")))
            system = f"{system}\n\n{instruction}" if system else instruction
        kwargs: dict[str, Any] = {
            "model": self.spec.model,
            "max_tokens": max_tokens or self.max_tokens,
            "messages": [{"role": role, "content": text} for role, text in messages],
        }
        if system:
            kwargs["system"] = system
        try:
            response = await self._client.messages.create(**kwargs)
        except anthropic.APIStatusError as exc:
            raise GenerationError(
                f"the LLM ({self.spec.label()}) answered HTTP {exc.status_code}: {_short(exc.message)}; "
                "check the model name and ANTHROPIC_API_KEY"
            ) from exc
        except anthropic.APIError as exc:
            raise GenerationError(
                f"the LLM ({self.spec.label()}) could not be reached: {_short(str(exc))}"
            ) from exc
        self.usage.add(response.usage.input_tokens, response.usage.output_tokens)
        texts = [block.text for block in response.content if getattr(block, "type", None) == "text"]
        if not texts:
            raise GenerationError(f"the LLM ({self.spec.label()}) answered with no text: try again")
        return "\n".join(texts)


@dataclass(frozen=True)
class LLMSettings:
    """The configured LLM: what `generate_plan`, `mcp-planner generate` and `planner.llm` use.

    Called as `planner.llm`'s `LLMFunction`: `(prompt, schema, system, max_tokens)` -> text, or the JSON
    value matching `schema`.
    """

    spec: LLMSpec
    api_key: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES

    @property
    def sampling_first(self) -> bool:
        """Whether MCP sampling, when the client offers it, comes before the API provider."""
        return self.spec.sampling_first

    @property
    def has_provider(self) -> bool:
        """Whether an API provider is configured (else only sampling can answer)."""
        return self.spec.kind is not None

    def provider(self) -> APIProvider:
        """A fresh API provider (its usage counts from zero).

        Raises:
            GenerationError: no API provider is configured.
        """
        if self.spec.kind is None:
            raise GenerationError(
                "no LLM provider configured: pass --llm (e.g. 'anthropic:claude-sonnet-4-5') or set "
                "MCP_PLANNER_LLM, with the provider's API key in its usual environment variable"
            )
        return APIProvider(self.spec, self.api_key, timeout=self.timeout, max_retries=self.max_retries)

    async def __call__(
        self, prompt: str, schema: dict[str, Any] | None, system: str | None, max_tokens: int | None
    ) -> str | dict[str, Any]:
        """`planner.llm`: the answer's text, or with `schema` the JSON it holds.

        Raises:
            LLMNotConfiguredError: only sampling is configured (a running plan has no client to sample).
            ToolCallError: the provider failed, or no JSON came back for `schema` (the step may retry).
        """
        if self.spec.kind is None:
            raise LLMNotConfiguredError(
                f"'planner.llm' needs an LLM provider, and {self.spec.label()!r} has none for a running plan "
                "(MCP sampling only answers generate_plan): pass --llm 'anthropic:<model>', "
                "'openai:<model>' or 'openai-compatible:<base_url>#<model>'"
            )
        provider = self.provider()
        try:
            answer = await provider.ask(system, [("user", prompt)], schema=schema, max_tokens=max_tokens)
        except GenerationError as exc:
            raise ToolCallError(str(exc)) from exc
        finally:
            await provider.aclose()
        if schema is None:
            return answer
        try:
            value = json.loads(answer)
        except ValueError:
            try:
                value = extract_json_object(answer)
            except ValueError as exc:
                raise ToolCallError(f"the LLM's answer holds no JSON for the schema: {exc}") from None
        return value if isinstance(value, dict) else {"value": value}


def llm_settings(
    env: Mapping[str, str],
    spec: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> LLMSettings | None:
    """The LLM configured by `spec` or `env[MCP_PLANNER_LLM]`, with its key from `env`; None if neither
    names one.

    Plain `auto` picks a provider from the keys present (Anthropic first, then OpenAI, with
    `DEFAULT_MODELS`); without a key it means sampling only.

    Raises:
        ConfigError: the spec is malformed, or names Anthropic or OpenAI without their key.
    """
    text = spec if spec is not None else env.get(ENV_VAR, "")
    if not text.strip():
        return None
    parsed = parse_llm_spec(text)
    if parsed.auto:
        for kind in ("anthropic", "openai"):
            if _key(kind, env):
                parsed = LLMSpec(kind, DEFAULT_MODELS[kind], sampling_first=True, auto=True)
                break
    # The SDKs' own base URL variables, read here so that only the mapping given is read.
    base_url = env.get(_BASE_URL_VARS.get(parsed.kind or "", ""), "")
    if base_url and parsed.kind != "openai-compatible":
        parsed = replace(parsed, base_url=base_url)
    key = _key(parsed.kind, env) if parsed.kind is not None else None
    if parsed.kind in ("anthropic", "openai") and key is None:
        var = _KEY_VARS[parsed.kind][0]
        raise ConfigError(f"the LLM {parsed.label()!r} needs an API key: set {var}")
    return LLMSettings(parsed, key, timeout=timeout, max_retries=max_retries)


async def generate_with_provider(
    provider: APIProvider,
    tools: Mapping[str, ToolInfo],
    request: PlanRequest,
    *,
    max_repairs: int = DEFAULT_MAX_REPAIRS,
) -> ExecutionPlan:
    """Generate a plan with an API provider; its token usage goes into `metadata["llm_usage"]`.

    Raises:
        GenerationError: the provider failed, or no answer became a valid plan.
    """
    try:
        plan = await Generator(provider, tools, max_repairs=max_repairs).generate(request)
    finally:
        await provider.aclose()
    plan.metadata["llm_usage"] = {
        "provider": provider.spec.kind,
        "model": provider.spec.model,
        "calls": provider.usage.calls,
        "input_tokens": provider.usage.input_tokens,
        "output_tokens": provider.usage.output_tokens,
    }
    return plan


def _with_json_instruction(wire: list[dict[str, str]], schema: dict[str, Any] | None) -> list[dict[str, str]]:
    """The messages with the JSON instruction added to the system prompt (a new one if there is none)."""
    if schema is None:
        return wire
    instruction = _JSON_INSTRUCTION.format(schema=json.dumps(schema, separators=(",", ":")))
    if wire and wire[0]["role"] == "system":
        return [{"role": "system", "content": f"{wire[0]['content']}\n\n{instruction}"}, *wire[1:]]
    return [{"role": "system", "content": instruction}, *wire]


def _short(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
