"""Tool-call arguments from a JSON schema: pure, deterministic, bounded.

The mock engine calls tools with arguments made here. They are a function
of the schema alone, and the rules are simple enough to predict by hand:

* `const`, else the first `enum` value, else a value of the schema's type;
* `string`: "mock", or a sample of its `format` (date-time, date, time,
  email, uri, uuid, ipv4, hostname), padded to `minLength` and cut to
  `maxLength`;
* `integer`: 1, `number`: 1.5, each moved into `minimum`/`maximum` (and
  the exclusive bounds) when they exclude it;
* `boolean`: true, `null` (and a schema that says nothing): null;
* `array`: one item (or `minItems`, at most ARRAY_ITEMS_MAX), cut to
  `maxItems`; tuple forms (`prefixItems`, a list of `items`) get one value
  each;
* `object`: every property named in `required`, in that order, and no
  others (a required name without a schema gets null);
* the root is an object unless its schema says otherwise (no schema: `{}`);
* a list of types takes its first non-null one; `anyOf`/`oneOf` their first
  branch; `allOf` is merged; local `$ref`s (`#`, `#/$defs/...`,
  `#/definitions/...`) are followed.

Nothing else (`pattern`, `multipleOf`, `uniqueItems`, ...) is honoured.
Everything is bounded: below DEPTH_MAX levels containers come out empty,
after VALUES_MAX values no more are made, and references are followed
at most DEPTH_MAX deep and RESOLVE_STEPS_MAX times in all, so a
recursive or huge schema cannot blow up (what is cut comes out null or
empty). Malformed schemas never raise. The arguments are serialized
compactly and as ASCII (`\\u` escapes), so one character is one byte, one
token of neuron's tokenizer.
"""

from __future__ import annotations

import json
import math
from typing import Any

DEPTH_MAX = 8
VALUES_MAX = 1024
RESOLVE_STEPS_MAX = 16 * VALUES_MAX
ARRAY_ITEMS_MAX = 4
STRING_CHARS_MAX = 256
STRING_VALUE = "mock"
INTEGER_VALUE = 1
NUMBER_VALUE = 1.5
FORMAT_SAMPLES = {
    "date-time": "2025-01-01T00:00:00Z",
    "date": "2025-01-01",
    "time": "00:00:00Z",
    "email": "mock@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "127.0.0.1",
    "hostname": "example.com",
}
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


def arguments_json(parameters: Any) -> str:
    """The compact ASCII JSON arguments for a function whose `parameters` schema is given."""
    generator = _Generator(parameters)
    root = generator._resolve(parameters)
    if not any(key in root for key in ("type", "const", "enum")):
        root = {**root, "type": "object"}  # none or `{}`: a function of no (or unstated) arguments
    text = json.dumps(generator.value(root, 0), separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    assert text.isascii()
    return text


class _Generator:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.values_left = VALUES_MAX
        self.steps_left = RESOLVE_STEPS_MAX

    def value(self, schema: Any, depth: int) -> Any:
        if self.values_left <= 0:
            return None
        self.values_left -= 1
        schema = self._resolve(schema)
        if "const" in schema:
            return _finite(schema["const"])
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return _finite(enum[0])
        kind = _type_of(schema)
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "string":
            return _string(schema)
        if kind == "integer":
            return _integer(schema)
        if kind == "number":
            return _number(schema)
        return True if kind == "boolean" else None

    def _resolve(self, schema: Any, hops: int = DEPTH_MAX) -> dict[str, Any]:
        """Follow `$ref`s and combinators to one plain schema: at most `hops` steps deep
        (a cycle ends there) and RESOLVE_STEPS_MAX in all (so `allOf` cannot fan out)."""
        while isinstance(schema, dict) and hops > 0 and self.steps_left > 0:
            hops -= 1
            self.steps_left -= 1
            if isinstance(schema.get("$ref"), str):
                target = _pointer(self.root, schema["$ref"])
                rest = {k: v for k, v in schema.items() if k != "$ref"}
                schema = {**(target if isinstance(target, dict) else {}), **rest}
            elif _first_branch(schema) is not None:
                branch = _first_branch(schema)
                rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                schema = {**rest, **branch} if isinstance(branch, dict) else rest
            elif isinstance(schema.get("allOf"), list):
                parts = [self._resolve(part, hops) for part in schema["allOf"]]
                schema = _merge({k: v for k, v in schema.items() if k != "allOf"}, parts)
            else:
                return schema
        return {}  # not a schema, a cycle of references, or out of steps: say nothing

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        names = [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
        filled: dict[str, Any] = {}
        for name in dict.fromkeys(names) if depth < DEPTH_MAX else ():
            if self.values_left <= 0:
                break
            filled[name] = self.value(properties.get(name, {}), depth + 1)
        return filled

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        if depth >= DEPTH_MAX:
            return []
        prefix = schema.get("prefixItems", schema.get("items"))
        if isinstance(prefix, list):  # a tuple: one value per position
            return [self.value(item, depth + 1) for item in prefix[:ARRAY_ITEMS_MAX]]
        count = min(max(_int_or(schema.get("minItems"), 0), 1), ARRAY_ITEMS_MAX)
        count = min(count, max(_int_or(schema.get("maxItems"), count), 0))
        return [self.value(schema.get("items", {}), depth + 1) for _ in range(count)]


def _finite(value: Any) -> Any:
    """A schema's own value with non-finite numbers (`1e400` parses as inf) as null: JSON has no Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _first_branch(schema: dict[str, Any]) -> Any:
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            return branches[0]
    return None


def _merge(schema: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
    """`allOf` as one schema: properties merged, required joined, otherwise the first word wins."""
    merged = dict(schema)
    properties = dict(schema["properties"]) if isinstance(schema.get("properties"), dict) else {}
    required = list(schema["required"]) if isinstance(schema.get("required"), list) else []
    for part in parts:
        if isinstance(part.get("properties"), dict):
            properties = {**part["properties"], **properties}
        if isinstance(part.get("required"), list):
            required += part["required"]
        for key, value in part.items():
            merged.setdefault(key, value)
    if properties:
        merged["properties"] = properties
    if required:
        merged["required"] = required
    return merged


def _pointer(root: Any, ref: str) -> Any:
    """A local JSON pointer (`#`, `#/$defs/Name`); anything else resolves to nothing."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    node = root
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        node = node.get(token) if isinstance(node, dict) else None
    return node


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind in _TYPES:
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "null"


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _string(schema: dict[str, Any]) -> str:
    text = FORMAT_SAMPLES.get(schema.get("format"), STRING_VALUE) if isinstance(schema.get("format"), str) else STRING_VALUE
    shortest = min(max(_int_or(schema.get("minLength"), 0), 0), STRING_CHARS_MAX)
    if len(text) < shortest:
        text = (text * (shortest // len(text) + 1))[:shortest]
    longest = _int_or(schema.get("maxLength"), len(text))
    return text[: max(longest, 0)]


def _bounds(schema: dict[str, Any]) -> tuple[float | None, bool, float | None, bool]:
    """(low, low is exclusive, high, high is exclusive), numeric and finite bounds only."""

    def finite(value: Any) -> float | None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return value if ok else None

    low, high = finite(schema.get("minimum")), finite(schema.get("maximum"))
    low_x, high_x = finite(schema.get("exclusiveMinimum")), finite(schema.get("exclusiveMaximum"))
    low_open = schema.get("exclusiveMinimum") is True  # draft-04: a flag on `minimum`
    high_open = schema.get("exclusiveMaximum") is True
    if low_x is not None and (low is None or low_x >= low):
        low, low_open = low_x, True
    if high_x is not None and (high is None or high_x <= high):
        high, high_open = high_x, True
    return low, low_open, high, high_open


def _inside(value: float, low: float | None, low_open: bool, high: float | None, high_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def _integer(schema: dict[str, Any]) -> int:
    low, low_open, high, high_open = _bounds(schema)
    if _inside(INTEGER_VALUE, low, low_open, high, high_open):
        return INTEGER_VALUE
    if low is not None and INTEGER_VALUE < low or (low_open and INTEGER_VALUE == low):
        value = math.floor(low) + 1 if low_open else math.ceil(low)
    else:
        assert high is not None
        value = math.ceil(high) - 1 if high_open else math.floor(high)
    return int(value)


def _number(schema: dict[str, Any]) -> float:
    low, low_open, high, high_open = _bounds(schema)
    if _inside(NUMBER_VALUE, low, low_open, high, high_open):
        return NUMBER_VALUE
    if low is not None and high is not None:
        return low / 2 + high / 2  # halves first: no overflow near the float range's ends
    return low + 1 if low is not None else high - 1  # type: ignore[operator]
