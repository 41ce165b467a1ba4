"""The published absence event schema accepts exactly the documented shapes.

`schemas/examples/valid` must validate, `schemas/examples/invalid` must not,
and `schemas/examples/semantic` must validate: those break rules a schema
cannot express and are rejected by code (tested with the event model).
The validator runs without a format checker, as consumers in other languages
may: the schema's patterns alone must reject bad dates, times and addresses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
SCHEMA_PATH = SCHEMAS / "absence-event.v1.json"
EXAMPLES = SCHEMAS / "examples"


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _examples(kind: str) -> list[Path]:
    return sorted((EXAMPLES / kind).glob("*.json"))


def _validator() -> Draft202012Validator:
    return Draft202012Validator(_load(SCHEMA_PATH))


VALID = _examples("valid")
INVALID = _examples("invalid")
SEMANTIC = _examples("semantic")


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = _load(SCHEMA_PATH)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "https://absence-sync.dev/schemas/absence-event.v1.json"
    Draft202012Validator.check_schema(schema)


def test_every_example_set_is_populated() -> None:
    assert len(VALID) >= 12
    assert len(INVALID) >= 20
    assert len(SEMANTIC) >= 5


@pytest.mark.parametrize("path", VALID, ids=[p.name for p in VALID])
def test_valid_example_is_accepted(path: Path) -> None:
    errors = [e.message for e in _validator().iter_errors(_load(path))]
    assert errors == []


@pytest.mark.parametrize("path", INVALID, ids=[p.name for p in INVALID])
def test_invalid_example_is_rejected(path: Path) -> None:
    assert not _validator().is_valid(_load(path))


@pytest.mark.parametrize("path", SEMANTIC, ids=[p.name for p in SEMANTIC])
def test_semantic_example_passes_the_schema(path: Path) -> None:
    errors = [e.message for e in _validator().iter_errors(_load(path))]
    assert errors == []
