"""Plan views: Mermaid graphs, large-result previews, and the short text models read."""

from __future__ import annotations

from mcp_planner.plan.model import RESULT_PREVIEW_LIMIT, ExecutionPlan, StepResult, StepStatus, StepSummary
from mcp_planner.presentation import (
    PREVIEW_CHARS,
    SUMMARY_STEPS,
    apply_event,
    counts_text,
    duration_text,
    event_line,
    mermaid,
    plan_text,
    plan_view,
    progress_message,
    result_preview,
    result_view,
    summary_text,
    summary_view,
)
from mcp_planner.store.base import Event


def sample_plan() -> ExecutionPlan:
    plan = ExecutionPlan.new("ship it")
    plan.add_step("ci.build", "build", {"version": "1"}, step_id='build "v1"')
    plan.add_step("ci.test", "test", {}, step_id="test-unit").depends_on = ['build "v1"']
    plan.add_step("ci.deploy", "deploy", {"artifact": "{{ steps['test-unit'].result }}"}, step_id="deploy")
    plan.steps[0].status = StepStatus.COMPLETED
    plan.steps[1].status = StepStatus.FAILED
    plan.steps[1].error = "3 tests failed\nsee log"
    plan.steps[2].status = StepStatus.SKIPPED
    return plan


def test_mermaid_colours_nodes_by_status_and_draws_dependency_edges() -> None:
    graph = mermaid(sample_plan())
    lines = graph.splitlines()
    assert lines[0] == "flowchart TD"
    for status in StepStatus:
        assert any(line.strip().startswith(f"classDef {status.value} ") for line in lines)
    assert 's0["build #quot;v1#quot;<br/>ci.build<br/>completed"]:::completed' in graph
    assert "s1[" in graph and ":::failed" in graph and ":::skipped" in graph
    assert "  s0 --> s1" in lines and "  s1 --> s2" in lines


def test_large_result_is_a_preview_with_the_uri_of_the_whole() -> None:
    big = StepResult.from_value("y" * (RESULT_PREVIEW_LIMIT + 10))
    view = result_view("p1", "fetch", big)
    assert view.truncated and view.uri == "plan://p1/steps/fetch/result"
    assert len(view.text) == PREVIEW_CHARS and view.structured is None
    small = result_view("p1", "fetch", StepResult.from_value({"ok": True}))
    assert not small.truncated and small.uri is None and small.structured == {"ok": True}


def test_summary_text_has_one_line_per_step_with_errors_flattened() -> None:
    plan = sample_plan()
    text = summary_text(plan.summary())
    lines = text.splitlines()
    assert lines[0].startswith("plan ") and "1/3 completed, 1 failed, 1 skipped" in lines[0]
    assert len(lines) == 4
    assert lines[2].endswith("failed: 3 tests failed see log")


def test_plan_text_lists_tools_parameters_and_dependencies() -> None:
    text = plan_text(sample_plan())
    assert '1. build "v1": ci.build {"version": "1"}' in text
    assert "(after test-unit)" in text
    assert text.endswith("stop at the first failure.")


def test_plan_view_of_an_empty_plan_has_zero_progress() -> None:
    view = plan_view(ExecutionPlan.new("nothing"))
    assert view.progress == 0 and view.steps == [] and view.mermaid.startswith("flowchart TD")


def test_durations_read_in_ms_under_a_second_and_in_seconds_above() -> None:
    assert [duration_text(ms) for ms in (None, 0, 999, 1000, 12_345)] == [
        "",
        "0 ms",
        "999 ms",
        "1.0 s",
        "12.3 s",
    ]


def test_counts_name_completed_always_and_other_states_only_when_present() -> None:
    summary = sample_plan().summary()
    assert counts_text(summary) == "1/3 completed, 1 failed, 1 skipped"
    assert counts_text(ExecutionPlan.new("nothing").summary()) == "0/0 completed"


def test_result_preview_is_one_line_of_the_structured_content_or_the_text() -> None:
    assert result_preview(StepResult.from_value({"a": "x\ny"})) == '{"a": "x\\ny"}'
    assert (
        result_preview(StepResult.from_value("line one\nline two " + "z" * 300), 20) == "line one line two z…"
    )


def test_step_events_become_log_lines_and_move_the_step() -> None:
    pending = StepSummary(id="lint", tool_name="ci.lint", status=StepStatus.PENDING)

    def event(kind: str, **data: object) -> Event:
        return Event(plan_id="p", kind=kind, step_id="lint", data=data)

    started = event("step_started")
    retry = event("step_retry", retry=1, error="timed out\nafter 5 s", delay_ms=100)
    done = event("step_completed", duration_ms=40)
    assert event_line(started, pending) == "start   lint -> ci.lint"
    running = apply_event(pending, started)
    assert running.status == StepStatus.RUNNING
    assert event_line(retry, running) == "retry   lint (retry 1): timed out after 5 s"
    retried = apply_event(running, retry)
    assert retried.retry_count == 1 and retried.status == StepStatus.RUNNING
    assert event_line(done, retried) == "done    lint (40 ms, 1 retry)"
    assert apply_event(retried, done).status == StepStatus.COMPLETED
    failed = event("step_failed", error="exit 2", retries=0)
    assert apply_event(running, failed).error == "exit 2"
    assert event_line(Event(plan_id="p", kind="plan_completed"), None) is None
    assert progress_message([started, done]) == "step 'lint' running; step 'lint' completed"
    assert progress_message([Event(plan_id="p", kind="plan_started")]) is None


def test_a_large_plans_summary_lists_the_steps_that_need_attention_first() -> None:
    plan = ExecutionPlan.new("many")
    for i in range(120):
        plan.add_step("t", "", {}, step_id=f"s{i}").status = StepStatus.COMPLETED
    plan.steps[100].status = StepStatus.FAILED
    plan.steps[7].status = StepStatus.RUNNING
    view = summary_view(plan)
    assert len(view.steps) == SUMMARY_STEPS and view.steps_omitted == 120 - SUMMARY_STEPS
    ids = [s.id for s in view.steps]
    assert ids[:2] == ["s0", "s1"] and "s100" in ids and "s7" in ids  # plan order, attention first
    assert ids == sorted(ids, key=lambda i: int(i[1:]))
