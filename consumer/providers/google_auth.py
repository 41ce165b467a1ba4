"""Google service-account tokens with domain-wide delegation (the JWT bearer grant).

A Workspace administrator authorizes the service account's client id for a
scope once; the service then obtains, for any user ("subject") of the
domain, an access token acting as that user. `GoogleTokens` is that token
client, shared by everything that talks to Google as an employee (the
Calendar provider with scope `CALENDAR_SCOPE`, automatic replies with the
Gmail settings scope). What callers may rely on:

* The key is the JSON key file of a service account (`ServiceAccountKey.parse`);
  a key that cannot be used fails every call with `auth_failed`.
* The assertion is an RS256 JWT signed with the key (issuer the service
  account's e-mail, subject the employee, the scope, audience the token
  URL), posted to the token endpoint (ABSENCE_SYNC_GOOGLE_TOKEN_URL, which
  overrides the key file's `token_uri`) over the same verified TLS as every
  provider. Signing runs off the event loop.
* Tokens are cached per (subject, scope) until `TOKEN_MARGIN` seconds before
  they expire; concurrent calls for one subject fetch one token. A permanent
  refusal for a subject is answered from memory for a few seconds, so a
  burst of writes for an unknown employee costs one token request.
* Every refusal leaves as a `ProviderError` (`token_error`): the admin console
  step missing (`unauthorized_client`) is `access_denied` with the exact
  client id and scope to authorize; an unknown employee (`invalid_grant`) is
  `mailbox_not_found`; a bad or revoked key is `auth_failed`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from consumer.providers.base import (
    ACCESS_DENIED,
    AUTH_FAILED,
    MAILBOX_NOT_FOUND,
    PROVIDER_ERROR,
    THROTTLED,
    ProviderContext,
    ProviderError,
    https_session,
    transport_error,
)

CALENDAR_SCOPE = "https://www.googleapis.com/auth/calendar.events"
#: Gmail settings (automatic replies: users.settings.updateVacation)
GMAIL_SCOPE = "https://www.googleapis.com/auth/gmail.settings.basic"
GMAIL_SETTINGS_SCOPE = "https://www.googleapis.com/auth/gmail.settings.basic"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME = 3600
TOKEN_MARGIN = 300.0
_FAILURE_MEMORY = 10.0
_PRUNE_ABOVE = 10_000

_HINT_KEY = (
    "The service account key of this configuration cannot be used: give the JSON key "
    "file downloaded from the Google Cloud console (Service accounts > Keys > Add key > "
    "JSON) as google.service_account_file or service_account_env; a key deleted or "
    "disabled in the console must be replaced."
)


def delegation_hint(client_id: str, scope: str) -> str:
    """What the Workspace administrator must do when delegation is missing."""
    who = f"client id {client_id}" if client_id else "the service account's client id"
    return (
        "Domain-wide delegation is missing: in the Google Admin console (Security > "
        "Access and data control > API controls > Manage domain-wide delegation), a super "
        f"administrator must authorize {who} for the scope {scope}. A new or changed "
        "authorization can take several hours to apply; writes are retried when the "
        "configuration changes or an operator asks."
    )


def mailbox_hint(subject: str) -> str:
    return (
        f"Google Workspace knows no active user {subject}: the employee's address in the HR "
        "system may differ from their Google account (set calendar_address), or the user "
        "is suspended or outside the domain that delegated to the service account."
    )


@dataclass(frozen=True, slots=True)
class ServiceAccountKey:
    """The parts of a service account's JSON key the JWT grant needs (repr hides the key)."""

    client_email: str
    private_key: str = field(repr=False)
    private_key_id: str = ""
    client_id: str = ""

    @classmethod
    def parse(cls, text: str) -> ServiceAccountKey:
        """The key in `text` (the JSON key file), or `ProviderError(auth_failed)`."""
        try:
            data = json.loads(text)
        except ValueError:
            raise ProviderError(AUTH_FAILED, "the service account key is not JSON",
                                retriable=False, hint=_HINT_KEY) from None
        if not isinstance(data, dict):
            raise ProviderError(AUTH_FAILED, "the service account key is not a JSON object",
                                retriable=False, hint=_HINT_KEY)
        kind = data.get("type")
        if kind is not None and kind != "service_account":
            raise ProviderError(
                AUTH_FAILED, f"the key is of type {str(kind)[:40]!r}, not service_account",
                retriable=False, hint=_HINT_KEY,
            )
        email, key = data.get("client_email"), data.get("private_key")
        if not isinstance(email, str) or not email or not isinstance(key, str) or not key:
            raise ProviderError(
                AUTH_FAILED, "the service account key lacks client_email or private_key",
                retriable=False, hint=_HINT_KEY,
            )
        return cls(email, key, str(data.get("private_key_id") or ""),
                   str(data.get("client_id") or ""))


def token_error(status: int, body: Any, *, subject: str, scope: str,
                client_id: str) -> ProviderError:
    """A refusal of the token endpoint (HTTP status, parsed JSON body) in the vocabulary."""
    error = str(body.get("error", "")) if isinstance(body, dict) else ""
    description = str(body.get("error_description", ""))[:300] if isinstance(body, dict) else ""
    detail = f"{subject}: token request failed: HTTP {status} {error}: {description}".rstrip(": ")
    if status == 429:
        return ProviderError(THROTTLED, detail, retriable=True)
    if status >= 500 or error in ("temporarily_unavailable", "server_error", "internal_failure"):
        return ProviderError(PROVIDER_ERROR, detail, retriable=True)
    if error == "unauthorized_client":
        return ProviderError(ACCESS_DENIED, detail, retriable=False,
                             hint=delegation_hint(client_id, scope))
    if error in ("access_denied", "admin_policy_enforced"):
        return ProviderError(
            ACCESS_DENIED, detail, retriable=False,
            hint=f"Google refused to let the service account act as {subject}: a Workspace "
            "policy blocks it, or " + delegation_hint(client_id, scope)[0].lower()
            + delegation_hint(client_id, scope)[1:],
        )
    if error == "invalid_grant":
        lowered = description.lower()
        if "jwt" in lowered or "signature" in lowered or "account not found" in lowered:
            return ProviderError(AUTH_FAILED, detail, retriable=False, hint=_HINT_KEY)
        return ProviderError(MAILBOX_NOT_FOUND, detail, retriable=False,
                             hint=mailbox_hint(subject))
    if error == "invalid_scope":
        return ProviderError(
            ACCESS_DENIED, detail, retriable=False, hint=delegation_hint(client_id, scope),
        )
    return ProviderError(AUTH_FAILED, detail, retriable=False, hint=_HINT_KEY)


def _copy(error: ProviderError) -> ProviderError:
    return ProviderError(error.code, error.message, retriable=error.retriable,
                         retry_after=error.retry_after, hint=error.hint)


class GoogleTokens:
    """Access tokens acting as users of a Workspace domain (module docstring).

    One instance per service account key; `get(subject, scope)` may be called
    with any scope the administrator authorized. Call `close` when done."""

    @classmethod
    def from_key_json(cls, key_json: str, context: ProviderContext) -> GoogleTokens:
        """The client for a configuration's stored key (`secrets["service_account"]`);
        raises `ProviderError(auth_failed)` when it is not a service account's key."""
        return cls(ServiceAccountKey.parse(key_json), context)

    def __init__(self, key: ServiceAccountKey, context: ProviderContext, *,
                 token_url: str | None = None, timeout: float | None = None) -> None:
        self.key = key
        self.context = context
        self.token_url = (token_url or context.settings.google_token_url).rstrip("/")
        self.timeout = timeout if timeout is not None else context.settings.request_timeout_seconds
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._failures: dict[tuple[str, str], tuple[float, ProviderError]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._signer: Any = None
        self._http: aiohttp.ClientSession | None = None
        self.requests = 0

    async def get(self, subject: str, scope: str = CALENDAR_SCOPE) -> str:
        """A valid access token acting as `subject` for `scope`, or `ProviderError`."""
        slot = (subject.casefold(), scope)
        cached = self._tokens.get(slot)
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        if len(self._locks) > _PRUNE_ABOVE:
            self._prune()
        async with self._locks.setdefault(slot, asyncio.Lock()):
            now = time.monotonic()
            cached = self._tokens.get(slot)
            if cached is not None and now < cached[1]:
                return cached[0]
            failure = self._failures.get(slot)
            if failure is not None and now < failure[0]:
                raise _copy(failure[1])
            self._failures.pop(slot, None)
            try:
                token, lifetime = await self._fetch(subject, scope)
            except ProviderError as exc:
                if not exc.retriable:
                    self._failures[slot] = (time.monotonic() + _FAILURE_MEMORY, exc)
                raise
            margin = TOKEN_MARGIN if lifetime > 2 * TOKEN_MARGIN else lifetime / 2
            self._tokens[slot] = (token, time.monotonic() + lifetime - margin)
            return token

    def _prune(self) -> None:
        """Drop expired tokens, old failures and idle locks (memory stays bounded by the
        employees written to within a token's lifetime)."""
        now = time.monotonic()
        self._tokens = {k: v for k, v in self._tokens.items() if v[1] > now}
        self._failures = {k: v for k, v in self._failures.items() if v[0] > now}
        self._locks = {k: lock for k, lock in self._locks.items()
                       if lock.locked() or k in self._tokens}

    def invalidate(self, subject: str, token: str, scope: str = CALENDAR_SCOPE) -> None:
        """Forget `token` (the API refused it) so the next call fetches a new one."""
        slot = (subject.casefold(), scope)
        cached = self._tokens.get(slot)
        if cached is not None and cached[0] == token:
            del self._tokens[slot]

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # ------------------------------------------------------------------ internals

    def _sign(self, subject: str, scope: str) -> str:
        """The signed assertion (blocking: RSA; called in a thread)."""
        import jwt
        from cryptography.hazmat.primitives import serialization

        if self._signer is None:
            try:
                self._signer = serialization.load_pem_private_key(
                    self.key.private_key.encode(), password=None
                )
            except (ValueError, TypeError) as exc:
                raise ProviderError(
                    AUTH_FAILED, "the service account's private_key is not a PEM RSA key",
                    retriable=False, hint=_HINT_KEY,
                ) from exc
        now = int(time.time())
        claims = {
            "iss": self.key.client_email, "sub": subject, "scope": scope,
            "aud": self.token_url, "iat": now, "exp": now + ASSERTION_LIFETIME,
        }
        headers = {"kid": self.key.private_key_id} if self.key.private_key_id else None
        try:
            return jwt.encode(claims, self._signer, algorithm="RS256", headers=headers)
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise ProviderError(AUTH_FAILED, "cannot sign with the service account key",
                                retriable=False, hint=_HINT_KEY) from exc

    async def _fetch(self, subject: str, scope: str) -> tuple[str, float]:
        assertion = await asyncio.to_thread(self._sign, subject, scope)
        if self._http is None or self._http.closed:
            self._http = https_session(self.context, timeout=self.timeout, connections=10)
        self.requests += 1
        try:
            async with self._http.post(
                self.token_url, data={"grant_type": JWT_BEARER, "assertion": assertion},
                headers={"Accept": "application/json"},
            ) as response:
                status, raw = response.status, await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = transport_error(exc, where=f"POST {self.token_url}", timeout=self.timeout)
            if error is None:
                raise
            raise error from exc
        try:
            body: Any = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        if status == 200 and isinstance(body, dict) and isinstance(body.get("access_token"), str):
            try:
                lifetime = float(body.get("expires_in", 3600))
            except (TypeError, ValueError):
                lifetime = 3600.0
            return body["access_token"], max(lifetime, 1.0)
        if status == 200:
            raise ProviderError(
                PROVIDER_ERROR, f"{subject}: the token endpoint answered without access_token",
                retriable=True,
            )
        raise token_error(status, body, subject=subject, scope=scope,
                          client_id=self.key.client_id)
