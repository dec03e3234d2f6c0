"""Data flow between steps: parameters holding jinja2 expressions over earlier steps' results.

Rendering happens in the sandbox of `sandbox.py` with `StrictUndefined`: no route to Python internals, a
reference to anything missing is an error naming the expression, never an empty string, and a render is held
to a time budget and an output cap. `render_parameters_off_loop` renders on a worker thread, so a template
that works for its whole budget never stalls the event loop.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import jinja2
from jinja2 import nodes

from mcp_planner.errors import TemplateError
from mcp_planner.plan import sandbox
from mcp_planner.plan.sandbox import (
    Budget,
    LimitedEnvironment,
    TextLike,
    check_deadline,
    check_length,
    check_size,
    time_budget,
)

if TYPE_CHECKING:
    from mcp_planner.plan.model import Step, StepResult

#: How long past its budget a render on a worker thread is awaited before the step fails without it (the
#: thread itself stops at its next sandbox check).
_ABANDON_GRACE_S = 0.5
#: Longest piece of a template quoted in an error message.
_QUOTED_CHARS = 200

_ENV = LimitedEnvironment()
_LONE_EXPRESSION = re.compile(r"^[ \t]*\{\{(?P<expr>.*)\}\}[ \t]*\Z", re.DOTALL)
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


def template_strings(value: Any, path: str = "parameters") -> Iterator[tuple[str, str]]:
    """(field path, text) of every template string in `value`, e.g. `("parameters.items[0]", "{{ ... }}")`."""
    if isinstance(value, str):
        if is_template(value):
            yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from template_strings(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from template_strings(v, f"{path}[{i}]")


#: The names a template may read: `steps` everywhere; `inputs` (the plan's input values); `item` and
#: `item_index` in a `for_each` step's parameters and check; `result` in a `fail_if` check.
CONTEXT_NAMES = frozenset({"steps", "inputs", "item", "item_index", "result"})
#: Strings a condition's text may render to that mean false (case and spaces aside).
_FALSE_TEXTS = frozenset({"", "false", "0", "no", "none", "null", "off"})


@dataclass(frozen=True)
class TemplateAnalysis:
    """What can be known about one template string without rendering it."""

    #: jinja2's message when the text does not parse; then nothing else is known.
    syntax_error: str | None = None
    #: Ids of the steps it refers to (`steps.<id>` or `steps['<id>']`).
    refs: frozenset[str] = frozenset()
    #: Names of the inputs it refers to (`inputs.<name>` or `inputs['<name>']`).
    input_refs: frozenset[str] = frozenset()
    #: The context names it reads (of `CONTEXT_NAMES`).
    names: frozenset[str] = frozenset()
    #: Names it reads that no template has (only `CONTEXT_NAMES`, loop variables and the sandbox's globals).
    unknown_names: tuple[str, ...] = ()


# A simple path over a step's result or an input (`steps.x.result.items[0]`, `steps['build-1'].text`,
# `inputs.pattern`): by far the most common template, and parsing it with jinja2 costs ~0.3 ms, too much
# for a 10,000-step plan.
_SIMPLE_EXPRESSION = re.compile(
    r"""\{\{\s*(?P<root>steps|inputs)(?:\.(?P<attr>[A-Za-z_]\w*)|\[(?P<q>['"])(?P<key>[^'"]*)(?P=q)\])"""
    r"""(?:\.[A-Za-z_]\w*|\[\d+\]|\[(?P<q2>['"])[^'"]*(?P=q2)\])*\s*\}\}"""
)
_EXPRESSION = re.compile(r"\{\{.*?\}\}", re.DOTALL)


@functools.lru_cache(maxsize=4096)
def analyse_template(text: str) -> TemplateAnalysis:
    """Parse `text` once (in the sandbox's own environment) and say what it refers to and what is wrong."""
    if "{%" not in text and "{#" not in text:
        found: dict[str, set[str]] = {"steps": set(), "inputs": set()}
        for match in _EXPRESSION.finditer(text):
            simple = _SIMPLE_EXPRESSION.fullmatch(match.group())
            if simple is None:
                break
            found[simple.group("root")].add(simple.group("attr") or simple.group("key"))
        else:
            if "{{" not in _EXPRESSION.sub("", text):
                return TemplateAnalysis(
                    refs=frozenset(found["steps"]),
                    input_refs=frozenset(found["inputs"]),
                    names=frozenset(root for root, refs in found.items() if refs),
                )
    try:
        ast = _ENV.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return TemplateAnalysis(syntax_error=exc.message or str(exc))
    refs: dict[str, set[str]] = {"steps": set(), "inputs": set()}
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Getattr):
            target, name = node.node, node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            target, name = node.node, node.arg.value
        else:
            continue
        if isinstance(target, nodes.Name) and target.name in refs and isinstance(name, str):
            refs[target.name].add(name)
    loaded = {n.name for n in ast.find_all(nodes.Name) if n.ctx == "load"}
    stored = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    free = loaded - stored
    unknown = free - CONTEXT_NAMES - {"loop"} - set(_ENV.globals)
    return TemplateAnalysis(
        refs=frozenset(refs["steps"]),
        input_refs=frozenset(refs["inputs"]),
        names=frozenset(free & CONTEXT_NAMES),
        unknown_names=tuple(sorted(unknown)),
    )


def referenced_steps(value: Any) -> set[str]:
    """Ids of the steps that the templates in `value` refer to (`steps.<id>` or `steps['<id>']`).

    A string that does not parse refers to nothing here; validation and rendering report the syntax error.
    """
    found: set[str] = set()
    for _, text in template_strings(value):
        found |= analyse_template(text).refs
    return found


def condition_template(text: str) -> str:
    """A `when` or `fail_if` as a template: written bare (`steps.a.status == 'failed'`), one expression."""
    return text if is_template(text) else "{{ " + text + " }}"


def truthy(value: Any) -> bool:
    """Whether a condition's value holds: Python truth, except that texts such as "false", "no", "0" and ""
    are false (a template that is not one lone expression renders to text)."""
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_TEXTS
    return bool(value)


class _StepView(TextLike, Mapping[str, Any]):
    """`steps.<id>` inside a template: `result`, `text`, `json` (the text parsed, on demand), `status`,
    `error`, and for a `for_each` step `items` (each item's index, value as `item`, status, error and
    retries).

    Printed (`{{ steps.x }}`, `'%s' % steps.x`), it is the step's text.
    """

    _KEYS = ("result", "text", "json", "status", "error", "items")

    def __init__(self, step_id: str, step: Step | StepResult) -> None:
        self._id = step_id
        if hasattr(step, "status"):  # a Step (the model imports this module: no isinstance here)
            self._step: Step | None = step  # type: ignore[assignment]
            self._result: StepResult | None = step.result  # type: ignore[union-attr]
        else:
            self._step = None
            self._result = step  # type: ignore[assignment]

    def __str__(self) -> str:
        return self._result.text if self._result is not None else ""

    def __repr__(self) -> str:
        return repr(str(self))

    def __getitem__(self, key: str) -> Any:
        result, step = self._result, self._step
        if key == "result":
            return result.value if result is not None else None
        if key == "text":
            return str(self)
        if key == "json":
            try:
                return json.loads(str(self))
            except ValueError as exc:
                raise TemplateError(f"steps.{self._id}.json: the step's text is not JSON ({exc})") from exc
        if key == "status":
            return step.status.value if step is not None else "completed"
        if key == "error":
            return step.error if step is not None else None
        if key == "items":
            if step is None or step.items is None:
                return []
            return [
                {
                    "index": n,
                    "item": i.value,
                    "status": i.status.value,
                    "error": i.error,
                    "retries": i.retry_count,
                }
                for n, i in enumerate(step.items)
            ]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)


class ResultView(TextLike, Mapping[str, Any]):
    """`result` inside a `fail_if` check: `result.text`, `result.json`, `result.structured`, and the keys of
    the structured content (`result.exit_code`). `'ERROR' in result` looks in the text."""

    def __init__(self, result: StepResult) -> None:
        self._result = result

    def __str__(self) -> str:
        return self._result.text

    def __repr__(self) -> str:
        return repr(self._result.text)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._result.text

    def __getitem__(self, key: str) -> Any:
        if key == "text":
            return self._result.text
        if key == "structured":
            return self._result.structured
        if key == "json":
            try:
                return json.loads(self._result.text)
            except ValueError as exc:
                raise TemplateError(f"result.json: the result's text is not JSON ({exc})") from exc
        structured = self._result.structured
        if isinstance(structured, Mapping):
            return structured[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(("text", "json", "structured"))

    def __len__(self) -> int:
        return 3


def template_context(
    steps: Mapping[str, Step | StepResult],
    inputs: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What a template sees: `steps` (those given: finished ones), `inputs`, and `extra` (`item`,
    `item_index`, `result`)."""
    return {
        "steps": {sid: _StepView(sid, s) for sid, s in steps.items()},
        "inputs": dict(inputs or {}),
        **extra,
    }


def render_value(value: Any, context: dict[str, Any], *, budget: Budget | None = None) -> Any:
    """Render every template in `value` (a string, or strings nested in lists and objects) on this thread.

    A string that is exactly one expression yields the expression's value (dict, list, number); any other
    template string yields a string. `budget` defaults to `TIME_BUDGET_S` from now.

    Raises:
        TemplateError: a syntax error, a missing step or field, an attempt to reach Python internals, or a
            template over the time budget or the output cap.
    """
    with time_budget(budget or Budget(sandbox.TIME_BUDGET_S)):
        return _render(value, context)


def render_parameters(
    parameters: dict[str, Any],
    results: Mapping[str, Step | StepResult],
    *,
    budget: Budget | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`render_value` of a step's parameters against finished steps (or their results) and the inputs."""
    rendered = render_value(parameters, template_context(results, inputs), budget=budget)
    assert isinstance(rendered, dict)
    return rendered


async def render_off_loop(value: Any, context: dict[str, Any]) -> Any:
    """`render_value` on a worker thread, awaited no longer than the time budget (and a short grace).

    If the caller is cancelled or the wait runs out, the render is abandoned and stops at its next sandbox
    check.

    Raises:
        TemplateError: as `render_value`, or the render outlived its budget.
    """
    budget = Budget(sandbox.TIME_BUDGET_S)
    render = functools.partial(render_value, value, context, budget=budget)
    try:
        with anyio.move_on_after(budget.seconds + _ABANDON_GRACE_S):
            return await anyio.to_thread.run_sync(render, abandon_on_cancel=True)
    finally:
        budget.stop()
    raise TemplateError(
        f"rendering took longer than the {budget.seconds:g} s template time budget; "
        "make the templates do less"
    )


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
            if isinstance(value, TextLike):
                value = str(value)
            check_size(value, "the value")
            return value
        return _joined_output(_ENV.from_string(text).generate(**context))
    except TemplateError as exc:
        raise TemplateError(f"template {_quote(text)}: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise TemplateError(f"template {_quote(text)}: {exc}") from exc
    except Exception as exc:  # anything a filter or operator raised on the given values
        raise TemplateError(f"template {_quote(text)}: {type(exc).__name__}: {exc}") from exc


def _joined_output(chunks: Iterator[str]) -> str:
    parts: list[str] = []
    total = 0
    for chunk in chunks:
        check_deadline()
        total += len(chunk)
        check_length(total, "the output")
        parts.append(chunk)
    return "".join(parts)


def _quote(text: str) -> str:
    return (
        repr(text) if len(text) <= _QUOTED_CHARS else f"{text[:_QUOTED_CHARS]!r}... ({len(text)} characters)"
    )
