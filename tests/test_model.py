"""The plan model and its library API (SPEC section 2 and the approval rules of section 4)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import TypeAdapter, ValidationError

from mcp_planner import ExecutionPlan, PlanSpec, PlanStatus, StepResult, StepSpec, StepStatus
from mcp_planner.cli.runtime import load_plan_file
from mcp_planner.errors import PlanStateError
from mcp_planner.plan.model import UNKNOWN_FIELD, ExecutionOptions, utcnow


def two_step_plan() -> ExecutionPlan:
    plan = ExecutionPlan.new("demo")
    plan.add_step("echo", "say hello", {"text": "hello"}, step_id="hello")
    plan.add_step("echo", "say world", {"text": "{{ steps.hello.result.text }} world"})
    return plan


# -- construction -----------------------------------------------------------------------------------------


def test_a_new_plan_is_an_empty_draft_with_defaults() -> None:
    plan = ExecutionPlan.new("demo")

    assert plan.status == PlanStatus.DRAFT
    assert plan.steps == []
    assert plan.id
    assert plan.options == ExecutionOptions()
    assert plan.options.require_approval and not plan.options.auto_approve
    assert plan.options.stop_on_error and not plan.options.continue_on_error
    assert plan.options.max_parallel_steps == 3
    assert plan.options.retry_backoff == 1.0
    assert ExecutionPlan.new("other").id != plan.id


def test_add_step_numbers_steps_and_gives_readable_auto_ids() -> None:
    plan = ExecutionPlan.new("ids")
    first = plan.add_step("t", "one")
    named = plan.add_step("t", "two", step_id="step-3")
    third = plan.add_step("t", "three")
    fourth = plan.add_step("t", "four")

    assert [first.id, named.id, third.id, fourth.id] == ["step-1", "step-3", "step-4", "step-5"]
    assert [s.index for s in plan.steps] == [0, 1, 2, 3]
    assert first.max_retries == 0 and first.retry_delay_ms == 1000 and first.timeout_ms is None


def test_the_step_add_step_returns_is_the_plans_own_object() -> None:
    plan = ExecutionPlan.new("stable")
    step = plan.add_step("t", "one", {"a": 1})

    step.depends_on = ["elsewhere"]
    step.max_retries = 2
    step.parameters["b"] = 2

    assert plan.steps[0] is step
    assert plan.steps[0].depends_on == ["elsewhere"]
    assert plan.step(step.id).max_retries == 2
    assert plan.steps[0].parameters == {"a": 1, "b": 2}


def test_add_step_copies_the_callers_parameters_dict() -> None:
    params = {"a": 1}
    plan = ExecutionPlan.new("copy")
    plan.add_step("t", "one", params)
    params["a"] = 2

    assert plan.steps[0].parameters == {"a": 1}


def test_template_references_become_dependencies() -> None:
    plan = two_step_plan()
    plan.add_step(
        "t",
        "joins",
        {"x": ["{{ steps['step-2'].text }}"], "y": {"z": "{{ steps.hello.json.k }}"}},
        step_id="join",
    )

    assert plan.step("hello").depends_on == []
    assert plan.step("step-2").depends_on == ["hello"]
    assert plan.step("join").depends_on == ["hello", "step-2"]


def test_from_spec_merges_declared_and_inferred_dependencies() -> None:
    spec = PlanSpec.model_validate(
        {
            "description": "from a file",
            "options": {"allow_parallel": True},
            "steps": [
                {"id": "a", "tool": "srv.t", "parameters": {}},
                {"id": "b", "tool_name": "srv.t", "depends_on": ["a"], "max_retries": 2},
                {
                    "id": "c",
                    "tool": "srv.t",
                    "parameters": {"v": "{{ steps.b.result }}"},
                    "depends_on": ["a"],
                },
            ],
        }
    )

    plan = ExecutionPlan.from_spec(spec)

    assert plan.status == PlanStatus.DRAFT
    assert plan.options.allow_parallel
    assert [s.tool_name for s in plan.steps] == ["srv.t"] * 3
    assert plan.step("b").max_retries == 2
    assert plan.step("c").depends_on == ["a", "b"]


def test_a_step_spec_refuses_unknown_fields() -> None:
    with pytest.raises(ValueError, match="bogus"):
        StepSpec.model_validate({"tool": "t", "bogus": 1})


def test_parallel_slots_follow_the_options() -> None:
    options = ExecutionOptions()
    assert options.slots == 1
    options.allow_parallel = True
    assert options.slots == 3
    options.max_parallel_steps = 0
    assert options.slots == 3
    options.max_parallel_steps = 8
    assert options.slots == 8


# -- approval ---------------------------------------------------------------------------------------------


def test_submit_waits_for_approval_when_the_options_require_it() -> None:
    plan = two_step_plan()

    plan.submit()

    assert plan.status == PlanStatus.PENDING_APPROVAL
    assert not plan.is_approved()


@pytest.mark.parametrize("options", [{"require_approval": False}, {"auto_approve": True}])
def test_submit_auto_approves_when_no_approval_is_needed(options: dict[str, bool]) -> None:
    plan = two_step_plan()
    plan.options = ExecutionOptions(**options)

    plan.submit()

    assert plan.status == PlanStatus.APPROVED
    assert plan.approved_by == "auto"
    assert plan.is_approved()


def test_approve_pins_the_hash_and_records_who() -> None:
    plan = two_step_plan()
    plan.submit()

    plan.approve("alice", method="elicitation")

    assert plan.status == PlanStatus.APPROVED
    assert plan.user_approved
    assert plan.approved_by == "alice"
    assert plan.approved_at is not None
    assert plan.plan_hash == plan.compute_hash()
    assert plan.metadata["approval_method"] == "elicitation"
    assert plan.is_approved()


@pytest.mark.parametrize(
    "status",
    [
        PlanStatus.APPROVED,
        PlanStatus.EXECUTING,
        PlanStatus.COMPLETED,
        PlanStatus.FAILED,
        PlanStatus.CANCELLED,
    ],
)
def test_approve_is_refused_outside_draft_and_pending(status: PlanStatus) -> None:
    plan = two_step_plan()
    plan.status = status

    with pytest.raises(PlanStateError, match=status.value):
        plan.approve("alice")


@pytest.mark.parametrize("status", [PlanStatus.DRAFT, PlanStatus.PENDING_APPROVAL, PlanStatus.APPROVED])
def test_reject_cancels_a_plan_that_has_not_started(status: PlanStatus) -> None:
    plan = two_step_plan()
    plan.status = status

    plan.reject("not today")

    assert plan.status == PlanStatus.CANCELLED
    assert plan.rejection_note == "not today"
    assert not plan.is_approved()
    with pytest.raises(PlanStateError):
        plan.approve("alice")


def test_reject_of_an_executing_plan_points_to_cancel_plan() -> None:
    plan = two_step_plan()
    plan.status = PlanStatus.EXECUTING

    with pytest.raises(PlanStateError, match="cancel_plan"):
        plan.reject("stop")


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: setattr(p, "description", "changed"),
        lambda p: p.steps[0].parameters.update(text="bye"),
        lambda p: setattr(p.steps[0], "tool_name", "other"),
        lambda p: setattr(p.steps[1], "depends_on", []),
        lambda p: setattr(p.steps[0], "max_retries", 3),
        lambda p: setattr(p.steps[0], "timeout_ms", 10),
        lambda p: setattr(p.options, "stop_on_error", False),
        lambda p: p.add_step("echo", "one more"),
    ],
)
def test_any_edit_after_approval_voids_it(edit: object) -> None:
    plan = two_step_plan()
    plan.approve("alice")
    assert plan.is_approved()

    edit(plan)  # type: ignore[operator]

    assert not plan.is_approved()


def test_the_hash_ignores_dependency_order_and_step_descriptions() -> None:
    plan = two_step_plan()
    plan.add_step("echo", "third", {}, step_id="third").depends_on = ["hello", "step-2"]
    plan.approve("alice")

    plan.step("third").depends_on = ["step-2", "hello"]
    plan.step("third").description = "reworded"

    assert plan.is_approved()


def test_clear_approval_sends_the_plan_back_for_approval() -> None:
    plan = two_step_plan()
    plan.approve("alice")

    plan.clear_approval()

    assert plan.status == PlanStatus.PENDING_APPROVAL
    assert not plan.user_approved and plan.plan_hash is None and plan.approved_by is None


def test_a_plan_pending_past_its_approval_timeout_is_cancelled() -> None:
    plan = two_step_plan()
    plan.options.approval_timeout_ms = 60_000
    plan.submit()
    assert plan.pending_since is not None

    assert plan.expire_approval(plan.pending_since + timedelta(seconds=59)) is False
    assert plan.status == PlanStatus.PENDING_APPROVAL
    assert plan.expire_approval(plan.pending_since + timedelta(seconds=61)) is True

    assert plan.status == PlanStatus.CANCELLED
    assert plan.error == "approval timed out"
    with pytest.raises(PlanStateError, match="approval"):
        plan.approve("alice")


def test_approve_refuses_a_plan_whose_approval_timed_out() -> None:
    plan = two_step_plan()
    plan.options.approval_timeout_ms = 1
    plan.submit()
    plan.pending_since = utcnow() - timedelta(seconds=5)

    with pytest.raises(PlanStateError, match="timed out"):
        plan.approve("alice")
    assert plan.status == PlanStatus.CANCELLED


def test_no_approval_timeout_means_no_expiry() -> None:
    plan = two_step_plan()
    plan.submit()

    assert plan.expire_approval(utcnow() + timedelta(days=365)) is False
    assert plan.status == PlanStatus.PENDING_APPROVAL


def test_a_draft_that_needs_no_approval_never_expires() -> None:
    plan = two_step_plan()
    plan.options.require_approval = False
    plan.options.approval_timeout_ms = 1

    assert plan.expire_approval(utcnow() + timedelta(days=1)) is False
    assert plan.status == PlanStatus.DRAFT


def test_building_a_large_plan_with_generated_ids_keeps_ids_unique() -> None:
    plan = ExecutionPlan.new("big")
    for _ in range(3):
        plan.add_step("t", "d", {})
    plan.add_step("t", "d", {}, step_id="step-5")
    plan.steps.append(plan.steps[0].model_copy(update={"id": "step-6", "index": 4}))  # behind add_step's back
    ids = [plan.add_step("t", "d", {}).id for _ in range(3)]

    assert ids == ["step-7", "step-8", "step-9"]
    assert len({s.id for s in plan.steps}) == len(plan.steps)


# -- summary and results ----------------------------------------------------------------------------------


def test_summary_counts_every_status_and_progress() -> None:
    plan = ExecutionPlan.new("counts")
    statuses = [
        StepStatus.COMPLETED,
        StepStatus.COMPLETED,
        StepStatus.FAILED,
        StepStatus.SKIPPED,
        StepStatus.SKIPPED,
        StepStatus.PENDING,
        StepStatus.RUNNING,
        StepStatus.COMPLETED,
    ]
    for i, status in enumerate(statuses):
        plan.add_step("t", f"s{i}").status = status
    plan.steps[2].error = "boom"
    plan.steps[2].retry_count = 2
    plan.total_duration_ms = 1234

    summary = plan.summary()

    assert (summary.total_steps, summary.completed, summary.failed, summary.skipped) == (8, 3, 1, 2)
    assert (summary.pending, summary.running) == (1, 1)
    assert summary.progress == 37.5
    assert summary.duration_ms == 1234
    assert summary.steps[2].error == "boom" and summary.steps[2].retry_count == 2
    assert [s.id for s in summary.steps] == [s.id for s in plan.steps]


def test_an_empty_plan_has_zero_progress() -> None:
    summary = ExecutionPlan.new("empty").summary()

    assert summary.total_steps == 0
    assert summary.progress == 0.0


def test_is_completed_only_for_a_completed_plan() -> None:
    plan = two_step_plan()
    assert not plan.is_completed()
    plan.status = PlanStatus.COMPLETED
    assert plan.is_completed()


def test_step_results_keep_text_structured_content_and_blocks() -> None:
    text = StepResult.from_value("plain")
    structured = StepResult.from_value({"a": [1, 2]})
    full = StepResult(
        text="t", structured=None, content=[{"type": "image", "data": "AAAA", "mimeType": "image/png"}]
    )

    assert (text.text, text.structured, text.value) == ("plain", None, "plain")
    assert structured.structured == {"a": [1, 2]} and structured.value == {"a": [1, 2]}
    assert structured.text == '{"a": [1, 2]}' and structured.content == text.content == []  # no blocks
    assert full.value == "t" and full.content[0]["type"] == "image"
    assert StepResult.from_value(full) is full


def test_a_plan_round_trips_through_json_without_loss() -> None:
    plan = two_step_plan()
    plan.options.allow_parallel = True
    plan.options.retry_backoff = 2.0
    plan.metadata = {"k": ["v", 1, None]}
    plan.approve("alice")
    plan.status = PlanStatus.PARTIAL
    plan.started_at = utcnow()
    first = plan.steps[0]
    first.status = StepStatus.COMPLETED
    first.result = StepResult(text="hi", structured={"n": 1.5}, content=[{"type": "text", "text": "hi"}])
    first.duration_ms = 12
    plan.steps[1].status = StepStatus.FAILED
    plan.steps[1].error = "boom"

    again = ExecutionPlan.model_validate_json(plan.model_dump_json())

    assert again == plan
    assert again.is_approved()
    assert again.steps[0].result == first.result
    assert again.summary() == plan.summary()


def test_a_summary_reads_by_key_as_well_as_by_attribute() -> None:
    summary = ExecutionPlan.new("empty").summary()

    assert summary["progress"] == summary.progress == 0.0
    assert summary["skipped"] == 0
    with pytest.raises(KeyError):
        summary["nope"]


# -- caller-written specs: unknown fields ------------------------------------------------------------------


def spec_errors(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as caught:
        PlanSpec.model_validate(data)
    return [(".".join(map(str, e["loc"])), e["msg"]) for e in caught.value.errors()]


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("params", "parameters"),
        ("args", "parameters"),
        ("arguments", "parameters"),
        ("paramters", "parameters"),
        ("dependsOn", "depends_on"),
        ("depends", "depends_on"),
        ("needs", "depends_on"),
        ("retries", "max_retries"),
        ("timeout", "timeout_ms"),
    ],
)
def test_an_unknown_step_field_suggests_the_field_meant(typo: str, meant: str) -> None:
    errors = spec_errors({"description": "d", "steps": [{"id": "build", "tool": "ci.build", typo: 1}]})

    assert errors == [(f"steps.0.{typo}", f"unknown field {typo!r} in step 'build': did you mean {meant!r}?")]


def test_an_unknown_field_without_a_close_match_lists_the_fields_and_other_problems_still_show() -> None:
    errors = spec_errors({"description": "d", "steps": [{"zzz": 1, "max_retries": "many"}]})

    assert (
        "steps.0.zzz",
        "unknown field 'zzz' in this step: the fields are id, tool_name, description, parameters, "
        "depends_on, max_retries, retry_delay_ms, timeout_ms, for_each, max_parallel_items, "
        "allow_item_failures, when, fail_if",
    ) in errors
    assert [loc for loc, _ in errors] == ["steps.0.zzz", "steps.0.tool_name", "steps.0.max_retries"]


def test_unknown_plan_fields_and_options_suggest_the_field_meant() -> None:
    errors = spec_errors({"description": "d", "step": [], "options": {"parallel": True}})

    assert errors == [
        ("step", "unknown field 'step' in the plan: did you mean 'steps'?"),
        ("options.parallel", "unknown field 'parallel' in the options: did you mean 'allow_parallel'?"),
    ]


def test_create_plans_step_list_reports_unknown_fields_with_their_type() -> None:
    # create_plan's MCP arguments are validated as `list[StepSpec]`; its error text shows loc and message.
    with pytest.raises(ValidationError) as caught:
        TypeAdapter(list[StepSpec]).validate_python([{"id": "a", "tool": "t.x", "dependsOn": ["b"]}])
    [error] = caught.value.errors()
    assert error["type"] == UNKNOWN_FIELD and error["loc"] == (0, "dependsOn")
    assert error["msg"] == "unknown field 'dependsOn' in step 'a': did you mean 'depends_on'?"


def test_known_fields_and_the_tool_alias_still_parse() -> None:
    step = StepSpec.model_validate({"id": "a", "tool": "t.x", "parameters": {"k": 1}, "depends_on": []})

    assert step.tool_name == "t.x" and step.parameters == {"k": 1}
    options = ExecutionOptions(allow_parallel=True)
    options.max_parallel_steps = 5
    assert options.slots == 5


def test_a_plan_file_names_each_step_by_id_and_position(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = {
        "description": "d",
        "steps": [
            {"id": "build", "tool": "ci.build", "params": {}},
            {"tool": "ci.test", "dependsOn": ["build"], "max_retries": "many"},
        ],
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan), encoding="utf-8")

    with pytest.raises(typer.Exit):
        load_plan_file(path)

    stderr = capsys.readouterr().err
    assert "unknown field 'params' in step 'build' (#1): did you mean 'parameters'?" in stderr
    assert "unknown field 'dependsOn' in step #2: did you mean 'depends_on'?" in stderr
    assert "step #2, max_retries: Input should be a valid integer" in stderr
    assert "Extra inputs" not in stderr
