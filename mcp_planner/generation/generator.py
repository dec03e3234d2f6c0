"""Plan generation: a task in, a validated plan out, through any LLM.

    render plan.j2 -> ask the LLM -> find the JSON -> PlanSpec -> qualify tool names -> validate
                          ^                                                              |
                          +------------- repair.j2 with every problem <------------------+
                                         (up to `max_repairs` rounds; tenacity)

The LLM is reached through `LLMProvider`, so the generator knows nothing about MCP: the server plugs in
`sampling.SamplingProvider`, tests a scripted fake. Plans are checked with the same rules as `create_plan`
(`validation.validate_plan`). The caller stores the returned plan; a failure stores nothing.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import anyio
import jinja2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from mcp_planner.engine.tools import ToolInfo
from mcp_planner.errors import GenerationError, Problem
from mcp_planner.plan.model import ExecutionOptions, ExecutionPlan, PlanSpec
from mcp_planner.plan.validation import qualify_tool_names, validate_plan

__all__ = [
    "DEFAULT_MAX_REPAIRS",
    "SYSTEM_PROMPT",
    "Generator",
    "LLMProvider",
    "PlanRequest",
    "extract_json_object",
    "render_planning_prompt",
    "render_repair_prompt",
]

#: Repair rounds after the first answer (SPEC section 7: "up to 3 attempts" at repairing).
DEFAULT_MAX_REPAIRS = 3

SYSTEM_PROMPT = (
    "You are the planning assistant of mcp-planner. You turn a task into an execution plan: a DAG of calls "
    "of the listed tools, where a step may call its tool once per item of a list (for_each) or only when a "
    "condition holds (when), and the plan may name the outputs it returns. You answer with exactly one JSON "
    "object in the requested format and nothing else."
)

#: Options that decide approval. A person sets them (the request, the server's policy), never the LLM:
#: a generated plan must not approve itself.
APPROVAL_OPTIONS = frozenset({"require_approval", "auto_approve", "approval_timeout_ms"})

_OPTION_HELP: tuple[tuple[str, str], ...] = (
    ("allow_parallel", "default false: one step at a time"),
    ("max_parallel_steps", "default 3, at most 64"),
    ("stop_on_error", "default true: start nothing new after a step fails"),
    ("continue_on_error", "default false; true keeps running every step that can still run"),
    ("step_timeout_ms", "per attempt; default 0 = none"),
    ("total_timeout_ms", "whole run; default 0 = none"),
    ("retry_backoff", "default 1.0 = fixed delay; 2.0 doubles the delay each retry"),
)

_DESCRIPTION_LIMIT = 1000
_PARAM_DESCRIPTION_LIMIT = 300
_PREVIOUS_ANSWER_LIMIT = 16_000
_SCHEMA_DEPTH = 3
_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)```", re.DOTALL)

Role = Literal["user", "assistant"]


@runtime_checkable
class LLMProvider(Protocol):
    """Something that can continue a conversation: MCP sampling, an API client, a scripted fake."""

    async def complete(self, system: str, messages: list[tuple[str, str]]) -> str:
        """Answer the conversation.

        Args:
            system: The system prompt.
            messages: `(role, text)` pairs, oldest first; role is `"user"` or `"assistant"`.

        Returns:
            The model's answer as text.

        Raises:
            GenerationError: the model cannot be asked, or refused.
        """
        ...


class PlanRequest(BaseModel):
    """What `generate_plan` takes.

    `constraints` is a list of rules, as the seed's `Constraints []string`; a single string is taken as a
    list of one, and blank rules are dropped. `options` override what the LLM proposes: only the fields given
    (dict keys, or the fields explicitly set on an `ExecutionOptions`) are applied, so
    `{"allow_parallel": True}` keeps everything else as planned.
    """

    model_config = ConfigDict(extra="forbid")

    task: str
    context: str | None = None
    constraints: list[str] = Field(default_factory=list)
    options: ExecutionOptions | None = None

    def __init__(
        self,
        task: str,
        context: str | None = None,
        constraints: Sequence[str] | str | None = None,
        options: ExecutionOptions | dict[str, Any] | None = None,
    ) -> None:
        # Positional too, as the seed's API is written: PlanRequest(task, context, constraints, options).
        super().__init__(task=task, context=context, constraints=constraints, options=options)

    @field_validator("task")
    @classmethod
    def _task_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the task is empty: say what the plan should achieve")
        return value

    @field_validator("constraints", mode="before")
    @classmethod
    def _constraints_as_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("constraints")
    @classmethod
    def _drop_blank_constraints(cls, value: list[str]) -> list[str]:
        return _constraint_list(value)

    @field_validator("options", mode="before")
    @classmethod
    def _copy_options(cls, value: Any) -> Any:
        # A copy keeps `model_fields_set`, which is what marks an option as requested.
        return value.model_copy() if isinstance(value, ExecutionOptions) else value

    def option_overrides(self) -> dict[str, Any]:
        """The options the caller asked for explicitly."""
        if self.options is None:
            return {}
        return self.options.model_dump(include=set(self.options.model_fields_set))


class _Invalid(Exception):
    """One answer was not a valid plan; tenacity retries on this."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(f"{len(problems)} problem(s)")
        self.problems = problems


class Generator:
    """Asks an LLM for a plan and repairs it until it validates.

    Args:
        provider: The LLM.
        tools: The catalog steps may call, by (qualified) name.
        max_repairs: Repair rounds after the first answer.
    """

    def __init__(
        self,
        provider: LLMProvider,
        tools: Mapping[str, ToolInfo],
        *,
        max_repairs: int = DEFAULT_MAX_REPAIRS,
    ) -> None:
        if max_repairs < 0:
            raise ValueError(f"max_repairs must be >= 0, got {max_repairs!r}")
        self._provider = provider
        self._tools = dict(tools)
        self._max_repairs = max_repairs

    async def generate(self, request: PlanRequest) -> ExecutionPlan:
        """Generate a valid plan for `request`, submitted (`pending_approval`, or approved when the options
        need no approval) and not stored.

        Raises:
            GenerationError: no tools to plan with, the requested options are invalid, the provider failed,
                or no answer became a valid plan (`problems` holds the last answer's problems).
        """
        if not self._tools:
            raise GenerationError(
                "no tools are available to plan with: the downstream servers may still be connecting or "
                "failed to start; call list_tools to see their state, then try again"
            )
        overrides = request.option_overrides()
        _check_requested_options(overrides)

        catalog = {name: info.input_schema for name, info in self._tools.items()}
        prompt = render_planning_prompt(
            self._tools, request.task, request.context, request.constraints, for_agent=False
        )
        messages: list[tuple[str, str]] = [("user", prompt)]
        plan: ExecutionPlan | None = None
        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_repairs + 1),
            retry=retry_if_exception_type(_Invalid),
            sleep=anyio.sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    answer = await self._provider.complete(SYSTEM_PROMPT, list(messages))
                    plan, problems = _plan_from_answer(answer, overrides, self._tools, catalog)
                    if problems:
                        messages.append(("assistant", answer))
                        messages.append(("user", render_repair_prompt(problems, answer)))
                        raise _Invalid(problems)
        except _Invalid as exc:
            tries = (
                "1 attempt"
                if attempts == 1
                else f"{attempts} attempts (the first answer and {attempts - 1} repairs)"
            )
            raise GenerationError(
                f"the LLM did not produce a valid plan in {tries}: draft the plan yourself "
                "(the plan_task prompt gives the instructions and the tool catalog) and call create_plan, "
                "or rephrase the task; the last answer's problems were:",
                exc.problems,
            ) from None
        assert plan is not None
        plan.metadata = {
            "generated": True,
            "generation": {
                "task": request.task,
                "context": request.context,
                "constraints": request.constraints,
                "attempts": attempts,
            },
        }
        plan.submit()
        return plan


def _check_requested_options(overrides: dict[str, Any]) -> None:
    """Refuse bad requested options up front: no LLM answer can repair them."""
    if not overrides:
        return
    probe = ExecutionPlan(description="probe", options=ExecutionOptions(**overrides))
    problems = [p for p in validate_plan(probe, None) if p.field.startswith("options.")]
    if problems:
        raise GenerationError("the requested options are invalid:", problems)


def _plan_from_answer(
    answer: str,
    overrides: dict[str, Any],
    tools: Mapping[str, ToolInfo],
    catalog: Mapping[str, dict[str, Any] | None],
) -> tuple[ExecutionPlan | None, list[Problem]]:
    try:
        data = extract_json_object(answer)
    except ValueError as exc:
        return None, [Problem(None, "answer", str(exc))]
    try:
        spec = PlanSpec.model_validate(data)
    except ValidationError as exc:
        return None, _problems_from_validation(exc, data)
    plan = ExecutionPlan.from_spec(spec)
    proposed = spec.options.model_dump(exclude=set(APPROVAL_OPTIONS))
    plan.options = ExecutionOptions(**{**proposed, **overrides})
    qualify_tool_names(plan, tools.keys())
    return plan, validate_plan(plan, catalog)


def _problems_from_validation(exc: ValidationError, data: dict[str, Any]) -> list[Problem]:
    """pydantic's errors as plan problems: which step, which field, what (no pydantic text dump)."""
    steps = data.get("steps")
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        step_id: str | None = None
        if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
            raw = steps[loc[1]] if isinstance(steps, list) and loc[1] < len(steps) else None
            raw_id = raw.get("id") if isinstance(raw, dict) else None
            if isinstance(raw_id, str) and raw_id:
                step_id, loc = raw_id, loc[2:]
            else:
                loc = [f"steps[{loc[1]}]", *loc[2:]]
        field = ".".join(str(part) for part in loc) or "plan"
        kind = err["type"]
        if kind == "missing":
            message = "required field is missing"
        elif kind == "extra_forbidden":
            message = "unknown field; remove it (see the plan format)"
        else:
            message = f"{err['msg']} (got {_short(err.get('input'))})"
        problems.append(Problem(step_id, field, message))
    return problems


# -- parsing ----------------------------------------------------------------------------------------------


def extract_json_object(text: str) -> dict[str, Any]:
    """The plan object in an LLM answer, tolerating code fences and prose around it.

    Fenced blocks are tried first, then every top-level `{...}` in the text (`json.JSONDecoder.raw_decode`
    from each `{`). An object with a `steps` key wins over other objects; otherwise the largest one.
    `{"plan": {...}}` is unwrapped.

    Raises:
        ValueError: no JSON object in the text; the message says what to send instead.
    """
    candidates: list[dict[str, Any]] = []
    for block in _FENCE.findall(text):
        try:
            value = json.loads(block)
        except ValueError:
            candidates.extend(_scan_objects(block))
            continue
        if isinstance(value, dict):
            candidates.append(value)
    candidates.extend(_scan_objects(text))
    candidates = [_unwrap(c) for c in candidates]
    if not candidates:
        hint = " (it may have been cut off)" if "{" in text else ""
        raise ValueError(
            f"the answer holds no complete JSON object{hint}; answer with only the plan as one JSON object"
        )
    with_steps = [c for c in candidates if "steps" in c]
    if with_steps:
        return with_steps[0]
    return max(candidates, key=lambda c: len(json.dumps(c)))


def _scan_objects(text: str) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    i = text.find("{")
    while i != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(value, dict):
            found.append(value)
        # Skip past a parsed object: objects nested in it are not candidates.
        i = text.find("{", end)
    return found


def _unwrap(obj: dict[str, Any]) -> dict[str, Any]:
    if len(obj) == 1 and isinstance(obj.get("plan"), dict):
        inner: dict[str, Any] = obj["plan"]
        return inner
    return obj


# -- prompts ----------------------------------------------------------------------------------------------


def render_planning_prompt(
    tools: Mapping[str, ToolInfo],
    task: str,
    context: str | None = None,
    constraints: Sequence[str] | str | None = None,
    *,
    for_agent: bool = True,
) -> str:
    """The planning prompt: the catalog (sorted), the task, context, constraints and the plan format.

    Args:
        tools: The catalog, by name.
        task: What the plan should achieve.
        context: Background the planner should know.
        constraints: Rules the plan must follow: a list, or one string (a list of one).
        for_agent: True for an agent that will call `create_plan` itself (the `plan_task` prompt), False for
            an LLM answering a sampling request with the JSON alone.
    """
    template = _templates()["plan.j2"]
    return template.render(
        task=task.strip(),
        context=(context or "").strip(),
        constraints=_constraint_list(constraints),
        tools=[_tool_view(tools[name]) for name in sorted(tools)],
        options=_OPTION_HELP,
        for_agent=for_agent,
    ).strip()


def _constraint_list(constraints: Sequence[str] | str | None) -> list[str]:
    """Rules as a list: one string is one rule; blank rules are dropped."""
    if constraints is None:
        return []
    if isinstance(constraints, str):
        constraints = [constraints]
    return [rule.strip() for rule in constraints if rule.strip()]


def render_repair_prompt(problems: list[Problem], previous: str) -> str:
    """The repair prompt: every problem of the previous answer, and that answer."""
    if len(previous) > _PREVIOUS_ANSWER_LIMIT:
        previous = previous[:_PREVIOUS_ANSWER_LIMIT] + "\n[... cut ...]"
    return _templates()["repair.j2"].render(problems=[str(p) for p in problems], previous=previous).strip()


def _prompts_dir() -> Path:
    # In a wheel the templates sit inside the package (pyproject force-includes them); in an editable
    # install they are the repository's top-level `prompts/`.
    here = Path(__file__).resolve().parent.parent  # the mcp_planner package
    for candidate in (here / "prompts", here.parent / "prompts"):
        if (candidate / "plan.j2").is_file():
            return candidate
    raise GenerationError(
        f"the prompt templates are missing (looked in {str(here / 'prompts')!r} and "
        f"{str(here.parent / 'prompts')!r}): reinstall mcp-planner"
    )


@cache
def _templates() -> dict[str, jinja2.Template]:
    """Both templates, compiled once per process."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_prompts_dir()),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    return {name: env.get_template(name) for name in ("plan.j2", "repair.j2")}


def _tool_view(info: ToolInfo) -> dict[str, Any]:
    description = inspect.cleandoc(info.description or "")
    schema = info.input_schema
    params: list[str] | None = None
    closed = False
    if isinstance(schema, dict):
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        required = set(schema.get("required") or [])
        closed = schema.get("additionalProperties") is False
        params = []
        for name, prop in props.items():
            line = f"{name}{'*' if name in required else ''} ({_type_of(prop, schema, 0)})"
            text = _one_line(prop.get("description", "")) if isinstance(prop, dict) else ""
            if text:
                line += f": {_clip(text, _PARAM_DESCRIPTION_LIMIT)}"
            if isinstance(prop, dict) and "default" in prop:
                line += f" [default: {json.dumps(prop['default'])}]"
            params.append(line)
    return {
        "name": info.name,
        "description": _clip(description, _DESCRIPTION_LIMIT),
        "hints": _hints(info.annotations),
        "params": params,
        "closed": closed,
    }


def _hints(annotations: Mapping[str, Any]) -> list[str]:
    hints = []
    if annotations.get("readOnlyHint"):
        hints.append("read-only")
    elif annotations.get("destructiveHint"):
        hints.append("destructive")
    if annotations.get("idempotentHint"):
        hints.append("idempotent (safe to retry)")
    if annotations.get("openWorldHint"):
        hints.append("talks to the outside world")
    return hints


def _type_of(schema: Any, root: Mapping[str, Any], depth: int) -> str:
    """A JSON schema as a short type name: `string`, `array of integer`, `object {a*: string}`, ..."""
    if not isinstance(schema, dict):
        return "any"
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = _resolve_ref(ref, root)
        return _type_of(target, root, depth + 1) if target is not None and depth < _SCHEMA_DEPTH else "object"
    if "const" in schema:
        return f"exactly {json.dumps(schema['const'])}"
    if isinstance(schema.get("enum"), list):
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return " or ".join(dict.fromkeys(_type_of(s, root, depth) for s in schema[key]))
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(_type_of({**schema, "type": k}, root, depth) for k in kind)
    if kind == "array":
        items = schema.get("items")
        return f"array of {_type_of(items, root, depth + 1)}" if isinstance(items, dict) else "array"
    if kind == "object" or (kind is None and isinstance(schema.get("properties"), dict)):
        props = schema.get("properties")
        if not isinstance(props, dict) or not props or depth >= _SCHEMA_DEPTH:
            return "object"
        required = set(schema.get("required") or [])
        inner = ", ".join(
            f"{k}{'*' if k in required else ''}: {_type_of(v, root, depth + 1)}" for k, v in props.items()
        )
        return f"object {{{inner}}}"
    if isinstance(kind, str):
        fmt = schema.get("format")
        return f"{kind}, {fmt}" if isinstance(fmt, str) else kind
    return "any"


def _resolve_ref(ref: str, root: Mapping[str, Any]) -> Any:
    if not ref.startswith("#/"):
        return None
    node: Any = root
    for part in ref[2:].split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return _clip(text, 80)
