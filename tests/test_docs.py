"""The reference documents in docs/ stay true to the code.

Each check reads a document as its readers do and runs what it shows
through the real code: configuration examples through the YAML loader,
example events through the event parser, the rendering tables through
`render`. No database or broker is needed.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer import events as events_module
from consumer.config import PROVIDERS, SyncConfig, load_file
from consumer.events import Absence, Account, Employee, HalfDay, InvalidEvent, parse_event
from consumer.providers.base import ERROR_CODES
from consumer.render import render, render_team

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
EVENTS = DOCS / "events.md"
GUARANTEES = DOCS / "guarantees.md"
RENDERING = DOCS / "rendering.md"

# SyncConfig fields that are not written in a file: they are built from the provider block
_NOT_IN_FILE = {"provider_settings", "secrets"}

_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def _blocks(text: str, language: str) -> list[tuple[int, int, str]]:
    """(start, end, body) of each fenced block of `language`."""
    return [(m.start(), m.end(), m.group(2)) for m in _FENCE.finditer(text)
            if m.group(1) == language]


def _doc_files() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*") if p.is_file())


def _markdown_files() -> list[Path]:
    return [p for p in _doc_files() if p.suffix == ".md"]


def _sections(text: str) -> dict[str, str]:
    """'### name' heading -> the text up to the next heading."""
    parts = re.split(r"^(#{1,6} .*)$", text, flags=re.MULTILINE)
    found: dict[str, str] = {}
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        if heading.startswith("### "):
            found[heading[4:].strip()] = body
    return found


# --- docs/configuration.md ----------------------------------------------------


def _file_fields() -> list[str]:
    return [name for name in SyncConfig.model_fields if name not in _NOT_IN_FILE]


def test_every_configuration_field_and_provider_has_a_heading() -> None:
    headings = set(_sections(CONFIGURATION.read_text(encoding="utf-8")))
    missing = [name for name in [*_file_fields(), *PROVIDERS] if name not in headings]
    assert missing == [], f"docs/configuration.md lacks '### name' sections for {missing}"


@pytest.mark.parametrize("name", _file_fields())
def test_documented_default_is_the_models(name: str) -> None:
    body = _sections(CONFIGURATION.read_text(encoding="utf-8"))[name]
    line = next((ln for ln in body.splitlines() if ln.startswith("- Default:")), None)
    assert line is not None, f"section {name!r} has no '- Default:' line"
    field = SyncConfig.model_fields[name]
    values = re.findall(r"`([^`]*)`", line)
    if field.is_required():
        assert "required" in line and not values
    elif field.get_default(call_default_factory=True) is None:
        assert not values, f"{name}: no default value, but the doc shows {values}"
    else:
        assert values, f"{name}: the doc does not show the default value"
        assert yaml.safe_load(values[0]) == field.get_default(call_default_factory=True)


_BASE_SYNC: dict[str, Any] = {
    "id": "docs-example",
    "tenant": "acme",
    "provider": "caldav",
    "caldav": {"url": "https://dav.example.com/{email}/calendar/"},
}


def _as_file(doc: Any) -> dict[str, Any]:
    """A complete file from a YAML block: fragments complete a minimal sync."""
    assert isinstance(doc, dict), "a YAML example must be a mapping"
    if "syncs" in doc:
        return doc
    sync = {k: v for k, v in _BASE_SYNC.items() if k not in PROVIDERS}
    given_blocks = [p for p in PROVIDERS if p in doc]
    if not given_blocks and doc.get("provider", "caldav") == "caldav":
        sync["caldav"] = _BASE_SYNC["caldav"]
    if given_blocks and "provider" not in doc:
        sync["provider"] = given_blocks[0]
    sync.update(doc)
    return {"syncs": [sync]}


def _with_dummy_secrets(
    doc: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Set every `*_env` variable a file names, and point every `*_file` at a temp file."""
    for sync in doc["syncs"]:
        for provider in PROVIDERS:
            block = sync.get(provider)
            if not isinstance(block, dict):
                continue
            for key, value in list(block.items()):
                if key.endswith("_env"):
                    monkeypatch.setenv(str(value), "dummy-secret-value")
                elif key.endswith("_file"):
                    secret = tmp_path / f"{sync['id']}-{key}"
                    secret.write_text("dummy-secret-value\n", encoding="utf-8")
                    block[key] = str(secret)
    return doc


def _yaml_examples() -> list[str]:
    return [body for _, _, body in _blocks(CONFIGURATION.read_text(encoding="utf-8"), "yaml")]


@pytest.mark.parametrize("body", _yaml_examples(), ids=lambda b: b.splitlines()[0][:40])
def test_configuration_example_loads(
    body: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = yaml.safe_load(body)
    doc = _with_dummy_secrets(_as_file(raw), tmp_path, monkeypatch)
    path = tmp_path / "syncs.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    configs = load_file(path)
    assert len(configs) == len(doc["syncs"])
    if "syncs" not in raw:  # a field's example: the loaded value is the one shown
        dumped = configs[0].model_dump()  # leave type rules as a file writes them
        for key, value in raw.items():
            if key in SyncConfig.model_fields:
                assert dumped[key] == value, key


def test_the_complete_example_uses_every_provider() -> None:
    full = [yaml.safe_load(b) for b in _yaml_examples() if "syncs:" in b]
    assert len(full) == 1
    assert {sync["provider"] for sync in full[0]["syncs"]} == set(PROVIDERS)


# --- docs/guarantees.md --------------------------------------------------------


@pytest.mark.parametrize("code", ERROR_CODES)
def test_every_error_code_is_explained(code: str) -> None:
    text = GUARANTEES.read_text(encoding="utf-8")
    row = re.search(rf"^\| `{re.escape(code)}` \|(.+)$", text, re.MULTILINE)
    assert row is not None, f"docs/guarantees.md has no table row for {code}"
    cells = [c.strip() for c in row.group(1).split("|") if c.strip()]
    assert len(cells) >= 4, f"the row of {code} leaves columns empty"


# --- docs/events.md --------------------------------------------------------------

_MARKER = re.compile(r"<!--\s*(valid|invalid:\s*([a-z_]+))\s*-->\s*$")


def _event_examples() -> list[tuple[str, str | None, str, str]]:
    """(id, expected reason or None for valid, JSON text, prose since the last block)."""
    text = EVENTS.read_text(encoding="utf-8")
    found: list[tuple[str, str | None, str, str]] = []
    previous_end = 0
    for start, end, body in _blocks(text, "json"):
        before = text[previous_end:start].rstrip().splitlines()
        marker = _MARKER.search(before[-1]) if before else None
        assert marker is not None, (
            f"a json block of docs/events.md lacks a '<!-- valid -->' or "
            f"'<!-- invalid: reason -->' line before it: {body[:80]!r}"
        )
        reason = marker.group(2)
        prose = "\n".join(before[:-1])
        found.append((f"{len(found)}-{reason or 'valid'}", reason, body, prose))
        previous_end = end
    return found


def test_events_doc_has_valid_and_invalid_examples() -> None:
    reasons = [reason for _, reason, _, _ in _event_examples()]
    assert None in reasons
    assert len([r for r in reasons if r]) >= 3


@pytest.mark.parametrize(
    ("reason", "body", "prose"),
    [pytest.param(r, b, p, id=i) for i, r, b, p in _event_examples()],
)
def test_event_example_is_judged_as_the_doc_says(
    reason: str | None, body: str, prose: str
) -> None:
    raw = body.encode("utf-8")
    if reason is None:
        parsed = parse_event(raw)
        assert parsed.absence.id
        return
    with pytest.raises(InvalidEvent) as refused:
        parse_event(raw)
    assert refused.value.reason == reason
    last_paragraph = prose.strip().split("\n\n")[-1]
    assert f"`{reason}`" in last_paragraph, "the text before the example must name the reason"


def _reasons_in_code() -> set[str]:
    """Every reason `InvalidEvent` is raised with in consumer/events.py."""
    tree = ast.parse(Path(events_module.__file__).read_text(encoding="utf-8"))
    reasons: set[str] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "InvalidEvent" and node.args):
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                reasons.add(first.value)
            elif isinstance(first, ast.Name):
                reasons.add(str(getattr(events_module, first.id)))
    return reasons


def test_every_dead_letter_reason_is_documented() -> None:
    text = EVENTS.read_text(encoding="utf-8")
    reasons = _reasons_in_code()
    assert len(reasons) >= 5
    missing = [r for r in sorted(reasons) if f"| `{r}` |" not in text]
    assert missing == [], f"docs/events.md does not explain the reasons {missing}"


# --- docs/rendering.md: the example tables are what render() does -----------------


def _checked_table(name: str) -> list[list[str]]:
    text = RENDERING.read_text(encoding="utf-8")
    at = text.index(f"<!-- checked: {name} -->")
    rows: list[list[str]] = []
    for line in text[at:].splitlines()[1:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("`").strip() for c in line.strip().strip("|").split("|")])
    assert len(rows) > 3, f"table {name} not found"
    return rows[2:]  # header and separator


def _flag(cell: str) -> bool:
    assert cell in ("true", "false"), cell
    return cell == "true"


def _absence(
    *,
    status: str = "approved",
    counted: bool = True,
    public: bool = False,
    name: str = "Paid leave",
    establishment: str = "paris",
    start: tuple[str, str] = ("2026-12-01", "am"),
    end: tuple[str, str] = ("2026-12-01", "pm"),
) -> Absence:
    def half(value: tuple[str, str]) -> HalfDay:
        return HalfDay(dt.date.fromisoformat(value[0]), "am" if value[1] == "am" else "pm")

    return Absence(
        tenant="acme", id="abs-1", version=1, deleted=False, status=status,
        employee=Employee("emp-42", "jane.doe@acme.com", establishment, None, "Europe/Paris"),
        account=Account("paid-leave", name, counted, public),
        start=half(start), end=half(end),
    )


def _config(**fields: Any) -> SyncConfig:
    return SyncConfig(id="acme-o365", tenant="acme", provider="microsoft365", **fields)


def test_wanted_table() -> None:
    for kind, status, pending, in_scope, holds in _checked_table("wanted"):
        config = _config(sync_pending=_flag(pending), establishments=["paris"])
        if kind == "absence.deleted":
            absence = Absence(tenant="acme", id="abs-1", version=2, deleted=True)
        else:
            absence = _absence(status=status,
                               establishment="paris" if in_scope == "yes" else "lyon")
        assert holds in ("an event", "no event")
        assert (render(absence, config) is not None) == (holds == "an event"), (kind, status)


def test_label_table() -> None:
    for hide, public, name, hidden, title in _checked_table("label"):
        event = render(_absence(public=_flag(public), name=name),
                       _config(hide_labels=_flag(hide), hidden_label=hidden))
        assert event is not None and event.subject == title


def test_show_as_table() -> None:
    for counted, status, default, alternative in _checked_table("show-as"):
        absence = _absence(counted=_flag(counted), status=status)
        for config, expected in ((_config(), default),
                                 (_config(busy_as="oof", free_as="workingElsewhere"),
                                  alternative)):
            event = render(absence, config)
            assert event is not None and event.show_as == expected, (counted, status)


_HALF = re.compile(r"^(\d{4}-\d{2}-\d{2}) (am|pm)$")
_ALL_DAY = re.compile(r"^all day from (\S+) to (\S+)$")
_TIMED = re.compile(r"^timed from (\S+ \d{2}:\d{2}) to (\S+ \d{2}:\d{2})$")


def _half_cell(cell: str) -> tuple[str, str]:
    match = _HALF.match(cell.replace("`", ""))
    assert match is not None, cell
    return match.group(1), match.group(2)


def test_timing_table() -> None:
    for start, end, as_timed, expected in _checked_table("timing"):
        event = render(
            _absence(start=_half_cell(start), end=_half_cell(end)),
            _config(whole_days_as_timed=_flag(as_timed)),
        )
        assert event is not None
        assert event.time_zone == "Europe/Paris"
        if (whole := _ALL_DAY.match(expected)) is not None:
            assert event.all_day, expected
            assert (event.start, event.end) == (
                dt.datetime.fromisoformat(whole.group(1)),
                dt.datetime.fromisoformat(whole.group(2)),
            )
        else:
            timed = _TIMED.match(expected)
            assert timed is not None, f"unreadable cell {expected!r}"
            assert not event.all_day, expected
            assert (event.start, event.end) == (
                dt.datetime.fromisoformat(timed.group(1)),
                dt.datetime.fromisoformat(timed.group(2)),
            )


# --- docs/rendering.md: leave type rules and the team view -------------------------------


def _typed(cell: str, **fields: Any) -> SyncConfig:
    """A configuration whose rule for the example's leave type (`paid-leave`) is `cell`."""
    rule = yaml.safe_load(cell)
    assert isinstance(rule, dict), cell
    return _config(types={"paid-leave": rule}, **fields)


def test_types_wanted_table() -> None:
    for status, pending, rule, holds in _checked_table("types-wanted"):
        assert holds in ("an event", "no event")
        event = render(_absence(status=status), _typed(rule, sync_pending=_flag(pending)))
        assert (event is not None) == (holds == "an event"), (status, pending, rule)


def test_types_label_table() -> None:
    for hide, public, rule, title in _checked_table("types-label"):
        event = render(_absence(public=_flag(public), name="Training"),
                       _typed(rule, hide_labels=_flag(hide)))
        assert event is not None and event.subject == title, (hide, public, rule)


def test_types_show_as_table() -> None:
    for counted, status, rule, default, alternative in _checked_table("types-show-as"):
        absence = _absence(counted=_flag(counted), status=status)
        for config, expected in ((_typed(rule), default),
                                 (_typed(rule, busy_as="oof", free_as="workingElsewhere"),
                                  alternative)):
            event = render(absence, config)
            assert event is not None and event.show_as == expected, (counted, status, rule)


def test_types_private_and_category_table() -> None:
    for private, category, rule, is_private, shown in _checked_table("types-private-category"):
        fields: dict[str, Any] = {"private": _flag(private)}
        if category:
            fields["category"] = category
        event = render(_absence(), _typed(rule, **fields))
        assert event is not None, rule
        assert (event.private, event.category) == (_flag(is_private), shown or None), rule


def test_team_table() -> None:
    for name, hide, status, rule, title, show_as, private in _checked_table("team"):
        absence = _absence(status=status)
        assert absence.employee is not None
        absence = dataclasses.replace(absence, employee=dataclasses.replace(
            absence.employee, display_name=name or None))
        event = render_team(absence, _typed(rule, hide_labels=_flag(hide)), "team@acme.com")
        assert event is not None, rule
        assert (event.subject, event.show_as, event.private) == (
            title, show_as, _flag(private)), rule


# --- every document -----------------------------------------------------------------


# what points outside the repository: the product documents of the team's shared
# folder, by name or path (built from pieces, so that this file does not match itself)
_OUTSIDE = re.compile("|".join([
    r"\b" + "SP" + r"EC\b", r"\b" + "ST" + r"YLE\b", "/work/" + "shared", r"\.\./" + "shared/",
]))
# not the repository's: tools' caches, the virtual environment, build and test output
_NOT_OURS = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
             ".hypothesis", "build", "dist", "test-artifacts"}


def _repository_files() -> Iterator[Path]:
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _NOT_OURS and not d.endswith(".egg-info")]
        for name in files:
            yield Path(folder) / name


def test_nothing_in_the_repository_cites_a_document_outside_it() -> None:
    """Code, tests, docs, deploy files and scripts stand alone: they point at the
    repository's own docs (docs/*.md, README sections), never at a document
    a reader of the repository cannot open."""
    found = []
    for path in _repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # images
        for number, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


def test_the_outside_pattern_can_fail() -> None:
    assert _OUTSIDE.search("Rendering rules (" + "SP" + "EC section 5)")
    assert _OUTSIDE.search("see " + "/work/" + "shared/notes.md")
    assert not _OUTSIDE.search("_SUSPECT_ESCAPE and BlockSpec and a style sheet")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    for match in re.finditer(r"^#{1,6} (.+?)\s*#*\s*$", text, re.MULTILINE):
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path: Path) -> Iterator[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    for match in re.finditer(r"\]\(([^)\s]+)\)", text):
        yield match.group(1)


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for link in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        target_text, _, anchor = link.partition("#")
        target = (path.parent / target_text).resolve() if target_text else path
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link}: no heading with that anchor")
    assert broken == []


def test_anchor_slugs_follow_github() -> None:
    assert _slug("The absence: `data` of `absence.upserted`") == (
        "the-absence-data-of-absenceupserted"
    )
    assert _slug("1. Wanted or not") == "1-wanted-or-not"


def test_team_wanted_table() -> None:
    for status, pending, rule, holds in _checked_table("team-wanted"):
        assert holds in ("an event", "no event")
        config = _typed(rule, sync_pending=_flag(pending))
        event = render_team(_absence(status=status), config, "team@acme.com")
        assert (event is not None) == (holds == "an event"), (status, pending, rule)
        # the team calendar holds an event exactly when the employee's calendar does
        assert (event is None) == (render(_absence(status=status), config) is None)


def test_no_example_shows_a_placeholder_directory() -> None:
    """The Microsoft 365 directory is recorded by admin consent: examples leave
    `tenant_id` out instead of showing a made-up one to replace."""
    shown = []
    for path in [ROOT / "README.md", *_markdown_files(), *(ROOT / "deploy").rglob("*.y*ml")]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"tenant_id:\s*\S", line) or "filled in by admin consent" in line:
                shown.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert shown == []
