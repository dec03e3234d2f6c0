"""The plan language through the MCP server: for_each, when, fail_if, inputs and outputs (SPEC section 12).

An in-process `mcp.Client` drives the planner's server, whose steps call real stdio downstream servers
(`servers/language.py`, `servers/basic.py`), on a real SQLite file. The engine's own tests of the same
semantics are in test_plan_language.py.
"""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp_types import CallToolResult, TextContent

from mcp_planner.downstream.client import Downstream
from mcp_planner.downstream.config import ServersConfig
from mcp_planner.plan.model import ExecutionPlan, StepItem, StepStatus, StepSummary
from mcp_planner.presentation import event_line, mermaid, plan_text, progress_message, summary_text
from mcp_planner.server.app import build_server
from mcp_planner.service import PlannerService
from mcp_planner.store.base import Event
from mcp_planner.store.sqlite import PlanStore

pytestmark = pytest.mark.anyio

SERVERS = Path(__file__).parent / "servers"


@asynccontextmanager
async def planner(tmp_path: Path) -> AsyncIterator[tuple[Client, PlannerService]]:
    """The planner's MCP server over the `lang` and `basic` test servers (stdio) and a SQLite file."""
    state = tmp_path / "state"
    state.mkdir()
    config = ServersConfig.from_dict(
        {
            "mcpServers": {
                "lang": {
                    "command": sys.executable,
                    "args": [str(SERVERS / "language.py")],
                    "env": {"STATE_DIR": str(state)},
                },
                "basic": {"command": sys.executable, "args": [str(SERVERS / "basic.py")]},
            }
        },
        {},
    )
    async with PlanStore.open(tmp_path / "plans.db") as store, Downstream(config) as downstream:
        async with PlannerService(store, downstream, approval="agent") as service:
            async with Client(build_server(service)) as client:
                yield client, service


def text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, text(result)
    content: dict[str, Any] | None = result.structured_content
    assert content is not None
    return content


async def create(client: Client, plan: dict[str, Any], **options: Any) -> str:
    arguments = {"options": {"require_approval": False, **options}, **plan}
    return str(structured(await client.call_tool("create_plan", arguments))["id"])


async def execute(client: Client, plan_id: str) -> CallToolResult:
    return await client.call_tool("execute_plan", {"plan_id": plan_id, "wait_seconds": 60})


async def get_plan(client: Client, plan_id: str) -> tuple[dict[str, Any], str]:
    result = await client.call_tool("get_plan", {"plan_id": plan_id})
    return structured(result), text(result)


def step_of(plan: dict[str, Any], step_id: str) -> dict[str, Any]:
    return next(s for s in plan["steps"] if s["id"] == step_id)


SHOUT_NAMES = {
    "description": "shout every name",
    "steps": [
        {"id": "list", "tool_name": "lang.names", "parameters": {"count": 5}},
        {
            "id": "shout",
            "tool_name": "lang.shout",
            "for_each": "{{ steps.list.result.names }}",
            "parameters": {"text": "{{ item }}"},
        },
    ],
    "outputs": {
        "shouted": "{{ steps.shout.result | join(',') }}",
        "count": "{{ steps.shout.result | length }}",
    },
}


# -- for_each ------------------------------------------------------------------------------------------------


async def test_for_each_over_an_earlier_result_runs_in_item_order_and_execute_answers_with_the_outputs_first(
    tmp_path: Path,
) -> None:
    async with planner(tmp_path) as (client, _):
        plan_id = await create(client, SHOUT_NAMES, allow_parallel=True, max_parallel_steps=4)
        result = await execute(client, plan_id)
        summary = structured(result)
        plan, plan_text_ = await get_plan(client, plan_id)

    assert summary["status"] == "completed", text(result)
    assert summary["outputs"] == {"shouted": "N0,N1,N2,N3,N4", "count": 5}
    assert summary["output_errors"] == {}
    assert list(summary)[:2] == ["outputs", "output_errors"]  # the answer first
    assert text(result).splitlines()[:3] == ["outputs:", "  shouted: N0,N1,N2,N3,N4", "  count: 5"]

    shout = step_of(plan, "shout")
    assert shout["depends_on"] == ["list"]
    assert shout["result"]["structured"] == ["N0", "N1", "N2", "N3", "N4"]
    assert shout["for_each"] == "{{ steps.list.result.names }}"
    assert shout["items"] == {"total": 5, "completed": 5, "failed": 0, "failed_items": []}
    assert plan["outputs"] == SHOUT_NAMES["outputs"]
    assert plan["output_values"] == {"shouted": "N0,N1,N2,N3,N4", "count": 5}
    assert "   for each of {{ steps.list.result.names }}" in plan_text_
    assert "   items: 5 (5 completed)" in plan_text_
    assert "  count = {{ steps.shout.result | length }} -> 5" in plan_text_


async def test_a_failing_item_fails_its_step_naming_the_item_unless_item_failures_are_allowed(
    tmp_path: Path,
) -> None:
    each = {
        "id": "shout",
        "tool_name": "lang.shout",
        "for_each": ["a", "bad-b", "c"],
        "parameters": {"text": "{{ item }}"},
    }
    async with planner(tmp_path) as (client, _):
        strict = await create(client, {"description": "strict", "steps": [each]})
        failed = await execute(client, strict)
        allowed = await create(
            client, {"description": "lenient", "steps": [{**each, "allow_item_failures": True}]}
        )
        completed = await execute(client, allowed)
        strict_plan, strict_text = await get_plan(client, strict)
        allowed_plan, _ = await get_plan(client, allowed)

    assert structured(failed)["status"] == "failed"
    error = structured(failed)["steps"][0]["error"]
    assert error.startswith('1 of 3 items failed; item 1 ("bad-b"): ') and "cannot shout 'bad-b'" in error
    assert "cannot shout 'bad-b'" in text(failed)
    items = step_of(strict_plan, "shout")["items"]
    assert items["total"] == 3 and items["failed"] == 1
    assert items["failed_items"][0]["index"] == 1 and items["failed_items"][0]["value"] == '"bad-b"'
    assert 'items: 3 (2 completed, 1 failed); shout[1] "bad-b": ' in strict_text
    assert "for each ×3, 1 failed" in strict_plan["mermaid"]

    assert structured(completed)["status"] == "completed", text(completed)
    shout = step_of(allowed_plan, "shout")
    assert shout["status"] == "completed"
    assert shout["error"] == "1 of 3 items failed (allowed): items 1"
    assert shout["result"]["structured"] == ["A", None, "C"]
    assert shout["allow_item_failures"] is True


async def test_resume_reruns_only_the_failed_items_and_answers_with_the_outputs_first(tmp_path: Path) -> None:
    plan = {
        "description": "wait for every service",
        "steps": [
            {
                "id": "ready",
                "tool_name": "lang.status",
                "for_each": ["api", "db", "queue"],
                "parameters": {"key": "{{ item }}", "errors": "{{ 1 if item == 'db' else 0 }}"},
                "fail_if": "'ERROR' in result.text",
            }
        ],
        "outputs": {"ready": "{{ steps.ready.result | join('; ') }}"},
    }
    async with planner(tmp_path) as (client, _):
        plan_id = await create(client, plan)
        failed = await execute(client, plan_id)
        resumed = await client.call_tool("resume_plan", {"plan_id": plan_id, "wait_seconds": 60})

    assert structured(failed)["status"] == "failed"
    assert "item 1 (\"db\"): check failed: 'ERROR' in result.text" in structured(failed)["steps"][0]["error"]
    assert structured(resumed)["status"] == "completed", text(resumed)
    assert text(resumed).startswith("outputs:\n  ready: OK: api ready; OK: db ready; OK: queue ready\n")
    calls = {key: int((tmp_path / "state" / f"status-{key}").read_text()) for key in ("api", "db", "queue")}
    assert calls == {"api": 1, "db": 2, "queue": 1}  # the completed items were not called again


# -- when ----------------------------------------------------------------------------------------------------


async def test_a_false_condition_skips_its_step_and_dependents_and_the_plan_still_completes(
    tmp_path: Path,
) -> None:
    plan = {
        "description": "shout only when there are names",
        "steps": [
            {"id": "list", "tool_name": "lang.names", "parameters": {"count": 0}},
            {
                "id": "shout",
                "tool_name": "lang.shout",
                "when": "steps.list.result.names | length > 0",
                "parameters": {"text": "some"},
            },
            {"id": "after", "tool_name": "lang.shout", "parameters": {"text": "{{ steps.shout.result }}"}},
        ],
    }
    async with planner(tmp_path) as (client, _):
        plan_id = await create(client, plan)
        result = await execute(client, plan_id)
        view, plan_text_ = await get_plan(client, plan_id)

    summary = structured(result)
    assert summary["status"] == "completed", text(result)
    steps = {s["id"]: s for s in summary["steps"]}
    assert steps["shout"]["status"] == "skipped"
    assert steps["shout"]["error"] == "condition false: steps.list.result.names | length > 0"
    assert steps["after"]["error"] == "dependency shout was skipped by its condition"
    assert "shout [lang.shout] skipped: condition false: steps.list.result.names | length > 0" in text(result)
    assert step_of(view, "shout")["when"] == "steps.list.result.names | length > 0"
    assert "   when steps.list.result.names | length > 0" in plan_text_
    assert "when steps.list.result.names | length #gt; 0" in view["mermaid"]
    assert "  s0 -.-> s1" in view["mermaid"].splitlines()


async def test_an_on_failure_step_runs_after_a_failure_even_when_the_plan_stops_at_errors(
    tmp_path: Path,
) -> None:
    plan = {
        "description": "deploy, roll back on failure",
        "steps": [
            {"id": "deploy", "tool_name": "basic.fail", "parameters": {"message": "disk full"}},
            {"id": "verify", "tool_name": "basic.echo", "parameters": {"text": "{{ steps.deploy.result }}"}},
            {
                "id": "rollback",
                "tool_name": "basic.echo",
                "when": "steps.deploy.status == 'failed'",
                "parameters": {"text": "rolled back after: {{ steps.deploy.error }}"},
            },
        ],
        "outputs": {"rollback": "{{ steps.rollback.result }}"},
    }
    async with planner(tmp_path) as (client, _):
        plan_id = await create(client, plan, stop_on_error=True)
        result = await execute(client, plan_id)
        view, _ = await get_plan(client, plan_id)

    summary = structured(result)
    assert summary["status"] == "failed"
    steps = {s["id"]: s for s in summary["steps"]}
    assert steps["deploy"]["status"] == "failed" and "disk full" in steps["deploy"]["error"]
    assert steps["verify"]["status"] == "skipped"
    assert steps["rollback"]["status"] == "completed"
    assert step_of(view, "rollback")["depends_on"] == ["deploy"]  # the condition's reference
    assert summary["outputs"]["rollback"].startswith("rolled back after: ")
    assert "disk full" in summary["outputs"]["rollback"]
    assert text(result).startswith("outputs:\n  rollback: rolled back after: ")


# -- fail_if -------------------------------------------------------------------------------------------------


async def test_fail_if_on_a_text_result_retries_the_step_then_fails_it_with_check_failed(
    tmp_path: Path,
) -> None:
    def status_step(key: str, errors: int, retries: int) -> dict[str, Any]:
        return {
            "id": key,
            "tool_name": "lang.status",
            "parameters": {"key": key, "errors": errors},
            "fail_if": "'ERROR' in result.text",
            "max_retries": retries,
            "retry_delay_ms": 10,
        }

    async with planner(tmp_path) as (client, _):
        recovers = await create(client, {"description": "ready after 2", "steps": [status_step("db", 2, 3)]})
        ready = await execute(client, recovers)
        never = await create(client, {"description": "never ready", "steps": [status_step("queue", 9, 2)]})
        failed = await execute(client, never)
        view, plan_text_ = await get_plan(client, never)

    assert structured(ready)["status"] == "completed", text(ready)
    assert structured(ready)["steps"][0]["retry_count"] == 2
    step = structured(failed)["steps"][0]
    assert structured(failed)["status"] == "failed"
    assert step["error"] == "check failed: 'ERROR' in result.text" and step["retry_count"] == 2
    assert "queue [lang.status] failed" in text(failed) and "check failed: 'ERROR' in result.text" in text(
        failed
    )
    assert step_of(view, "queue")["fail_if"] == "'ERROR' in result.text"
    assert "   fail if 'ERROR' in result.text" in plan_text_
    assert "fail if 'ERROR' in result.text" in view["mermaid"]


# -- inputs and outputs --------------------------------------------------------------------------------------


NAMES_FROM_INPUTS = {
    "description": "shout names with a prefix",
    "inputs": {
        "type": "object",
        "properties": {"prefix": {"type": "string"}, "count": {"type": "integer", "default": 2}},
        "required": ["prefix"],
    },
    "steps": [
        {
            "id": "list",
            "tool_name": "lang.names",
            "parameters": {"count": "{{ inputs.count }}", "prefix": "{{ inputs.prefix }}"},
        },
        {
            "id": "shout",
            "tool_name": "lang.shout",
            "for_each": "{{ steps.list.result.names }}",
            "parameters": {"text": "{{ item }}"},
        },
    ],
    "outputs": {"shouted": "{{ steps.shout.result }}"},
}


async def test_input_values_are_validated_defaulted_and_part_of_the_approval(tmp_path: Path) -> None:
    async with planner(tmp_path) as (client, service):
        missing = await client.call_tool("create_plan", NAMES_FROM_INPUTS)
        wrong = await client.call_tool("create_plan", {**NAMES_FROM_INPUTS, "input_values": {"prefix": 7}})
        created = await client.call_tool(
            "create_plan", {**NAMES_FROM_INPUTS, "input_values": {"prefix": "x"}}
        )
        view = structured(created)
        plan_id = view["id"]
        assert (
            structured(await client.call_tool("approve_plan", {"plan_id": plan_id}))["status"] == "approved"
        )
        approved_hash = (await service.get_plan(plan_id)).plan_hash

        updated = await client.call_tool("update_plan", {"plan_id": plan_id, "input_values": {"prefix": "y"}})
        after_update = await service.get_plan(plan_id)
        refused = await execute(client, plan_id)
        structured(await client.call_tool("approve_plan", {"plan_id": plan_id}))
        result = await execute(client, plan_id)

    assert missing.is_error and "'prefix' is a required property" in text(missing)
    assert "their values `input_values`" in text(missing)
    assert wrong.is_error and "7 is not of type 'string'" in text(wrong)
    assert view["status"] == "pending_approval"
    assert view["inputs"] == NAMES_FROM_INPUTS["inputs"]
    assert view["input_values"] == {"prefix": "x", "count": 2}  # the default filled in
    assert 'inputs: prefix = "x", count = 2' in text(created)
    assert "get_plan shows it whole" in text(created)  # the outputs the caller wrote are not repeated

    assert structured(updated)["status"] == "pending_approval" and not after_update.user_approved
    assert after_update.input_values == {"prefix": "y", "count": 2}
    assert after_update.compute_hash() != approved_hash
    assert refused.is_error
    assert structured(result)["outputs"] == {"shouted": ["Y0", "Y1"]}
    assert text(result).startswith('outputs:\n  shouted: ["Y0", "Y1"]\n')


async def test_update_plan_replaces_inputs_and_outputs_and_clears_the_approval(tmp_path: Path) -> None:
    async with planner(tmp_path) as (client, service):
        plan_id = await create(
            client, {**NAMES_FROM_INPUTS, "input_values": {"prefix": "x"}}, require_approval=True
        )
        structured(await client.call_tool("approve_plan", {"plan_id": plan_id}))
        inputs = {
            "type": "object",
            "properties": {"prefix": {"type": "string"}, "count": {"type": "integer", "default": 3}},
        }
        updated = await client.call_tool(
            "update_plan",
            {"plan_id": plan_id, "inputs": inputs, "outputs": {"n": "{{ steps.shout.result | length }}"}},
        )
        plan = await service.get_plan(plan_id)
        events = [e for e in await service.events(plan_id) if e.kind == "plan_updated"]

    assert structured(updated)["status"] == "pending_approval"
    assert plan.inputs == inputs and plan.outputs == {"n": "{{ steps.shout.result | length }}"}
    assert plan.input_values == {"prefix": "x", "count": 3}  # the new default, the value given kept
    assert events[-1].data["fields"] == ["inputs", "outputs"] and events[-1].data["approval_cleared"]


# -- what agents and people read -----------------------------------------------------------------------------


async def test_get_plan_shows_for_each_counts_conditions_inputs_and_outputs_and_a_valid_mermaid_graph(
    tmp_path: Path,
) -> None:
    plan = {
        **NAMES_FROM_INPUTS,
        "input_values": {"prefix": 'say "hi" <b>'},
        "steps": [
            *NAMES_FROM_INPUTS["steps"],
            {
                "id": "report",
                "tool_name": "basic.echo",
                "when": 'steps.shout.status == "completed"',
                "parameters": {"text": "{{ steps.shout.result | length }} shouted"},
            },
        ],
    }
    async with planner(tmp_path) as (client, _):
        plan_id = await create(client, plan)
        before, before_text = await get_plan(client, plan_id)
        structured(await execute(client, plan_id))
        after, after_text = await get_plan(client, plan_id)

    assert step_of(before, "shout")["items"] is None
    assert "for each<br/>" not in before["mermaid"] and "<br/>for each" in before["mermaid"]
    assert "items:" not in before_text
    assert 'inputs: prefix = "say \\"hi\\" <b>", count = 2' in before_text

    lines = after_text.splitlines()
    shout = lines.index('2. shout: lang.shout {"text": "{{ item }}"} (after list)')
    assert lines[shout + 1 : shout + 3] == [
        "   for each of {{ steps.list.result.names }}",
        "   items: 2 (2 completed)",
    ]
    assert '   when steps.shout.status == "completed"' in lines
    assert "outputs:" in lines and any(
        line.startswith("  shouted = {{ steps.shout.result }} -> [") for line in lines
    )

    graph = after["mermaid"]
    assert "for each ×2" in graph
    assert "when steps.shout.status == #quot;completed#quot;" in graph
    assert "  s1 -.-> s2" in graph.splitlines()
    for line in graph.splitlines()[1:]:
        assert re.fullmatch(r"  (classDef \w+ .+|s\d+\[\"[^\"]*\"\]:::\w+|s\d+ (-->|-\.->) s\d+)", line), line


# -- event lines ---------------------------------------------------------------------------------------------


def test_item_events_and_skips_by_condition_become_log_lines_and_progress() -> None:
    read = StepSummary(id="read", tool_name="fs.read", status=StepStatus.RUNNING)

    def event(kind: str, step_id: str = "read", **data: object) -> Event:
        return Event(plan_id="p", kind=kind, step_id=step_id, data=data)

    retry = event("item_retry", item=3, retry=1, error="timed out\nafter 5 s", delay_ms=100)
    failed = event("item_failed", item=3, error="no such file", retries=2)
    done = event("item_completed", item=4)
    skipped = event("step_skipped", "report", reason="condition false: steps.read.status == 'failed'")
    assert event_line(retry, read) == "retry   read[3] (retry 1): timed out after 5 s"
    assert event_line(failed, read) == "item    read[3] failed (after 2 retries): no such file"
    assert event_line(done, read) == "item    read[4] done"
    assert event_line(skipped, None) == "skipped report by its condition: steps.read.status == 'failed'"
    assert progress_message([retry, failed, done]) == (
        "item read[3] retrying; item read[3] failed; item read[4] completed"
    )


def test_long_outputs_are_cut_with_where_to_read_them_whole() -> None:
    plan = ExecutionPlan.new("long")
    plan.add_step("t", "", {}, step_id="a").status = StepStatus.COMPLETED
    plan.outputs = {"body": "{{ steps.a.result }}", "lines": "x", "broken": "{{ steps.a.result.nope }}"}
    plan.output_values = {"body": "z" * 5000, "lines": "one\ntwo"}
    plan.output_errors = {"broken": "'dict object' has no attribute 'nope'"}
    lines = summary_text(plan.summary()).splitlines()
    assert lines[0] == "outputs:"
    assert lines[1].startswith(
        "  body: " + "z" * 2000 + "… (3000 more characters: the whole value is outputs.body"
    )
    assert lines[2:4] == ["  lines: one", "    two"]
    assert lines[4] == "  broken: not rendered: 'dict object' has no attribute 'nope'"
    assert lines[5].startswith("plan ")
    assert "outputs:" not in summary_text(plan.summary(), outputs=False)


def test_plan_text_lists_item_failures_first_and_counts_the_rest() -> None:
    plan = ExecutionPlan.new("items")
    step = plan.add_step("fs.read", "", {"path": "{{ item }}"}, step_id="read")
    step.for_each = [f"f{i}" for i in range(6)]
    assert '<br/>for each ×6"]' in mermaid(plan)  # a list given in the plan is counted before the run
    step.items = [
        StepItem(value=f"f{i}", status=StepStatus.FAILED if i % 2 else StepStatus.COMPLETED, error=f"e{i}")
        for i in range(6)
    ]
    text_ = plan_text(plan)
    assert (
        '   items: 6 (3 completed, 3 failed); read[1] "f1": e1; read[3] "f3": e3; read[5] "f5": e5' in text_
    )
    step.items.append(StepItem(value="f6", status=StepStatus.FAILED, error="e6"))
    assert "; and 1 more failed" in plan_text(plan)
    assert "for each ×7, 4 failed" in mermaid(plan)
