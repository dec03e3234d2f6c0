"""The generator with a scripted LLM: prompts, parsing, validation, repair, options."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_planner import ExecutionOptions, Generator, PlanRequest
from mcp_planner.engine.tools import ToolInfo
from mcp_planner.errors import GenerationError
from mcp_planner.generation.generator import (
    SYSTEM_PROMPT,
    LLMProvider,
    extract_json_object,
    render_planning_prompt,
    render_repair_prompt,
)
from mcp_planner.plan.model import PlanStatus

pytestmark = pytest.mark.anyio


def _tools() -> dict[str, ToolInfo]:
    return {
        "web.fetch": ToolInfo(
            name="web.fetch",
            description="Fetch a URL and return its body.",
            input_schema={
                "type": "object",
                "properties": {
                    "url": {"type": "string", "description": "what to fetch"},
                    "timeout": {"type": "integer", "default": 10},
                },
                "required": ["url"],
                "additionalProperties": False,
            },
            annotations={"readOnlyHint": True, "openWorldHint": True},
            server="web",
        ),
        "files.write": ToolInfo(
            name="files.write",
            description="Write a file.",
            input_schema={
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "content": {"type": "string"},
                    "mode": {"enum": ["overwrite", "append"]},
                },
                "required": ["path", "content"],
            },
            annotations={"destructiveHint": True},
            server="files",
        ),
        "files.read": ToolInfo(
            name="files.read",
            description="Read a file.",
            input_schema={
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "lines": {"type": "array", "items": {"type": "integer"}},
                },
                "required": ["path"],
            },
            server="files",
        ),
    }


GOOD_PLAN: dict[str, Any] = {
    "description": "Fetch the page and save it",
    "steps": [
        {
            "id": "fetch",
            "tool_name": "fetch",  # bare name: qualified to web.fetch
            "description": "fetch the page",
            "parameters": {"url": "https://example.com"},
            "max_retries": 2,
        },
        {
            "id": "save",
            "tool_name": "files.write",
            "description": "save it",
            "parameters": {"path": "/tmp/page.html", "content": "{{ steps.fetch.text }}"},
            "depends_on": ["fetch"],
        },
    ],
    "options": {"allow_parallel": True},
}

BROKEN_PLAN: dict[str, Any] = {
    "description": "Broken",
    "steps": [
        {"id": "a", "tool_name": "web.fetchh", "parameters": {"url": "x"}, "depends_on": ["c"]},
        {"id": "b", "tool_name": "files.write", "parameters": {"path": "/tmp/x"}, "depends_on": ["a"]},
        {"id": "c", "tool_name": "files.read", "parameters": {"path": "/tmp/y"}, "depends_on": ["b"]},
    ],
}


class ScriptedLLM:
    """Answers from a script, recording every conversation it was asked."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []

    async def complete(self, system: str, messages: list[tuple[str, str]]) -> str:
        self.calls.append((system, list(messages)))
        if not self.answers:
            raise AssertionError("the LLM was asked more often than scripted")
        return self.answers.pop(0)


def test_scripted_llm_satisfies_the_provider_protocol() -> None:
    assert isinstance(ScriptedLLM(), LLMProvider)


# -- prompts ----------------------------------------------------------------------------------------------


def test_planning_prompt_lists_the_catalog_sorted_with_required_parameters() -> None:
    prompt = render_planning_prompt(_tools(), "Save example.com")
    positions = [prompt.index(f"## {name}") for name in ("files.read", "files.write", "web.fetch")]
    assert positions == sorted(positions)
    assert "- url* (string): what to fetch" in prompt
    assert "- timeout (integer) [default: 10]" in prompt
    assert "- path* (string)" in prompt
    assert "- content* (string)" in prompt
    assert '- mode (one of "overwrite", "append")' in prompt
    assert "- lines (array of integer)" in prompt
    assert "Parameters (no others allowed):" in prompt
    assert "Hints: read-only" in prompt
    assert "Hints: destructive" in prompt


def test_planning_prompt_is_deterministic_whatever_the_catalog_order() -> None:
    tools = _tools()
    reversed_tools = dict(reversed(list(tools.items())))
    first = render_planning_prompt(tools, "task", "ctx", "rules")
    assert first == render_planning_prompt(reversed_tools, "task", "ctx", "rules")
    assert first == render_planning_prompt(tools, "task", "ctx", "rules")


def test_planning_prompt_holds_task_context_constraints_and_the_output_format() -> None:
    prompt = render_planning_prompt(_tools(), "Save example.com", "We run nightly", "Never delete files")
    assert "# Task\nSave example.com" in prompt
    assert "# Context\nWe run nightly" in prompt
    assert "# Constraints\n- Never delete files\n\n" in prompt
    for needle in (
        '"depends_on"',
        '"tool_name"',
        '"max_retries"',
        '"options"',
        "{{ steps.fetch_issues.result }}",
    ):
        assert needle in prompt
    assert "`text`" in prompt and "`json`" in prompt and "`result`" in prompt
    assert "call the `create_plan` tool" in prompt
    sampling = render_planning_prompt(_tools(), "Save example.com", for_agent=False)
    assert "create_plan" not in sampling and "nothing else" in sampling


def test_planning_prompt_lists_each_constraint_and_drops_blank_ones() -> None:
    prompt = render_planning_prompt(
        _tools(), "task", None, ["Never delete files", " ", "Ask first\nthen act"]
    )
    assert "# Constraints\n- Never delete files\n- Ask first\n  then act\n\n# Tools" in prompt


def test_planning_prompt_without_context_has_no_empty_sections() -> None:
    for constraints in (None, [], "", ["  "]):
        prompt = render_planning_prompt(_tools(), "task", None, constraints)
        assert "# Context" not in prompt and "# Constraints" not in prompt


def test_tool_without_a_schema_is_listed_as_undeclared() -> None:
    prompt = render_planning_prompt({"echo": ToolInfo(name="echo")}, "task")
    assert "## echo\nParameters: not declared" in prompt


def test_nested_and_referenced_schemas_are_described() -> None:
    schema = {
        "type": "object",
        "properties": {
            "cfg": {"$ref": "#/$defs/Cfg"},
            "tag": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["cfg"],
        "$defs": {
            "Cfg": {"type": "object", "properties": {"depth": {"type": "integer"}}, "required": ["depth"]}
        },
    }
    prompt = render_planning_prompt({"x.y": ToolInfo(name="x.y", input_schema=schema)}, "task")
    assert "- cfg* (object {depth*: integer})" in prompt
    assert "- tag (string or null)" in prompt


def test_repair_prompt_lists_every_problem_and_the_previous_answer() -> None:
    from mcp_planner.errors import Problem

    text = render_repair_prompt(
        [Problem("a", "tool_name", "unknown tool 'x'"), Problem(None, "description", "empty")], '{"bad": 1}'
    )
    assert "2 problems" in text
    assert "- step 'a', tool_name: unknown tool 'x'" in text
    assert "- plan, description: empty" in text
    assert '{"bad": 1}' in text


# -- parsing ----------------------------------------------------------------------------------------------


def test_json_in_a_code_fence_with_prose_around_it_is_found() -> None:
    text = f"Sure! Here is the plan:\n```json\n{json.dumps(GOOD_PLAN, indent=2)}\n```\nLet me know."
    assert extract_json_object(text) == GOOD_PLAN


def test_json_in_prose_without_a_fence_is_found() -> None:
    text = f"I'd do it like this {{roughly}}: {json.dumps(GOOD_PLAN)} -- hope that helps {{}}"
    assert extract_json_object(text) == GOOD_PLAN


def test_the_object_with_steps_wins_over_other_objects() -> None:
    text = f'Format: {{"a": 1, "b": {{"c": 2, "d": 3}}}}\n{json.dumps(GOOD_PLAN)}'
    assert extract_json_object(text) == GOOD_PLAN


def test_a_plan_wrapped_in_a_plan_key_is_unwrapped() -> None:
    assert extract_json_object(json.dumps({"plan": GOOD_PLAN})) == GOOD_PLAN


def test_an_answer_without_json_is_refused_with_advice() -> None:
    with pytest.raises(ValueError, match="no complete JSON object"):
        extract_json_object("I cannot do that.")
    with pytest.raises(ValueError, match="cut off"):
        extract_json_object('{"description": "x", "steps": [')


# -- generation -------------------------------------------------------------------------------------------


async def test_good_answer_becomes_a_validated_submitted_plan() -> None:
    llm = ScriptedLLM(json.dumps(GOOD_PLAN))
    plan = await Generator(llm, _tools()).generate(PlanRequest(task="Save example.com"))
    assert [s.id for s in plan.steps] == ["fetch", "save"]
    assert plan.steps[0].tool_name == "web.fetch"
    assert plan.steps[0].max_retries == 2
    assert plan.steps[1].depends_on == ["fetch"]
    assert plan.options.allow_parallel is True
    assert plan.status == PlanStatus.PENDING_APPROVAL
    assert plan.metadata["generated"] is True
    assert plan.metadata["generation"]["task"] == "Save example.com"
    assert plan.metadata["generation"]["attempts"] == 1
    assert llm.calls[0][0] == SYSTEM_PROMPT
    assert llm.calls[0][1][0][0] == "user" and "## web.fetch" in llm.calls[0][1][0][1]


@pytest.mark.parametrize(
    ("constraints", "rules"),
    [(["no deletes", "ask first"], ["no deletes", "ask first"]), ("no deletes", ["no deletes"])],
    ids=["list", "string"],
)
async def test_constraints_as_a_list_or_one_string_reach_the_prompt_and_the_metadata(
    constraints: list[str] | str, rules: list[str]
) -> None:
    llm = ScriptedLLM(json.dumps(GOOD_PLAN))
    plan = await Generator(llm, _tools()).generate(PlanRequest("Save example.com", None, constraints))
    prompt = llm.calls[0][1][0][1]
    assert "# Constraints\n" + "".join(f"- {rule}\n" for rule in rules) + "\n" in prompt
    assert plan.metadata["generation"]["constraints"] == rules


async def test_invalid_answer_is_repaired_with_every_problem_sent_back() -> None:
    broken = json.dumps(BROKEN_PLAN)
    llm = ScriptedLLM(broken, json.dumps(GOOD_PLAN))
    plan = await Generator(llm, _tools()).generate(PlanRequest(task="t"))
    assert plan.metadata["generation"]["attempts"] == 2
    roles = [role for role, _ in llm.calls[1][1]]
    assert roles == ["user", "assistant", "user"]
    assert llm.calls[1][1][1][1] == broken
    repair = llm.calls[1][1][2][1]
    assert "unknown tool 'web.fetchh'" in repair and "did you mean 'web.fetch'" in repair
    assert "dependency cycle: a -> c -> b -> a" in repair
    assert "'content' is a required property" in repair
    assert broken in repair


async def test_a_plan_that_never_validates_fails_with_the_last_problems() -> None:
    llm = ScriptedLLM(*[json.dumps(BROKEN_PLAN)] * 4)
    with pytest.raises(GenerationError) as caught:
        await Generator(llm, _tools()).generate(PlanRequest(task="t"))
    assert len(llm.calls) == 4  # the first answer and 3 repairs
    assert len(llm.calls[-1][1]) == 7  # the conversation grew by an answer and a repair each round
    message = str(caught.value)
    assert "4 attempts (the first answer and 3 repairs)" in message and "create_plan" in message
    assert "dependency cycle" in message and "web.fetchh" in message
    assert any(p.field == "tool_name" for p in caught.value.problems)


async def test_the_number_of_repair_rounds_is_configurable() -> None:
    llm = ScriptedLLM("no plan", "still no plan")
    with pytest.raises(GenerationError, match="2 attempt"):
        await Generator(llm, _tools(), max_repairs=1).generate(PlanRequest(task="t"))


async def test_structural_errors_become_problems_not_pydantic_text() -> None:
    bad = {"description": "x", "steps": [{"id": "a", "parameters": {}, "retries": 3}], "extra": 1}
    llm = ScriptedLLM(json.dumps(bad), json.dumps(GOOD_PLAN))
    await Generator(llm, _tools()).generate(PlanRequest(task="t"))
    repair = llm.calls[1][1][2][1]
    assert "- step 'a', tool_name: required field is missing" in repair
    assert "- step 'a', retries: unknown field" in repair
    assert "- plan, extra: unknown field" in repair
    assert "pydantic" not in repair


async def test_prose_only_answer_is_sent_back_as_a_problem() -> None:
    llm = ScriptedLLM("I would fetch the page and then save it.", f"```\n{json.dumps(GOOD_PLAN)}\n```")
    plan = await Generator(llm, _tools()).generate(PlanRequest(task="t"))
    assert len(plan.steps) == 2
    assert "answer: the answer holds no complete JSON object" in llm.calls[1][1][2][1]


async def test_requested_options_override_the_llms_before_the_status_is_decided() -> None:
    proposed = {**GOOD_PLAN, "options": {"allow_parallel": True, "max_parallel_steps": 5}}
    llm = ScriptedLLM(json.dumps(proposed))
    request = PlanRequest(task="t", options={"require_approval": False, "max_parallel_steps": 2})
    plan = await Generator(llm, _tools()).generate(request)
    assert plan.options.max_parallel_steps == 2
    assert plan.options.allow_parallel is True  # not requested: the LLM's proposal stands
    assert plan.status == PlanStatus.APPROVED and plan.approved_by == "auto"
    assert plan.is_approved()


async def test_requested_options_as_a_model_apply_only_the_fields_set() -> None:
    llm = ScriptedLLM(json.dumps(GOOD_PLAN))
    plan = await Generator(llm, _tools()).generate(
        PlanRequest(task="t", options=ExecutionOptions(auto_approve=True))
    )
    assert plan.options.auto_approve is True
    assert plan.options.allow_parallel is True
    assert plan.status == PlanStatus.APPROVED


async def test_the_llm_cannot_approve_its_own_plan() -> None:
    sneaky = {**GOOD_PLAN, "options": {"require_approval": False, "auto_approve": True}}
    plan = await Generator(ScriptedLLM(json.dumps(sneaky)), _tools()).generate(PlanRequest(task="t"))
    assert plan.options.require_approval is True and plan.options.auto_approve is False
    assert plan.status == PlanStatus.PENDING_APPROVAL


async def test_invalid_requested_options_fail_before_asking_the_llm() -> None:
    llm = ScriptedLLM()
    with pytest.raises(GenerationError, match="max_parallel_steps"):
        await Generator(llm, _tools()).generate(PlanRequest(task="t", options={"max_parallel_steps": 1000}))
    assert llm.calls == []


async def test_an_empty_catalog_fails_with_advice() -> None:
    with pytest.raises(GenerationError, match="list_tools"):
        await Generator(ScriptedLLM(), {}).generate(PlanRequest(task="t"))


def test_a_blank_task_is_refused() -> None:
    with pytest.raises(ValueError, match="the task is empty"):
        PlanRequest(task="  ")
    with pytest.raises(ValueError):
        PlanRequest(task="t", options={"no_such_option": 1})


_PROSE = st.text(
    alphabet=st.characters(blacklist_characters="{}`", blacklist_categories=("Cs",)), max_size=200
)
_JSON_LEAF = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
_JSON = st.recursive(
    _JSON_LEAF,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    before=_PROSE,
    after=_PROSE,
    steps=st.lists(st.dictionaries(st.text(max_size=8), _JSON, max_size=4), max_size=4),
    fenced=st.booleans(),
)
def test_any_plan_object_survives_prose_and_fences_around_it(
    before: str, after: str, steps: list[dict[str, Any]], fenced: bool
) -> None:
    plan = {"description": "d", "steps": steps}
    body = json.dumps(plan, indent=2 if fenced else None)
    text = f"{before}\n```json\n{body}\n```\n{after}" if fenced else f"{before} {body} {after}"
    assert extract_json_object(text) == plan


def test_a_plan_request_takes_its_fields_in_the_seed_order() -> None:
    request = PlanRequest("ship it", "a repo", "no deploys", {"allow_parallel": True})

    assert (request.task, request.context, request.constraints) == ("ship it", "a repo", ["no deploys"])
    assert request.options is not None and request.options.model_fields_set == {"allow_parallel"}
