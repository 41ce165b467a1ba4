"""`absence-sync token create/list/revoke`, as an operator runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
from aiohttp.test_utils import TestClient, TestServer

from consumer import tokens
from consumer.metrics import Metrics
from consumer.web import WebState, create_app

SCRIPT = Path(sys.executable).parent / "absence-sync"


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSENCE_SYNC_")}
    env["ABSENCE_SYNC_DATABASE_URL"] = dsn
    return subprocess.run([str(SCRIPT), "token", *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_token_shapes() -> None:
    seen = set()
    for _ in range(50):
        token_id, text = tokens.new_token()
        assert text.startswith("absync_") and tokens.looks_like_token(text)
        assert len(text) - len("absync_") >= 43  # 256 bits, base64url
        assert len(token_id) == 12
        seen.add(text)
    assert len(seen) == 50
    assert tokens.token_hash("absync_x") != tokens.token_hash("absync_y")
    assert tokens.allows("configure", "manage") and tokens.allows("manage", "read")
    assert not tokens.allows("read", "manage") and not tokens.allows("manage", "configure")
    assert not tokens.allows("admin", "read")


async def test_create_list_use_revoke(dsn: str, pool: asyncpg.Pool) -> None:
    created = cli(dsn, "create", "--tenant", "acme", "--role", "manage", "--name", "ci bot")
    assert created.returncode == 0, created.stderr
    lines = created.stdout.strip().splitlines()
    token = lines[-1]
    assert tokens.looks_like_token(token) and token == token.strip()
    assert token not in "\n".join(lines[:-1])  # printed once, alone on its line
    token_id = lines[0].split()[2]

    other = cli(dsn, "create", "--tenant", "globex", "--role", "read")
    assert other.returncode == 0, other.stderr

    listed = cli(dsn, "list", "--tenant", "acme")
    assert listed.returncode == 0, listed.stderr
    assert token_id in listed.stdout and "ci bot" in listed.stdout and "manage" in listed.stdout
    assert "never" in listed.stdout and "globex" not in listed.stdout
    assert token not in listed.stdout and token.removeprefix("absync_")[:8] not in listed.stdout

    state = WebState(Metrics(), pool)
    async with TestClient(TestServer(create_app(state))) as client:
        response = await client.get("/api/v1/syncs", headers={"Authorization": f"Bearer {token}"})
        assert response.status == 200
        as_json = json.loads(cli(dsn, "list", "--json").stdout)
        mine = next(t for t in as_json if t["id"] == token_id)
        assert mine["last_used_at"] is not None and mine["revoked"] is False
        assert {t["tenant"] for t in as_json} == {"acme", "globex"}
        assert "absync_" not in json.dumps(as_json)

        revoked = cli(dsn, "revoke", token_id)
        assert revoked.returncode == 0, revoked.stderr
        response = await client.get("/api/v1/syncs", headers={"Authorization": f"Bearer {token}"})
        assert response.status == 401
    assert "(revoked)" in cli(dsn, "list", "--tenant", "acme").stdout

    stored = "\n".join(str(dict(r)) for r in await pool.fetch("SELECT * FROM api_tokens"))
    assert token.removeprefix("absync_") not in stored
    assert tokens.token_hash(token) in stored


def test_bad_arguments_are_reported(dsn: str) -> None:
    bad_role = cli(dsn, "create", "--tenant", "acme", "--role", "admin")
    assert bad_role.returncode == 2 and "admin" in bad_role.stderr
    empty = cli(dsn, "create", "--tenant", " ", "--role", "read")
    assert empty.returncode == 2 and "tenant" in empty.stderr
    unknown = cli(dsn, "revoke", "nope")
    assert unknown.returncode == 1 and "nope" in unknown.stderr
    assert "Traceback" not in bad_role.stderr + empty.stderr + unknown.stderr
