"""Validate events against the published schema, docs/events.schema.json.

    from tests.schema import validate_event, validate_ndjson

    validate_event(event)          # AssertionError naming the event and the failing path
    n = validate_ndjson(log_path)  # every line of a flow log; returns the number of events

The schema is JSON Schema draft-07, compiled once per process into Python by
fastjsonschema (tens of microseconds per event: the e2e tests validate every
event their daemons write). tests/unit/test_event_schema.py also checks the
schema itself against the draft-07 meta-schema with jsonschema.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import fastjsonschema
import orjson

SCHEMA_PATH: Path = Path(__file__).resolve().parent.parent / "docs" / "events.schema.json"


def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@functools.cache
def _validator() -> Callable[[object], object]:
    return fastjsonschema.compile(schema())


def validate_event(event: dict) -> None:
    try:
        _validator()(event)
    except fastjsonschema.JsonSchemaValueException as e:
        # fastjsonschema names the value "data": say "event" (event.dst.port)
        message = e.message.replace("data", "event", 1)
        raise AssertionError(f"{message} — in {orjson.dumps(event).decode()}") from None


def validate_ndjson(path: str | Path) -> int:
    """Validate every line of a flow log (NDJSON); the number of events."""
    n = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise AssertionError(f"{path}:{lineno}: not JSON ({e})") from None
            try:
                validate_event(event)
            except AssertionError as e:
                raise AssertionError(f"{path}:{lineno}: {e}") from None
            n += 1
    return n
