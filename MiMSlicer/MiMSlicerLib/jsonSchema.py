"""A small JSON Schema (draft-07 subset) validator, so catalogue files are checked in any Slicer, with or without
the `jsonschema` package. Supports: type, properties, required, additionalProperties (bool or schema), items,
enum, const, minimum, exclusiveMinimum, minLength, pattern, minItems, maxItems, oneOf, anyOf, $ref to #/definitions."""
import re

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


class SchemaError(ValueError):
    """The document does not follow the schema; the message names the place, e.g. models[2].labels."""


def validate(document, schema):
    """Raise SchemaError listing every problem found, or return None."""
    problems = list(iterProblems(document, schema, schema, "$"))
    if problems:
        raise SchemaError("; ".join(problems))


def iterProblems(value, schema, root, where):
    if "$ref" in schema:
        yield from iterProblems(value, _resolve(schema["$ref"], root), root, where)
        return
    expected = schema.get("type")
    if expected is not None and not _isType(value, expected):
        yield f"{where}: expected {expected}, found {type(value).__name__}"
        return
    if "enum" in schema and value not in schema["enum"]:
        yield f"{where}: {value!r} is not one of {schema['enum']}"
    if "const" in schema and value != schema["const"]:
        yield f"{where}: must be {schema['const']!r}"
    yield from _numberProblems(value, schema, where)
    yield from _stringProblems(value, schema, where)
    if isinstance(value, list):
        yield from _arrayProblems(value, schema, root, where)
    if isinstance(value, dict):
        yield from _objectProblems(value, schema, root, where)
    yield from _combinationProblems(value, schema, root, where)


def _isType(value, expected):
    if isinstance(expected, list):
        return any(_isType(value, e) for e in expected)
    if expected == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[expected])


def _numberProblems(value, schema, where):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if "minimum" in schema and value < schema["minimum"]:
        yield f"{where}: {value} is below the minimum {schema['minimum']}"
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        yield f"{where}: {value} must be greater than {schema['exclusiveMinimum']}"


def _stringProblems(value, schema, where):
    if not isinstance(value, str):
        return
    if len(value) < schema.get("minLength", 0):
        yield f"{where}: must not be empty" if schema["minLength"] == 1 else f"{where}: too short"
    if "pattern" in schema and not re.search(schema["pattern"], value):
        yield f"{where}: {value!r} does not match {schema['pattern']}"


def _arrayProblems(value, schema, root, where):
    if len(value) < schema.get("minItems", 0):
        yield f"{where}: needs at least {schema['minItems']} items, has {len(value)}"
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        yield f"{where}: allows at most {schema['maxItems']} items, has {len(value)}"
    if "items" in schema:
        for i, item in enumerate(value):
            yield from iterProblems(item, schema["items"], root, f"{where}[{i}]")


def _objectProblems(value, schema, root, where):
    for key in schema.get("required", []):
        if key not in value:
            yield f"{where}: '{key}' is missing"
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            yield from iterProblems(item, properties[key], root, f"{where}.{key}")
        elif extra is False:
            yield f"{where}: unknown field '{key}' (allowed: {', '.join(sorted(properties))})"
        elif isinstance(extra, dict):
            yield from iterProblems(item, extra, root, f"{where}.{key}")


def _combinationProblems(value, schema, root, where):
    if "oneOf" in schema:
        matches = sum(1 for s in schema["oneOf"] if not list(iterProblems(value, s, root, where)))
        if matches != 1:
            hint = schema.get("description", "exactly one of the alternatives")
            yield f"{where}: must match {hint} ({matches} matched)"
    if "anyOf" in schema and not any(not list(iterProblems(value, s, root, where)) for s in schema["anyOf"]):
        yield f"{where}: matches none of the allowed forms"


def _resolve(ref, root):
    if not ref.startswith("#/"):
        raise SchemaError(f"only local $ref are supported, got {ref}")
    node = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node
