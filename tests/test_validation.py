"""Plan validation: every rule of SPEC section 3, all problems in one call."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest

from mcp_planner.errors import Problem
from mcp_planner.plan.model import MAX_PARALLEL_CAP, ExecutionPlan, Step
from mcp_planner.plan.validation import parameter_warnings, qualify_tool_names, validate_plan

READ_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "path": {"type": "string"},
        "lines": {"type": "integer"},
        "options": {
            "type": "object",
            "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
        },
    },
    "required": ["path"],
    "additionalProperties": False,
}
CATALOG: dict[str, dict[str, Any] | None] = {
    "fs.read_file": READ_SCHEMA,
    "fs.write_file": None,
    "git.status": {"type": "object"},
    "git.read_file": None,
}


def plan_of(*steps: tuple[str, str, dict[str, Any]]) -> ExecutionPlan:
    plan = ExecutionPlan.new("a plan")
    for step_id, tool, params in steps:
        plan.add_step(tool, f"do {step_id}", params, step_id=step_id)
    return plan


def fields(problems: list[Problem]) -> list[tuple[str | None, str]]:
    return [(p.step_id, p.field) for p in problems]


def messages(problems: list[Problem], field: str) -> list[str]:
    return [p.message for p in problems if p.field == field]


def test_a_valid_plan_has_no_problems() -> None:
    plan = plan_of(
        ("read", "fs.read_file", {"path": "a.txt", "lines": 3}),
        ("write", "fs.write_file", {"text": "{{ steps.read.result }}"}),
    )

    assert validate_plan(plan, CATALOG) == []
    assert plan.validate(CATALOG) == []


def test_empty_description_and_no_steps_are_plan_problems() -> None:
    plan = ExecutionPlan.new("   ")

    problems = validate_plan(plan, None)

    assert fields(problems) == [(None, "description"), (None, "steps")]


def test_duplicate_step_ids_are_reported_once_per_id() -> None:
    plan = ExecutionPlan.new("dupes")
    plan.steps = [Step(id="a", index=i, tool_name="fs.write_file") for i in range(3)]

    problems = validate_plan(plan, CATALOG)

    assert fields(problems) == [("a", "id")]
    assert "'a'" in problems[0].message and "3 steps" in problems[0].message


def test_an_empty_step_id_is_reported_by_position() -> None:
    plan = ExecutionPlan.new("blank")
    plan.steps = [Step(id="ok", tool_name="t"), Step(id=" ", index=1, tool_name="t")]

    assert fields(validate_plan(plan, None)) == [(None, "steps[1].id")]


def test_unknown_dependency_is_reported_with_a_close_name() -> None:
    plan = plan_of(("build", "git.status", {}), ("test", "git.status", {}))
    plan.step("test").depends_on = ["biuld"]

    problems = validate_plan(plan, CATALOG)

    assert fields(problems) == [("test", "depends_on")]
    assert "'biuld'" in problems[0].message
    assert "did you mean 'build'" in problems[0].message


def test_a_step_depending_on_itself_is_reported() -> None:
    plan = plan_of(("a", "git.status", {}))
    plan.step("a").depends_on = ["a"]

    problems = validate_plan(plan, CATALOG)

    assert fields(problems) == [("a", "depends_on")]
    assert "itself" in problems[0].message


def test_a_cycle_is_named_step_by_step_in_order() -> None:
    plan = plan_of(
        ("a", "git.status", {}), ("b", "git.status", {}), ("c", "git.status", {}), ("d", "git.status", {})
    )
    plan.step("a").depends_on = ["b"]
    plan.step("b").depends_on = ["c"]
    plan.step("c").depends_on = ["a"]
    plan.step("d").depends_on = ["a"]  # depends on the cycle but is not part of it

    problems = validate_plan(plan, CATALOG)

    assert fields(problems) == [("a", "depends_on")]
    assert "a -> b -> c -> a" in problems[0].message


def test_every_separate_cycle_is_named() -> None:
    plan = plan_of(*[(x, "git.status", {}) for x in "abcd"])
    plan.step("a").depends_on = ["b"]
    plan.step("b").depends_on = ["a"]
    plan.step("c").depends_on = ["d"]
    plan.step("d").depends_on = ["c"]

    cycle_messages = messages(validate_plan(plan, CATALOG), "depends_on")

    assert len(cycle_messages) == 2
    assert "a -> b -> a" in cycle_messages[0]
    assert "c -> d -> c" in cycle_messages[1]


def test_ten_thousand_step_chain_is_checked_without_recursion() -> None:
    plan = ExecutionPlan.new("long chain")
    plan.steps = [
        Step(id=f"s{i}", index=i, tool_name="t", depends_on=[f"s{i - 1}"] if i else []) for i in range(10_000)
    ]
    assert validate_plan(plan, {"t": None}) == []

    plan.steps[0].depends_on = ["s9999"]
    problems = validate_plan(plan, {"t": None})

    assert fields(problems) == [("s0", "depends_on")]
    assert problems[0].message.startswith("dependency cycle: s0 -> s9999 -> s9998")
    assert "more" in problems[0].message  # a long cycle is abbreviated, not 10,000 names


def test_unknown_tool_gets_close_name_suggestions() -> None:
    plan = plan_of(("a", "fs.raed_file", {}), ("b", "stauts", {}))

    problems = validate_plan(plan, CATALOG)

    assert fields(problems) == [("a", "tool_name"), ("b", "tool_name")]
    assert "'fs.raed_file'" in problems[0].message and "'fs.read_file'" in problems[0].message
    assert "'git.status'" in problems[1].message


def test_a_bare_name_offered_by_several_servers_asks_for_the_qualified_name() -> None:
    plan = plan_of(("a", "read_file", {"path": "x"}))

    problems = validate_plan(plan, CATALOG)

    assert fields(problems) == [("a", "tool_name")]
    assert "'fs.read_file'" in problems[0].message and "'git.read_file'" in problems[0].message
    assert "qualified" in problems[0].message


def test_an_empty_catalog_says_no_tools_are_available() -> None:
    problems = validate_plan(plan_of(("a", "x.y", {})), {})

    assert "no downstream tools are available" in problems[0].message


def test_no_catalog_skips_the_tool_checks() -> None:
    plan = plan_of(("a", "no.such_tool", {"anything": 1}))

    assert validate_plan(plan, None) == []


def test_parameters_are_checked_against_the_input_schema_with_json_paths() -> None:
    plan = plan_of(("a", "fs.read_file", {"lines": "three", "mode": "r", "options": {"tags": ["x", 5]}}))

    problems = validate_plan(plan, CATALOG)

    assert fields(problems) == [
        ("a", "parameters"),  # missing required 'path'
        ("a", "parameters"),  # unknown property 'mode'
        ("a", "parameters.lines"),
        ("a", "parameters.options.tags[1]"),
    ]
    text = " | ".join(p.message for p in problems)
    assert "'path' is a required property" in text
    assert "'mode'" in text
    assert "'three' is not of type 'integer'" in text
    assert "5 is not of type 'string'" in text


def test_template_valued_parameters_are_not_type_checked_but_required_still_is() -> None:
    plan = plan_of(
        ("src", "git.status", {}),
        ("a", "fs.read_file", {"lines": "{{ steps.src.result.count }}", "options": "{{ steps.src.result }}"}),
        ("b", "fs.read_file", {"path": "p", "options": {"tags": ["ok", "{{ steps.src.result.tag }}"]}}),
    )

    problems = validate_plan(plan, CATALOG)

    assert [(p.step_id, p.field, p.message) for p in problems] == [
        ("a", "parameters", "'path' is a required property")
    ]


def test_a_template_that_could_satisfy_one_branch_of_any_of_is_deferred() -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
    }
    deferred = plan_of(("src", "t", {}), ("a", "t", {"n": "{{ steps.src.result }}"}))
    wrong = plan_of(("a", "t", {"n": "text"}))

    assert validate_plan(deferred, {"t": schema}) == []
    assert fields(validate_plan(wrong, {"t": schema})) == [("a", "parameters.n")]


def test_the_schema_dialect_follows_its_dollar_schema() -> None:
    pair_schema = {
        "type": "object",
        "properties": {"pair": {"items": [{"type": "string"}, {"type": "integer"}]}},
    }
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#", **pair_schema}
    plan = plan_of(("a", "t", {"pair": ["x", "y"]}))

    problems = validate_plan(plan, {"t": draft7})

    assert fields(problems) == [("a", "parameters.pair[1]")]


def test_an_invalid_tool_schema_is_logged_and_leaves_the_parameters_to_the_tool(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plan = plan_of(("a", "t", {"x": 1}))
    # A title of its own: the compiled validator is cached per process, and it logs on first compile.
    schema = {"title": f"broken-{uuid.uuid4()}", "type": 12, "properties": "nope"}

    with caplog.at_level(logging.WARNING, logger="mcp_planner.plan.validation"):
        assert validate_plan(plan, {"t": schema}) == []

    [record] = caplog.records
    assert "input schema is invalid" in record.getMessage()
    assert schema["title"] in record.getMessage()


def test_a_tool_schema_with_a_dangling_ref_is_logged_and_leaves_the_parameters_to_the_tool(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plan = plan_of(("a", "t", {"x": 1}))
    schema = {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}

    with caplog.at_level(logging.WARNING, logger="mcp_planner.plan.validation"):
        assert validate_plan(plan, {"t": schema}) == []

    [record] = caplog.records
    assert "'t'" in record.getMessage() and "does not resolve" in record.getMessage()


@pytest.mark.parametrize("name", ["max_retries", "retry_delay_ms", "timeout_ms"])
def test_negative_step_numbers_are_reported(name: str) -> None:
    plan = plan_of(("a", "t", {}))
    setattr(plan.step("a"), name, -1)

    problems = validate_plan(plan, None)

    assert fields(problems) == [("a", name)]
    assert "-1 is negative" in problems[0].message


@pytest.mark.parametrize("name", ["approval_timeout_ms", "step_timeout_ms", "total_timeout_ms"])
def test_negative_option_timeouts_are_reported(name: str) -> None:
    plan = plan_of(("a", "t", {}))
    setattr(plan.options, name, -5)

    assert fields(validate_plan(plan, None)) == [(None, f"options.{name}")]


def test_retry_backoff_below_one_and_too_many_parallel_steps_are_reported() -> None:
    plan = plan_of(("a", "t", {}))
    plan.options.retry_backoff = 0.5
    plan.options.max_parallel_steps = MAX_PARALLEL_CAP + 1

    problems = validate_plan(plan, None)

    assert fields(problems) == [(None, "options.retry_backoff"), (None, "options.max_parallel_steps")]
    assert str(MAX_PARALLEL_CAP) in problems[1].message


def test_boundary_numbers_are_accepted() -> None:
    plan = plan_of(("a", "t", {}))
    plan.options.retry_backoff = 1.0
    plan.options.max_parallel_steps = MAX_PARALLEL_CAP
    plan.step("a").timeout_ms = 0
    plan.step("a").retry_delay_ms = 0
    assert validate_plan(plan, None) == []

    plan.options.max_parallel_steps = 0  # means the default
    assert validate_plan(plan, None) == []


def test_template_syntax_errors_are_reported_on_the_parameter() -> None:
    plan = plan_of(("a", "t", {"q": {"deep": ["ok", "{{ steps.x.result"]}}))

    problems = validate_plan(plan, None)

    assert fields(problems) == [("a", "parameters.q.deep[1]")]
    assert "syntax error" in problems[0].message


def test_a_template_referring_to_a_missing_step_is_reported() -> None:
    plan = plan_of(("fetch", "t", {}))
    plan.add_step("t", "use", {"v": "{{ steps.fetsh.result }}"}, step_id="use")

    problems = validate_plan(plan, None)

    assert ("use", "parameters.v") in fields(problems)
    template_problem = next(p for p in problems if p.field == "parameters.v")
    assert "'fetsh'" in template_problem.message and "did you mean 'fetch'" in template_problem.message


def test_a_dashed_step_id_written_as_an_attribute_gets_a_hint() -> None:
    plan = plan_of(("step-1", "t", {}))
    plan.add_step("t", "use", {"v": "{{ steps.step-1.result }}"}, step_id="use")

    problems = [p for p in validate_plan(plan, None) if p.field == "parameters.v"]

    assert len(problems) == 1
    assert "steps['step-1" in problems[0].message


def test_a_template_using_a_step_it_does_not_depend_on_is_reported() -> None:
    plan = plan_of(("a", "t", {}), ("b", "t", {"v": "{{ steps['a'].text }} and {{ steps.a.json.k }}"}))
    plan.step("b").depends_on = []

    problems = validate_plan(plan, None)

    assert fields(problems) == [("b", "parameters.v")]
    assert "add 'a' to depends_on" in problems[0].message


def test_a_template_using_an_unknown_name_is_reported() -> None:
    plan = plan_of(("a", "t", {"v": "{{ secrets.token }}", "ok": "{{ range(3) | list }}"}))

    problems = validate_plan(plan, None)

    assert fields(problems) == [("a", "parameters.v")]
    assert "'secrets'" in problems[0].message


def test_every_problem_is_reported_in_one_call() -> None:
    plan = ExecutionPlan.new("")
    plan.options.total_timeout_ms = -1
    plan.add_step("fs.read_fil", "typo", {"path": 1}, step_id="a")
    plan.add_step("fs.read_file", "bad params", {"path": 1}, step_id="b")
    plan.add_step("git.status", "bad deps", {"x": "{{ steps.zz.result"}, step_id="c")
    plan.step("c").depends_on = ["c", "missing", "d"]
    plan.add_step("git.status", "cycle", {}, step_id="d")
    plan.step("d").depends_on = ["c"]
    plan.step("d").max_retries = -2

    problems = validate_plan(plan, CATALOG)

    assert set(fields(problems)) == {
        (None, "description"),
        (None, "options.total_timeout_ms"),
        ("a", "tool_name"),
        ("b", "parameters.path"),
        ("c", "depends_on"),
        ("c", "parameters.x"),
        ("d", "max_retries"),
    }
    assert len(messages(problems, "depends_on")) == 3  # self, missing, and the cycle c -> d -> c


def test_bare_tool_names_are_qualified_when_exactly_one_server_offers_them() -> None:
    names = ["fs.read_file", "git.read_file", "git.status", "echo", "local.echo"]
    plan = plan_of(
        ("a", "status", {}),  # one server: qualified
        ("b", "read_file", {}),  # two servers: left for validation to report
        ("c", "echo", {}),  # an exact match wins
        ("d", "nothing", {}),  # unknown: left alone
        ("e", "git.status", {}),  # already qualified
    )

    qualify_tool_names(plan, names)

    assert [s.tool_name for s in plan.steps] == ["git.status", "read_file", "echo", "nothing", "git.status"]


def test_a_bare_tool_name_containing_a_dot_is_qualified_too() -> None:
    plan = plan_of(("a", "read.v2", {}))

    qualify_tool_names(plan, ["fs.read.v2", "fs.read"])

    assert plan.steps[0].tool_name == "fs.read.v2"


def test_parameters_a_schema_does_not_declare_are_warned_about_with_a_suggestion() -> None:
    plan = ExecutionPlan.new("list files")
    plan.add_step("fs.list", "", {"path": "/tmp", "recursve": True}, step_id="ls")
    plan.add_step("fs.strict", "", {"path": "/tmp", "extra": 1}, step_id="strict")
    plan.add_step("fs.unknown", "", {"anything": 1}, step_id="free")
    declared = {"path": {"type": "string"}, "recursive": {"type": "boolean"}}
    catalog = {
        "fs.list": {"type": "object", "properties": declared},
        "fs.strict": {"type": "object", "properties": {"path": {}}, "additionalProperties": False},
        "fs.unknown": None,
    }

    warnings = parameter_warnings(plan, catalog)

    assert [(w.step_id, w.field) for w in warnings] == [("ls", "parameters.recursve")]
    assert "does not declare a parameter 'recursve'" in warnings[0].message
    assert "did you mean 'recursive'" in warnings[0].message
    assert not [p for p in validate_plan(plan, catalog) if p.step_id == "ls"]  # a warning, not a problem
