"""Data flow between steps (SPEC section 5): sandboxed jinja2 over earlier results."""

from __future__ import annotations

from typing import Any

import pytest

from mcp_planner.errors import StepError, TemplateError
from mcp_planner.plan.model import StepResult
from mcp_planner.plan.templating import (
    analyse_template,
    contains_template,
    is_template,
    referenced_steps,
    render_parameters,
    template_strings,
)

RESULTS = {
    "fetch": StepResult.from_value({"version": "1.2", "items": [1, 2, 3], "meta": {"n": 3}}),
    "greet": StepResult.from_value("hello"),
    "raw": StepResult(text='{"k": [1, 2]}'),
    "build-1": StepResult.from_value({"ok": True}),
}


def render(value: Any) -> Any:
    return render_parameters({"v": value}, RESULTS)["v"]


def test_a_lone_expression_yields_the_native_value() -> None:
    assert render("{{ steps.fetch.result }}") == {"version": "1.2", "items": [1, 2, 3], "meta": {"n": 3}}
    assert render("  {{ steps.fetch.result.items }}  ") == [1, 2, 3]
    assert render("{{ steps.fetch.result.meta.n + 1 }}") == 4
    assert render("{{ steps.raw.json.k }}") == [1, 2]


def test_a_mixed_string_yields_a_string() -> None:
    assert render("v{{ steps.fetch.result.version }}-rc") == "v1.2-rc"
    assert render("{{ steps.greet.result }} world") == "hello world"
    assert render("{{ steps.fetch.result.meta.n }}{{ steps.fetch.result.meta.n }}") == "33"


def test_result_is_structured_content_or_else_text() -> None:
    assert render("{{ steps.greet.result }}") == "hello"
    assert render("{{ steps.greet.text }}") == "hello"
    assert render("{{ steps.raw.result }}") == '{"k": [1, 2]}'
    assert render("{{ steps.raw.json }}") == {"k": [1, 2]}
    assert render("{{ steps.fetch.text }}") == RESULTS["fetch"].text


def test_a_dict_key_wins_over_a_dict_method_of_the_same_name() -> None:
    assert render("{{ steps.fetch.result.items | length }}") == 3


def test_a_step_id_with_a_dash_is_reachable_by_subscript() -> None:
    assert render("{{ steps['build-1'].result.ok }}") is True


def test_templates_nested_in_lists_and_dicts_are_rendered_and_others_kept() -> None:
    params = {
        "a": ["{{ steps.fetch.result.version }}", 5, None],
        "b": {"c": "x-{{ steps.greet.text }}"},
        "plain": "no template",
    }

    assert render_parameters(params, RESULTS) == {
        "a": ["1.2", 5, None],
        "b": {"c": "x-hello"},
        "plain": "no template",
    }


def test_a_missing_field_fails_naming_the_expression() -> None:
    with pytest.raises(TemplateError, match=r"steps\.fetch\.result\.nope") as caught:
        render("{{ steps.fetch.result.nope }}")
    assert "nope" in str(caught.value)
    assert caught.value.retryable is False


def test_a_missing_key_fails_listing_the_keys_that_exist_and_the_closest() -> None:
    with pytest.raises(TemplateError) as caught:
        render("v{{ steps.fetch.result.vresion }}")
    message = str(caught.value)
    assert "no key 'vresion'; the keys are 'version', 'items', 'meta'; did you mean 'version'?" in message
    with pytest.raises(
        TemplateError,
        match="the keys are 'result', 'text', 'json', 'status', 'error', 'items'; did you mean 'result'",
    ):
        render("{{ steps.fetch.reslt }}")


def test_a_missing_key_of_a_large_result_lists_only_the_first_keys() -> None:
    big = {"b": StepResult.from_value({f"key{i}": i for i in range(5000)})}
    with pytest.raises(TemplateError) as caught:
        render_parameters({"v": "{{ steps.b.result.key_1 }}"}, big)
    message = str(caught.value)
    assert "'key19' and 4980 more" in message and "'key20'" not in message
    assert "did you mean 'key1'?" in message


def test_a_missing_step_fails_naming_the_expression() -> None:
    with pytest.raises(TemplateError, match=r"steps\.ghost\.result"):
        render("prefix {{ steps.ghost.result }}")


def test_json_of_text_that_is_not_json_fails() -> None:
    with pytest.raises(TemplateError, match=r"steps\.greet\.json"):
        render("{{ steps.greet.json }}")


def test_syntax_errors_and_runtime_errors_are_template_errors() -> None:
    with pytest.raises(TemplateError):
        render("{{ steps.fetch.result")
    with pytest.raises(TemplateError, match="ZeroDivisionError"):
        render("{{ 1 / 0 }}")


@pytest.mark.parametrize(
    "expression",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ().__class__.__base__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__.os }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ lipsum.__globals__ }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ range.__self__ }}",
        "{{ range.__class__ }}",
        "{{ steps.fetch.result.__class__ }}",
        "{{ steps.fetch.__class__ }}",
        "{{ steps.fetch._result }}",
        "{{ steps.__class__.__init__ }}",
        "{{ steps.fetch.result.update({'x': 1}) }}",
        "{{ steps.fetch.result['items'].append(4) }}",
        "{{ config }}",
        "{{ request.application.__globals__ }}",
        "x {{ self.__init__.__globals__ }} y",
    ],
)
def test_reaching_python_internals_is_an_error_not_a_leak(expression: str) -> None:
    with pytest.raises(TemplateError):
        render(expression)
    assert RESULTS["fetch"].structured["items"] == [1, 2, 3]  # nothing was mutated


def test_template_errors_are_step_errors_that_are_not_retried() -> None:
    assert issubclass(TemplateError, StepError)
    assert TemplateError.retryable is False


def test_referenced_steps_are_found_in_nested_values() -> None:
    params = {
        "a": "{{ steps.fetch.result }}",
        "b": ["{{ steps['build-1'].text }} and {{ steps.greet.text }}"],
        "c": {"d": "{% for i in steps.raw.json.k %}{{ i }}{% endfor %}"},
        "e": "no {{ template",
        "f": 3,
    }

    assert referenced_steps(params) == {"fetch", "build-1", "greet", "raw"}


def test_is_template_and_contains_template() -> None:
    assert is_template("{{ x }}")
    assert is_template("{% if x %}{% endif %}")
    assert is_template("{# note #}")
    assert not is_template("plain")
    assert not is_template(5)
    assert contains_template({"a": [1, {"b": "{{ steps.x.result }}"}]})
    assert not contains_template({"a": [1, {"b": "plain"}]})


def test_one_analysis_gives_references_syntax_errors_and_names_the_sandbox_does_not_have() -> None:
    assert analyse_template("{{ steps.a.result }} {{ steps['b-1'].text }}").refs == {"a", "b-1"}
    looped = analyse_template("{% for i in steps.a.json %}{{ i ~ loop.index ~ namespace() }}{% endfor %}")
    assert looped.refs == {"a"} and looped.unknown_names == () and looped.syntax_error is None
    # lipsum is a jinja2 global that the sandbox removes: a plan using it fails validation, not at run time.
    assert analyse_template("{{ lipsum() ~ secret }}").unknown_names == ("lipsum", "secret")
    broken = analyse_template("{{ steps.a.result ")
    assert broken.syntax_error is not None and broken.refs == frozenset()


def test_template_strings_name_the_field_of_each_template() -> None:
    params = {"a": "{{ steps.x.text }}", "b": [1, {"c": "{% if 1 %}y{% endif %}"}], "d": "plain"}

    assert list(template_strings(params)) == [
        ("parameters.a", "{{ steps.x.text }}"),
        ("parameters.b[1].c", "{% if 1 %}y{% endif %}"),
    ]
