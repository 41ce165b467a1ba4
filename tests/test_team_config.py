"""`team_calendar:` of a configuration: validation (file, sync and field named in
every error), normalisation, storage, and which targets a configuration has."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consumer.config import ConfigError, SyncConfig, load_file, parse_sync
from consumer.store import _render_hash
from consumer.targets import CALENDAR, KNOWN, REPLY, TEAM, targets_of, transaction_id
from tests.admin_world import record
from tests.test_cli import run
from tests.test_feeds import doc

BASE: dict[str, Any] = {
    "id": "acme-dav", "tenant": "acme", "provider": "caldav",
    "caldav": {"url": "https://dav.example.com/{email}/calendar/"},
}


def config(**fields: Any) -> SyncConfig:
    return parse_sync("test", {**BASE, **fields})


def test_team_calendar_address_is_read_and_kept_in_lower_case() -> None:
    cfg = config(team_calendar={"address": "  Team-Paris@Acme.Example "})
    assert cfg.team_calendar is not None
    assert cfg.team_calendar.address == "team-paris@acme.example"
    assert targets_of(cfg) == [CALENDAR, TEAM]


def test_without_team_calendar_a_configuration_has_its_calendar_only() -> None:
    assert targets_of(config()) == [CALENDAR]
    assert targets_of(config(team_calendar=None)) == [CALENDAR]
    assert config().team_calendar is None


@pytest.mark.parametrize(
    ("team", "field", "fragment"),
    [
        ({}, "team_calendar.address", "is required"),
        ({"address": ""}, "team_calendar.address", "must be an e-mail address"),
        ({"address": "team/paris"}, "team_calendar.address", "must be an e-mail address such "
                                                            "as team-paris@acme.example"),
        ({"address": "a b@acme.example"}, "team_calendar.address", "must be an e-mail"),
        ({"address": "team@@acme.example"}, "team_calendar.address", "must be an e-mail"),
        ({"address": "x" * 320 + "@acme.example"}, "team_calendar.address",
         "must be an e-mail"),
        ({"address": 42}, "team_calendar.address", "must be an e-mail address (text)"),
        ({"address": ["team@acme.example"]}, "team_calendar.address", "(text)"),
        ({"address": "team@acme.example", "name": "Paris"}, "team_calendar",
         "unknown field 'name' (a team calendar accepts: address)"),
        ("team@acme.example", "team_calendar", "must be a mapping with the shared "
                                               "calendar's address"),
        (["team@acme.example"], "team_calendar", "must be a mapping"),
    ],
)
def test_bad_team_calendars_are_refused_with_a_clear_message(
    team: Any, field: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        config(team_calendar=team)
    message = str(refused.value)
    assert message.startswith(f"test: field '{field}': "), message
    assert fragment in message


def test_a_caldav_team_calendar_may_be_a_collection_name_the_others_are_mailboxes() -> None:
    cfg = config(team_calendar={"address": "Team-Paris"})
    assert cfg.team_calendar is not None and cfg.team_calendar.address == "team-paris"
    for provider, block in (("microsoft365", {"tenant_id": "t-1"}),
                            ("exchange", None)):
        raw: dict[str, Any] = {"id": "x", "tenant": "acme", "provider": provider,
                               "team_calendar": {"address": "team-paris"}}
        if block is not None:
            raw[provider] = block
        else:
            raw["exchange"] = {"url": "https://mail.acme.example/EWS/Exchange.asmx",
                               "username": "svc", "password_env": "TEAM_TEST_PASSWORD"}
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TEAM_TEST_PASSWORD", "secret")
            with pytest.raises(ConfigError) as refused:
                parse_sync("test", raw)
        assert str(refused.value) == (
            f"test: field 'team_calendar.address': a {provider} team calendar is a shared "
            "mailbox: must be an e-mail address such as team-paris@acme.example, got "
            "'team-paris'"
        )


def test_an_ics_configuration_has_no_team_calendar_its_team_feed_is_the_team_view() -> None:
    with pytest.raises(ConfigError) as refused:
        parse_sync("test", {"id": "acme-ics", "tenant": "acme", "provider": "ics",
                            "team_calendar": {"address": "team@acme.example"}})
    message = str(refused.value)
    assert message.startswith("test: field 'team_calendar': an ics configuration has no "
                              "calendar to write to")
    assert "absence-sync feed create --config ID" in message
    # built in code, the model refuses it too
    with pytest.raises(ValueError, match="team view is the configuration feed"):
        SyncConfig(id="x", tenant="acme", provider="ics",
                   team_calendar={"address": "team@acme.example"})  # type: ignore[arg-type]
    ics = parse_sync("test", {"id": "acme-ics", "tenant": "acme", "provider": "ics",
                              "team_calendar": None})
    assert targets_of(ics) == [CALENDAR]


def test_file_errors_name_the_file_the_sync_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "syncs.yaml"
    path.write_text(textwrap.dedent("""\
        syncs:
          - id: acme-dav
            tenant: acme
            provider: caldav
            caldav: {url: "https://dav.example.com/{email}/calendar/"}
            team_calendar: {address: "not an address"}
    """), encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_file(path)
    assert str(refused.value).startswith(
        f"{path}: sync 'acme-dav': field 'team_calendar.address': must be an e-mail address"
    )


def test_a_file_with_a_team_calendar_loads(tmp_path: Path) -> None:
    path = tmp_path / "syncs.yaml"
    path.write_text(textwrap.dedent("""\
        syncs:
          - id: acme-o365
            tenant: acme
            provider: microsoft365
            microsoft365: {tenant_id: 00000000-0000-0000-0000-000000000001}
            team_calendar: {address: team-paris@acme.example}
    """), encoding="utf-8")
    (cfg,) = load_file(path)
    assert cfg.team_calendar is not None
    assert cfg.team_calendar.address == "team-paris@acme.example"
    assert cfg.public_dict()["team_calendar"] == {"address": "team-paris@acme.example"}


def test_configurations_without_a_team_calendar_store_and_render_as_before() -> None:
    """Stored settings and the render hash of a configuration without the option
    are what they were before it existed: applying the same file again changes
    nothing and re-renders nothing."""
    plain = config()
    assert "team_calendar" not in plain.public_dict()
    assert "team_calendar" not in plain.render_dict()
    with_team = config(team_calendar={"address": "team@acme.example"})
    moved = config(team_calendar={"address": "team-2@acme.example"})
    hashes = {_render_hash(plain), _render_hash(with_team), _render_hash(moved)}
    assert len(hashes) == 3  # adding, or moving, the team calendar re-renders


def test_targets_are_a_closed_set_with_their_own_transaction_ids() -> None:
    assert KNOWN == (CALENDAR, TEAM, REPLY)
    # the employee calendar keeps the transaction ids it had before targets existed
    assert transaction_id("acme", "abs-1", 3) == "acme/abs-1/3"
    assert transaction_id("acme", "abs-1", 3, CALENDAR) == "acme/abs-1/3"
    assert transaction_id("acme", "abs-1", 3, TEAM) == "acme/abs-1/team/3"


async def test_config_apply_and_show_through_the_console_script(
    dsn: str, tmp_path: Path, pool: asyncpg.Pool
) -> None:
    """`config apply` stores the team calendar; `config show` prints it and the
    items of each target."""
    path = tmp_path / "syncs.yaml"
    path.write_text(textwrap.dedent("""\
        syncs:
          - id: acme-dav
            tenant: acme
            provider: caldav
            caldav: {url: "https://dav.example.com/{email}/calendar/"}
            team_calendar: {address: Team-Paris@acme.example}
    """), encoding="utf-8")
    applied = run(dsn, "config", "apply", "-f", str(path))
    assert applied.returncode == 0, applied.stderr
    await record(pool, [doc("jane"), doc("john", email="john@acme.test")])
    shown = run(dsn, "config", "show", "acme-dav")
    assert shown.returncode == 0, shown.stderr
    shown_doc = json.loads(shown.stdout)
    assert shown_doc["team_calendar"] == {"address": "team-paris@acme.example"}
    assert shown_doc["items"] == {"pending": 4}
    assert shown_doc["items_by_target"] == {"calendar": {"pending": 2}, "team": {"pending": 2}}
    again = run(dsn, "config", "apply", "-f", str(path))
    assert again.stdout.splitlines() == ["acme-dav: unchanged"]
