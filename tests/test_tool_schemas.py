"""What `tools/list` costs a model (SPEC section 7's budget), and that the compacted schemas still hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from test_server import planner, text, two_step_plan

from mcp_planner.server.schemas import compact_input_schema

pytestmark = pytest.mark.anyio

#: The budget in tokens, counted as characters / 4 (no tokenizer works offline here).
MODEL_VIEW_TOKENS = 4000
WITH_OUTPUT_SCHEMAS_TOKENS = 8000


async def test_tools_list_stays_within_its_token_budget(tmp_path: Path) -> None:
    async with planner(str(tmp_path / "plans.db")) as (client, _):
        tools = (await client.list_tools()).tools
    model_view = with_outputs = 0
    for tool in tools:
        seen = tool.model_dump(mode="json", by_alias=True, exclude_none=True)
        output = seen.pop("outputSchema", None)
        model_view += len(json.dumps(seen))
        with_outputs += len(json.dumps(seen)) + len(json.dumps(output or {}))
    assert model_view / 4 <= MODEL_VIEW_TOKENS
    assert with_outputs / 4 <= WITH_OUTPUT_SCHEMAS_TOKENS


async def test_structured_results_satisfy_the_listed_output_schemas_and_shared_definitions_are_named(
    tmp_path: Path,
) -> None:
    async with planner(str(tmp_path / "plans.db")) as (client, _):
        tools = {t.name: t for t in (await client.list_tools()).tools}
        created = await client.call_tool("create_plan", two_step_plan())
        summary = await client.call_tool("get_summary", {"plan_id": created.structured_content["id"]})  # type: ignore[index]
    jsonschema.validate(created.structured_content, tools["create_plan"].output_schema)  # type: ignore[arg-type]
    jsonschema.validate(summary.structured_content, tools["get_summary"].output_schema)  # type: ignore[arg-type]
    assert "StepSpec" in tools["create_plan"].input_schema["$defs"]
    steps = tools["update_plan"].input_schema["properties"]["steps"]
    assert steps["items"] == {"type": "object", "description": "as StepSpec in create_plan's input schema"}


def test_compacting_an_input_schema_keeps_every_property_constraint_and_default() -> None:
    schema: dict[str, Any] = {
        "title": "Args",
        "type": "object",
        "properties": {
            "title": {"title": "Title", "type": "string", "maxLength": 5},
            "n": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}], "default": None},
            "tags": {"type": "array", "items": {}, "default": []},
        },
        "required": ["title"],
    }
    assert compact_input_schema(schema) == {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 5},
            "n": {"type": ["integer", "null"], "minimum": 1},
            "tags": {"type": "array", "default": []},
        },
        "required": ["title"],
    }
    for valid in ({"title": "ab"}, {"title": "ab", "n": None}, {"title": "ab", "n": 3}):
        jsonschema.validate(valid, compact_input_schema(schema))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"title": "ab", "n": 0}, compact_input_schema(schema))


async def test_get_summary_of_a_twenty_step_plan_stays_within_600_tokens(tmp_path: Path) -> None:
    steps = [{"id": f"step-{i}", "tool_name": "echo", "parameters": {"i": i}} for i in range(20)]
    async with planner(str(tmp_path / "plans.db")) as (client, _):
        created = await client.call_tool(
            "create_plan",
            {"description": "twenty echoes", "steps": steps, "options": {"require_approval": False}},
        )
        plan_id = created.structured_content["id"]  # type: ignore[index]
        await client.call_tool("execute_plan", {"plan_id": plan_id})
        summary = await client.call_tool("get_summary", {"plan_id": plan_id})
    assert summary.structured_content is not None and summary.structured_content["completed"] == 20
    assert len(text(summary)) / 4 <= 600
    assert len(json.dumps(summary.structured_content)) / 4 <= 600
