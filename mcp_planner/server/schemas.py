"""What `tools/list` shows of each tool's schemas: the same contracts, in fewer tokens (SPEC section 7).

Every tool definition is read by the model on every turn, so its size is a cost paid again and again.
pydantic's schemas carry what no model needs: a `title` repeating each property's name, `anyOf` with
`{"type": "null"}` for each optional value, and, in output schemas, the full nested definition of every
view. Here:

- input schemas keep every property, type, constraint, default and description, without the titles, and
  an optional value is written `{"type": ["string", "null"]}`;
- output schemas keep the top level (each property's name and type, and what is required): a client that
  validates structured content against them still can, and the nested shapes are in each tool's text and
  in the views' documentation, not repeated in four tools' definitions.
"""

from __future__ import annotations

from typing import Any

#: Keys of a schema object whose values are schemas, and those whose values are lists or maps of schemas.
_SUBSCHEMA = ("items", "additionalProperties", "not")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def compact_input_schemas(schemas: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each tool's input schema compacted (`compact_input_schema`), and each shared definition (`$defs`: a
    step, the options) listed once: by the tool with the most definitions, the others naming it there.

    What a client sees of a later tool is looser (`{"type": "object"}` where a step goes) but the server
    checks every call against the full model, and reports what does not fit.
    """
    owner: dict[str, str] = {}
    for name in sorted(schemas, key=lambda n: -len(schemas[n].get("$defs", {}))):
        for definition in schemas[name].get("$defs", {}):
            owner.setdefault(definition, name)
    out = {}
    for name, schema in schemas.items():
        compact = compact_input_schema(schema)
        defs = compact.get("$defs", {})
        foreign = {d for d in defs if owner.get(d) != name}
        if foreign:
            compact = _replace_refs(compact, foreign, owner)
            kept = {d: s for d, s in defs.items() if d not in foreign}
            if kept:
                compact["$defs"] = kept
            else:
                del compact["$defs"]
        out[name] = compact
    return out


def _replace_refs(value: Any, foreign: set[str], owner: dict[str, str]) -> Any:
    if isinstance(value, list):
        return [_replace_refs(v, foreign, owner) for v in value]
    if not isinstance(value, dict):
        return value
    ref = value.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/") and ref[8:] in foreign:
        return {"type": "object", "description": f"as {ref[8:]} in {owner[ref[8:]]}'s input schema"}
    return {k: _replace_refs(v, foreign, owner) if k != "$defs" else v for k, v in value.items()}


def compact_input_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` without titles, the class descriptions of its definitions, and what JSON Schema assumes
    anyway (a `null` default, extra properties allowed, items of any kind); nullable unions written as a
    type list. The contract is unchanged."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if (key, value) in (("default", None), ("additionalProperties", True), ("items", {})):
            continue
        if key in _SUBSCHEMA and isinstance(value, dict):
            out[key] = compact_input_schema(value)
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [compact_input_schema(v) if isinstance(v, dict) else v for v in value]
        elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {k: compact_input_schema(v) if isinstance(v, dict) else v for k, v in value.items()}
            if key in ("$defs", "definitions"):  # a model's docstring: for the code's readers
                for definition in out[key].values():
                    if isinstance(definition, dict):
                        definition.pop("description", None)
        else:
            out[key] = value
    return _merge_nullable(out)


def _merge_nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """`{"anyOf": [{"type": "integer", ...}, {"type": "null"}]}` as `{"type": ["integer", "null"], ...}`."""
    branches = schema.get("anyOf")
    if not isinstance(branches, list) or len(branches) != 2 or {"type": "null"} not in branches:
        return schema
    other = next(b for b in branches if b != {"type": "null"})
    kind = other.get("type") if isinstance(other, dict) else None
    if not isinstance(kind, str) or set(other) & set(schema) - {"anyOf"}:
        return schema  # a $ref, a type list, or keys that would collide: leave it as it is
    merged = {k: v for k, v in schema.items() if k != "anyOf"}
    return {**other, **merged, "type": [kind, "null"]}


def compact_output_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The top level of an output schema: each property's type (an object or array of objects stays just
    that), what is required, and that other properties may appear."""
    defs = schema.get("$defs", {})
    properties = {
        name: _shallow(sub, defs)
        for name, sub in (schema.get("properties") or {}).items()
        if isinstance(sub, dict)
    }
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if schema.get("required"):
        out["required"] = schema["required"]
    return out


def _shallow(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref.rsplit("/", 1)[-1], {})
        return {"type": target.get("type", "object")} if isinstance(target, dict) else {}
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list):
            kinds: list[str] = []
            for branch in branches:
                kind = _shallow(branch, defs).get("type") if isinstance(branch, dict) else None
                if isinstance(kind, str) and kind not in kinds:
                    kinds.append(kind)
            return {"type": kinds} if kinds else {}
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items")
        item_type = _shallow(items, defs).get("type") if isinstance(items, dict) else None
        return (
            {"type": "array", "items": {"type": item_type}}
            if isinstance(item_type, str)
            else {"type": "array"}
        )
    if isinstance(kind, str | list):
        shallow: dict[str, Any] = {"type": kind}
        if "enum" in schema:
            shallow["enum"] = schema["enum"]
        return shallow
    return {}
