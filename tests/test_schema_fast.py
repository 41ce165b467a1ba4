"""The compiled fast check judges every document as the reference validator does.

Differential test over every example and systematic mutations of them: each
member removed, each leaf replaced by values of other types and shapes,
including the whitespace and line ends on which regex dialects differ
(Python's `\\s` takes \\x1c-\\x1f, its `$` matches before a final newline).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from consumer.events import PYTHON_WHITESPACE, _fast_check, validator

_ROOT = Path(__file__).parent.parent / "schemas" / "examples"
EXAMPLES = sorted([*_ROOT.glob("valid/*.json"), *_ROOT.glob("semantic/*.json")])
REPLACEMENTS: list[Any] = [
    None, True, 0, -1, 1.5, "", " ", "x", "am", "pm", "approved", "2026-13-01",
    "2026-12-01", "a@b.co", "Europe/Paris", "1.0", "x" * 600, [], {}, ["x"], {"date": "x"},
    "\x1c", "a\x1cb@c.de", "\u3000", "2026-12-01\n", 2**70,
]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield (*prefix, index)
            yield from _paths(value, (*prefix, index))


def _mutants(doc: Any) -> Iterator[Any]:
    yield doc
    for path in _paths(doc):
        parent_path, last = path[:-1], path[-1]
        for replacement in [*REPLACEMENTS, "__delete__"]:
            mutant = copy.deepcopy(doc)
            parent = mutant
            for step in parent_path:
                parent = parent[step]
            if replacement == "__delete__":
                if isinstance(parent, dict):
                    del parent[last]
                else:
                    continue
            else:
                parent[last] = replacement
            yield mutant


def _fast_valid(doc: Any) -> bool:
    try:
        return bool(_fast_check()(doc))
    except (ValueError, TypeError, OverflowError):
        return False  # parse_event then asks the reference


def test_python_whitespace_is_what_re_matches_as_whitespace() -> None:
    assert "".join(
        chr(i) for i in range(0x110000) if re.match(r"\s", chr(i))
    ) == PYTHON_WHITESPACE


def test_fast_check_agrees_with_the_reference_validator() -> None:
    reference = validator()
    checked = 0
    disagreements: list[str] = []
    for path in EXAMPLES:
        for mutant in _mutants(json.loads(path.read_text())):
            checked += 1
            if _fast_valid(mutant) != reference.is_valid(mutant):
                disagreements.append(f"{path.name}: {json.dumps(mutant)[:300]}")
    assert checked > 5_000
    assert disagreements == []
