"""API tokens: generation, hashing and roles (pure code, no I/O).

A token is `absync_` followed by 43 URL-safe characters (256 random bits).
The prefix lets secret scanners and people recognise one. Only the SHA-256
of the whole text is stored: a token has enough entropy that a slow password
hash buys nothing, and a database dump gives away no usable token.

Roles are ordered: `read` (monitoring) < `manage` (retry, resync) <
`configure` (create, edit, delete configurations and their credentials).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Literal

Role = Literal["read", "manage", "configure"]
ROLES: tuple[Role, ...] = ("read", "manage", "configure")
PREFIX = "absync_"
_RANK = {role: rank for rank, role in enumerate(ROLES)}


def new_token() -> tuple[str, str]:
    """A fresh (token id, token text). The id is public (listings, revocation)."""
    return secrets.token_hex(6), PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def looks_like_token(text: str) -> bool:
    """Cheap shape check before any database look-up."""
    return text.startswith(PREFIX) and 20 <= len(text) <= 200 and text.isascii()


def same_hash(stored: str, presented: str) -> bool:
    """Constant-time comparison of two hashes."""
    return hmac.compare_digest(stored.encode(), presented.encode())


def allows(role: str, needed: Role) -> bool:
    """Whether a token of `role` may do what needs `needed`."""
    return role in _RANK and _RANK[role] >= _RANK[needed]
