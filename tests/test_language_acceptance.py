"""An acceptance probe of the plan language (SPEC section 12), black-box: an in-process `mcp.Client` on the
planner's real MCP server (steps call the built-in `planner.echo` and the stdio test server `basic`), and
`mcp-planner run`, reading only what an agent reads: text and structured content, and the CLI's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult, TextContent

from mcp_planner.downstream.client import Downstream
from mcp_planner.downstream.config import ServersConfig
from mcp_planner.server.app import build_server
from mcp_planner.service import PlannerService
from mcp_planner.store.sqlite import PlanStore

# A black-box acceptance suite: each test starts real downstream processes, so it runs with the e2e set.
pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SERVERS = Path(__file__).parent / "servers"


@asynccontextmanager
async def planner(tmp_path: Path) -> AsyncIterator[Client]:
    """The planner's MCP server over the `basic` test server (stdio) and a SQLite file."""
    flaky = tmp_path / "flaky"
    flaky.mkdir(exist_ok=True)
    config = ServersConfig.from_dict(
        {
            "mcpServers": {
                "basic": {
                    "command": sys.executable,
                    "args": [str(SERVERS / "basic.py")],
                    "env": {"FLAKY_DIR": str(flaky)},
                }
            }
        },
        {},
    )
    async with PlanStore.open(tmp_path / "plans.db") as store, Downstream(config) as downstream:
        async with PlannerService(store, downstream, approval="agent") as service:
            async with Client(build_server(service)) as client:
                yield client


def text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, text(result)
    content: dict[str, Any] | None = result.structured_content
    assert content is not None
    return content


def echo(step_id: str, value: Any, **fields: Any) -> dict[str, Any]:
    """A `planner.echo` step returning `value` (a template or any JSON)."""
    return {"id": step_id, "tool_name": "planner.echo", "parameters": {"value": value}, **fields}


async def create_raw(client: Client, plan: dict[str, Any], **options: Any) -> CallToolResult:
    arguments = {"description": "probe", "options": {"require_approval": False, **options}, **plan}
    return await client.call_tool("create_plan", arguments)


async def create(client: Client, plan: dict[str, Any], **options: Any) -> str:
    return str(structured(await create_raw(client, plan, **options))["id"])


async def execute(client: Client, plan_id: str) -> CallToolResult:
    return await client.call_tool("execute_plan", {"plan_id": plan_id, "wait_seconds": 30})


async def run(client: Client, plan: dict[str, Any], **options: Any) -> dict[str, Any]:
    """Create and execute `plan`; the execute answer's structured content."""
    result = await execute(client, await create(client, plan, **options))
    return structured(result)


async def get_plan(client: Client, plan_id: str) -> dict[str, Any]:
    return structured(await client.call_tool("get_plan", {"plan_id": plan_id}))


def step_of(summary_or_plan: dict[str, Any], step_id: str) -> dict[str, Any]:
    return next(s for s in summary_or_plan["steps"] if s["id"] == step_id)


# -- for_each ------------------------------------------------------------------------------------------------


async def test_for_each_over_an_earlier_steps_list_calls_once_per_item_in_order(tmp_path: Path) -> None:
    plan = {
        "steps": [
            echo("src", ["a", "b", "c"]),
            echo("each", "{{ item }}-{{ item_index }}", for_each="{{ steps.src.result }}"),
        ],
        "outputs": {"all": "{{ steps.each.result }}", "n": "{{ steps.each.result | length }}"},
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    assert summary["status"] == "completed"
    assert summary["outputs"] == {"all": ["a-0", "b-1", "c-2"], "n": 3}


async def test_for_each_over_an_input_list(tmp_path: Path) -> None:
    plan = {
        "inputs": {
            "type": "object",
            "properties": {"names": {"type": "array", "items": {"type": "string"}, "default": ["x", "y"]}},
        },
        "steps": [echo("each", "hi {{ item }}", for_each="{{ inputs.names }}")],
        "outputs": {"all": "{{ steps.each.result }}"},
    }
    async with planner(tmp_path) as client:
        defaulted = await run(client, plan)
        given = await run(client, {**plan, "input_values": {"names": ["p", "q", "r"]}})
    assert defaulted["outputs"] == {"all": ["hi x", "hi y"]}
    assert given["outputs"] == {"all": ["hi p", "hi q", "hi r"]}


async def test_for_each_over_a_literal_list_in_the_plan(tmp_path: Path) -> None:
    plan = {
        "steps": [echo("each", "{{ item * 2 }}", for_each=[1, 2, 3])],
        "outputs": {"r": "{{ steps.each.result }}"},
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    assert summary["outputs"] == {"r": [2, 4, 6]}


async def test_for_each_over_an_empty_list_completes_with_an_empty_result(tmp_path: Path) -> None:
    plan = {
        "steps": [
            echo("src", []),
            echo("each", "{{ item }}", for_each="{{ steps.src.result }}"),
            echo("after", "{{ steps.each.result | length }}"),
        ],
        "outputs": {"r": "{{ steps.each.result }}", "after": "{{ steps.after.result }}"},
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    assert summary["status"] == "completed", summary
    assert summary["outputs"] == {"r": [], "after": 0}


async def test_for_each_over_a_non_list_fails_the_step_clearly(tmp_path: Path) -> None:
    plan = {
        "steps": [echo("src", {"a": 1}), echo("each", "{{ item }}", for_each="{{ steps.src.result }}")],
    }
    async with planner(tmp_path) as client:
        result = await execute(client, await create(client, plan))
        summary = structured(result)
    each = step_of(summary, "each")
    assert summary["status"] == "failed"
    assert each["status"] == "failed"
    assert "list" in each["error"].lower(), each["error"]


async def test_for_each_over_a_string_is_not_split_into_characters(tmp_path: Path) -> None:
    plan = {"steps": [echo("src", "abc"), echo("each", "{{ item }}", for_each="{{ steps.src.result }}")]}
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    assert step_of(summary, "each")["status"] == "failed"


async def test_for_each_over_more_than_10000_items_fails_the_step_clearly(tmp_path: Path) -> None:
    plan = {
        "steps": [
            echo("src", "{{ range(10001) | list }}"),
            echo("each", "{{ item }}", for_each="{{ steps.src.result }}"),
        ]
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
        alive = await client.call_tool("list_plans", {})
    each = step_of(summary, "each")
    assert step_of(summary, "src")["status"] == "completed"
    assert each["status"] == "failed"
    assert "10" in each["error"] and "000" in each["error"].replace(",", "").replace("_", ""), each["error"]
    assert not alive.is_error


async def test_a_literal_for_each_over_10000_items_is_refused_at_creation(tmp_path: Path) -> None:
    plan = {"steps": [echo("each", "{{ item }}", for_each=list(range(10_001)))]}
    async with planner(tmp_path) as client:
        result = await create_raw(client, plan)
    assert result.is_error, text(result)[:300]
    assert "10" in text(result)


async def test_items_with_varied_durations_give_results_in_item_order(tmp_path: Path) -> None:
    plan = {
        "steps": [
            {
                "id": "each",
                "tool_name": "basic.sleep",
                "for_each": [0.3, 0.0, 0.15, 0.05],
                "parameters": {"seconds": "{{ item }}"},
            }
        ],
        "outputs": {"r": "{{ steps.each.result }}"},
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan, allow_parallel=True, max_parallel_steps=4)
    assert summary["status"] == "completed", summary
    assert summary["outputs"]["r"] == ["slept 0.3", "slept 0.0", "slept 0.15", "slept 0.05"]


async def test_max_parallel_items_caps_concurrent_items(tmp_path: Path) -> None:
    """Two items wait for each other at a barrier: with max_parallel_items 1 they cannot both arrive, with 2
    they can."""

    def plan(cap: int) -> dict[str, Any]:
        return {
            "steps": [
                {
                    "id": "each",
                    "tool_name": "basic.barrier",
                    "for_each": ["a", "b"],
                    "max_parallel_items": cap,
                    "timeout_ms": 2000 if cap > 1 else 500,  # a short wait for the call that must time out
                    "parameters": {"name": f"cap{cap}", "parties": 2},
                }
            ]
        }

    async with planner(tmp_path) as client:
        two = await run(client, plan(2), allow_parallel=True, max_parallel_steps=4)
        one = await run(client, plan(1), allow_parallel=True, max_parallel_steps=4)
    assert two["status"] == "completed", two
    assert one["status"] == "failed", one


async def test_each_item_is_retried_on_its_own(tmp_path: Path) -> None:
    plan = {
        "steps": [
            {
                "id": "each",
                "tool_name": "basic.flaky",
                "for_each": ["k1", "k2"],
                "max_retries": 2,
                "retry_delay_ms": 0,
                "parameters": {"key": "{{ item }}", "failures": "{{ item_index + 1 }}"},
            },
            echo("look", "{{ steps.each.items | map(attribute='retries') | list }}"),
        ],
        "outputs": {"r": "{{ steps.each.result }}", "retries": "{{ steps.look.result }}"},
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    assert summary["status"] == "completed", summary
    assert summary["outputs"]["r"] == ["succeeded after 1 failures", "succeeded after 2 failures"]
    assert summary["outputs"]["retries"] == [1, 2]


async def test_items_expose_retries_status_and_error_to_later_templates(tmp_path: Path) -> None:
    plan = {
        "steps": [
            {
                "id": "each",
                "tool_name": "basic.flaky",
                "for_each": ["r1", "r2"],
                "max_retries": 2,
                "retry_delay_ms": 0,
                "parameters": {"key": "{{ item }}", "failures": "{{ item_index + 1 }}"},
            },
        ],
        "outputs": {"items": "{{ steps.each.items }}"},
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    items = summary["outputs"]["items"]
    assert [i["status"] for i in items] == ["completed", "completed"], items
    assert [(i["index"], i["item"], i["retries"]) for i in items] == [(0, "r1", 1), (1, "r2", 2)], items


async def test_allow_item_failures_completes_the_step_and_lists_the_failed_items(tmp_path: Path) -> None:
    each = {
        "id": "each",
        "tool_name": "basic.flaky",
        "for_each": ["ok-item", "bad-item"],
        "allow_item_failures": True,
        "parameters": {"key": "{{ item }}", "failures": "{{ 0 if item == 'ok-item' else 5 }}"},
    }
    after = echo("after", "{{ steps.each.items | map(attribute='status') | list }}")
    outputs = {"statuses": "{{ steps.after.result }}", "r": "{{ steps.each.result | length }}"}
    async with planner(tmp_path) as client:
        allowed = await run(client, {"steps": [each, after], "outputs": outputs})
        refused = await run(
            client, {"steps": [{**each, "allow_item_failures": False, "for_each": ["ok2", "bad2"]}, after]}
        )
    assert allowed["status"] == "completed", allowed
    assert step_of(allowed, "each")["status"] == "completed"
    assert "1 of 2 items failed" in step_of(allowed, "each")["error"]
    assert allowed["outputs"] == {"statuses": ["completed", "failed"], "r": 2}
    assert refused["status"] == "failed"
    assert step_of(refused, "each")["status"] == "failed"
    assert step_of(refused, "after")["status"] == "skipped"


# -- when ----------------------------------------------------------------------------------------------------


async def test_an_on_failure_step_runs_and_an_on_success_step_is_skipped_by_condition(tmp_path: Path) -> None:
    plan = {
        "steps": [
            {"id": "bad", "tool_name": "basic.fail", "parameters": {"message": "boom"}},
            echo("on_fail", "saw {{ steps.bad.error }}", when="steps.bad.status == 'failed'"),
            echo("on_ok", "fine", when="{{ steps.bad.status == 'completed' }}"),
        ],
        "outputs": {"report": "{{ steps.on_fail.result }}"},
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan, stop_on_error=False, continue_on_error=True)
    assert step_of(summary, "on_fail")["status"] == "completed", summary
    assert "boom" in summary["outputs"]["report"]
    on_ok = step_of(summary, "on_ok")
    assert on_ok["status"] == "skipped"
    assert on_ok["error"].startswith("condition false: ")


async def test_skips_by_condition_chain_and_the_plan_still_completes(tmp_path: Path) -> None:
    plan = {
        "steps": [
            echo("a", 1),
            echo("b", 2, when="steps.a.result == 99"),
            echo("c", 3, depends_on=["b"]),
            echo("d", 4, depends_on=["c"]),
        ],
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    assert summary["status"] == "completed", summary
    assert [step_of(summary, s)["status"] for s in "abcd"] == ["completed", "skipped", "skipped", "skipped"]
    assert "b" in step_of(summary, "c")["error"] and "condition" in step_of(summary, "c")["error"]


async def test_a_when_step_depending_on_a_skipped_by_condition_step_evaluates_its_own_condition(
    tmp_path: Path,
) -> None:
    plan = {
        "steps": [
            echo("a", 1, when="false"),
            echo("b", "b ran", when="steps.a.status == 'skipped'"),
            echo("c", "c ran", when="steps.a.status == 'completed'"),
        ],
        "outputs": {"b": "{{ steps.b.result }}"},
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    assert summary["status"] == "completed", summary
    assert step_of(summary, "b")["status"] == "completed"
    assert summary["outputs"] == {"b": "b ran"}
    assert step_of(summary, "c")["error"].startswith("condition false: ")


async def test_when_references_add_dependencies(tmp_path: Path) -> None:
    plan = {"steps": [echo("late", "x", when="steps.first.result == 'go'"), echo("first", "go")]}
    async with planner(tmp_path) as client:
        plan_id = await create(client, plan)
        view = await get_plan(client, plan_id)
        summary = structured(await execute(client, plan_id))
    assert step_of(view, "late")["depends_on"] == ["first"]
    assert step_of(summary, "late")["status"] == "completed"


async def test_when_on_a_for_each_step_skips_it_without_running_items(tmp_path: Path) -> None:
    plan = {
        "steps": [
            echo("each", "{{ item }}", for_each=[1, 2], when="false"),
            echo("status", "{{ steps.each.status }}:{{ steps.each.items | length }}", when="true"),
        ],
        "outputs": {"seen": "{{ steps.status.result }}"},
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    assert summary["status"] == "completed"
    assert step_of(summary, "each")["error"] == "condition false: false"
    assert summary["outputs"] == {"seen": "skipped:0"}, summary


@pytest.mark.parametrize(
    "condition", ["0", "[]", "none", "{{ '' }}", "{{ false }}", "{{ [] }}", "inputs.flag"]
)
async def test_falsy_conditions_skip_their_step(tmp_path: Path, condition: str) -> None:
    plan = {
        "inputs": {"type": "object", "properties": {"flag": {"type": "boolean", "default": False}}},
        "steps": [echo("a", 1, when=condition)],
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    assert summary["status"] == "completed"
    assert step_of(summary, "a")["error"] == f"condition false: {condition}"


# -- fail_if -------------------------------------------------------------------------------------------------


async def test_fail_if_on_text_retries_then_succeeds(tmp_path: Path) -> None:
    plan = {
        "steps": [
            {
                "id": "s",
                "tool_name": "basic.flaky",
                "parameters": {"key": "never", "failures": 0},
                "fail_if": "'after 0' in result.text",
                "max_retries": 2,
                "retry_delay_ms": 0,
            }
        ]
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    s = step_of(summary, "s")
    # flaky counts calls: the 1st says "after 0 failures" (check fails), the 2nd "after 1 failures".
    assert s["status"] == "completed", s
    assert s.get("retry_count", 1) == 1


async def test_fail_if_on_structured_results_fails_with_check_failed_after_its_retries(
    tmp_path: Path,
) -> None:
    plan = {
        "steps": [
            {
                "id": "s",
                "tool_name": "basic.echo_structured",
                "parameters": {"text": "hi", "number": 2},
                "fail_if": "result.number == 2 and result.json.text == 'hi'",
                "max_retries": 1,
                "retry_delay_ms": 0,
            },
            echo("after", "x"),
        ]
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    s = step_of(summary, "s")
    assert summary["status"] == "failed"
    assert s["status"] == "failed"
    assert "check failed: result.number == 2 and result.json.text == 'hi'" in s["error"], s
    assert step_of(summary, "after")["status"] == "skipped"


async def test_fail_if_applies_to_each_item(tmp_path: Path) -> None:
    plan = {
        "steps": [
            echo(
                "each",
                "{{ item }}",
                for_each=["good", "oops"],
                fail_if="result.text == 'oops'",
                allow_item_failures=True,
            ),
        ],
        "outputs": {"s": "{{ steps.each.items | map(attribute='status') | list }}"},
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    assert summary["outputs"] == {"s": ["completed", "failed"]}, summary


# -- inputs --------------------------------------------------------------------------------------------------

TYPED_INPUTS = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "count": {"type": "integer", "default": 2}},
    "required": ["name"],
}


async def test_inputs_required_wrong_type_and_defaults(tmp_path: Path) -> None:
    plan = {
        "inputs": TYPED_INPUTS,
        "steps": [echo("s", "{{ inputs.name }}x{{ inputs.count }}")],
        "outputs": {"r": "{{ steps.s.result }}"},
    }
    async with planner(tmp_path) as client:
        missing = await create_raw(client, plan)
        wrong = await create_raw(client, {**plan, "input_values": {"name": "a", "count": "three"}})
        unknown = await create_raw(client, {**plan, "input_values": {"name": "a", "colour": "red"}})
        ok = await run(client, {**plan, "input_values": {"name": "a"}})
    assert missing.is_error and "name" in text(missing)
    assert wrong.is_error and "three" in text(wrong)
    assert ok["outputs"] == {"r": "ax2"}
    del unknown  # additional properties are allowed unless the schema says otherwise


async def test_input_values_without_an_inputs_schema_are_refused(tmp_path: Path) -> None:
    async with planner(tmp_path) as client:
        result = await create_raw(client, {"steps": [echo("s", 1)], "input_values": {"x": 1}})
    assert result.is_error, text(result)


async def test_changing_input_values_changes_the_approval(tmp_path: Path) -> None:
    plan = {"inputs": TYPED_INPUTS, "steps": [echo("s", "{{ inputs.name }}")], "input_values": {"name": "a"}}
    async with planner(tmp_path) as client:
        plan_id = await create(client, plan, require_approval=True)
        structured(await client.call_tool("approve_plan", {"plan_id": plan_id}))
        updated = await client.call_tool("update_plan", {"plan_id": plan_id, "input_values": {"name": "b"}})
        refused = await execute(client, plan_id)
        same = await client.call_tool("update_plan", {"plan_id": plan_id, "input_values": {"name": "b"}})
    assert structured(updated)["status"] == "pending_approval"
    assert refused.is_error
    assert not same.is_error


# -- outputs -------------------------------------------------------------------------------------------------


async def test_outputs_are_rendered_after_a_failure_with_errors_for_the_ones_that_cannot(
    tmp_path: Path,
) -> None:
    """Outputs render over the steps that completed; one over a failed step is that output's error."""
    plan = {
        "steps": [
            echo("ok", "fine"),
            {"id": "bad", "tool_name": "basic.fail", "parameters": {"message": "boom"}, "depends_on": ["ok"]},
        ],
        "outputs": {"ok": "{{ steps.ok.result }}", "bad": "{{ steps.bad.result.text }}"},
    }
    async with planner(tmp_path) as client:
        plan_id = await create(client, plan)
        result = await execute(client, plan_id)
        summary = await client.call_tool("get_summary", {"plan_id": plan_id})
    answer = structured(result)
    assert answer["status"] == "failed"
    assert answer["outputs"] == {"ok": "fine"}
    assert "boom" in answer["output_errors"]["bad"], answer
    assert text(result).startswith("outputs:\n  ok: fine\n  bad: not rendered: "), text(result)
    assert list(structured(summary))[:2] == ["outputs", "output_errors"]
    assert structured(summary)["outputs"] == answer["outputs"]
    assert text(summary).startswith("outputs:\n  ok: fine")


async def test_outputs_of_a_partial_for_each_see_the_failed_items(tmp_path: Path) -> None:
    plan = {
        "steps": [
            {
                "id": "each",
                "tool_name": "basic.flaky",
                "for_each": ["p-ok", "p-bad"],
                "allow_item_failures": True,
                "parameters": {"key": "{{ item }}", "failures": "{{ 0 if item == 'p-ok' else 9 }}"},
            }
        ],
        "outputs": {
            "failed": "{{ steps.each.items | selectattr('status', 'eq', 'failed') | map(attribute='item')"
            " | list }}",
            "results": "{{ steps.each.result }}",
        },
    }
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    assert summary["status"] == "completed"
    assert summary["outputs"]["failed"] == ["p-bad"]
    assert summary["outputs"]["results"][0] == "succeeded after 0 failures"
    assert len(summary["outputs"]["results"]) == 2


async def test_resume_answers_with_the_outputs_first(tmp_path: Path) -> None:
    plan = {
        "steps": [
            {
                "id": "each",
                "tool_name": "basic.flaky",
                "for_each": ["z1", "z2"],
                "parameters": {"key": "{{ item }}", "failures": "{{ item_index }}"},
            }
        ],
        "outputs": {"r": "{{ steps.each.result }}"},
    }
    async with planner(tmp_path) as client:
        plan_id = await create(client, plan)
        first = structured(await execute(client, plan_id))
        resumed = await client.call_tool("resume_plan", {"plan_id": plan_id, "wait_seconds": 30})
    assert first["status"] == "failed"
    assert structured(resumed)["status"] == "completed", text(resumed)
    # z1 is not called again: a second call would say "after 1 failures"
    assert structured(resumed)["outputs"] == {
        "r": ["succeeded after 0 failures", "succeeded after 1 failures"]
    }
    assert text(resumed).startswith('outputs:\n  r: ["succeeded after 0 failures", ')


async def test_outputs_are_rendered_after_a_cancel(tmp_path: Path) -> None:
    plan = {
        "steps": [
            echo("quick", "q"),
            {
                "id": "slow",
                "tool_name": "basic.sleep",
                "parameters": {"seconds": 30},
                "depends_on": ["quick"],
            },
        ],
        "outputs": {"q": "{{ steps.quick.result }}"},
    }
    async with planner(tmp_path) as client:
        plan_id = await create(client, plan)
        await client.call_tool("execute_plan", {"plan_id": plan_id, "wait_seconds": 0.2})
        await client.call_tool("cancel_plan", {"plan_id": plan_id})
        with anyio.fail_after(5):
            while True:
                summary = structured(await client.call_tool("get_summary", {"plan_id": plan_id}))
                if summary["status"] == "cancelled":
                    break
                await anyio.sleep(0.05)
    assert summary["outputs"] == {"q": "q"}, summary


# -- validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "step_extra", "outputs", "expected"),
    [
        ("for_each", {"for_each": "{{ steps.sorce.result }}"}, {}, "source"),
        ("when", {"when": "steps.sorce.status == 'failed'"}, {}, "source"),
        ("fail_if", {"fail_if": "steps.sorce.result"}, {}, "source"),
        ("outputs", {}, {"o": "{{ steps.sorce.result }}"}, "source"),
        ("for_each input", {"for_each": "{{ inputs.nmes }}"}, {}, "names"),
        ("when input", {"when": "inputs.nmes"}, {}, "names"),
        ("outputs input", {}, {"o": "{{ inputs.nmes }}"}, "names"),
    ],
)
async def test_unknown_steps_and_inputs_are_reported_with_suggestions(
    tmp_path: Path, field: str, step_extra: dict[str, Any], outputs: dict[str, str], expected: str
) -> None:
    plan = {
        "inputs": {"type": "object", "properties": {"names": {"type": "array", "default": []}}},
        "steps": [echo("source", [1]), echo("use", "{{ item }}", depends_on=["source"], **step_extra)],
        "outputs": outputs,
    }
    async with planner(tmp_path) as client:
        result = await create_raw(client, plan)
    assert result.is_error, field
    assert "sorce" in text(result) or "nmes" in text(result), text(result)
    assert expected in text(result), text(result)


async def test_a_syntax_error_in_a_condition_is_refused_at_creation(tmp_path: Path) -> None:
    async with planner(tmp_path) as client:
        result = await create_raw(client, {"steps": [echo("s", 1, when="steps.s.status ==")]})
    assert result.is_error


# -- template limits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"for_each": "{{ range(10**9) | list }}"},
        {"when": "('x' * 10**9) | length"},
        {"fail_if": "('x' * 10**9) | length > 0"},
        {"for_each": "{{ ['a'] * 10**8 }}"},
    ],
)
async def test_template_limits_fail_the_step_clearly_and_the_server_keeps_answering(
    tmp_path: Path, fields: dict[str, Any]
) -> None:
    plan = {"steps": [echo("s", "x", **fields)]}
    async with planner(tmp_path) as client:
        plan_id = await create(client, plan)
        summary = structured(await execute(client, plan_id))
        alive = await client.call_tool("list_plans", {})
    s = step_of(summary, "s")
    assert s["status"] == "failed", s
    assert s["error"], s
    assert "Traceback" not in s["error"]
    assert not alive.is_error


async def test_an_output_over_the_template_limit_is_an_output_error(tmp_path: Path) -> None:
    plan = {"steps": [echo("s", 1)], "outputs": {"big": "{{ 'x' * 10**9 }}", "ok": "{{ steps.s.result }}"}}
    async with planner(tmp_path) as client:
        summary = await run(client, plan)
    assert summary["outputs"] == {"ok": 1}
    assert "big" in summary["output_errors"]


@pytest.mark.parametrize(
    "fields",
    [
        {"fail_if": "('x' * 10**9) | length > 0"},
        {"for_each": "{{ range(10**9) | list }}"},
        {"when": "('x' * 10**9) | length"},
    ],
)
async def test_a_template_over_a_limit_is_not_retried(tmp_path: Path, fields: dict[str, Any]) -> None:
    step = {
        "id": "s",
        "tool_name": "basic.flaky",
        "parameters": {"key": "{{ item }}" if "for_each" in fields else "limit", "failures": 0},
        "max_retries": 3,
        "retry_delay_ms": 0,
        **fields,
    }
    async with planner(tmp_path) as client:
        plan_id = await create(client, {"steps": [step]})
        structured(await execute(client, plan_id))
        s = step_of(await get_plan(client, plan_id), "s")
    assert s["status"] == "failed"
    assert s["error"].startswith(f"{next(iter(fields))}: template ")
    assert s["retry_count"] == 0


async def test_a_slow_condition_fails_at_the_time_budget_while_the_server_keeps_answering(
    tmp_path: Path,
) -> None:
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    async with planner(tmp_path) as client:
        plan_id = await create(client, {"steps": [echo("s", 1, fail_if=slow)]})
        async with anyio.create_task_group() as tg:
            done: list[dict[str, Any]] = []

            async def execute_it() -> None:
                done.append(structured(await execute(client, plan_id)))

            tg.start_soon(execute_it)
            with anyio.fail_after(5):
                listed = await client.call_tool("list_plans", {})
            answered_during_the_run = not done  # the render takes the whole 1 s budget
    assert not listed.is_error
    assert answered_during_the_run
    s = step_of(done[0], "s")
    assert s["status"] == "failed"
    assert "time budget" in s["error"]


# -- item concurrency ----------------------------------------------------------------------------------------


def barrier_each(
    step_id: str, name: str, items: int, parties: int, cap: int = 0, timeout_ms: int = 1000
) -> dict[str, Any]:
    """A for_each step whose items all wait at barrier `name` for `parties` calls."""
    return {
        "id": step_id,
        "tool_name": "basic.barrier",
        "for_each": list(range(items)),
        "max_parallel_items": cap,
        "timeout_ms": timeout_ms,
        "parameters": {"name": name, "parties": parties},
    }


async def test_items_share_the_plans_slots(tmp_path: Path) -> None:
    async with planner(tmp_path) as client:
        three_of_four = await run(client, {"steps": [barrier_each("e", "s4", 3, 3)]}, allow_parallel=True)
        across_steps = await run(
            client,
            {"steps": [barrier_each("e1", "x", 2, 4, cap=2), barrier_each("e2", "x", 2, 4, cap=2)]},
            allow_parallel=True,
            max_parallel_steps=4,
        )
    assert three_of_four["status"] == "completed", three_of_four
    assert across_steps["status"] == "completed", across_steps


async def test_items_of_a_sequential_plan_run_one_at_a_time(tmp_path: Path) -> None:
    async with planner(tmp_path) as client:
        summary = await run(client, {"steps": [barrier_each("e", "seq", 2, 2, cap=2, timeout_ms=500)]})
    assert summary["status"] == "failed"
    assert "timed out" in step_of(summary, "e")["error"]


# -- where each name may be used -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        ({"steps": [echo("a", 1, for_each="{{ item }}")]}, "not in for_each"),
        ({"steps": [echo("a", 1, for_each=[1], when="item == 1")]}, "not in when"),
        ({"steps": [echo("a", "{{ item }}")]}, "not in a step without for_each"),
        ({"steps": [echo("a", 1, when="result")]}, "exists only in fail_if"),
        ({"steps": [echo("a", 1)], "outputs": {"x": "{{ result }}"}}, "an output sees steps.<id> and inputs"),
        ({"steps": [echo("a", 1, max_parallel_items=2)]}, "applies only to a step with for_each"),
        ({"steps": [echo("a", 1, allow_item_failures=True)]}, "applies only to a step with for_each"),
        ({"steps": [echo("a", 1, when="steps.b.status"), echo("b", 1, when="steps.a.status")]}, "cycle"),
        ({"steps": [echo("a", "{{ inputs.x }}")]}, "declares no inputs"),
    ],
)
async def test_misplaced_names_and_fields_are_refused_at_creation(
    tmp_path: Path, plan: dict[str, Any], expected: str
) -> None:
    async with planner(tmp_path) as client:
        result = await create_raw(client, plan)
    assert result.is_error
    assert expected in text(result), text(result)


# -- Mermaid -------------------------------------------------------------------------------------------------


async def test_mermaid_shows_for_each_counts_and_conditions(tmp_path: Path) -> None:
    plan = {
        "steps": [
            echo("src", [1, 2, 3]),
            echo("each", "{{ item }}", for_each="{{ steps.src.result }}"),
            echo("report", "r", when="steps.each.status == 'failed'"),
        ]
    }
    async with planner(tmp_path) as client:
        plan_id = await create(client, plan)
        structured(await execute(client, plan_id))
        view = await get_plan(client, plan_id)
    graph = view["mermaid"]
    assert "for each ×3" in graph, graph
    assert "when steps.each.status == 'failed'" in graph or "when steps.each.status ==" in graph, graph


# -- the command line ----------------------------------------------------------------------------------------


def mcp_planner_run(tmp_path: Path, plan: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan), encoding="utf-8")
    servers = tmp_path / "servers.json"
    servers.write_text(json.dumps({"mcpServers": {}}), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_PLANNER_")}
    env.update(MCP_PLANNER_RUNNER_IDLE_EXIT="3", COLUMNS="200")
    exe = Path(sys.executable).parent / "mcp-planner"
    return subprocess.run(
        [
            str(exe),
            "run",
            str(path),
            "--servers",
            str(servers),
            "--yes",
            "--db",
            str(tmp_path / "p.db"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=tmp_path,
        check=False,
    )


CLI_PLAN = {
    "description": "greet",
    "inputs": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "default": ["t"]},
            "n": {"type": "integer", "default": 1},
        },
        "required": ["name"],
    },
    "steps": [echo("each", "{{ inputs.name }}:{{ item }}", for_each="{{ inputs.tags }}")],
    "outputs": {"r": "{{ steps.each.result | join(',') }}", "n": "{{ inputs.n + 1 }}"},
}


def test_cli_run_takes_inputs_and_prints_the_outputs_first(tmp_path: Path) -> None:
    inputs = tmp_path / "in.json"
    inputs.write_text(json.dumps({"name": "file", "tags": ["a", "b"]}), encoding="utf-8")
    result = mcp_planner_run(
        tmp_path, CLI_PLAN, "--inputs", str(inputs), "--input", "name=ada", "--input", "n=5"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tail = result.stdout[result.stdout.rindex("outputs:") :].splitlines()
    assert tail[:3] == ["outputs:", "  r: ada:a,ada:b", "  n: 6"], result.stdout


def test_cli_run_refuses_a_wrong_input_type_and_a_missing_required_input(tmp_path: Path) -> None:
    wrong = mcp_planner_run(tmp_path, CLI_PLAN, "--input", "name=ada", "--input", "n=x")
    missing = mcp_planner_run(tmp_path, CLI_PLAN)
    assert wrong.returncode != 0 and "n" in wrong.stderr, wrong
    assert missing.returncode != 0 and "name" in (missing.stderr + missing.stdout), missing


def test_cli_run_rejects_unknown_inputs_and_non_object_input_files(tmp_path: Path) -> None:
    listing = tmp_path / "list.json"
    listing.write_text("[1]", encoding="utf-8")
    unknown = mcp_planner_run(tmp_path, CLI_PLAN, "--input", "name=a", "--input", "nope=1")
    not_object = mcp_planner_run(tmp_path, CLI_PLAN, "--inputs", str(listing))
    assert unknown.returncode == 2 and "unknown input 'nope'" in unknown.stderr
    assert not_object.returncode == 2 and "JSON list" in not_object.stderr


def test_cli_run_keeps_a_numeric_looking_string_input_a_string_and_prints_outputs_after_a_failure(
    tmp_path: Path,
) -> None:
    failing = {
        "description": "fails",
        "steps": [
            echo("a", "{{ inputs.name }}"),
            {"id": "b", "tool_name": "planner.llm", "parameters": {"prompt": "hi"}},
        ],
        "inputs": {"type": "object", "properties": {"name": {"type": "string"}}},
        "outputs": {"a": "{{ steps.a.result | tojson }}", "b": "{{ steps.b.result }}"},
    }
    result = mcp_planner_run(tmp_path, failing, "--input", "name=5")
    assert result.returncode not in (0, 2), result.stderr
    tail = result.stdout[result.stdout.rindex("\noutputs:\n") + 1 :].splitlines()
    assert tail[:2] == ["outputs:", '  a: "5"'], result.stdout
    assert tail[2].startswith("  b: not rendered: step 'b' did not complete (failed: no LLM configured")


def test_cli_run_shows_the_id_of_the_plan_it_runs(tmp_path: Path) -> None:
    result = mcp_planner_run(tmp_path, CLI_PLAN, "--input", "name=a")
    assert result.returncode == 0, result.stderr
    shown = result.stdout.split("Plan '", 1)[1].split("'", 1)[0]
    ran = result.stdout.split("approved by", 1)[0].rsplit("plan ", 1)[1].strip()
    assert shown == ran
