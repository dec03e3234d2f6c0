"""Templates under hard limits (SPEC section 12): a time budget, an output cap, and off the event loop."""

from __future__ import annotations

import functools
from typing import Any

import anyio
import pytest
from test_executor_support import Tools, new_plan

from mcp_planner import Executor, PlanStatus, StepStatus
from mcp_planner.errors import TemplateError
from mcp_planner.plan import sandbox
from mcp_planner.plan.model import StepResult
from mcp_planner.plan.sandbox import OUTPUT_CAP, Budget
from mcp_planner.plan.templating import render_parameters

RESULTS = {"x": StepResult.from_value("hello"), "big": StepResult(text="y" * (OUTPUT_CAP + 10))}
FREEZE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(autouse=True)
def short_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "TIME_BUDGET_S", 0.2)


def render(value: Any) -> Any:
    return render_parameters({"v": value}, RESULTS)["v"]


@pytest.mark.parametrize(
    "template",
    [
        FREEZE,
        "{% for i in 'a' * 1000000 %}{% for j in 'a' * 1000000 %}{% endfor %}{% endfor %}",
        "{{ ([[1]] * 100000)|sum(start=[])|length }}",
    ],
)
def test_a_template_that_works_past_its_budget_fails_naming_the_budget(template: str) -> None:
    with pytest.raises(TemplateError, match=r"0\.2 s template time budget") as caught:
        render(template)
    assert repr(template) in str(caught.value)
    assert caught.value.retryable is False


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'a' * 10**9 }}",
        "x {{ 10**9 * 'a' }} y",
        "{{ ['a'] * 10**9 }}",
        "{{ '{:>1000000000}'.format(1) }}",
        "{{ '{:>{w}}'.format(1, w=10**9) }}",
        "{{ '{:.1000000000f}'.format(1) }}",
        "{{ '{0}{0}{0}'.format('a' * 500000) }}",
        "{{ '%.1000000000f' % 1 }}",
        "{{ '%*d' % (10**9, 1) }}",
        "{{ '%(a)s%(a)s%(a)s' % {'a': 'x' * 500000} }}",
        "{{ '%1000000000s'|format(1) }}",
        "{{ 'a'|center(10**9) }}",
        "{{ 'a'.center(10**9) }}",
        "{{ 'a'.ljust(10**9) }}",
        "{{ 'a'.rjust(10**9) }}",
        "{{ 'a'.zfill(10**9) }}",
        "{{ '\\t'.expandtabs(10**9) }}",
        "{{ ('a'|safe).center(10**9) }}",
        "{{ ('{:>1000000000}'|safe).format(1) }}",
        "{{ 'a'|indent(10**9, true) }}",
        "{{ ('a\\n' * 400000)|indent(10) }}",
        "{{ ('x' * 1000000).replace('x', 'yy') }}",
        "{{ ('x' * 1000000)|replace('', 'y') }}",
        "{{ ('x' * 1000)|wordwrap(1, wrapstring='y' * 10000) }}",
        "{{ ('a' * 1000000).join(['b', 'c']) }}",
        "{{ range(100000)|join('a' * 100000) }}",
        "{{ range(100000)|map('center', 100000)|list }}",
        "{% set s = 'a' * 1000000 %}{{ s ~ s }}",
        "{% set s = 'a' * 1000000 %}{{ [s, s] }}",
        "{% set s = 'a' * 1000000 %}{{ [s, s]|tojson }}",
        "{% set s = 'a' * 1000000 %}{{ '%s%s' % (s, s) }}",
        "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{% macro f(s, n) %}{{ f(s ~ s, n - 1) if n else s|length }}{% endmacro %}{{ f('a', 64) }}",
        "{% set s %}{% for i in range(100000) %}{{ 'a' * 100000 }}{% endfor %}{% endset %}{{ s|length }}",
        "{% filter upper %}{% for i in range(100000) %}{{ 'a' * 100000 }}{% endfor %}{% endfilter %}",
        "{% for i in range(100000) %}{{ 'a' * 1000 }}{% endfor %}",
        "{{ steps.big.text }}",
    ],
)
def test_a_template_whose_result_would_pass_the_cap_fails_before_building_it(template: str) -> None:
    with pytest.raises(TemplateError, match="1 MiB template output cap") as caught:
        render(template)
    assert repr(template) in str(caught.value)
    assert caught.value.retryable is False


@pytest.mark.parametrize(
    ("template", "limit"),
    [
        ("{{ 2 ** 1000000 }}", "100000-bit limit"),
        ("{{ range(10**9) }}", "MAX_RANGE"),
        ("{{ range(10)|batch(10**9, 0)|list }}", "at most 100000 items"),
        ("{{ range(10)|slice(10**9)|list }}", "at most 100000 slices"),
        ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
        ("{{ ('<' * 100000)|striptags }}", "No filter named 'striptags'"),
        ("{{ 'a'.encode('punycode') }}", "only the codecs"),
    ],
)
def test_operations_without_a_bounded_cost_are_refused(template: str, limit: str) -> None:
    with pytest.raises(TemplateError, match=limit):
        render(template)


def test_results_up_to_the_cap_and_loops_over_larger_data_still_render() -> None:
    assert render(f"{{{{ 'a' * {OUTPUT_CAP} }}}}") == "a" * OUTPUT_CAP
    assert render("{{ steps.big.text|length }}") == OUTPUT_CAP + 10
    assert render("{% for c in steps.big.text[:5] %}{{ c }}{% endfor %}") == "yyyyy"
    assert render("{{ '{:>5}|{:.2f}'.format('a', 2) }} {{ '%03d' % 7 }} {{ 'ab'|center(6) }}") == (
        "    a|2.00 007   ab  "
    )
    assert render("{{ [1, 2]|join(',') }} {{ [[1], [2]]|sum(start=[]) }} {{ 'a b c'|wordwrap(2) }}") == (
        "1,2 [1, 2] a\nb\nc"
    )
    assert render("{% set ns = namespace(n=0) %}{% for i in range(4) %}{% set ns.n = ns.n + i %}{% endfor %}"
                  "{{ ns.n }}") == "6"  # fmt: skip


def test_a_step_prints_as_its_text_never_as_an_object() -> None:
    assert render("{{ '%s' % steps.x }}") == "hello"
    assert render("{{ steps.x }}") == "hello"
    assert render("[{{ steps.x }}]") == "[hello]"
    assert render("{{ steps.x|string }}") == "hello"
    small = {"x": RESULTS["x"]}
    assert render_parameters({"v": "{{ '%s' % steps }}"}, small)["v"] == "{'x': 'hello'}"


def test_an_abandoned_render_stops_at_its_next_check() -> None:
    budget = Budget(60)
    budget.stop()
    with pytest.raises(TemplateError, match="abandoned"):
        render_parameters({"v": FREEZE}, RESULTS, budget=budget)


@pytest.mark.anyio
async def test_a_render_abandoned_on_its_thread_ends_when_stopped() -> None:
    budget = Budget(60)
    outcome: list[BaseException] = []

    async def run() -> None:
        try:
            await anyio.to_thread.run_sync(
                functools.partial(render_parameters, {"v": FREEZE}, {}, budget=budget)
            )
        except TemplateError as exc:
            outcome.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            budget.stop()
    assert "abandoned" in str(outcome[0])


# -- through the executor -----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("template", "limit"), [(FREEZE, "template time budget"), ("{{ 'a' * 10**9 }}", "template output cap")]
)
async def test_a_template_over_a_limit_fails_its_step_without_retry(template: str, limit: str) -> None:
    tools = Tools()
    plan = new_plan()
    step = plan.add_step("ok", "", {"v": template}, step_id="bad")
    step.max_retries = 3
    with anyio.fail_after(5):
        await Executor(tools).execute(plan)
    assert step.status == StepStatus.FAILED and step.retry_count == 0
    assert limit in (step.error or "")
    assert tools.called() == []


@pytest.mark.anyio
async def test_other_steps_run_while_a_freezing_template_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "TIME_BUDGET_S", 60)  # the render outlasts the test unless it is abandoned
    tools = Tools()
    plan = new_plan(parallel=2)
    plan.add_step("ok", "", {"v": FREEZE}, step_id="bad")
    plan.add_step("hold", "", {"key": "ping"}, step_id="ping")
    plan.add_step("hold", "", {"key": "after"}, step_id="after").depends_on = ["ping"]
    executor = Executor(tools)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(executor.execute, plan)
            await tools.started["ping"].wait()
            tools.release["ping"].set()
            await tools.started["after"].wait()  # `ping` completed and `after` started ...
            assert plan.step("bad").status == StepStatus.RUNNING  # ... while `bad` was still rendering
            await executor.cancel(plan, "enough")
    assert plan.status == PlanStatus.CANCELLED
    assert plan.step("bad").status == StepStatus.SKIPPED
    assert tools.called("ok") == []
