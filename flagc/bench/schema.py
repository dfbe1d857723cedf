"""The JSON result schema of `flagc bench`, and a small validator for it.

`RESULT_SCHEMA` is written in JSON Schema (draft 2020-12) vocabulary, restricted to the keywords
`validate` implements — type, properties, required, additionalProperties, items, enum, const,
minimum — so that `jsonschema` (where installed) accepts the same documents, without flagc
depending on it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SCHEMA_ID", "RESULT_SCHEMA", "validate", "check_result"]

SCHEMA_ID = "flagc.bench/1"

_NUM = {"type": "number"}
_STR = {"type": "string"}
_OPT_STR = {"type": ["string", "null"]}
_COUNT = {"type": "integer", "minimum": 0}

STAT = {  # a summary of repeated timings (or rates)
    "type": "object",
    "required": ["median", "min", "max", "n", "spread_pct"],
    "properties": {"median": _NUM, "min": _NUM, "max": _NUM, "n": {"type": "integer",
                                                                     "minimum": 1},
                   "spread_pct": _NUM},
    "additionalProperties": False,
}

POINT = {
    "type": "object",
    "required": ["workload", "batch", "seq", "new_tokens"],
    "properties": {"workload": {"enum": ["encoder", "decode"]},
                   "batch": {"type": "integer", "minimum": 1},
                   "seq": {"type": "integer", "minimum": 1}, "new_tokens": _COUNT},
    "additionalProperties": False,
}

CPU = {"type": ["object", "null"],
       "properties": {"other_procs_cores": _NUM, "own_cores": _NUM, "wall_s": _NUM}}

ENGINE = {
    "type": "object",
    "required": ["name", "label", "status", "note", "load_s", "memory", "details"],
    "properties": {
        "name": _STR, "label": _STR,
        "status": {"enum": ["ok", "skipped", "error"]},
        "note": _OPT_STR,
        "load_s": {"type": ["number", "null"]},
        "memory": {"type": ["object", "null"],
                   "required": ["peak_rss_mb", "peak_rise_mb", "method"],
                   "properties": {"peak_rss_mb": _NUM, "peak_rise_mb": _NUM, "method": _STR}},
        "details": {"type": "object"},
    },
    "additionalProperties": False,
}

MEASUREMENT = {
    "type": "object",
    "required": ["engine", "key", "point", "stats", "noisy", "cpu"],
    "properties": {
        "engine": _STR, "key": _STR, "point": POINT, "noisy": {"type": "boolean"}, "cpu": CPU,
        "stats": {"type": "object", "properties": {
            "latency_ms": STAT, "tokens_per_s": _NUM, "ttft_ms": STAT,
            "decode_ms_per_token": STAT, "decode_tok_s": STAT, "total_s": STAT,
            "new_tokens": _COUNT}, "additionalProperties": False},
    },
    "additionalProperties": False,
}

RATIO = {
    "type": "object",
    "required": ["key", "baseline", "point", "metric", "ratio", "ratio_best", "noisy"],
    "properties": {"key": _STR, "baseline": _STR, "point": POINT,
                   "metric": {"enum": ["latency", "ttft", "decode"]},
                   "ratio": {"type": "number", "minimum": 0},
                   "ratio_best": {"type": "number", "minimum": 0}, "noisy": {"type": "boolean"}},
    "additionalProperties": False,
}

ARTIFACT = {
    "type": "object",
    "required": ["id", "path", "engines", "measurements", "ratios"],
    "properties": {
        "id": _STR, "path": _STR, "model": _OPT_STR, "family": _OPT_STR, "task": _OPT_STR,
        "target": _OPT_STR, "workload": {"enum": ["encoder", "decode"]}, "source": _OPT_STR,
        "tokenizer": _STR, "error": _STR, "skipped": _STR,
        "engines": {"type": "array", "items": ENGINE},
        "measurements": {"type": "array", "items": MEASUREMENT},
        "ratios": {"type": "array", "items": RATIO},
    },
    "additionalProperties": False,
}

PLOT = {
    "type": ["object", "null"],
    "required": ["file", "axes"],
    "properties": {"file": _STR, "axes": {"type": "array", "items": {
        "type": "object", "required": ["title", "xlabel", "ylabel", "lines"],
        "properties": {"title": _STR, "xlabel": _STR, "ylabel": _STR,
                       "lines": {"type": "array", "items": _STR}}}}},
}

RESULT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "flagc bench result",
    "type": "object",
    "required": ["schema", "meta", "settings", "artifacts", "notes", "plot"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "meta": {"type": "object",
                 "required": ["date", "command", "versions", "machine", "loadavg_start",
                              "wall_s"],
                 "properties": {"date": _STR, "command": _STR, "versions": {"type": "object"},
                                "machine": {"type": "object"},
                                "torch_threads": {"type": ["integer", "null"]},
                                "peak_rss_method": _OPT_STR,
                                "loadavg_start": {"type": "array", "items": _NUM},
                                "loadavg_end": {"type": ["array", "null"], "items": _NUM},
                                "wall_s": {"type": ["number", "null"]}}},
        "settings": {"type": "object",
                     "required": ["suite", "baselines", "threads", "device", "definitions"],
                     "properties": {"suite": _STR, "baselines": {"type": "array", "items": _STR},
                                    "threads": {"type": "integer", "minimum": 1},
                                    "device": {"enum": ["cpu", "cuda"]},
                                    "warmup": {"type": ["integer", "null"]},
                                    "reps": {"type": ["integer", "null"]},
                                    "seed": {"type": "integer"},
                                    "definitions": {"type": "object"}}},
        "artifacts": {"type": "array", "items": ARTIFACT},
        "notes": {"type": "array", "items": _STR},
        "plot": PLOT,
    },
    "additionalProperties": False,
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value: Any, name: str) -> bool:
    if name in ("integer", "number"):
        if isinstance(value, bool):  # bool is an int in Python, not in JSON
            return False
        return isinstance(value, int) if name == "integer" else isinstance(value, (int, float))
    return isinstance(value, _TYPES[name])


def validate(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Errors of `value` against `schema` (empty when valid), each naming the JSON path."""
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_is_type(value, t) for t in names):
            return [f"{path}: expected {' or '.join(names)}, got {type(value).__name__}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and _is_type(value, "number") and value < schema["minimum"]:
        errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing required key {key!r}")
        for key, item in value.items():
            if key in props:
                errors += validate(item, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected key {key!r}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


def check_result(result: dict[str, Any]) -> None:
    """Raise ValueError listing every schema violation of a bench result."""
    errors = validate(result, RESULT_SCHEMA)
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"bench result does not match schema {SCHEMA_ID}:\n  {shown}{more}")
