"""The values of a plan file's inputs, from the command line: `--inputs FILE.json` and `--input NAME=VALUE`.

A value given on the command line is text; it is parsed as JSON unless the input is declared a string
(`"type": "string"`), so `--input count=3` passes a number and `--input tags='["a", "b"]'` a list, while
`--input pattern=*.md` stays text. `--input` wins over the same name in `--inputs`. Everything a person can
get wrong here is one line (`InputError`); the values are then checked against the plan's `inputs` schema
with the rest of the plan.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mcp_planner.plan.model import PlanSpec

#: What each JSON type looks like on the command line, for the message about a value that is not JSON.
_EXAMPLES = {
    "integer": "3",
    "number": "2.5",
    "boolean": "true",
    "array": '\'["a", "b"]\'',
    "object": '\'{"key": "value"}\'',
    "null": "null",
}


class InputError(ValueError):
    """A value for a plan's inputs that cannot be used; the message is one line that says what to do."""


def input_values(spec: PlanSpec, pairs: Sequence[str], file: Path | None = None) -> dict[str, Any]:
    """The values of `spec`'s inputs: those of `file` (a JSON object), then the `NAME=VALUE` `pairs`.

    Raises:
        InputError: a file that cannot be read or is not a JSON object, a pair without `=`, a name the plan
            does not declare (with the closest declared name), a value that is not JSON for an input that is
            not a string, or a required input with no value and no default.
    """
    properties = _properties(spec.inputs)
    values: dict[str, Any] = {}
    if file is not None:
        for name, value in _read_file(file).items():
            _check_name(name, properties, spec.inputs is not None, f"in {str(file)!r}")
            values[name] = value
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"--input expects NAME=VALUE, got {pair!r}")
        _check_name(name, properties, spec.inputs is not None, "in --input")
        values[name] = _parse(name, text, properties[name])
    _check_required(spec.inputs, properties, values)
    return values


def _properties(schema: Mapping[str, Any] | None) -> dict[str, Any]:
    properties = schema.get("properties") if schema else None
    return dict(properties) if isinstance(properties, dict) else {}


def _read_file(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"inputs file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read inputs file {str(path)!r}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"inputs file {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(
            f"inputs file {str(path)!r} holds a JSON {type(raw).__name__}: it must be an object of input "
            'values, e.g. {"pattern": "*.md"}'
        )
    return raw


def _check_name(name: str, properties: Mapping[str, Any], declared: bool, where: str) -> None:
    if name in properties:
        return
    if not declared:
        raise InputError(f"the plan declares no inputs, so {name!r} ({where}) is not one of them")
    close = difflib.get_close_matches(name, list(properties), n=1, cutoff=0.6)
    if close:
        hint = f": did you mean {close[0]!r}?"
    elif properties:
        hint = f"; its inputs are {', '.join(map(repr, properties))}"
    else:
        hint = "; it declares none by name"
    raise InputError(f"unknown input {name!r} ({where}){hint}")


def _types(schema: Any) -> list[str]:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(kind, str):
        return [kind]
    return [k for k in kind if isinstance(k, str)] if isinstance(kind, list) else []


def _parse(name: str, text: str, schema: Any) -> Any:
    """`text` as the input's value: kept as text for a string input, else parsed as JSON (text again when
    the input may also be a string, or declares no type)."""
    types = _types(schema)
    if types == ["string"]:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if not types or "string" in types:
            return text
    kind = types[0]
    example = _EXAMPLES.get(kind)
    article = "an" if kind[0] in "aeiou" else "a"
    raise InputError(
        f"--input {name}={text!r} is not valid JSON for {article} {kind} input"
        + (f", e.g. --input {name}={example}" if example else "")
    )


def _check_required(
    schema: Mapping[str, Any] | None, properties: Mapping[str, Any], values: Mapping[str, Any]
) -> None:
    required = schema.get("required") if schema else None
    if not isinstance(required, list):
        return
    missing = [
        name
        for name in required
        if isinstance(name, str)
        and name not in values
        and not (isinstance(properties.get(name), dict) and "default" in properties[name])
    ]
    if not missing:
        return
    names = ", ".join(map(repr, missing))
    flags = " ".join(f"--input {name}=VALUE" for name in missing)
    noun = "input" if len(missing) == 1 else "inputs"
    raise InputError(f"the plan needs a value for its {noun} {names}: pass {flags} (or --inputs FILE.json)")
