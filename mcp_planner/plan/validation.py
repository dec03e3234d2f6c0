"""Plan validation: every problem with a plan at once, each naming its step and field.

Checked: the description, the step list, step ids, dependencies (unknown, self, cycles), tool names against
the catalog (with close-name suggestions), parameters against each tool's `inputSchema` (jsonschema, with
template-valued parameters deferred to run time), templates (syntax, references), and numbers.

`retry_backoff` must be >= 1: a factor below 1 would shrink the delay on every retry, which no retry
policy wants; 1.0 is a fixed delay.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jsonschema
import referencing.exceptions

from mcp_planner.errors import Problem
from mcp_planner.plan.model import (
    MAX_BACKOFF,
    MAX_DESCRIPTION_CHARS,
    MAX_DURATION_MS,
    MAX_ITEMS,
    MAX_OUTPUTS,
    MAX_PARALLEL_CAP,
    MAX_PARAMETERS_BYTES,
    MAX_RETRIES,
    MAX_STEPS,
    ExecutionPlan,
    Step,
    gc_paused,
)
from mcp_planner.plan.templating import (
    analyse_template,
    is_template,
    template_strings,
)

Catalog = Mapping[str, dict[str, Any] | None]

logger = logging.getLogger(__name__)

#: Suggestions (difflib) are computed for this many unknown names at most, so a plan with thousands of
#: broken references still validates in linear time.
_MAX_SUGGESTED = 20
#: At most this many cycles are named; a plan with more has a bigger problem than their list.
_MAX_CYCLES = 20
#: The built-in tools' names start with this (`engine.builtins.BUILTIN_SERVER`; the plan package does not
#: import the engine).
BUILTIN_PREFIX = "planner."


def validate_plan(
    plan: ExecutionPlan, catalog: Catalog | None, *, max_steps: int = MAX_STEPS
) -> list[Problem]:
    """Every problem with `plan`, in a stable order (plan fields, then steps by index).

    Args:
        plan: the plan to check; it is not modified.
        catalog: tool name -> input JSON schema (None when the schema is unknown). `None` skips the tool
            checks (unknown tools and parameter schemas).
        max_steps: the most steps a plan may have.

    Returns:
        The problems; empty when the plan is valid.
    """
    with gc_paused():  # a large plan's problems and lookups are many small objects
        return _problems(plan, catalog, max_steps)


def _problems(plan: ExecutionPlan, catalog: Catalog | None, max_steps: int) -> list[Problem]:
    problems: list[Problem] = []
    if not plan.description.strip():
        problems.append(Problem(None, "description", "the description is empty: say what the plan does"))
    problems.extend(_length_problems(None, "description", plan.description))
    if not plan.steps:
        problems.append(Problem(None, "steps", "the plan has no steps: add at least one step"))
    if len(plan.steps) > max_steps:
        problems.append(
            Problem(
                None,
                "steps",
                f"the plan has {len(plan.steps)} steps, more than the limit of {max_steps}: split it into "
                "several plans",
            )
        )
    problems.extend(_option_problems(plan))
    problems.extend(_input_problems(plan))

    ids = [s.id for s in plan.steps]
    known = set(ids)
    inputs = _declared_inputs(plan)
    counts = Counter(ids)
    reported_duplicates: set[str] = set()
    budget = _Budget()
    validators: dict[str, Any] = {}
    for position, step in enumerate(plan.steps):
        if not step.id.strip():
            problems.append(Problem(None, f"steps[{position}].id", "a step has an empty id: give it one"))
        elif counts[step.id] > 1 and step.id not in reported_duplicates:
            reported_duplicates.add(step.id)
            problems.append(
                Problem(
                    step.id,
                    "id",
                    f"duplicate step id {step.id!r} ({counts[step.id]} steps use it): make the ids unique",
                )
            )
        problems.extend(_dependency_problems(step, known, budget))
        problems.extend(_number_problems(step))
        problems.extend(_size_problems(step))
        problems.extend(_language_problems(step))
        problems.extend(_template_problems(step, known, inputs, budget))
        if catalog is not None:
            problems.extend(_tool_problems(step, catalog, budget, validators))
    problems.extend(_cycle_problems(plan))
    problems.extend(_output_problems(plan, known, inputs, budget))
    return problems


def qualify_tool_names(plan: ExecutionPlan, tool_names: Iterable[str]) -> None:
    """Rewrite each bare tool name offered by exactly one server to its qualified `server.tool` name.

    An exact match always wins; a downstream tool wins over a built-in one (`planner.echo`), so a plan
    written before the built-ins existed means what it meant; a name offered by several servers, or by
    none, is left as it is for `validate_plan` to report.
    """
    names = set(tool_names)
    resolved: dict[str, str | None] = {}
    for step in plan.steps:
        bare = step.tool_name
        if not bare or bare in names:
            continue
        if bare not in resolved:
            candidates = [n for n in names if n.endswith("." + bare)]
            downstream = [n for n in candidates if not n.startswith(BUILTIN_PREFIX)]
            if len(downstream) == 1 or (not downstream and len(candidates) == 1):
                resolved[bare] = (downstream or candidates)[0]
            else:
                resolved[bare] = None
        qualified = resolved[bare]
        if qualified is not None:
            step.tool_name = qualified


# -- plan-level numbers -----------------------------------------------------------------------------------


def _option_problems(plan: ExecutionPlan) -> Iterator[Problem]:
    options = plan.options
    for name in ("approval_timeout_ms", "step_timeout_ms", "total_timeout_ms"):
        value = getattr(options, name)
        if value < 0:
            yield Problem(
                None, f"options.{name}", f"{value} is negative: use 0 for no limit, or a positive value"
            )
        elif value > MAX_DURATION_MS:
            yield Problem(None, f"options.{name}", _above(value, MAX_DURATION_MS, " ms (24 h)"))
    if options.retry_backoff < 1:
        yield Problem(
            None,
            "options.retry_backoff",
            f"{options.retry_backoff} is below 1: use 1.0 for a fixed delay or more to grow it on each retry",
        )
    elif options.retry_backoff > MAX_BACKOFF:
        yield Problem(None, "options.retry_backoff", _above(options.retry_backoff, MAX_BACKOFF))
    if options.max_parallel_steps > MAX_PARALLEL_CAP:
        yield Problem(
            None,
            "options.max_parallel_steps",
            f"{options.max_parallel_steps} is above the cap: use at most {MAX_PARALLEL_CAP}",
        )


def _number_problems(step: Step) -> Iterator[Problem]:
    for name, cap, unit in (
        ("max_retries", MAX_RETRIES, ""),
        ("retry_delay_ms", MAX_DURATION_MS, " ms (24 h)"),
        ("timeout_ms", MAX_DURATION_MS, " ms (24 h)"),
    ):
        value = getattr(step, name)
        if value is not None and value < 0:
            yield Problem(step.id, name, f"{value} is negative: use 0 or a positive value")
        elif value is not None and value > cap:
            yield Problem(step.id, name, _above(value, cap, unit))


def _size_problems(step: Step) -> Iterator[Problem]:
    yield from _length_problems(step.id, "description", step.description)
    size = len(json.dumps(step.parameters, default=str))
    if size > MAX_PARAMETERS_BYTES:
        yield Problem(
            step.id,
            "parameters",
            f"the parameters take {size} bytes, more than the limit of {MAX_PARAMETERS_BYTES}: pass large "
            "data through a file or an earlier step's result",
        )


def _length_problems(step_id: str | None, field: str, text: str) -> Iterator[Problem]:
    if len(text) > MAX_DESCRIPTION_CHARS:
        limit = MAX_DESCRIPTION_CHARS
        yield Problem(step_id, field, f"{len(text)} characters, more than the limit of {limit}: shorten it")


def _above(value: float, cap: float, unit: str = "") -> str:
    return f"{value} is above the limit of {cap}{unit}"


# -- dependencies -----------------------------------------------------------------------------------------


class _Budget:
    """How many more difflib suggestions may be computed (they are quadratic in the worst case)."""

    def __init__(self) -> None:
        self.left = _MAX_SUGGESTED

    def suggest(self, name: str, choices: Iterable[str]) -> str:
        if self.left <= 0:
            return ""
        self.left -= 1
        close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
        return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _dependency_problems(step: Step, known: set[str], budget: _Budget) -> Iterator[Problem]:
    for dep in step.depends_on:
        if dep == step.id:
            yield Problem(
                step.id, "depends_on", f"step {step.id!r} depends on itself: remove it from depends_on"
            )
        elif dep not in known:
            hint = budget.suggest(dep, known)
            yield Problem(
                step.id, "depends_on", f"depends on {dep!r}, which is not a step of this plan{hint}"
            )


def _cycle_problems(plan: ExecutionPlan) -> list[Problem]:
    """Name each dependency cycle once, as `a -> b -> c -> a` (each step depends on the next).

    Iterative depth-first search, so a 10,000-step chain needs no recursion.
    """
    index: dict[str, int] = {}
    for s in plan.steps:
        index.setdefault(s.id, s.index)
    edges: dict[str, list[str]] = {}
    for s in plan.steps:
        if s.id in edges:
            continue  # a duplicate id: reported elsewhere; the first step of that id stands for it
        edges[s.id] = [d for d in dict.fromkeys(s.depends_on) if d in index and d != s.id]

    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(edges, white)
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for root in edges:
        if colour[root] != white:
            continue
        path: list[str] = [root]
        on_path: dict[str, int] = {root: 0}
        iters: list[Iterator[str]] = [iter(edges[root])]
        colour[root] = grey
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                done = path.pop()
                del on_path[done]
                colour[done] = black
                iters.pop()
            elif colour[nxt] == white:
                colour[nxt] = grey
                on_path[nxt] = len(path)
                path.append(nxt)
                iters.append(iter(edges[nxt]))
            elif colour[nxt] == grey and len(cycles) < _MAX_CYCLES:
                cycle = path[on_path[nxt] :]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    cycles.append(cycle)

    problems = []
    for cycle in cycles:
        start = min(range(len(cycle)), key=lambda i: index[cycle[i]])
        ordered = cycle[start:] + cycle[:start]
        shown = ordered if len(ordered) <= 12 else [*ordered[:10], f"({len(ordered) - 11} more)", ordered[-1]]
        text = " -> ".join([*shown, ordered[0]])
        problems.append(
            Problem(
                ordered[0],
                "depends_on",
                f"dependency cycle: {text} (each step depends on the next): remove one of these dependencies",
            )
        )
    return problems


# -- templates --------------------------------------------------------------------------------------------


def _step_templates(step: Step) -> Iterator[tuple[str, str]]:
    """(field, text) of every template of a step: its parameters, `for_each`, `when` and `fail_if`."""
    yield from template_strings(step.parameters)
    for field, value in step.language_templates().items():
        yield from template_strings(value, field)


def _template_problems(
    step: Step, known: set[str], inputs: set[str] | None, budget: _Budget
) -> Iterator[Problem]:
    for field, text in _step_templates(step):
        analysis = analyse_template(text)
        if analysis.syntax_error is not None:
            yield Problem(step.id, field, f"template syntax error in {text!r}: {analysis.syntax_error}")
            continue
        for name in analysis.unknown_names:
            yield Problem(
                step.id,
                field,
                f"template {text!r} uses {name!r}: a template sees steps.<id> (.result, .text, .json, "
                ".status, .error, .items), inputs.<name>, item and item_index (for_each) and result "
                "(fail_if)",
            )
        yield from _misplaced_names(step, field, text, analysis.names)
        yield from _input_ref_problems(step.id, field, text, analysis.input_refs, inputs, budget)
        for ref in sorted(analysis.refs):
            if ref == step.id:
                yield Problem(step.id, field, f"template {text!r} refers to the step's own result")
            elif ref not in known:
                dashed = [k for k in known if k.startswith(ref + "-")] if budget.left > 0 else []
                hint = budget.suggest(ref, known)
                if dashed:
                    hint += f" (write an id with '-' as steps['{min(dashed)}'])"
                yield Problem(
                    step.id, field, f"template {text!r} refers to step {ref!r}, which does not exist{hint}"
                )
            elif ref not in step.depends_on:
                yield Problem(
                    step.id,
                    field,
                    f"template {text!r} uses step {ref!r} but the step does not depend on it: "
                    f"add {ref!r} to depends_on",
                )


def _misplaced_names(step: Step, field: str, text: str, names: frozenset[str]) -> Iterator[Problem]:
    in_check = field == "fail_if"
    if names & {"item", "item_index"} and (
        step.for_each is None or not (in_check or field.startswith("param"))
    ):
        where = "a step without for_each" if step.for_each is None else field
        yield Problem(
            step.id,
            field,
            f"template {text!r} uses item/item_index, which exist only in the parameters and "
            f"fail_if of a for_each step, not in {where}",
        )
    if "result" in names and not in_check:
        yield Problem(
            step.id,
            field,
            f"template {text!r} uses 'result', which exists only in fail_if: use steps.<id>.result for "
            "another step's result",
        )


def _input_ref_problems(
    step_id: str | None, field: str, text: str, refs: frozenset[str], inputs: set[str] | None, budget: _Budget
) -> Iterator[Problem]:
    for ref in sorted(refs):
        if inputs is None:
            yield Problem(
                step_id,
                field,
                f"template {text!r} uses inputs.{ref}, but the plan declares no inputs: add "
                f'"inputs": {{"properties": {{"{ref}": {{...}}}}}} to the plan',
            )
        elif ref not in inputs:
            hint = budget.suggest(ref, inputs) or (
                f"; the inputs are {', '.join(map(repr, sorted(inputs)))}" if inputs else ""
            )
            yield Problem(
                step_id, field, f"template {text!r} uses input {ref!r}, which is not declared{hint}"
            )


def _language_problems(step: Step) -> Iterator[Problem]:
    """`for_each`, `when`, `fail_if` and the item settings: their shapes and numbers."""
    each = step.for_each
    if isinstance(each, str) and not is_template(each):
        yield Problem(
            step.id,
            "for_each",
            f"for_each is the text {each!r}: give a list, or a template that gives one, e.g. "
            '"{{ steps.ls.result.files }}"',
        )
    elif isinstance(each, list) and len(each) > MAX_ITEMS:
        yield Problem(step.id, "for_each", _above(len(each), MAX_ITEMS, " items"))
    for name in ("when", "fail_if"):
        value = getattr(step, name)
        if value is not None and not value.strip():
            yield Problem(step.id, name, f"{name} is empty: remove it or give a condition")
    if step.max_parallel_items < 0:
        yield Problem(step.id, "max_parallel_items", f"{step.max_parallel_items} is negative: use 0 or more")
    elif step.max_parallel_items > MAX_PARALLEL_CAP:
        yield Problem(step.id, "max_parallel_items", _above(step.max_parallel_items, MAX_PARALLEL_CAP))
    if each is None:
        for name in ("max_parallel_items", "allow_item_failures"):
            if getattr(step, name):
                yield Problem(step.id, name, f"{name} applies only to a step with for_each")


# -- inputs and outputs -----------------------------------------------------------------------------------


def _declared_inputs(plan: ExecutionPlan) -> set[str] | None:
    """The names of the plan's inputs (its schema's properties); None when it declares no inputs."""
    if plan.inputs is None:
        return None
    properties = plan.inputs.get("properties")
    return set(properties) if isinstance(properties, dict) else set()


def _input_problems(plan: ExecutionPlan) -> Iterator[Problem]:
    """The inputs schema is a valid JSON Schema of an object, and the values satisfy it."""
    schema = plan.inputs
    if schema is None:
        if plan.input_values:
            names = ", ".join(map(repr, sorted(plan.input_values)))
            yield Problem(None, "inputs", f"values were given for {names}, but the plan declares no inputs")
        return
    if schema.get("type", "object") != "object":
        yield Problem(None, "inputs", 'the inputs schema must describe an object: "type": "object"')
        return
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        yield Problem(None, "inputs", f"the inputs schema is not a valid JSON Schema: {exc.message}")
        return
    for error in sorted(cls(schema).iter_errors(plan.input_values), key=lambda e: e.json_path):
        message = error.message if len(error.message) <= 300 else error.message[:297] + "..."
        yield Problem(None, "inputs" + error.json_path[1:], f"input values: {message}")
    properties = schema.get("properties")
    if isinstance(properties, dict) and "additionalProperties" not in schema:  # a typo, as in a plan file
        declared = list(properties)
        for name in plan.input_values:
            if name not in properties:
                close = difflib.get_close_matches(name, declared, n=1, cutoff=0.6)
                hint = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else f"the inputs are {', '.join(map(repr, declared))}"
                )
                yield Problem(
                    None, f"inputs.{name}", f"a value was given for {name!r}, which is not an input: {hint}"
                )


def _output_problems(
    plan: ExecutionPlan, known: set[str], inputs: set[str] | None, budget: _Budget
) -> Iterator[Problem]:
    if len(plan.outputs) > MAX_OUTPUTS:
        yield Problem(None, "outputs", _above(len(plan.outputs), MAX_OUTPUTS, " outputs"))
    for name, text in plan.outputs.items():
        field = f"outputs.{name}"
        if not name.strip():
            yield Problem(None, "outputs", "an output has an empty name: name each output")
        if not is_template(text):
            continue  # a constant is a valid, if dull, output
        analysis = analyse_template(text)
        if analysis.syntax_error is not None:
            yield Problem(None, field, f"template syntax error in {text!r}: {analysis.syntax_error}")
            continue
        extra = analysis.names - {"steps", "inputs"}
        for bad in sorted(set(analysis.unknown_names) | extra):
            yield Problem(
                None, field, f"template {text!r} uses {bad!r}: an output sees steps.<id> and inputs"
            )
        yield from _input_ref_problems(None, field, text, analysis.input_refs, inputs, budget)
        for ref in sorted(analysis.refs - known):
            yield Problem(
                None,
                field,
                f"template {text!r} refers to step {ref!r}, which does not exist"
                + budget.suggest(ref, known),
            )


# -- tools and parameter schemas --------------------------------------------------------------------------


def _tool_problems(
    step: Step, catalog: Catalog, budget: _Budget, validators: dict[str, Any]
) -> Iterator[Problem]:
    name = step.tool_name
    if not name.strip():
        yield Problem(step.id, "tool_name", "the tool name is empty: name one of the available tools")
        return
    if name not in catalog:
        yield Problem(step.id, "tool_name", _unknown_tool_message(name, catalog, budget))
        return
    schema = catalog[name]
    if schema is None:
        return
    if name not in validators:
        validators[name] = compiled_validator(schema)
    if validators[name] is not None:
        yield from _schema_problems(step, validators[name])


def _unknown_tool_message(name: str, catalog: Catalog, budget: _Budget) -> str:
    owners = sorted(n for n in catalog if n.endswith("." + name) and not n.startswith(BUILTIN_PREFIX))
    if len(owners) > 1:
        listed = ", ".join(repr(o) for o in owners)
        return f"tool {name!r} is offered by several servers ({listed}): use the qualified name"
    if not any(not n.startswith(BUILTIN_PREFIX) for n in catalog):
        return (
            f"unknown tool {name!r}: no downstream tools are available (are the downstream servers "
            "connected?)"
        )
    bare_to_full = {n.rpartition(".")[2]: n for n in catalog}
    hint = budget.suggest(name, catalog)
    if not hint and budget.left > 0:
        bare = name.rpartition(".")[2]
        close = difflib.get_close_matches(bare, list(bare_to_full), n=3, cutoff=0.6)
        if close:
            hint = f"; did you mean {' or '.join(repr(bare_to_full[c]) for c in close)}?"
    return f"unknown tool {name!r}{hint or ': call list_tools to see the available tools'}"


#: The same schema object (a catalog entry) maps straight to its validator, skipping the canonical-JSON
#: key, which costs as much as a small step. Holding the schema keeps its id from being reused.
_BY_IDENTITY: dict[int, tuple[dict[str, Any], Any]] = {}


def compiled_validator(schema: dict[str, Any]) -> Any:
    """A validator of the schema's own dialect (`$schema`, default 2020-12); None for an invalid schema.

    An invalid schema is logged as a warning, once per process.
    """
    hit = _BY_IDENTITY.get(id(schema))
    if hit is not None and hit[0] is schema:
        return hit[1]
    try:
        validator = _cached_validator(json.dumps(schema, sort_keys=True))
    except (TypeError, ValueError):
        return _compile_validator(schema)
    if len(_BY_IDENTITY) >= 1024:
        _BY_IDENTITY.clear()
    _BY_IDENTITY[id(schema)] = (schema, validator)
    return validator


@functools.lru_cache(maxsize=1024)
def _cached_validator(key: str) -> Any:
    # check_schema costs milliseconds per tool: far more than running a one-step plan through a downstream
    # server, so a schema is checked once per process, not once per validation.
    return _compile_validator(json.loads(key))


def _compile_validator(schema: dict[str, Any]) -> Any:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        # A downstream server's broken schema is not this plan's problem, but it must not pass unnoticed:
        # logged once per schema (the validator is cached), and the tool itself checks its parameters.
        logger.warning(
            "a tool's input schema is invalid, so parameters for it are not checked before the call: %s "
            "(in the schema %s); fix the downstream server's inputSchema",
            exc.message,
            _excerpt(schema),
        )
        return None
    return cls(schema)


def parameter_warnings(plan: ExecutionPlan, catalog: Catalog) -> list[Problem]:
    """Parameters a tool's input schema does not declare although it lets them pass: often a misspelt
    optional parameter the tool will ignore. Not problems (the plan is valid), but worth saying."""
    warnings: list[Problem] = []
    budget = _Budget()
    for step in plan.steps:
        schema = catalog.get(step.tool_name)
        if not isinstance(schema, dict) or schema.get("additionalProperties") is False:
            continue  # unknown, or an undeclared name is already a problem
        declared = schema.get("properties")
        if not isinstance(declared, dict):
            continue
        for name in step.parameters:
            if name in declared:
                continue
            names = list(declared)
            listed = ", ".join(map(repr, names[:10])) + (", ..." if len(names) > 10 else "")
            hint = budget.suggest(name, names) or f"; it declares {listed or 'none'}"
            message = f"{step.tool_name!r} does not declare a parameter {name!r}, so it may ignore it{hint}"
            warnings.append(Problem(step.id, f"parameters.{name}", message))
    return warnings


def _schema_problems(step: Step, validator: Any) -> Iterator[Problem]:
    try:
        errors = list(validator.iter_errors(step.parameters))
    except referencing.exceptions.Unresolvable as exc:  # the server's schema is broken, not the plan
        logger.warning(
            "the input schema of tool %r has a $ref that does not resolve (%s), so step %r's parameters are "
            "not checked before the call; fix the downstream server's inputSchema",
            step.tool_name,
            exc,
            step.id,
        )
        return
    kept = [e for e in errors if not _deferred(e, step.parameters)]
    for error in sorted(kept, key=lambda e: (e.json_path, e.message)):
        message = error.message if len(error.message) <= 300 else error.message[:297] + "..."
        field = "parameters" + error.json_path[1:]
        yield Problem(step.id, field, message)


def _excerpt(schema: dict[str, Any]) -> str:
    text = json.dumps(schema, default=repr)
    return text if len(text) <= 200 else text[:200] + "..."


def _deferred(error: jsonschema.ValidationError, instance: Any) -> bool:
    """True when `error` is about a template-valued parameter: it is checked after rendering, at run time."""
    value = instance
    for part in error.absolute_path:
        if is_template(value):
            return True
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return False
    if is_template(value):
        return True
    if error.validator in ("anyOf", "oneOf") and error.context:
        # Deferred when some branch fails only because of template values.
        branches: dict[Any, list[jsonschema.ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(sub.schema_path[0] if sub.schema_path else None, []).append(sub)
        return any(all(_deferred(sub, instance) for sub in subs) for subs in branches.values())
    return False
