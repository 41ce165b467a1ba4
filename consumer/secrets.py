"""Encryption at rest of configuration secrets (README, 'Security').

`ABSENCE_SYNC_SECRET_KEYS` holds comma-separated Fernet keys: the first
encrypts, every key decrypts, so keys rotate by prepending a new one and
running `absence-sync config reencrypt`.
"""

from __future__ import annotations

import json

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from consumer.logs import register_secret_values


class SecretsError(Exception):
    """Secrets cannot be stored or read with the configured keys."""


class SecretBox:
    def __init__(self, keys: str | None) -> None:
        parts = [k.strip() for k in (keys or "").split(",") if k.strip()]
        self._fernet = MultiFernet([Fernet(k.encode()) for k in parts]) if parts else None

    @property
    def enabled(self) -> bool:
        return self._fernet is not None

    def encrypt(self, secrets: dict[str, str]) -> bytes | None:
        if not secrets:
            return None
        if self._fernet is None:
            raise SecretsError(
                "this configuration holds secrets: set ABSENCE_SYNC_SECRET_KEYS to store them "
                "(generate a key with: absence-sync generate-key)"
            )
        return self._fernet.encrypt(json.dumps(secrets, sort_keys=True).encode())

    def decrypt(self, token: bytes | None) -> dict[str, str]:
        if token is None:
            return {}
        if self._fernet is None:
            raise SecretsError("stored secrets exist but ABSENCE_SYNC_SECRET_KEYS is not set")
        try:
            data = json.loads(self._fernet.decrypt(bytes(token)))
        except InvalidToken as exc:
            raise SecretsError(
                "stored secrets cannot be decrypted with any key of ABSENCE_SYNC_SECRET_KEYS"
            ) from exc
        secrets = {str(k): str(v) for k, v in data.items()}
        register_secret_values(secrets.values())  # never in a log line from now on
        return secrets

    def rotate(self, token: bytes) -> bytes:
        if self._fernet is None:
            raise SecretsError("ABSENCE_SYNC_SECRET_KEYS is not set")
        try:
            return self._fernet.rotate(bytes(token))
        except InvalidToken as exc:
            raise SecretsError("a stored secret cannot be decrypted with any key") from exc
