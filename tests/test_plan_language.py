"""The plan language in the engine: for_each, when, fail_if, inputs and outputs (SPEC section 12).

Plans run through the library `Executor` with in-process tools and a real SQLite file; the same plans
through the MCP server and the CLI are in test_language_server.py and test_language_cli.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_planner import ExecutionPlan, Executor, PlanStatus, PlanStore, StepStatus
from mcp_planner.errors import StepError
from mcp_planner.plan.model import INTERRUPTED_ERROR, PlanSpec

pytestmark = pytest.mark.anyio


def plan_of(spec: dict[str, Any], values: dict[str, Any] | None = None) -> ExecutionPlan:
    data = {"description": "language test", "options": {"require_approval": False}, **spec}
    return ExecutionPlan.from_spec(PlanSpec.model_validate(data), values)


class Tools:
    """In-process tools that record their calls: `echo`, `upper`, `flaky` (fails per key N times), `text`
    (returns a text given), `boom` (always fails)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.failures: dict[Any, int] = {}
        self.active = 0
        self.max_active = 0

    def mapping(self) -> dict[str, Any]:
        return {
            "echo": self.echo,
            "upper": self.upper,
            "flaky": self.flaky,
            "text": self.text,
            "boom": self.boom,
        }

    async def _enter(self, name: str, params: dict[str, Any]) -> None:
        self.calls.append((name, params))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        await anyio.sleep(0.01)
        self.active -= 1

    async def echo(self, params: dict[str, Any]) -> Any:
        await self._enter("echo", params)
        return params

    async def upper(self, params: dict[str, Any]) -> Any:
        await self._enter("upper", params)
        return {"text": str(params["text"]).upper()}

    async def flaky(self, params: dict[str, Any]) -> Any:
        await self._enter("flaky", params)
        key = params.get("key")
        if self.failures.get(key, 0) > 0:
            self.failures[key] -= 1
            raise StepError(f"flaky {key} failed")
        return {"key": key}

    async def text(self, params: dict[str, Any]) -> Any:
        await self._enter("text", params)
        return str(params["text"])

    async def boom(self, params: dict[str, Any]) -> Any:
        await self._enter("boom", params)
        raise StepError("boom")

    def called(self, name: str) -> list[dict[str, Any]]:
        return [p for n, p in self.calls if n == name]


async def run(plan: ExecutionPlan, tools: Tools, db: Path | None = None) -> ExecutionPlan:
    if db is None:
        await Executor(tools.mapping()).execute(plan)
        return plan
    async with PlanStore.open(db) as store:
        await Executor(tools.mapping(), store=store).execute(plan)
        return await store.get_plan(plan.id)


# -- for_each -----------------------------------------------------------------------------------------------


async def test_for_each_calls_the_tool_once_per_item_and_returns_the_results_in_item_order(
    tmp_path: Path,
) -> None:
    tools = Tools()
    plan = plan_of(
        {
            "options": {"require_approval": False, "allow_parallel": True, "max_parallel_steps": 4},
            "steps": [
                {"id": "list", "tool_name": "echo", "parameters": {"names": ["a", "b", "c", "d", "e"]}},
                {
                    "id": "shout",
                    "tool_name": "upper",
                    "for_each": "{{ steps.list.result.names }}",
                    "parameters": {"text": "{{ item }}{{ item_index }}"},
                },
            ],
        }
    )
    assert plan.step("shout").depends_on == ["list"]  # the for_each reference is a dependency

    stored = await run(plan, tools, tmp_path / "plans.db")

    assert stored.status == PlanStatus.COMPLETED
    shout = stored.step("shout")
    assert shout.result is not None
    assert shout.result.structured == [{"text": t} for t in ("A0", "B1", "C2", "D3", "E4")]
    assert shout.items is not None and [i.status for i in shout.items] == [StepStatus.COMPLETED] * 5
    assert [i.value for i in shout.items] == ["a", "b", "c", "d", "e"]
    assert tools.max_active > 1  # items share the plan's slots


async def test_max_parallel_items_caps_one_steps_share_of_the_slots() -> None:
    tools = Tools()
    plan = plan_of(
        {
            "options": {"require_approval": False, "allow_parallel": True, "max_parallel_steps": 8},
            "steps": [
                {
                    "id": "each",
                    "tool_name": "echo",
                    "for_each": list(range(12)),
                    "max_parallel_items": 2,
                    "parameters": {"n": "{{ item }}"},
                }
            ],
        }
    )
    await run(plan, tools)
    assert plan.status == PlanStatus.COMPLETED
    assert tools.max_active == 2
    assert plan.step("each").result.structured == [{"n": n} for n in range(12)]  # type: ignore[union-attr]


async def test_an_empty_list_completes_the_step_with_no_call() -> None:
    tools = Tools()
    plan = plan_of({"steps": [{"id": "each", "tool_name": "echo", "for_each": [], "parameters": {}}]})
    await run(plan, tools)
    assert plan.status == PlanStatus.COMPLETED
    assert plan.step("each").result.structured == []  # type: ignore[union-attr]
    assert tools.calls == []


async def test_a_failed_item_fails_the_step_after_its_own_retries_naming_the_item() -> None:
    tools = Tools()
    tools.failures = {"b": 99, "c": 1}
    plan = plan_of(
        {
            "steps": [
                {
                    "id": "each",
                    "tool_name": "flaky",
                    "for_each": ["a", "b", "c"],
                    "max_retries": 1,
                    "retry_delay_ms": 0,
                    "parameters": {"key": "{{ item }}"},
                },
                {"id": "after", "tool_name": "echo", "parameters": {"x": "{{ steps.each.result }}"}},
            ]
        }
    )
    await run(plan, tools)

    each = plan.step("each")
    assert each.status == StepStatus.FAILED
    assert each.error is not None and each.error.startswith(
        '1 of 3 items failed; item 1 ("b"): flaky b failed'
    )
    assert each.items is not None
    assert [i.status for i in each.items] == [StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.COMPLETED]
    assert [i.retry_count for i in each.items] == [0, 1, 1]  # c's retry succeeded
    assert plan.step("after").status == StepStatus.SKIPPED
    assert plan.status == PlanStatus.FAILED


async def test_allow_item_failures_completes_the_step_listing_the_failed_items() -> None:
    tools = Tools()
    tools.failures = {"b": 99}
    plan = plan_of(
        {
            "steps": [
                {
                    "id": "each",
                    "tool_name": "flaky",
                    "for_each": ["a", "b", "c"],
                    "allow_item_failures": True,
                    "parameters": {"key": "{{ item }}"},
                }
            ]
        }
    )
    await run(plan, tools)
    each = plan.step("each")
    assert each.status == StepStatus.COMPLETED and plan.status == PlanStatus.COMPLETED
    assert each.result is not None and each.result.structured == [{"key": "a"}, None, {"key": "c"}]
    assert each.error == "1 of 3 items failed (allowed): items 1"


async def test_a_resume_calls_only_the_items_that_did_not_complete(tmp_path: Path) -> None:
    tools = Tools()
    tools.failures = {1: 1, 3: 1}
    plan = plan_of(
        {
            "steps": [
                {
                    "id": "each",
                    "tool_name": "flaky",
                    "for_each": list(range(5)),
                    "parameters": {"key": "{{ item }}"},
                }
            ]
        }
    )
    db = tmp_path / "plans.db"
    stored = await run(plan, tools, db)
    assert stored.status == PlanStatus.FAILED
    tools.calls.clear()

    async with PlanStore.open(db) as store:
        again = await store.get_plan(plan.id)
        await Executor(tools.mapping(), store=store).resume(again)
        stored = await store.get_plan(plan.id)

    assert sorted(p["key"] for p in tools.called("flaky")) == [1, 3]
    assert stored.status == PlanStatus.COMPLETED
    assert stored.step("each").result.structured == [{"key": k} for k in range(5)]  # type: ignore[union-attr]


async def test_an_item_interrupted_mid_call_is_not_sent_again_unless_safe_or_asked(tmp_path: Path) -> None:
    """A process killed mid-item leaves it `running` in the store: its outcome is unknown (at most once)."""
    tools = Tools()
    db = tmp_path / "plans.db"
    plan = plan_of(
        {
            "steps": [
                {
                    "id": "each",
                    "tool_name": "echo",
                    "for_each": ["a", "b", "c"],
                    "parameters": {"v": "{{ item }}"},
                }
            ]
        }
    )
    stored = await run(plan, tools, db)
    # What a kill during item 1's call leaves behind: the step and that item running, item 2 not started.
    each = stored.step("each")
    assert each.items is not None
    each.status = StepStatus.RUNNING
    each.items[1].status = StepStatus.RUNNING
    each.items[1].result = None
    each.items[2].status = StepStatus.PENDING
    each.items[2].result = None
    stored.status = PlanStatus.EXECUTING
    async with PlanStore.open(db) as store:
        await store.save_plan(stored)
        tools.calls.clear()
        summary = await Executor(tools.mapping(), store=store).resume(await store.get_plan(plan.id))
        assert [p["v"] for p in tools.called("echo")] == ["c"]  # the pending item only
        after = await store.get_plan(plan.id)
        assert after.step("each").items[1].error == INTERRUPTED_ERROR  # type: ignore[index]
        assert summary.status == PlanStatus.FAILED and "rerun_interrupted" in (summary.error or "")

        tools.calls.clear()
        await Executor(tools.mapping(), store=store).resume(after, rerun_interrupted=True)
        assert [p["v"] for p in tools.called("echo")] == ["b"]
        final = await store.get_plan(plan.id)
    assert final.status == PlanStatus.COMPLETED
    assert final.step("each").result.structured == [{"v": v} for v in "abc"]  # type: ignore[union-attr]


async def test_a_for_each_that_does_not_give_a_list_fails_the_step_clearly() -> None:
    tools = Tools()
    plan = plan_of(
        {
            "steps": [
                {"id": "one", "tool_name": "echo", "parameters": {"n": 1}},
                {"id": "each", "tool_name": "echo", "for_each": "{{ steps.one.result.n }}", "max_retries": 3},
            ]
        }
    )
    await run(plan, tools)
    each = plan.step("each")
    assert each.status == StepStatus.FAILED
    assert each.error == "for_each: for_each gave int, not a list"
    assert each.retry_count == 0


async def test_a_for_each_template_over_the_limits_fails_its_step_and_the_loop_keeps_answering() -> None:
    tools = Tools()
    plan = plan_of({"steps": [{"id": "each", "tool_name": "echo", "for_each": "{{ range(10**6) | list }}"}]})
    await run(plan, tools)
    each = plan.step("each")
    assert each.status == StepStatus.FAILED and each.error is not None and "for_each" in each.error
    assert tools.calls == []


# -- when ---------------------------------------------------------------------------------------------------


async def test_a_false_condition_skips_the_step_and_its_dependents_without_failing_the_plan() -> None:
    tools = Tools()
    plan = plan_of(
        {
            "steps": [
                {"id": "check", "tool_name": "echo", "parameters": {"changed": False}},
                {"id": "deploy", "tool_name": "echo", "when": "steps.check.result.changed", "parameters": {}},
                {"id": "notify", "tool_name": "echo", "parameters": {"d": "{{ steps.deploy.result }}"}},
                {"id": "always", "tool_name": "echo", "depends_on": ["check"], "parameters": {}},
            ]
        }
    )
    assert plan.step("deploy").depends_on == ["check"]
    await run(plan, tools)
    assert plan.step("deploy").status == StepStatus.SKIPPED
    assert plan.step("deploy").error == "condition false: steps.check.result.changed"
    assert plan.step("notify").status == StepStatus.SKIPPED
    assert plan.step("notify").error == "dependency deploy was skipped by its condition"
    assert plan.step("always").status == StepStatus.COMPLETED
    assert plan.status == PlanStatus.COMPLETED


async def test_a_true_condition_runs_the_step() -> None:
    tools = Tools()
    plan = plan_of(
        {
            "steps": [
                {"id": "check", "tool_name": "echo", "parameters": {"changed": True}},
                {
                    "id": "deploy",
                    "tool_name": "echo",
                    "when": "{{ steps.check.result.changed }}",
                    "parameters": {},
                },
            ]
        }
    )
    await run(plan, tools)
    assert plan.step("deploy").status == StepStatus.COMPLETED and plan.status == PlanStatus.COMPLETED


async def test_an_on_failure_step_runs_after_a_failure_even_when_the_plan_stops_on_errors() -> None:
    tools = Tools()
    plan = plan_of(
        {
            "steps": [
                {"id": "deploy", "tool_name": "boom"},
                {"id": "next", "tool_name": "echo", "depends_on": ["deploy"]},
                {"id": "unrelated", "tool_name": "echo", "depends_on": ["next"]},
                {
                    "id": "rollback",
                    "tool_name": "echo",
                    "when": "steps.deploy.status == 'failed'",
                    "parameters": {"why": "{{ steps.deploy.error }}"},
                },
                {"id": "celebrate", "tool_name": "echo", "when": "steps.deploy.status == 'completed'"},
            ]
        }
    )
    await run(plan, tools)
    assert plan.step("rollback").status == StepStatus.COMPLETED
    assert plan.step("rollback").result.structured == {"why": "boom"}  # type: ignore[union-attr]
    assert plan.step("celebrate").status == StepStatus.SKIPPED
    assert plan.step("next").status == StepStatus.SKIPPED
    assert plan.status == PlanStatus.FAILED  # the failure still decides the plan


async def test_a_condition_that_cannot_be_evaluated_fails_the_step_without_retries() -> None:
    tools = Tools()
    plan = plan_of(
        {
            "steps": [
                {"id": "a", "tool_name": "echo", "parameters": {"x": 1}},
                {"id": "b", "tool_name": "echo", "when": "steps.a.result.nope > 1", "max_retries": 2},
            ]
        }
    )
    await run(plan, tools)
    b = plan.step("b")
    assert b.status == StepStatus.FAILED and b.error is not None and b.error.startswith("when: ")
    assert "no key 'nope'" in b.error and b.retry_count == 0


# -- fail_if ------------------------------------------------------------------------------------------------


async def test_fail_if_fails_an_attempt_whose_text_reports_an_error_and_it_is_retried() -> None:
    tools = Tools()
    plan = plan_of(
        {
            "steps": [
                {
                    "id": "t",
                    "tool_name": "text",
                    "parameters": {"text": "ERROR: disk full"},
                    "fail_if": "'ERROR' in result.text",
                    "max_retries": 2,
                    "retry_delay_ms": 0,
                }
            ]
        }
    )
    await run(plan, tools)
    t = plan.step("t")
    assert t.status == StepStatus.FAILED
    assert t.error == "check failed: 'ERROR' in result.text"
    assert t.retry_count == 2 and len(tools.called("text")) == 3


async def test_fail_if_sees_structured_content_and_passes_a_good_result() -> None:
    tools = Tools()
    plan = plan_of(
        {
            "steps": [
                {
                    "id": "ok",
                    "tool_name": "echo",
                    "parameters": {"exit_code": 0},
                    "fail_if": "result.exit_code != 0",
                },
                {
                    "id": "each",
                    "tool_name": "echo",
                    "for_each": [0, 1],
                    "parameters": {"code": "{{ item }}"},
                    "fail_if": "result.json.code == 1 and item == 1",
                },
            ]
        }
    )
    await run(plan, tools)
    assert plan.step("ok").status == StepStatus.COMPLETED
    each = plan.step("each")
    assert each.status == StepStatus.FAILED
    assert (
        each.items is not None and each.items[1].error == "check failed: result.json.code == 1 and item == 1"
    )


# -- inputs and outputs -------------------------------------------------------------------------------------

INPUTS = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "times": {"type": "integer", "default": 2}},
    "required": ["name"],
}


async def test_inputs_are_filled_with_defaults_and_seen_by_templates_and_outputs_come_back(
    tmp_path: Path,
) -> None:
    tools = Tools()
    plan = plan_of(
        {
            "inputs": INPUTS,
            "steps": [
                {
                    "id": "greet",
                    "tool_name": "upper",
                    "for_each": "{{ range(inputs.times) | list }}",
                    "parameters": {"text": "hi {{ inputs.name }} #{{ item }}"},
                },
            ],
            "outputs": {
                "first": "{{ steps.greet.result[0].text }}",
                "count": "{{ steps.greet.result | length }}",
                "constant": "done",
            },
        },
        {"name": "ada"},
    )
    assert plan.input_values == {"name": "ada", "times": 2}
    assert plan.validate(None) == []
    stored = await run(plan, tools, tmp_path / "plans.db")
    assert stored.output_values == {"first": "HI ADA #0", "count": 2, "constant": "done"}
    assert stored.output_errors == {}
    async with PlanStore.open(tmp_path / "plans.db") as store:
        summary = await store.summary(plan.id, 20)
    assert summary.outputs == {"first": "HI ADA #0", "count": 2, "constant": "done"}


async def test_input_values_are_checked_against_the_schema_and_pinned_by_the_approval_hash() -> None:
    missing = plan_of({"inputs": INPUTS, "steps": [{"id": "a", "tool_name": "echo"}]})
    assert [(p.field, p.message) for p in missing.validate(None)] == [
        ("inputs", "input values: 'name' is a required property")
    ]
    wrong = plan_of(
        {"inputs": INPUTS, "steps": [{"id": "a", "tool_name": "echo"}]}, {"name": "x", "times": "2"}
    )
    assert [p.field for p in wrong.validate(None)] == ["inputs.times"]

    one = plan_of({"inputs": INPUTS, "steps": [{"id": "a", "tool_name": "echo"}]}, {"name": "x"})
    other = plan_of({"inputs": INPUTS, "steps": [{"id": "a", "tool_name": "echo"}]}, {"name": "y"})
    assert one.compute_hash() != other.compute_hash()
    plain = plan_of({"steps": [{"id": "a", "tool_name": "echo"}]})
    assert plain.compute_hash() == plan_of({"steps": [{"id": "a", "tool_name": "echo"}]}).compute_hash()


async def test_an_output_over_a_step_that_did_not_complete_gets_an_error_and_the_others_render() -> None:
    tools = Tools()
    plan = plan_of(
        {
            "options": {"require_approval": False, "continue_on_error": True},
            "steps": [
                {"id": "bad", "tool_name": "boom"},
                {"id": "good", "tool_name": "echo", "parameters": {"v": 1}},
            ],
            "outputs": {
                "v": "{{ steps.good.result.v }}",
                "b": "{{ steps.bad.result }}",
                "t": "{{ steps.good.result.x }}",
            },
        }
    )
    await run(plan, tools)
    assert plan.status == PlanStatus.PARTIAL
    assert plan.output_values == {"v": 1}
    assert plan.output_errors["b"] == "step 'bad' did not complete (failed: boom)"
    assert "no key 'x'" in plan.output_errors["t"]


# -- validation ---------------------------------------------------------------------------------------------


def messages(plan: ExecutionPlan) -> list[tuple[str | None, str, str]]:
    return [(p.step_id, p.field, p.message) for p in plan.validate(None)]


def test_templates_of_the_new_fields_are_checked_with_suggestions() -> None:
    plan = plan_of(
        {
            "inputs": {"type": "object", "properties": {"pattern": {"type": "string", "default": "*"}}},
            "steps": [
                {"id": "list", "tool_name": "echo"},
                {
                    "id": "each",
                    "tool_name": "echo",
                    "for_each": "{{ steps.lst.result }}",
                    "depends_on": ["list"],
                },
                {"id": "cond", "tool_name": "echo", "when": "inputs.patern == '*'", "depends_on": ["list"]},
                {
                    "id": "plain",
                    "tool_name": "echo",
                    "parameters": {"x": "{{ item }}"},
                    "fail_if": "{{ result",
                },
                {"id": "word", "tool_name": "echo", "for_each": "files"},
            ],
            "outputs": {"n": "{{ steps.eahc.result | length }}", "r": "{{ result }}"},
        }
    )
    found = messages(plan)
    assert (
        "each",
        "for_each",
        "template '{{ steps.lst.result }}' refers to step 'lst', which does not exist; did you mean 'list'?",
    ) in found
    assert (
        "cond",
        "when",
        """template "{{ inputs.patern == '*' }}" uses input 'patern', which is not declared; """
        "did you mean 'pattern'?",
    ) in found
    assert any(
        f[:2] == ("plain", "parameters.x") and "only in the parameters and fail_if of a for_each" in f[2]
        for f in found
    )
    assert any(f[:2] == ("plain", "fail_if") and "syntax error" in f[2] for f in found)
    assert any(f[:2] == ("word", "for_each") and "give a list" in f[2] for f in found)
    assert any(f[1] == "outputs.n" and "did you mean 'each'" in f[2] for f in found)
    assert any(f[1] == "outputs.r" and "uses 'result'" in f[2] for f in found)


def test_references_in_for_each_when_and_fail_if_add_dependencies() -> None:
    plan = plan_of(
        {
            "steps": [
                {"id": "a", "tool_name": "echo"},
                {"id": "b", "tool_name": "echo"},
                {"id": "c", "tool_name": "echo"},
                {
                    "id": "x",
                    "tool_name": "echo",
                    "for_each": "{{ steps.a.result }}",
                    "when": "steps.b.status",
                    "fail_if": "result.text == steps.c.text",
                },
            ]
        }
    )
    assert plan.step("x").depends_on == ["a", "b", "c"]
    assert messages(plan) == []


def test_a_value_for_an_undeclared_input_an_empty_output_name_and_an_empty_condition_are_reported_once() -> (
    None
):
    plan = plan_of(
        {
            "inputs": {"type": "object", "properties": {"colour": {"type": "string"}}},
            "steps": [{"id": "a", "tool_name": "echo", "when": " "}],
            "outputs": {"": "1"},
        },
        {"color": "red"},
    )
    assert messages(plan) == [
        (
            None,
            "inputs.color",
            "a value was given for 'color', which is not an input: did you mean 'colour'?",
        ),
        ("a", "when", "when is empty: remove it or give a condition"),
        (None, "outputs", "an output has an empty name: name each output"),
    ]
    open_schema = plan_of(
        {
            "inputs": {"type": "object", "properties": {}, "additionalProperties": True},
            "steps": [{"id": "a", "tool_name": "echo"}],
        },
        {"anything": 1},
    )
    assert messages(open_schema) == []
