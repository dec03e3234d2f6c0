"""Data flow between steps: parameters holding jinja2 expressions over earlier steps' results.

Rendering happens in an `ImmutableSandboxedEnvironment` with `StrictUndefined`: no route to Python internals,
and a reference to anything missing is an error naming the expression, never an empty string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TemplateError

if TYPE_CHECKING:
    from .model import StepResult


class _DataEnvironment(ImmutableSandboxedEnvironment):
    """`steps.x.result.items` is the result's "items" key, never the bound `dict.items` method."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping):
            try:
                return obj[attribute]
            except (KeyError, TypeError):
                pass
        return super().getattr(obj, attribute)


_ENV = _DataEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
_LONE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>.*)\}\}\s*$", re.DOTALL)
_MARKERS = ("{{", "{%", "{#")


def is_template(value: Any) -> bool:
    return isinstance(value, str) and any(m in value for m in _MARKERS)


def contains_template(value: Any) -> bool:
    """True if `value` or anything nested in it is a template string."""
    return any(is_template(s) for s in _strings(value))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def referenced_steps(value: Any) -> set[str]:
    """Ids of the steps that the templates in `value` refer to (`steps.<id>` or `steps['<id>']`).

    A string that does not parse refers to nothing here; rendering reports the syntax error later.
    """
    found: set[str] = set()
    for text in _strings(value):
        if not is_template(text):
            continue
        try:
            ast = _ENV.parse(text)
        except jinja2.TemplateSyntaxError:
            continue
        for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
            target = node.node  # type: ignore[attr-defined]
            if not (isinstance(target, nodes.Name) and target.name == "steps"):
                continue
            if isinstance(node, nodes.Getattr):
                found.add(node.attr)
            elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
                if isinstance(node.arg.value, str):
                    found.add(node.arg.value)
    return found


class _StepView(Mapping[str, Any]):
    """`steps.<id>` inside a template: `result`, `text`, and `json` (the text parsed, on demand)."""

    def __init__(self, step_id: str, result: StepResult) -> None:
        self._id = step_id
        self._result = result

    def __getitem__(self, key: str) -> Any:
        if key == "result":
            return self._result.value
        if key == "text":
            return self._result.text
        if key == "json":
            try:
                return json.loads(self._result.text)
            except ValueError as exc:
                raise TemplateError(f"steps.{self._id}.json: the step's text is not JSON ({exc})") from exc
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(("result", "text", "json"))

    def __len__(self) -> int:
        return 3


def render_parameters(parameters: dict[str, Any], results: Mapping[str, StepResult]) -> dict[str, Any]:
    """Render every template in `parameters` against the results of completed steps.

    A string that is exactly one expression yields the expression's value (dict, list, number); any other
    template string yields a string.

    Raises:
        TemplateError: a syntax error, a missing step or field, or an attempt to reach Python internals.
    """
    context = {"steps": {sid: _StepView(sid, r) for sid, r in results.items()}}
    rendered = _render(parameters, context)
    assert isinstance(rendered, dict)
    return rendered


def _render(value: Any, context: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return _render_string(value, context) if is_template(value) else value
    if isinstance(value, dict):
        return {k: _render(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, context) for v in value]
    return value


def _render_string(text: str, context: dict[str, Any]) -> Any:
    try:
        lone = _LONE_EXPRESSION.match(text)
        if lone and not any(m in lone.group("expr") for m in (*_MARKERS, "}}")):
            value = _ENV.compile_expression(lone.group("expr"), undefined_to_none=False)(**context)
            if isinstance(value, jinja2.Undefined):
                str(value)  # raises the undefined (or security) error with its message
            return value
        return _ENV.from_string(text).render(**context)
    except TemplateError:
        raise
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"template {text!r}: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise TemplateError(f"template {text!r}: {exc}") from exc
    except Exception as exc:  # anything a filter or operator raised on the given values
        raise TemplateError(f"template {text!r}: {type(exc).__name__}: {exc}") from exc
