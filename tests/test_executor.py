"""The executor's scheduling, error strategies, retries, timeouts, data flow, hooks and events."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
from tenacity import RetryCallState
from test_executor_support import Tools, new_plan, statuses

from mcp_planner import Executor, PlanStatus, StepStatus
from mcp_planner.engine.attempts import retry_policy
from mcp_planner.errors import StepError

pytestmark = pytest.mark.anyio


# -- scheduling ---------------------------------------------------------------------------------------------


async def test_a_step_starts_as_soon_as_its_dependencies_complete_while_an_unrelated_step_runs() -> None:
    tools = Tools()
    plan = new_plan(parallel=3)
    plan.add_step("hold", "long, unrelated", {"key": "long"}, step_id="long")
    plan.add_step("ok", "quick", {}, step_id="quick")
    plan.add_step("hold", "after quick", {"key": "next"}, step_id="next").depends_on = ["quick"]
    executor = Executor(tools)
    async with anyio.create_task_group() as tg:
        tg.start_soon(executor.execute, plan)
        with anyio.fail_after(5):
            await tools.started["next"].wait()
        assert plan.step("long").status == StepStatus.RUNNING
        assert plan.step("quick").status == StepStatus.COMPLETED
        tools.release["next"].set()
        tools.release["long"].set()
    assert plan.status == PlanStatus.COMPLETED


async def test_no_more_than_max_parallel_steps_run_at_once() -> None:
    tools = Tools()
    tools.busy_at = 2
    plan = new_plan(parallel=2)
    for i in range(6):
        plan.add_step("slot", f"s{i}", {"i": i})
    executor = Executor(tools)
    async with anyio.create_task_group() as tg:
        tg.start_soon(executor.execute, plan)
        with anyio.fail_after(5):
            await tools.all_busy.wait()
        assert len(tools.calls) == 2
        tools.gate.set()
    assert tools.max_active == 2
    assert plan.status == PlanStatus.COMPLETED


async def test_steps_run_one_at_a_time_when_parallel_execution_is_off() -> None:
    tools = Tools()
    plan = new_plan()
    plan.options.max_parallel_steps = 8  # ignored without allow_parallel
    for i in range(5):
        plan.add_step("ok", f"s{i}", {"i": i})
    await Executor(tools).execute(plan)
    assert tools.max_active == 1
    assert [p["i"] for p in tools.called()] == [0, 1, 2, 3, 4]


async def test_the_ready_step_with_the_lowest_index_goes_first() -> None:
    tools = Tools()
    plan = new_plan()
    plan.add_step("ok", "", {"id": "s0"}, step_id="s0")
    plan.add_step("ok", "", {"id": "s1"}, step_id="s1").depends_on = ["s2"]
    plan.add_step("ok", "", {"id": "s2"}, step_id="s2")
    plan.add_step("ok", "", {"id": "s3"}, step_id="s3")
    await Executor(tools).execute(plan)
    assert [p["id"] for p in tools.called()] == ["s0", "s2", "s1", "s3"]


async def test_a_failed_dependency_skips_its_dependents_in_a_cascade() -> None:
    tools = Tools()
    plan = new_plan(continue_on_error=True)
    plan.add_step("fail", "", {}, step_id="a")
    plan.add_step("ok", "", {}, step_id="b").depends_on = ["a"]
    plan.add_step("ok", "", {}, step_id="c").depends_on = ["b"]
    plan.add_step("ok", "", {}, step_id="d")
    summary = await Executor(tools).execute(plan)
    assert statuses(plan) == {"a": "failed", "b": "skipped", "c": "skipped", "d": "completed"}
    assert plan.step("b").error == "dependency a did not complete"
    assert plan.step("c").error == "dependency b did not complete"
    assert summary.status == PlanStatus.PARTIAL


# -- error strategies and final status ---------------------------------------------------------------------


async def test_stop_on_error_lets_running_steps_finish_and_skips_every_step_not_started() -> None:
    tools = Tools()
    failed = anyio.Event()
    plan = new_plan(parallel=2, stop_on_error=True)
    plan.add_step("hold", "", {"key": "a"}, step_id="a")
    plan.add_step("fail", "", {}, step_id="b")
    plan.add_step("ok", "", {}, step_id="c")
    plan.add_step("ok", "", {}, step_id="d").depends_on = ["a"]
    executor = Executor(tools, on_step_failed=lambda plan, step, err: failed.set())
    async with anyio.create_task_group() as tg:
        tg.start_soon(executor.execute, plan)
        with anyio.fail_after(5):
            await failed.wait()
        assert plan.step("a").status == StepStatus.RUNNING
        tools.release["a"].set()
    assert statuses(plan) == {"a": "completed", "b": "failed", "c": "skipped", "d": "skipped"}
    assert plan.step("c").error == "not run: plan stopped after step b failed"
    assert plan.status == PlanStatus.FAILED
    assert [p for p in tools.called("ok")] == []


@pytest.mark.parametrize(
    ("stop_on_error", "continue_on_error"), [(False, True), (True, True), (False, False)], ids=str
)
async def test_without_stop_on_error_everything_that_can_still_run_runs(
    stop_on_error: bool, continue_on_error: bool
) -> None:
    tools = Tools()
    plan = new_plan(stop_on_error=stop_on_error, continue_on_error=continue_on_error)
    plan.add_step("fail", "", {}, step_id="a")
    plan.add_step("ok", "", {}, step_id="b")
    plan.add_step("ok", "", {}, step_id="c").depends_on = ["a"]
    await Executor(tools).execute(plan)
    assert statuses(plan) == {"a": "failed", "b": "completed", "c": "skipped"}
    assert plan.status == PlanStatus.PARTIAL


async def test_a_plan_whose_steps_all_complete_is_completed() -> None:
    plan = new_plan()
    plan.add_step("ok", "", {})
    plan.add_step("ok", "", {})
    summary = await Executor(Tools()).execute(plan)
    assert summary.status == PlanStatus.COMPLETED
    assert summary.progress == 100.0
    assert plan.error is None
    assert plan.completed_at is not None


async def test_a_plan_where_no_step_completed_is_failed_even_when_continuing() -> None:
    plan = new_plan(continue_on_error=True)
    plan.add_step("fail", "", {}, step_id="a")
    plan.add_step("ok", "", {}, step_id="b").depends_on = ["a"]
    summary = await Executor(Tools()).execute(plan)
    assert summary.status == PlanStatus.FAILED
    assert "'a'" in (plan.error or "")


# -- retries and timeouts -----------------------------------------------------------------------------------


async def test_a_retryable_failure_is_retried_max_retries_times_and_counted() -> None:
    tools = Tools()
    plan = new_plan()
    step = plan.add_step("fail", "", {"message": "nope"}, step_id="a")
    step.max_retries = 3
    step.retry_delay_ms = 1
    executor = Executor(tools)
    await executor.execute(plan)
    assert len(tools.called("fail")) == 4
    assert step.retry_count == 3
    assert step.status == StepStatus.FAILED
    assert step.error == "nope"
    retries = [e for e in await executor.store.events(plan.id) if e.kind == "step_retry"]
    assert [e.data["retry"] for e in retries] == [1, 2, 3]


async def test_a_flaky_step_completes_after_retries_and_counts_only_the_retries_made() -> None:
    tools = Tools()
    plan = new_plan()
    step = plan.add_step("flaky", "", {"key": "x", "failures": 2}, step_id="a")
    step.max_retries = 5
    step.retry_delay_ms = 1
    await Executor(tools).execute(plan)
    assert step.status == StepStatus.COMPLETED
    assert step.retry_count == 2
    assert step.error is None


async def test_the_wait_before_retry_n_is_delay_times_backoff_to_the_n_minus_1() -> None:
    tools = Tools()
    plan = new_plan(retry_backoff=2.0)
    step = plan.add_step("fail", "", {}, step_id="a")
    step.max_retries = 3
    step.retry_delay_ms = 2
    executor = Executor(tools)
    await executor.execute(plan)
    delays = [e.data["delay_ms"] for e in await executor.store.events(plan.id) if e.kind == "step_retry"]
    assert delays == [2, 4, 8]


def test_the_retry_policy_is_built_from_the_step_fields() -> None:
    plan = new_plan()
    step = plan.add_step("fail", "", {})
    step.max_retries = 2
    step.retry_delay_ms = 1000
    policy = retry_policy(step, 3.0, lambda state: None)
    state = RetryCallState(policy, fn=None, args=(), kwargs={})
    waits = []
    for attempt in (1, 2, 3):
        state.attempt_number = attempt
        waits.append(policy.wait(state))
    assert waits == [1.0, 3.0, 9.0]
    state.attempt_number = 2
    assert not policy.stop(state)
    state.attempt_number = 3
    assert policy.stop(state)


async def test_non_retryable_errors_are_not_retried() -> None:
    tools = Tools()
    plan = new_plan()
    step = plan.add_step("fatal", "", {}, step_id="a")
    step.max_retries = 3
    step.retry_delay_ms = 1
    await Executor(tools).execute(plan)
    assert len(tools.called("fatal")) == 1
    assert step.retry_count == 0
    assert step.status == StepStatus.FAILED


async def test_an_attempt_past_its_timeout_fails_and_is_retried() -> None:
    tools = Tools()
    plan = new_plan()
    step = plan.add_step("hang", "", {}, step_id="a")
    step.timeout_ms = 20
    step.max_retries = 1
    step.retry_delay_ms = 1
    await Executor(tools).execute(plan)
    assert len(tools.called("hang")) == 2
    assert step.retry_count == 1
    assert step.status == StepStatus.FAILED
    assert "timed out" in (step.error or "") and "20 ms" in (step.error or "")


async def test_the_plan_step_timeout_bounds_steps_without_their_own() -> None:
    tools = Tools()
    plan = new_plan(step_timeout_ms=20, continue_on_error=True)
    plan.add_step("hang", "", {}, step_id="a")
    plan.add_step("ok", "", {}, step_id="b")
    await Executor(tools).execute(plan)
    assert statuses(plan) == {"a": "failed", "b": "completed"}
    assert tools.cancelled == ["hang"]


async def test_the_total_timeout_cancels_running_calls_and_fails_the_plan() -> None:
    tools = Tools()
    plan = new_plan(parallel=2, total_timeout_ms=50)
    plan.add_step("hang", "", {"key": "a"}, step_id="a")
    plan.add_step("hang", "", {"key": "b"}, step_id="b")
    plan.add_step("ok", "", {}, step_id="c").depends_on = ["a"]
    summary = await Executor(tools).execute(plan)
    assert statuses(plan) == {"a": "failed", "b": "failed", "c": "skipped"}
    assert plan.step("a").error == "total timeout exceeded"
    assert sorted(tools.cancelled) == ["a", "b"]
    assert summary.status == PlanStatus.FAILED
    assert "total timeout" in (plan.error or "")


# -- data flow ----------------------------------------------------------------------------------------------


async def test_results_flow_into_later_steps_through_templates() -> None:
    tools = Tools()
    plan = new_plan()
    plan.add_step("ok", "", {"version": "1.2", "n": 3}, step_id="build")
    plan.add_step(
        "ok",
        "",
        {"tag": "v{{ steps.build.result.version }}-rc", "whole": "{{ steps.build.result }}"},
        step_id="t",
    )
    await Executor(tools).execute(plan)
    assert plan.step("t").depends_on == ["build"]
    assert tools.called()[1] == {"tag": "v1.2-rc", "whole": {"version": "1.2", "n": 3}}
    assert plan.step("t").result is not None
    assert plan.step("t").result.value == {"tag": "v1.2-rc", "whole": {"version": "1.2", "n": 3}}


async def test_a_template_naming_a_missing_field_fails_the_step_without_retry() -> None:
    tools = Tools()
    plan = new_plan()
    plan.add_step("ok", "", {"version": "1.2"}, step_id="build")
    step = plan.add_step("ok", "", {"tag": "{{ steps.build.result.nope }}"}, step_id="t")
    step.max_retries = 3
    step.retry_delay_ms = 1
    await Executor(tools).execute(plan)
    assert step.status == StepStatus.FAILED
    assert step.retry_count == 0
    assert "steps.build.result.nope" in (step.error or "")
    assert len(tools.called()) == 1


async def test_rendered_parameters_are_checked_against_the_tool_input_schema() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    tools = Tools(schemas={"flaky": schema})
    plan = new_plan()
    plan.add_step("ok", "", {"n": "three"}, step_id="src")
    step = plan.add_step(
        "flaky", "", {"key": "k", "failures": 0, "n": "{{ steps.src.result.n }}"}, step_id="t"
    )
    step.max_retries = 2
    await Executor(tools).execute(plan)
    assert step.status == StepStatus.FAILED
    assert "input schema" in (step.error or "") and "'three'" in (step.error or "")
    assert step.retry_count == 0
    assert tools.called("flaky") == []


# -- hooks and events ---------------------------------------------------------------------------------------


async def test_plain_and_async_hooks_see_every_step_a_failed_steps_error_and_the_plan_end() -> None:
    seen: list[tuple[str, ...]] = []

    def on_start(plan: Any, step: Any) -> None:
        seen.append(("start", step.id))

    async def on_complete(plan: Any, step: Any) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(("complete", step.id))

    async def on_failed(plan: Any, step: Any, err: StepError) -> None:
        assert isinstance(err, StepError)
        seen.append(("failed", step.id, str(err)))

    def on_plan(plan: Any) -> None:
        seen.append(("plan", plan.status.value))

    plan = new_plan(continue_on_error=True)
    plan.add_step("ok", "", {}, step_id="a")
    plan.add_step("fail", "", {"message": "disk full"}, step_id="b")
    executor = Executor(
        Tools(),
        on_step_start=on_start,
        on_step_complete=on_complete,
        on_step_failed=on_failed,
        on_plan_complete=on_plan,
    )
    await executor.execute(plan)
    assert seen == [
        ("start", "a"),
        ("complete", "a"),
        ("start", "b"),
        ("failed", "b", "disk full"),
        ("plan", "partial"),
    ]
    assert plan.step("b").error == "disk full"


async def test_a_hook_that_raises_is_logged_and_does_not_break_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("hook bug")

    async def broken_async(*args: Any) -> None:
        raise ValueError("async hook bug")

    plan = new_plan()
    plan.add_step("ok", "", {}, step_id="a")
    plan.add_step("ok", "", {}, step_id="b")
    executor = Executor(Tools(), on_step_start=broken, on_step_complete=broken_async, on_plan_complete=broken)
    with caplog.at_level(logging.ERROR, logger="mcp_planner.engine.executor"):
        summary = await executor.execute(plan)
    assert summary.status == PlanStatus.COMPLETED
    assert "hook bug" in caplog.text and "async hook bug" in caplog.text


async def test_every_transition_is_recorded_in_the_event_log() -> None:
    plan = new_plan(continue_on_error=True)
    plan.add_step("ok", "", {}, step_id="a")
    flaky = plan.add_step("flaky", "", {"key": "f", "failures": 1}, step_id="f")
    flaky.max_retries = 1
    flaky.retry_delay_ms = 1
    plan.add_step("fail", "", {}, step_id="x")
    plan.add_step("ok", "", {}, step_id="y").depends_on = ["x"]
    executor = Executor(Tools())
    await executor.execute(plan)
    events = [(e.kind, e.step_id) for e in await executor.store.events(plan.id)]
    assert events == [
        ("plan_approved", None),
        ("plan_started", None),
        ("step_started", "a"),
        ("step_completed", "a"),
        ("step_started", "f"),
        ("step_retry", "f"),
        ("step_completed", "f"),
        ("step_started", "x"),
        ("step_failed", "x"),
        ("step_skipped", "y"),
        ("plan_partial", None),
    ]
    seqs = [e.seq for e in await executor.store.events(plan.id)]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_the_total_timeout_still_bounds_steps_left_running_after_a_stop_on_error() -> None:
    tools = Tools()
    plan = new_plan(parallel=2, total_timeout_ms=100)
    plan.add_step("hang", "", {"key": "a"}, step_id="a")
    plan.add_step("fail", "", {}, step_id="b")
    plan.add_step("ok", "", {}, step_id="c")
    with anyio.fail_after(10):
        summary = await Executor(tools).execute(plan)
    assert statuses(plan) == {"a": "failed", "b": "failed", "c": "skipped"}
    assert plan.step("a").error == "total timeout exceeded"
    assert summary.status == PlanStatus.FAILED
