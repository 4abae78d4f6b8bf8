"""Seeded random JSON schemas, and one valid instance of each: the structured-output tests
(tests/gpu_workers/test_structured_output.py) and benchmarks (benchmarks/grammar_engines.py,
benchmarks/structured.py) draw the same ones.

The schemas use what both grammar engines measured here (llguidance, xgrammar) support: objects with
nested properties (``required``, ``additionalProperties: false``), enums, ``const``, arrays
(``minItems``/``maxItems``), integers and numbers with bounds, strings with ``maxLength`` or an
anchored ``pattern``, booleans, null and ``anyOf``. Every string, array and object is bounded, so
even a random-weights model constrained by the schema ends within a few hundred tokens: the tests
check that whatever it writes parses and validates.
"""

from __future__ import annotations

import random
from typing import Any

# Anchored patterns (JSON Schema's are unanchored searches; the engines treat them as whole matches:
# anchoring makes the two readings agree), each with a value that matches it.
PATTERNS: tuple[tuple[str, str], ...] = (
    (r"^[a-z]{1,6}$", "alpha"),
    (r"^[A-Z][a-z]{0,5}$", "Paris"),
    (r"^[0-9]{3}-[0-9]{4}$", "555-0199"),
    (r"^(red|green|blue)$", "green"),
    (r"^[a-f0-9]{4,8}$", "c0ffee"),
)
NAMES = ("id", "name", "title", "count", "tags", "price", "active", "owner", "items", "meta", "kind",
         "score", "city", "level", "notes", "size")
WORDS = ("alpha", "beta", "gamma", "delta", "north", "south", "small", "large")


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """One random schema (nested at most 3 deep)."""
    kinds = ["string", "integer", "number", "boolean", "enum", "pattern"]
    if depth < 3:
        kinds += ["object", "object", "array"]
    if depth > 0:
        kinds += ["null", "const", "anyOf"]
    kind = rng.choice(kinds) if depth > 0 else "object"
    if kind == "object":
        names = rng.sample(NAMES, rng.randint(1, 4))
        return {
            "type": "object",
            "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": [n for n in names if rng.random() < 0.7],
            "additionalProperties": False,
        }
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": low,
                "maxItems": low + rng.randint(0, 2)}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 12)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)[0]}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        low = rng.randint(-50, 50)
        return {"type": "number", "minimum": low, "maximum": low + rng.randint(1, 100)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "const":
        return {"const": rng.choice(WORDS)}
    if kind == "anyOf":
        return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 5}]}
    values: list[Any] = rng.sample(WORDS, rng.randint(1, 4))
    if rng.random() < 0.3:
        values.append(rng.randint(0, 99))
    return {"enum": values}


def random_schemas(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [random_schema(rng) for _ in range(count)]


def instance_of(schema: dict[str, Any], rng: random.Random) -> Any:
    """A value that validates against ``schema`` (one of ``random_schema``'s)."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "anyOf" in schema:
        return instance_of(rng.choice(schema["anyOf"]), rng)
    kind = schema["type"]
    if kind == "object":
        props = schema["properties"]
        return {n: instance_of(s, rng) for n, s in props.items() if n in schema["required"] or rng.random() < 0.5}
    if kind == "array":
        return [instance_of(schema["items"], rng) for _ in range(rng.randint(schema["minItems"], schema["maxItems"]))]
    if kind == "string":
        if "pattern" in schema:
            return dict(PATTERNS)[schema["pattern"]]
        word = rng.choice(WORDS)[: schema["maxLength"]]
        return word if len(word) >= schema.get("minLength", 0) else "xyz"
    if kind == "integer":
        return rng.randint(schema["minimum"], schema["maximum"])
    if kind == "number":
        return round(rng.uniform(schema["minimum"], schema["maximum"]), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    return None
